//! vSphere faults: parsed from SOAP faults and from task errors into a typed [`Fault`], and
//! mapped into the provider error taxonomy.

use pcg_provider::ProviderError;

use crate::xml::Node;

/// The faults pcg tells apart; everything else is [`FaultKind::Other`] with its type name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    InvalidLogin,
    NotAuthenticated,
    NoPermission,
    ManagedObjectNotFound,
    DuplicateName,
    InvalidArgument,
    InvalidPowerState,
    InvalidState,
    TaskInProgress,
    InsufficientResources,
    Other(String),
}

/// A fault: its type (`xsi:type` of the detail, e.g. `InvalidLogin`) and the server's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub type_name: String,
    /// `faultstring` (SOAP) or `localizedMessage` (task errors).
    pub message: String,
}

impl Fault {
    /// From a SOAP `<Fault>` element: `faultstring`, and the type of the first element of
    /// `detail` (its `xsi:type`, else its name without the `Fault` suffix).
    pub fn from_soap(fault: &Node) -> Self {
        let message = fault
            .child_text("faultstring")
            .unwrap_or("")
            .trim()
            .to_owned();
        let type_name = fault
            .child("detail")
            .and_then(|d| d.children.first())
            .map(|d| match &d.xsi_type {
                Some(t) => t.clone(),
                None => d.name.strip_suffix("Fault").unwrap_or(&d.name).to_owned(),
            })
            .unwrap_or_else(|| {
                fault
                    .child_text("faultcode")
                    .unwrap_or("ServerFaultCode")
                    .to_owned()
            });
        Self { type_name, message }
    }

    /// From a `LocalizedMethodFault` (a task's `info.error`).
    pub fn from_localized(error: &Node) -> Self {
        let type_name = error
            .child("fault")
            .and_then(|f| f.xsi_type.clone())
            .unwrap_or_else(|| "SystemError".into());
        let message = error
            .child_text("localizedMessage")
            .unwrap_or("")
            .trim()
            .to_owned();
        Self { type_name, message }
    }

    pub fn kind(&self) -> FaultKind {
        match self.type_name.as_str() {
            "InvalidLogin" => FaultKind::InvalidLogin,
            "NotAuthenticated" => FaultKind::NotAuthenticated,
            "NoPermission" => FaultKind::NoPermission,
            "ManagedObjectNotFound" => FaultKind::ManagedObjectNotFound,
            "DuplicateName" => FaultKind::DuplicateName,
            "InvalidArgument" | "InvalidRequest" | "InvalidProperty" | "InvalidType" => {
                FaultKind::InvalidArgument
            }
            "InvalidPowerState" => FaultKind::InvalidPowerState,
            "InvalidState" | "InvalidDatastoreState" | "InvalidHostState" => {
                FaultKind::InvalidState
            }
            "TaskInProgress" => FaultKind::TaskInProgress,
            "InsufficientResourcesFault"
            | "InsufficientMemoryResourcesFault"
            | "InsufficientCpuResourcesFault"
            | "NoDiskSpace"
            | "OutOfBounds" => FaultKind::InsufficientResources,
            other => FaultKind::Other(other.to_owned()),
        }
    }

    pub fn is(&self, type_name: &str) -> bool {
        self.type_name == type_name
    }

    fn describe(&self, op: &str) -> String {
        if self.message.is_empty() {
            format!("{op}: {}", self.type_name)
        } else {
            format!("{op}: {} ({})", self.message, self.type_name)
        }
    }

    /// Maps into the provider taxonomy; auth errors name the endpoint and the user.
    pub fn into_error(self, endpoint: &str, user: &str, op: &str) -> ProviderError {
        let endpoint = endpoint.to_owned();
        match self.kind() {
            FaultKind::InvalidLogin | FaultKind::NotAuthenticated | FaultKind::NoPermission => {
                ProviderError::Auth {
                    component: pcg_provider::Component::Vcenter,
                    endpoint,
                    user: user.to_owned(),
                    detail: self.describe(op),
                }
            }
            FaultKind::ManagedObjectNotFound => ProviderError::NotFound {
                component: pcg_provider::Component::Vcenter,
                endpoint,
                what: self.describe(op),
            },
            FaultKind::DuplicateName
            | FaultKind::InvalidPowerState
            | FaultKind::InvalidState
            | FaultKind::TaskInProgress => ProviderError::Conflict {
                endpoint,
                detail: self.describe(op),
            },
            FaultKind::InvalidArgument => ProviderError::InvalidSpec {
                field: op.to_owned(),
                detail: format!("{endpoint}: {}", self.describe(op)),
            },
            FaultKind::InsufficientResources => ProviderError::Quota {
                endpoint,
                detail: self.describe(op),
            },
            FaultKind::Other(_) => ProviderError::ProviderFault {
                endpoint,
                message: self.describe(op),
            },
        }
    }
}
