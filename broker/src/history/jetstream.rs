//! History in a cluster: one NATS JetStream stream that every node shares.
//!
//! A publish on a history topic goes to the topic's intake subject
//! (`herald-history.chat.lobby` under the default prefix), which only the
//! stream captures. The stream stores it and gives it the next stream
//! sequence. Each node reads the stream from its end with one ordered
//! consumer (the [`StreamHistory::feed`]) and delivers what comes to its
//! local subscribers. So `seq` is the same on every node for the same
//! message, and every node delivers history messages in stream order,
//! across topics too, whoever published them: a wildcard subscriber's
//! last `seq` marks everything before it. (The stream's republish would
//! route by interest, but nats-server delivers concurrent publishes'
//! republished copies out of order under load; and an ordered consumer
//! resumes where it was after a NATS outage, where core subscriptions lose
//! what was published meanwhile.) The price: every node receives every
//! history message, wanted or not.
//!
//! The stream is created or updated at start and checked every few
//! seconds; its creation time is the epoch, so a new stream means a new
//! epoch. While it cannot be reached, history topics are published like
//! any other (live, without positions) and recovery answers
//! `history_unavailable`.
//!
//! One stream holds every rule's topics, with the widest limits among the
//! rules (count per subject, age) and `--history-bytes`; a recovery
//! serves each topic only its own rule's window, and says `too_old` when
//! that window or the stream's lost something the client needed.

use std::collections::HashMap;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use herald_protocol::position::Unrecovered;
use herald_protocol::topic;

use crate::config::values::Retention;
use crate::history::memory::{epoch_of, From, Journal, Replay, ReplayError};
use crate::sync::ReadWrite;

/// How long a replay waits for the stream to hand over a batch.
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// Replays read from the stream at once, node-wide: each is a consumer on
/// the NATS server and its messages in this node's memory. Others wait.
const MAX_READS: usize = 16;
/// The longest a replay may take to read (waiting for its turn included);
/// past it the recovery answers `history_unavailable`.
const READ_DEADLINE: Duration = Duration::from_secs(60);
/// The most bytes one replay holds; past it the recovery answers
/// `too_many`, as past `--max-replay` messages.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024 * 1024;

/// How long a publish waits for the stream to say it stored the message.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// A read of the stream that failed: logged, and answered
/// `history_unavailable`.
fn unavailable(e: impl std::fmt::Display) -> ReplayError {
    tracing::warn!(error = %e, "history replay failed");
    ReplayError::Unrecovered(Unrecovered::HistoryUnavailable)
}

/// The cluster's history, as one node sees it.
pub struct StreamHistory {
    js: jetstream::Context,
    name: String,
    /// The intake prefix (`herald-history`).
    intake: String,
    rules: Vec<Retention>,
    max_bytes: u64,
    replicas: u8,
    /// The stream's epoch, once it has been reached.
    epoch: RwLock<Option<Arc<str>>>,
    available: AtomicBool,
    /// The stream's last `seq` when this node first reached it: the feed
    /// delivers everything after it.
    start: AtomicU64,
    /// The last `seq` the feed handed to the hub (`u64::MAX`: none yet):
    /// a subscription listed before it is read receives every message
    /// above it; a publisher waits on it for its own message.
    delivered: AtomicU64,
    /// Publishers waiting on `delivered` (see
    /// [`StreamHistory::delivered_through`]): the feed wakes them only
    /// while there are some, so a message costs it no lock otherwise.
    waiting: std::sync::atomic::AtomicUsize,
    moved: tokio::sync::Notify,
    /// Bumped when the stream is found replaced (a new epoch: deleted and
    /// made again, or its server's store emptied): the feed then reads the
    /// new one from its start, and the tail forgets the old one.
    generation: AtomicU64,
    /// Wakes the feed when `generation` moves.
    renewed: tokio::sync::Notify,
    /// Bounds the replays read from the stream at once.
    reads: tokio::sync::Semaphore,
    /// The stream's own per-subject limit (-1: none).
    per_subject: i64,
    /// The stream's tail as the feed brought it, so most recoveries (all
    /// of a node kill's clients, asking for the same last minutes) are
    /// served from memory instead of a consumer each.
    tail: Option<Journal>,
}

impl StreamHistory {
    /// The history of a node linked by `client`, not yet reached: call
    /// [`StreamHistory::keep`] to create and watch the stream.
    pub fn new(
        client: async_nats::Client,
        name: &str,
        prefix: &str,
        rules: Vec<Retention>,
        max_bytes: u64,
        tail: Option<Journal>,
        replicas: u8,
    ) -> Self {
        StreamHistory {
            js: jetstream::new(client),
            name: name.to_owned(),
            intake: format!("{prefix}-history"),
            rules,
            max_bytes,
            replicas,
            epoch: RwLock::new(None),
            available: AtomicBool::new(false),
            start: AtomicU64::new(u64::MAX),
            delivered: AtomicU64::new(u64::MAX),
            waiting: Default::default(),
            moved: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            renewed: tokio::sync::Notify::new(),
            tail,
            reads: tokio::sync::Semaphore::new(MAX_READS),
            per_subject: -1,
        }
        .with_limits()
    }

    fn with_limits(mut self) -> Self {
        self.per_subject = self.config().max_messages_per_subject;
        self
    }

    /// Whether the stream was reached at the last check.
    pub fn available(&self) -> bool {
        self.available.load(Relaxed)
    }

    /// The stream's epoch, if it has been reached.
    pub fn epoch(&self) -> Option<Arc<str>> {
        self.epoch.reading().clone()
    }

    /// The last `seq` this node's feed delivered (or, before its first
    /// message, the stream's last when the node reached it), while the
    /// stream is reachable.
    pub fn position(&self) -> Option<u64> {
        if !self.available() {
            return None;
        }
        match self.delivered.load(Relaxed) {
            u64::MAX => Some(self.start.load(Relaxed)).filter(|&s| s != u64::MAX),
            at => Some(at),
        }
    }

    /// Resolves once this node's feed has delivered `seq` (a publisher's
    /// ack then follows its own copy of the message).
    pub async fn delivered_through(&self, seq: u64) {
        // Counted until this future ends or is dropped (a caller's timeout).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        self.waiting.fetch_add(1, SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let moved = self.moved.notified();
            let at = self.delivered.load(SeqCst);
            if at != u64::MAX && at >= seq {
                return;
            }
            moved.await;
        }
    }

    /// The subject a history topic's publishes go to.
    pub fn intake_subject(&self, topic: &str) -> String {
        topic::to_subject(&self.intake, topic)
    }

    fn config(&self) -> stream::Config {
        let count = self.rules.iter().map(|r| r.count).collect::<Option<Vec<_>>>();
        let age = self.rules.iter().map(|r| r.age).collect::<Option<Vec<_>>>();
        stream::Config {
            name: self.name.clone(),
            description: Some("Herald history".into()),
            subjects: vec![format!("{}.>", self.intake)],
            max_messages_per_subject: count.and_then(|c| c.into_iter().max()).map_or(-1, |c| c as i64),
            max_age: age.and_then(|a| a.into_iter().max()).unwrap_or_default(),
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            storage: stream::StorageType::File,
            num_replicas: usize::from(self.replicas),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }

    /// Creates or updates the stream, then checks it every few seconds
    /// (faster while it cannot be reached), keeping the epoch current.
    pub async fn keep(self: Arc<Self>) {
        let mut made = false;
        // The last reason warned of, so a lasting one is said once.
        let mut said: Option<String> = None;
        loop {
            let result = if made {
                match self.js.get_stream(&self.name).await {
                    Ok(mut s) => s
                        .info()
                        .await
                        .map(|i| (i.created, i.state.last_sequence))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                self.js
                    .create_or_update_stream(self.config())
                    .await
                    .map(|i| (i.created, i.state.last_sequence))
                    .map_err(|e| e.to_string())
            };
            match result {
                Ok((created, last)) => {
                    made = true;
                    said = None;
                    // Set once, before the stream counts as available.
                    let _ = self.start.compare_exchange(u64::MAX, last, Relaxed, Relaxed);
                    let epoch: Arc<str> = epoch_of(created.unix_timestamp_nanos() as u64).into();
                    let mut e = self.epoch.writing();
                    if e.as_deref() != Some(&*epoch) {
                        tracing::info!(stream = %self.name, %epoch, "history stream ready");
                        if e.is_some() {
                            // Replaced: its positions start again.
                            tracing::warn!(stream = %self.name, %epoch, "history stream replaced: a new epoch, read from its start");
                            self.generation.fetch_add(1, Relaxed);
                            self.renewed.notify_waiters();
                        }
                    }
                    *e = Some(epoch);
                    drop(e);
                    if !self.available.swap(true, Relaxed) {
                        tracing::info!(stream = %self.name, "history available");
                    }
                }
                Err(error) => {
                    made = false;
                    // Each new reason once at warn, with the server's own
                    // words (a stream of another name on the same
                    // subjects, JetStream off, no quorum); repeats at debug.
                    let was = self.available.swap(false, Relaxed);
                    if was || said.as_deref() != Some(error.as_str()) {
                        tracing::warn!(stream = %self.name, %error, "history unavailable: {error}; is JetStream enabled (nats-server -js), and does no other stream take these subjects? Live delivery goes on");
                        said = Some(error);
                    } else {
                        tracing::debug!(stream = %self.name, %error, "history stream not reached");
                    }
                }
            }
            let pause = if self.available() { 5 } else { 1 };
            tokio::time::sleep(Duration::from_secs(pause)).await;
        }
    }

    /// Delivers every message the stream stores after the node first
    /// reached it, in stream order, to `deliver(topic, seq, data)`: one
    /// ordered consumer, made again (from the last `seq` delivered)
    /// whenever it fails.
    pub async fn feed(self: Arc<Self>, deliver: impl Fn(&str, u64, &[u8])) {
        while !self.available() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut last = self.start.load(Relaxed);
        let mut pruned = std::time::Instant::now();
        let mut generation = self.generation.load(Relaxed);
        loop {
            if !self.available() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            if self.replaced(&mut generation) {
                last = 0;
            }
            let start = consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            };
            let config = consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: format!("{}.>", self.intake),
                deliver_policy: start,
                ..Default::default()
            };
            let messages = match self.js.get_stream(&self.name).await {
                Ok(s) => match s.create_consumer(config).await {
                    Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(%error, "history feed not started; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            tracing::info!(from = last + 1, "history feed reading the stream");
            loop {
                // A replaced stream may bring nothing this consumer waits
                // for (its `seq`s start again below ours): woken for it.
                let renewed = self.renewed.notified();
                if self.generation.load(Relaxed) != generation {
                    break;
                }
                let m = tokio::select! {
                    m = messages.next() => m,
                    _ = renewed => break,
                };
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "history feed interrupted; resuming");
                        break;
                    }
                    None => break,
                };
                let Ok(info) = m.info() else { continue };
                let seq = info.stream_sequence;
                if seq <= last {
                    continue;
                }
                last = seq;
                if let Some(topic) = topic::from_subject(&self.intake, m.subject.as_str()) {
                    if let (Some(tail), Some(rule)) = (&self.tail, Retention::find(&self.rules, &topic)) {
                        tail.insert(&topic, rule, seq, m.payload.clone());
                        if pruned.elapsed() > Duration::from_secs(1) {
                            tail.prune();
                            pruned = std::time::Instant::now();
                        }
                    }
                    deliver(&topic, seq, &m.payload);
                }
                self.set_delivered(seq);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Records the feed's position, waking the publishers that wait on it.
    fn set_delivered(&self, seq: u64) {
        self.delivered.store(seq, SeqCst);
        if self.waiting.load(SeqCst) > 0 {
            self.moved.notify_waiters();
        }
    }

    /// Whether the stream was replaced since `generation` (then updated):
    /// the tail forgets the old one.
    fn replaced(&self, generation: &mut u64) -> bool {
        let now = self.generation.load(Relaxed);
        if now == *generation {
            return false;
        }
        *generation = now;
        if let Some(tail) = &self.tail {
            tail.clear();
        }
        self.set_delivered(0);
        true
    }

    /// Publishes `data` on history `topic` through the stream; resolves to
    /// its `seq` once stored.
    pub async fn publish(
        &self,
        topic: &str,
        data: bytes::Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, String> {
        self.js
            .publish(self.intake_subject(topic), data)
            .await
            .map_err(|e| e.to_string())
    }

    /// What a subscription to `pattern` missed after `from`, at most `max`
    /// messages.
    pub async fn replay(&self, pattern: &str, from: From, max: usize) -> Result<Replay, ReplayError> {
        if let (Some(tail), From::Since(since)) = (&self.tail, from) {
            if tail.covers(since) {
                match tail.replay(pattern, from, max) {
                    // Gone from the tail is not gone from the stream: ask it.
                    Ok(r) => return Ok(r),
                    Err(ReplayError::Unrecovered(Unrecovered::TooMany)) => {
                        return Err(ReplayError::Unrecovered(Unrecovered::TooMany))
                    }
                    Err(_) => {}
                }
            }
        }
        self.read(pattern, from, max, false).await
    }

    /// Up to `limit` retained messages of concrete `topic` after `since`,
    /// and whether every message after `since` is still retained.
    pub async fn page(&self, topic: &str, since: u64, limit: usize) -> Result<(Replay, bool), ReplayError> {
        match self.read(topic, From::Since(since), limit, true).await {
            Ok(r) => Ok((r, true)),
            Err(ReplayError::Unrecovered(Unrecovered::TooOld)) => {
                let r = self.read(topic, From::Since(0), limit, true).await?;
                let kept: Vec<_> = r.messages.into_iter().filter(|m| m.1 > since).collect();
                Ok((
                    Replay {
                        messages: kept,
                        through: r.through,
                    },
                    false,
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// One read of the stream, in its turn (at most [`MAX_READS`] at once)
    /// and within [`READ_DEADLINE`].
    async fn read(
        &self,
        pattern: &str,
        from: From,
        max: usize,
        truncate: bool,
    ) -> Result<Replay, ReplayError> {
        let read = async {
            let _turn = self.reads.acquire().await.map_err(unavailable)?;
            self.read_now(pattern, from, max, truncate).await
        };
        match tokio::time::timeout(READ_DEADLINE, read).await {
            Ok(r) => r,
            Err(_) => Err(unavailable(format!("no replay within {READ_DEADLINE:?}"))),
        }
    }

    async fn read_now(
        &self,
        pattern: &str,
        from: From,
        max: usize,
        truncate: bool,
    ) -> Result<Replay, ReplayError> {
        let mut stream = self.js.get_stream(&self.name).await.map_err(unavailable)?;
        let state = stream.info().await.map_err(unavailable)?.state.clone();
        let start = match from {
            From::Since(since) => {
                if since > state.last_sequence {
                    return Err(ReplayError::Future(state.last_sequence));
                }
                if since + 1 < state.first_sequence {
                    return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
                }
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: since + 1,
                }
            }
            From::Last => consumer::DeliverPolicy::LastPerSubject,
        };
        let config = consumer::pull::Config {
            filter_subject: self.intake_subject(pattern),
            deliver_policy: start,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        };
        let mut c = stream.create_consumer(config).await.map_err(unavailable)?;
        let result = self.fetch(&mut c, from, max, truncate, state.last_sequence).await;
        let _ = stream.delete_consumer(&c.cached_info().name).await;
        let replay = result?;
        if let From::Since(since) = from {
            // Anything the stream dropped while we read is reported.
            let after = stream.info().await.map_err(unavailable)?;
            if since + 1 < after.state.first_sequence {
                return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
            }
        }
        Ok(replay)
    }

    async fn fetch(
        &self,
        c: &mut consumer::Consumer<consumer::pull::Config>,
        from: From,
        max: usize,
        truncate: bool,
        last: u64,
    ) -> Result<Replay, ReplayError> {
        let mut pending = c.cached_info().num_pending as usize;
        if pending > max {
            if !truncate {
                return Err(ReplayError::Unrecovered(Unrecovered::TooMany));
            }
            pending = max;
        }
        let mut replay = Replay {
            messages: Vec::with_capacity(pending),
            through: last,
        };
        let mut per_topic: HashMap<Arc<str>, u64> = HashMap::new();
        let mut bytes = 0;
        while replay.messages.len() < pending {
            let want = (pending - replay.messages.len()).min(1000);
            let mut batch = c
                .fetch()
                .max_messages(want)
                .expires(FETCH_WAIT)
                .messages()
                .await
                .map_err(unavailable)?;
            let mut got = 0;
            let mut done = false;
            while let Some(m) = batch.next().await {
                let m = m.map_err(unavailable)?;
                let Ok(info) = m.info() else { continue };
                let (seq, left) = (info.stream_sequence, info.pending);
                got += 1;
                if let Some(t) = topic::from_subject(&self.intake, m.subject.as_str()) {
                    bytes += m.payload.len();
                    if bytes > MAX_REPLAY_BYTES {
                        if truncate {
                            return Ok(replay);
                        }
                        return Err(ReplayError::Unrecovered(Unrecovered::TooMany));
                    }
                    let t: Arc<str> = t.into();
                    *per_topic.entry(t.clone()).or_default() += 1;
                    replay.through = replay.through.max(seq);
                    replay.messages.push((t, seq, m.payload.clone()));
                }
                if left == 0 {
                    done = true;
                }
            }
            if done || got == 0 {
                break;
            }
        }
        if from != From::Last && !truncate {
            self.check_counts(&per_topic)?;
        }
        Ok(replay)
    }

    /// A topic that needs more than its rule keeps has lost messages;
    /// one that fills the stream's own per-subject limit may have.
    fn check_counts(&self, per_topic: &HashMap<Arc<str>, u64>) -> Result<(), ReplayError> {
        let stream_max = self.per_subject;
        for (t, n) in per_topic {
            let rule = Retention::find(&self.rules, t).and_then(|r| r.count);
            let over_rule = rule.is_some_and(|c| *n > c);
            let full = stream_max > 0 && *n as i64 >= stream_max;
            if over_rule || full {
                return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
            }
        }
        Ok(())
    }
}
