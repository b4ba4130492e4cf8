//! The SOAP client: one session per endpoint shared by every operation, the session cookie,
//! transparent re-login on `NotAuthenticated`, keep-alive of idle sessions, typed faults, and the
//! PropertyCollector (RetrievePropertiesEx + ContinueRetrievePropertiesEx paging over a
//! ContainerView).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use pcg_provider::{ProviderError, Result, Secret};
use tokio::sync::Mutex;

use crate::fault::Fault;
use crate::tls;
use crate::xml::{self, elem, envelope, escape, MoRef, Node};
use crate::VsphereEndpoint;

/// Default bound on one SOAP request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on connecting (TCP and TLS handshake) to vCenter, when the request bound is larger: a
/// vCenter that does not accept connections is reported sooner than one that is slow to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The bounds one request runs under; a timeout reports the one that fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The whole request, connection included.
    pub request: Duration,
    /// Connecting: TCP connect and TLS handshake (never more than `request`).
    pub connect: Duration,
}

impl Bounds {
    /// The bounds for a request bound of `request`.
    pub fn new(request: Duration) -> Self {
        Self {
            request,
            connect: request.min(CONNECT_TIMEOUT),
        }
    }
}
/// Default interval of the keep-alive of an idle session (vCenter drops idle sessions after 30
/// minutes by default).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10 * 60);
/// Default page size of property retrieval.
pub const DEFAULT_PAGE: u32 = 500;

/// What RetrieveServiceContent returned that the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub session_manager: MoRef,
    pub view_manager: MoRef,
    /// e.g. `VMware vCenter Server 6.5.0 build-5973321`.
    pub full_name: String,
    /// e.g. `6.5`.
    pub api_version: String,
}

impl ServiceContent {
    /// From the `returnval` of RetrieveServiceContent.
    pub fn from_node(n: &Node) -> Option<Self> {
        Some(Self {
            root_folder: n.child("rootFolder")?.moref()?,
            property_collector: n.child("propertyCollector")?.moref()?,
            session_manager: n.child("sessionManager")?.moref()?,
            view_manager: n.child("viewManager")?.moref()?,
            full_name: n
                .path(&["about", "fullName"])
                .map(|x| x.text.clone())
                .unwrap_or_default(),
            api_version: n
                .path(&["about", "apiVersion"])
                .map(|x| x.text.clone())
                .unwrap_or_default(),
        })
    }
}

/// The properties of one object, as RetrievePropertiesEx returned them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    pub obj: MoRef,
    /// `(path, <val> node)`; dispatch on the node's `xsi_type`.
    pub props: Vec<(String, Node)>,
}

impl ObjectContent {
    /// The value node of a property path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// A property's text (strings, numbers, enums).
    pub fn text(&self, path: &str) -> Option<&str> {
        self.get(path).map(|v| v.text.as_str())
    }

    /// A property holding a managed object reference.
    pub fn moref(&self, path: &str) -> Option<MoRef> {
        self.get(path).and_then(Node::moref)
    }
}

/// A NotAuthenticated or NoPermission fault reported per object in a RetrievePropertiesEx
/// `missingSet` (how vCenter and vcsim answer property retrieval without a valid session) is a
/// fault of the whole call.
pub fn missing_set_fault(returnval: Option<&Node>) -> Option<Fault> {
    let rv = returnval?;
    rv.children_named("objects")
        .flat_map(|o| o.children_named("missingSet"))
        .filter_map(|m| m.child("fault").and_then(|f| f.child("fault")))
        .find_map(|f| match f.xsi_type.as_deref() {
            Some(t @ ("NotAuthenticated" | "NoPermission")) => Some(Fault {
                type_name: t.to_owned(),
                message: format!("property retrieval refused ({t})"),
            }),
            _ => None,
        })
}

/// Parses one RetrievePropertiesEx / ContinueRetrievePropertiesEx `returnval`: objects and the
/// continuation token.
pub fn parse_retrieve_result(returnval: Option<&Node>) -> (Vec<ObjectContent>, Option<String>) {
    let Some(rv) = returnval else {
        return (Vec::new(), None);
    };
    let token = rv.child_text("token").map(str::to_owned);
    let objects = rv
        .children_named("objects")
        .filter_map(|o| {
            let obj = o.child("obj")?.moref()?;
            let props = o
                .children_named("propSet")
                .filter_map(|p| Some((p.child_text("name")?.to_owned(), p.child("val")?.clone())))
                .collect();
            Some(ObjectContent { obj, props })
        })
        .collect();
    (objects, token)
}

/// The session: cookie and key, and a generation counter so concurrent callers that all saw
/// `NotAuthenticated` log in once.
#[derive(Default)]
struct Session {
    cookie: Option<String>,
    key: Option<String>,
    generation: u64,
}

struct Inner {
    /// `https://host[:port]/sdk`.
    url: String,
    user: String,
    password: Secret,
    http: reqwest::Client,
    bounds: Bounds,
    sc: ServiceContent,
    session: Mutex<Session>,
    /// When a request last succeeded (the keep-alive skips busy sessions).
    last_used: StdMutex<Instant>,
    page: u32,
    /// ContinueRetrievePropertiesEx calls made (diagnostics; tests check paging happened).
    continuations: AtomicU64,
    /// SOAP requests sent on the session (every method call, retries included): what a read
    /// costs, for the watch loop's figures and its tests.
    requests: AtomicU64,
}

/// A vSphere Web Services client bound to one endpoint. Cloning shares the session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url)
            .field("user", &self.inner.user)
            .finish_non_exhaustive()
    }
}

/// Normalises an endpoint address to its SDK URL.
pub fn sdk_url(address: &str) -> Result<String> {
    let a = address.trim().trim_end_matches('/');
    if !(a.starts_with("https://") || a.starts_with("http://")) {
        return Err(ProviderError::invalid(
            "url",
            format!("{a:?} must start with https:// (or http:// for a lab simulator)"),
        ));
    }
    Ok(if a.ends_with("/sdk") {
        a.to_owned()
    } else {
        format!("{a}/sdk")
    })
}

impl Client {
    /// Builds the HTTP client, reads the service content and logs in. A wrong password fails
    /// here with `Auth` naming the endpoint and the user.
    pub async fn connect(ep: &VsphereEndpoint) -> Result<Self> {
        let url = sdk_url(&ep.url)?;
        let bounds = Bounds::new(
            ep.timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_TIMEOUT),
        );
        let mut builder = reqwest::Client::builder()
            .timeout(bounds.request)
            .connect_timeout(bounds.connect)
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(16);
        if url.starts_with("https://") {
            let trust = ep.tls.as_ref().ok_or_else(|| {
                ProviderError::invalid(
                    "tls",
                    format!("{url} is HTTPS: give ca_pem or pin_sha256 (verification cannot be switched off)"),
                )
            })?;
            let config = tls::client_config(trust).map_err(|e| ProviderError::invalid("tls", e))?;
            builder = builder.use_preconfigured_tls(config);
        }
        let http = builder
            .build()
            .map_err(|e| ProviderError::invalid("url", format!("{url}: {e}")))?;
        let body = format!(
            "<RetrieveServiceContent>{}</RetrieveServiceContent>",
            MoRef::new("ServiceInstance", "ServiceInstance").xml("_this")
        );
        let resp = post(&http, &url, bounds, &body, None)
            .await
            .map_err(|e| e.into_error(&url, &ep.user, "RetrieveServiceContent"))?;
        let sc = resp
            .returnval
            .as_ref()
            .and_then(ServiceContent::from_node)
            .ok_or_else(|| ProviderError::ProviderFault {
                endpoint: url.clone(),
                message: "RetrieveServiceContent answered without rootFolder/propertyCollector/sessionManager/viewManager; is this a vCenter SDK URL?".into(),
            })?;
        let client = Self {
            inner: Arc::new(Inner {
                url,
                user: ep.user.clone(),
                password: ep.password.clone(),
                http,
                bounds,
                sc,
                session: Mutex::new(Session::default()),
                last_used: StdMutex::new(Instant::now()),
                page: ep.page_size.unwrap_or(DEFAULT_PAGE).max(1),
                continuations: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            }),
        };
        client.login(0).await?;
        let keepalive = ep
            .keepalive_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_KEEPALIVE);
        spawn_keepalive(Arc::downgrade(&client.inner), keepalive);
        Ok(client)
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.url
    }

    pub fn user(&self) -> &str {
        &self.inner.user
    }

    pub fn service_content(&self) -> &ServiceContent {
        &self.inner.sc
    }

    /// How many ContinueRetrievePropertiesEx calls this client made.
    pub fn continuations(&self) -> u64 {
        self.inner.continuations.load(Ordering::Relaxed)
    }

    /// How many SOAP requests this client sent on its session (method calls, retries included;
    /// not the login).
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The key of the current session (as SessionManager lists it), if logged in.
    pub async fn session_key(&self) -> Option<String> {
        self.inner.session.lock().await.key.clone()
    }

    fn err(&self, op: &str, e: CallError) -> ProviderError {
        e.into_error(&self.inner.url, &self.inner.user, op)
    }

    /// Logs in unless someone already did since generation `seen`.
    async fn login(&self, seen: u64) -> Result<()> {
        let mut s = self.inner.session.lock().await;
        if s.generation != seen && s.cookie.is_some() {
            return Ok(());
        }
        let body = format!(
            "<Login>{}{}{}</Login>",
            self.inner.sc.session_manager.xml("_this"),
            elem("userName", &self.inner.user),
            elem("password", self.inner.password.expose()),
        );
        let resp = post(
            &self.inner.http,
            &self.inner.url,
            self.inner.bounds,
            &body,
            None,
        )
        .await
        .map_err(|e| self.err("Login", e))?;
        let cookie = resp.cookie.ok_or_else(|| ProviderError::ProviderFault {
            endpoint: self.inner.url.clone(),
            message: "Login answered without a session cookie".into(),
        })?;
        s.key = resp
            .returnval
            .as_ref()
            .and_then(|r| r.child_text("key"))
            .map(str::to_owned);
        s.cookie = Some(cookie);
        s.generation += 1;
        tracing::debug!(endpoint = %self.inner.url, user = %self.inner.user, "vSphere login");
        Ok(())
    }

    /// Ends the session (the client logs in again when used).
    pub async fn logout(&self) -> Result<()> {
        let mut s = self.inner.session.lock().await;
        let Some(cookie) = s.cookie.take() else {
            return Ok(());
        };
        s.key = None;
        s.generation += 1;
        let body = format!(
            "<Logout>{}</Logout>",
            self.inner.sc.session_manager.xml("_this")
        );
        match post(
            &self.inner.http,
            &self.inner.url,
            self.inner.bounds,
            &body,
            Some(&cookie),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Fault(f)) if f.is("NotAuthenticated") => Ok(()),
            Err(e) => Err(self.err("Logout", e)),
        }
    }

    /// Calls a method; on `NotAuthenticated` logs in again and retries once. Faults other than
    /// that come back as `Ok(Err(fault))` for callers that handle some of them.
    pub async fn call_fault(
        &self,
        op: &str,
        body: &str,
    ) -> Result<std::result::Result<Option<Node>, Fault>> {
        for attempt in 0..2 {
            let (cookie, generation) = {
                let s = self.inner.session.lock().await;
                (s.cookie.clone(), s.generation)
            };
            let Some(cookie) = cookie else {
                self.login(generation).await?;
                continue;
            };
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            let result = post(
                &self.inner.http,
                &self.inner.url,
                self.inner.bounds,
                body,
                Some(&cookie),
            )
            .await
            .and_then(|r| match missing_set_fault(r.returnval.as_ref()) {
                Some(f) => Err(CallError::Fault(f)),
                None => Ok(r),
            });
            match result {
                Ok(r) => {
                    if let Ok(mut t) = self.inner.last_used.lock() {
                        *t = Instant::now();
                    }
                    return Ok(Ok(r.returnval));
                }
                Err(CallError::Fault(f)) if f.is("NotAuthenticated") && attempt == 0 => {
                    tracing::info!(endpoint = %self.inner.url, user = %self.inner.user, "vSphere session ended by the server; logging in again");
                    self.login(generation).await?;
                }
                Err(CallError::Fault(f)) => return Ok(Err(f)),
                Err(e) => return Err(self.err(op, e)),
            }
        }
        Err(ProviderError::Auth {
            component: pcg_provider::Component::Vcenter,
            endpoint: self.inner.url.clone(),
            user: self.inner.user.clone(),
            detail: format!("{op}: not authenticated even after logging in again"),
        })
    }

    /// Calls a method, mapping every fault into the provider taxonomy.
    pub async fn call(&self, op: &str, body: &str) -> Result<Option<Node>> {
        self.call_fault(op, body)
            .await?
            .map_err(|f| f.into_error(&self.inner.url, &self.inner.user, op))
    }

    /// Maps a fault the caller did not handle.
    pub fn fault_error(&self, op: &str, f: Fault) -> ProviderError {
        f.into_error(&self.inner.url, &self.inner.user, op)
    }

    /// Properties of one object.
    pub async fn retrieve_one(&self, obj: &MoRef, paths: &[&str]) -> Result<ObjectContent> {
        let spec = format!(
            "<specSet><propSet>{}{}</propSet><objectSet>{}<skip>false</skip></objectSet></specSet>",
            elem("type", &obj.kind),
            paths.iter().map(|p| elem("pathSet", p)).collect::<String>(),
            obj.xml("obj"),
        );
        // A fault for a missing object names the object.
        let mut all = self.retrieve(&spec).await.map_err(|e| match e {
            ProviderError::NotFound {
                component,
                endpoint,
                what,
            } => ProviderError::NotFound {
                component,
                endpoint,
                what: format!("{obj} ({what})"),
            },
            e => e,
        })?;
        all.pop().ok_or_else(|| ProviderError::NotFound {
            component: pcg_provider::Component::Vcenter,
            endpoint: self.inner.url.clone(),
            what: format!("{obj}"),
        })
    }

    /// Properties of every object of the given types under `root` (recursively), through a
    /// ContainerView and paged retrieval.
    pub async fn retrieve_view(
        &self,
        root: &MoRef,
        types: &[(&str, &[&str])],
    ) -> Result<Vec<ObjectContent>> {
        let body = format!(
            "<CreateContainerView>{}{}{}<recursive>true</recursive></CreateContainerView>",
            self.inner.sc.view_manager.xml("_this"),
            root.xml("container"),
            types
                .iter()
                .map(|(t, _)| elem("type", t))
                .collect::<String>(),
        );
        let view = self
            .call("CreateContainerView", &body)
            .await?
            .and_then(|n| n.moref())
            .ok_or_else(|| ProviderError::ProviderFault {
                endpoint: self.inner.url.clone(),
                message: "CreateContainerView returned no view".into(),
            })?;
        let spec = format!(
            "<specSet>{}<objectSet>{}<skip>true</skip>\
<selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet>\
</objectSet></specSet>",
            types
                .iter()
                .map(|(t, paths)| format!(
                    "<propSet>{}{}</propSet>",
                    elem("type", t),
                    paths.iter().map(|p| elem("pathSet", p)).collect::<String>()
                ))
                .collect::<String>(),
            view.xml("obj"),
        );
        let result = self.retrieve(&spec).await;
        let destroy = format!("<DestroyView>{}</DestroyView>", view.xml("_this"));
        if let Err(e) = self.call("DestroyView", &destroy).await {
            tracing::warn!(endpoint = %self.inner.url, error = %e, "DestroyView failed");
        }
        result
    }

    /// RetrievePropertiesEx with `specSet`, then ContinueRetrievePropertiesEx until done.
    async fn retrieve(&self, spec_set: &str) -> Result<Vec<ObjectContent>> {
        let pc = &self.inner.sc.property_collector;
        let body = format!(
            "<RetrievePropertiesEx>{}{spec_set}<options><maxObjects>{}</maxObjects></options></RetrievePropertiesEx>",
            pc.xml("_this"),
            self.inner.page
        );
        let rv = self.call("RetrievePropertiesEx", &body).await?;
        let (mut all, mut token) = parse_retrieve_result(rv.as_ref());
        while let Some(t) = token.take() {
            let body = format!(
                "<ContinueRetrievePropertiesEx>{}{}</ContinueRetrievePropertiesEx>",
                pc.xml("_this"),
                elem("token", &t)
            );
            self.inner.continuations.fetch_add(1, Ordering::Relaxed);
            let rv = self.call("ContinueRetrievePropertiesEx", &body).await?;
            let (more, next) = parse_retrieve_result(rv.as_ref());
            all.extend(more);
            token = next;
        }
        Ok(all)
    }

    /// Terminates other sessions by key (an administrator's tool; the tests use it to end a
    /// session server-side).
    pub async fn terminate_sessions(&self, keys: &[String]) -> Result<()> {
        let body = format!(
            "<TerminateSession>{}{}</TerminateSession>",
            self.inner.sc.session_manager.xml("_this"),
            keys.iter()
                .map(|k| elem("sessionId", k))
                .collect::<String>()
        );
        self.call("TerminateSession", &body).await.map(|_| ())
    }

    /// The server's clock; a cheap authenticated call (used by the keep-alive).
    pub async fn current_time(&self) -> Result<String> {
        let body = format!(
            "<CurrentTime>{}</CurrentTime>",
            MoRef::new("ServiceInstance", "ServiceInstance").xml("_this")
        );
        Ok(self
            .call("CurrentTime", &body)
            .await?
            .map(|n| n.text)
            .unwrap_or_default())
    }
}

/// The last handle to a client gone: log its session out in the background (where a runtime is
/// running), so dropped drivers do not pile up sessions until vCenter refuses new ones.
impl Drop for Inner {
    fn drop(&mut self) {
        let Ok(mut s) = self.session.try_lock() else {
            return;
        };
        let Some(cookie) = s.cookie.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let http = self.http.clone();
        let url = self.url.clone();
        let bounds = self.bounds;
        let body = format!("<Logout>{}</Logout>", self.sc.session_manager.xml("_this"));
        handle.spawn(async move {
            let _ = post(&http, &url, bounds, &body, Some(&cookie)).await;
        });
    }
}

fn spawn_keepalive(inner: Weak<Inner>, every: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let idle = inner
                .last_used
                .lock()
                .map(|t| t.elapsed())
                .unwrap_or(every);
            let logged_in = inner.session.lock().await.cookie.is_some();
            if idle >= every / 2 && logged_in {
                let client = Client { inner };
                if let Err(e) = client.current_time().await {
                    tracing::warn!(endpoint = %client.inner.url, error = %e, "vSphere keep-alive failed");
                }
            }
        }
    });
}

/// A successful response: the `returnval` of the method's response element, and the session
/// cookie if the server set one.
struct Response {
    returnval: Option<Node>,
    cookie: Option<String>,
}

/// Why a call failed before mapping.
pub(crate) enum CallError {
    Fault(Fault),
    Transport(reqwest::Error),
    /// A bound fired: `connecting` when no connection (TCP + TLS) was established within the
    /// connect bound, else the request bound.
    Timeout {
        after: Duration,
        connecting: bool,
    },
    Http(u16, String),
    Malformed(String),
}

impl CallError {
    fn into_error(self, url: &str, user: &str, op: &str) -> ProviderError {
        match self {
            Self::Fault(f) => f.into_error(url, user, op),
            Self::Timeout { after, connecting } => ProviderError::Timeout {
                component: pcg_provider::Component::Vcenter,
                endpoint: url.to_owned(),
                operation: if connecting {
                    format!("{op} (no TCP/TLS connection established)")
                } else {
                    op.to_owned()
                },
                after,
            },
            Self::Transport(e) => ProviderError::Unreachable {
                component: pcg_provider::Component::Vcenter,
                endpoint: url.to_owned(),
                reason: error_chain(&e),
            },
            Self::Http(status, body) => ProviderError::ProviderFault {
                endpoint: url.to_owned(),
                message: format!(
                    "{op}: HTTP {status}: {}",
                    body.chars().take(300).collect::<String>()
                ),
            },
            Self::Malformed(why) => ProviderError::ProviderFault {
                endpoint: url.to_owned(),
                message: format!("{op}: unreadable response: {why}"),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Parses a SOAP response body: the method's `returnval`, or its fault.
pub fn parse_response(body: &str) -> std::result::Result<Option<Node>, ParsedError> {
    let doc = xml::parse(body).map_err(|e| ParsedError::Malformed(e.to_string()))?;
    let soap_body = doc
        .child("Body")
        .ok_or_else(|| ParsedError::Malformed("no SOAP Body".into()))?;
    let first = soap_body
        .children
        .first()
        .ok_or_else(|| ParsedError::Malformed("empty SOAP Body".into()))?;
    if first.name == "Fault" {
        return Err(ParsedError::Fault(Fault::from_soap(first)));
    }
    Ok(first.child("returnval").cloned())
}

/// A response that was a fault or unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedError {
    Fault(Fault),
    Malformed(String),
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    bounds: Bounds,
    body: &str,
    cookie: Option<&str>,
) -> std::result::Result<Response, CallError> {
    let mut req = http
        .post(url)
        .header("Content-Type", "text/xml; charset=utf-8")
        .header("SOAPAction", "urn:vim25/6.5")
        .body(envelope(body));
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_timeout() {
            // reqwest tells which bound fired only through is_connect(): a timeout while
            // connecting is the connect bound, any other the request bound.
            CallError::Timeout {
                after: if e.is_connect() {
                    bounds.connect
                } else {
                    bounds.request
                },
                connecting: e.is_connect(),
            }
        } else {
            CallError::Transport(e)
        }
    })?;
    let status = resp.status();
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("vmware_soap_session"))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let text = resp.text().await.map_err(|e| {
        if e.is_timeout() {
            CallError::Timeout {
                after: bounds.request,
                connecting: false,
            }
        } else {
            CallError::Transport(e)
        }
    })?;
    // Faults come with HTTP 500 and a SOAP body; anything else not 200 is the web server's.
    if !(status.is_success() || status.as_u16() == 500) {
        return Err(CallError::Http(status.as_u16(), text));
    }
    match parse_response(&text) {
        Ok(returnval) => Ok(Response { returnval, cookie }),
        Err(ParsedError::Fault(f)) => Err(CallError::Fault(f)),
        Err(ParsedError::Malformed(_)) if !status.is_success() => {
            Err(CallError::Http(status.as_u16(), text))
        }
        Err(ParsedError::Malformed(why)) => Err(CallError::Malformed(why)),
    }
}

/// Escaped text, for building request bodies elsewhere in the crate.
pub fn text(s: &str) -> String {
    escape(s)
}
