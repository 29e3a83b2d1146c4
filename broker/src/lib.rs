//! Herald: a WebSocket pub/sub broker node.
//!
//! # Layout
//!
//! A folder per concept, bottom to top. Each folder's (or file's) own doc
//! opens with what it owns and a `Uses:` line naming what it may use; a
//! test (`broker/tests/integration/layering.rs`) holds every `crate::` path
//! to those lines, and every `Uses:` to this order, so the arrows form no
//! cycle. Inside a folder, its doc lists the files bottom to top and the
//! same test holds the files to that order.
//!
//! - [`sync`]: locks that ignore poisoning, one idiom in one place.
//! - [`clock`]: the node's one clock (monotonic milliseconds, and the wall
//!   clock where a time leaves the process).
//! - [`tasks`]: every task a node starts, owned and joined.
//! - [`config`]: every setting, as flags and `HERALD_*` variables, and the
//!   setting types.
//! - [`metrics`]: counters rendered in the Prometheus text format.
//! - [`rate`]: the token bucket behind every rate limit.
//! - [`auth`]: connection tokens (JWT) checked against the configured keys,
//!   and the grants they carry.
//! - [`socket`]: a socket's write side: its queue of frames (the outbox),
//!   its writer task, the handle the fan-out holds.
//! - [`presence`]: who is on each presence topic, cluster-wide.
//! - [`fanout`]: the local fan-out table: topics, wildcard patterns,
//!   chunked member lists.
//! - [`history`]: history in memory and in JetStream, and recovery.
//! - [`cluster`]: the NATS link: the bus, its connection, subjects,
//!   the sender.
//! - [`router`]: the one owner of a subscription's life and of a publish's
//!   way in, for WebSocket sessions and HTTP alike.
//! - [`session`]: each socket's read loop, what sessions share, the set of
//!   live sessions, raw status.
//! - [`net`]: what a connection meets first: PROXY header, client address,
//!   per-address admission, the pre-read head, the route table.
//! - [`node`]: the state one process shares, built once; the heartbeat and
//!   the drain.
//! - [`http`]: the HTTP endpoints' handlers and the WebSocket handshake's
//!   checks.
//! - [`status`]: the live status page and its sampler.
//! - [`exec`]: websocketd mode: a program per WebSocket.
//! - [`server`]: accept, route (by the table in [`net`]), upgrade,
//!   shutdown.
//!
//! Why a session ended, with its close code and whether the client should
//! reconnect, is [`herald_protocol::Disconnect`]: the one place close codes
//! are chosen. The `herald` binary (`main.rs`, with the `pub`/`sub`/`check`
//! clients in `cli.rs`) sits on top, uses only what this file re-exports,
//! and is the only code that uses `anyhow`.
#![warn(missing_docs)]

mod auth;
mod clock;
mod cluster;
mod config;
mod exec;
mod fanout;
mod history;
mod http;
mod metrics;
mod net;
mod node;
mod presence;
mod rate;
mod router;
mod server;
mod session;
mod socket;
mod status;
mod sync;
mod tasks;

pub use auth::{Auth, Grants};
pub use clock::unix_secs;
pub use config::{parse_duration, Config};
pub use fanout::{Delivery, Hub};
pub use metrics::Metrics;
pub use net::routes::{Collision, Routes};
pub use node::{check, Error};
pub use presence::{Member, On, Roster};
pub use server::{bind, run};
pub use socket::Subscriber;

// For the benchmarks (`benches/`): an embedded node's bus and its history
// settings, so a publish on a history topic can be measured whole.
#[doc(hidden)]
pub use cluster::bus::Bus;
#[doc(hidden)]
pub use config::values::Retention;
#[doc(hidden)]
pub use history::store::HistorySettings;
#[doc(hidden)]
pub use tasks::Tasks;
