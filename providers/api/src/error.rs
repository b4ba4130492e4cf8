//! The one error taxonomy every provider maps its failures into.
//!
//! Each variant names the endpoint (and user, where credentials are involved) and says what an
//! operator can do next. The [`ErrorKind`] of an error is stable and serialisable, so the gateway
//! can report it to the SaaS without parsing messages.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A failure of a provider operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The endpoint could not be reached at all (connection refused, no route, TLS failure).
    #[error("cannot reach {endpoint}: {reason}; check the address, port, routing/firewall from the gateway and, for HTTPS, the trusted CA or pinned certificate")]
    Unreachable { endpoint: String, reason: String },

    /// The endpoint answered, but its TLS certificate is not trusted by the configured trust
    /// (CA bundle or pin): a configuration matter, not a network one.
    #[error("{endpoint}: TLS certificate not trusted: {detail}; give the CA that signed it (or the server's own self-signed certificate) as tls.ca_pem, or pin it with tls.pin_sha256")]
    TlsTrust { endpoint: String, detail: String },

    /// The endpoint did not answer within the configured bound.
    #[error("{endpoint} did not answer {operation} within {after:?}; check that the BMC is up and reachable over the network, or raise the timeout")]
    Timeout {
        endpoint: String,
        operation: String,
        after: Duration,
    },

    /// The endpoint rejected the credentials, or the user lacks the privilege needed.
    #[error("{endpoint} rejected user {user:?}: {detail}; check the user name, the password and the user's privilege on the BMC")]
    Auth {
        endpoint: String,
        user: String,
        detail: String,
    },

    /// The addressed object (system, manager, media slot, task) does not exist.
    #[error("{endpoint}: {what} not found; list the systems the BMC reports (enrol again) and check the id")]
    NotFound { endpoint: String, what: String },

    /// The request conflicts with the current state (e.g. an ETag mismatch, a task already running).
    #[error("{endpoint}: conflict: {detail}; read the current state and retry")]
    Conflict { endpoint: String, detail: String },

    /// A limit of the endpoint was reached (other than session slots).
    #[error("{endpoint}: quota exceeded: {detail}")]
    Quota { endpoint: String, detail: String },

    /// The request itself is invalid; nothing was sent or changed.
    #[error("invalid spec: {field}: {detail}")]
    InvalidSpec { field: String, detail: String },

    /// The operation is not offered by this endpoint (e.g. virtual media over IPMI).
    #[error("{endpoint} does not support {what}")]
    Unsupported { endpoint: String, what: String },

    /// The BMC has no free session slot (or says it is busy); something else holds its sessions.
    #[error("{endpoint} has no free session slot for user {user:?} ({detail}); close other sessions (e.g. `ipmitool session info all`), wait for idle sessions to expire, or reset the BMC")]
    NoSessionSlots {
        endpoint: String,
        user: String,
        detail: String,
    },

    /// The endpoint reported a failure of its own; `message` is its own text.
    #[error("{endpoint} failed: {message}")]
    ProviderFault { endpoint: String, message: String },
}

/// The stable, serialisable kind of a [`ProviderError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Unreachable,
    TlsTrust,
    Timeout,
    Auth,
    NotFound,
    Conflict,
    Quota,
    InvalidSpec,
    Unsupported,
    NoSessionSlots,
    ProviderFault,
}

impl ProviderError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unreachable { .. } => ErrorKind::Unreachable,
            Self::TlsTrust { .. } => ErrorKind::TlsTrust,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Auth { .. } => ErrorKind::Auth,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Conflict { .. } => ErrorKind::Conflict,
            Self::Quota { .. } => ErrorKind::Quota,
            Self::InvalidSpec { .. } => ErrorKind::InvalidSpec,
            Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::NoSessionSlots { .. } => ErrorKind::NoSessionSlots,
            Self::ProviderFault { .. } => ErrorKind::ProviderFault,
        }
    }

    /// Whether retrying the same operation later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Unreachable
                | ErrorKind::Timeout
                | ErrorKind::NoSessionSlots
                | ErrorKind::Conflict
        )
    }

    /// Shorthand for [`ProviderError::InvalidSpec`].
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidSpec {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Result of a provider operation.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_endpoint_and_user() {
        let e = ProviderError::Auth {
            endpoint: "https://10.0.0.5".into(),
            user: "admin".into(),
            detail: "HTTP 401".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("https://10.0.0.5") && s.contains("\"admin\""),
            "{s}"
        );
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(!e.is_transient());
        assert_eq!(
            serde_json::to_string(&ErrorKind::NoSessionSlots)
                .ok()
                .as_deref(),
            Some("\"no_session_slots\"")
        );
    }
}
