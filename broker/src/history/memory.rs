//! History in memory, for an embedded node: a bounded ring per history
//! topic, one sequence across all of them, and a node-wide byte cap.
//!
//! The cap bounds memory, not data: a message counts its slot in its ring,
//! its own copy of the data and the header a clone shares it through; a
//! topic counts its ring, its name and its index entry; the containers
//! count their allocations (each at the size the allocator takes, see
//! [`cost`]). Past the cap the oldest message anywhere goes, and a topic
//! goes with its last message, so the cap bounds the number of topics too
//! (a topic of one small message costs about 350 bytes).
//!
//! No work under the lock grows with the store. A replay reads the rings
//! its pattern matches through the [`Index`] (a concrete topic is one
//! lookup); the byte cap and the prune take the next message to drop from
//! a [`Queue`] (oldest `seq`; soonest expiry, for the rings with an age),
//! so each drop costs O(log topics); a copy that starts over frees the old
//! one after the lock.
//!
//! Also the words every history store shares: where a replay starts
//! ([`From`]), what it gives ([`Replay`]) and why it cannot
//! ([`ReplayError`]).
//!
//! A publish on a history topic takes the journal's delivery turn; under
//! the journal's lock it gets the next `seq` and is stored; then, the lock
//! released and the turn still held, it is handed to the hub. So every
//! socket sees history messages in increasing `seq`, whoever published
//! them, while the journal itself (a recovery reading it, `GET
//! /v1/history`, the prune tick) never waits for a fan-out; only the next
//! history publish does. Each ring remembers the highest `seq` it ever
//! dropped, so a recovery knows exactly whether anything it would need is
//! gone.
//!
//! Why the turn is one for the node, not one per topic: a socket gets
//! history messages in increasing `seq` across topics too (a wildcard, or
//! two subscriptions, span topics; `docs/protocol.md`: the last `seq` a
//! client has marks everything before it on every topic it matches, so a
//! client that got 11 and reconnects from 11 must have had 10), and a
//! recovery's floor (see [`Subscriber::offer`]) ends at the first live
//! `seq` above the replay, which is right only if none lower comes after
//! it. Two topics fanned out at once could hand a socket 11 before 10. A
//! per-topic turn would be enough for sockets of one topic only, and which
//! sockets those are changes with every subscribe. What the turn covers is
//! cheap, though: the hub only queues under it, and the frames it would
//! write at once (a system call each) go out after it (the hub's `queue`).
//!
//! Why the seam stays exact with the fan-out outside the lock: a recovery
//! lists its subscription (holding, see [`Subscriber::offer`]) and then
//! reads, under the lock, up to the last `seq` stored (`through`). A
//! message stored before that read is in the replay (or reported lost),
//! though its delivery may now come after the read: into the hold, and
//! dropped at the release as at most `through`; or after the release,
//! dropped by the floor, since no delivery above `through` can come before
//! it (turn order). A message stored after the read has a `seq` above
//! `through` and reaches the listed subscription: held and released, or
//! live. It is the seam a cluster node already has: its feed stores into
//! its tail and then delivers, in the stream's order.
//!
//! [`Subscriber::offer`]: crate::socket::subscriber::Subscriber::offer

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_protocol::position::Unrecovered;

use crate::config::values::Retention;
use crate::history::index::Index;
use crate::history::queue::{Queue, Slots};
use crate::history::rings::{cost, Msg, Ring, Rings, EXPIRY, OLDEST};
use crate::metrics::Metrics;
use crate::sync::Lock;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Everything after this `seq`.
    Since(u64),
    /// The latest message of each matching topic.
    Last,
}

/// Retained messages for one subscription, oldest first.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// `(topic, seq, data)` in increasing `seq`.
    pub messages: Vec<(Arc<str>, u64, Bytes)>,
    /// Every message up to this `seq` is in `messages` or was not for
    /// this subscription: live deliveries at or below it are duplicates.
    pub through: u64,
}

/// Why a replay was not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayError {
    /// The client cannot get everything it missed; the ack says why.
    Unrecovered(Unrecovered),
    /// The position is ahead of the history (which is at the given `seq`).
    Future(u64),
}

/// The embedded node's history.
pub struct Journal {
    epoch: Arc<str>,
    /// `--history-bytes`: what everything held may cost (see [`cost`]).
    cap: u64,
    state: Mutex<State>,
    /// The delivery turn: held by a publish from taking its `seq` to the
    /// end of its fan-out, so fan-outs go in `seq` order (see the module
    /// doc). Taken before `state`, never the other way.
    turn: Mutex<()>,
    /// Where the history's gauges and its read counter go.
    metrics: Arc<Metrics>,
}

struct State {
    /// The last `seq` given.
    seq: u64,
    /// The first `seq` inserted from elsewhere (0: none).
    first: u64,
    /// Ring ids by topic.
    index: Index,
    rings: Rings,
    /// Every ring, oldest message first: what the byte cap drops next.
    oldest: Queue,
    /// Every ring with an age, soonest expiry first: what the prune drops.
    expiry: Queue,
    /// What messages and rings cost (see [`cost`]); with the containers'
    /// own allocations, what is held against the cap.
    held: u64,
    stored: usize,
    /// The highest `seq` dropped from a ring that no longer exists.
    lost_floor: u64,
}

impl Journal {
    /// An empty history holding at most `cap` bytes (data and what holding
    /// it costs), with a new epoch (so a restarted node's positions are
    /// refused as `epoch_changed`); its gauges go to `metrics`.
    pub fn new(cap: u64, metrics: Arc<Metrics>) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Journal {
            epoch: epoch_of(nanos ^ (u64::from(std::process::id()) << 40)).into(),
            cap,
            state: Mutex::new(State::new()),
            turn: Mutex::new(()),
            metrics,
        }
    }

    /// The history's epoch.
    pub fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    /// The last `seq` stored and fanned out: taken in the delivery turn,
    /// so a subscription listed before this read receives every message
    /// above it.
    pub fn position(&self) -> u64 {
        let _turn = self.turn.locked();
        self.lock().seq
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Messages and bytes held.
    #[cfg(test)]
    fn size(&self) -> (usize, u64) {
        let s = self.lock();
        (s.stored, s.bytes())
    }

    /// Stores `data` on `topic` under `rule` and calls `deliver` with its
    /// `seq`, in the journal's delivery turn but outside its lock:
    /// deliveries leave in `seq` order, and only the next `append` waits
    /// for them.
    pub fn append<R>(&self, topic: &str, rule: &Retention, data: Bytes, deliver: impl FnOnce(u64) -> R) -> R {
        self.append_at(topic, rule, data, crate::clock::now_ms(), deliver)
    }

    /// Stores `data` on `topic` at a `seq` given elsewhere (a cluster
    /// node's copy of the stream's tail): ignored unless above every
    /// `seq` held.
    pub fn insert(&self, topic: &str, rule: &Retention, seq: u64, data: Bytes) {
        let now = crate::clock::now_ms();
        let mut s = self.lock();
        if seq <= s.seq {
            return;
        }
        let mut gone = None;
        if s.first != 0 && seq != s.seq + 1 {
            // A hole (the copy missed messages): it covers only from here.
            // What it held is freed after the lock.
            gone = Some(std::mem::replace(&mut *s, State::new()));
        }
        if s.first == 0 {
            s.first = seq;
        }
        s.seq = seq - 1;
        s.store(topic, rule, data, now, self.cap);
        s.report(&self.metrics);
        drop(s);
        drop(gone);
    }

    /// Forgets everything (a cluster node's copy of a stream that was
    /// replaced: its positions mean nothing in the new one).
    pub fn clear(&self) {
        let mut s = self.lock();
        let gone = std::mem::replace(&mut *s, State::new());
        s.report(&self.metrics);
        drop(s);
        drop(gone);
    }

    /// Whether a replay after `since` lies within what was inserted: from
    /// the first `seq` on, up to the last.
    pub fn covers(&self, since: u64) -> bool {
        let s = self.lock();
        s.first > 0 && since + 1 >= s.first && since <= s.seq
    }

    fn append_at<R>(
        &self,
        topic: &str,
        rule: &Retention,
        data: Bytes,
        now_ms: u64,
        deliver: impl FnOnce(u64) -> R,
    ) -> R {
        let _turn = self.turn.locked();
        let seq = {
            let mut s = self.lock();
            let seq = s.store(topic, rule, data, now_ms, self.cap);
            s.report(&self.metrics);
            seq
        };
        deliver(seq)
    }

    /// Drops messages older than their topic's age.
    pub fn prune(&self) {
        self.prune_at(crate::clock::now_ms())
    }

    /// The expiry queue gives the next message to go: the work is the
    /// messages dropped, whatever the number of rings.
    fn prune_at(&self, now_ms: u64) {
        let mut s = self.lock();
        while let Some(id) = s.expiry.first() {
            if s.rings.key(EXPIRY, id) >= now_ms {
                break;
            }
            s.drop_oldest(id);
        }
        s.report(&self.metrics);
    }

    /// What a subscription to `pattern` missed after `from`, at most `max`
    /// messages. Reads the rings `pattern` matches, and only those.
    pub fn replay(&self, pattern: &str, from: From, max: usize) -> Result<Replay, ReplayError> {
        let mut messages = Vec::new();
        let mut read = 0u64;
        let mut refused = None;
        let through = {
            let s = self.lock();
            match from {
                From::Since(since) => {
                    if since > s.seq {
                        return Err(ReplayError::Future(s.seq));
                    }
                    // A topic without a ring lost everything it had, at
                    // most up to the floor.
                    if s.lost_floor > since {
                        return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
                    }
                    s.index.walk(pattern, &mut |name, id| {
                        read += 1;
                        let ring = s.rings.get(id);
                        if ring.lost_through > since {
                            refused = Some(Unrecovered::TooOld);
                            return ControlFlow::Break(());
                        }
                        let at = ring.msgs.partition_point(|m| m.seq <= since);
                        if at == ring.msgs.len() {
                            return ControlFlow::Continue(());
                        }
                        if messages.len() + ring.msgs.len() - at > max {
                            refused = Some(Unrecovered::TooMany);
                            return ControlFlow::Break(());
                        }
                        let topic = Index::topic(name);
                        messages.extend(
                            ring.msgs
                                .range(at..)
                                .map(|m| (topic.clone(), m.seq, m.data.clone())),
                        );
                        ControlFlow::Continue(())
                    });
                }
                From::Last => {
                    s.index.walk(pattern, &mut |name, id| {
                        read += 1;
                        let Some(m) = s.rings.get(id).msgs.back() else {
                            return ControlFlow::Continue(());
                        };
                        if messages.len() == max {
                            refused = Some(Unrecovered::TooMany);
                            return ControlFlow::Break(());
                        }
                        messages.push((Index::topic(name), m.seq, m.data.clone()));
                        ControlFlow::Continue(())
                    });
                }
            }
            s.seq
        };
        self.metrics.history_rings_read.fetch_add(read, Relaxed);
        if let Some(why) = refused {
            return Err(ReplayError::Unrecovered(why));
        }
        messages.sort_unstable_by_key(|m| m.1);
        Ok(Replay { messages, through })
    }

    /// Up to `limit` retained messages of concrete `topic` after `since`,
    /// and whether every message after `since` is still retained.
    pub fn read(&self, topic: &str, since: u64, limit: usize) -> (Vec<(u64, Bytes)>, bool) {
        let s = self.lock();
        let Some(id) = s.index.get(topic) else {
            return (Vec::new(), s.lost_floor <= since);
        };
        self.metrics.history_rings_read.fetch_add(1, Relaxed);
        let ring = s.rings.get(id);
        let at = ring.msgs.partition_point(|m| m.seq <= since);
        let page = ring
            .msgs
            .range(at..)
            .take(limit)
            .map(|m| (m.seq, m.data.clone()))
            .collect();
        (page, ring.lost_through <= since && s.lost_floor <= since)
    }
}

impl State {
    fn new() -> State {
        State {
            seq: 0,
            first: 0,
            index: Index::default(),
            rings: Rings::default(),
            oldest: Queue::new(OLDEST),
            expiry: Queue::new(EXPIRY),
            held: 0,
            stored: 0,
            lost_floor: 0,
        }
    }

    /// What is held against the cap: messages, rings, and the allocations
    /// of the containers that hold them.
    fn bytes(&self) -> u64 {
        self.held
            + cost::chunk(self.rings.capacity_bytes())
            + cost::chunk(self.oldest.capacity_bytes())
            + cost::chunk(self.expiry.capacity_bytes())
    }

    /// Sets the history's gauges.
    fn report(&self, metrics: &Metrics) {
        metrics.history_bytes.store(self.bytes() as i64, Relaxed);
        metrics.history_topics.store(self.index.len() as i64, Relaxed);
        metrics.history_messages.store(self.stored as i64, Relaxed);
    }

    /// Stores `data` on `topic` under `rule` at the next `seq`, dropping
    /// what the ring's count or the byte cap `cap` no longer allows (the
    /// oldest message anywhere, and with a ring's last its whole ring);
    /// returns the `seq`.
    fn store(&mut self, topic: &str, rule: &Retention, data: Bytes, now_ms: u64, cap: u64) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        // An owned copy: `data` is a slice of the whole frame or body it
        // came in (a 1-byte value beside a 60 KB field would pin all 60 KB
        // for as long as it is kept, uncounted by the byte cap).
        let data = Bytes::copy_from_slice(&data);
        self.held += cost::message(data.len());
        self.stored += 1;
        let id = match self.index.get(topic) {
            Some(id) => {
                let ring = self.rings.get_mut(id);
                // Never before the ring's newest: each ring's messages
                // expire in order.
                let at = ring.msgs.back().map_or(now_ms, |m| m.at.max(now_ms));
                ring.msgs.push_back(Msg { seq, at, data });
                self.recount(id);
                id
            }
            None => self.open(
                topic,
                rule,
                Msg {
                    seq,
                    at: now_ms,
                    data,
                },
            ),
        };
        if let Some(max) = self.rings.get(id).count {
            while self.rings.get(id).msgs.len() as u64 > max {
                self.drop_oldest(id);
            }
        }
        while self.bytes() > cap {
            let Some(oldest) = self.oldest.first() else {
                break;
            };
            self.drop_oldest(oldest);
        }
        seq
    }

    /// A ring for `topic`, holding its first message, queued.
    fn open(&mut self, topic: &str, rule: &Retention, first: Msg) -> u32 {
        let mut msgs = VecDeque::with_capacity(1);
        msgs.push_back(first);
        let name = Index::name(topic);
        self.held += cost::ring(name.len());
        let id = self.rings.add(Ring {
            msgs,
            lost_through: 0,
            count: rule.count,
            age_ms: rule.age.map(|a| a.as_millis() as u64),
            name: name.clone(),
            counted: 0,
            places: [0; 2],
        });
        self.index.insert(name, id);
        self.recount(id);
        self.oldest.push(&mut self.rings, id);
        if self.rings.get(id).age_ms.is_some() {
            self.expiry.push(&mut self.rings, id);
        }
        id
    }

    /// Drops ring `id`'s oldest message, and the ring with its last.
    fn drop_oldest(&mut self, id: u32) {
        let ring = self.rings.get_mut(id);
        let m = ring.msgs.pop_front().expect("a ring holds a message");
        ring.lost_through = m.seq;
        self.held -= cost::message(m.data.len());
        self.stored -= 1;
        if ring.msgs.is_empty() {
            return self.close(id);
        }
        if ring.msgs.capacity() > 4 && ring.msgs.len() * 4 < ring.msgs.capacity() {
            let keep = ring.msgs.len() * 2;
            ring.msgs.shrink_to(keep);
        }
        self.recount(id);
        self.oldest.moved(&mut self.rings, id);
        if self.rings.get(id).age_ms.is_some() {
            self.expiry.moved(&mut self.rings, id);
        }
    }

    /// Forgets empty ring `id`: what it lost is under the floor now.
    fn close(&mut self, id: u32) {
        self.oldest.remove(&mut self.rings, id);
        if self.rings.get(id).age_ms.is_some() {
            self.expiry.remove(&mut self.rings, id);
        }
        let ring = self.rings.take(id);
        self.index.remove(&ring.name);
        self.held -= cost::ring(ring.name.len()) + ring.counted;
        self.lost_floor = self.lost_floor.max(ring.lost_through);
    }

    /// Counts ring `id`'s slots at their allocation now.
    fn recount(&mut self, id: u32) {
        let ring = self.rings.get_mut(id);
        let now = cost::slots(ring.msgs.capacity());
        self.held = self.held + now - ring.counted;
        ring.counted = now;
    }
}

/// A short epoch from a number: base 36.
pub fn epoch_of(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(count: Option<u64>, age_s: Option<u64>) -> Retention {
        Retention {
            pattern: ">".into(),
            count,
            age: age_s.map(std::time::Duration::from_secs),
        }
    }

    fn journal(cap: u64) -> Journal {
        Journal::new(cap, Arc::default())
    }

    fn put(j: &Journal, topic: &str, r: &Retention, now: u64) -> u64 {
        j.append_at(topic, r, Bytes::from_static(b"1"), now, |seq| seq)
    }

    #[test]
    fn replays_after_a_position_in_order_across_topics() {
        let j = journal(1 << 20);
        let r = rule(Some(10), None);
        for i in 0..6 {
            put(&j, if i % 2 == 0 { "room:a" } else { "room:b" }, &r, 0);
        }
        put(&j, "other", &r, 0);
        let got = j.replay("room:>", From::Since(2), 100).unwrap();
        let seqs: Vec<u64> = got.messages.iter().map(|m| m.1).collect();
        assert_eq!(seqs, [3, 4, 5, 6]);
        assert_eq!(got.through, 7);
        let last = j.replay("room:*", From::Last, 100).unwrap();
        assert_eq!(last.messages.iter().map(|m| m.1).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(
            j.replay("room:>", From::Since(8), 100),
            Err(ReplayError::Future(7))
        );
        assert_eq!(
            j.replay("room:>", From::Since(0), 3),
            Err(ReplayError::Unrecovered(Unrecovered::TooMany))
        );
    }

    #[test]
    fn knows_exactly_what_it_lost() {
        let j = journal(1 << 20);
        let r = rule(Some(2), None);
        for _ in 0..3 {
            put(&j, "a", &r, 0);
        }
        put(&j, "b", &r, 0);
        // a lost seq 1: from 0 it is gone, from 1 nothing is.
        assert_eq!(
            j.replay("a", From::Since(0), 9),
            Err(ReplayError::Unrecovered(Unrecovered::TooOld))
        );
        assert_eq!(j.replay("a", From::Since(1), 9).unwrap().messages.len(), 2);
        assert_eq!(j.replay("b", From::Since(0), 9).unwrap().messages.len(), 1);
        // Age: everything on `c` expires; the floor remembers it.
        let aged = rule(None, Some(1));
        put(&j, "c", &aged, 0);
        j.prune_at(5_000);
        assert_eq!(
            j.replay("c", From::Since(4), 9),
            Err(ReplayError::Unrecovered(Unrecovered::TooOld))
        );
        assert_eq!(j.size().0, 3);
    }

    /// What the journal holds, counted afresh from its rings.
    fn recount(j: &Journal) -> u64 {
        let s = j.lock();
        let mut held = 0;
        for ring in s.rings.slots.iter().flatten() {
            held += cost::ring(ring.name.len()) + cost::slots(ring.msgs.capacity());
            held += ring.msgs.iter().map(|m| cost::message(m.data.len())).sum::<u64>();
        }
        assert_eq!(s.held, held, "the running count is what is held");
        s.bytes()
    }

    #[test]
    fn the_byte_cap_counts_what_holding_costs_and_drops_the_oldest_anywhere() {
        let cap = 20_000;
        let j = journal(cap);
        let r = rule(None, None);
        for i in 0..2_000 {
            put(&j, ["a", "b", "c"][i % 3], &r, 0);
            assert!(recount(&j) <= cap);
        }
        let (n, b) = j.size();
        // A 1-byte message costs its slot, its copy and a header: far
        // more than its byte, so far fewer than 20,000 fit.
        assert!(b <= cap && n > 50 && n < 400, "{n} messages, {b} bytes");
        let first = 2_000 - n as u64;
        let got = j.replay(">", From::Since(first), 10_000).unwrap();
        assert_eq!(got.messages.len(), n, "the newest are kept");
        assert!(j.replay(">", From::Since(first - 1), 10_000).is_err());
        // Distinct topics: each costs its ring, its name, its index entry;
        // the oldest go, so the cap bounds how many are held.
        for i in 0..10_000 {
            put(&j, &format!("t:{i}"), &rule(Some(1), None), 0);
        }
        assert!(recount(&j) <= cap);
        let s = j.lock();
        let each = cost::ring(3) + cost::slots(1) + cost::message(1);
        assert!(s.index.len() as u64 * each <= cap, "{} topics", s.index.len());
        assert!(s.index.len() > 10, "{} topics", s.index.len());
        assert_eq!(s.rings.slots.iter().flatten().count(), s.index.len());
        assert!(s.lost_floor >= 2_000, "what went is under the floor");
    }

    #[test]
    fn the_running_count_follows_every_change() {
        let j = journal(1 << 16);
        let (kept, aged, big) = (rule(Some(3), None), rule(None, Some(1)), rule(None, None));
        for i in 0..3_000u64 {
            let topic = format!("x:{}", i % 97);
            match i % 5 {
                0 => put(&j, &topic, &aged, i),
                1 => j.append_at(
                    "big",
                    &big,
                    Bytes::from(vec![b'7'; (i % 700) as usize + 1]),
                    i,
                    |s| s,
                ),
                _ => put(&j, &topic, &kept, i),
            };
            if i % 250 == 0 {
                j.prune_at(i);
            }
            assert!(recount(&j) <= 1 << 16);
        }
        j.prune_at(u64::MAX);
        recount(&j);
        let k = journal(1 << 16);
        for seq in 1..100 {
            k.insert(&format!("x:{seq}"), &kept, seq, Bytes::from_static(b"1"));
        }
        k.insert("y", &kept, 1_000, Bytes::from_static(b"1"));
        assert_eq!(recount(&k), k.size().1);
        assert_eq!(k.size().0, 1, "a hole starts the copy over");
    }

    #[test]
    fn the_prune_looks_only_at_what_ages() {
        let j = journal(1 << 24);
        for i in 0..10_000 {
            put(&j, &format!("kept:{i}"), &rule(Some(5), None), 0);
        }
        let aged = rule(None, Some(1));
        for i in 0..10 {
            put(&j, &format!("aged:{i}"), &aged, i * 100);
        }
        {
            let s = j.lock();
            assert_eq!(s.rings.key(EXPIRY, s.expiry.first().unwrap()), 1_000);
        }
        j.prune_at(1_450);
        assert_eq!(j.size().0, 10_000 + 5, "only the five expired went");
        j.prune_at(10_000);
        let s = j.lock();
        assert!(s.expiry.first().is_none());
        assert_eq!(s.index.len(), 10_000);
    }

    #[test]
    fn a_replay_reads_only_the_rings_it_matches() {
        let metrics = Arc::new(Metrics::default());
        let j = Journal::new(1 << 24, metrics.clone());
        let r = rule(Some(5), None);
        for i in 0..10_000 {
            put(&j, &format!("t:{i}"), &r, 0);
        }
        for i in 0..7 {
            put(&j, &format!("room:{i}:x"), &r, 0);
        }
        let read = || metrics.history_rings_read.load(Relaxed);
        assert_eq!(j.replay("t:77", From::Since(0), 10).unwrap().messages.len(), 1);
        assert_eq!(read(), 1);
        assert_eq!(
            j.replay("room:*:x", From::Since(0), 10).unwrap().messages.len(),
            7
        );
        assert_eq!(read(), 8);
        assert_eq!(j.replay("room:>", From::Last, 10).unwrap().messages.len(), 7);
        assert_eq!(read(), 15);
        assert_eq!(j.read("t:5", 0, 10).0.len(), 1);
        assert_eq!(read(), 16);
    }

    #[test]
    fn a_copy_of_a_tail_covers_from_its_first_insert() {
        let j = journal(1 << 20);
        let r = rule(Some(10), None);
        assert!(!j.covers(0));
        j.insert("a", &r, 41, Bytes::from_static(b"1"));
        j.insert("b", &r, 42, Bytes::from_static(b"2"));
        j.insert("a", &r, 42, Bytes::from_static(b"again"));
        assert!(j.covers(40) && j.covers(42) && !j.covers(39) && !j.covers(43));
        let got = j.replay(">", From::Since(40), 10).unwrap();
        assert_eq!(got.messages.iter().map(|m| m.1).collect::<Vec<_>>(), [41, 42]);
        assert_eq!(got.through, 42);
        // A hole: coverage starts over after it.
        j.insert("a", &r, 50, Bytes::from_static(b"3"));
        assert!(!j.covers(42) && j.covers(49) && j.covers(50));
        assert_eq!(j.replay(">", From::Since(49), 10).unwrap().messages.len(), 1);
    }

    #[test]
    fn a_fan_out_runs_outside_the_lock_in_the_turn() {
        let j = Arc::new(journal(1 << 20));
        let r = rule(Some(10), None);
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = |e: String| events.locked().push(e);
        let other = j.append_at("a", &r, Bytes::from_static(b"1"), 0, |seq| {
            // The journal is free: a recovery's read, a page, the prune
            // tick go on during a fan-out, and see the message stored.
            assert!(
                j.state.try_lock().is_ok(),
                "the journal is locked through a fan-out"
            );
            assert_eq!(j.replay(">", From::Since(0), 10).unwrap().through, seq);
            assert_eq!(j.read("a", 0, 10).0.len(), 1);
            j.prune();
            // Another publish, on another topic, waits for this fan-out.
            let other = std::thread::spawn({
                let (j, r, events) = (j.clone(), r.clone(), events.clone());
                move || {
                    j.append_at("b", &r, Bytes::from_static(b"2"), 0, |seq| {
                        events.locked().push(format!("b {seq}"));
                    })
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            log(format!("a {seq}"));
            other
        });
        other.join().unwrap();
        assert_eq!(*events.locked(), ["a 1", "b 2"], "fan-outs in seq order");
    }
}
