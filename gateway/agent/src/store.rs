//! The gateway's durable state on sled: its identity (certificate, CA, broker endpoints, and the
//! private key sealed with the secret key file), the command journal and the result outbox,
//! provider endpoints enrolled by name (BMCs in `bmcs`; vCenters and OpenStack clouds in
//! `endpoints`, credentials sealed like the private key), and the declared machines of the
//! watch loop with its action journal and event outbox ([`machines`]).
//!
//! The journal is what makes commands take effect exactly once: an id is written (and synced)
//! before the gateway acts on it, its result is written (and synced) before it is sent, and an
//! id that is already known is never executed again. The outbox is the done entries the broker
//! has not acknowledged. The journal is an append-only log of its own (`journal/` beside the
//! sled database: [`journal`]), indexed in memory: the entries still running and the outbox are
//! known without a read, an entry costs one append, and acknowledgements are gathered in memory
//! and appended as one batch at the next flush, pruning or close (an acknowledgement lost in a
//! crash only sends its result once more, which the broker acknowledges again). Done entries
//! are kept for `journal_retention_hours` after their acknowledgement so that a late
//! redelivery still finds them; pruning forgets the entries of the oldest batches, and the
//! log's old segments go once nothing in them is kept. A store written by an earlier version,
//! which kept the journal in sled (trees `journal`, `acked`, `acks`, `outbox`), has it moved
//! into the log at open.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::aead;
use serde::{Deserialize, Serialize};

mod journal;
pub mod machines;

pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("gateway store in {path}: {source}; check disk space and permissions of the data directory (is another pcg-gateway running on it?)")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the gateway store {path} is in use by a running pcg-gateway whose admin socket does not answer (is it still starting? try again in a moment)")]
    InUse { path: PathBuf },
    #[error("secret key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("corrupt record {what} in the gateway store: {message}")]
    Corrupt { what: String, message: String },
    #[error("the gateway's command journal: {0}")]
    Journal(#[from] pcg_durable::seglog::LogError),
    #[error("the gateway store's flusher thread has stopped (is pcg-gateway shutting down?)")]
    Stopped,
}

/// Who this gateway is, as issued at pairing.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub tenant_id: String,
    pub gateway_id: String,
    pub api_url: String,
    pub broker_endpoints: Vec<String>,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Private key (PEM), sealed with AES-256-GCM under the secret key file; base64.
    pub key_sealed: String,
    pub cert_not_after_ms: i64,
    /// When this gateway received its certificate; renewal is due two thirds of the way from
    /// here to `cert_not_after_ms` (the certificate's own not-before is backdated for clock skew).
    #[serde(default)]
    pub cert_received_ms: i64,
    pub paired_ms: i64,
    pub token_id: String,
    /// Set when the SaaS said this identity is revoked.
    #[serde(default)]
    pub revoked: Option<String>,
    /// The private keys of this identity's earlier certificates (sealed like `key_sealed`, newest
    /// first, at most two): secrets the SaaS sealed to an earlier key still open after renewal.
    #[serde(default)]
    pub previous_keys_sealed: Vec<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("tenant_id", &self.tenant_id)
            .field("gateway_id", &self.gateway_id)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Keeps the current key as a previous one (before a renewal replaces it).
    pub fn retire_key(&mut self) {
        self.previous_keys_sealed.insert(0, self.key_sealed.clone());
        self.previous_keys_sealed.truncate(2);
    }

    /// When the certificate should be renewed: two thirds into its lifetime.
    pub fn renew_at_ms(&self) -> i64 {
        self.cert_received_ms + (self.cert_not_after_ms - self.cert_received_ms) * 2 / 3
    }
}

/// A BMC enrolled with `baremetal.enrol`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BmcRecord {
    pub name: String,
    /// `ipmi` or `redfish`.
    pub protocol: String,
    /// The endpoint as JSON (address, user, password, TLS trust), sealed like the private key.
    pub endpoint_sealed: String,
    /// Capability profile recorded at enrolment.
    pub capabilities: serde_json::Value,
    pub enrolled_ms: i64,
}

/// A provider endpoint enrolled by name (`vsphere.enrol`, `openstack.enrol`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The provider namespace: `vsphere`, `openstack`.
    pub provider: String,
    pub name: String,
    /// The endpoint as JSON (address, user, password or secret, TLS trust), sealed like the
    /// private key.
    pub endpoint_sealed: String,
    /// What enrolment learned about it (no secrets).
    pub info: serde_json::Value,
    pub enrolled_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredResult {
    pub ok: bool,
    pub output: serde_json::Value,
    pub error_class: String,
    pub error_message: String,
    pub started_ms: i64,
    pub finished_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    Running,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub state: EntryState,
    pub received_ms: i64,
    pub result: Option<StoredResult>,
    /// When the broker acknowledged the result, in a journal written by an earlier version
    /// (now kept in a small record of its own: see [`Store::ack`]).
    pub acked_ms: Option<i64>,
    /// When the command must have ended (Unix ms, the SaaS's clock), if it has a deadline: kept
    /// so that a resumed execution still honours it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

pub struct Store {
    path: PathBuf,
    commit: pcg_durable::GroupCommit<StoreError>,
    identity: sled::Tree,
    /// The command journal and the outbox ([`journal`]).
    journal: Arc<journal::Journal>,
    bmcs: sled::Tree,
    /// Operator settings kept in the store (the proxy URL, sealed: it may hold a password).
    settings: sled::Tree,
    endpoints: sled::Tree,
    /// Declared machines, the watch loop's action journal and its event outbox ([`machines`]).
    machines: sled::Tree,
    watch_actions: sled::Tree,
    watch_events: sled::Tree,
    key: aead::LessSafeKey,
    /// Tests only: while a test holds it for writing, flushes wait (to show what does not wait
    /// for them).
    #[cfg(test)]
    pub(crate) held_flushes: tokio::sync::RwLock<()>,
}

const IDENTITY_KEY: &[u8] = b"current";

impl Store {
    /// Opens (creating) the store in `dir`, and the secret key file `dir/secret.key`, waiting up
    /// to 10 s for a pcgctl that holds the store for a moment (offline status or pairing).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_waiting(dir, std::time::Duration::from_secs(10))
    }

    /// Like [`open`](Self::open), for pcgctl: fails at once with [`StoreError::InUse`] when a
    /// daemon holds the store.
    pub fn open_now(dir: &Path) -> Result<Store, StoreError> {
        Self::open_waiting(dir, std::time::Duration::ZERO)
    }

    fn open_waiting(dir: &Path, wait: std::time::Duration) -> Result<Store, StoreError> {
        let path = dir.join("db");
        let sled_err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        // Owner-only: the store holds the identity and sealed credentials.
        pcg_durable::fs::private_dir(dir).map_err(|e| sled_err(sled::Error::Io(e)))?;
        for (p, e) in pcg_durable::fs::tighten_permissions(dir) {
            tracing::warn!(path = %p.display(), "cannot make owner-only: {e}");
        }
        let key = load_or_create_key(&dir.join("secret.key"))?;
        let db = open_db(&path, wait)?;
        let journal = Arc::new(journal::Journal::open(
            &dir.join("journal"),
            pcg_durable::seglog::SEGMENT_BYTES,
        )?);
        // The outbox of earlier versions (id → result), emptied into their journal, which is
        // then moved into the log.
        let legacy = db.open_tree("journal").map_err(sled_err)?;
        migrate_outbox(&legacy, &db.open_tree("outbox").map_err(sled_err)?).map_err(&sled_err)?;
        migrate_journal(&db, &path, &legacy, &journal)?;
        // Every flush first appends the acknowledgements gathered since the last one; then
        // sled's flush and the journal's sync.
        let commit = {
            let (journal, db, path) = (journal.clone(), db.clone(), path.clone());
            pcg_durable::GroupCommit::new(
                move || {
                    journal.write_acks(now_ms());
                    db.flush().map_err(|source| StoreError::Sled {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(journal.sync()?)
                },
                || StoreError::Stopped,
            )
        };
        Ok(Store {
            identity: db.open_tree("identity").map_err(sled_err)?,
            journal,
            bmcs: db.open_tree("bmcs").map_err(sled_err)?,
            settings: db.open_tree("settings").map_err(sled_err)?,
            endpoints: db.open_tree("endpoints").map_err(sled_err)?,
            machines: db.open_tree("machines").map_err(sled_err)?,
            watch_actions: db.open_tree("watch_actions").map_err(sled_err)?,
            watch_events: db.open_tree("watch_events").map_err(sled_err)?,
            commit,
            key,
            path,
            #[cfg(test)]
            held_flushes: tokio::sync::RwLock::new(()),
        })
    }

    fn err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// The JSON record under `key` in `tree`, decoded; `what` names it when it does not decode.
    fn read<T: serde::de::DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, StoreError> {
        match tree.get(key).map_err(self.err())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    what: what(),
                    message: e.to_string(),
                }),
        }
    }

    /// Synchronous disk flushes done so far (group commit: each serves every waiter queued).
    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        let _open = self.held_flushes.read().await;
        self.commit.flush().await
    }

    // --- identity ------------------------------------------------------------------------

    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        self.read(&self.identity, IDENTITY_KEY, || "identity".into())
    }

    pub fn set_identity(&self, id: &Identity) -> Result<(), StoreError> {
        self.identity
            .insert(
                IDENTITY_KEY,
                serde_json::to_vec(id).expect("identity serialises"),
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn seal(&self, plain: &[u8]) -> String {
        use base64::Engine as _;
        let nonce_bytes: [u8; 12] = rand::random();
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce_bytes),
                aead::Aad::empty(),
                &mut buf,
            )
            .expect("AES-GCM sealing of a small buffer cannot fail");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    pub fn unseal(&self, sealed: &str) -> Result<Vec<u8>, StoreError> {
        use base64::Engine as _;
        let bad = |m: &str| StoreError::Corrupt {
            what: "sealed private key".into(),
            message: format!("{m}; was secret.key replaced? pair the gateway again"),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| bad("not base64"))?;
        if raw.len() < 12 + 16 {
            return Err(bad("too short"));
        }
        let (nonce, ct) = raw.split_at(12);
        let mut buf = ct.to_vec();
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad("bad nonce"))?;
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::empty(), &mut buf)
            .map_err(|_| bad("cannot be decrypted"))?;
        Ok(plain.to_vec())
    }

    /// The keys sealed secrets of commands for this gateway are opened with: the current
    /// certificate's key and the previous ones.
    pub fn openers(&self) -> Result<Vec<pcg_proto::sealed::Opener>, StoreError> {
        let Some(id) = self.identity()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for sealed in std::iter::once(&id.key_sealed).chain(id.previous_keys_sealed.iter()) {
            let pem = self.unseal(sealed)?;
            let pem = String::from_utf8(pem).map_err(|_| StoreError::Corrupt {
                what: "private key".into(),
                message: "not UTF-8 PEM".into(),
            })?;
            match pcg_proto::sealed::Opener::from_pkcs8_pem(&pem) {
                Ok(o) => out.push(o),
                Err(e) => tracing::warn!("a key of this identity cannot open sealed secrets: {e}"),
            }
        }
        Ok(out)
    }

    // --- enrolled BMCs ---------------------------------------------------------------------

    /// Stores an enrolled BMC (its endpoint, with the password, sealed).
    pub fn put_bmc(&self, b: &BmcRecord) -> Result<(), StoreError> {
        self.bmcs
            .insert(
                b.name.as_bytes(),
                serde_json::to_vec(b).expect("records serialise"),
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn bmc(&self, name: &str) -> Result<Option<BmcRecord>, StoreError> {
        self.read(&self.bmcs, name, || format!("BMC {name}"))
    }

    pub fn bmc_names(&self) -> Vec<String> {
        self.bmcs
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    // --- settings ------------------------------------------------------------------------------

    /// Stores (sealed) or clears the proxy URL set with `pcgctl proxy`.
    pub fn set_proxy(&self, url: Option<&str>) -> Result<(), StoreError> {
        match url {
            Some(u) => {
                let sealed = self.seal(u.as_bytes());
                self.settings
                    .insert(b"proxy", sealed.as_bytes())
                    .map_err(self.err())?;
            }
            None => {
                self.settings.remove(b"proxy").map_err(self.err())?;
            }
        }
        Ok(())
    }

    /// Writes, flushes and removes a small record: whether the store takes a write now (for
    /// `pcgctl diag`).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.settings
            .insert(b"diag_probe", &now_ms().to_be_bytes()[..])
            .map_err(self.err())?;
        self.flush().await?;
        self.settings.remove(b"diag_probe").map_err(self.err())?;
        self.flush().await
    }

    /// The proxy URL set with `pcgctl proxy`, if any.
    pub fn proxy(&self) -> Result<Option<String>, StoreError> {
        let Some(v) = self.settings.get(b"proxy").map_err(self.err())? else {
            return Ok(None);
        };
        let plain = self.unseal(&String::from_utf8_lossy(&v))?;
        Ok(Some(String::from_utf8_lossy(&plain).into_owned()))
    }

    // --- provider endpoints by name ----------------------------------------------------------

    fn endpoint_key(provider: &str, name: &str) -> Vec<u8> {
        format!("{provider}\0{name}").into_bytes()
    }

    /// Stores an enrolled endpoint under its provider and name, replacing (and returning) the
    /// record enrolled under that name before.
    pub fn put_endpoint(&self, r: &EndpointRecord) -> Result<Option<EndpointRecord>, StoreError> {
        let old = self
            .endpoints
            .insert(
                Self::endpoint_key(&r.provider, &r.name),
                serde_json::to_vec(r).expect("records serialise"),
            )
            .map_err(self.err())?;
        Ok(old.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The endpoint enrolled as `name` for `provider`.
    pub fn endpoint(
        &self,
        provider: &str,
        name: &str,
    ) -> Result<Option<EndpointRecord>, StoreError> {
        self.read(&self.endpoints, Self::endpoint_key(provider, name), || {
            format!("{provider} endpoint {name}")
        })
    }

    /// Names of the endpoints enrolled for `provider`, sorted.
    pub fn endpoint_names(&self, provider: &str) -> Vec<String> {
        let prefix = format!("{provider}\0");
        self.endpoints
            .scan_prefix(prefix.as_bytes())
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect()
    }

    // --- journal and outbox -----------------------------------------------------------------

    pub fn entry(&self, id: &str) -> Result<Option<JournalEntry>, StoreError> {
        self.journal.get(id)
    }

    /// Journals a new command: running, or already done (a command cancelled before it was
    /// delivered or run: its result is then in the outbox). Returns the existing entry instead
    /// when the id is already known (atomically: two deliveries racing cannot both write).
    pub fn begin(&self, e: &JournalEntry) -> Result<Option<JournalEntry>, StoreError> {
        if self.journal.begin(e)? {
            return Ok(None);
        }
        self.journal.get(&e.id)
    }

    /// Records a result: the journal entry (as journaled, in the caller's hands) becomes done
    /// and the result enters the outbox.
    pub fn finish(&self, e: &JournalEntry, result: &StoredResult) -> Result<(), StoreError> {
        self.journal.finish(&JournalEntry {
            state: EntryState::Done,
            result: Some(result.clone()),
            ..e.clone()
        })
    }

    /// The broker stored the result: it leaves the outbox, and joins the acknowledgements
    /// written with the next flush as one batch (the entry itself is not rewritten). Not
    /// flushed: an acknowledgement lost in a crash only sends the result once more.
    pub fn ack(&self, id: &str) {
        // Acknowledged before, or never in the outbox: nothing.
        self.journal.ack(id);
    }

    /// The results waiting for an acknowledgement, in id order.
    pub fn outbox(&self) -> Result<Vec<(String, StoredResult)>, StoreError> {
        let ids = self.journal.unacked();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.outbox_result(&id)? {
                out.push((id, r));
            }
        }
        Ok(out)
    }

    /// The result of `id` waiting in the outbox, if it is still there (not acknowledged).
    pub fn outbox_result(&self, id: &str) -> Result<Option<StoredResult>, StoreError> {
        if !self.journal.is_unacked(id) {
            return Ok(None);
        }
        Ok(self.entry(id)?.and_then(|e| e.result))
    }

    /// Results waiting in the outbox (kept in memory: no read of the store).
    pub fn outbox_depth(&self) -> usize {
        self.journal.counts().1
    }

    /// Entries in the journal (kept in memory: no read of the store).
    pub fn journal_len(&self) -> usize {
        self.journal.counts().0
    }

    /// Entries still running (after a crash: those whose execution must be resumed).
    /// (Kept in memory like the outbox: only those entries are read.)
    pub fn running(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let ids = self.journal.running();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(e) = self.entry(&id)?.filter(|e| e.state == EntryState::Running) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Forgets done entries acknowledged more than `retention_ms` ago; returns how many. Reads
    /// the acknowledgement batches older than that, not the journal; the journal's segments
    /// left with nothing kept are deleted.
    pub fn prune(&self, retention_ms: i64) -> Result<usize, StoreError> {
        let now = now_ms();
        self.journal.prune(now, now.saturating_sub(retention_ms))
    }
}

impl Drop for Store {
    /// What was acknowledged since the last flush is written and synced.
    fn drop(&mut self) {
        self.journal.write_acks(now_ms());
        if let Err(e) = self.journal.sync() {
            tracing::warn!(
                "cannot write the last acknowledgements (their results will be sent again): {e}"
            );
        }
    }
}

/// Opens the sled database at `path`, waiting up to `wait` while another process holds it
/// ([`StoreError::InUse`] after that).
fn open_db(path: &Path, wait: std::time::Duration) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(StoreError::Sled {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Moves the outbox of an earlier version (a tree of results) into the journal: each result
/// becomes (or already is) its done entry's, and leaves the tree, which stays empty. A crash
/// part-way leaves the rest for the next open. Flushed before anything reads the journal.
fn migrate_outbox(journal: &sled::Tree, legacy: &sled::Tree) -> Result<(), sled::Error> {
    let mut moved = false;
    for kv in legacy.iter() {
        let (k, v) = kv?;
        let id = String::from_utf8_lossy(&k).into_owned();
        match serde_json::from_slice::<StoredResult>(&v) {
            Ok(result) => {
                let mut e = match journal.get(&k)? {
                    Some(j) => serde_json::from_slice::<JournalEntry>(&j).ok(),
                    None => None,
                }
                .unwrap_or_else(|| JournalEntry {
                    id,
                    kind: String::new(),
                    payload: serde_json::json!({}),
                    state: EntryState::Done,
                    received_ms: now_ms(),
                    result: None,
                    acked_ms: None,
                    deadline_ms: None,
                });
                if e.state != EntryState::Done || e.result.is_none() || e.acked_ms.is_some() {
                    e.state = EntryState::Done;
                    e.result = Some(result);
                    e.acked_ms = None;
                    journal.insert(&k, serde_json::to_vec(&e).expect("entries serialise"))?;
                }
            }
            // Unreadable: the earlier version could not have sent it either.
            Err(e) => tracing::error!(
                command = %id,
                "the outbox of an earlier version holds an unreadable result, dropped: {e}"
            ),
        }
        legacy.remove(&k)?;
        moved = true;
    }
    if moved {
        journal.flush()?;
    }
    Ok(())
}

/// Moves the journal an earlier version kept in sled (tree `journal`; its acknowledgements in
/// `acks` as batches, in `acked` one record per id, or inside the entry) into the log: the
/// entries the log lacks are appended, each acknowledgement joins a batch with its time, the
/// log is synced, and only then are the trees emptied (a stop part way copies again at the next
/// open: what the log holds is not appended twice).
fn migrate_journal(
    db: &sled::Db,
    path: &Path,
    legacy: &sled::Tree,
    journal: &journal::Journal,
) -> Result<(), StoreError> {
    let err = |source| StoreError::Sled {
        path: path.to_path_buf(),
        source,
    };
    if legacy.is_empty() {
        return Ok(());
    }
    let acks = db.open_tree("acks").map_err(err)?;
    let acked = db.open_tree("acked").map_err(err)?;
    let mut when: Vec<(i64, String)> = Vec::new();
    let mut seen = HashSet::new();
    for kv in acks.iter() {
        let (k, v) = kv.map_err(err)?;
        let at = k
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, i64::from_be_bytes);
        let ids: Vec<String> = serde_json::from_slice(&v).unwrap_or_else(|e| {
            tracing::warn!("an unreadable batch of acknowledgements, ignored: {e}");
            Vec::new()
        });
        for id in ids {
            if seen.insert(id.clone()) {
                when.push((at, id));
            }
        }
    }
    for kv in acked.iter() {
        let (k, v) = kv.map_err(err)?;
        let id = String::from_utf8_lossy(&k).into_owned();
        let at = v.as_ref().try_into().map_or(0, i64::from_be_bytes);
        if seen.insert(id.clone()) {
            when.push((at, id));
        }
    }
    let mut entries = Vec::new();
    for kv in legacy.iter() {
        let (k, v) = kv.map_err(err)?;
        match serde_json::from_slice::<JournalEntry>(&v) {
            Ok(e) => {
                if let Some(at) = e.acked_ms {
                    if seen.insert(e.id.clone()) {
                        when.push((at, e.id.clone()));
                    }
                }
                entries.push(e);
            }
            Err(e) => tracing::error!(
                command = %String::from_utf8_lossy(&k),
                "a journal entry of an earlier version is unreadable, dropped: {e}"
            ),
        }
    }
    let moved = entries.len();
    journal.import(entries, when);
    journal.sync()?;
    for t in [legacy, &acks, &acked] {
        t.clear().map_err(err)?;
    }
    db.flush().map_err(err)?;
    tracing::info!(
        entries = moved,
        "the command journal moved from sled into its log"
    );
    Ok(())
}

fn load_or_create_key(path: &Path) -> Result<aead::LessSafeKey, StoreError> {
    let bad = |message: String| StoreError::Key {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        // Written whole under a temporary name, then linked into place: a concurrent opener
        // (the daemon and pcgctl) either wins the link or reads the winner's complete file.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let k: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| bad(e.to_string()))?;
        f.write_all(&k).map_err(|e| bad(e.to_string()))?;
        f.sync_all().map_err(|e| bad(e.to_string()))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if bytes.len() != 32 {
        return Err(bad(format!("must hold 32 bytes, holds {}", bytes.len())));
    }
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &bytes)
        .map_err(|_| bad("not a valid AES-256 key".into()))?;
    Ok(aead::LessSafeKey::new(unbound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> JournalEntry {
        JournalEntry {
            id: id.into(),
            kind: "gateway.echo".into(),
            payload: serde_json::json!({}),
            state: EntryState::Running,
            received_ms: now_ms(),
            result: None,
            acked_ms: None,
            deadline_ms: None,
        }
    }

    fn outbox_ids(s: &Store) -> Vec<String> {
        let outbox = s.outbox().expect("outbox");
        outbox.into_iter().map(|(id, _)| id).collect()
    }

    fn done_ok() -> StoredResult {
        StoredResult {
            ok: true,
            output: serde_json::json!(1),
            error_class: String::new(),
            error_message: String::new(),
            started_ms: 0,
            finished_ms: 0,
        }
    }

    #[test]
    fn begin_is_once_per_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        assert!(s.begin(&entry("a")).expect("begin").is_none());
        let again = s.begin(&entry("a")).expect("begin").expect("known");
        assert_eq!(again.state, EntryState::Running);
        let r = done_ok();
        s.finish(&entry("a"), &r).expect("finish");
        assert_eq!(s.outbox_depth(), 1);
        let done = s.entry("a").expect("get").expect("known");
        assert_eq!(
            (done.state, done.result),
            (EntryState::Done, Some(r.clone()))
        );
        // Done but not acknowledged: kept whatever its age.
        assert_eq!(s.prune(-1).expect("prune"), 0);
        s.ack("a");
        s.ack("a"); // a second acknowledgement changes nothing
        assert_eq!(s.outbox_depth(), 0);
        assert_eq!(s.prune(60_000).expect("prune"), 0, "acknowledged just now");
        assert_eq!(s.prune(-1).expect("prune"), 1);
        assert!(s.entry("a").expect("get").is_none());
        assert_eq!(
            s.prune(-1).expect("prune"),
            0,
            "each entry is forgotten once"
        );
    }

    /// Acknowledgements of earlier versions: a record per id in `acked`, or the time inside the
    /// entry. At open neither entry is in the outbox; pruning forgets both once they are old
    /// enough, and empties `acked`.
    #[test]
    fn acknowledgements_of_earlier_versions_are_read_and_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = now_ms() - 1_000;
        {
            // As those versions wrote them, in sled.
            let db = sled::open(dir.path().join("db")).expect("sled");
            let journal = db.open_tree("journal").expect("journal");
            let acked = db.open_tree("acked").expect("acked");
            let acks = db.open_tree("acks").expect("acks");
            let mut b = entry("b");
            b.state = EntryState::Done;
            b.result = Some(done_ok());
            let mut c = b.clone();
            c.id = "c".into();
            c.acked_ms = Some(at);
            let mut d = b.clone();
            d.id = "d".into();
            let mut e = b.clone();
            e.id = "e".into();
            for x in [&b, &c, &d, &e] {
                journal
                    .insert(x.id.as_bytes(), serde_json::to_vec(x).expect("json"))
                    .expect("insert");
            }
            acked.insert("b", &at.to_be_bytes()[..]).expect("insert");
            let mut key = at.to_be_bytes().to_vec();
            key.extend_from_slice(&1u64.to_be_bytes());
            acks.insert(key, serde_json::to_vec(&["e"]).expect("json"))
                .expect("insert");
            db.flush().expect("flush");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let outbox = outbox_ids(&s);
        assert_eq!(outbox, ["d"], "b and c were acknowledged");
        assert_eq!(
            s.prune(60_000).expect("prune"),
            0,
            "acknowledged a second ago"
        );
        assert_eq!(s.prune(0).expect("prune"), 3);
        for id in ["b", "c", "e"] {
            assert!(s.entry(id).expect("get").is_none(), "{id}");
        }
        assert!(
            s.entry("d").expect("get").is_some(),
            "not acknowledged: kept"
        );
        drop(s);
        // Reopened, the log holds the same; the trees of sled were emptied.
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(outbox_ids(&s), ["d"]);
        assert_eq!(s.journal_len(), 1);
        drop(s);
        let db = open_db(&dir.path().join("db"), std::time::Duration::from_secs(30)).expect("db");
        for t in ["journal", "acked", "acks"] {
            assert!(db.open_tree(t).expect("tree").is_empty(), "{t} emptied");
        }
    }

    /// Acknowledgements are written as one batch by the next flush, or when the store closes;
    /// those written survive a reopen (the results stay out of the outbox), and the batch goes
    /// with its entries when they are pruned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledgements_are_written_in_batches_by_a_flush_or_the_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            for id in ["a", "b", "c", "d"] {
                s.begin(&entry(id)).expect("begin");
                s.finish(&entry(id), &done_ok()).expect("finish");
            }
            s.ack("a");
            s.ack("b");
            assert_eq!(s.journal.batches(), 0, "gathered, not written");
            assert_eq!(s.journal.gathered(), 2);
            s.flush().await.expect("flush");
            assert_eq!(s.journal.batches(), 1, "one batch");
            assert_eq!(s.journal.gathered(), 0);
            s.ack("c");
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.journal.batches(), 2, "the close wrote the last one");
        let outbox = outbox_ids(&s);
        assert_eq!(outbox, ["d"]);
        assert_eq!(s.prune(-1).expect("prune"), 3);
        assert_eq!(s.journal.batches(), 0);
        assert_eq!(s.journal_len(), 1);
    }

    /// The kept count, outbox and running entries follow every write that adds, finishes,
    /// acknowledges or removes an entry, repeated writes included, and agree with the trees
    /// read whole, after a reopen too.
    #[test]
    fn journal_count_outbox_and_running_follow_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = done_ok();
        let counted = |s: &Store| {
            // The outbox and the running entries by their definitions, every entry read:
            // done entries with no acknowledgement, and entries still running.
            let entries: Vec<JournalEntry> = ["a", "b", "c", "d", "unknown"]
                .into_iter()
                .filter_map(|id| s.entry(id).expect("read"))
                .collect();
            assert_eq!(s.journal_len(), entries.len(), "journal");
            let unacked = entries
                .iter()
                .filter(|e| e.state == EntryState::Done && !s.journal.acknowledged(&e.id))
                .count();
            assert_eq!(s.outbox_depth(), unacked, "outbox");
            assert_eq!(s.outbox().expect("outbox").len(), unacked, "outbox results");
            let running: Vec<String> = entries
                .into_iter()
                .filter(|e| e.state == EntryState::Running)
                .map(|e| e.id)
                .collect();
            let kept: Vec<String> = s
                .running()
                .expect("running")
                .into_iter()
                .map(|e| e.id)
                .collect();
            assert_eq!(kept, running, "running");
            (s.journal_len(), s.outbox_depth())
        };
        {
            let s = Store::open(dir.path()).expect("open");
            assert_eq!(counted(&s), (0, 0));
            for id in ["a", "b", "c"] {
                assert!(s.begin(&entry(id)).expect("begin").is_none());
            }
            s.begin(&entry("a")).expect("begin").expect("known");
            assert_eq!(counted(&s), (3, 0));
            s.finish(&entry("a"), &r).expect("finish");
            s.finish(&entry("a"), &r).expect("finished again");
            s.finish(&entry("b"), &r).expect("finish");
            assert_eq!(counted(&s), (3, 2));
            let mut cancelled = entry("d");
            cancelled.state = EntryState::Done;
            cancelled.result = Some(r.clone());
            assert!(s.begin(&cancelled).expect("begin done").is_none());
            assert!(s.begin(&cancelled).expect("again").is_some());
            assert_eq!(counted(&s), (4, 3));
            s.ack("a");
            s.ack("a"); // again
            s.ack("unknown"); // of nothing
            assert_eq!(counted(&s), (4, 2));
            assert_eq!(s.prune(-1).expect("prune"), 1);
            assert_eq!(counted(&s), (3, 2));
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(counted(&s), (3, 2));
    }

    /// A store of an earlier version kept unacknowledged results in a tree of their own: at
    /// open they are the journal's and the outbox still holds them; acknowledged ones stay out.
    #[test]
    fn an_outbox_of_an_earlier_version_is_moved_into_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = done_ok();
        {
            // Written as that version wrote: a done entry and its result in the outbox tree;
            // one acknowledged in the entry; one acknowledged with a record; a running one;
            // a result whose entry is running (a crash between its two writes).
            let db = sled::open(dir.path().join("db")).expect("sled");
            let journal = db.open_tree("journal").expect("journal");
            let outbox = db.open_tree("outbox").expect("outbox");
            let acked = db.open_tree("acked").expect("acked");
            let put = |e: &JournalEntry| {
                journal
                    .insert(e.id.as_bytes(), serde_json::to_vec(e).expect("json"))
                    .expect("put");
            };
            let done = |id: &str| JournalEntry {
                state: EntryState::Done,
                result: Some(r.clone()),
                ..entry(id)
            };
            put(&done("waiting"));
            outbox
                .insert("waiting", serde_json::to_vec(&r).expect("json"))
                .expect("outbox");
            put(&JournalEntry {
                acked_ms: Some(now_ms()),
                ..done("acked-in-entry")
            });
            put(&done("acked-record"));
            acked
                .insert("acked-record", &now_ms().to_be_bytes()[..])
                .expect("acked");
            put(&entry("running"));
            put(&entry("half"));
            outbox
                .insert("half", serde_json::to_vec(&r).expect("json"))
                .expect("outbox");
            // Unreadable: dropped (that version could not send it either).
            outbox.insert("bad", &b"{not json"[..]).expect("outbox");
            db.flush().expect("flush");
        }
        for _ in 0..2 {
            let s = Store::open(dir.path()).expect("open");
            let ids: Vec<String> = s
                .outbox()
                .expect("outbox")
                .into_iter()
                .map(|(id, got)| {
                    assert_eq!(got, r, "{id}");
                    id
                })
                .collect();
            assert_eq!(ids, ["half", "waiting"]);
            assert_eq!(s.journal_len(), 5);
            let half = s.entry("half").expect("read").expect("journaled");
            assert_eq!(
                (half.state, half.result),
                (EntryState::Done, Some(r.clone()))
            );
            assert_eq!(s.running().expect("running").len(), 1);
        }
        // The store's flusher thread lets go of the database a moment after the store.
        let db = open_db(&dir.path().join("db"), std::time::Duration::from_secs(30)).expect("db");
        for t in ["outbox", "journal", "acked"] {
            assert!(db.open_tree(t).expect("tree").is_empty(), "{t} emptied");
        }
    }

    #[test]
    fn endpoints_by_provider_and_name_replace_and_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let rec = |provider: &str, name: &str, v: &str| EndpointRecord {
            provider: provider.into(),
            name: name.into(),
            endpoint_sealed: s.seal(v.as_bytes()),
            info: serde_json::json!({}),
            enrolled_ms: now_ms(),
        };
        assert!(s
            .put_endpoint(&rec("vsphere", "a", "1"))
            .expect("put")
            .is_none());
        s.put_endpoint(&rec("vsphere", "b", "2")).expect("put");
        s.put_endpoint(&rec("openstack", "a", "3")).expect("put");
        let old = s
            .put_endpoint(&rec("vsphere", "a", "4"))
            .expect("put")
            .expect("replaced");
        assert_eq!(s.unseal(&old.endpoint_sealed).expect("unseal"), b"1");
        assert_eq!(s.endpoint_names("vsphere"), vec!["a", "b"]);
        assert_eq!(s.endpoint_names("openstack"), vec!["a"]);
        let a = s.endpoint("vsphere", "a").expect("get").expect("known");
        assert_eq!(s.unseal(&a.endpoint_sealed).expect("unseal"), b"4");
        assert!(s.endpoint("openstack", "b").expect("get").is_none());
    }

    #[test]
    fn sealing_round_trips_and_detects_a_foreign_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let sealed = s.seal(b"private");
        assert_eq!(s.unseal(&sealed).expect("unseal"), b"private");
        drop(s);
        std::fs::remove_file(dir.path().join("secret.key")).expect("rm");
        let s = Store::open(dir.path()).expect("open");
        assert!(s.unseal(&sealed).is_err());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("secret.key"))
                .expect("meta")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
