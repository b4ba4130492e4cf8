//! The Nova/Glance/Neutron client on osauth's session: server create (idempotent by command id),
//! get, list, delete, power, waits, and the lookups that validate a spec before anything is sent.
//!
//! The `openstack` crate's `Server` model refuses fields real Nova returns, so servers are read
//! here as JSON into a lenient [`Server`]; every request goes through the one osauth session
//! (token cached and renewed by osauth ten minutes before it expires).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use osauth::services::{COMPUTE, IMAGE, NETWORK};
use osauth::Session;
use pcg_provider::{PowerAction, PowerState, ProviderError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::CloudEntry;
use crate::error::{map_err, NovaContext};

/// The metadata key that carries the pcg command id on a server.
pub const COMMAND_ID_KEY: &str = "pcg_command_id";
/// Nova microversion used (2.37: `"networks": "none"`/`"auto"`).
pub const NOVA_MICROVERSION: (u16, u16) = (2, 37);
/// Default bound on one HTTP request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on waiting for a server to reach a state.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// How many delete requests [`OpenStack::delete`] sends at most when Nova gives a delete up.
pub const DELETE_REQUESTS: u32 = 3;

/// A server to create. Flavor, image and networks are names or ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServerSpec {
    pub name: String,
    /// Flavor name or id.
    pub flavor: String,
    /// Image name or id.
    pub image: String,
    /// Network names or ids; empty means `"none"` (no network), unless `auto_network`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Ask Nova to allocate a network (`"networks": "auto"`) when `networks` is empty.
    #[serde(default)]
    pub auto_network: bool,
    /// Key pair name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// cloud-init user data (plain text; base64-encoded here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Extra server metadata (the command id is added under [`COMMAND_ID_KEY`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
}

/// A server as Nova reports it (only the fields pcg uses; unknown fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub name: String,
    /// Nova's status: BUILD, ACTIVE, SHUTOFF, ERROR, DELETED, ...
    pub status: String,
    /// The fault message when the server is in ERROR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_state: Option<String>,
    /// The first IP address Nova reports, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

impl Server {
    fn from_json(v: &Value) -> Option<Server> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let metadata = v
            .get("metadata")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let ip = v
            .get("addresses")
            .and_then(Value::as_object)
            .and_then(|m| m.values().next())
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| a.get("addr"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Some(Server {
            id: s("id")?,
            name: s("name").unwrap_or_default(),
            status: s("status").unwrap_or_else(|| "UNKNOWN".into()),
            fault: v
                .get("fault")
                .and_then(|f| f.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string),
            metadata,
            flavor_id: v
                .get("flavor")
                .and_then(|f| f.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string),
            image_id: v
                .get("image")
                .and_then(|f| f.get("id"))
                .and_then(Value::as_str)
                .map(str::to_string),
            task_state: s("OS-EXT-STS:task_state"),
            ip,
        })
    }

    /// The pcg command id this server was created by, if any.
    pub fn command_id(&self) -> Option<&str> {
        self.metadata.get(COMMAND_ID_KEY).map(String::as_str)
    }

    /// The power state implied by the status.
    pub fn power(&self) -> PowerState {
        match (self.status.as_str(), self.task_state.as_deref()) {
            (_, Some("powering-on")) => PowerState::PoweringOn,
            (_, Some("powering-off")) => PowerState::PoweringOff,
            ("ACTIVE", _) => PowerState::On,
            ("SHUTOFF" | "SUSPENDED" | "SHELVED" | "SHELVED_OFFLOADED" | "STOPPED", _) => {
                PowerState::Off
            }
            _ => PowerState::Unknown,
        }
    }
}

/// A flavor, image or network: what lookups return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub id: String,
    pub name: String,
    /// vCPUs and RAM (MiB), for flavors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mib: Option<u64>,
}

/// A logged-in OpenStack project: one osauth session shared by every operation.
pub struct OpenStack {
    session: Session,
    cloud: CloudEntry,
    timeout: Duration,
    /// Requests sent to the services (retries included; not Keystone's): what a read costs,
    /// for the watch loop's figures.
    requests: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for OpenStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStack")
            .field("cloud", &self.cloud)
            .finish_non_exhaustive()
    }
}

impl OpenStack {
    /// Logs in to Keystone (so wrong credentials fail here, as `Auth`).
    pub async fn connect(cloud: CloudEntry) -> Result<Self, ProviderError> {
        let timeout = cloud
            .entry
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let cfg = cloud.to_osauth()?;
        let ctx = NovaContext::keystone(&cloud, timeout);
        let session = match tokio::time::timeout(timeout, cfg.create_session()).await {
            Ok(r) => r.map_err(|e| map_err(&ctx, e))?,
            Err(_) => {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::OpenStack,
                    endpoint: cloud.auth_url().to_string(),
                    operation: "Keystone authentication".into(),
                    after: timeout,
                })
            }
        };
        Ok(Self {
            session,
            cloud,
            timeout,
            requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many requests this client sent to Nova, Glance and Neutron (retries included).
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The cloud this client is logged in to.
    pub fn cloud(&self) -> &CloudEntry {
        &self.cloud
    }

    /// The Keystone URL (the endpoint named in messages).
    pub fn endpoint(&self) -> &str {
        self.cloud.auth_url()
    }

    fn ctx(&self, what: impl Into<String>) -> NovaContext {
        NovaContext::service(&self.cloud, what, self.timeout)
    }

    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, osauth::Error>>,
    ) -> Result<T, ProviderError> {
        self.count();
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| map_err(&self.ctx(what), e)),
            Err(_) => Err(ProviderError::Timeout {
                component: pcg_provider::Component::OpenStack,
                endpoint: self.endpoint().to_string(),
                operation: what.to_string(),
                after: self.timeout,
            }),
        }
    }

    /// As [`Self::bounded`] for an idempotent request (a read, a delete): retried up to three
    /// times when the service answers with a server error (e.g. a busy database), which is
    /// transient more often than not.
    async fn idempotent<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, osauth::Error>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            self.count();
            match tokio::time::timeout(self.timeout, f()).await {
                Ok(Err(e)) if attempt < 4 && e.kind() == osauth::ErrorKind::InternalServerError => {
                    tracing::warn!(operation = what, attempt, error = %e, "server error; retrying");
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                }
                Ok(r) => return r.map_err(|e| map_err(&self.ctx(what), e)),
                Err(_) => {
                    return Err(ProviderError::Timeout {
                        component: pcg_provider::Component::OpenStack,
                        endpoint: self.endpoint().to_string(),
                        operation: what.to_string(),
                        after: self.timeout,
                    })
                }
            }
        }
    }

    async fn compute_get(&self, what: &str, path: &str) -> Result<Value, ProviderError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        self.idempotent(what, || async {
            self.session
                .get(COMPUTE, parts.clone())
                .api_version(NOVA_MICROVERSION)
                .fetch::<Value>()
                .await
        })
        .await
    }

    // ---- lookups ----------------------------------------------------------------------------

    /// Every flavor the project can use.
    pub async fn flavors(&self) -> Result<Vec<Named>, ProviderError> {
        let v = self.compute_get("list flavors", "flavors/detail").await?;
        Ok(v.get("flavors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|f| {
                        Some(Named {
                            id: f.get("id")?.as_str()?.to_string(),
                            name: f.get("name")?.as_str()?.to_string(),
                            vcpus: f.get("vcpus").and_then(Value::as_u64).map(|x| x as u32),
                            ram_mib: f.get("ram").and_then(Value::as_u64),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Every image the project can see.
    pub async fn images(&self) -> Result<Vec<Named>, ProviderError> {
        let v: Value = self
            .idempotent("list images", || async {
                self.session
                    .get(IMAGE, ["images"])
                    .query(&[("limit", "1000")])
                    .fetch()
                    .await
            })
            .await?;
        Ok(names(&v, "images"))
    }

    /// Every network the project can see.
    pub async fn networks(&self) -> Result<Vec<Named>, ProviderError> {
        let v: Value = self
            .idempotent("list networks", || async {
                self.session.get(NETWORK, ["networks"]).fetch().await
            })
            .await?;
        Ok(names(&v, "networks"))
    }

    /// The id of the flavor named or identified by `want`.
    pub async fn resolve_flavor(&self, want: &str) -> Result<Named, ProviderError> {
        pick("flavor", want, self.flavors().await?)
    }

    /// The id of the image named or identified by `want`.
    pub async fn resolve_image(&self, want: &str) -> Result<Named, ProviderError> {
        pick("image", want, self.images().await?)
    }

    /// The smallest flavor with at least `cpus` vCPUs and `ram_mib` MiB.
    pub async fn flavor_for(
        &self,
        cpus: Option<u32>,
        ram_mib: Option<u64>,
    ) -> Result<Named, ProviderError> {
        let all = self.flavors().await?;
        all.iter()
            .filter(|f| f.vcpus.unwrap_or(0) >= cpus.unwrap_or(0))
            .filter(|f| f.ram_mib.unwrap_or(0) >= ram_mib.unwrap_or(0))
            .min_by_key(|f| (f.vcpus, f.ram_mib))
            .cloned()
            .ok_or_else(|| {
                ProviderError::invalid(
                    "flavor",
                    format!(
                        "no flavor has {} vCPUs and {} MiB (flavors: {})",
                        cpus.unwrap_or(0),
                        ram_mib.unwrap_or(0),
                        list_names(&all)
                    ),
                )
            })
    }

    // ---- servers ----------------------------------------------------------------------------

    /// One server by id.
    pub async fn get(&self, id: &str) -> Result<Server, ProviderError> {
        let v = self
            .compute_get(&format!("show server {id}"), &format!("servers/{id}"))
            .await?;
        v.get("server")
            .and_then(Server::from_json)
            .ok_or_else(|| self.bad_answer(&format!("show server {id}")))
    }

    fn bad_answer(&self, what: &str) -> ProviderError {
        ProviderError::ProviderFault {
            endpoint: self.endpoint().to_string(),
            message: format!("{what}: Nova's answer has no server"),
        }
    }

    /// One server by id, or `None` when Nova does not know it. (A server whose status reads
    /// DELETED is still listed until Nova finishes removing it, so it counts as present.)
    pub async fn try_get(&self, id: &str) -> Result<Option<Server>, ProviderError> {
        match self.get(id).await {
            Ok(s) => Ok(Some(s)),
            Err(ProviderError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Servers (detail), following Nova's pages; `query` filters (`name`, ...).
    pub async fn list_filtered(
        &self,
        query: &[(&str, &str)],
    ) -> Result<Vec<Server>, ProviderError> {
        let mut out: Vec<Server> = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            q.push(("limit", "1000"));
            if let Some(m) = &marker {
                q.push(("marker", m.as_str()));
            }
            let v: Value = self
                .idempotent("list servers", || async {
                    self.session
                        .get(COMPUTE, ["servers", "detail"])
                        .api_version(NOVA_MICROVERSION)
                        .query(&q)
                        .fetch()
                        .await
                })
                .await?;
            let page: Vec<Server> = v
                .get("servers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Server::from_json).collect())
                .unwrap_or_default();
            let more = v
                .get("servers_links")
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().any(|x| x.get("rel") == Some(&json!("next"))));
            marker = page.last().map(|s| s.id.clone());
            out.extend(page);
            if !more || marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// Every server of the project.
    pub async fn list(&self) -> Result<Vec<Server>, ProviderError> {
        self.list_filtered(&[]).await
    }

    /// The server carrying `command_id` in its metadata, looked up among servers named `name`
    /// (Nova filters by name server-side; metadata it cannot filter on).
    pub async fn find_by_command(
        &self,
        name: Option<&str>,
        command_id: &str,
    ) -> Result<Option<Server>, ProviderError> {
        let re = name.map(|n| format!("^{}$", regex_escape(n)));
        let q: Vec<(&str, &str)> = match &re {
            Some(r) => vec![("name", r.as_str())],
            None => vec![],
        };
        Ok(self
            .list_filtered(&q)
            .await?
            .into_iter()
            .find(|s| s.command_id() == Some(command_id) && s.status != "DELETED"))
    }

    /// Creates a server, or returns the one an earlier delivery of `command_id` created.
    /// Flavor, image and networks are checked first; nothing is created when one is missing.
    pub async fn create(
        &self,
        command_id: Option<&str>,
        spec: &ServerSpec,
    ) -> Result<Server, ProviderError> {
        if spec.name.trim().is_empty() {
            return Err(ProviderError::invalid("name", "must not be empty"));
        }
        if let Some(cid) = command_id {
            if let Some(s) = self.find_by_command(Some(&spec.name), cid).await? {
                tracing::info!(server = %s.id, command = cid, "create: server of this command exists");
                return Ok(s);
            }
        }
        let flavor = self.resolve_flavor(&spec.flavor).await?;
        let image = self.resolve_image(&spec.image).await?;
        let networks = if spec.networks.is_empty() {
            json!(if spec.auto_network { "auto" } else { "none" })
        } else {
            let all = self.networks().await?;
            let mut v = Vec::new();
            for n in &spec.networks {
                v.push(json!({"uuid": pick("network", n, all.clone())?.id}));
            }
            Value::Array(v)
        };
        let mut metadata = spec.metadata.clone();
        if let Some(cid) = command_id {
            metadata.insert(COMMAND_ID_KEY.into(), cid.into());
        }
        let mut server = json!({
            "name": spec.name,
            "flavorRef": flavor.id,
            "imageRef": image.id,
            "networks": networks,
            "metadata": metadata,
        });
        if let Some(k) = &spec.key_name {
            server["key_name"] = json!(k);
        }
        if let Some(u) = &spec.user_data {
            server["user_data"] = json!(b64(u.as_bytes()));
        }
        if let Some(az) = &spec.availability_zone {
            server["availability_zone"] = json!(az);
        }
        let body = json!({ "server": server });
        let what = format!("create server {:?}", spec.name);
        let mut attempt = 0u32;
        let v: Value = loop {
            attempt += 1;
            let r = self
                .bounded(&what, async {
                    self.session
                        .post(COMPUTE, ["servers"])
                        .api_version(NOVA_MICROVERSION)
                        .json(&body)
                        .send()
                        .await
                })
                .await;
            match r {
                Ok(resp) => {
                    break resp
                        .json()
                        .await
                        .map_err(|e| ProviderError::ProviderFault {
                            endpoint: self.endpoint().to_string(),
                            message: format!("{what}: unreadable answer: {e}"),
                        })?
                }
                // A server error (e.g. Nova's database busy) may or may not have created the
                // server: with a command id, look for it before asking again.
                Err(ProviderError::ProviderFault { .. }) if attempt < 3 && command_id.is_some() => {
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                    if let Some(cid) = command_id {
                        if let Some(s) = self.find_by_command(Some(&spec.name), cid).await? {
                            return Ok(s);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let id = v
            .pointer("/server/id")
            .and_then(Value::as_str)
            .ok_or_else(|| self.bad_answer("create server"))?;
        self.get(id).await
    }

    /// Deletes a server; `Ok(false)` when it was already gone. Waits until Nova no longer lists
    /// it (within `bound`). When Nova gives the delete up (the server is left with no task and
    /// not deleted, e.g. set to ERROR by a failure inside Nova), it is asked again, up to
    /// [`DELETE_REQUESTS`] requests in all.
    pub async fn delete(&self, id: &str, bound: Duration) -> Result<bool, ProviderError> {
        let deadline = Instant::now() + bound;
        let mut requests = 0;
        loop {
            requests += 1;
            let r = self
                .idempotent(&format!("delete server {id}"), || async {
                    self.session
                        .delete(COMPUTE, ["servers", id])
                        .api_version(NOVA_MICROVERSION)
                        .send()
                        .await
                })
                .await;
            match r {
                Ok(_) => {}
                // Gone before the first request: nothing was deleted; before a later one: the
                // earlier request did it after all.
                Err(ProviderError::NotFound { .. }) => return Ok(requests > 1),
                Err(e) => return Err(e),
            }
            match self.wait_deleted_until(id, deadline, bound).await? {
                None => return Ok(true),
                Some(s) if requests < DELETE_REQUESTS => {
                    tracing::warn!(
                        server = id,
                        status = %s.status,
                        fault = s.fault.as_deref().unwrap_or(""),
                        "Nova gave the delete up; asking again"
                    );
                }
                Some(s) => {
                    return Err(ProviderError::ProviderFault {
                        endpoint: self.endpoint().to_string(),
                        message: format!(
                        "Nova did not delete server {id} after {requests} requests (it is {}: {})",
                        s.status,
                        s.fault.as_deref().unwrap_or("Nova gave no fault message")
                    ),
                    })
                }
            }
        }
    }

    /// Sends a power action. `On`/`Off` are no-ops when the server is already there. Waits for
    /// the resulting state within `bound`.
    pub async fn power(
        &self,
        id: &str,
        action: PowerAction,
        bound: Duration,
    ) -> Result<Server, ProviderError> {
        let s = self.get(id).await?;
        let body = match action {
            PowerAction::On if s.status == "ACTIVE" => return Ok(s),
            PowerAction::Off | PowerAction::SoftShutdown if s.status == "SHUTOFF" => return Ok(s),
            PowerAction::On => json!({"os-start": null}),
            // Nova's stop is a graceful shutdown with a timeout, then power off.
            PowerAction::Off | PowerAction::SoftShutdown => json!({"os-stop": null}),
            PowerAction::Reset => json!({"reboot": {"type": "HARD"}}),
            PowerAction::Cycle if s.status == "SHUTOFF" => json!({"os-start": null}),
            PowerAction::Cycle => json!({"reboot": {"type": "HARD"}}),
        };
        let what = format!("{action:?} server {id}");
        let converges = matches!(
            action,
            PowerAction::On | PowerAction::Off | PowerAction::SoftShutdown
        );
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let r = self
                .bounded(&what, async {
                    self.session
                        .post(COMPUTE, ["servers", id, "action"])
                        .api_version(NOVA_MICROVERSION)
                        .json(&body)
                        .send()
                        .await
                })
                .await;
            match r {
                Ok(_) => break,
                // A server error (e.g. Nova's database busy): on and off converge, so after a
                // look at the server they are asked again; a reboot is not repeated.
                Err(ProviderError::ProviderFault { .. }) if converges && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(500) * attempt).await;
                    let now = self.get(id).await?;
                    if now.task_state.is_some()
                        || (action == PowerAction::On && now.status == "ACTIVE")
                        || (action != PowerAction::On && now.status == "SHUTOFF")
                    {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let target = match action {
            PowerAction::Off | PowerAction::SoftShutdown => "SHUTOFF",
            _ => "ACTIVE",
        };
        if matches!(action, PowerAction::Reset | PowerAction::Cycle) && s.status == "ACTIVE" {
            // A reboot passes through REBOOT/HARD_REBOOT; wait for the task to end.
            return self.wait_settled(id, target, bound).await;
        }
        self.wait_status(id, target, bound).await
    }

    /// Polls until the server has `status` (and no task), failing with its fault on ERROR.
    pub async fn wait_status(
        &self,
        id: &str,
        status: &str,
        bound: Duration,
    ) -> Result<Server, ProviderError> {
        self.wait_settled(id, status, bound).await
    }

    async fn wait_settled(
        &self,
        id: &str,
        status: &str,
        bound: Duration,
    ) -> Result<Server, ProviderError> {
        let deadline = Instant::now() + bound;
        let mut delay = Duration::from_millis(250);
        loop {
            let s = self.get(id).await?;
            if s.status == status && s.task_state.is_none() {
                return Ok(s);
            }
            if s.status == "ERROR" {
                return Err(ProviderError::ProviderFault {
                    endpoint: self.endpoint().to_string(),
                    message: format!(
                        "server {} ({}) went to ERROR: {}",
                        s.name,
                        s.id,
                        s.fault.as_deref().unwrap_or("Nova gave no fault message")
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::OpenStack,
                    endpoint: self.endpoint().to_string(),
                    operation: format!(
                        "waiting for server {id} to be {status} (it is {}{})",
                        s.status,
                        s.task_state
                            .as_deref()
                            .map(|t| format!(", task {t}"))
                            .unwrap_or_default()
                    ),
                    after: bound,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Polls until Nova no longer knows the server.
    pub async fn wait_deleted(&self, id: &str, bound: Duration) -> Result<(), ProviderError> {
        let deadline = Instant::now() + bound;
        let mut delay = Duration::from_millis(250);
        loop {
            let Some(s) = self.try_get(id).await? else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::OpenStack,
                    endpoint: self.endpoint().to_string(),
                    operation: format!(
                        "waiting for server {id} to be deleted (it is {})",
                        s.status
                    ),
                    after: bound,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// After a delete request: polls until Nova no longer knows the server (`None`), or until
    /// it gave the delete up (`Some(server)`: seen deleting, then no task left and not
    /// deleted), until `deadline`.
    async fn wait_deleted_until(
        &self,
        id: &str,
        deadline: Instant,
        bound: Duration,
    ) -> Result<Option<Server>, ProviderError> {
        let mut delay = Duration::from_millis(250);
        // Only a server seen deleting can be seen giving the delete up (clouds that hide the
        // task state are waited for, as before).
        let mut seen_deleting = false;
        loop {
            let Some(s) = self.try_get(id).await? else {
                return Ok(None);
            };
            if s.task_state.as_deref() == Some("deleting") {
                seen_deleting = true;
            } else if seen_deleting
                && s.task_state.is_none()
                && !matches!(s.status.as_str(), "DELETED" | "SOFT_DELETED")
            {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Timeout {
                    component: pcg_provider::Component::OpenStack,
                    endpoint: self.endpoint().to_string(),
                    operation: format!(
                        "waiting for server {id} to be deleted (it is {})",
                        s.status
                    ),
                    after: bound,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

fn names(v: &Value, key: &str) -> Vec<Named> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some(Named {
                        id: x.get("id")?.as_str()?.to_string(),
                        name: x
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        vcpus: None,
                        ram_mib: None,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn list_names(all: &[Named]) -> String {
    if all.is_empty() {
        return "none".into();
    }
    all.iter()
        .map(|n| format!("{} ({})", n.name, n.id))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The entry whose id or name is `want`; an error naming what exists otherwise (or when the name
/// is ambiguous).
fn pick(kind: &str, want: &str, all: Vec<Named>) -> Result<Named, ProviderError> {
    if let Some(n) = all.iter().find(|n| n.id == want) {
        return Ok(n.clone());
    }
    let by_name: Vec<&Named> = all.iter().filter(|n| n.name == want).collect();
    match by_name.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ProviderError::invalid(
            kind,
            format!(
                "no {kind} is named or has the id {want:?}; the {kind}s are: {}",
                list_names(&all)
            ),
        )),
        many => Err(ProviderError::invalid(
            kind,
            format!(
                "{} {kind}s are named {want:?} ({}); give the id",
                many.len(),
                many.iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_and_regex_escape() {
        assert_eq!(b64(b"#cloud-config\n"), "I2Nsb3VkLWNvbmZpZwo=");
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(regex_escape("web.1"), "web\\.1");
    }

    #[test]
    fn lookups_name_what_exists() {
        let all = vec![Named {
            id: "f1".into(),
            name: "pcg.tiny".into(),
            vcpus: None,
            ram_mib: None,
        }];
        assert_eq!(pick("flavor", "f1", all.clone()).unwrap().name, "pcg.tiny");
        let e = pick("flavor", "m1.huge", all).unwrap_err().to_string();
        assert!(e.contains("m1.huge") && e.contains("pcg.tiny"), "{e}");
    }

    #[test]
    fn servers_parse_leniently() {
        let s = Server::from_json(&json!({"id": "x", "name": "n", "status": "ERROR",
            "fault": {"message": "No valid host", "code": 500}, "OS-EXT-STS:task_state": null,
            "metadata": {"pcg_command_id": "c1"}, "flavor": {"id": "f"}, "unknown": [1, 2]}))
        .unwrap();
        assert_eq!(s.fault.as_deref(), Some("No valid host"));
        assert_eq!(s.command_id(), Some("c1"));
        assert_eq!(s.power(), PowerState::Unknown);
    }
}
