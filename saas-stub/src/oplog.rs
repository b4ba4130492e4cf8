//! The transport of the replicated operation log: every replica's state changes go through one
//! JetStream stream ([`STREAM`], subject [`SUBJECT`]), replicated on `stream_replicas` NATS
//! nodes, so that every replica sees them in one order.
//!
//! - [`OpLog::open`] connects as a replica (mutual TLS, [`crate::cluster::connect`]) and creates
//!   the stream, or opens it when another replica did;
//! - [`OpLog::append`] stores one operation once a quorum of the stream's nodes has it; its
//!   `msg_id` (the `Nats-Msg-Id` header) makes a retried append — by the caller, or by `append`
//!   itself after a lost acknowledgement — stored once within [`DUPLICATE_WINDOW`];
//! - [`OpLog::follow`] yields every operation after a sequence, in stream order, for ever, riding
//!   out nodes that stop, connections that move to another node and spells without quorum.
//!
//! What the payloads mean is not this module's business: it moves opaque bytes.
//!
//! Behaviour of the parts, as seen here with async-nats 0.51 against nats-server 2.9.10 (three
//! nodes on one host; `tests/tests/oplog.rs`):
//! - with one node of three stopped, appends are acknowledged; when the stopped node led the
//!   stream, publishes are refused with "no responders" until another node is elected (about
//!   5 s, longer than `request_timeout_ms` = 3000: the caller retries, with the same `msg_id`);
//! - with two stopped, a publish is refused at once with "no responders" (503) when the node left
//!   knows of no stream leader, or its acknowledgement never comes when that node still thinks
//!   it leads: `append` retries both until `request_timeout_ms` has passed since the call, then
//!   says [`ClusterError::NoQuorum`]. The stream's info (`last_seq`) is still answered, by the
//!   node left, from what it has;
//! - creating a consumer goes through the JetStream metadata leader: after the node that led
//!   it stops, creation times out or says "JetStream system temporarily unavailable" (503,
//!   10008) for up to about 10 s while appends go on; a follower that must re-create its
//!   consumer then retries;
//! - `follow` does not use the client's ordered consumer (`consumer::push::OrderedConfig`,
//!   `messages()`): one created at a sequence, whose connection's node stopped before it was
//!   read, delivered nothing, and no error, for 40 s while two nodes of three were up; and its source re-creates
//!   it from the first message of the stream when it had delivered nothing yet, waiting 10 s
//!   between attempts after the fifth. Here an ephemeral push consumer (no acks, flow control,
//!   idle heartbeats, in memory on one node) is re-created from the last sequence yielded
//!   whenever a delivery is missing (consumer sequences not consecutive), the heartbeats stop,
//!   the connection moves to another node, or the server says the consumer is gone.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::cluster::{self, ClusterConfig, ClusterError};

/// The stream every replica's state changes go through, in one order.
pub const STREAM: &str = "PCG_STATE";
pub const SUBJECT: &str = "pcg.state";

/// How long the stream remembers an append's `msg_id`: an append retried within this window is
/// stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How often an idle follower's consumer sends a heartbeat.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence (no operation, no heartbeat) after which a follower re-creates its consumer.
const STALLED_AFTER: Duration = Duration::from_secs(6);
/// How often an idle follower looks whether its connection moved to another node.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// A follower's consumer nobody listens to any more is deleted by the server after this.
const CONSUMER_INACTIVE: Duration = Duration::from_secs(30);
/// Backoff of a follower between attempts: from the first, doubling, to the last.
const FOLLOW_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// Backoff of `append` between attempts, within its `request_timeout_ms`.
const APPEND_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_millis(500));

/// A replica's handle on the operation log. Cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct OpLog {
    js: jetstream::Context,
    cfg: ClusterConfig,
}

impl OpLog {
    /// Connects as replica `name` (mutual TLS, [`crate::cluster::connect`]) and creates or opens
    /// the stream: subjects [`SUBJECT`], replicated on `cfg.stream_replicas` nodes, file storage,
    /// no age or size limits, duplicate window [`DUPLICATE_WINDOW`]. Errors name what is missing:
    /// [`ClusterError::Connect`] when no node accepts this replica, [`ClusterError::NoQuorum`]
    /// when the JetStream API has no leader; a stream of that name that does not take
    /// [`SUBJECT`] is a [`ClusterError::Config`].
    pub async fn open(cfg: &ClusterConfig, name: &str) -> Result<OpLog, ClusterError> {
        let client = cluster::connect(cfg, name).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(request_timeout(cfg))
            .build(client);
        let log = OpLog {
            js,
            cfg: cfg.clone(),
        };
        let want = log.stream_config();
        let stream = log.js.get_or_create_stream(want.clone()).await.map_err(|e| {
            if cluster::leaderless(&e) {
                log.no_quorum(format!(
                    "the stream {STREAM} could not be looked up or created: {e}"
                ))
            } else if matches!(
                e.kind(),
                jetstream::context::CreateStreamErrorKind::JetStream(api)
                    if api.error_code().0 == NO_PEERS
            ) {
                log.error(format!(
                    "fewer NATS nodes than stream_replicas = {} to place the stream on ({e}); start the missing nodes, or lower stream_replicas",
                    want.num_replicas
                ))
            } else {
                log.error(format!("cannot create or open the stream: {e}"))
            }
        })?;
        let have = &stream.cached_info().config;
        if !have.subjects.iter().any(|s| s == SUBJECT) {
            return Err(ClusterError::Config(format!(
                "the JetStream stream {STREAM} exists but does not take the subject {SUBJECT} (its subjects: {:?}); it was not made by pcg-saas: delete or rename it",
                have.subjects
            )));
        }
        if have.num_replicas != want.num_replicas {
            tracing::warn!(
                stream = STREAM,
                have = have.num_replicas,
                want = want.num_replicas,
                "the operation log's stream is replicated on {} nodes, not stream_replicas = {}; it is kept as it is",
                have.num_replicas,
                want.num_replicas
            );
        }
        Ok(log)
    }

    fn stream_config(&self) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: STREAM.into(),
            description: Some("pcg-saas: the replicas' operation log".into()),
            subjects: vec![SUBJECT.into()],
            num_replicas: self.cfg.stream_replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            max_messages: -1,
            max_bytes: -1,
            max_age: Duration::ZERO,
            max_messages_per_subject: -1,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        }
    }

    /// The NATS connection (for what replicas tell each other outside the log).
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// The NATS node this replica is connected to now: `name (host:port)`.
    pub fn server(&self) -> String {
        cluster::server_description(&self.js.client())
    }

    /// Appends one operation. `msg_id` goes in the `Nats-Msg-Id` header, so an append retried
    /// with the same `msg_id` within [`DUPLICATE_WINDOW`] is stored once (and answers the
    /// sequence of the first). Returns the stream sequence once the stream acknowledged it
    /// (stored on a quorum of its nodes).
    ///
    /// A refusal for want of a leader ("no responders") and a lost acknowledgement are retried
    /// here, with the same `msg_id`, until `request_timeout_ms` has passed since the call; then
    /// it fails with [`ClusterError::NoQuorum`]. The operation may still be stored later (it may
    /// have reached a node that had no quorum yet): retry with the same `msg_id` to know.
    ///
    /// Many appends may be in flight at once, from many tasks: nothing is locked across the
    /// await, and the connection pipelines the publications.
    pub async fn append(&self, msg_id: &str, payload: Bytes) -> Result<u64, ClusterError> {
        let timeout = request_timeout(&self.cfg);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = APPEND_BACKOFF.0;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = async {
                let ack = self
                    .js
                    .send_publish(
                        SUBJECT,
                        PublishMessage::build()
                            .payload(payload.clone())
                            .message_id(msg_id),
                    )
                    .await?;
                ack.await
            };
            let why = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) if publish_transient(&e) => e.to_string(),
                Ok(Err(e)) => {
                    return Err(self.error(format!("the append {msg_id:?} was refused: {e}")))
                }
                Err(_) => "no acknowledgement".to_string(),
            };
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(self.no_quorum(format!(
                    "the append {msg_id:?} was not acknowledged within {timeout:?} ({attempts} attempts, the last: {why})"
                )));
            }
            tracing::debug!(
                msg_id,
                attempts,
                "append not acknowledged ({why}); retrying"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(APPEND_BACKOFF.1);
        }
    }

    /// The stream's last sequence (0 when empty).
    pub async fn last_seq(&self) -> Result<u64, ClusterError> {
        use jetstream::context::GetStreamErrorKind as K;
        let stream = self.js.get_stream(STREAM).await.map_err(|e| {
            let leaderless = match e.kind() {
                K::Request => request_leaderless(&e),
                K::JetStream(api) => cluster::api_leaderless(&api),
                _ => false,
            };
            if leaderless {
                self.no_quorum(format!("the stream's state could not be read: {e}"))
            } else {
                self.error(format!("cannot read the stream's state: {e}"))
            }
        })?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Every operation after `after` (exclusive), in stream order, for ever: `(sequence,
    /// payload)`. When its consumer fails (a node stops, the connection moves to another node,
    /// no quorum for a while), it is re-created from the last sequence yielded, so nothing is
    /// skipped or repeated; such trouble is retried (backoff from 100 ms doubling to 2 s) and
    /// logged as a warning. Only an error that retrying cannot mend — the stream is gone, or
    /// JetStream refuses the consumer as malformed — ends the stream, with one `Err` item.
    ///
    /// Nothing is asked of the cluster until the stream is first polled.
    pub fn follow(
        &self,
        after: u64,
    ) -> impl Stream<Item = Result<(u64, Bytes), ClusterError>> + Send + 'static {
        let follower = Follower {
            stats: self.js.client().statistics(),
            log: self.clone(),
            last: after,
            current: None,
            pause: FOLLOW_BACKOFF.0,
            done: false,
        };
        futures_util::stream::unfold(follower, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        })
    }

    fn no_quorum(&self, message: String) -> ClusterError {
        ClusterError::no_quorum(&self.cfg, self.server(), message)
    }

    fn error(&self, message: String) -> ClusterError {
        ClusterError::OpLog {
            stream: STREAM,
            server: self.server(),
            message,
        }
    }
}

fn request_timeout(cfg: &ClusterConfig) -> Duration {
    Duration::from_millis(cfg.request_timeout_ms.max(1))
}

/// JetStream's "no suitable peers for placement" (err_code 10005).
const NO_PEERS: u64 = 10005;
/// JetStream's "stream not found" (code 404, err_code 10059).
const STREAM_NOT_FOUND: u64 = 10059;

/// The JetStream API error somewhere in `e`'s chain of causes, if any.
fn api_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a jetstream::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(api) = err.downcast_ref::<jetstream::Error>() {
            return Some(api);
        }
        cur = err.source();
    }
    None
}

/// Whether a failed API request (as the cause of `e`) got no answer, or nobody to answer.
fn request_leaderless(e: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::context::{RequestError, RequestErrorKind as K};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<RequestError>() {
            return matches!(r.kind(), K::TimedOut | K::NoResponders);
        }
        cur = err.source();
    }
    false
}

/// Whether a publication failed for want of a leader or of an answer, so that trying again
/// (with the same `msg_id`) may succeed.
fn publish_transient(e: &jetstream::context::PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe => true,
        PublishErrorKind::Other => api_error(e).is_some_and(cluster::api_leaderless),
        _ => false,
    }
}

/// Why a follower's consumer could not be (re-)created.
enum Trouble {
    /// Worth another attempt.
    Transient(String),
    /// Retrying cannot help.
    Fatal(ClusterError),
}

/// A consumer a follower reads from.
struct Current {
    sub: async_nats::Subscriber,
    /// The consumer's name, to delete it when it is given up.
    name: String,
    /// The consumer sequence of the last delivery received: the next must be one more.
    delivered: u64,
    /// When the last message (of any kind) came.
    heard: tokio::time::Instant,
    /// The connection's count of connects when the consumer was created.
    connects: u64,
}

/// What one message from the consumer means.
enum Step {
    Yield(u64, Bytes),
    /// A heartbeat that agrees with what arrived: the consumer is well.
    Alive,
    Continue,
    /// The consumer is no good any more: re-create it from the last sequence yielded.
    Restart(String),
}

struct Follower {
    log: OpLog,
    stats: std::sync::Arc<async_nats::Statistics>,
    /// The last sequence yielded (or `after`).
    last: u64,
    current: Option<Current>,
    pause: Duration,
    done: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Result<(u64, Bytes), ClusterError>> {
        if self.done {
            return None;
        }
        loop {
            let Some(cur) = self.current.as_mut() else {
                match self.subscribe().await {
                    Ok(c) => self.current = Some(c),
                    Err(Trouble::Fatal(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Err(Trouble::Transient(why)) => self.back_off(&why).await,
                }
                continue;
            };
            // A consumer made through another connection delivers nowhere now, or not all of
            // it (what came while the connection moved is lost): a new one, at once.
            let connects = self
                .stats
                .connects
                .load(std::sync::atomic::Ordering::Relaxed);
            let wait = STALLED_AFTER
                .saturating_sub(cur.heard.elapsed())
                .min(CHECK_EVERY);
            let step = if connects != cur.connects {
                Step::Restart(format!(
                    "the connection moved to another node ({})",
                    self.log.server()
                ))
            } else {
                match tokio::time::timeout(wait, cur.sub.next()).await {
                    Ok(Some(msg)) => {
                        cur.heard = tokio::time::Instant::now();
                        handle(&self.log, cur, self.last, msg).await
                    }
                    Ok(None) => Step::Restart("its subscription ended".into()),
                    Err(_) if cur.heard.elapsed() >= STALLED_AFTER => Step::Restart(format!(
                        "neither an operation nor a heartbeat came for {STALLED_AFTER:?}"
                    )),
                    Err(_) => Step::Continue,
                }
            };
            match step {
                Step::Yield(seq, payload) => {
                    self.last = seq;
                    self.pause = FOLLOW_BACKOFF.0;
                    return Some(Ok((seq, payload)));
                }
                Step::Alive => self.pause = FOLLOW_BACKOFF.0,
                Step::Continue => {}
                Step::Restart(why) => self.restart(&why).await,
            }
        }
    }

    /// Subscribes to a new inbox, then creates an ephemeral push consumer delivering there from
    /// the sequence after the last one yielded.
    async fn subscribe(&self) -> Result<Current, Trouble> {
        let js = &self.log.js;
        let client = js.client();
        let connects = self
            .stats
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Trouble::Transient(format!("cannot subscribe to its inbox: {e}")))?;
        let config = consumer::push::Config {
            deliver_subject: inbox,
            description: Some("pcg-saas: a replica following the operation log".into()),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: self.last.saturating_add(1),
            },
            ack_policy: consumer::AckPolicy::None,
            max_deliver: 1,
            flow_control: true,
            idle_heartbeat: IDLE_HEARTBEAT,
            inactive_threshold: CONSUMER_INACTIVE,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let created = js.create_consumer_on_stream(config, STREAM).await;
        let consumer = created.map_err(|e| {
            use jetstream::stream::ConsumerErrorKind as K;
            match e.kind() {
                K::TimedOut | K::Request => {
                    Trouble::Transient(format!("its consumer could not be created: {e}"))
                }
                K::JetStream(api)
                    if api.code() == 400 || api.error_code().0 == STREAM_NOT_FOUND =>
                {
                    Trouble::Fatal(self.log.error(format!(
                        "cannot follow from sequence {}: {e}",
                        self.last.saturating_add(1)
                    )))
                }
                K::JetStream(_) => {
                    Trouble::Transient(format!("its consumer could not be created: {e}"))
                }
                _ => Trouble::Fatal(self.log.error(format!(
                    "cannot follow from sequence {}: {e}",
                    self.last.saturating_add(1)
                ))),
            }
        })?;
        Ok(Current {
            sub,
            name: consumer.cached_info().name.clone(),
            delivered: 0,
            heard: tokio::time::Instant::now(),
            connects,
        })
    }

    /// Gives up the current consumer (deleting it, best effort) and waits before the next.
    async fn restart(&mut self, why: &str) {
        if let Some(old) = self.current.take() {
            drop(old.sub);
            let js = self.log.js.clone();
            tokio::spawn(async move {
                let _ = js.delete_consumer_from_stream(&old.name, STREAM).await;
            });
        }
        self.back_off(why).await;
    }

    async fn back_off(&mut self, why: &str) {
        tracing::warn!(
            stream = STREAM,
            last = self.last,
            server = %self.log.server(),
            "following the operation log from sequence {}: {why}; trying again in {:?}",
            self.last.saturating_add(1),
            self.pause
        );
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(FOLLOW_BACKOFF.1);
    }
}

/// One message from a follower's consumer: an operation, a heartbeat, a flow control request or
/// a status.
async fn handle(log: &OpLog, cur: &mut Current, last: u64, msg: async_nats::Message) -> Step {
    let client = log.js.client();
    if let Some(status) = msg.status {
        if status != async_nats::StatusCode::IDLE_HEARTBEAT {
            return Step::Restart(format!(
                "its consumer sent status {status} ({})",
                msg.description.as_deref().unwrap_or("no description")
            ));
        }
        // A flow control request (it has a reply subject) wants an empty answer before the
        // server sends more; so does a heartbeat that says the consumer is stalled.
        let stalled = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Consumer-Stalled"))
            .map(|v| v.as_str().to_string());
        for to in msg.reply.iter().map(|r| r.to_string()).chain(stalled) {
            if let Err(e) = client.publish(to, Bytes::new()).await {
                return Step::Restart(format!("cannot answer its flow control: {e}"));
            }
        }
        // A heartbeat names the last delivery: one missing here means one was lost on the way.
        if let Some(v) = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Last-Consumer"))
        {
            return match v.as_str().parse::<u64>() {
                Ok(n) if n != cur.delivered => Step::Restart(format!(
                    "its consumer delivered {n} operations, {} arrived",
                    cur.delivered
                )),
                Ok(_) => Step::Alive,
                Err(_) => Step::Restart(format!("its heartbeat is malformed: {:?}", v.as_str())),
            };
        }
        return Step::Continue;
    }
    let msg = jetstream::Message {
        message: msg,
        context: log.js.clone(),
    };
    let (stream_seq, consumer_seq) = match msg.info() {
        Ok(i) => (i.stream_sequence, i.consumer_sequence),
        Err(e) => return Step::Restart(format!("a delivery without its metadata: {e}")),
    };
    if consumer_seq != cur.delivered + 1 {
        return Step::Restart(format!(
            "its consumer's delivery {} came after delivery {}: some were lost on the way",
            consumer_seq, cur.delivered
        ));
    }
    cur.delivered = consumer_seq;
    if stream_seq <= last {
        // A consumer asked to start beyond the end of the stream starts at its end (2.9 does):
        // what was already yielded, or comes before `after`, is not yielded.
        tracing::debug!(
            stream = STREAM,
            last,
            "sequence {stream_seq} skipped: not after {last}"
        );
        return Step::Continue;
    }
    Step::Yield(stream_seq, msg.message.payload)
}
