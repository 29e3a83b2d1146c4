//! History: the last messages of the `--history` topics, and a `sub`
//! with `since` or `last` that replays them before live delivery.
//!
//! Uses: `sync`, `clock`, `tasks`, `config`, `metrics`, `socket`.
//!
//! - [`queue`]: rings in the order they lose their next message (oldest
//!   `seq`, soonest expiry), so the byte cap and the prune never scan.
//! - [`index`]: the history topics by name, so a replay reads only the
//!   rings its pattern matches.
//! - [`rings`]: each history topic's ring of messages, by id, and what
//!   holding them costs (what the byte cap counts).
//! - [`memory`]: history in memory (embedded): a ring per history topic,
//!   one sequence, a byte cap on what it all costs; and the words replays
//!   share.
//! - [`jetstream`]: history in a cluster: the JetStream stream, its epoch,
//!   the node's ordered feed from it, and replays.
//! - [`store`]: the history topics and where they are kept.
//! - [`recovery`]: a `sub` with `since` or `last`: the replay, paced, and
//!   the seam to live delivery.

pub(crate) mod index;
pub(crate) mod jetstream;
pub(crate) mod memory;
pub(crate) mod queue;
pub(crate) mod recovery;
pub(crate) mod rings;
pub(crate) mod store;
