//! One key's subscribers, kept so that a join or a leave costs a small,
//! bounded copy however large the room, while fan-out walks an immutable
//! snapshot with no lock held and no allocation per recipient.
//!
//! The list is a sequence of chunks of at most [`CHUNK`] subscribers
//! (`Arc<[Arc<[Sub]>]>`). A join copies the last chunk and the chunk
//! pointers; a leave moves the last subscriber into the hole, copying two
//! chunks and the pointers. With 15,000 members that is about 240 pointers
//! and 64 handles per change, instead of 15,000 handles. Positions of
//! members of large lists are kept in an index, so a leave finds its
//! member without a scan.

use std::collections::HashMap;
use std::sync::Arc;

use crate::socket::subscriber::Subscriber;

/// Subscribers per chunk.
pub const CHUNK: usize = 64;

type Sub = Arc<Subscriber>;

/// An immutable view of the members at one moment, for fan-out.
pub type Snapshot = Arc<[Arc<[Sub]>]>;

/// The members of one key. Changed under its owner's lock; read through
/// [`Members::snapshot`].
#[derive(Debug)]
pub struct Members {
    chunks: Snapshot,
    len: usize,
    /// Socket id to position, kept once the list spans several chunks.
    index: Option<HashMap<u64, usize>>,
}

impl Members {
    /// A list holding `first`.
    pub fn one(first: &Sub) -> Self {
        Members {
            chunks: Arc::from([Arc::from([first.clone()]) as Arc<[Sub]>]),
            len: 1,
            index: None,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The members now, for a fan-out that holds no lock.
    pub fn snapshot(&self) -> Snapshot {
        self.chunks.clone()
    }

    fn at(&self, pos: usize) -> &Sub {
        &self.chunks[pos / CHUNK][pos % CHUNK]
    }

    fn position(&self, id: u64) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(&id).copied(),
            None => (0..self.len).find(|&p| self.at(p).id == id),
        }
    }

    /// Adds `sub`; false when it is already a member.
    pub fn insert(&mut self, sub: &Sub) -> bool {
        if self.position(sub.id).is_some() {
            return false;
        }
        let pos = self.len;
        let mut chunks: Vec<Arc<[Sub]>> = self.chunks.to_vec();
        if pos.is_multiple_of(CHUNK) {
            chunks.push(Arc::from([sub.clone()]));
        } else {
            let last = chunks.last_mut().expect("a partly filled chunk");
            let mut grown = Vec::with_capacity(last.len() + 1);
            grown.extend_from_slice(last);
            grown.push(sub.clone());
            *last = grown.into();
        }
        self.chunks = chunks.into();
        self.len += 1;
        if self.len > CHUNK {
            let index = match self.index.take() {
                Some(index) => index,
                None => (0..pos).map(|p| (self.at(p).id, p)).collect(),
            };
            let index = self.index.insert(index);
            index.insert(sub.id, pos);
        }
        true
    }

    /// Removes socket `id`; false when it is not a member.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        let last = self.len - 1;
        let mut chunks: Vec<Arc<[Sub]>> = self.chunks.to_vec();
        if pos != last {
            // The last member fills the hole.
            let moved = self.at(last).clone();
            let mut hole: Vec<Sub> = chunks[pos / CHUNK].to_vec();
            hole[pos % CHUNK] = moved.clone();
            chunks[pos / CHUNK] = hole.into();
            if let Some(index) = &mut self.index {
                index.insert(moved.id, pos);
            }
        }
        let tail = chunks.last_mut().expect("a chunk");
        if tail.len() == 1 {
            chunks.pop();
        } else {
            *tail = tail[..tail.len() - 1].to_vec().into();
        }
        self.chunks = chunks.into();
        self.len = last;
        if let Some(index) = &mut self.index {
            index.remove(&id);
            if self.len <= CHUNK {
                self.index = None;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64) -> Sub {
        Arc::new(Subscriber::new(id, false, 1 << 10, 0, Default::default(), None))
    }

    fn ids(m: &Members) -> Vec<u64> {
        let mut v: Vec<u64> = m.snapshot().iter().flat_map(|c| c.iter().map(|s| s.id)).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn joins_and_leaves_keep_every_member_once() {
        let subs: Vec<Sub> = (0..300).map(sub).collect();
        let mut m = Members::one(&subs[0]);
        for s in &subs[1..] {
            assert!(m.insert(s));
        }
        assert!(!m.insert(&subs[7]), "a member joins once");
        assert_eq!(ids(&m), (0..300).collect::<Vec<_>>());
        let before = m.snapshot();
        // Leave from the middle, the front, the end, across chunk borders.
        let gone = [150u64, 0, 299, 63, 64, 65, 128, 200];
        for id in gone {
            assert!(m.remove(id));
            assert!(!m.remove(id));
        }
        let want: Vec<u64> = (0..300).filter(|i| !gone.contains(i)).collect();
        assert_eq!(ids(&m), want);
        assert_eq!(m.len, want.len());
        assert!(m.snapshot().iter().all(|c| c.len() <= CHUNK));
        // A snapshot taken earlier is unchanged.
        assert_eq!(before.iter().map(|c| c.len()).sum::<usize>(), 300);
        for id in want {
            assert!(m.remove(id));
        }
        assert!(m.is_empty());
        assert!(m.snapshot().is_empty());
    }
}
