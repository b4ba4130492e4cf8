//! Durable state of pcg-saas: on sled, tenants, API keys, pairing tokens, gateways, events, and
//! declared machines with the gateways' health history ([`machines`]); commands (with a
//! per-gateway pending queue) in an append-only log beside it (`cmdlog`).
//!
//! Secrets (API keys, token secrets) are stored as SHA-256 hashes: they are 256-bit random values,
//! so a fast hash is enough and a slow password hash would only cost latency. Anything a peer is
//! told has been stored (a submitted command, a stored result) is flushed first.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod cmdlog;
pub mod feed;
pub mod machines;
pub mod ops;
pub use feed::{Feed, Topic};
pub use machines::{EventFilter, MachineRecord};
pub use ops::{Committed, GatewayPatch, Op, Outcome, RedeemRefusal};

/// Replaces every value under a secret-named key with `"<redacted>"`, at any depth (the one
/// definition of a secret-named key is [`pcg_proto::sealed::is_secret_key`]).
pub use pcg_proto::sealed::redact_secrets;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

/// A new random id with a readable prefix, e.g. `gw_3f2a...`.
pub fn new_id(prefix: &str, bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    format!("{prefix}_{}", hex::encode(raw))
}

/// A new tenant's record.
pub fn new_tenant(name: &str) -> Tenant {
    Tenant {
        id: new_id("tn", 6),
        name: name.to_string(),
        created_ms: now_ms(),
    }
}

/// A new API key: its record (the secret's hash) and the full key string (shown once, never
/// stored).
pub fn new_api_key(tenant_id: Option<&str>, name: &str) -> (ApiKey, String) {
    let id = new_id("key", 6);
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let full = format!("pcgk_{id}.{secret}");
    let k = ApiKey {
        id,
        tenant_id: tenant_id.map(str::to_string),
        name: name.to_string(),
        secret_hash: hash(&secret),
        created_ms: now_ms(),
        revoked: false,
    };
    (k, full)
}

/// A new pairing token valid for `ttl_secs`: its record and its one-time secret.
pub fn new_token(tenant_id: &str, name: &str, ttl_secs: u64) -> (TokenRecord, String) {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let now = now_ms();
    let t = TokenRecord {
        id: new_id("tok", 6),
        tenant_id: tenant_id.to_string(),
        name: name.to_string(),
        secret_hash: hash(&secret),
        created_ms: now,
        expires_ms: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX / 2000) * 1000),
        state: TokenState::Active,
        used_ms: None,
        gateway_id: None,
    };
    (t, secret)
}

/// The SHA-256 of a secret, hex (how secrets are stored and compared).
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time comparison of two equal-length hex strings.
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Cloned for every waiter of a group commit's flush.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage failure: {0}; check the data directory's disk space and permissions")]
    Sled(#[from] sled::Error),
    #[error("cannot {action} the command log at {}: {source}; check the data directory's disk space and permissions", path.display())]
    Log {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::sync::Arc<std::io::Error>,
    },
    #[error("the command log: {0}")]
    CommandLog(#[from] pcg_durable::seglog::LogError),
    #[error("corrupt record in tree {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
    #[error("the store's flusher thread has stopped (is pcg-saas shutting down?)")]
    Stopped,
    /// A replica's feed takes its numbers from the cluster's log only.
    #[error("this replica numbers its feed by the cluster's log, and this record is not an operation of the log; replicas do not keep it in this version of pcg-saas")]
    OutsideTheLog,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    /// `None` for the operator key, which administers tenants.
    pub tenant_id: Option<String>,
    pub name: String,
    pub secret_hash: String,
    pub created_ms: i64,
    pub revoked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Active,
    Used,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub secret_hash: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub state: TokenState,
    pub used_ms: Option<i64>,
    pub gateway_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gateway {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub hostname: String,
    pub paired_ms: i64,
    pub token_id: String,
    pub cert_serial: String,
    pub cert_not_after_ms: i64,
    pub revoked_ms: Option<i64>,
    pub version: Option<String>,
    pub command_kinds: Vec<String>,
    pub last_connected_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    /// Hex of the public key (SEC1 point) of its current certificate: payload secrets are
    /// sealed to it. Recorded at pairing, renewal and every tunnel.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// What an `Idempotency-Key` of a tenant stands for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub command_id: String,
    /// Keyed digest of the request it was first used with.
    pub fingerprint: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Stored, not yet handed to a tunnel.
    Queued,
    /// Handed to the gateway's tunnel at least once.
    Delivered,
    /// The gateway has journaled it and is executing it.
    Received,
    Succeeded,
    /// Ended with an error (`result.error_class` says which; `interrupted`: the gateway was
    /// stopped while it ran, and it is not run again).
    Failed,
    /// Ended by a cancel (`POST /v1/commands/{id}/cancel`): at once when it had never been
    /// handed to a tunnel, else when the gateway confirmed.
    Cancelled,
    /// Its deadline passed before it ended.
    TimedOut,
}

impl CommandState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded
                | CommandState::Failed
                | CommandState::Cancelled
                | CommandState::TimedOut
        )
    }

    /// The final state a result puts a command in.
    pub fn of_result(r: &CommandResult) -> Self {
        match (r.ok, r.error_class.as_str()) {
            (true, _) => CommandState::Succeeded,
            (false, "cancelled") => CommandState::Cancelled,
            (false, "timed_out") => CommandState::TimedOut,
            (false, _) => CommandState::Failed,
        }
    }

    /// The state's name in the API (`queued`, ..., `timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Delivered => "delivered",
            CommandState::Received => "received",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Cancelled => "cancelled",
            CommandState::TimedOut => "timed_out",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommandResult {
    pub ok: bool,
    pub output: serde_json::Value,
    pub error_class: String,
    pub error_message: String,
    pub started_ms: i64,
    pub finished_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub tenant_id: String,
    pub gateway_id: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub state: CommandState,
    pub submitted_ms: i64,
    pub deliveries: u32,
    pub received_ms: Option<i64>,
    pub completed_ms: Option<i64>,
    pub result: Option<CommandResult>,
    /// Its place in its gateway's queue: gateway id, 0, and the number of the operation that
    /// submitted it (also its `commands` entry in the tenant's feed).
    pub pending_key: Vec<u8>,
    /// The number of the operation that ended it (its `results` entry in the tenant's feed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_seq: Option<u64>,
    /// When it must have ended (Unix ms), if the client gave a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// A cancel asked for and not yet confirmed by the gateway (stored, so it survives a
    /// restart and is sent again on the gateway's next tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelRequest>,
    /// The latest progress the gateway reported (memory only).
    #[serde(skip)]
    pub progress: Option<Progress>,
    /// Whether it may have reached its gateway: handed to a tunnel in this process, or loaded
    /// at start (deliveries before a restart are not recorded). Memory only.
    #[serde(skip)]
    pub handed_out: bool,
}

impl Command {
    /// A command just submitted: queued, never delivered, no deadline, no cancel.
    pub fn queued(
        id: String,
        tenant_id: &str,
        gateway_id: &str,
        kind: String,
        payload: serde_json::Value,
        submitted_ms: i64,
    ) -> Command {
        Command {
            id,
            tenant_id: tenant_id.to_string(),
            gateway_id: gateway_id.to_string(),
            kind,
            payload,
            state: CommandState::Queued,
            submitted_ms,
            deliveries: 0,
            received_ms: None,
            completed_ms: None,
            result: None,
            pending_key: Vec::new(),
            ended_seq: None,
            deadline_ms: None,
            cancel: None,
            progress: None,
            handed_out: false,
        }
    }
}

/// A cancel a client asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    pub reason: String,
    pub requested_ms: i64,
}

/// Progress of a running command, as its gateway last reported it.
#[derive(Debug, Clone)]
pub struct Progress {
    pub percent: Option<u8>,
    pub message: String,
    /// The gateway's time of the report (Unix ms).
    pub at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_ms: i64,
    pub tenant_id: Option<String>,
    pub gateway_id: Option<String>,
    pub kind: String,
    pub message: String,
    /// The declared machine it is about (`machine.*` events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Marked as an alert (`machine.alert`, `machine.heal_budget_exhausted`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alert: bool,
    /// Structured facts (a drift's before and after, a heal's action and result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// The id the gateway gave a `machine.*` event (recorded once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
}

/// A support bundle a gateway uploaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleRecord {
    pub id: String,
    pub tenant_id: String,
    pub gateway_id: String,
    pub size: u64,
    pub sha256: String,
    pub created_ms: i64,
}

/// Why a pairing token cannot be redeemed. Messages are shown to the operator of the gateway.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("this pairing token is not known to this SaaS; check you copied the whole token, or ask your tenant admin for a new one")]
    Unknown,
    #[error("this pairing token was already used{}; a token pairs one gateway once; ask your tenant admin for a new token", .0.as_deref().map(|g| format!(" (by gateway {g})")).unwrap_or_default())]
    Used(Option<String>),
    #[error("this pairing token was revoked by a tenant admin; ask for a new token")]
    Revoked,
    #[error("this pairing token expired {0} seconds ago; ask your tenant admin for a new token")]
    Expired(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RedeemRefusal> for RedeemError {
    fn from(r: RedeemRefusal) -> Self {
        match r {
            RedeemRefusal::Unknown => RedeemError::Unknown,
            RedeemRefusal::Used(g) => RedeemError::Used(g),
            RedeemRefusal::Revoked => RedeemError::Revoked,
            RedeemRefusal::Expired(s) => RedeemError::Expired(s),
        }
    }
}

/// Filters for listing commands.
#[derive(Debug, Default, Clone)]
pub struct CommandFilter {
    pub gateway_id: Option<String>,
    pub state: Option<CommandState>,
    pub kind: Option<String>,
    pub limit: usize,
}

pub struct Store {
    db: sled::Db,
    commit: pcg_durable::GroupCommit<StoreError>,
    tenants: sled::Tree,
    api_keys: sled::Tree,
    tokens: sled::Tree,
    gateways: sled::Tree,
    /// Commands: their records in an append-only log, their indexes in memory.
    commands: std::sync::Arc<cmdlog::CmdLog>,
    events: sled::Tree,
    idempotency: sled::Tree,
    bundles: sled::Tree,
    bundle_data: sled::Tree,
    events_by_tenant: sled::Tree,
    /// Declared machines by id, their index by gateway, the ids of recorded `machine.*` events,
    /// and the gateways' health history (see [`machines`]).
    machines: sled::Tree,
    machines_by_gateway: sled::Tree,
    machine_event_ids: sled::Tree,
    health: sled::Tree,
    /// The tenants' feed and the sequence numbers of everything it points at.
    pub feed: std::sync::Arc<Feed>,
    /// A replica's last operation applied (see [`Store::set_applied`]).
    applied: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// API keys read so far (revocations update it), so a request is not a store read.
    key_cache: std::sync::RwLock<std::collections::HashMap<String, ApiKey>>,
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                tree: name,
                message: e.to_string(),
            }),
    }
}

fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], v: &T) -> Result<(), StoreError> {
    tree.insert(key, serde_json::to_vec(v).expect("records serialise"))?;
    Ok(())
}

fn all<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .values()
        .map(|v| {
            let v = v?;
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                tree: name,
                message: e.to_string(),
            })
        })
        .collect()
}

/// sled's key of the last operation of the cluster's log a replica's store holds.
const APPLIED_KEY: &[u8] = b"__pcg_applied_seq";

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(path).open()?;
        let commands = std::sync::Arc::new(Self::open_commands(&db, path)?);
        let synced = commands.clone();
        let applied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        Ok(Store {
            tenants: db.open_tree("tenants")?,
            api_keys: db.open_tree("api_keys")?,
            tokens: db.open_tree("tokens")?,
            gateways: db.open_tree("gateways")?,
            commands,
            events: db.open_tree("events")?,
            idempotency: db.open_tree("idempotency")?,
            bundles: db.open_tree("bundles")?,
            bundle_data: db.open_tree("bundle_data")?,
            events_by_tenant: db.open_tree("events_by_tenant")?,
            machines: db.open_tree("machines")?,
            machines_by_gateway: db.open_tree("machines_by_gateway")?,
            machine_event_ids: db.open_tree("machine_event_ids")?,
            health: db.open_tree("health")?,
            key_cache: Default::default(),
            feed: std::sync::Arc::new(Feed::open(&db)?),
            commit: pcg_durable::GroupCommit::new(
                Self::flusher(db.clone(), synced, applied.clone()),
                || StoreError::Stopped,
            ),
            applied,
            db,
        })
    }

    /// One flush of the store: sled's, then the command log's (a command's record never
    /// reaches the disk before what it depends on in sled, its idempotency key's claim); then,
    /// on a replica, the number of the last operation of the cluster's log applied before the
    /// flush began is written (made durable by the next flush: never ahead of what it counts).
    fn flusher(
        db: sled::Db,
        log: std::sync::Arc<cmdlog::CmdLog>,
        applied: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> impl FnMut() -> Result<(), StoreError> + Send + 'static {
        let mut recorded = 0;
        move || {
            let through = applied.load(std::sync::atomic::Ordering::Acquire);
            db.flush()?;
            log.sync()?;
            if through > recorded {
                db.insert(APPLIED_KEY, &through.to_be_bytes())?;
                recorded = through;
            }
            Ok(())
        }
    }

    /// A replica applied operation `seq` of the cluster's log (its writes are made): the
    /// number is recorded by the flushes that follow ([`Store::applied_seq`] after a restart).
    pub fn set_applied(&self, seq: u64) {
        self.applied
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
    }

    /// The last operation of the cluster's log this store holds, as recorded (0: none).
    pub fn applied_seq(&self) -> u64 {
        self.db
            .get(APPLIED_KEY)
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Opens the command log (`cmdlog` in the store's directory). A store written by a version
    /// that kept commands in sled (trees `commands`, `pending`, `cmd_by_tenant`) has them
    /// copied into the log, synced, and only then the trees dropped; commands an older version
    /// wrote into the trees since are added the same way.
    fn open_commands(db: &sled::Db, path: &std::path::Path) -> Result<cmdlog::CmdLog, StoreError> {
        // A copy an earlier version of this migration left unfinished (it copied into
        // `cmdlog.new`, then renamed it): the trees still hold everything.
        let new = path.join("cmdlog.new");
        if new.exists() {
            std::fs::remove_dir_all(&new).map_err(|source| StoreError::Log {
                action: "remove the unfinished copy of",
                path: new.clone(),
                source: source.into(),
            })?;
        }
        let log = cmdlog::CmdLog::open(&path.join("cmdlog"))?;
        let old = db.open_tree("commands")?;
        // What the log lacks is added, and the trees are dropped only once the log is synced:
        // a stop at any point leaves the trees to copy from again at the next start.
        let mut added = 0;
        for v in old.iter().values() {
            let c: Command = serde_json::from_slice(&v?).map_err(|e| StoreError::Corrupt {
                tree: "commands",
                message: e.to_string(),
            })?;
            if !log.contains(&c.id) {
                log.put(&c)?;
                added += 1;
            }
        }
        log.sync()?;
        drop(old);
        let names = ["commands", "pending", "cmd_by_tenant"];
        let mut dropped = false;
        for name in names {
            let held = db
                .tree_names()
                .iter()
                .any(|t| t.as_ref() == name.as_bytes());
            if held && !db.open_tree(name)?.is_empty() {
                dropped |= db.drop_tree(name)?;
            }
        }
        if dropped {
            tracing::info!(
                commands = log.count(),
                added,
                "commands moved from the sled trees to the command log"
            );
            db.flush()?;
        }
        Ok(log)
    }

    /// Builds the indexes an older store lacks (events by tenant).
    pub fn migrate(&self) -> Result<(), StoreError> {
        if self.events_by_tenant.is_empty() && !self.events.is_empty() {
            for v in self.events.iter().values() {
                if let Ok(e) = serde_json::from_slice::<Event>(&v?) {
                    if let Some(t) = &e.tenant_id {
                        self.events_by_tenant
                            .insert(Self::event_index_key(t, e.seq), &[])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes, flushes and removes a probe record: whether the store takes durable writes.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.db.insert(b"__probe", &now_ms().to_be_bytes())?;
        self.flush().await?;
        self.db.remove(b"__probe")?;
        Ok(())
    }

    /// Synchronous disk flushes done so far (group commit: each serves every waiter queued).
    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // Whatever the feed numbered and finished writing before this flush is durable after it.
        let horizon = self.feed.visible();
        self.commit.flush().await?;
        self.feed.made_durable(horizon);
        Ok(())
    }

    // --- tenants -------------------------------------------------------------------------

    pub fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let t = new_tenant(name);
        self.commit(&Op::TenantCreated { tenant: t.clone() })?;
        Ok(t)
    }

    pub fn tenant(&self, id: &str) -> Result<Option<Tenant>, StoreError> {
        get(&self.tenants, "tenants", id.as_bytes())
    }

    pub fn tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        all(&self.tenants, "tenants")
    }

    // --- API keys ------------------------------------------------------------------------

    /// Checks a presented key string; `None` for unknown, revoked or wrong keys.
    pub fn authenticate(&self, presented: &str) -> Result<Option<ApiKey>, StoreError> {
        let Some(rest) = presented.strip_prefix("pcgk_") else {
            return Ok(None);
        };
        let Some((id, secret)) = rest.split_once('.') else {
            return Ok(None);
        };
        let cached = self
            .key_cache
            .read()
            .expect("key cache lock is never poisoned")
            .get(id)
            .cloned();
        let k = match cached {
            Some(k) => k,
            None => {
                let Some(k) = get::<ApiKey>(&self.api_keys, "api_keys", id.as_bytes())? else {
                    return Ok(None);
                };
                self.key_cache
                    .write()
                    .expect("key cache lock is never poisoned")
                    .insert(id.to_string(), k.clone());
                k
            }
        };
        Ok((!k.revoked && ct_eq(&k.secret_hash, &hash(secret))).then_some(k))
    }

    pub fn api_keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
        Ok(all::<ApiKey>(&self.api_keys, "api_keys")?
            .into_iter()
            .filter(|k| tenant_id.is_none() || k.tenant_id.as_deref() == tenant_id)
            .collect())
    }

    pub fn api_key(&self, id: &str) -> Result<Option<ApiKey>, StoreError> {
        get(&self.api_keys, "api_keys", id.as_bytes())
    }

    // --- pairing tokens --------------------------------------------------------------------

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        get(&self.tokens, "tokens", id.as_bytes())
    }

    pub fn tokens(&self, tenant_id: &str) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(all::<TokenRecord>(&self.tokens, "tokens")?
            .into_iter()
            .filter(|t| t.tenant_id == tenant_id)
            .collect())
    }

    /// Checks a token without consuming it.
    pub fn check_token(&self, id: &str, secret: &str) -> Result<TokenRecord, RedeemError> {
        let t = self.token(id)?.ok_or(RedeemError::Unknown)?;
        if !ct_eq(&t.secret_hash, &hash(secret)) {
            return Err(RedeemError::Unknown);
        }
        match t.state {
            TokenState::Used => return Err(RedeemError::Used(t.gateway_id.clone())),
            TokenState::Revoked => return Err(RedeemError::Revoked),
            TokenState::Active => {}
        }
        let now = now_ms();
        if now >= t.expires_ms {
            return Err(RedeemError::Expired((now - t.expires_ms) / 1000));
        }
        Ok(t)
    }

    // --- gateways --------------------------------------------------------------------------

    pub fn gateway(&self, id: &str) -> Result<Option<Gateway>, StoreError> {
        get(&self.gateways, "gateways", id.as_bytes())
    }

    pub fn gateways(&self, tenant_id: Option<&str>) -> Result<Vec<Gateway>, StoreError> {
        Ok(all::<Gateway>(&self.gateways, "gateways")?
            .into_iter()
            .filter(|g| tenant_id.is_none() || Some(g.tenant_id.as_str()) == tenant_id)
            .collect())
    }

    // --- commands --------------------------------------------------------------------------

    pub fn command(&self, id: &str) -> Result<Option<Command>, StoreError> {
        self.commands.get(id)
    }

    /// Every command still waiting for a result (at start, to rebuild the in-memory table).
    pub fn all_pending(&self) -> Result<Vec<Command>, StoreError> {
        self.commands.pending()
    }

    /// Ids of a tenant's commands, newest first.
    pub fn tenant_command_ids(&self, tenant_id: &str) -> impl Iterator<Item = String> + '_ {
        self.commands.tenant_ids(tenant_id)
    }

    /// Deletes finished commands submitted before `cutoff_ms`; returns their ids.
    pub fn prune_commands(&self, cutoff_ms: i64) -> Result<Vec<String>, StoreError> {
        let tenants: Vec<String> = self.tenants()?.into_iter().map(|t| t.id).collect();
        self.commands.prune(&tenants, cutoff_ms)
    }

    /// Files of the command log (its segments).
    pub fn command_segments(&self) -> usize {
        self.commands.segments()
    }

    // --- idempotency keys ------------------------------------------------------------------

    fn idem_key(tenant_id: &str, key: &str) -> Vec<u8> {
        let mut k = tenant_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        k
    }

    pub fn idempotency_key(
        &self,
        tenant_id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        get(
            &self.idempotency,
            "idempotency",
            &Self::idem_key(tenant_id, key),
        )
    }

    /// Forgets idempotency keys older than `window_ms`; returns how many.
    pub fn prune_idempotency(&self, window_ms: i64) -> Result<usize, StoreError> {
        let cutoff = now_ms() - window_ms;
        let mut n = 0;
        for kv in self.idempotency.iter() {
            let (k, v) = kv?;
            if let Ok(r) = serde_json::from_slice::<IdempotencyRecord>(&v) {
                if r.created_ms < cutoff {
                    self.idempotency.remove(k)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    // --- support bundles -----------------------------------------------------------------

    /// Stores a complete bundle, keeping at most `keep` per gateway (the oldest go).
    pub fn put_bundle(
        &self,
        rec: &BundleRecord,
        data: &[u8],
        keep: usize,
    ) -> Result<(), StoreError> {
        self.bundle_data.insert(rec.id.as_bytes(), data)?;
        put(&self.bundles, rec.id.as_bytes(), rec)?;
        let mut mine = self.bundles_of(&rec.gateway_id)?;
        if mine.len() > keep {
            mine.sort_by_key(|b| std::cmp::Reverse(b.created_ms));
            for old in &mine[keep..] {
                self.bundles.remove(old.id.as_bytes())?;
                self.bundle_data.remove(old.id.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Bundles of a gateway, newest first.
    pub fn bundles_of(&self, gateway_id: &str) -> Result<Vec<BundleRecord>, StoreError> {
        let mut out: Vec<BundleRecord> = all::<BundleRecord>(&self.bundles, "bundles")?
            .into_iter()
            .filter(|b| b.gateway_id == gateway_id)
            .collect();
        out.sort_by_key(|b| std::cmp::Reverse(b.created_ms));
        Ok(out)
    }

    pub fn bundle(&self, id: &str) -> Result<Option<(BundleRecord, Vec<u8>)>, StoreError> {
        let Some(rec) = get::<BundleRecord>(&self.bundles, "bundles", id.as_bytes())? else {
            return Ok(None);
        };
        Ok(self
            .bundle_data
            .get(id.as_bytes())?
            .map(|d| (rec, d.to_vec())))
    }

    // --- events ----------------------------------------------------------------------------

    pub fn event(
        &self,
        tenant_id: Option<&str>,
        gateway_id: Option<&str>,
        kind: &str,
        message: String,
    ) -> Result<(), StoreError> {
        let event = ops::event_of(tenant_id, gateway_id, kind, message, now_ms());
        self.commit(&Op::Event { event }).map(|_| ())
    }

    /// Writes an event numbered from the feed; returns its number.
    fn put_event(&self, e: Event) -> Result<u64, StoreError> {
        let ticket = self.feed.ticket()?;
        self.put_event_at(ticket.seq, e)?;
        Ok(ticket.seq)
    }

    /// Writes an event as number `seq`.
    fn put_event_at(&self, seq: u64, mut e: Event) -> Result<(), StoreError> {
        e.seq = seq;
        tracing::info!(kind = %e.kind, tenant = ?e.tenant_id, gateway = ?e.gateway_id, machine = ?e.machine_id, alert = e.alert, "{}", e.message);
        put(&self.events, &e.seq.to_be_bytes(), &e)?;
        if let Some(t) = &e.tenant_id {
            self.events_by_tenant
                .insert(Self::event_index_key(t, e.seq), &[])?;
            self.feed.record(t, e.seq, Topic::Events, e.at_ms, &[])?;
        }
        Ok(())
    }

    /// One event by its sequence number.
    pub fn event_by_seq(&self, seq: u64) -> Result<Option<Event>, StoreError> {
        get(&self.events, "events", &seq.to_be_bytes())
    }

    /// Deletes feed entries older than `cutoff_ms`; returns how many.
    pub fn prune_feed(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        // Marked first: a subscriber resuming from before them is told of the gap.
        for (tenant, seq) in self.commands.feed_older_than(cutoff_ms) {
            self.feed.mark_pruned(&tenant, seq)?;
        }
        let n = self.commands.prune_feed(cutoff_ms);
        Ok(n + self.feed.prune(cutoff_ms)?)
    }

    /// `tenant_id`'s feed entries after `after` up to `upto`, oldest first, at most `limit`: those
    /// of events and health reports (sled's feed tree; and commands' entries written by versions
    /// before the command log) merged with those of commands (the command log's memory). None
    /// at or below what retention removed: after a restart the command log's memory holds its
    /// commands' entries again until the first retention pass.
    pub fn feed_read(
        &self,
        tenant_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<feed::Entry>, StoreError> {
        let after = after.max(self.feed.pruned_through(tenant_id)?);
        let mut entries = self.feed.read(tenant_id, after, upto, limit)?;
        let commands = self.commands.feed_read(tenant_id, after, upto, limit);
        if !commands.is_empty() {
            entries.extend(commands);
            entries.sort_by_key(|e| e.seq);
            // A command queued before its store moved to the command log has its entry in
            // both: a number is one operation's.
            entries.dedup_by_key(|e| e.seq);
            entries.truncate(limit);
        }
        Ok(entries)
    }

    fn event_index_key(tenant_id: &str, seq: u64) -> Vec<u8> {
        let mut k = tenant_id.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// Deletes events older than `cutoff_ms`; returns how many.
    pub fn prune_events(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.events.iter() {
            let (k, v) = kv?;
            let Ok(e) = serde_json::from_slice::<Event>(&v) else {
                continue;
            };
            if e.at_ms >= cutoff_ms {
                break; // sequence order is time order
            }
            self.events.remove(&k)?;
            if let Some(t) = &e.tenant_id {
                self.events_by_tenant
                    .remove(Self::event_index_key(t, e.seq))?;
            }
            if let Some(id) = &e.source_id {
                self.machine_event_ids.remove(id.as_bytes())?;
            }
            n += 1;
        }
        Ok(n)
    }

    pub fn events(
        &self,
        tenant_id: Option<&str>,
        since: Option<u64>,
        gateway_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let f = EventFilter {
            gateway_id: gateway_id.map(str::to_string),
            ..EventFilter::default()
        };
        self.events_where(tenant_id, since, &f, limit)
    }

    /// Events after `since` that pass `f`, oldest first.
    pub fn events_where(
        &self,
        tenant_id: Option<&str>,
        since: Option<u64>,
        f: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        let start = since.map_or(0, |s| s.saturating_add(1));
        let keep = |e: &Event| f.keeps(e);
        if let Some(t) = tenant_id {
            // The tenant's own events through its index, not a scan of everybody's.
            let mut prefix = t.as_bytes().to_vec();
            prefix.push(0);
            let from = Self::event_index_key(t, start);
            for k in self.events_by_tenant.range(from..).keys() {
                let k = k?;
                if !k.starts_with(&prefix) {
                    break;
                }
                let Some(e) = get::<Event>(&self.events, "events", &k[prefix.len()..])? else {
                    continue;
                };
                if keep(&e) {
                    out.push(e);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            return Ok(out);
        }
        for v in self.events.range(start.to_be_bytes()..).values() {
            let v = v?;
            let e: Event = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                tree: "events",
                message: e.to_string(),
            })?;
            if tenant_id.is_some() && e.tenant_id.as_deref() != tenant_id {
                continue;
            }
            if !keep(&e) {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}
