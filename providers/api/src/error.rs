//! The one error taxonomy every provider maps its failures into.
//!
//! Each variant names the endpoint (and user, where credentials are involved) and says what an
//! operator can do next. The [`ErrorKind`] of an error is stable and serialisable, so the gateway
//! can report it to the SaaS without parsing messages.
//!
//! Hints are the provider's own: the variants whose advice depends on what is on the other end
//! (unreachable, timeout, auth, not found) carry the [`Component`] the driver talks to, and the
//! message names that component and takes its hint from [`Component`] alone, so a vCenter or
//! Keystone error can never advise looking at a BMC (and the reverse).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a driver talks to: named in messages, and the source of their hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// A baseboard management controller (IPMI or Redfish).
    Bmc,
    /// A vCenter (vSphere Web Services).
    Vcenter,
    /// An OpenStack cloud: Keystone and the services of its catalog (Nova, Glance, Neutron).
    OpenStack,
}

impl Component {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bmc => "BMC",
            Self::Vcenter => "vCenter",
            Self::OpenStack => "OpenStack",
        }
    }

    /// What to check when the endpoint cannot be reached.
    pub fn unreachable_hint(self) -> &'static str {
        match self {
            Self::Bmc => "check the address, port, routing/firewall from the gateway and, for HTTPS, the trusted CA or pinned certificate",
            Self::Vcenter => "check the vCenter URL (its SDK is https://HOST/sdk), routing/firewall from the gateway to it, and the TLS trust: pin_sha256 must be the SHA-256 thumbprint of the vCenter certificate, or ca_pem the CA that signed it",
            Self::OpenStack => "check the auth URL (Keystone's /v3 endpoint) and the service endpoints Keystone's catalog lists, routing/firewall from the gateway to them, and for HTTPS the CA given as cacert",
        }
    }

    /// What to check when the endpoint did not answer in time.
    pub fn timeout_hint(self) -> &'static str {
        match self {
            Self::Bmc => "check that the BMC is up and reachable over the network, or raise the timeout",
            Self::Vcenter => "check that vCenter is up and its SDK URL answers from the gateway, or raise the endpoint's timeout_ms",
            Self::OpenStack => "check that Keystone and the service endpoints of its catalog answer from the gateway, or raise timeout_ms in the cloud entry",
        }
    }

    /// What to check when the credentials or the privileges were refused.
    pub fn auth_hint(self) -> &'static str {
        match self {
            Self::Bmc => "check the user name, the password and the user's privilege on the BMC",
            Self::Vcenter => "check the user name (with its SSO domain, e.g. user@vsphere.local), the password, and the role the user holds in vCenter: it needs the privileges of the operation (Virtual machine > Provisioning, Configuration, Interaction, Inventory) on the objects involved",
            Self::OpenStack => "check the user name and password (or the application credential's id and secret, and that it has not expired), the project and its domain, the user's domain and the auth URL; Keystone must grant the user a role on that project",
        }
    }

    /// What to check when the addressed object does not exist.
    pub fn not_found_hint(self) -> &'static str {
        match self {
            Self::Bmc => "list the systems the BMC reports (enrol again) and check the id",
            Self::Vcenter => "check the id (a managed object reference such as vm-42) against what this vCenter holds (vsphere.inventory lists it)",
            Self::OpenStack => "check the id and that it belongs to the project these credentials are scoped to (openstack.inventory lists the project's servers)",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A failure of a provider operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The endpoint could not be reached at all (connection refused, no route, TLS failure).
    #[error("cannot reach {component} {endpoint}: {reason}; {}", component.unreachable_hint())]
    Unreachable {
        component: Component,
        endpoint: String,
        reason: String,
    },

    /// The endpoint answered, but its TLS certificate is not trusted by the configured trust
    /// (CA bundle or pin): a configuration matter, not a network one.
    #[error("{endpoint}: TLS certificate not trusted: {detail}; give the CA that signed it (or the server's own self-signed certificate) as tls.ca_pem, or pin it with tls.pin_sha256")]
    TlsTrust { endpoint: String, detail: String },

    /// The endpoint did not answer within the configured bound.
    #[error("{component} {endpoint} did not answer {operation} within {after:?}; {}", component.timeout_hint())]
    Timeout {
        component: Component,
        endpoint: String,
        operation: String,
        after: Duration,
    },

    /// The endpoint rejected the credentials, or the user lacks the privilege needed.
    #[error("{component} {endpoint} rejected user {user:?}: {detail}; {}", component.auth_hint())]
    Auth {
        component: Component,
        endpoint: String,
        user: String,
        detail: String,
    },

    /// The addressed object (system, manager, media slot, task) does not exist.
    #[error("{component} {endpoint}: {what} not found; {}", component.not_found_hint())]
    NotFound {
        component: Component,
        endpoint: String,
        what: String,
    },

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
    /// Bare metal only (IPMI session slots).
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
            component: Component::Bmc,
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

    /// Every component-specific message names its component and carries only its own hint.
    #[test]
    fn hints_are_the_component_s_own() {
        let all = [Component::Bmc, Component::Vcenter, Component::OpenStack];
        for c in all {
            let errors = [
                ProviderError::Unreachable {
                    component: c,
                    endpoint: "ep".into(),
                    reason: "connection refused".into(),
                },
                ProviderError::Timeout {
                    component: c,
                    endpoint: "ep".into(),
                    operation: "Login".into(),
                    after: Duration::from_secs(15),
                },
                ProviderError::Auth {
                    component: c,
                    endpoint: "ep".into(),
                    user: "u".into(),
                    detail: "refused".into(),
                },
                ProviderError::NotFound {
                    component: c,
                    endpoint: "ep".into(),
                    what: "vm-1".into(),
                },
            ];
            for e in errors {
                let s = e.to_string();
                assert!(s.contains(c.name()), "{s}");
                for other in all.iter().filter(|o| **o != c) {
                    assert!(!s.contains(other.name()), "{c:?}: {s}");
                }
                if c != Component::Bmc {
                    assert!(!s.contains("BMC"), "{s}");
                }
            }
        }
        assert!(Component::OpenStack.auth_hint().contains("Keystone"));
        assert!(Component::Vcenter.unreachable_hint().contains("thumbprint"));
    }
}
