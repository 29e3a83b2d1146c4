//! A token bucket: the one rate limit every per-socket or per-address
//! bound uses, 8 bytes so an idle socket can carry several; and the limit
//! on log lines that a flood could otherwise repeat ([`Quiet`]).
//!
//! Uses: `sync`, `clock`.

use std::sync::Mutex;

use crate::sync::Lock;

/// A token bucket in 8 bytes, for limits every socket carries (an idle
/// socket's memory counts): whole tokens, and the time of the last refill
/// on a caller's millisecond clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateLimit {
    /// Tokens left, plus one: 0 means "full, never used".
    tokens: u16,
    /// Clock (ms, wrapping) of the last refill.
    at_ms: u32,
    /// Milliseconds of a token not yet whole, carried to the next refill.
    carry_ms: u16,
}

impl RateLimit {
    /// Takes one token of a bucket refilled at `rate` a second, in bursts
    /// of up to `rate` (at most 65,534); false when empty. `now_ms` is the
    /// caller's clock. A rate of 0 allows everything.
    pub fn allow(&mut self, rate: u32, now_ms: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let cap = rate.min(u16::MAX as u32 - 1) as u64;
        let now = now_ms as u32;
        let mut tokens = if self.tokens == 0 {
            cap
        } else {
            self.tokens as u64 - 1
        };
        if self.tokens != 0 {
            let elapsed = now.wrapping_sub(self.at_ms) as u64 + self.carry_ms as u64;
            let gained = elapsed * cap / 1000;
            tokens = (tokens + gained).min(cap);
            self.carry_ms = if tokens == cap {
                0
            } else {
                (elapsed - gained * 1000 / cap) as u16
            };
        }
        self.at_ms = now;
        let allowed = tokens > 0;
        if allowed {
            tokens -= 1;
        }
        self.tokens = tokens as u16 + 1;
        allowed
    }
}

/// One log line per reason per [`Quiet::WINDOW_MS`], with a count of the
/// ones held back: a flood of one refusal writes a line a window, not a
/// line each, while each distinct reason still gets its first line at once.
#[derive(Debug, Default)]
pub struct Quiet {
    /// Per reason: when its last line was written, and how many were held
    /// back since.
    seen: Mutex<Vec<(&'static str, u64, u64)>>,
}

impl Quiet {
    /// How long a reason stays quiet after its line.
    pub const WINDOW_MS: u64 = 10_000;

    /// Whether to log `reason` now: `Some(n)` with `n` lines held back since
    /// its last one, or `None` while its window lasts.
    pub fn allow(&self, reason: &'static str) -> Option<u64> {
        self.allow_at(reason, crate::clock::now_ms())
    }

    /// [`Quiet::allow`] at `now_ms` on the node's clock.
    pub fn allow_at(&self, reason: &'static str, now_ms: u64) -> Option<u64> {
        let mut seen = self.seen.locked();
        match seen.iter_mut().find(|s| s.0 == reason) {
            Some(s) if now_ms.saturating_sub(s.1) < Self::WINDOW_MS => {
                s.2 += 1;
                None
            }
            Some(s) => {
                s.1 = now_ms;
                Some(std::mem::take(&mut s.2))
            }
            None => {
                seen.push((reason, now_ms, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_logs_once_per_reason_per_window_and_counts_the_rest() {
        let q = Quiet::default();
        assert_eq!(q.allow_at("origin", 1_000), Some(0));
        assert_eq!(q.allow_at("token", 1_000), Some(0), "its own window");
        assert!((0..50).all(|_| q.allow_at("origin", 5_000).is_none()));
        assert_eq!(q.allow_at("origin", 10_999), None);
        assert_eq!(q.allow_at("origin", 11_000), Some(51), "held back: 51");
        assert_eq!(q.allow_at("origin", 11_001), None);
        assert_eq!(q.allow_at("token", 30_000), Some(0));
    }

    #[test]
    fn the_small_bucket_allows_a_burst_then_refills_with_time() {
        let mut r = RateLimit::default();
        assert!((0..5).all(|_| r.allow(5, 1_000)));
        assert!(!r.allow(5, 1_000));
        assert!(!r.allow(5, 1_100), "a fifth of a token is not a token");
        assert!(r.allow(5, 1_200), "two fifths, carried, make one");
        assert!(!r.allow(5, 1_200));
        assert!(
            (0..5).all(|_| r.allow(5, 10_000)),
            "refilled to the burst, no more"
        );
        assert!(!r.allow(5, 10_000));
        assert!(RateLimit::default().allow(0, 0));
        assert_eq!(std::mem::size_of::<RateLimit>(), 8);
    }
}
