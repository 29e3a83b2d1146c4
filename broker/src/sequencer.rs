//! Puts a history topic's messages back in stream order as they arrive
//! from NATS.
//!
//! The stream stores a topic's messages in order, but the server
//! republishes them from several goroutines, so under load two of them
//! can reach a node swapped (measured with nats-server 2.9: one swap in a
//! few thousand with two publishers). Each republished message names its
//! topic's previous message (`Nats-Last-Sequence`), so a node can tell: a
//! message whose predecessor it has not delivered yet waits until the
//! predecessor comes, or at most [`WAIT`], and then goes in `seq` order
//! anyway. A message whose predecessor is gone from the stream names 0
//! and goes at once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Longest a message waits for its predecessor.
pub const WAIT: Duration = Duration::from_millis(250);

/// Chains idle this long are forgotten once there are many.
const IDLE: Duration = Duration::from_secs(60);
const MANY: usize = 4096;

/// The per-topic chains of one subject subscription.
pub struct Sequencer<T> {
    topics: HashMap<String, Chain<T>>,
}

struct Chain<T> {
    /// The last `seq` delivered.
    last: u64,
    /// Messages waiting for a predecessor: by `seq`, with theirs.
    waiting: BTreeMap<u64, (u64, T)>,
    /// When the oldest waiting message arrived.
    since: Option<Instant>,
    touched: Instant,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Sequencer { topics: HashMap::new() }
    }
}

impl<T> Sequencer<T> {
    /// Takes message `seq` on `topic`, whose predecessor is `prev` (0:
    /// none, or deleted); appends what may now be delivered, in order, to
    /// `out`. Returns whether the message came after one with a higher
    /// `seq` was delivered (it is delivered anyway).
    pub fn offer(&mut self, topic: &str, seq: u64, prev: u64, item: T, now: Instant, out: &mut Vec<T>) -> bool {
        if self.topics.len() > MANY {
            self.topics
                .retain(|_, c| !c.waiting.is_empty() || now.duration_since(c.touched) < IDLE);
        }
        let chain = match self.topics.get_mut(topic) {
            Some(c) => c,
            None => self.topics.entry(topic.to_owned()).or_insert(Chain {
                last: 0,
                waiting: BTreeMap::new(),
                since: None,
                touched: now,
            }),
        };
        chain.touched = now;
        if seq <= chain.last {
            out.push(item);
            return true;
        }
        if chain.last == 0 || prev == 0 || prev <= chain.last {
            chain.last = seq;
            out.push(item);
            chain.release(out);
        } else {
            chain.waiting.insert(seq, (prev, item));
            chain.since.get_or_insert(now);
        }
        false
    }

    /// When the oldest waiting message times out, if any waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.topics.values().filter_map(|c| c.since).min().map(|t| t + WAIT)
    }

    /// Delivers, in `seq` order, what waited longer than [`WAIT`].
    pub fn expire(&mut self, now: Instant, out: &mut Vec<T>) {
        for c in self.topics.values_mut() {
            if c.since.is_some_and(|t| now.duration_since(t) >= WAIT) {
                let waiting = std::mem::take(&mut c.waiting);
                for (seq, (_, item)) in waiting {
                    c.last = c.last.max(seq);
                    out.push(item);
                }
                c.since = None;
            }
        }
    }
}

impl<T> Chain<T> {
    /// Delivers waiting messages whose predecessor is now delivered.
    fn release(&mut self, out: &mut Vec<T>) {
        while let Some(entry) = self.waiting.first_entry() {
            if entry.get().0 > self.last {
                break;
            }
            let seq = *entry.key();
            let (_, item) = entry.remove();
            self.last = seq;
            out.push(item);
        }
        if self.waiting.is_empty() {
            self.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swapped_pair_is_put_back_in_order() {
        let mut s = Sequencer::default();
        let now = Instant::now();
        let mut out = Vec::new();
        s.offer("t", 225, 0, 225, now, &mut out);
        s.offer("t", 227, 226, 227, now, &mut out);
        s.offer("t", 228, 227, 228, now, &mut out);
        assert_eq!(out, [225]);
        assert!(s.deadline().is_some());
        s.offer("t", 226, 225, 226, now, &mut out);
        assert_eq!(out, [225, 226, 227, 228]);
        assert!(s.deadline().is_none());
        // Other topics interleave freely.
        s.offer("u", 229, 0, 229, now, &mut out);
        s.offer("t", 230, 228, 230, now, &mut out);
        assert_eq!(out[4..], [229, 230]);
    }

    #[test]
    fn a_lost_predecessor_holds_for_the_wait_only() {
        let mut s = Sequencer::default();
        let now = Instant::now();
        let mut out = Vec::new();
        s.offer("t", 1, 0, 1, now, &mut out);
        s.offer("t", 4, 3, 4, now, &mut out);
        s.offer("t", 3, 2, 3, now, &mut out);
        assert_eq!(out, [1]);
        s.expire(now + WAIT / 2, &mut out);
        assert_eq!(out, [1]);
        s.expire(now + WAIT, &mut out);
        assert_eq!(out, [1, 3, 4]);
        // Late after all: delivered, and said so.
        assert!(s.offer("t", 2, 1, 2, now, &mut out));
        s.offer("t", 5, 4, 5, now, &mut out);
        assert_eq!(out, [1, 3, 4, 2, 5]);
    }
}
