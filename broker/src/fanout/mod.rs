//! The node's local fan-out: which sockets want a topic, and handing
//! every one of them the same encoded frame.
//!
//! Uses: `sync`, `metrics`, `socket`, `presence`.
//!
//! - [`members`]: one key's subscribers as a chunked copy-on-write list:
//!   joins and leaves cost a bounded copy, fan-out walks a snapshot.
//! - [`patterns`]: wildcard subscriptions in a subject tree with a match
//!   cache: matching costs one step per segment.
//! - [`hub`]: the fan-out table: sharded topics, wildcard patterns.

pub(crate) mod hub;
pub(crate) mod members;
pub(crate) mod patterns;

pub use hub::{Delivery, Hub};
