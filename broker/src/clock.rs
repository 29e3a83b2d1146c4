//! The node's one clock: milliseconds on a monotonic count that starts
//! with the process (for deadlines, ages and rates, which must not jump
//! with the wall clock), and the wall clock where a time leaves the
//! process (token `exp` and `iat`, a message's time, a status sample).
//!
//! Uses: nothing of the crate.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The instant the clock counts from, set by its first reading.
fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the process first read the clock; never goes back.
pub(crate) fn now_ms() -> u64 {
    start().elapsed().as_millis() as u64
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, by the wall clock (what JWTs count).
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}
