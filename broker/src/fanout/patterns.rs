//! Wildcard subscriptions in a subject tree, as nats-server's sublist keeps
//! them: matching a topic walks one level per segment (branching only at
//! `*`), and adding or removing a pattern touches only its own path.
//!
//! Each pattern is a [`Pattern`] node holding its [`Members`]; a join or
//! leave changes only that node, under its own lock. Which patterns match
//! a topic is remembered in a bounded cache, invalidated (by a generation
//! number, in O(1)) only when a pattern appears or disappears, never when
//! members come and go.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use dashmap::DashMap;

use crate::fanout::members::{Members, Snapshot};
use crate::socket::subscriber::Subscriber;
use crate::sync::{Lock, ReadWrite};

/// Topics whose matches are remembered; past it the cache starts over.
const CACHE_ENTRIES: usize = 4096;

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

    fn collect(&self, segs: &[&str], out: &mut Vec<Arc<Pattern>>) {
        let Some((first, more)) = segs.split_first() else {
            out.extend(self.here.iter().cloned());
            return;
        };
        out.extend(self.rest.iter().cloned());
        if let Some(next) = self.literal.get(*first) {
            next.collect(more, out);
        }
        if let Some(next) = &self.star {
            next.collect(more, out);
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

/// The node's wildcard patterns.
#[derive(Default)]
pub struct Patterns {
    tree: RwLock<Tree>,
    /// Bumped whenever a pattern appears or disappears.
    generation: AtomicU64,
    /// Patterns held: with none (most nodes, most of the time) a publish
    /// takes no lock here at all.
    held: AtomicUsize,
    /// Sharded, so concurrent publishes do not queue on one lock.
    cache: DashMap<Box<str>, (u64, Matches)>,
}

/// What a subscribe or unsubscribe did to a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
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
    pub fn subscribe(&self, text: &str, sub: &Arc<Subscriber>, max: usize) -> Change {
        if let Some(p) = self.get(text) {
            let mut m = p.members();
            if let Some(m) = m.as_mut() {
                m.insert(sub);
                return Change::Members;
            }
        }
        let mut tree = self.write();
        if let Some(p) = tree.by_text.get(text) {
            // Created (or emptied) meanwhile: join it under the tree lock.
            let mut m = p.members();
            match m.as_mut() {
                Some(m) => {
                    m.insert(sub);
                    return Change::Members;
                }
                None => {
                    *m = Some(Members::one(sub));
                    return Change::Members;
                }
            }
        }
        if tree.by_text.len() >= max {
            return Change::Full;
        }
        let node = Arc::new(Pattern {
            members: Mutex::new(Some(Members::one(sub))),
        });
        let segs: Vec<&str> = text.split(':').collect();
        *tree.root.slot(&segs) = Some(node.clone());
        tree.by_text.insert(text.into(), node);
        self.held.fetch_add(1, Relaxed);
        self.generation.fetch_add(1, Relaxed);
        Change::Created
    }

    /// Removes socket `id` from `text`, dropping the pattern with its last
    /// member.
    pub fn unsubscribe(&self, text: &str, id: u64) -> Change {
        let Some(p) = self.get(text) else {
            return Change::Members;
        };
        {
            let mut m = p.members();
            let Some(list) = m.as_mut() else {
                return Change::Members;
            };
            list.remove(id);
            if !list.is_empty() {
                return Change::Members;
            }
        }
        let mut tree = self.write();
        // Still empty under the tree lock: nobody joined meanwhile.
        let empty = tree
            .by_text
            .get(text)
            .is_some_and(|p| p.members().as_ref().is_none_or(Members::is_empty));
        if !empty {
            return Change::Members;
        }
        if let Some(p) = tree.by_text.remove(text) {
            *p.members() = None;
        }
        let segs: Vec<&str> = text.split(':').collect();
        tree.root.remove(&segs);
        self.held.fetch_sub(1, Relaxed);
        self.generation.fetch_add(1, Relaxed);
        Change::Removed
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
                return (!hit.1.is_empty()).then(|| hit.1.clone());
            }
        }
        let mut out = Vec::new();
        {
            let tree = self.read();
            if !tree.by_text.is_empty() {
                let segs: Vec<&str> = topic.split(':').collect();
                tree.root.collect(&segs, &mut out);
            }
        }
        let found: Matches = out.into();
        if self.cache.len() >= CACHE_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(topic.into(), (generation, found.clone()));
        (!found.is_empty()).then_some(found)
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
            assert_eq!(ps.subscribe(p, &s, 100), Change::Created);
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
        assert_eq!(ps.subscribe("chat:*", &a, 100), Change::Created);
        assert_eq!(ps.subscribe("chat:*", &b, 100), Change::Members);
        assert_eq!(texts(&ps, &ps.matching("chat:x")), ["chat:*"]);
        assert_eq!(ps.unsubscribe("chat:*", 1), Change::Members);
        assert_eq!(ps.unsubscribe("chat:*", 2), Change::Removed);
        assert!(
            ps.matching("chat:x").is_none(),
            "a cached match outlived its pattern"
        );
        assert_eq!(ps.len(), 0);
        assert!(ps.read().root.is_empty(), "the path was pruned");
        assert_eq!(ps.subscribe("x:*", &a, 1), Change::Created);
        assert_eq!(ps.subscribe("y:*", &a, 1), Change::Full);
    }
}
