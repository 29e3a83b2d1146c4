//! A socket's write side, knowing nothing of its session: the bounded
//! queue of ready frames, the writer task that drains it, and the handle
//! ([`Subscriber`]) that the fan-out, the heartbeat and shutdown hold.
//!
//! Uses: `sync`, `clock`, `metrics`.
//!
//! - [`outbox`]: a socket's bounded queue of ready frames, and its parked
//!   write half.
//! - [`writer`]: a socket's writer task, its whole life: draining the
//!   outbox, parking when idle, and the close (or reset) that ends it.
//! - [`subscriber`]: the handle of one socket, with its subscriptions.

pub(crate) mod outbox;
pub(crate) mod subscriber;
pub(crate) mod writer;

pub use subscriber::Subscriber;
