//! A thin Redfish HTTP client: TLS trust, session login (X-Auth-Token) with a fallback to basic
//! auth, bounded requests, status-to-error mapping and Task monitor polling.

use std::time::{Duration, Instant};

use pcg_provider::{BmcEndpoint, ProviderError, Result, Secret, TaskState};
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::model::{self, ServiceRoot, Task};
use crate::tls;

/// Default bound on one HTTP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Not logged in yet.
    None,
    /// HTTP basic auth on every request (services without a SessionService).
    Basic,
    /// A Redfish session: the token and the session resource to DELETE at the end.
    Session { token: Secret, location: String },
}

impl Auth {
    pub fn label(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Basic => "basic",
            Auth::Session { .. } => "session",
        }
    }
}

/// A response: status, the headers pcg uses, and the body as JSON (a string when not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub location: Option<String>,
    /// `X-Auth-Token` of a session login reply.
    pub auth_token: Option<Secret>,
    pub body: Value,
}

/// A Redfish client bound to one service.
pub struct Client {
    /// `scheme://host[:port]`, without a trailing slash.
    base: String,
    user: String,
    password: Secret,
    http: reqwest::Client,
    timeout: Duration,
    auth: Mutex<Auth>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds a client; `https://` endpoints need `tls` (a CA or a pin).
    pub fn new(ep: &BmcEndpoint) -> Result<Self> {
        let base = ep.address.trim_end_matches('/').to_owned();
        let timeout = ep.timeout_or(DEFAULT_TIMEOUT);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(4);
        if base.starts_with("https://") {
            let trust = ep.tls.as_ref().ok_or_else(|| {
                ProviderError::invalid(
                    "tls",
                    format!("{base} is HTTPS: give ca_pem or pin_sha256 (verification cannot be switched off)"),
                )
            })?;
            let config = tls::client_config(trust).map_err(|e| ProviderError::invalid("tls", e))?;
            builder = builder.use_preconfigured_tls(config);
        } else if !base.starts_with("http://") {
            return Err(ProviderError::invalid(
                "address",
                format!("{base:?} must start with https:// (or http:// for a lab BMC)"),
            ));
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::invalid("address", format!("{base}: {e}")))?;
        Ok(Self {
            base,
            user: ep.user.clone(),
            password: ep.password.clone(),
            http,
            timeout,
            auth: Mutex::new(Auth::None),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The current authentication mode.
    pub async fn auth_mode(&self) -> &'static str {
        self.auth.lock().await.label()
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    fn transport_error(&self, e: reqwest::Error, what: &str) -> ProviderError {
        if e.is_timeout() {
            return ProviderError::Timeout {
                component: pcg_provider::Component::Bmc,
                endpoint: self.base.clone(),
                operation: what.to_owned(),
                after: self.timeout,
            };
        }
        if let Some(detail) = tls::trust_failure(&e) {
            return ProviderError::TlsTrust {
                endpoint: self.base.clone(),
                detail,
            };
        }
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        ProviderError::Unreachable {
            component: pcg_provider::Component::Bmc,
            endpoint: self.base.clone(),
            reason,
        }
    }

    /// Maps a non-success reply to an error.
    pub fn status_error(&self, what: &str, r: &Reply) -> ProviderError {
        let msg = model::error_message(&r.body);
        let endpoint = self.base.clone();
        match r.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderError::Auth {
                component: pcg_provider::Component::Bmc,
                endpoint,
                user: self.user.clone(),
                detail: format!("HTTP {} on {what}", r.status.as_u16()),
            },
            StatusCode::NOT_FOUND => ProviderError::NotFound {
                component: pcg_provider::Component::Bmc,
                endpoint,
                what: what.to_owned(),
            },
            StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED => ProviderError::Conflict {
                endpoint,
                detail: format!("{what}: HTTP {}: {msg}", r.status.as_u16()),
            },
            StatusCode::TOO_MANY_REQUESTS => ProviderError::Quota {
                endpoint,
                detail: format!("{what}: {msg}"),
            },
            _ => ProviderError::ProviderFault {
                endpoint,
                message: format!("{what}: HTTP {}: {msg}", r.status.as_u16()),
            },
        }
    }

    /// Sends one request with the given authentication, no retry.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        auth: &Auth,
    ) -> Result<Reply> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, self.url(path))
            .header(header::ACCEPT, "application/json")
            .header("OData-Version", "4.0");
        match auth {
            Auth::None => {}
            Auth::Basic => req = req.basic_auth(&self.user, Some(self.password.expose())),
            Auth::Session { token, .. } => req = req.header("X-Auth-Token", token.expose()),
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(tag) = if_match {
            req = req.header(header::IF_MATCH, tag);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(e, &what))?;
        let status = resp.status();
        let h = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let etag = h(header::ETAG);
        let location = h(header::LOCATION);
        let auth_token = h(header::HeaderName::from_static("x-auth-token")).map(Secret::new);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(e, &what))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply {
            status,
            etag,
            location,
            auth_token,
            body,
        })
    }

    /// Logs in: a Redfish session where the service has a SessionService, else basic auth
    /// (checked with one authenticated GET). A rejected password is an `Auth` error.
    pub async fn login(&self) -> Result<Auth> {
        let mut auth = self.auth.lock().await;
        if *auth != Auth::None {
            return Ok(auth.clone());
        }
        *auth = self.do_login().await?;
        tracing::debug!(endpoint = %self.base, user = %self.user, mode = auth.label(), "redfish login");
        Ok(auth.clone())
    }

    async fn do_login(&self) -> Result<Auth> {
        let root = self
            .send(Method::GET, "/redfish/v1/", None, None, &Auth::None)
            .await?;
        let sessions = if root.status.is_success() {
            let r: ServiceRoot = model::parse(&root.body).unwrap_or_default();
            r.links
                .and_then(|l| l.sessions)
                .map(|l| l.odata_id)
                .or_else(|| {
                    r.session_service
                        .map(|_| "/redfish/v1/SessionService/Sessions".into())
                })
        } else {
            None
        };
        if let Some(uri) = sessions {
            let creds = json!({"UserName": self.user, "Password": self.password.expose()});
            let r = self
                .send(Method::POST, &uri, Some(&creds), None, &Auth::None)
                .await?;
            match r.status.as_u16() {
                200..=204 => {
                    if let Some(token) = r.auth_token.clone() {
                        let location = r
                            .location
                            .clone()
                            .or_else(|| r.body["@odata.id"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        return Ok(Auth::Session { token, location });
                    }
                }
                401 | 403 => return Err(self.status_error("session login", &r)),
                _ => {}
            }
        }
        let r = self
            .send(Method::GET, "/redfish/v1/Systems", None, None, &Auth::Basic)
            .await?;
        if r.status.is_success() {
            Ok(Auth::Basic)
        } else {
            Err(self.status_error("basic auth login", &r))
        }
    }

    /// Sends an authenticated request; on 401 with a session, logs in again once and retries.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<Reply> {
        let auth = self.login().await?;
        let r = self
            .send(method.clone(), path, body, if_match, &auth)
            .await?;
        if r.status == StatusCode::UNAUTHORIZED && matches!(auth, Auth::Session { .. }) {
            *self.auth.lock().await = Auth::None;
            let auth = self.login().await?;
            return self.send(method, path, body, if_match, &auth).await;
        }
        Ok(r)
    }

    /// GET returning a successful reply, or the mapped error.
    pub async fn get(&self, path: &str) -> Result<Reply> {
        let r = self.request(Method::GET, path, None, None).await?;
        if r.status.is_success() {
            Ok(r)
        } else {
            Err(self.status_error(&format!("GET {path}"), &r))
        }
    }

    /// POST/PATCH expecting 200/201/204, or 202 with a Task monitor that is polled to the end.
    pub async fn act(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        if_match: Option<&str>,
        task_bound: Duration,
    ) -> Result<Reply> {
        let what = format!("{method} {path}");
        let r = self.request(method, path, Some(body), if_match).await?;
        match r.status.as_u16() {
            202 => {
                if let Some(loc) = &r.location {
                    self.wait_task(loc, task_bound).await?;
                }
                Ok(r)
            }
            200..=299 => Ok(r),
            _ => Err(self.status_error(&what, &r)),
        }
    }

    /// Polls a Task monitor until it completes, fails, or `bound` passes.
    pub async fn wait_task(&self, monitor: &str, bound: Duration) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let r = self.request(Method::GET, monitor, None, None).await?;
            let task: Task = model::parse(&r.body).unwrap_or_default();
            let state = task.task_state.as_deref().map(task_state);
            match (r.status.as_u16(), state) {
                (_, Some(TaskState::Failed | TaskState::Cancelled)) => {
                    let msgs: Vec<String> = task
                        .messages
                        .iter()
                        .filter_map(|m| m.message.clone())
                        .collect();
                    return Err(ProviderError::ProviderFault {
                        endpoint: self.base.clone(),
                        message: format!(
                            "task {monitor} ended {:?}: {}",
                            task.task_state,
                            msgs.join("; ")
                        ),
                    });
                }
                (_, Some(TaskState::Completed)) => return Ok(()),
                (202, _) | (200, Some(_)) => {}
                (200..=299, None) => return Ok(()),
                // The monitor may vanish once the task is done.
                (404 | 410, _) => return Ok(()),
                _ => return Err(self.status_error(&format!("task {monitor}"), &r)),
            }
            if start.elapsed() >= bound {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::Bmc,
                    endpoint: self.base.clone(),
                    operation: format!("task {monitor}"),
                    after: bound,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Deletes the session, if any. Idempotent.
    pub async fn logout(&self) -> Result<()> {
        let mut auth = self.auth.lock().await;
        let old = std::mem::replace(&mut *auth, Auth::None);
        if let Auth::Session { location, .. } = &old {
            if !location.is_empty() {
                let r = self
                    .send(Method::DELETE, location, None, None, &old)
                    .await?;
                if !(r.status.is_success() || r.status == StatusCode::NOT_FOUND) {
                    return Err(self.status_error("session logout", &r));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Client {
    /// Deletes a still-open session in the background where a runtime is available.
    fn drop(&mut self) {
        let auth = std::mem::replace(self.auth.get_mut(), Auth::None);
        if let Auth::Session { token, location } = auth {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let req = self
                    .http
                    .delete(self.url(&location))
                    .header("X-Auth-Token", token.expose());
                rt.spawn(async move {
                    let _ = req.send().await;
                });
            }
        }
    }
}

/// Maps a Redfish TaskState to ours.
pub fn task_state(s: &str) -> TaskState {
    match s {
        "Completed" => TaskState::Completed,
        "Exception" | "Killed" => TaskState::Failed,
        "Cancelled" => TaskState::Cancelled,
        "New" | "Pending" | "Starting" => TaskState::Pending,
        _ => TaskState::Running,
    }
}
