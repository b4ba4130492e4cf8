//! Secrets in command payloads are sealed before the payload is journaled, and opened only for
//! the handler that executes it, so no password (an inline vCenter endpoint, a clouds.yaml entry,
//! an enrolment) reaches the gateway's store in clear. A sled store keeps old versions of a
//! record on disk for a while, so sealing later would not be enough: the payload is sealed before
//! its first write.
//!
//! A secret is the string value of an object key named like one (`password`, `secret`, `token`,
//! `private_key`, `api_key`, or ending in `_<one of them>`, case-insensitive, at any depth: the
//! rule the SaaS redacts by). It is replaced by `pcg-sealed:` + the value sealed with the
//! gateway's secret key (AES-256-GCM, as the private key).

use serde_json::Value;

use crate::store::{Store, StoreError};

const SEALED: &str = "pcg-sealed:";

/// Whether an object key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "private_key", "api_key"]
        .iter()
        .any(|s| k == *s || k.ends_with(&format!("_{s}")))
}

/// Seals every secret of `v` in place.
pub fn seal(store: &Store, v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                match val {
                    Value::String(s) if is_secret_key(k) && !s.starts_with(SEALED) => {
                        *s = format!("{SEALED}{}", store.seal(s.as_bytes()));
                    }
                    other => seal(store, other),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| seal(store, x)),
        _ => {}
    }
}

/// Opens every sealed secret of `v` in place.
pub fn open(store: &Store, v: &mut Value) -> Result<(), StoreError> {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                match val {
                    Value::String(s) if is_secret_key(k) => {
                        if let Some(sealed) = s.strip_prefix(SEALED) {
                            let plain = store.unseal(sealed)?;
                            *s = String::from_utf8(plain).map_err(|_| StoreError::Corrupt {
                                what: format!("sealed payload secret {k}"),
                                message: "not UTF-8".into(),
                            })?;
                        }
                    }
                    other => open(store, other)?,
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                open(store, x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_sealed_at_any_depth_and_open_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let plain = json!({
            "endpoint": {"url": "https://vc", "user": "u", "password": "hunter2"},
            "cloud": {"auth": {"application_credential_secret": "s3cr3t", "username": "x"}},
            "list": [{"api_key": "k1"}],
            "count": 3,
        });
        let mut v = plain.clone();
        seal(&store, &mut v);
        let text = v.to_string();
        for secret in ["hunter2", "s3cr3t", "k1"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(v["endpoint"]["user"], "u");
        // Sealing twice does not seal twice.
        let once = v.clone();
        seal(&store, &mut v);
        assert_eq!(v, once);
        open(&store, &mut v).unwrap();
        assert_eq!(v, plain);
    }
}
