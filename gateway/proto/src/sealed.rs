//! Secrets sealed to a gateway: how a provider password crosses the SaaS without being stored
//! there in clear.
//!
//! When a command payload reaches the SaaS, every value under a secret-named key (see
//! [`is_secret_key`]) is replaced, before anything is written, by
//! `{"pcg_sealed": "v1.<kid>.<data>"}`: the value's JSON encrypted to the public key of the
//! gateway's certificate (ECDH P-256 with a fresh ephemeral key, HKDF-SHA256, AES-256-GCM).
//! Only the gateway, holding the private key, can open it; the SaaS, its store and its logs see
//! ciphertext. `kid` is the first 8 bytes (hex) of the SHA-256 of the recipient's public key, so
//! a gateway that renewed its key knows which of its keys to use. `data` is unpadded base64url
//! of `ephemeral public key (65 bytes, uncompressed) | nonce (12) | ciphertext and tag`.
//!
//! The gateway opens the secrets of a payload in memory just before a handler runs; its journal
//! keeps the payload sealed as received.

use base64::Engine as _;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use ring::{aead, hkdf};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The object key that marks a sealed value.
pub const SEALED_KEY: &str = "pcg_sealed";
const VERSION: &str = "v1";
const AAD: &[u8] = b"pcg-sealed-v1";
const SALT: &[u8] = b"pcg-sealed-v1 salt";

/// Words that make an object key name a secret (`password`, `bmc_password`, `api_key`, ...).
const SECRET_WORDS: [&str; 6] = [
    "password",
    "secret",
    "token",
    "private_key",
    "api_key",
    "passphrase",
];

/// Whether an object key names a secret: one of [`SECRET_WORDS`] exactly, or ending in `_word`
/// (`bmc_password`, `application_credential_secret`), compared case-insensitively.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| {
        k == *w
            || (k.len() > w.len() && k.ends_with(w) && k.as_bytes()[k.len() - w.len() - 1] == b'_')
    })
}

/// Why a sealed value could not be made or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the gateway's public key is not a P-256 key ({0})")]
    BadPublicKey(String),
    #[error("the gateway's private key is not a P-256 PKCS#8 key ({0})")]
    BadPrivateKey(String),
    #[error("a sealed secret is malformed ({0})")]
    Malformed(&'static str),
    #[error("a secret was sealed to key {kid}, which this gateway does not hold (it was sealed for an older key or another gateway); send the command again")]
    UnknownKey { kid: String },
    #[error("a sealed secret does not open with this gateway's key (corrupt or tampered with)")]
    Open,
}

/// A public key secrets are sealed to.
#[derive(Clone, Debug)]
pub struct Recipient {
    key: p256::PublicKey,
    point: Vec<u8>,
    kid: String,
}

impl Recipient {
    /// From the SEC1 encoding of a P-256 point (the `subjectPublicKey` bits of a certificate).
    pub fn from_sec1(point: &[u8]) -> Result<Self, SealError> {
        let key = p256::PublicKey::from_sec1_bytes(point)
            .map_err(|e| SealError::BadPublicKey(e.to_string()))?;
        let point = key.to_encoded_point(false).as_bytes().to_vec();
        Ok(Recipient {
            kid: kid(&point),
            key,
            point,
        })
    }

    /// Key id: hex of the first 8 bytes of SHA-256 of the uncompressed point.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Seals `plain` to this key.
    pub fn seal(&self, plain: &[u8]) -> String {
        let eph = loop {
            // A random 32-byte string is a valid scalar with overwhelming probability.
            if let Ok(k) = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
                break k;
            }
        };
        let eph_point = eph.public_key().to_encoded_point(false).as_bytes().to_vec();
        let shared = p256::ecdh::diffie_hellman(eph.to_nonzero_scalar(), self.key.as_affine());
        let key = derive(shared.raw_secret_bytes(), &eph_point, &self.point);
        let nonce: [u8; 12] = rand::random();
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(AAD),
            &mut buf,
        )
        .expect("AES-GCM sealing of a small buffer cannot fail");
        let mut data = eph_point;
        data.extend_from_slice(&nonce);
        data.extend_from_slice(&buf);
        format!(
            "{VERSION}.{}.{}",
            self.kid,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
        )
    }
}

/// A private key sealed secrets are opened with.
pub struct Opener {
    key: p256::SecretKey,
    point: Vec<u8>,
    kid: String,
}

impl Opener {
    /// From a PKCS#8 PEM private key (as the gateway generates at pairing and renewal).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SealError> {
        use p256::pkcs8::DecodePrivateKey as _;
        let key = p256::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| SealError::BadPrivateKey(e.to_string()))?;
        let point = key.public_key().to_encoded_point(false).as_bytes().to_vec();
        Ok(Opener {
            kid: kid(&point),
            key,
            point,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The recipient that seals to this key.
    pub fn recipient(&self) -> Recipient {
        Recipient {
            key: self.key.public_key(),
            point: self.point.clone(),
            kid: self.kid.clone(),
        }
    }

    fn open(&self, data: &[u8]) -> Result<Vec<u8>, SealError> {
        if data.len() < 65 + 12 + 16 {
            return Err(SealError::Malformed("too short"));
        }
        let (eph_point, rest) = data.split_at(65);
        let (nonce, ct) = rest.split_at(12);
        let eph = p256::PublicKey::from_sec1_bytes(eph_point)
            .map_err(|_| SealError::Malformed("bad ephemeral key"))?;
        let shared = p256::ecdh::diffie_hellman(self.key.to_nonzero_scalar(), eph.as_affine());
        let key = derive(shared.raw_secret_bytes(), eph_point, &self.point);
        let mut buf = ct.to_vec();
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SealError::Malformed("bad nonce"))?;
        let plain = key
            .open_in_place(nonce, aead::Aad::from(AAD), &mut buf)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

fn kid(point: &[u8]) -> String {
    hex::encode(&Sha256::digest(point)[..8])
}

fn derive(shared: &[u8], eph_point: &[u8], recipient_point: &[u8]) -> aead::LessSafeKey {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(shared);
    let info = [eph_point, recipient_point];
    let okm = prk
        .expand(&info, Len)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    let mut key = [0u8; 32];
    okm.fill(&mut key)
        .expect("the buffer has the requested length");
    aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &key).expect("32 bytes is an AES-256 key"),
    )
}

fn sealed_str(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get(SEALED_KEY).and_then(Value::as_str),
        _ => None,
    }
}

/// Seals, in place, every value under a secret-named key at any depth (null values and values
/// already sealed stay as they are). Returns how many were sealed.
pub fn seal_secrets(v: &mut Value, to: &Recipient) -> usize {
    match v {
        Value::Object(m) => {
            let mut n = 0;
            for (k, val) in m.iter_mut() {
                if is_secret_key(k) {
                    if !val.is_null() && sealed_str(val).is_none() {
                        let plain = serde_json::to_vec(val).expect("JSON values serialise");
                        *val = serde_json::json!({ SEALED_KEY: to.seal(&plain) });
                        n += 1;
                    }
                } else {
                    n += seal_secrets(val, to);
                }
            }
            n
        }
        Value::Array(a) => a.iter_mut().map(|x| seal_secrets(x, to)).sum(),
        _ => 0,
    }
}

/// Opens, in place, every sealed value at any depth with whichever of `keys` it was sealed to.
/// Returns how many were opened.
pub fn open_secrets(v: &mut Value, keys: &[Opener]) -> Result<usize, SealError> {
    if let Some(s) = sealed_str(v) {
        let mut parts = s.splitn(3, '.');
        let (Some(ver), Some(kid), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SealError::Malformed("expected v1.<kid>.<data>"));
        };
        if ver != VERSION {
            return Err(SealError::Malformed("unknown version"));
        }
        let key = keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| SealError::UnknownKey { kid: kid.into() })?;
        let data = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(data)
            .map_err(|_| SealError::Malformed("not base64url"))?;
        let plain = key.open(&data)?;
        *v = serde_json::from_slice(&plain).map_err(|_| SealError::Malformed("not JSON"))?;
        return Ok(1);
    }
    match v {
        Value::Object(m) => {
            let mut n = 0;
            for val in m.values_mut() {
                n += open_secrets(val, keys)?;
            }
            Ok(n)
        }
        Value::Array(a) => {
            let mut n = 0;
            for x in a {
                n += open_secrets(x, keys)?;
            }
            Ok(n)
        }
        _ => Ok(0),
    }
}

/// Whether `v` holds a sealed value anywhere.
pub fn contains_sealed(v: &Value) -> bool {
    if sealed_str(v).is_some() {
        return true;
    }
    match v {
        Value::Object(m) => m.values().any(contains_sealed),
        Value::Array(a) => a.iter().any(contains_sealed),
        _ => false,
    }
}

/// Whether any value under a secret-named key (not null, not yet sealed) is in `v`.
pub fn contains_secrets(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, val)| {
            if is_secret_key(k) {
                !val.is_null() && sealed_str(val).is_none()
            } else {
                contains_secrets(val)
            }
        }),
        Value::Array(a) => a.iter().any(contains_secrets),
        _ => false,
    }
}

/// Replaces, in place, every value under a secret-named key (sealed or not) with
/// `"<redacted>"`, at any depth: for views, logs and results.
pub fn redact_secrets(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if is_secret_key(k) {
                    if !val.is_null() {
                        *val = Value::String("<redacted>".into());
                    }
                } else {
                    redact_secrets(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_pem() -> String {
        // A fixed PKCS#8 P-256 key (test only), as rcgen writes them.
        use p256::pkcs8::EncodePrivateKey as _;
        p256::SecretKey::from_slice(&[7u8; 32])
            .expect("valid scalar")
            .to_pkcs8_pem(Default::default())
            .expect("pem")
            .to_string()
    }

    #[test]
    fn secret_keys() {
        for k in [
            "password",
            "Password",
            "bmc_password",
            "application_credential_secret",
            "api_key",
            "token",
            "proxy_token",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["tokens", "passwordless", "user", "secretary", "xpassword"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn seal_and_open_round_trip_at_any_depth() {
        let opener = Opener::from_pkcs8_pem(&key_pem()).expect("key");
        let to = opener.recipient();
        let original = json!({
            "name": "n",
            "endpoint": {"user": "u", "password": "hunter2", "tls": {"pin_sha256": "ab"}},
            "clouds": [{"auth": {"application_credential_secret": {"nested": 1}}}],
            "token": null
        });
        let mut v = original.clone();
        assert_eq!(seal_secrets(&mut v, &to), 2);
        let text = v.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("nested"), "{text}");
        assert_eq!(v["endpoint"]["user"], "u");
        // Sealing twice leaves sealed values alone.
        assert_eq!(seal_secrets(&mut v, &to), 0);
        let mut opened = v.clone();
        assert_eq!(
            open_secrets(&mut opened, std::slice::from_ref(&opener)),
            Ok(2)
        );
        assert_eq!(opened, original);
        let mut redacted = v;
        redact_secrets(&mut redacted);
        assert_eq!(redacted["endpoint"]["password"], "<redacted>");
        assert_eq!(redacted["token"], Value::Null);
    }

    #[test]
    fn another_key_or_tampering_is_refused() {
        let opener = Opener::from_pkcs8_pem(&key_pem()).expect("key");
        let mut v = json!({"password": "p"});
        seal_secrets(&mut v, &opener.recipient());
        use p256::pkcs8::EncodePrivateKey as _;
        let other_pem = p256::SecretKey::from_slice(&[9u8; 32])
            .expect("scalar")
            .to_pkcs8_pem(Default::default())
            .expect("pem")
            .to_string();
        let other = Opener::from_pkcs8_pem(&other_pem).expect("key");
        assert!(matches!(
            open_secrets(&mut v.clone(), std::slice::from_ref(&other)),
            Err(SealError::UnknownKey { .. })
        ));
        // Flip one ciphertext character.
        let s = v["password"][SEALED_KEY]
            .as_str()
            .expect("sealed")
            .to_string();
        let mut bytes = s.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let mut t = json!({"password": {SEALED_KEY: String::from_utf8(bytes).expect("ascii")}});
        assert_eq!(
            open_secrets(&mut t, std::slice::from_ref(&opener)),
            Err(SealError::Open)
        );
    }
}
