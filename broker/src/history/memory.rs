//! History in memory, for an embedded node: a bounded ring per history
//! topic, one sequence across all of them, and a node-wide byte cap.
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use herald_protocol::position::Unrecovered;
use herald_protocol::topic;

use crate::config::values::Retention;
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
    cap: u64,
    state: Mutex<State>,
    /// The delivery turn: held by a publish from taking its `seq` to the
    /// end of its fan-out, so fan-outs go in `seq` order (see the module
    /// doc). Taken before `state`, never the other way.
    turn: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The last `seq` given.
    seq: u64,
    /// The first `seq` inserted from elsewhere (0: none).
    first: u64,
    topics: HashMap<Arc<str>, Ring>,
    /// Every stored message in `seq` order, for the byte cap; entries
    /// whose message already left its ring are skipped (and compacted).
    order: VecDeque<(u64, Arc<str>)>,
    bytes: u64,
    stored: usize,
    /// The highest `seq` dropped from a ring that no longer exists.
    lost_floor: u64,
}

struct Ring {
    msgs: VecDeque<(u64, u64, Bytes)>,
    /// The highest `seq` this topic ever dropped.
    lost_through: u64,
    count: Option<u64>,
    age_ms: Option<u64>,
}

impl Journal {
    /// An empty history holding at most `cap` bytes of data, with a new
    /// epoch (so a restarted node's positions are refused as
    /// `epoch_changed`).
    pub fn new(cap: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Journal {
            epoch: epoch_of(nanos ^ (u64::from(std::process::id()) << 40)).into(),
            cap,
            state: Mutex::new(State::default()),
            turn: Mutex::new(()),
        }
    }

    /// The history's epoch.
    pub fn epoch(&self) -> Arc<str> {
        self.epoch.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Messages and bytes held.
    #[cfg(test)]
    fn size(&self) -> (usize, u64) {
        let s = self.lock();
        (s.stored, s.bytes)
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
        if s.first != 0 && seq != s.seq + 1 {
            // A hole (the copy missed messages): it covers only from here.
            *s = State::default();
        }
        if s.first == 0 {
            s.first = seq;
        }
        s.seq = seq - 1;
        s.store(topic, rule, data, now, self.cap);
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
        let seq = self.lock().store(topic, rule, data, now_ms, self.cap);
        deliver(seq)
    }

    /// Drops messages older than their topic's age.
    pub fn prune(&self) {
        self.prune_at(crate::clock::now_ms())
    }

    fn prune_at(&self, now_ms: u64) {
        let mut s = self.lock();
        let (mut n, mut b) = (0usize, 0u64);
        let mut emptied = Vec::new();
        for (t, ring) in s.topics.iter_mut() {
            let Some(age) = ring.age_ms else { continue };
            while ring.msgs.front().is_some_and(|m| m.1 + age < now_ms) {
                let (old, _, d) = ring.msgs.pop_front().expect("checked");
                ring.lost_through = old;
                n += 1;
                b += d.len() as u64;
            }
            if ring.msgs.is_empty() {
                emptied.push((t.clone(), ring.lost_through));
            }
        }
        s.stored -= n;
        s.bytes -= b;
        for (t, lost) in emptied {
            s.topics.remove(&t);
            s.lost_floor = s.lost_floor.max(lost);
        }
        s.compact();
    }

    /// What a subscription to `pattern` missed after `from`, at most `max`
    /// messages.
    pub fn replay(&self, pattern: &str, from: From, max: usize) -> Result<Replay, ReplayError> {
        let s = self.lock();
        let mut messages = Vec::new();
        match from {
            From::Since(since) => {
                if since > s.seq {
                    return Err(ReplayError::Future(s.seq));
                }
                // A topic without a ring lost everything it had, at most
                // up to the floor.
                if s.lost_floor > since {
                    return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
                }
                for (t, ring) in s.topics.iter().filter(|(t, _)| topic::matches(pattern, t)) {
                    if ring.lost_through > since {
                        return Err(ReplayError::Unrecovered(Unrecovered::TooOld));
                    }
                    let at = ring.msgs.partition_point(|m| m.0 <= since);
                    if messages.len() + ring.msgs.len() - at > max {
                        return Err(ReplayError::Unrecovered(Unrecovered::TooMany));
                    }
                    messages.extend(ring.msgs.range(at..).map(|m| (t.clone(), m.0, m.2.clone())));
                }
            }
            From::Last => {
                for (t, ring) in s.topics.iter().filter(|(t, _)| topic::matches(pattern, t)) {
                    if let Some(m) = ring.msgs.back() {
                        if messages.len() == max {
                            return Err(ReplayError::Unrecovered(Unrecovered::TooMany));
                        }
                        messages.push((t.clone(), m.0, m.2.clone()));
                    }
                }
            }
        }
        messages.sort_unstable_by_key(|m| m.1);
        Ok(Replay {
            messages,
            through: s.seq,
        })
    }

    /// Up to `limit` retained messages of concrete `topic` after `since`,
    /// and whether every message after `since` is still retained.
    pub fn read(&self, topic: &str, since: u64, limit: usize) -> (Vec<(u64, Bytes)>, bool) {
        let s = self.lock();
        let Some(ring) = s.topics.get(topic) else {
            return (Vec::new(), s.lost_floor <= since);
        };
        let at = ring.msgs.partition_point(|m| m.0 <= since);
        let page = ring
            .msgs
            .range(at..)
            .take(limit)
            .map(|m| (m.0, m.2.clone()))
            .collect();
        (page, ring.lost_through <= since && s.lost_floor <= since)
    }
}

impl State {
    /// Stores `data` on `topic` under `rule` at the next `seq`, dropping
    /// what the ring's count or the byte cap `cap` no longer allows;
    /// returns the `seq`.
    fn store(&mut self, topic: &str, rule: &Retention, data: Bytes, now_ms: u64, cap: u64) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        // An owned copy: `data` is a slice of the whole frame or body it
        // came in (a 1-byte value beside a 60 KB field would pin all 60 KB
        // for as long as it is kept, uncounted by the byte cap).
        let data = Bytes::copy_from_slice(&data);
        let len = data.len() as u64;
        let key: Arc<str> = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => topic.into(),
        };
        let ring = self.topics.entry(key.clone()).or_insert_with(|| Ring {
            msgs: VecDeque::new(),
            lost_through: 0,
            count: rule.count,
            age_ms: rule.age.map(|a| a.as_millis() as u64),
        });
        ring.msgs.push_back((seq, now_ms, data));
        let mut freed = (0usize, 0u64);
        if let Some(max) = ring.count {
            while ring.msgs.len() as u64 > max {
                let (old, _, d) = ring.msgs.pop_front().expect("ring over its count");
                ring.lost_through = old;
                freed = (freed.0 + 1, freed.1 + d.len() as u64);
            }
        }
        self.stored = self.stored + 1 - freed.0;
        self.bytes = self.bytes + len - freed.1;
        self.order.push_back((seq, key));
        while self.bytes > cap {
            let Some((old, t)) = self.order.pop_front() else {
                break;
            };
            self.drop_head(&t, old);
        }
        self.compact();
        seq
    }

    /// Drops `seq` from `topic`'s ring if it is still its oldest message.
    fn drop_head(&mut self, topic: &str, seq: u64) {
        let Some(ring) = self.topics.get_mut(topic) else {
            return;
        };
        if ring.msgs.front().is_none_or(|m| m.0 != seq) {
            return;
        }
        let (_, _, d) = ring.msgs.pop_front().expect("checked");
        ring.lost_through = seq;
        self.stored -= 1;
        self.bytes -= d.len() as u64;
        if ring.msgs.is_empty() {
            let lost = ring.lost_through;
            self.topics.remove(topic);
            self.lost_floor = self.lost_floor.max(lost);
        }
    }

    /// Forgets `order` entries of messages already gone, once they are
    /// most of it: amortized O(1) per message.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.stored + 1024 {
            return;
        }
        let topics = &self.topics;
        self.order.retain(|(seq, t)| {
            topics
                .get(t)
                .is_some_and(|r| r.msgs.front().is_some_and(|m| m.0 <= *seq))
        });
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

    fn put(j: &Journal, topic: &str, r: &Retention, now: u64) -> u64 {
        j.append_at(topic, r, Bytes::from_static(b"1"), now, |seq| seq)
    }

    #[test]
    fn replays_after_a_position_in_order_across_topics() {
        let j = Journal::new(1 << 20);
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
        let j = Journal::new(1 << 20);
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

    #[test]
    fn the_byte_cap_drops_the_oldest_anywhere() {
        let j = Journal::new(10);
        let r = rule(None, None);
        for i in 0..25 {
            put(&j, ["a", "b", "c"][i % 3], &r, 0);
        }
        let (n, b) = j.size();
        assert_eq!((n, b), (10, 10));
        let got = j.replay(">", From::Since(15), 100).unwrap();
        assert_eq!(got.messages.len(), 10);
        assert!(j.replay(">", From::Since(14), 100).is_err());
        for _ in 0..10_000 {
            put(&j, "z", &rule(Some(1), None), 0);
        }
        assert!(j.lock().order.len() < 3000, "order is compacted");
    }

    #[test]
    fn a_copy_of_a_tail_covers_from_its_first_insert() {
        let j = Journal::new(1 << 20);
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
        let j = Arc::new(Journal::new(1 << 20));
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
