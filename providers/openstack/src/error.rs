//! osauth errors mapped into the provider taxonomy, naming the Keystone URL and user (for
//! credentials) and the operation, never a bare status code.

use osauth::ErrorKind as K;
use pcg_provider::ProviderError;

use crate::config::CloudEntry;

/// What was being done, for messages.
pub(crate) struct NovaContext {
    auth_url: String,
    user: String,
    what: String,
    login: bool,
    /// The bound requests run under (what a timeout reports).
    bound: std::time::Duration,
}

impl NovaContext {
    pub(crate) fn keystone(c: &CloudEntry, bound: std::time::Duration) -> Self {
        Self {
            auth_url: c.auth_url().to_string(),
            user: c.user(),
            what: "Keystone authentication".into(),
            login: true,
            bound,
        }
    }
    pub(crate) fn service(
        c: &CloudEntry,
        what: impl Into<String>,
        bound: std::time::Duration,
    ) -> Self {
        Self {
            auth_url: c.auth_url().to_string(),
            user: c.user(),
            what: what.into(),
            login: false,
            bound,
        }
    }
}

/// Maps one osauth error.
pub(crate) fn map_err(ctx: &NovaContext, e: osauth::Error) -> ProviderError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let endpoint = ctx.auth_url.clone();
    let detail = format!("{}: {text}", ctx.what);
    match e.kind() {
        K::AuthenticationFailed => ProviderError::Auth {
            component: pcg_provider::Component::OpenStack,
            endpoint,
            user: ctx.user.clone(),
            detail: format!("{detail} (Keystone refused the credentials)"),
        },
        K::AccessDenied if lower.contains("quota") || lower.contains("exceed") => {
            ProviderError::Quota { endpoint, detail }
        }
        K::AccessDenied => ProviderError::Auth {
            component: pcg_provider::Component::OpenStack,
            endpoint,
            user: ctx.user.clone(),
            detail: format!("{detail} (forbidden: the user's role does not allow this)"),
        },
        _ if lower.contains("quota exceeded") || lower.contains("exceeds quota") => {
            ProviderError::Quota { endpoint, detail }
        }
        K::ResourceNotFound => ProviderError::NotFound {
            component: pcg_provider::Component::OpenStack,
            endpoint,
            what: detail,
        },
        K::Conflict => ProviderError::Conflict { endpoint, detail },
        K::EndpointNotFound => ProviderError::ProviderFault {
            endpoint,
            message: format!("{detail}; the service catalog has no such endpoint for the chosen region and interface"),
        },
        K::InvalidConfig => ProviderError::invalid("cloud", detail),
        K::InvalidInput | K::IncompatibleApiVersion => ProviderError::invalid("request", detail),
        K::OperationTimedOut => ProviderError::Timeout {
            component: pcg_provider::Component::OpenStack,
            endpoint,
            operation: ctx.what.clone(),
            after: ctx.bound,
        },
        K::ProtocolError if ctx.login || is_connect(&lower) => ProviderError::Unreachable {
            component: pcg_provider::Component::OpenStack,
            endpoint,
            reason: detail,
        },
        _ => ProviderError::ProviderFault {
            endpoint,
            message: detail,
        },
    }
}

fn is_connect(s: &str) -> bool {
    s.contains("connect") || s.contains("dns") || s.contains("tls") || s.contains("certificate")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pcg_provider::ErrorKind;

    fn ctx() -> NovaContext {
        NovaContext {
            auth_url: "http://127.0.0.1:5000/v3".into(),
            user: "alice".into(),
            what: "create server".into(),
            login: false,
            bound: std::time::Duration::from_secs(30),
        }
    }

    #[test]
    fn statuses_map_into_the_taxonomy() {
        let e = map_err(
            &ctx(),
            osauth::Error::new(
                K::AuthenticationFailed,
                "The request you have made requires authentication.",
            ),
        );
        assert_eq!(e.kind(), ErrorKind::Auth);
        let s = e.to_string();
        assert!(
            s.contains("http://127.0.0.1:5000/v3") && s.contains("alice"),
            "{s}"
        );
        let q = map_err(
            &ctx(),
            osauth::Error::new(
                K::AccessDenied,
                "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances",
            ),
        );
        assert_eq!(q.kind(), ErrorKind::Quota);
        let c = map_err(
            &ctx(),
            osauth::Error::new(
                K::Conflict,
                "Cannot 'stop' instance while it is in task_state powering-off",
            ),
        );
        assert_eq!(c.kind(), ErrorKind::Conflict);
        let n = map_err(
            &ctx(),
            osauth::Error::new(K::ResourceNotFound, "Instance x could not be found."),
        );
        assert_eq!(n.kind(), ErrorKind::NotFound);
    }
}
