//! Who is on each presence topic, cluster-wide: this node's members, the
//! other nodes' from their notices and snapshots, and expiry of the members
//! of a node that went silent.
//!
//! Uses: `sync`, `clock`, `rate`.
//!
//! - [`roster`]: the members of every presence topic and their changes.
//! - [`snapshots`]: a node's presence snapshot put back together from its
//!   parts.
//! - [`notice`]: one join or leave between nodes, as NATS headers.

pub(crate) mod notice;
pub(crate) mod roster;
pub(crate) mod snapshots;

pub use roster::{Member, On, Roster};
