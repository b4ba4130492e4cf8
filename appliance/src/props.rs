//! The appliance's properties: where they come from (an OVF environment document, a NoCloud
//! or OpenStack config-drive `#cloud-config`) and what they must look like. Every property is
//! checked on its own, so one bad value is reported by name and the others still apply.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;

/// Property keys, as the OVF descriptor declares them (`pcg.*`).
pub const TOKEN: &str = "pcg.pairing_token";
pub const HOSTNAME: &str = "pcg.hostname";
pub const IP_MODE: &str = "pcg.ip_mode";
pub const IP_ADDRESS: &str = "pcg.ip_address";
pub const IP_PREFIX: &str = "pcg.ip_prefix";
pub const IP_GATEWAY: &str = "pcg.ip_gateway";
pub const DNS: &str = "pcg.dns_servers";
pub const NTP: &str = "pcg.ntp_servers";
pub const PROXY_URL: &str = "pcg.proxy_url";
pub const PROXY_CA: &str = "pcg.proxy_ca";
pub const SSH_KEY: &str = "pcg.ssh_public_key";

/// Every key the appliance reads.
pub const KEYS: [&str; 11] = [
    TOKEN, HOSTNAME, IP_MODE, IP_ADDRESS, IP_PREFIX, IP_GATEWAY, DNS, NTP, PROXY_URL, PROXY_CA,
    SSH_KEY,
];

/// Raw properties: key to value, as found.
pub type Props = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what} is not well-formed XML: {message}")]
    Xml { what: String, message: String },
    #[error("{what} has no OVF Environment element")]
    NotOvfEnv { what: String },
    #[error("{what} is not valid YAML: {message}")]
    Yaml { what: String, message: String },
}

/// Reads the `Property` elements of an OVF environment document (`ovf-env.xml`, as vSphere
/// writes it to the ISO transport's CD-ROM or to `guestinfo.ovfEnv`). Namespace prefixes are
/// ignored: `oe:key`/`oe:value` and `key`/`value` are read alike.
pub fn parse_ovf_env(xml: &str, what: &str) -> Result<Props, SourceError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut props = Props::new();
    let mut saw_env = false;
    let err = |e: &dyn std::fmt::Display| SourceError::Xml {
        what: what.to_string(),
        message: e.to_string(),
    };
    loop {
        match reader.read_event().map_err(|e| err(&e))? {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.local_name();
                if name.as_ref() == "Environment" {
                    saw_env = true;
                }
                if name.as_ref() != "Property" {
                    continue;
                }
                let (mut key, mut value) = (None, None);
                for a in e.attributes() {
                    let a = a.map_err(|e| err(&e))?;
                    let v = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| err(&e))?
                        .into_owned();
                    match a.key.local_name().as_ref() {
                        "key" => key = Some(v),
                        "value" => value = Some(v),
                        _ => {}
                    }
                }
                if let Some(k) = key {
                    props.insert(k, value.unwrap_or_default());
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !saw_env {
        return Err(SourceError::NotOvfEnv {
            what: what.to_string(),
        });
    }
    Ok(props)
}

/// Reads the properties from a `#cloud-config` user-data document (NoCloud seed or OpenStack
/// config drive): the `pcg:` mapping holds the same keys as the OVF properties, with or
/// without the `pcg.` prefix; cloud-init's own `hostname` and `ssh_authorized_keys` (first key)
/// are taken when the mapping does not set them.
pub fn parse_cloud_config(text: &str, what: &str) -> Result<Props, SourceError> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| SourceError::Yaml {
        what: what.to_string(),
        message: e.to_string(),
    })?;
    let mut props = Props::new();
    let scalar = |v: &serde_yaml::Value| match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Sequence(items) => Some(
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    };
    if let Some(map) = doc.get("pcg").and_then(|v| v.as_mapping()) {
        for (k, v) in map {
            if let (Some(k), Some(v)) = (k.as_str(), scalar(v)) {
                let key = if k.starts_with("pcg.") {
                    k.to_string()
                } else {
                    format!("pcg.{k}")
                };
                props.insert(key, v);
            }
        }
    }
    if !props.contains_key(HOSTNAME) {
        if let Some(h) = doc.get("hostname").and_then(scalar) {
            props.insert(HOSTNAME.into(), h);
        }
    }
    if !props.contains_key(SSH_KEY) {
        if let Some(k) = doc
            .get("ssh_authorized_keys")
            .and_then(|v| v.as_sequence())
            .and_then(|s| s.first())
            .and_then(|v| v.as_str())
        {
            props.insert(SSH_KEY.into(), k.to_string());
        }
    }
    Ok(props)
}

/// How the NIC gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    Dhcp,
    Static {
        address: IpAddr,
        prefix: u8,
        gateway: Option<IpAddr>,
    },
}

/// The checked settings. A field whose property was invalid holds the fallback (DHCP, no
/// proxy, ...), and the problem is in [`Checked::problems`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub token: Option<String>,
    pub hostname: Option<String>,
    pub network: Network,
    pub dns: Vec<IpAddr>,
    pub ntp: Vec<String>,
    pub proxy_url: Option<String>,
    /// Normalised PEM.
    pub proxy_ca: Option<String>,
    pub ssh_key: Option<String>,
}

/// One invalid property: which, and why (the value itself is never repeated: it may be secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "property {}: {}", self.key, self.message)
    }
}

#[derive(Debug, Clone)]
pub struct Checked {
    pub settings: Settings,
    pub problems: Vec<Problem>,
}

fn list(v: &str) -> Vec<String> {
    v.split([',', ' ', ';', '\n', '\t'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A DNS host name: labels of letters, digits and inner hyphens, at most 253 characters.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks an OpenSSH public key line: a known type, base64 whose blob names the same type.
pub fn check_ssh_key(line: &str) -> Result<String, String> {
    let line = line.trim();
    if line.contains('\n') {
        return Err("holds more than one line; give one public key".into());
    }
    let mut parts = line.splitn(3, ' ');
    let (kind, blob) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    const KINDS: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    if !KINDS.contains(&kind) {
        return Err(format!(
            "not an OpenSSH public key (it must start with one of {}); paste the contents of your id_*.pub file",
            KINDS.join(", ")
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "the key's base64 part is damaged; paste the whole line again".to_string())?;
    let named = bytes
        .get(..4)
        .and_then(|n| usize::try_from(u32::from_be_bytes([n[0], n[1], n[2], n[3]])).ok())
        .and_then(|n| bytes.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return Err(format!("the key's data is not a {kind} key"));
    }
    Ok(line.to_string())
}

/// Checks a proxy URL: `http://[user:password@]host:port` (or `https://`).
pub fn check_proxy_url(u: &str) -> Result<String, String> {
    let u = u.trim();
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or("must start with http:// or https:// (http://[user:password@]host:port)")?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains(char::is_whitespace) {
        return Err("must be http://[user:password@]host:port with no path".into());
    }
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6
            .split_once("]:")
            .ok_or("needs a port: http://[v6]:port")?;
        (h, p)
    } else {
        hostport
            .rsplit_once(':')
            .ok_or("needs a port: http://host:port")?
    };
    if host.is_empty() || (host.parse::<IpAddr>().is_err() && !valid_hostname(host)) {
        return Err("its host is not a valid name or address".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(u.to_string()),
        _ => Err("its port is not a number from 1 to 65535".into()),
    }
}

/// Accepts a PEM certificate (newlines may have been replaced by spaces, as single-line wizard
/// fields do) or the base64 of one; returns it as normalised PEM.
pub fn normalise_pem_cert(v: &str) -> Result<String, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let v = v.trim();
    let text = if v.contains(BEGIN) {
        v.to_string()
    } else {
        let compact: String = v.split_whitespace().collect();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| "neither a PEM certificate nor the base64 of one".to_string())?;
        String::from_utf8(raw).map_err(|_| "the base64 does not hold a PEM certificate")?
    };
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let end = after
            .find(END)
            .ok_or("a certificate has BEGIN but no END line")?;
        let body: String = after[..end].split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .map_err(|_| "a certificate's base64 body is damaged")?;
        if der.first() != Some(&0x30) {
            return Err("a certificate's body is not DER".into());
        }
        out.push_str(BEGIN);
        out.push('\n');
        for chunk in body.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(END);
        out.push('\n');
        rest = &after[end + END.len()..];
    }
    if out.is_empty() {
        return Err("holds no -----BEGIN CERTIFICATE----- block".into());
    }
    Ok(out)
}

/// Checks every property; invalid ones fall back to the default and are listed as problems.
/// `now_unix` is used to refuse an expired pairing token before any network is needed.
pub fn check(props: &Props, now_unix: i64) -> Checked {
    let mut problems = Vec::new();
    let get = |k: &str| {
        props
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let mut bad = |key: &'static str, message: String| problems.push(Problem { key, message });

    let token = get(TOKEN).and_then(|t| match pcg_proto::pairing::PairingToken::decode(&t) {
        Ok(decoded) if decoded.expires_unix < now_unix => {
            bad(
                TOKEN,
                format!(
                    "the pairing token expired at {} (UTC); create a new one in your tenant",
                    pcg_gateway::status::rfc3339(decoded.expires_unix.saturating_mul(1000))
                ),
            );
            None
        }
        Ok(_) => Some(t),
        Err(e) => {
            bad(TOKEN, e.to_string());
            None
        }
    });
    let hostname = get(HOSTNAME).and_then(|h| {
        if valid_hostname(&h) {
            Some(h.to_ascii_lowercase())
        } else {
            bad(HOSTNAME, "not a valid host name (letters, digits and inner hyphens, dot-separated labels of at most 63 characters)".into());
            None
        }
    });
    let mode = get(IP_MODE)
        .unwrap_or_else(|| "dhcp".into())
        .to_ascii_lowercase();
    let network = match mode.as_str() {
        "dhcp" => Network::Dhcp,
        "static" => {
            let address = get(IP_ADDRESS).and_then(|a| a.parse::<IpAddr>().ok());
            let prefix = get(IP_PREFIX).and_then(|p| p.trim_start_matches('/').parse::<u8>().ok());
            let gateway = get(IP_GATEWAY).map(|g| g.parse::<IpAddr>());
            match (address, prefix, gateway) {
                (None, _, _) => {
                    bad(IP_ADDRESS, "static addressing needs a valid IPv4 or IPv6 address; falling back to DHCP".into());
                    Network::Dhcp
                }
                (Some(a), Some(p), g) if p >= 1 && p <= if a.is_ipv4() { 32 } else { 128 } => {
                    match g {
                        Some(Err(_)) => {
                            bad(
                                IP_GATEWAY,
                                "not a valid IP address; falling back to DHCP".into(),
                            );
                            Network::Dhcp
                        }
                        Some(Ok(g)) if g.is_ipv4() != a.is_ipv4() => {
                            bad(IP_GATEWAY, "the gateway and the address are of different IP versions; falling back to DHCP".into());
                            Network::Dhcp
                        }
                        g => Network::Static {
                            address: a,
                            prefix: p,
                            gateway: g.and_then(Result::ok),
                        },
                    }
                }
                (Some(a), _, _) => {
                    bad(
                        IP_PREFIX,
                        format!(
                            "static addressing needs a prefix length from 1 to {}; falling back to DHCP",
                            if a.is_ipv4() { 32 } else { 128 }
                        ),
                    );
                    Network::Dhcp
                }
            }
        }
        _ => {
            bad(
                IP_MODE,
                "must be dhcp or static; falling back to DHCP".into(),
            );
            Network::Dhcp
        }
    };
    let mut dns = Vec::new();
    for d in get(DNS).map(|v| list(&v)).unwrap_or_default() {
        match d.parse::<IpAddr>() {
            Ok(a) => dns.push(a),
            Err(_) => bad(DNS, format!("{d:?} is not an IP address")),
        }
    }
    let mut ntp = Vec::new();
    for n in get(NTP).map(|v| list(&v)).unwrap_or_default() {
        if n.parse::<IpAddr>().is_ok() || valid_hostname(&n) {
            ntp.push(n);
        } else {
            bad(NTP, format!("{n:?} is not a host name or IP address"));
        }
    }
    let proxy_url = get(PROXY_URL).and_then(|u| match check_proxy_url(&u) {
        Ok(u) => Some(u),
        Err(e) => {
            bad(PROXY_URL, e);
            None
        }
    });
    let proxy_ca = get(PROXY_CA).and_then(|c| match normalise_pem_cert(&c) {
        Ok(p) => Some(p),
        Err(e) => {
            bad(PROXY_CA, e);
            None
        }
    });
    let ssh_key = get(SSH_KEY).and_then(|k| match check_ssh_key(&k) {
        Ok(k) => Some(k),
        Err(e) => {
            bad(SSH_KEY, e);
            None
        }
    });
    Checked {
        settings: Settings {
            token,
            hostname,
            network,
            dns,
            ntp,
            proxy_url,
            proxy_ca,
            ssh_key,
        },
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment as vSphere writes it (namespaces, PlatformSection, vmw adapters).
    const VSPHERE_ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment
     xmlns="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
     xmlns:oe="http://schemas.dmtf.org/ovf/environment/1"
     xmlns:ve="http://www.vmware.com/schema/ovfenv"
     oe:id=""
     ve:vCenterId="vm-1042">
   <PlatformSection>
      <Kind>VMware ESXi</Kind>
      <Version>8.0.2</Version>
      <Vendor>VMware, Inc.</Vendor>
      <Locale>en</Locale>
   </PlatformSection>
   <PropertySection>
         <Property oe:key="pcg.hostname" oe:value="gw-lab-1"/>
         <Property oe:key="pcg.ip_mode" oe:value="static"/>
         <Property oe:key="pcg.ip_address" oe:value="192.0.2.10"/>
         <Property oe:key="pcg.ip_prefix" oe:value="24"/>
         <Property oe:key="pcg.ip_gateway" oe:value="192.0.2.1"/>
         <Property oe:key="pcg.dns_servers" oe:value="192.0.2.53, 2001:db8::53"/>
         <Property oe:key="pcg.proxy_url" oe:value="http://u:p&amp;w@proxy.example:3128"/>
   </PropertySection>
   <ve:EthernetAdapterSection>
      <ve:Adapter ve:mac="00:50:56:8a:11:22" ve:network="VM Network" ve:unitNumber="7"/>
   </ve:EthernetAdapterSection>
</Environment>"#;

    #[test]
    fn the_ovf_descriptor_declares_exactly_these_keys() {
        let ovf = include_str!("../ovf/pcg-gateway.ovf.in");
        let declared: Vec<&str> = ovf
            .split("ovf:key=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .collect();
        assert_eq!(declared, KEYS);
    }

    #[test]
    fn reads_a_vsphere_environment() {
        let p = parse_ovf_env(VSPHERE_ENV, "ovf-env.xml").expect("parses");
        assert_eq!(p.get(HOSTNAME).map(String::as_str), Some("gw-lab-1"));
        assert_eq!(
            p.get(PROXY_URL).map(String::as_str),
            Some("http://u:p&w@proxy.example:3128")
        );
        let c = check(&p, 0);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(
            c.settings.network,
            Network::Static {
                address: "192.0.2.10".parse().expect("ip"),
                prefix: 24,
                gateway: Some("192.0.2.1".parse().expect("ip")),
            }
        );
        assert_eq!(c.settings.dns.len(), 2);
    }

    #[test]
    fn unprefixed_attributes_and_non_env_documents() {
        let p = parse_ovf_env(
            r#"<Environment><PropertySection><Property key="pcg.ip_mode" value="dhcp"/></PropertySection></Environment>"#,
            "x",
        )
        .expect("parses");
        assert_eq!(p.get(IP_MODE).map(String::as_str), Some("dhcp"));
        assert!(matches!(
            parse_ovf_env("<Envelope/>", "x"),
            Err(SourceError::NotOvfEnv { .. })
        ));
        assert!(matches!(
            parse_ovf_env("<Environment><Property", "x"),
            Err(SourceError::Xml { .. })
        ));
    }

    #[test]
    fn each_bad_property_is_named_and_falls_back() {
        let mut p = Props::new();
        p.insert(TOKEN.into(), "pcg1_not-a-token".into());
        p.insert(IP_MODE.into(), "static".into());
        p.insert(IP_ADDRESS.into(), "192.0.2.300".into());
        p.insert(HOSTNAME.into(), "-bad-".into());
        p.insert(DNS.into(), "192.0.2.53 nonsense".into());
        p.insert(PROXY_URL.into(), "proxy.example:3128".into());
        p.insert(SSH_KEY.into(), "ssh-ed25519 AAAA".into());
        let c = check(&p, 0);
        let keys: Vec<&str> = c.problems.iter().map(|p| p.key).collect();
        assert_eq!(keys, [TOKEN, HOSTNAME, IP_ADDRESS, DNS, PROXY_URL, SSH_KEY]);
        assert_eq!(c.settings.network, Network::Dhcp);
        assert_eq!(
            c.settings.dns,
            vec!["192.0.2.53".parse::<IpAddr>().expect("ip")]
        );
        assert!(c.settings.token.is_none() && c.settings.proxy_url.is_none());
        // The token's value is never echoed back.
        assert!(!c.problems[0].to_string().contains("not-a-token"));
    }

    #[test]
    fn static_needs_a_prefix_in_range_and_a_matching_gateway() {
        let mut p = Props::new();
        p.insert(IP_MODE.into(), "static".into());
        p.insert(IP_ADDRESS.into(), "192.0.2.10".into());
        p.insert(IP_PREFIX.into(), "33".into());
        assert_eq!(check(&p, 0).problems[0].key, IP_PREFIX);
        p.insert(IP_PREFIX.into(), "/24".into());
        p.insert(IP_GATEWAY.into(), "2001:db8::1".into());
        assert_eq!(check(&p, 0).problems[0].key, IP_GATEWAY);
        p.insert(IP_ADDRESS.into(), "2001:db8::10".into());
        p.insert(IP_PREFIX.into(), "64".into());
        assert!(check(&p, 0).problems.is_empty());
    }

    #[test]
    fn expired_token_is_refused_before_any_network() {
        let t = pcg_proto::pairing::PairingToken {
            api_url: "https://10.0.2.2:8443".into(),
            token_id: "tok_1".into(),
            secret: "0123456789abcdef0123".into(),
            expires_unix: 1_000,
            ca_sha256: "ab".repeat(32),
        }
        .encode();
        let mut p = Props::new();
        p.insert(TOKEN.into(), t.clone());
        assert!(check(&p, 999).problems.is_empty());
        let c = check(&p, 2_000);
        assert!(
            c.problems[0].message.contains("expired"),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn ssh_keys_are_checked() {
        // ssh-ed25519 with a 32-byte key.
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7u8; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
        let good = format!("ssh-ed25519 {b64} ops@example");
        assert_eq!(check_ssh_key(&good), Ok(good.clone()));
        assert!(check_ssh_key(&format!("ssh-rsa {b64}")).is_err());
        assert!(check_ssh_key("hello").is_err());
    }

    #[test]
    fn proxy_ca_is_accepted_flattened_or_in_base64() {
        let body = base64::engine::general_purpose::STANDARD.encode([0x30u8; 100]);
        let pem = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
        let flat = pem.replace('\n', " ");
        let norm = normalise_pem_cert(&flat).expect("flattened PEM");
        assert!(
            norm.starts_with("-----BEGIN CERTIFICATE-----\n")
                && norm.ends_with("-----END CERTIFICATE-----\n")
        );
        assert!(norm
            .lines()
            .all(|l| l.len() <= 64 || l.starts_with("-----")));
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
        assert_eq!(normalise_pem_cert(&b64), Ok(norm));
        assert!(normalise_pem_cert("not a cert").is_err());
    }

    #[test]
    fn proxy_urls() {
        assert!(check_proxy_url("http://proxy.example:3128").is_ok());
        assert!(check_proxy_url("http://user:pa:ss@10.1.1.1:8080/").is_ok());
        assert!(check_proxy_url("http://[2001:db8::1]:3128").is_ok());
        assert!(check_proxy_url("socks5://p:1080").is_err());
        assert!(check_proxy_url("http://proxy.example").is_err());
        assert!(check_proxy_url("http://proxy.example:0").is_err());
    }

    #[test]
    fn cloud_config_mapping_and_cloud_init_keys() {
        let p = parse_cloud_config(
            "#cloud-config\nhostname: gw-kvm\nssh_authorized_keys:\n  - ssh-ed25519 AAAA a@b\npcg:\n  pairing_token: pcg1_x\n  dns_servers: [192.0.2.53, 192.0.2.54]\n  pcg.ip_mode: dhcp\n",
            "user-data",
        )
        .expect("parses");
        assert_eq!(p.get(TOKEN).map(String::as_str), Some("pcg1_x"));
        assert_eq!(
            p.get(DNS).map(String::as_str),
            Some("192.0.2.53,192.0.2.54")
        );
        assert_eq!(p.get(IP_MODE).map(String::as_str), Some("dhcp"));
        assert_eq!(p.get(HOSTNAME).map(String::as_str), Some("gw-kvm"));
        assert_eq!(
            p.get(SSH_KEY).map(String::as_str),
            Some("ssh-ed25519 AAAA a@b")
        );
    }
}
