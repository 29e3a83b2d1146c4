//! A token bucket: the one rate limit every per-socket or per-address
//! bound uses, 8 bytes so an idle socket can carry several.
//!
//! Uses: nothing of the crate.

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

#[cfg(test)]
mod tests {
    use super::*;

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
