//! Herald: a WebSocket pub/sub broker node.
//!
//! # Layout
//!
//! - [`server`]: the node's shared state ([`server::Node`]), accept loop with
//!   a deep backlog, HTTP/1 routing and the `/ws` upgrade, the heartbeat,
//!   and graceful shutdown.
//! - [`connection`]: one WebSocket session: its read loop and writer task.
//! - [`outbox`]: a socket's bounded outbound queue of ready frames.
//! - [`preread`]: the first request head, read under the handshake timeout.
//! - [`hub`]: local routing: sharded topic map, wildcard patterns, fan-out.
//! - [`bus`]: how a publish reaches every node (embedded: in-process).
//! - [`http`]: HTTP publish, health, readiness, metrics; `/ws` URL parameters.
//! - [`metrics`]: counters rendered in the Prometheus text format.
//! - [`config`]: every setting, as flags and `HERALD_*` variables.
//! - [`client`]: the `herald pub` and `herald sub` command-line clients.
#![warn(missing_docs)]

pub mod bus;
pub mod client;
pub mod config;
pub mod connection;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod preread;
pub mod server;

pub use config::Config;
pub use server::{bind, run, serve, Node};
