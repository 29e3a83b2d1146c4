//! Wildcard subscriptions in a subject tree, as nats-server's sublist keeps
//! them: matching a topic walks one level per segment (branching only at
//! `*`), and adding or removing a pattern touches only its own path.
//!
//! Each pattern is a [`Pattern`] node holding its [`Members`]; a join or
//! leave changes only that node, under its own lock. Which patterns match
//! a topic is remembered in a bounded cache, invalidated (by a generation
//! number, in O(1)) only when a pattern appears or disappears, never when
//! members come and go. Past its bound the cache is trimmed, as
//! nats-server's sublist trims its own: a quarter of it goes, so the
//! topics in use stay matched without a walk (clearing it all made every
//! topic miss at once, then again each 4,096 new topics).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use dashmap::DashMap;

use crate::fanout::members::{Members, Snapshot};
use crate::socket::subscriber::Subscriber;
use crate::sync::{Lock, ReadWrite};

/// Topics whose matches are remembered; past it the cache is trimmed.
const CACHE_ENTRIES: usize = 4096;
/// Of every this many entries a trim visits, one goes (with every entry of
/// an older generation, which could only miss).
const TRIM_ONE_IN: usize = 4;

/// One wildcard pattern with local subscribers.
#[derive(Debug)]
pub struct Pattern {
    members: Mutex<Option<Members>>,
}

impl Pattern {
    fn members(&self) -> MutexGuard<'_, Option<Members>> {
        self.members.locked()
    }

    /// Its members now (empty once it lost its last one).
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.members().as_ref().map(Members::snapshot)
    }
}

#[derive(Default, Debug)]
struct Level {
    literal: HashMap<Box<str>, Level>,
    star: Option<Box<Level>>,
    /// The pattern ending here with `>`.
    rest: Option<Arc<Pattern>>,
    /// The pattern ending exactly here.
    here: Option<Arc<Pattern>>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.star.is_none() && self.rest.is_none() && self.here.is_none()
    }

    /// Adds the patterns under this level matching the rest of a topic,
    /// `segs` (its segments not yet walked: a cheap copy at each branch).
    fn collect(&self, mut segs: std::str::Split<'_, char>, out: &mut Vec<Arc<Pattern>>) {
        let Some(first) = segs.next() else {
            out.extend(self.here.iter().cloned());
            return;
        };
        out.extend(self.rest.iter().cloned());
        if let Some(next) = self.literal.get(first) {
            next.collect(segs.clone(), out);
        }
        if let Some(next) = &self.star {
            next.collect(segs, out);
        }
    }

    /// The slot for `pattern`'s node, creating the path.
    fn slot(&mut self, segs: &[&str]) -> &mut Option<Arc<Pattern>> {
        match segs {
            [] => &mut self.here,
            [">"] => &mut self.rest,
            ["*", more @ ..] => self.star.get_or_insert_with(Default::default).slot(more),
            [lit, more @ ..] => self.literal.entry((*lit).into()).or_default().slot(more),
        }
    }

    /// Removes `pattern`'s node and prunes the path it leaves empty.
    fn remove(&mut self, segs: &[&str]) {
        match segs {
            [] => self.here = None,
            [">"] => self.rest = None,
            ["*", more @ ..] => {
                if let Some(next) = &mut self.star {
                    next.remove(more);
                    if next.is_empty() {
                        self.star = None;
                    }
                }
            }
            [lit, more @ ..] => {
                if let Some(next) = self.literal.get_mut(*lit) {
                    next.remove(more);
                    if next.is_empty() {
                        self.literal.remove(*lit);
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Tree {
    root: Level,
    /// Pattern text to node, for delivery through one key.
    by_text: HashMap<Box<str>, Arc<Pattern>>,
}

type Matches = Arc<[Arc<Pattern>]>;

thread_local! {
    /// Where a cache miss gathers its matches before they become one
    /// [`Matches`]: reused, so a miss allocates only that and its key.
    static GATHER: RefCell<Vec<Arc<Pattern>>> = const { RefCell::new(Vec::new()) };
}

/// The node's wildcard patterns.
#[derive(Default)]
pub struct Patterns {
    tree: RwLock<Tree>,
    /// Bumped whenever a pattern appears or disappears.
    generation: AtomicU64,
    /// Patterns held: with none (most nodes, most of the time) a publish
    /// takes no lock here at all.
    held: AtomicUsize,
    /// Sharded, so concurrent publishes do not queue on one lock. `None`:
    /// no pattern matches (remembered without an allocation).
    cache: DashMap<Box<str>, (u64, Option<Matches>)>,
    /// Entries in `cache` (its `len` would read-lock every shard).
    cached: AtomicUsize,
    /// A trim is under way: the others go on.
    trimming: AtomicBool,
    /// Trims so far: where in its order the next one starts dropping.
    trims: AtomicUsize,
}

/// What a subscribe or unsubscribe did to a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternChange {
    /// The pattern has its first member.
    Created,
    /// The pattern lost its last member and is gone.
    Removed,
    /// Members changed (or nothing did).
    Members,
    /// Refused: the node holds `max` patterns.
    Full,
}

impl Patterns {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.reading()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tree> {
        self.tree.writing()
    }

    /// Distinct patterns held.
    pub fn len(&self) -> usize {
        self.read().by_text.len()
    }

    /// The node for pattern `text`, if held.
    pub fn get(&self, text: &str) -> Option<Arc<Pattern>> {
        self.read().by_text.get(text).cloned()
    }

    /// Adds `sub` to `text`, creating the pattern unless `max` are held.
    pub fn subscribe(&self, text: &str, sub: &Arc<Subscriber>, max: usize) -> PatternChange {
        if let Some(p) = self.get(text) {
            let mut m = p.members();
            if let Some(m) = m.as_mut() {
                m.insert(sub);
                return PatternChange::Members;
            }
        }
        let mut tree = self.write();
        if let Some(p) = tree.by_text.get(text) {
            // Created (or emptied) meanwhile: join it under the tree lock.
            let mut m = p.members();
            match m.as_mut() {
                Some(m) => {
                    m.insert(sub);
                    return PatternChange::Members;
                }
                None => {
                    *m = Some(Members::one(sub));
                    return PatternChange::Members;
                }
            }
        }
        if tree.by_text.len() >= max {
            return PatternChange::Full;
        }
        let node = Arc::new(Pattern {
            members: Mutex::new(Some(Members::one(sub))),
        });
        let segs: Vec<&str> = text.split(':').collect();
        *tree.root.slot(&segs) = Some(node.clone());
        tree.by_text.insert(text.into(), node);
        self.held.fetch_add(1, Relaxed);
        self.generation.fetch_add(1, Relaxed);
        PatternChange::Created
    }

    /// Removes socket `id` from `text`, dropping the pattern with its last
    /// member.
    pub fn unsubscribe(&self, text: &str, id: u64) -> PatternChange {
        let Some(p) = self.get(text) else {
            return PatternChange::Members;
        };
        {
            let mut m = p.members();
            let Some(list) = m.as_mut() else {
                return PatternChange::Members;
            };
            list.remove(id);
            if !list.is_empty() {
                return PatternChange::Members;
            }
        }
        let mut tree = self.write();
        // Still empty under the tree lock: nobody joined meanwhile.
        let empty = tree
            .by_text
            .get(text)
            .is_some_and(|p| p.members().as_ref().is_none_or(Members::is_empty));
        if !empty {
            return PatternChange::Members;
        }
        if let Some(p) = tree.by_text.remove(text) {
            *p.members() = None;
        }
        let segs: Vec<&str> = text.split(':').collect();
        tree.root.remove(&segs);
        self.held.fetch_sub(1, Relaxed);
        self.generation.fetch_add(1, Relaxed);
        PatternChange::Removed
    }

    /// The patterns matching concrete `topic`, `None` when there are none:
    /// O(segments) through the tree, or one lookup in the cache.
    pub fn matching(&self, topic: &str) -> Option<Matches> {
        if self.held.load(Relaxed) == 0 {
            return None;
        }
        let generation = self.generation.load(Relaxed);
        if let Some(hit) = self.cache.get(topic) {
            if hit.0 == generation {
                return hit.1.clone();
            }
        }
        let found = {
            let tree = self.read();
            let walk = |out: &mut Vec<Arc<Pattern>>| {
                tree.root.collect(topic.split(':'), out);
                // Moved out in one allocation of the exact size.
                (!out.is_empty()).then(|| out.drain(..).collect::<Matches>())
            };
            GATHER.with(|g| match g.try_borrow_mut() {
                Ok(mut out) => walk(&mut out),
                Err(_) => walk(&mut Vec::new()),
            })
        };
        if self
            .cache
            .insert(topic.into(), (generation, found.clone()))
            .is_none()
            && self.cached.fetch_add(1, Relaxed) >= CACHE_ENTRIES
        {
            self.trim(generation);
        }
        found
    }

    /// Drops every entry of an older generation and one in [`TRIM_ONE_IN`]
    /// of the others, which one turning with each trim; the cache's order
    /// follows the topics' hashes, not their age or use, so about a quarter
    /// goes, at random as far as any topic is concerned (nats-server's
    /// sublist drops entries at random when over its limit). One trim at a
    /// time; a miss meanwhile goes on (the cache may pass its bound by the
    /// misses that land during a trim).
    fn trim(&self, generation: u64) {
        if self.trimming.swap(true, Acquire) {
            return;
        }
        let phase = self.trims.fetch_add(1, Relaxed) % TRIM_ONE_IN;
        let (mut seen, mut dropped) = (0usize, 0usize);
        self.cache.retain(|_, (g, _)| {
            let keep = *g == generation && !(seen + phase).is_multiple_of(TRIM_ONE_IN);
            seen += usize::from(*g == generation);
            dropped += usize::from(!keep);
            keep
        });
        self.cached.fetch_sub(dropped, Relaxed);
        self.trimming.store(false, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(id, false, 1 << 10, 0, Default::default(), None))
    }

    /// The texts of matched patterns, found by identity in the tree.
    fn texts(ps: &Patterns, m: &Option<Matches>) -> Vec<String> {
        let tree = ps.read();
        let text = |p: &Arc<Pattern>| {
            let (t, _) = tree
                .by_text
                .iter()
                .find(|(_, q)| Arc::ptr_eq(p, q))
                .expect("held");
            t.to_string()
        };
        let mut v: Vec<String> = m.iter().flat_map(|m| m.iter()).map(text).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn matches_as_the_grammar_says() {
        let ps = Patterns::default();
        let s = sub(1);
        for p in ["chat:*", "chat:>", ">", "*:count", "a:*:c", "chat:lobby:*"] {
            assert_eq!(ps.subscribe(p, &s, 100), PatternChange::Created);
        }
        assert_eq!(texts(&ps, &ps.matching("chat:lobby")), [">", "chat:*", "chat:>"]);
        assert_eq!(
            texts(&ps, &ps.matching("chat:lobby:x")),
            [">", "chat:>", "chat:lobby:*"]
        );
        assert_eq!(texts(&ps, &ps.matching("todo:count")), ["*:count", ">"]);
        assert_eq!(texts(&ps, &ps.matching("a:b:c")), [">", "a:*:c"]);
        assert_eq!(texts(&ps, &ps.matching("chat")), [">"]);
        // Every answer agrees with the plain matcher.
        for topic in ["chat:lobby", "x:count", "a:z:c", "a:z:d", "chat:lobby:7:8"] {
            let mut want: Vec<&str> = ["chat:*", "chat:>", ">", "*:count", "a:*:c", "chat:lobby:*"]
                .into_iter()
                .filter(|p| herald_protocol::topic::matches(p, topic))
                .collect();
            want.sort_unstable();
            assert_eq!(texts(&ps, &ps.matching(topic)), want, "{topic}");
        }
    }

    #[test]
    fn a_pattern_lives_while_it_has_members_and_the_cache_follows() {
        let ps = Patterns::default();
        let (a, b) = (sub(1), sub(2));
        assert_eq!(ps.subscribe("chat:*", &a, 100), PatternChange::Created);
        assert_eq!(ps.subscribe("chat:*", &b, 100), PatternChange::Members);
        assert_eq!(texts(&ps, &ps.matching("chat:x")), ["chat:*"]);
        assert_eq!(ps.unsubscribe("chat:*", 1), PatternChange::Members);
        assert_eq!(ps.unsubscribe("chat:*", 2), PatternChange::Removed);
        assert!(
            ps.matching("chat:x").is_none(),
            "a cached match outlived its pattern"
        );
        assert_eq!(ps.len(), 0);
        assert!(ps.read().root.is_empty(), "the path was pruned");
        assert_eq!(ps.subscribe("x:*", &a, 1), PatternChange::Created);
        assert_eq!(ps.subscribe("y:*", &a, 1), PatternChange::Full);
    }

    #[test]
    fn past_its_bound_the_cache_is_trimmed_and_every_answer_stays_right() {
        let ps = Patterns::default();
        let s = sub(1);
        for p in ["chat:*", "chat:lobby:>", "*:count"] {
            ps.subscribe(p, &s, 100);
        }
        let plain = |topic: &str| {
            let mut want: Vec<&str> = ["chat:*", "chat:lobby:>", "*:count"]
                .into_iter()
                .filter(|p| herald_protocol::topic::matches(p, topic))
                .collect();
            want.sort_unstable();
            want
        };
        let topic = |i: usize| match i % 3 {
            0 => format!("chat:{i}"),
            1 => format!("chat:lobby:{i}"),
            _ => format!("other:{i}"),
        };
        let mut least = usize::MAX;
        for i in 0..3 * CACHE_ENTRIES {
            assert_eq!(
                texts(&ps, &ps.matching(&topic(i))),
                plain(&topic(i)),
                "{}",
                topic(i)
            );
            let n = ps.cache.len();
            assert_eq!(n, ps.cached.load(Relaxed), "the count follows the cache");
            assert!(n <= CACHE_ENTRIES, "bounded: {n}");
            if i >= CACHE_ENTRIES {
                least = least.min(n);
            }
        }
        assert!(
            least >= CACHE_ENTRIES / 2,
            "trimmed, not cleared: {least} entries at the least"
        );
        // Asked again, trimmed or not, every topic gets its right answer;
        // most are still remembered.
        let remembered = (0..3 * CACHE_ENTRIES)
            .filter(|&i| ps.cache.contains_key(topic(i).as_str()))
            .count();
        assert!(remembered >= CACHE_ENTRIES / 2);
        for i in (0..3 * CACHE_ENTRIES).step_by(7) {
            assert_eq!(texts(&ps, &ps.matching(&topic(i))), plain(&topic(i)));
        }
        // A new pattern: every remembered answer is of an older
        // generation, answered afresh, and the next trim drops them all.
        ps.subscribe("other:>", &s, 100);
        assert_eq!(texts(&ps, &ps.matching("other:2")), ["other:>"]);
        assert_eq!(texts(&ps, &ps.matching("chat:0")), ["chat:*"]);
        let generation = ps.generation.load(Relaxed);
        ps.trim(generation);
        assert!(ps.cache.iter().all(|e| e.value().0 == generation));
        assert_eq!(ps.cache.len(), ps.cached.load(Relaxed));
    }
}
