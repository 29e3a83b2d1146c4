//! The cluster link: how a publish reaches every node over NATS, and
//! what arrives from the others. Embedded nodes use only [`bus`]'s
//! in-process path.
//!
//! Uses: `sync`, `tasks`, `config`, `metrics`, `rate`, `presence`,
//! `fanout`, `history`.
//!
//! - [`link`]: the link's NATS client (JetStream, status samples):
//!   addresses, credentials, TLS, reconnects.
//! - [`natsio`]: the link's topic traffic on a NATS connection of its own:
//!   every subject subscription and plain publish on one socket, read in
//!   the server's order by one task.
//! - [`subjects`]: the link's NATS subscriptions, one per key with local
//!   interest, when each is live, and what arrives on them.
//! - [`outbound`]: the link's sender task: publishes to NATS in order,
//!   history publishes to the stream with their acks.
//! - [`bus`]: how a publish reaches every node (embedded: in-process;
//!   cluster: NATS), and the link's interest in subjects.

pub(crate) mod bus;
pub(crate) mod link;
pub(crate) mod natsio;
pub(crate) mod outbound;
pub(crate) mod subjects;
