//! Rings in the order they lose their next message: a binary heap that
//! knows where each ring sits, so a ring whose oldest message changed moves
//! (or leaves) in O(log rings), and finding the next to drop is O(1). The
//! byte cap drops from one (oldest `seq` first), the age prune from another
//! (earliest expiry first); neither ever scans the rings.

/// What a queue needs of the rings it orders: each one's key, and a place
/// in the ring where the queue writes its position.
pub trait Slots {
    /// Ring `id`'s key in queue `which` (lowest first).
    fn key(&self, which: usize, id: u32) -> u64;
    /// Where ring `id` remembers its position in queue `which`.
    fn place(&mut self, which: usize, id: u32) -> &mut u32;
}

/// Rings ordered by their key in one [`Slots`] queue.
pub struct Queue {
    which: usize,
    heap: Vec<u32>,
}

impl Queue {
    /// An empty queue, the `which`-th of the rings' keys.
    pub fn new(which: usize) -> Self {
        Queue {
            which,
            heap: Vec::new(),
        }
    }

    /// The ring with the lowest key.
    pub fn first(&self) -> Option<u32> {
        self.heap.first().copied()
    }

    /// Bytes of its allocation.
    pub fn capacity_bytes(&self) -> usize {
        self.heap.capacity() * std::mem::size_of::<u32>()
    }

    /// Adds ring `id`.
    pub fn push(&mut self, s: &mut impl Slots, id: u32) {
        let at = self.heap.len();
        self.heap.push(id);
        *s.place(self.which, id) = at as u32;
        self.up(s, at);
    }

    /// Takes ring `id` out.
    pub fn remove(&mut self, s: &mut impl Slots, id: u32) {
        let at = *s.place(self.which, id) as usize;
        let last = self.heap.pop().expect("a queued ring");
        if at < self.heap.len() {
            self.heap[at] = last;
            *s.place(self.which, last) = at as u32;
            let at = self.down(s, at);
            self.up(s, at);
        }
        // Freed as the queue shrinks (an attack's million rings gone).
        if self.heap.capacity() > 64 && self.heap.len() * 4 < self.heap.capacity() {
            self.heap.shrink_to(self.heap.len() * 2);
        }
    }

    /// Puts ring `id` back in order after its key changed.
    pub fn moved(&mut self, s: &mut impl Slots, id: u32) {
        let at = *s.place(self.which, id) as usize;
        let at = self.down(s, at);
        self.up(s, at);
    }

    fn up(&mut self, s: &mut impl Slots, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if s.key(self.which, self.heap[at]) >= s.key(self.which, self.heap[parent]) {
                break;
            }
            self.swap(s, at, parent);
            at = parent;
        }
    }

    fn down(&mut self, s: &mut impl Slots, mut at: usize) -> usize {
        loop {
            let left = 2 * at + 1;
            if left >= self.heap.len() {
                return at;
            }
            let key = |i: usize| s.key(self.which, self.heap[i]);
            let child = if left + 1 < self.heap.len() && key(left + 1) < key(left) {
                left + 1
            } else {
                left
            };
            if key(child) >= key(at) {
                return at;
            }
            self.swap(s, at, child);
            at = child;
        }
    }

    fn swap(&mut self, s: &mut impl Slots, a: usize, b: usize) {
        self.heap.swap(a, b);
        *s.place(self.which, self.heap[a]) = a as u32;
        *s.place(self.which, self.heap[b]) = b as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keys(Vec<(u64, u32)>);

    impl Slots for Keys {
        fn key(&self, _: usize, id: u32) -> u64 {
            self.0[id as usize].0
        }
        fn place(&mut self, _: usize, id: u32) -> &mut u32 {
            &mut self.0[id as usize].1
        }
    }

    #[test]
    fn gives_the_lowest_key_as_keys_move_and_rings_leave() {
        let mut keys = Keys((0..100).map(|i| ((i * 37) % 101, 0)).collect());
        let mut q = Queue::new(0);
        for id in 0..100 {
            q.push(&mut keys, id);
        }
        let lowest = |k: &Keys, live: &[u32]| *live.iter().min_by_key(|&&id| k.0[id as usize].0).unwrap();
        let mut live: Vec<u32> = (0..100).collect();
        for round in 0..300u64 {
            let first = q.first().unwrap();
            assert_eq!(keys.0[first as usize].0, keys.0[lowest(&keys, &live) as usize].0);
            if round % 3 == 0 {
                q.remove(&mut keys, first);
                live.retain(|&id| id != first);
                if live.is_empty() {
                    break;
                }
                let other = live[(round as usize * 7) % live.len()];
                q.remove(&mut keys, other);
                live.retain(|&id| id != other);
                if live.is_empty() {
                    break;
                }
            } else {
                // Its oldest message went: the key grows.
                keys.0[first as usize].0 += 50 + round % 13;
                q.moved(&mut keys, first);
            }
        }
        while let Some(id) = q.first() {
            q.remove(&mut keys, id);
            live.retain(|&l| l != id);
        }
        assert!(live.is_empty());
    }
}
