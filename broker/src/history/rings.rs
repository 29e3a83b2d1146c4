//! The rings that hold each history topic's messages, by id, and what
//! they cost: every allocation the history makes, at the size the
//! allocator takes for it, as the byte cap counts it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::history::index::Index;
use crate::history::queue::Slots;

/// The queue of rings by their oldest `seq` (the byte cap's).
pub const OLDEST: usize = 0;
/// The queue of aged rings by their oldest message's expiry (the prune's).
pub const EXPIRY: usize = 1;

/// The rings, by id: a slot each (a pointer: a freed ring's memory goes
/// with it), reused once freed.
#[derive(Default)]
pub struct Rings {
    pub slots: Vec<Option<Box<Ring>>>,
    free: Vec<u32>,
}

/// One topic's retained messages, oldest first, and what it lost.
pub struct Ring {
    pub msgs: VecDeque<Msg>,
    /// The highest `seq` this topic ever dropped.
    pub lost_through: u64,
    pub count: Option<u64>,
    pub age_ms: Option<u64>,
    /// Its name in the index (which is its key there, shared).
    pub name: Arc<str>,
    /// What `msgs`' allocation was last counted as.
    pub counted: u64,
    /// Its positions in the `oldest` and `expiry` queues.
    pub places: [u32; 2],
}

/// A retained message: its `seq`, when it was stored, its data.
pub struct Msg {
    pub seq: u64,
    pub at: u64,
    pub data: Bytes,
}

/// What memory costs, as the byte cap counts it: every allocation the
/// history makes, at the size the allocator takes for it.
pub mod cost {
    use super::{Index, Msg, Ring};

    /// What the allocator takes for `n` bytes: glibc's chunks (a word of
    /// header, 16-byte steps, 32 at the least); other allocators are close.
    pub const fn chunk(n: usize) -> u64 {
        if n == 0 {
            return 0;
        }
        let c = (n + 8 + 15) & !15;
        (if c < 32 { 32 } else { c }) as u64
    }

    /// A message beside its slot in its ring: its own copy of the data,
    /// and the header `Bytes` shares it through once cloned (by a replay).
    pub const fn message(len: usize) -> u64 {
        chunk(len) + chunk(3 * std::mem::size_of::<usize>())
    }

    /// A ring without its messages: itself, its name (an `Arc<str>`) and
    /// its entry in the index.
    pub const fn ring(name_len: usize) -> u64 {
        chunk(std::mem::size_of::<Ring>())
            + chunk(2 * std::mem::size_of::<usize>() + name_len)
            + Index::ENTRY_BYTES
    }

    /// A ring's slots for `capacity` messages.
    pub const fn slots(capacity: usize) -> u64 {
        chunk(capacity * std::mem::size_of::<Msg>())
    }
}

impl Rings {
    pub fn get(&self, id: u32) -> &Ring {
        self.slots[id as usize].as_deref().expect("a live ring")
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Ring {
        self.slots[id as usize].as_deref_mut().expect("a live ring")
    }

    pub fn add(&mut self, ring: Ring) -> u32 {
        let ring = Some(Box::new(ring));
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = ring;
                id
            }
            None => {
                self.slots.push(ring);
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn take(&mut self, id: u32) -> Box<Ring> {
        let ring = self.slots[id as usize].take().expect("a live ring");
        self.free.push(id);
        if self.free.len() == self.slots.len() {
            // None left: the slots' memory goes too.
            *self = Rings::default();
        }
        ring
    }

    pub fn capacity_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<Box<Ring>>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }
}

impl Slots for Rings {
    fn key(&self, which: usize, id: u32) -> u64 {
        let ring = self.get(id);
        let m = ring.msgs.front().expect("a queued ring holds a message");
        match which {
            OLDEST => m.seq,
            _ => m.at.saturating_add(ring.age_ms.unwrap_or(0)),
        }
    }

    fn place(&mut self, which: usize, id: u32) -> &mut u32 {
        &mut self.get_mut(id).places[which]
    }
}
