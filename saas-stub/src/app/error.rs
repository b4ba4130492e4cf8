//! The one error type of the application layer: a kind (which the REST API maps to an HTTP
//! status and the broker to a gRPC code), a stable machine-readable code, and a message that
//! says what failed and what to do.

use crate::store::StoreError;

/// What sort of failure an [`AppError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or violates a limit (400).
    Invalid,
    /// No or unknown credentials (401).
    Unauthenticated,
    /// Known credentials without the right (403).
    Forbidden,
    /// Not found in the caller's tenant (404).
    NotFound,
    /// Conflicts with the current state (409).
    Conflict,
    /// A pairing token past its expiry (410).
    Gone,
    /// A body over the size limit (413).
    TooLarge,
    /// Well-formed but not acceptable (422).
    Unprocessable,
    /// The service is stopping or cannot take the request now (503).
    Unavailable,
    /// A failure of the service itself (500).
    Internal,
}

/// A failed operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AppError {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
}

impl AppError {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        AppError {
            kind,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, "not_found", message)
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        tracing::error!("store error: {e}");
        AppError::new(Kind::Internal, "storage", e.to_string())
    }
}

pub type AppResult<T> = Result<T, AppError>;
