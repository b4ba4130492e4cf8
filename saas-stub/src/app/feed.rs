//! Subscriptions to a tenant's feed: the commands submitted to its gateways, their results, its
//! events and its gateways' health reports, in one order, from a sequence number (see
//! [`crate::store::feed`]). The REST API serves it as Server-Sent Events (`GET /v1/feed`) and
//! gRPC as a server stream (`pcg.feed.v1.Feed/Subscribe`); both resume from the last sequence
//! number a client saw, without loss or repetition.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use super::{printable, App, AppError, AppResult, Caller, Kind};
use crate::store::feed::{Entry, SubscriberGuard};
use crate::store::machines::HealthRecord;
use crate::store::{Command, Event, Topic};

/// Entries read from the store at once.
const PAGE: usize = 256;

/// How often an idle subscription checks that its API key was not revoked.
const KEY_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// What a subscriber asks for.
#[derive(Debug, Default, Clone)]
pub struct FeedQuery {
    /// Comma-separated topics (`commands,results,events,health`); none: all of them.
    pub topics: Option<String>,
    /// Only what concerns this gateway of the tenant.
    pub gateway_id: Option<String>,
    /// Start after this sequence number; none: only what comes from now on.
    pub since: Option<u64>,
}

/// One item of a feed.
#[derive(Debug, Clone)]
pub struct FeedItem {
    pub seq: u64,
    pub payload: Payload,
}

#[derive(Debug, Clone)]
pub enum Payload {
    /// A command submitted (its record as read when the item was sent; the submission is what
    /// the item stands for).
    Submitted(Command),
    /// A command that ended, with its result.
    Ended(Command),
    Event(Event),
    Health(HealthRecord),
    /// Items up to `seq` were deleted by retention before the subscriber could read them.
    Gap,
}

impl FeedItem {
    /// The topic's name (`gap` for a [`Payload::Gap`]).
    pub fn topic(&self) -> &'static str {
        match &self.payload {
            Payload::Submitted(_) => Topic::Commands.as_str(),
            Payload::Ended(_) => Topic::Results.as_str(),
            Payload::Event(_) => Topic::Events.as_str(),
            Payload::Health(_) => Topic::Health.as_str(),
            Payload::Gap => "gap",
        }
    }

    fn gateway_id(&self) -> Option<&str> {
        match &self.payload {
            Payload::Submitted(c) | Payload::Ended(c) => Some(&c.gateway_id),
            Payload::Event(e) => e.gateway_id.as_deref(),
            Payload::Health(h) => Some(&h.gateway_id),
            Payload::Gap => None,
        }
    }
}

/// A live subscription; [`Subscription::next`] waits for the next item.
pub struct Subscription {
    app: Arc<App>,
    tenant_id: String,
    /// The API key it was opened with: a revocation ends it.
    key_id: String,
    topics: Vec<Topic>,
    gateway_id: Option<String>,
    /// The last sequence number read (items up to it were sent or filtered out).
    cursor: u64,
    horizon: watch::Receiver<u64>,
    queue: VecDeque<FeedItem>,
    _counted: SubscriberGuard,
}

/// Parses a comma-separated topic list; none or empty: every topic.
pub fn parse_topics(list: Option<&str>) -> AppResult<Vec<Topic>> {
    let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
        return Ok(Topic::ALL.to_vec());
    };
    let mut out = Vec::new();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let topic = Topic::parse(t).ok_or_else(|| {
            AppError::new(
                Kind::Invalid,
                "unknown_topic",
                format!(
                    "unknown topic \"{}\"; the topics are {}",
                    printable(t),
                    Topic::ALL.map(Topic::as_str).join(", ")
                ),
            )
        })?;
        if !out.contains(&topic) {
            out.push(topic);
        }
    }
    Ok(out)
}

impl App {
    /// Subscribes the caller's tenant to its feed.
    pub fn subscribe(self: &Arc<Self>, caller: &Caller, q: FeedQuery) -> AppResult<Subscription> {
        let tenant_id = caller.tenant()?.to_string();
        let topics = parse_topics(q.topics.as_deref())?;
        if let Some(g) = &q.gateway_id {
            self.tenant_gateway(&tenant_id, g)?;
        }
        let counted = self.store.feed.subscribe();
        let horizon = self.store.feed.horizon();
        let now = *horizon.borrow();
        let mut queue = VecDeque::new();
        let cursor = match q.since {
            None => now,
            Some(since) => {
                let pruned = self.store.feed.pruned_through(&tenant_id)?;
                if pruned > since {
                    queue.push_back(FeedItem {
                        seq: pruned,
                        payload: Payload::Gap,
                    });
                }
                since.max(pruned)
            }
        };
        Ok(Subscription {
            app: self.clone(),
            tenant_id,
            key_id: caller.0.id.clone(),
            topics,
            gateway_id: q.gateway_id,
            cursor,
            horizon,
            queue,
            _counted: counted,
        })
    }
}

impl Subscription {
    /// The next item, waiting for one; `None` when the service stops. An error ends the
    /// subscription (the store failed, or its API key was revoked).
    pub async fn next(&mut self) -> Option<AppResult<FeedItem>> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(Ok(item));
            }
            let horizon = *self.horizon.borrow_and_update();
            if horizon > self.cursor {
                if let Err(e) = self.key_valid().and_then(|()| self.fill(horizon)) {
                    return Some(Err(e));
                }
                continue;
            }
            tokio::select! {
                changed = self.horizon.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                // An idle subscription still learns of its key's revocation.
                _ = tokio::time::sleep(KEY_CHECK) => {
                    if let Err(e) = self.key_valid() {
                        return Some(Err(e));
                    }
                }
                _ = self.app.shutdown.cancelled() => return None,
            }
        }
    }

    /// Whether the API key it was opened with still stands.
    fn key_valid(&self) -> AppResult<()> {
        match self.app.store.api_key(&self.key_id)? {
            Some(k) if !k.revoked => Ok(()),
            _ => Err(AppError::new(
                Kind::Unauthenticated,
                "api_key_revoked",
                "the API key this subscription was opened with was revoked; subscribe again with a valid key, resuming after the last sequence number received",
            )),
        }
    }

    /// The sequence number a client resumes after: everything up to it was delivered.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Reads the next page up to `horizon` into the queue.
    fn fill(&mut self, horizon: u64) -> AppResult<()> {
        let entries = self
            .app
            .store
            .feed_read(&self.tenant_id, self.cursor, horizon, PAGE)?;
        let whole = entries.len() < PAGE;
        for e in entries {
            self.cursor = e.seq;
            if !self.topics.contains(&e.topic) {
                continue;
            }
            let Some(item) = self.resolve(&e)? else {
                continue; // its record was deleted by its own retention
            };
            if let Some(g) = &self.gateway_id {
                if item.gateway_id() != Some(g.as_str()) {
                    continue;
                }
            }
            self.queue.push_back(item);
        }
        if whole {
            self.cursor = horizon;
        }
        Ok(())
    }

    fn resolve(&self, e: &Entry) -> AppResult<Option<FeedItem>> {
        let store = &self.app.store;
        let id = || String::from_utf8_lossy(&e.reference).into_owned();
        let payload = match e.topic {
            // Read from the store, not memory: the store has the record its entry points at.
            Topic::Commands => store.command(&id())?.map(Payload::Submitted),
            Topic::Results => store
                .command(&id())?
                .filter(|c| c.state.is_terminal())
                .map(Payload::Ended),
            Topic::Events => store.event_by_seq(e.seq)?.map(Payload::Event),
            Topic::Health => store.health_by_key(&e.reference)?.map(Payload::Health),
        };
        Ok(payload.map(|payload| FeedItem {
            seq: e.seq,
            payload,
        }))
    }
}

/// How long a write may wait for its own flush before the pump flushes it for subscribers.
const PUMP_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// Flushes the store promptly while someone reads the feed, so that a write no request flushes
/// (an event, a health report) reaches subscribers within a few milliseconds, not at the next
/// command. A write that is flushed anyway (a command, a result) is left to its own flush: the
/// pump waits [`PUMP_DELAY`] and flushes only what is still not durable.
pub async fn pump(app: Arc<App>) {
    let feed = app.store.feed.clone();
    loop {
        tokio::select! {
            _ = feed.written() => {}
            _ = app.shutdown.cancelled() => return,
        }
        if feed.subscribers() == 0 {
            continue;
        }
        let target = feed.visible();
        tokio::select! {
            _ = tokio::time::sleep(PUMP_DELAY) => {}
            _ = app.shutdown.cancelled() => return,
        }
        if feed.durable() >= target {
            continue;
        }
        if let Err(e) = app.store.flush().await {
            tracing::warn!("flushing the store for feed subscribers failed: {e}");
        }
    }
}
