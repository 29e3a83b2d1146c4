//! The history topics by name, for a replay to find the rings its pattern
//! matches without looking at the others.
//!
//! A sorted map whose names spell `:` as `!`, which sorts below every byte
//! a segment may hold: a topic's descendants follow it, and the topics of
//! one segment lie together. So a concrete topic is one lookup; a literal
//! segment narrows to its range; `>` reads its range; `*` steps from one
//! distinct segment to the next (one lookup each) as a subject tree's walk
//! does, never through the topics below a segment that cannot match.

use std::collections::BTreeMap;
use std::ops::Bound::{Included, Unbounded};
use std::ops::ControlFlow;
use std::sync::Arc;

/// How the index spells `:`.
const SEP: char = '!';
/// The byte after [`SEP`]: the first name past every topic of a segment.
const PAST: char = '"';

/// A topic's name in the index.
fn spelled(topic: &str) -> String {
    topic.replace(':', "!")
}

/// Ring ids by topic name.
#[derive(Default)]
pub struct Index {
    map: BTreeMap<Arc<str>, u32>,
}

impl Index {
    /// What one entry costs at most, beside its name's allocation: a B-tree
    /// node holds 5 to 11 entries (an internal one also 12 edges), so a
    /// node's allocation over 5 entries bounds it.
    pub const ENTRY_BYTES: u64 = {
        let entry = std::mem::size_of::<Arc<str>>() + std::mem::size_of::<u32>();
        let node = 16 + 11 * entry + 12 * std::mem::size_of::<usize>();
        (node as u64).div_ceil(5)
    };

    /// Topics held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The ring of concrete `topic`.
    pub fn get(&self, topic: &str) -> Option<u32> {
        self.map.get(spelled(topic).as_str()).copied()
    }

    /// The name `topic` is filed by.
    pub fn name(topic: &str) -> Arc<str> {
        spelled(topic).into()
    }

    /// Files ring `id` by `name` (from [`Index::name`]).
    pub fn insert(&mut self, name: Arc<str>, id: u32) {
        self.map.insert(name, id);
    }

    /// Forgets the ring filed by `name`.
    pub fn remove(&mut self, name: &str) {
        self.map.remove(name);
    }

    /// The topic a name spells.
    pub fn topic(name: &str) -> Arc<str> {
        name.replace(SEP, ":").into()
    }

    /// Calls `visit` with the name and ring of every topic `pattern`
    /// matches, in name order, until it breaks.
    pub fn walk(&self, pattern: &str, visit: &mut impl FnMut(&Arc<str>, u32) -> ControlFlow<()>) {
        let segs: Vec<&str> = pattern.split(':').collect();
        let _ = self.under(&mut String::new(), &segs, visit);
    }

    /// The topics under `prefix` (empty, or names ending in [`SEP`]) that
    /// the pattern's segments `segs` match.
    fn under(
        &self,
        prefix: &mut String,
        segs: &[&str],
        visit: &mut impl FnMut(&Arc<str>, u32) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        match segs {
            [] => ControlFlow::Continue(()),
            [">"] => {
                for (name, id) in self.map.range::<str, _>((Included(prefix.as_str()), Unbounded)) {
                    if !name.starts_with(prefix.as_str()) {
                        break;
                    }
                    visit(name, *id)?;
                }
                ControlFlow::Continue(())
            }
            ["*", rest @ ..] => {
                let at = prefix.len();
                let mut from = prefix.clone();
                // The first topic from `from` on: the next segment's.
                while let Some((name, _)) = self
                    .map
                    .range::<str, _>((Included(from.as_str()), Unbounded))
                    .next()
                {
                    let Some(tail) = name.strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let seg = tail.split(SEP).next().unwrap_or(tail);
                    prefix.push_str(seg);
                    self.at(prefix, rest, visit)?;
                    from.clear();
                    from.push_str(prefix);
                    from.push(PAST);
                    prefix.truncate(at);
                }
                ControlFlow::Continue(())
            }
            [literal, rest @ ..] => {
                let at = prefix.len();
                prefix.push_str(literal);
                self.at(prefix, rest, visit)?;
                prefix.truncate(at);
                ControlFlow::Continue(())
            }
        }
    }

    /// The topics `rest` matches below the segment `prefix` ends with (the
    /// topic itself when nothing is left).
    fn at(
        &self,
        prefix: &mut String,
        rest: &[&str],
        visit: &mut impl FnMut(&Arc<str>, u32) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if rest.is_empty() {
            if let Some((name, id)) = self.map.get_key_value(prefix.as_str()) {
                visit(name, *id)?;
            }
            return ControlFlow::Continue(());
        }
        let at = prefix.len();
        prefix.push(SEP);
        self.under(prefix, rest, visit)?;
        prefix.truncate(at);
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_exactly_what_the_grammar_matches_and_nothing_else() {
        let topics = [
            "a", "a:b", "a:b:c", "a-1", "a-1:b", "a0:b", "ab:b", "a:b-2", "a:b:c:d", "b:b", "z~:b", "a@:b",
            "_:b:c", "A:b",
        ];
        let mut index = Index::default();
        for (id, t) in topics.iter().enumerate() {
            index.insert(Index::name(t), id as u32);
        }
        let patterns = [
            "a", "a:b", ">", "a:>", "*", "*:b", "*:b:c", "a:*", "a:*:c", "*:*", "*:>", "a:b:>", "a-1:*",
            "x:*", "a:b:c:d", "*:*:*:*",
        ];
        for p in patterns {
            let mut seen = Vec::new();
            index.walk(p, &mut |name, id| {
                assert_eq!(&*Index::topic(name), topics[id as usize]);
                seen.push(topics[id as usize]);
                ControlFlow::Continue(())
            });
            let mut want: Vec<&str> = topics
                .iter()
                .copied()
                .filter(|t| herald_protocol::topic::matches(p, t))
                .collect();
            want.sort_unstable();
            seen.sort_unstable();
            assert_eq!(seen, want, "{p}");
        }
        assert_eq!(index.get("a-1:b"), Some(4));
        index.remove("a-1!b");
        assert_eq!(index.get("a-1:b"), None);
    }
}
