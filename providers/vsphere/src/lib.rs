//! pcg-vsphere: the VM driver for vCenter, on vSphere Web Services (SOAP) written on quick-xml.
//!
//! - [`soap::Client`]: RetrieveServiceContent, Login/Logout, the session cookie, one session per
//!   endpoint shared by every operation (clones of the client share it), transparent re-login on
//!   `NotAuthenticated`, keep-alive of idle sessions, TLS verified against a CA or pinned by
//!   SHA-256 ([`tls`]), typed faults ([`fault`]) and paged property retrieval.
//! - [`VsphereDriver`]: implements [`pcg_provider::vm::VmProvider`]: inventory, clone from a
//!   template with placement, size, portgroup and cloud-init guestinfo, power, destroy, task
//!   waits with progress, guest IP waits. Every VM it creates carries the pcg command id in
//!   extraConfig ([`COMMAND_KEY`]), so a retried create finds its VM instead of making a twin.
//! - [`command`]: the `vsphere.*` command payloads and [`command::VsphereService`] (connected
//!   endpoints by name) for the gateway's executor.
//! - [`xml`]: the namespace-aware reader walk every response goes through.

pub mod command;
mod driver;
pub mod fault;
pub mod soap;
pub mod tls;
pub mod xml;

pub use driver::{vm_info, VsphereDriver, COMMAND_KEY};

use pcg_provider::{Secret, TlsTrust};
use serde::{Deserialize, Serialize};

/// Where a vCenter is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct VsphereEndpoint {
    /// `https://vcenter.example.com` (the `/sdk` path is added when absent).
    #[cfg_attr(feature = "schema", schemars(regex(pattern = "^https?://")))]
    pub url: String,
    pub user: String,
    pub password: Secret,
    /// TLS trust (required for `https://`): a CA, or the SHA-256 of the vCenter certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsTrust>,
    /// Bound on one SOAP request, in milliseconds (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Interval of the keep-alive of an idle session, in milliseconds (default 10 min).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_ms: Option<u64>,
    /// Objects per page of property retrieval (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
}

impl VsphereEndpoint {
    pub fn new(url: impl Into<String>, user: impl Into<String>, password: &str) -> Self {
        Self {
            url: url.into(),
            user: user.into(),
            password: Secret::new(password),
            tls: None,
            timeout_ms: None,
            keepalive_ms: None,
            page_size: None,
        }
    }
}
