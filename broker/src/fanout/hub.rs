//! The node's fan-out table: which local sockets receive a message.
//!
//! Concrete topics live in a sharded map from topic to its
//! [`Members`](crate::fanout::members::Members): a chunked copy-on-write list, so a
//! join or leave copies a bounded part, and fan-out clones one `Arc` under a
//! brief shard read lock and then walks the snapshot with no lock held.
//! Wildcard patterns live in a subject tree with a match cache
//! ([`Patterns`](crate::fanout::patterns::Patterns)): a topic's matching
//! patterns are found in one step per segment, or at once when cached, and
//! each pattern's members are a chunked list as above. A message is encoded once per format
//! and the same `Bytes` is pushed to every recipient's queue. A socket in
//! several of a topic's lists (the topic's and a pattern's, or two
//! patterns') is served once, by a set of ids each thread keeps and reuses:
//! a fan-out allocates nothing per message beyond its frames.

use std::cell::RefCell;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use herald_protocol::{message, position, topic};
use tokio::net::tcp::OwnedWriteHalf;

use crate::fanout::members::{Members, Snapshot};
use crate::fanout::patterns::{Pattern, PatternChange, Patterns};
use crate::metrics::Metrics;
use crate::presence::roster::Roster;
use crate::socket::outbox::Pushed;
use crate::socket::subscriber::Subscriber;

/// A subscribed socket, as the hub holds it.
type Sub = Arc<Subscriber>;

/// What a message carries.
#[derive(Debug, Clone, Copy)]
pub enum Delivery<'a> {
    /// Published JSON, delivered byte for byte.
    Data(&'a [u8]),
    /// A history message: delivered with its position, and held back
    /// from a socket while a subscription of its recovers.
    Stored {
        /// The published JSON.
        data: &'a [u8],
        /// Its place in the history.
        seq: u64,
        /// The history's epoch.
        epoch: &'a str,
    },
    /// Several messages published in a row on the same topic (from one read
    /// of one publisher's socket): delivered as one buffer of frames, so
    /// each recipient costs one queue push and its writer one write for all.
    Batch(&'a [Bytes]),
    /// A join or leave notice.
    Presence {
        /// `join` or `leave`.
        event: &'a str,
        /// The socket that joined or left.
        client: &'a str,
        /// Its token's user id, if it has one.
        user: Option<&'a str>,
        /// Its display name, if it gave one.
        name: Option<&'a str>,
    },
}

/// Whether a subscribe or unsubscribe changed the node's interest in a key:
/// the first subscriber arrived or the last one left. The bus uses this to
/// subscribe to and drop NATS subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// The first local subscriber for this topic or pattern.
    Gained,
    /// The last local subscriber left.
    Lost,
    /// Others remain (or the call changed nothing).
    Unchanged,
}

/// The routing table. Cloning is a refcount.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    exact: DashMap<Box<str>, Members>,
    patterns: Patterns,
    /// Most distinct wildcard patterns the node holds.
    max_patterns: usize,
    presence: Vec<String>,
    /// Who is on the presence topics, cluster-wide.
    roster: Roster,
    metrics: Arc<Metrics>,
}

/// A new wildcard pattern was refused: the node holds `max` already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pattern_limit: the node holds {max} distinct wildcard patterns")]
pub struct PatternLimit {
    /// `--max-patterns`.
    pub max: usize,
}

impl Hub {
    /// An empty hub. `presence` lists the patterns whose topics announce
    /// joins and leaves; at most `max_patterns` distinct wildcard patterns
    /// may be held.
    pub fn new(metrics: Arc<Metrics>, presence: Vec<String>, max_patterns: usize) -> Self {
        Hub {
            inner: Arc::new(Inner {
                exact: DashMap::new(),
                patterns: Patterns::default(),
                max_patterns,
                presence,
                roster: Roster::default(),
                metrics,
            }),
        }
    }

    /// Whether `topic` announces joins and leaves.
    pub fn has_presence(&self, topic: &str) -> bool {
        self.inner.presence.iter().any(|p| topic::matches(p, topic))
    }

    /// Who is on the presence topics, cluster-wide.
    pub fn roster(&self) -> &Roster {
        &self.inner.roster
    }

    /// Adds `sub` under `pattern` (concrete or wildcard). Idempotent.
    pub fn subscribe(&self, pattern: &str, wildcard: bool, sub: &Sub) -> Result<Interest, PatternLimit> {
        if wildcard {
            let max = self.inner.max_patterns;
            return match self.inner.patterns.subscribe(pattern, sub, max) {
                PatternChange::Created => Ok(Interest::Gained),
                PatternChange::Full => Err(PatternLimit { max }),
                PatternChange::Removed | PatternChange::Members => Ok(Interest::Unchanged),
            };
        }
        Ok(match self.inner.exact.entry(pattern.into()) {
            Entry::Occupied(mut e) => {
                e.get_mut().insert(sub);
                Interest::Unchanged
            }
            Entry::Vacant(e) => {
                e.insert(Members::one(sub));
                Interest::Gained
            }
        })
    }

    /// Removes socket `id` from `pattern`.
    pub fn unsubscribe(&self, pattern: &str, wildcard: bool, id: u64) -> Interest {
        if wildcard {
            return match self.inner.patterns.unsubscribe(pattern, id) {
                PatternChange::Removed => Interest::Lost,
                _ => Interest::Unchanged,
            };
        }
        match self.inner.exact.entry(pattern.into()) {
            Entry::Occupied(mut e) => {
                e.get_mut().remove(id);
                if e.get().is_empty() {
                    e.remove();
                    Interest::Lost
                } else {
                    Interest::Unchanged
                }
            }
            Entry::Vacant(_) => Interest::Unchanged,
        }
    }

    /// Whether any local socket holds `key` (a topic or pattern).
    pub fn has_key(&self, key: &str, wildcard: bool) -> bool {
        if wildcard {
            self.inner.patterns.get(key).is_some()
        } else {
            self.inner.exact.contains_key(key)
        }
    }

    /// Delivers a message that reached the node through its subscription to
    /// `key` (the cluster link holds one subject subscription per key, so a
    /// message arrives once per matching key). Each socket takes it only
    /// through the first of its own subscriptions that match, so it
    /// receives the message once.
    pub fn deliver_via(&self, key: &str, wildcard: bool, topic: &str, body: Delivery<'_>) -> usize {
        let list: Option<Snapshot> = if wildcard {
            self.inner.patterns.get(key).and_then(|p| p.snapshot())
        } else {
            self.inner.exact.get(key).map(|r| r.value().snapshot())
        };
        let Some(list) = list else {
            return 0;
        };
        let frames = Frames::new(topic, body);
        let mut sent = Sent::default();
        for s in list.iter().flat_map(|c| c.iter()) {
            if !s.has_wildcard() || s.is_first_match(key, topic) {
                sent.push(s, &frames);
            }
        }
        self.count(&sent);
        sent.count
    }

    fn count(&self, sent: &Sent) {
        let m = &self.inner.metrics;
        m.deliveries.fetch_add(sent.count as u64, Relaxed);
        m.bytes_out.fetch_add(sent.bytes as u64, Relaxed);
    }

    /// Distinct concrete topics and wildcard patterns with local subscribers.
    pub fn counts(&self) -> (usize, usize) {
        (self.inner.exact.len(), self.inner.patterns.len())
    }

    /// Delivers a message on concrete `topic` to every local subscriber, once
    /// each even when several of its subscriptions match. Returns how many
    /// sockets it was queued to.
    pub fn deliver(&self, topic: &str, body: Delivery<'_>) -> usize {
        let sent = self.fan_out(topic, body, Sent::default());
        sent.count
    }

    /// [`Hub::deliver`], but only queued: the frames for sockets that were
    /// idle (written at once, one system call each) wait in the returned
    /// [`Queued`] until [`Queued::write`]. A history publish fans out in
    /// its journal's delivery turn and writes after it.
    pub fn queue(&self, topic: &str, body: Delivery<'_>) -> Queued {
        let sent = Sent {
            idle: Some(Vec::new()),
            ..Sent::default()
        };
        let sent = self.fan_out(topic, body, sent);
        Queued {
            count: sent.count,
            idle: sent.idle.unwrap_or_default(),
        }
    }

    fn fan_out(&self, topic: &str, body: Delivery<'_>, mut sent: Sent) -> Sent {
        let exact = self.inner.exact.get(topic).map(|r| r.value().snapshot());
        let found = self.inner.patterns.matching(topic);
        let patterns: &[Arc<Pattern>] = found.as_deref().unwrap_or_default();
        if exact.is_none() && patterns.is_empty() {
            return sent;
        }
        let frames = Frames::new(topic, body);
        match (exact, patterns) {
            // One list: nobody can be in it twice.
            (Some(list), []) => sent.all(&list, &frames),
            (None, [p]) => {
                if let Some(list) = p.snapshot() {
                    sent.all(&list, &frames);
                }
            }
            (exact, patterns) => with_seen(|seen| sent.once_each(exact, patterns, &frames, seen)),
        }
        self.count(&sent);
        sent
    }
}

/// A fan-out queued by [`Hub::queue`]: the frames that found their socket
/// idle are written when this is (or when it is dropped).
pub struct Queued {
    count: usize,
    idle: Vec<(Sub, OwnedWriteHalf)>,
}

impl Queued {
    /// Writes the idle sockets' frames; returns the deliveries made.
    pub fn write(mut self) -> usize {
        self.write_idle();
        self.count
    }

    fn write_idle(&mut self) {
        for (s, wr) in self.idle.drain(..) {
            s.write(wr);
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Never left holding a write half: the socket would stall.
        self.write_idle();
    }
}

/// Socket ids, hashed by one multiplication: ids are the node's own
/// counter, never chosen by a client, and a multiplication by an odd
/// constant spreads consecutive ones over every bucket.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0 ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Seen = HashSet<u64, BuildHasherDefault<IdHasher>>;

/// Entries past which a fan-out's set of served sockets is not kept for
/// the next one (its table would keep over half a megabyte per thread).
const SEEN_KEPT: usize = 1 << 16;

thread_local! {
    /// The sockets a fan-out through several lists has served: one set per
    /// thread, emptied and reused, so such a fan-out allocates nothing for
    /// it once the set has grown to its size.
    static SEEN: RefCell<Seen> = RefCell::new(Seen::default());
}

/// Runs `f` with this thread's empty set of served sockets.
fn with_seen<R>(f: impl FnOnce(&mut Seen) -> R) -> R {
    SEEN.with(|cell| match cell.try_borrow_mut() {
        Ok(mut seen) => {
            let r = f(&mut seen);
            if seen.capacity() > SEEN_KEPT {
                *seen = Seen::default();
            } else {
                seen.clear();
            }
            r
        }
        // Never nested today; if it were, the inner one gets its own.
        Err(_) => f(&mut Seen::default()),
    })
}

/// The frames for one message, each encoded at most once.
struct Frames<'a> {
    topic: &'a str,
    json: Bytes,
    body: Delivery<'a>,
    raw: std::cell::OnceCell<Option<Bytes>>,
    /// Messages in `json` (one, or a batch's length).
    messages: usize,
}

/// A burst's frames, encoded one after another into one buffer.
fn encode_burst(datas: &[Bytes], put: impl Fn(&mut bytes::BytesMut, &[u8])) -> Bytes {
    let estimate = datas.iter().map(|d| d.len() + 64).sum();
    let mut out = bytes::BytesMut::with_capacity(estimate);
    for d in datas {
        put(&mut out, d);
    }
    out.freeze()
}

impl<'a> Frames<'a> {
    fn new(topic: &'a str, body: Delivery<'a>) -> Self {
        let (json, messages) = match body {
            Delivery::Data(d) => (message::encode_delivery(topic, d), 1),
            Delivery::Stored { data, seq, epoch } => {
                (position::encode_delivery_at(topic, data, seq, epoch), 1)
            }
            Delivery::Batch(ds) => (
                encode_burst(ds, |out, d| message::put_delivery(out, topic, d)),
                ds.len(),
            ),
            Delivery::Presence {
                event,
                client,
                user,
                name,
            } => (message::encode_presence(topic, event, client, user, name), 1),
        };
        Frames {
            topic,
            json,
            body,
            raw: std::cell::OnceCell::new(),
            messages,
        }
    }

    /// The frame for a socket in `raw` format, or `None` when the message
    /// has no raw form (presence notices).
    fn for_format(&self, raw: bool) -> Option<&Bytes> {
        if !raw {
            return Some(&self.json);
        }
        self.raw
            .get_or_init(|| match self.body {
                Delivery::Data(d) | Delivery::Stored { data: d, .. } => Some(message::encode_raw(d)),
                Delivery::Batch(ds) => Some(encode_burst(ds, message::put_raw)),
                Delivery::Presence { .. } => None,
            })
            .as_ref()
    }
}

#[derive(Default)]
struct Sent {
    count: usize,
    bytes: usize,
    /// With [`Hub::queue`]: the sockets found idle, with their write
    /// halves, to be written after the fan-out.
    idle: Option<Vec<(Sub, OwnedWriteHalf)>>,
}

impl Sent {
    /// Delivers to every member of one list.
    fn all(&mut self, list: &Snapshot, frames: &Frames<'_>) {
        for s in list.iter().flat_map(|c| c.iter()) {
            self.push(s, frames);
        }
    }

    /// Delivers to the members of the topic's list (if any) and of each
    /// matching pattern, once to each socket. Only a socket holding a
    /// wildcard can be in more than one list, and a list holds a socket
    /// once: so `seen` takes the wildcard holders of the topic's list and
    /// every member of each pattern's list but the last, and the last list
    /// only asks it (not at all when it is empty: the topic's subscribers
    /// plus one pattern's, none of them holding a wildcard, hash nothing).
    fn once_each(
        &mut self,
        exact: Option<Snapshot>,
        patterns: &[Arc<Pattern>],
        frames: &Frames<'_>,
        seen: &mut Seen,
    ) {
        if let Some(list) = exact {
            for s in list.iter().flat_map(|c| c.iter()) {
                if s.has_wildcard() {
                    seen.insert(s.id);
                }
                self.push(s, frames);
            }
        }
        let Some((last, rest)) = patterns.split_last() else {
            return;
        };
        for p in rest {
            for s in p.snapshot().iter().flat_map(|l| l.iter().flat_map(|c| c.iter())) {
                if seen.insert(s.id) {
                    self.push(s, frames);
                }
            }
        }
        for s in last
            .snapshot()
            .iter()
            .flat_map(|l| l.iter().flat_map(|c| c.iter()))
        {
            if seen.is_empty() || !seen.contains(&s.id) {
                self.push(s, frames);
            }
        }
    }

    fn push(&mut self, s: &Sub, frames: &Frames<'_>) {
        // A retired subscription still lists the socket; the topic goes
        // only where a live one wants it.
        if s.has_retired() && !s.wants(frames.topic) {
            return;
        }
        let Some(f) = frames.for_format(s.raw) else {
            return;
        };
        if let Delivery::Stored { seq, .. } = frames.body {
            if s.offer(frames.topic, seq, f) {
                self.count += 1;
                return;
            }
        }
        let pushed = match &mut self.idle {
            None => s.push(f.clone()),
            Some(idle) => {
                let (pushed, wr) = s.queue(f.clone());
                if let Some(wr) = wr {
                    idle.push((s.clone(), wr));
                }
                pushed
            }
        };
        match pushed {
            Pushed::Queued => {
                self.count += frames.messages;
                self.bytes += f.len();
            }
            Pushed::Overflowed | Pushed::Closing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Sub {
        Arc::new(Subscriber::new(id, false, 1 << 20, 0, Default::default(), None))
    }

    #[test]
    fn interest_is_gained_by_the_first_and_lost_with_the_last() {
        let hub = Hub::new(Arc::new(Metrics::default()), Vec::new(), 100);
        let (a, b) = (conn(1), conn(2));
        for (key, wild) in [("chat:lobby", false), ("chat:*", true)] {
            assert_eq!(hub.subscribe(key, wild, &a), Ok(Interest::Gained));
            assert_eq!(hub.subscribe(key, wild, &b), Ok(Interest::Unchanged));
            assert_eq!(hub.subscribe(key, wild, &b), Ok(Interest::Unchanged));
            assert!(hub.has_key(key, wild));
            assert_eq!(hub.unsubscribe(key, wild, 1), Interest::Unchanged);
            assert_eq!(hub.unsubscribe(key, wild, 1), Interest::Unchanged);
            assert_eq!(hub.unsubscribe(key, wild, 2), Interest::Lost);
            assert!(!hub.has_key(key, wild));
        }
        assert_eq!(hub.counts(), (0, 0));
    }

    #[test]
    fn a_socket_matching_several_ways_gets_a_message_once() {
        let hub = Hub::new(Arc::new(Metrics::default()), Vec::new(), 100);
        let (a, b) = (conn(1), conn(2));
        for p in ["chat:lobby", "chat:*", ">"] {
            a.add(crate::socket::subscriber::Subscription::new(p));
            hub.subscribe(p, p != "chat:lobby", &a).unwrap();
        }
        hub.subscribe("chat:lobby", false, &b).unwrap();
        assert_eq!(hub.deliver("chat:lobby", Delivery::Data(b"1")), 2);
        assert_eq!(hub.deliver("chat:other", Delivery::Data(b"2")), 1);
        let batch = [Bytes::from_static(b"3"), Bytes::from_static(b"4")];
        assert_eq!(hub.deliver("chat:lobby", Delivery::Batch(&batch)), 4);
        let frames = a.outbox.try_take(Vec::new()).unwrap().frames;
        assert_eq!(frames.len(), 3, "one push per message or batch");
    }

    fn frames_of(c: &Sub) -> usize {
        c.outbox.try_take(Vec::new()).map_or(0, |b| b.frames.len())
    }

    #[test]
    fn a_socket_matching_by_two_patterns_gets_one_copy() {
        let hub = Hub::new(Arc::new(Metrics::default()), Vec::new(), 100);
        // 1: two patterns; 2: one; 3: the topic and a pattern; 4: the
        // topic only; 5: all three.
        let socks: Vec<Sub> = (1..=5).map(conn).collect();
        let holds: [&[&str]; 5] = [
            &["chat:*", "chat:>"],
            &["chat:>"],
            &["chat:lobby", "chat:*"],
            &["chat:lobby"],
            &["chat:>", "chat:lobby", "chat:*"],
        ];
        for (s, hold) in socks.iter().zip(holds) {
            for p in hold {
                s.add(crate::socket::subscriber::Subscription::new(p));
                hub.subscribe(p, p.contains(['*', '>']), s).unwrap();
            }
        }
        // Twice: the set of served sockets is reused, and must start empty.
        for _ in 0..2 {
            assert_eq!(hub.deliver("chat:lobby", Delivery::Data(b"1")), 5);
            let got: Vec<usize> = socks.iter().map(frames_of).collect();
            assert_eq!(got, [1, 1, 1, 1, 1]);
            assert_eq!(hub.deliver("chat:other", Delivery::Data(b"2")), 4);
            let got: Vec<usize> = socks.iter().map(frames_of).collect();
            assert_eq!(got, [1, 1, 1, 0, 1]);
            assert_eq!(hub.deliver("chat:a:b", Delivery::Data(b"3")), 3);
            let got: Vec<usize> = socks.iter().map(frames_of).collect();
            assert_eq!(got, [1, 1, 0, 0, 1]);
        }
        assert!(SEEN.with(|s| s.borrow().is_empty()));
    }

    #[tokio::test]
    async fn a_queued_fan_out_writes_to_idle_sockets_only_when_told() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        let (_rd, wr) = server.into_split();
        let hub = Hub::new(Arc::new(Metrics::default()), Vec::new(), 100);
        let (a, b) = (conn(1), conn(2));
        a.install(wr);
        hub.subscribe("t", false, &a).unwrap();
        hub.subscribe("t", false, &b).unwrap();
        let queued = hub.queue("t", Delivery::Data(b"1"));
        // Another fan-out before the write: it queues behind the first.
        assert_eq!(hub.deliver("t", Delivery::Data(b"2")), 2);
        let mut byte = [0u8; 1];
        assert!(client.try_read(&mut byte).is_err(), "nothing written yet");
        assert_eq!(frames_of(&b), 2, "a socket with no write half just queues");
        assert_eq!(queued.write(), 2);
        let want = [
            message::encode_delivery("t", b"1"),
            message::encode_delivery("t", b"2"),
        ]
        .concat();
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want, "both, in order");
    }
}
