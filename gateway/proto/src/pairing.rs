//! Pairing token format and the pairing request/response bodies (`POST /v1/pair`).
//!
//! A token is `pcg1_` followed by unpadded base64url of a small JSON document:
//! `{"u": api_url, "i": token_id, "s": secret, "e": expires_unix, "c": ca_sha256_hex}`.
//! It carries everything a fresh appliance needs: where the SaaS is, a one-time secret, when the
//! token stops working, and the SHA-256 of the SaaS CA certificate (DER) so the appliance pins
//! the CA on first contact instead of trusting whatever answers.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Prefix of every version-1 pairing token.
pub const TOKEN_PREFIX: &str = "pcg1_";

/// The decoded contents of a pairing token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingToken {
    /// HTTPS base URL of the SaaS REST API, e.g. `https://pcg.example.com:8443`.
    #[serde(rename = "u")]
    pub api_url: String,
    /// Token id, as listed by the REST API (`tok_...`).
    #[serde(rename = "i")]
    pub token_id: String,
    /// One-time secret; the SaaS stores only its hash.
    #[serde(rename = "s")]
    pub secret: String,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub expires_unix: i64,
    /// Lower-case hex SHA-256 of the SaaS CA certificate (DER).
    #[serde(rename = "c")]
    pub ca_sha256: String,
}

impl std::fmt::Debug for PairingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingToken")
            .field("api_url", &self.api_url)
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("expires_unix", &self.expires_unix)
            .field("ca_sha256", &self.ca_sha256)
            .finish()
    }
}

/// Why a string is not a pairing token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed pairing token: it must start with `{TOKEN_PREFIX}`; copy the whole token the SaaS gave you")]
    Prefix,
    #[error("malformed pairing token: the part after `{TOKEN_PREFIX}` is not base64url ({0}); the token was probably cut when copied")]
    Base64(String),
    #[error("malformed pairing token: its contents are not valid ({0}); ask your tenant admin for a new token")]
    Json(String),
    #[error("malformed pairing token: {0}; ask your tenant admin for a new token")]
    Field(&'static str),
}

impl PairingToken {
    /// Encodes the token as the string given to an operator.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a struct of strings and integers serialises");
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Decodes and checks the shape of a token string (surrounding whitespace is ignored).
    pub fn decode(s: &str) -> Result<Self, TokenError> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Prefix)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Base64(e.to_string()))?;
        let t: PairingToken =
            serde_json::from_slice(&json).map_err(|e| TokenError::Json(e.to_string()))?;
        if !(t.api_url.starts_with("https://")) {
            return Err(TokenError::Field("its SaaS URL is not https://"));
        }
        if t.token_id.is_empty() || t.secret.len() < 16 {
            return Err(TokenError::Field("its id or secret is missing"));
        }
        if t.ca_sha256.len() != 64 || !t.ca_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Field(
                "its CA fingerprint is not a SHA-256 in hex",
            ));
        }
        Ok(t)
    }
}

/// Body of `POST /v1/pair`.
#[derive(Clone, Serialize, Deserialize)]
pub struct PairRequest {
    pub token_id: String,
    pub secret: String,
    /// PEM certificate signing request made with the gateway's own key.
    pub csr_pem: String,
    /// Host name of the appliance, for display.
    pub hostname: String,
    pub gateway_version: String,
}

impl std::fmt::Debug for PairRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairRequest")
            .field("token_id", &self.token_id)
            .field("secret", &"<redacted>")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// Answer to a successful `POST /v1/pair`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairResponse {
    pub tenant_id: String,
    pub gateway_id: String,
    /// The gateway's client certificate (PEM), signed by the SaaS CA.
    pub certificate_pem: String,
    /// The SaaS CA certificate (PEM).
    pub ca_pem: String,
    /// Broker endpoints (`https://host:port`), in order of preference.
    pub broker_endpoints: Vec<String>,
}

/// The identity a gateway certificate carries, as a URI subject alternative name.
pub fn identity_uri(tenant_id: &str, gateway_id: &str) -> String {
    format!("pcg://tenant/{tenant_id}/gateway/{gateway_id}")
}

/// Parses a URI made by [`identity_uri`] back into `(tenant_id, gateway_id)`.
pub fn parse_identity_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("pcg://tenant/")?;
    let (tenant, rest) = rest.split_once("/gateway/")?;
    if tenant.is_empty() || rest.is_empty() || rest.contains('/') {
        return None;
    }
    Some((tenant.to_string(), rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PairingToken {
        PairingToken {
            api_url: "https://127.0.0.1:8443".into(),
            token_id: "tok_1".into(),
            secret: "s".repeat(32),
            expires_unix: 1_900_000_000,
            ca_sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(PairingToken::decode(&format!("  {}\n", t.encode())), Ok(t));
    }

    #[test]
    fn malformed_tokens_say_why() {
        assert_eq!(PairingToken::decode("hello"), Err(TokenError::Prefix));
        assert!(matches!(
            PairingToken::decode("pcg1_!!!"),
            Err(TokenError::Base64(_))
        ));
        assert!(matches!(
            PairingToken::decode("pcg1_e30"),
            Err(TokenError::Json(_))
        ));
        let mut t = sample();
        t.ca_sha256 = "xyz".into();
        assert!(matches!(
            PairingToken::decode(&t.encode()),
            Err(TokenError::Field(_))
        ));
        let enc = sample().encode();
        assert!(PairingToken::decode(&enc[..enc.len() - 5]).is_err());
    }

    #[test]
    fn secret_is_not_in_debug() {
        assert!(!format!("{:?}", sample()).contains(&"s".repeat(32)));
    }

    #[test]
    fn identity_uri_round_trip() {
        let u = identity_uri("t_1", "g_2");
        assert_eq!(parse_identity_uri(&u), Some(("t_1".into(), "g_2".into())));
        assert_eq!(parse_identity_uri("pcg://tenant//gateway/x"), None);
        assert_eq!(parse_identity_uri("pcg://tenant/a/gateway/b/c"), None);
    }
}
