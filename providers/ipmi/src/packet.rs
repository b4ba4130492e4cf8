//! RMCP+ (IPMI v2.0 over LAN) packet encoding and parsing: the RMCP and session headers, the
//! RAKP key exchange messages, integrity (HMAC-SHA1-96 for cipher suite 3, HMAC-SHA256-128 for
//! cipher suite 17), AES-CBC-128 confidentiality, and IPMI request/response messages. Pure
//! functions over bytes, so the parser can be fuzzed.

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// RMCP header: version 1.0, reserved, no ACK sequence, class IPMI.
pub const RMCP_HEADER: [u8; 4] = [0x06, 0x00, 0xff, 0x07];
/// Session auth type "RMCP+" (IPMI v2.0 format).
pub const AUTH_RMCP_PLUS: u8 = 0x06;

/// Payload types.
pub mod payload {
    pub const IPMI: u8 = 0x00;
    pub const OPEN_SESSION_REQUEST: u8 = 0x10;
    pub const OPEN_SESSION_RESPONSE: u8 = 0x11;
    pub const RAKP1: u8 = 0x12;
    pub const RAKP2: u8 = 0x13;
    pub const RAKP3: u8 = 0x14;
    pub const RAKP4: u8 = 0x15;
}

const ENCRYPTED: u8 = 0x80;
const AUTHENTICATED: u8 = 0x40;

/// The RMCP+ cipher suites pcg speaks. Both use AES-CBC-128 for confidentiality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// RAKP-HMAC-SHA1, HMAC-SHA1-96.
    Three,
    /// RAKP-HMAC-SHA256, HMAC-SHA256-128 (IPMI v2.0 errata; required where SHA-1 is disabled).
    Seventeen,
}

impl CipherSuite {
    pub fn id(self) -> u8 {
        match self {
            Self::Three => 3,
            Self::Seventeen => 17,
        }
    }

    /// Authentication (RAKP) algorithm number.
    pub fn auth_algorithm(self) -> u8 {
        match self {
            Self::Three => 0x01,
            Self::Seventeen => 0x03,
        }
    }

    /// Integrity algorithm number.
    pub fn integrity_algorithm(self) -> u8 {
        match self {
            Self::Three => 0x01,
            Self::Seventeen => 0x04,
        }
    }

    /// The suite whose algorithms these are (confidentiality AES-CBC-128), if pcg speaks it.
    pub fn from_algorithms(auth: u8, integrity: u8, confidentiality: u8) -> Option<Self> {
        [Self::Seventeen, Self::Three].into_iter().find(|s| {
            s.auth_algorithm() == auth
                && s.integrity_algorithm() == integrity
                && confidentiality == 0x01
        })
    }

    /// The RAKP HMAC (key exchange codes, SIK, K1/K2) over the concatenation of `parts`:
    /// 20 bytes (SHA-1) or 32 (SHA-256).
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Self::Three => hmac_sha1(key, parts).to_vec(),
            Self::Seventeen => hmac_sha256(key, parts).to_vec(),
        }
    }

    /// Length of the RAKP 4 integrity check value: 12 (SHA-1-96) or 16 (SHA-256-128).
    pub fn rakp4_icv_len(self) -> usize {
        self.integrity_len()
    }

    /// Length of a session packet's integrity code: 12 or 16.
    pub fn integrity_len(self) -> usize {
        match self {
            Self::Three => 12,
            Self::Seventeen => 16,
        }
    }
}

/// A malformed or unauthentic packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    #[error("not an RMCP/IPMI packet")]
    NotIpmi,
    #[error("unsupported session format (auth type {0:#04x})")]
    AuthType(u8),
    #[error("payload length {0} exceeds the packet")]
    Length(usize),
    #[error("integrity check failed")]
    Integrity,
    #[error("authenticated/encrypted packet outside a session")]
    NoKeys,
    #[error("bad confidentiality trailer")]
    Confidentiality,
    #[error("IPMI message checksum mismatch")]
    Checksum,
}

type HmacSha1 = Hmac<Sha1>;

/// HMAC-SHA1 over the concatenation of `parts`.
pub fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    // HMAC accepts keys of any length.
    let mut mac = match <HmacSha1 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 20],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Session keys derived from the SIK: K1 (integrity) and K2 (the first 16 bytes: AES key), with
/// the suite whose HMAC made them and protects packets.
#[derive(Clone, Copy)]
pub struct Keys {
    pub suite: CipherSuite,
    /// K1 and K2: 20 bytes (SHA-1) or 32 (SHA-256) used of 32.
    pub k1: [u8; 32],
    pub k2: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    /// Cipher suite 3 keys from a SHA-1 SIK.
    pub fn from_sik(sik: &[u8; 20]) -> Self {
        Self::derive(CipherSuite::Three, sik)
    }

    /// K1 = HMAC(SIK, 0x01 × 20) and K2 = HMAC(SIK, 0x02 × 20) with the suite's HMAC (the
    /// constants are 20 bytes for SHA-256 too, as ipmitool and pyghmi compute them).
    pub fn derive(suite: CipherSuite, sik: &[u8]) -> Self {
        let mut k1 = [0u8; 32];
        let mut k2 = [0u8; 32];
        let a = suite.hmac(sik, &[&[0x01; 20]]);
        let b = suite.hmac(sik, &[&[0x02; 20]]);
        k1[..a.len()].copy_from_slice(&a);
        k2[..b.len()].copy_from_slice(&b);
        Self { suite, k1, k2 }
    }

    fn k1(&self) -> &[u8] {
        match self.suite {
            CipherSuite::Three => &self.k1[..20],
            CipherSuite::Seventeen => &self.k1,
        }
    }

    /// The integrity code of a session packet (from the auth type byte on).
    fn integrity(&self, covered: &[u8]) -> Vec<u8> {
        let mut code = self.suite.hmac(self.k1(), &[covered]);
        code.truncate(self.suite.integrity_len());
        code
    }

    fn aes_key(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k.copy_from_slice(&self.k2[..16]);
        k
    }
}

/// Encrypts a payload: IV, then AES-CBC-128 over data + pad (1, 2, 3, ...) + pad length.
pub fn encrypt(keys: &Keys, iv: [u8; 16], data: &[u8]) -> Vec<u8> {
    let pad = (16 - (data.len() + 1) % 16) % 16;
    let mut plain = Vec::with_capacity(data.len() + pad + 1);
    plain.extend_from_slice(data);
    plain.extend((1..=pad).map(|i| i as u8));
    plain.push(pad as u8);
    let enc = cbc::Encryptor::<aes::Aes128>::new(&keys.aes_key().into(), &iv.into());
    let ct = enc.encrypt_padded_vec_mut::<NoPadding>(&plain);
    let mut out = Vec::with_capacity(16 + ct.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    out
}

/// Decrypts a payload produced by [`encrypt`] (by either side).
pub fn decrypt(keys: &Keys, body: &[u8]) -> Result<Vec<u8>, PacketError> {
    if body.len() < 32 || !body.len().is_multiple_of(16) {
        return Err(PacketError::Confidentiality);
    }
    let (iv, ct) = body.split_at(16);
    let mut ivb = [0u8; 16];
    ivb.copy_from_slice(iv);
    let dec = cbc::Decryptor::<aes::Aes128>::new(&keys.aes_key().into(), &ivb.into());
    let mut plain = dec
        .decrypt_padded_vec_mut::<NoPadding>(ct)
        .map_err(|_| PacketError::Confidentiality)?;
    let pad = *plain.last().ok_or(PacketError::Confidentiality)? as usize;
    if pad + 1 > plain.len() {
        return Err(PacketError::Confidentiality);
    }
    plain.truncate(plain.len() - pad - 1);
    Ok(plain)
}

/// Builds an RMCP+ packet. With `keys` (an active session) the payload is encrypted and the
/// packet authenticated; `iv` is the fresh random IV for encryption.
pub fn encode(
    ptype: u8,
    session_id: u32,
    seq: u32,
    payload: &[u8],
    keys: Option<(&Keys, [u8; 16])>,
) -> Vec<u8> {
    let (flags, body) = match keys {
        Some((k, iv)) => (ENCRYPTED | AUTHENTICATED, encrypt(k, iv, payload)),
        None => (0, payload.to_vec()),
    };
    let mut p = Vec::with_capacity(16 + body.len() + 20);
    p.extend_from_slice(&RMCP_HEADER);
    p.push(AUTH_RMCP_PLUS);
    p.push(flags | (ptype & 0x3f));
    p.extend_from_slice(&session_id.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(body.len() as u16).to_le_bytes());
    p.extend_from_slice(&body);
    if let Some((k, _)) = keys {
        // Integrity pad so that the session part through "next header" is a multiple of 4.
        let covered = p.len() - 4 + 2;
        let pad = (4 - covered % 4) % 4;
        p.extend(std::iter::repeat_n(0xff, pad));
        p.push(pad as u8);
        p.push(0x07);
        let code = k.integrity(&p[4..]);
        p.extend_from_slice(&code);
    }
    p
}

/// A parsed RMCP+ packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Payload type (without the encrypted/authenticated flags).
    pub ptype: u8,
    pub session_id: u32,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Parses (and, with `keys`, authenticates and decrypts) an RMCP+ packet.
pub fn decode(p: &[u8], keys: Option<&Keys>) -> Result<Inbound, PacketError> {
    if p.len() < 16 {
        return Err(PacketError::Short(p.len()));
    }
    if p[0] != 0x06 || p[3] & 0x1f != 0x07 {
        return Err(PacketError::NotIpmi);
    }
    if p[4] != AUTH_RMCP_PLUS {
        return Err(PacketError::AuthType(p[4]));
    }
    let flags = p[5];
    let ptype = flags & 0x3f;
    let session_id = u32::from_le_bytes([p[6], p[7], p[8], p[9]]);
    let seq = u32::from_le_bytes([p[10], p[11], p[12], p[13]]);
    let len = u16::from_le_bytes([p[14], p[15]]) as usize;
    let end = 16 + len;
    if end > p.len() {
        return Err(PacketError::Length(len));
    }
    let body = &p[16..end];
    if flags & AUTHENTICATED != 0 {
        let k = keys.ok_or(PacketError::NoKeys)?;
        let code_len = k.suite.integrity_len();
        if p.len() < end + 2 + code_len {
            return Err(PacketError::Integrity);
        }
        let code_at = p.len() - code_len;
        let pad = p[code_at - 2] as usize;
        if p[code_at - 1] != 0x07 || end + pad + 2 != code_at {
            return Err(PacketError::Integrity);
        }
        if k.integrity(&p[4..code_at]) != p[code_at..] {
            return Err(PacketError::Integrity);
        }
    }
    let payload = if flags & ENCRYPTED != 0 {
        decrypt(keys.ok_or(PacketError::NoKeys)?, body)?
    } else {
        body.to_vec()
    };
    Ok(Inbound {
        ptype,
        session_id,
        seq,
        payload,
    })
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// BMC responder address and the remote console's software id.
pub const BMC_ADDR: u8 = 0x20;
pub const CONSOLE_ADDR: u8 = 0x81;

/// Builds an IPMI request message (LAN format) for the BMC.
pub fn ipmi_request(netfn: u8, cmd: u8, rq_seq: u8, data: &[u8]) -> Vec<u8> {
    let mut m = vec![BMC_ADDR, netfn << 2];
    m.push(checksum(&m));
    let start = m.len();
    m.extend_from_slice(&[CONSOLE_ADDR, (rq_seq & 0x3f) << 2, cmd]);
    m.extend_from_slice(data);
    let c = checksum(&m[start..]);
    m.push(c);
    m
}

/// An IPMI response message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmiResponse {
    pub netfn: u8,
    pub rq_seq: u8,
    pub cmd: u8,
    pub completion: u8,
    pub data: Vec<u8>,
}

/// Parses an IPMI response message (LAN format), checking both checksums.
pub fn ipmi_response(m: &[u8]) -> Result<IpmiResponse, PacketError> {
    if m.len() < 8 {
        return Err(PacketError::Short(m.len()));
    }
    if checksum(&m[..2]) != m[2] || checksum(&m[3..m.len() - 1]) != m[m.len() - 1] {
        return Err(PacketError::Checksum);
    }
    Ok(IpmiResponse {
        netfn: m[1] >> 2,
        rq_seq: m[4] >> 2,
        cmd: m[5],
        completion: m[6],
        data: m[7..m.len() - 1].to_vec(),
    })
}

/// An IPMI v1.5 packet outside any session (auth type NONE), e.g. Get Channel Authentication
/// Capabilities, which BMCs answer without a session.
pub fn encode_presession_v15(msg: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(14 + msg.len());
    p.extend_from_slice(&RMCP_HEADER);
    p.extend_from_slice(&[0x00, 0, 0, 0, 0, 0, 0, 0, 0, msg.len() as u8]);
    p.extend_from_slice(msg);
    p
}

/// The IPMI message of an IPMI v1.5 packet with auth type NONE.
pub fn decode_presession_v15(p: &[u8]) -> Result<Vec<u8>, PacketError> {
    if p.len() < 14 {
        return Err(PacketError::Short(p.len()));
    }
    if p[0] != 0x06 || p[3] & 0x1f != 0x07 {
        return Err(PacketError::NotIpmi);
    }
    if p[4] != 0x00 {
        return Err(PacketError::AuthType(p[4]));
    }
    let len = p[13] as usize;
    p.get(14..14 + len)
        .map(<[u8]>::to_vec)
        .ok_or(PacketError::Length(len))
}

/// IPMI v1.5 session auth type MD5.
pub const AUTH_MD5: u8 = 0x02;

/// IPMI v1.5 MD5 auth code: MD5(password ‖ session id ‖ message ‖ session sequence ‖ password).
pub fn md5_auth_code(password: &[u8; 16], sid: u32, msg: &[u8], seq: u32) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(password);
    h.update(sid.to_le_bytes());
    h.update(msg);
    h.update(seq.to_le_bytes());
    h.update(password);
    h.finalize().into()
}

/// Builds an IPMI v1.5 session packet authenticated with MD5.
pub fn encode_v15_md5(seq: u32, sid: u32, msg: &[u8], password: &[u8; 16]) -> Vec<u8> {
    let mut p = Vec::with_capacity(30 + msg.len());
    p.extend_from_slice(&RMCP_HEADER);
    p.push(AUTH_MD5);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&sid.to_le_bytes());
    p.extend_from_slice(&md5_auth_code(password, sid, msg, seq));
    p.push(msg.len() as u8);
    p.extend_from_slice(msg);
    p
}

/// A parsed IPMI v1.5 session packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound15 {
    pub auth_type: u8,
    pub seq: u32,
    pub session_id: u32,
    pub msg: Vec<u8>,
}

/// Parses an IPMI v1.5 packet; an MD5 auth code is checked against `password`.
pub fn decode_v15(p: &[u8], password: &[u8; 16]) -> Result<Inbound15, PacketError> {
    if p.len() < 14 {
        return Err(PacketError::Short(p.len()));
    }
    if p[0] != 0x06 || p[3] & 0x1f != 0x07 {
        return Err(PacketError::NotIpmi);
    }
    let auth_type = p[4];
    let seq = u32::from_le_bytes([p[5], p[6], p[7], p[8]]);
    let session_id = u32::from_le_bytes([p[9], p[10], p[11], p[12]]);
    let (code, at) = match auth_type {
        0x00 => (None, 13),
        AUTH_MD5 => {
            if p.len() < 30 {
                return Err(PacketError::Short(p.len()));
            }
            (Some(&p[13..29]), 29)
        }
        other => return Err(PacketError::AuthType(other)),
    };
    let len = p[at] as usize;
    let msg = p
        .get(at + 1..at + 1 + len)
        .ok_or(PacketError::Length(len))?;
    if let Some(code) = code {
        if md5_auth_code(password, session_id, msg, seq)[..] != *code {
            return Err(PacketError::Integrity);
        }
    }
    Ok(Inbound15 {
        auth_type,
        seq,
        session_id,
        msg: msg.to_vec(),
    })
}

/// The cipher suite ids in Get Channel Cipher Suites record data (all pages, channel byte
/// removed): a standard record is 0xC0, the id, then algorithm bytes (below 0xC0); an OEM one
/// is 0xC1, the id, a 3-byte IANA number, then algorithm bytes.
pub fn cipher_suite_ids(records: &[u8]) -> Vec<u8> {
    let mut ids = Vec::new();
    let mut i = 0;
    while i + 1 < records.len() {
        match records[i] {
            0xc0 => {
                ids.push(records[i + 1]);
                i += 2;
            }
            0xc1 => {
                ids.push(records[i + 1]);
                i += 5;
            }
            _ => i += 1,
        }
    }
    ids
}

/// Open Session Request proposing `suite` (its authentication and integrity algorithms, and
/// AES-CBC-128).
pub fn open_session_request(
    tag: u8,
    console_sid: u32,
    max_priv: u8,
    suite: CipherSuite,
) -> Vec<u8> {
    let mut m = vec![tag, max_priv, 0, 0];
    m.extend_from_slice(&console_sid.to_le_bytes());
    m.extend_from_slice(&[0x00, 0, 0, 0x08, suite.auth_algorithm(), 0, 0, 0]);
    m.extend_from_slice(&[0x01, 0, 0, 0x08, suite.integrity_algorithm(), 0, 0, 0]);
    m.extend_from_slice(&[0x02, 0, 0, 0x08, 0x01, 0, 0, 0]); // confidentiality: AES-CBC-128
    m
}

/// Open Session Response fields pcg uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    pub tag: u8,
    pub status: u8,
    /// Absent in short error responses (ipmi_sim sends only tag and status).
    pub console_sid: Option<u32>,
    pub bmc_sid: u32,
    /// The algorithms the BMC chose (authentication, integrity, confidentiality), on success.
    pub algorithms: Option<(u8, u8, u8)>,
}

fn u32_at(m: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]])
}

pub fn parse_open_session_response(m: &[u8]) -> Result<OpenSessionResponse, PacketError> {
    // An error response may stop after the status byte.
    if m.len() < 2 || (m[1] == 0 && m.len() < 8) {
        return Err(PacketError::Short(m.len()));
    }
    let status = m[1];
    let bmc_sid = if status == 0 {
        if m.len() < 36 {
            return Err(PacketError::Short(m.len()));
        }
        u32_at(m, 8)
    } else {
        0
    };
    Ok(OpenSessionResponse {
        tag: m[0],
        status,
        console_sid: (m.len() >= 8).then(|| u32_at(m, 4)),
        bmc_sid,
        algorithms: (status == 0).then(|| (m[16], m[24], m[32])),
    })
}

/// RAKP Message 1.
pub fn rakp1(tag: u8, bmc_sid: u32, rm: &[u8; 16], role: u8, user: &[u8]) -> Vec<u8> {
    let mut m = vec![tag, 0, 0, 0];
    m.extend_from_slice(&bmc_sid.to_le_bytes());
    m.extend_from_slice(rm);
    m.extend_from_slice(&[role, 0, 0, user.len() as u8]);
    m.extend_from_slice(user);
    m
}

/// RAKP Message 2 fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    pub tag: u8,
    pub status: u8,
    /// Absent in short error responses.
    pub console_sid: Option<u32>,
    pub rc: [u8; 16],
    pub guid: [u8; 16],
    pub auth_code: Vec<u8>,
}

pub fn parse_rakp2(m: &[u8]) -> Result<Rakp2, PacketError> {
    if m.len() < 2 {
        return Err(PacketError::Short(m.len()));
    }
    let mut r = Rakp2 {
        tag: m[0],
        status: m[1],
        console_sid: (m.len() >= 8).then(|| u32_at(m, 4)),
        rc: [0; 16],
        guid: [0; 16],
        auth_code: Vec::new(),
    };
    if r.status == 0 {
        if m.len() < 60 {
            return Err(PacketError::Short(m.len()));
        }
        r.rc.copy_from_slice(&m[8..24]);
        r.guid.copy_from_slice(&m[24..40]);
        r.auth_code = m[40..].to_vec();
    }
    Ok(r)
}

/// RAKP Message 3 (status 0 with the key exchange code, or an error status to abort).
pub fn rakp3(tag: u8, status: u8, bmc_sid: u32, auth_code: &[u8]) -> Vec<u8> {
    let mut m = vec![tag, status, 0, 0];
    m.extend_from_slice(&bmc_sid.to_le_bytes());
    m.extend_from_slice(auth_code);
    m
}

/// RAKP Message 4 fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    pub tag: u8,
    pub status: u8,
    /// Absent in short error responses.
    pub console_sid: Option<u32>,
    pub icv: Vec<u8>,
}

pub fn parse_rakp4(m: &[u8]) -> Result<Rakp4, PacketError> {
    if m.len() < 2 || (m[1] == 0 && m.len() < 8) {
        return Err(PacketError::Short(m.len()));
    }
    Ok(Rakp4 {
        tag: m[0],
        status: m[1],
        console_sid: (m.len() >= 8).then(|| u32_at(m, 4)),
        icv: m.get(8..).unwrap_or_default().to_vec(),
    })
}

/// Parses an inbound datagram as far as it goes, with and without keys; never panics. Used by the
/// fuzz target.
pub fn parse_any(bytes: &[u8], keys: &Keys) {
    for k in [None, Some(keys)] {
        if let Ok(p) = decode(bytes, k) {
            let _ = ipmi_response(&p.payload);
            let _ = parse_open_session_response(&p.payload);
            let _ = parse_rakp2(&p.payload);
            let _ = parse_rakp4(&p.payload);
        }
    }
    if let Ok(m) = decode_presession_v15(bytes) {
        let _ = ipmi_response(&m);
    }
    if let Ok(m) = decode_v15(bytes, &[0x42; 16]) {
        let _ = ipmi_response(&m.msg);
    }
    let _ = ipmi_response(bytes);
    let _ = parse_rakp2(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_packet_round_trip() {
        let keys = Keys::from_sik(&[7u8; 20]);
        let msg = ipmi_request(0x00, 0x01, 5, &[]);
        for len in 0..40 {
            let data = vec![0xabu8; len];
            let p = encode(payload::IPMI, 0x1234, 9, &data, Some((&keys, [3u8; 16])));
            let d = decode(&p, Some(&keys)).expect("decodes");
            assert_eq!((d.ptype, d.session_id, d.seq), (0, 0x1234, 9));
            assert_eq!(d.payload, data);
            assert_eq!((p.len() - 4 - 12) % 4, 0);
            let mut bad = p.clone();
            let n = bad.len();
            bad[n - 1] ^= 1;
            assert_eq!(decode(&bad, Some(&keys)), Err(PacketError::Integrity));
        }
        let r = ipmi_request(0x06, 0x01, 1, &[]);
        assert_eq!(r.len(), 7);
        assert!(ipmi_response(&msg).is_err() || msg.len() >= 8);
    }

    #[test]
    fn v15_md5_round_trip() {
        let pw = [7u8; 16];
        let msg = ipmi_request(0x06, 0x01, 2, &[]);
        let p = encode_v15_md5(5, 0xabcd, &msg, &pw);
        let d = decode_v15(&p, &pw).expect("decodes");
        assert_eq!(
            (d.auth_type, d.seq, d.session_id, d.msg),
            (AUTH_MD5, 5, 0xabcd, msg)
        );
        assert_eq!(decode_v15(&p, &[8u8; 16]), Err(PacketError::Integrity));
    }

    #[test]
    fn cipher_suite_records() {
        // ipmi_sim's first page, then a page with suites 3 and 17 and an OEM record.
        let mut r = vec![0xc0, 0x00, 0x00, 0x40, 0x80, 0xc0, 0x01, 0x01, 0x40, 0x80];
        r.extend_from_slice(&[0xc0, 0x03, 0x01, 0x41, 0x81, 0xc0, 0x11, 0x03, 0x44, 0x81]);
        r.extend_from_slice(&[0xc1, 0x80, 0x57, 0x01, 0x00, 0x01, 0x41]);
        assert_eq!(cipher_suite_ids(&r), vec![0, 1, 3, 17, 0x80]);
        assert_eq!(
            CipherSuite::from_algorithms(0x03, 0x04, 0x01),
            Some(CipherSuite::Seventeen)
        );
        assert_eq!(
            CipherSuite::from_algorithms(0x01, 0x01, 0x01),
            Some(CipherSuite::Three)
        );
        assert_eq!(CipherSuite::from_algorithms(0x01, 0x01, 0x00), None);
    }

    /// HMAC-SHA256 vectors of RFC 4231 (test cases 1 and 2), and the suite 17 key derivation
    /// and packet integrity as ipmitool and pyghmi compute them: K1 = HMAC-SHA256(SIK,
    /// 0x01 × 20), the integrity code the first 16 bytes of HMAC-SHA256(K1, packet).
    #[test]
    fn suite_17_primitives() {
        let h = hmac_sha256(&[0x0b; 20], &[b"Hi There"]);
        assert_eq!(
            hex(&h),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        let h = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&h),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let sik = [0x5au8; 32];
        let k = Keys::derive(CipherSuite::Seventeen, &sik);
        assert_eq!(k.k1.to_vec(), hmac_sha256(&sik, &[&[0x01; 20]]).to_vec());
        assert_eq!(k.k2.to_vec(), hmac_sha256(&sik, &[&[0x02; 20]]).to_vec());
        let data = ipmi_request(0x00, 0x01, 3, &[]);
        let p = encode(payload::IPMI, 0x1234, 9, &data, Some((&k, [3u8; 16])));
        let code_at = p.len() - 16;
        assert_eq!(
            p[code_at..].to_vec(),
            hmac_sha256(&k.k1, &[&p[4..code_at]])[..16].to_vec()
        );
        assert_eq!((p.len() - 4 - 16) % 4, 0, "integrity pad");
        let d = decode(&p, Some(&k)).expect("decodes");
        assert_eq!(d.payload, data);
        // Suite 3 keys do not open it.
        let k3 = Keys::derive(CipherSuite::Three, &sik[..20]);
        assert_eq!(decode(&p, Some(&k3)), Err(PacketError::Integrity));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn short_error_responses_parse() {
        // ipmi_sim answers a full BMC with just tag and status 0x01.
        let r = parse_open_session_response(&[0x01, 0x01]).expect("parses");
        assert_eq!((r.tag, r.status, r.console_sid), (1, 1, None));
        assert!(parse_open_session_response(&[0x01, 0x00]).is_err());
        assert_eq!(parse_rakp2(&[2, 0x0d]).expect("parses").status, 0x0d);
        assert_eq!(parse_rakp4(&[3, 0x0f]).expect("parses").status, 0x0f);
    }

    #[test]
    fn parses_a_response_message() {
        // rqAddr, netfn 0x07 (App response) << 2, chk, rsAddr, seq<<2, cmd, cc, data, chk
        let mut m = vec![CONSOLE_ADDR, 0x07 << 2];
        m.push(checksum(&m));
        m.extend_from_slice(&[BMC_ADDR, 3 << 2, 0x01, 0x00, 0x20, 0x81]);
        let c = checksum(&m[3..]);
        m.push(c);
        let r = ipmi_response(&m).expect("parses");
        assert_eq!((r.netfn, r.rq_seq, r.cmd, r.completion), (0x07, 3, 0x01, 0));
        assert_eq!(r.data, vec![0x20, 0x81]);
        m[4] ^= 0x04;
        assert_eq!(ipmi_response(&m), Err(PacketError::Checksum));
        parse_any(
            &[
                0x06, 0, 0xff, 0x07, 0x06, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff,
            ],
            &Keys::from_sik(&[0; 20]),
        );
    }
}
