//! Each socket's next deadline in Unix milliseconds (its token's expiry,
//! or the end of its wait for one), kept in time order so one sweep a few
//! times a second finds those due, without a timer per socket.

use crate::sync::Lock;

/// What a socket's deadline ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Its token expires: close with 4003.
    TokenExpired,
    /// It sent no token within the handshake timeout: close with 4501.
    NoToken,
}

/// The deadlines of every socket that has one.
#[derive(Default)]
pub struct Deadlines {
    order: std::sync::Mutex<std::collections::BTreeSet<(u64, u64)>>,
    current: dashmap::DashMap<u64, (u64, Due)>,
}

impl Deadlines {
    /// Sets (or moves) socket `id`'s deadline.
    pub fn set(&self, id: u64, at_ms: u64, due: Due) {
        let mut order = self.order.locked();
        if let Some((old, _)) = self.current.insert(id, (at_ms, due)) {
            order.remove(&(old, id));
        }
        order.insert((at_ms, id));
    }

    /// Socket `id` has no deadline any more (it is gone).
    pub fn clear(&self, id: u64) {
        if let Some((_, (at, _))) = self.current.remove(&id) {
            self.order.locked().remove(&(at, id));
        }
    }

    /// Removes and returns the sockets whose deadline is at or before `now_ms`.
    pub fn take_due(&self, now_ms: u64) -> Vec<(u64, Due)> {
        let mut order = self.order.locked();
        let mut due = Vec::new();
        while let Some(&(at, id)) = order.first() {
            if at > now_ms {
                break;
            }
            order.pop_first();
            if let Some((_, (_, why))) = self.current.remove(&id) {
                due.push((id, why));
            }
        }
        due
    }
}
