//! A token bucket: the one rate limit every per-socket or per-address
//! bound uses.

use std::time::Instant;

/// `rate` events per second, in bursts of up to `rate`. A rate of 0 allows
/// everything.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket for `rate` events per second.
    pub fn new(rate: u32) -> Self {
        RateLimit {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn allow(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_rate_then_refuses() {
        let mut r = RateLimit::new(5);
        assert!((0..5).all(|_| r.allow()));
        assert!(!r.allow());
        let mut open = RateLimit::new(0);
        assert!((0..10_000).all(|_| open.allow()));
    }
}
