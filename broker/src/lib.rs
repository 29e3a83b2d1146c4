//! Herald: a WebSocket pub/sub broker node.
//!
//! # Layout
//!
//! Bottom to top; a module uses only modules listed above it (a test,
//! `tests/layering.rs`, holds every `use crate::` to this order):
//!
//! - [`values`]: setting values that are more than a number or a string
//!   (an `--exec` route, an address block).
//! - [`config`]: every setting, as flags and `HERALD_*` variables.
//! - [`metrics`]: counters rendered in the Prometheus text format.
//! - [`history`]: the last minutes of the node's figures and its peers'
//!   latest, for the status page.
//! - [`rate`]: the token bucket behind every rate limit.
//! - [`deadlines`]: each socket's next deadline (token expiry), in time
//!   order for one sweep.
//! - [`auth`]: connection tokens (JWT) checked against the configured keys,
//!   and the grants they carry.
//! - [`admission`]: per-address connection counts and rates, and the client
//!   address behind a trusted proxy (PROXY protocol, X-Forwarded-For).
//! - [`outbox`]: a socket's bounded queue of ready frames, and its parked
//!   write half.
//! - [`writer`]: a socket's writer task, its whole life: draining the
//!   outbox, parking when idle, and the close (or reset) that ends it.
//! - [`subscriber`]: the handle of one socket that the hub, the heartbeat
//!   and shutdown hold, knowing nothing of its session.
//! - [`members`]: one key's subscribers as a chunked copy-on-write list:
//!   joins and leaves cost a bounded copy, fan-out walks a snapshot.
//! - [`patterns`]: wildcard subscriptions in a subject tree with a match
//!   cache: matching costs one step per segment.
//! - [`roster`]: who is on each presence topic, cluster-wide: this node's
//!   members, the others' from their notices and snapshots, and expiry.
//! - [`snapshots`]: a node's presence snapshot put back together from its
//!   parts.
//! - [`journal`]: history in memory (embedded): a ring per history
//!   topic, one sequence, a byte cap; and the words replays share.
//! - [`stream`]: history in a cluster: the JetStream stream, its epoch,
//!   the node's ordered feed from it, and replays.
//! - [`store`]: the history topics and where they are kept.
//! - [`hub`]: the node's fan-out table: sharded topics, wildcard patterns.
//! - [`link`]: the cluster link's NATS client (JetStream, status samples):
//!   addresses, credentials, TLS, reconnects.
//! - [`natsio`]: the link's topic traffic on a NATS connection of its
//!   own: every subject subscription and plain publish on one socket,
//!   read in the server's order by one task.
//! - [`subjects`]: the cluster link's NATS subscriptions, one per key with
//!   local interest, when each is live, and what arrives on them.
//! - [`outbound`]: the link's sender task: publishes to NATS in order,
//!   history publishes to the stream with their acks.
//! - [`bus`]: how a publish reaches every node (embedded: in-process;
//!   cluster: NATS), and the link's interest in subjects.
//! - [`recovery`]: a `sub` with `since` or `last`: the replay, paced,
//!   and the seam to live delivery.
//! - [`router`]: the one owner of a subscription's life (socket list, hub,
//!   cluster interest, presence, metrics) and of a publish's way in, for
//!   WebSocket sessions and HTTP alike.
//! - [`rawstatus`]: `--raw-status`, the classic chat server's status 1
//!   and its last message with status 0 when a raw socket goes.
//! - [`params`]: the `/ws` URL parameters, validated before the 101.
//! - [`shared`]: what every session shares (settings, router, counters,
//!   token checks, the live sockets and their deadlines).
//! - [`session`]: each socket's read loop and request handling, and what
//!   sessions share.
//! - [`sessions`]: the set of live sessions: accepting a handshake into
//!   one, the snapshot the heartbeat walks, token deadlines.
//! - [`node`]: the state one process shares, built once; the heartbeat and
//!   the drain.
//! - [`preread`]: the first request head, read under the handshake timeout.
//! - [`http`]: HTTP publish, health, readiness, metrics.
//! - [`status`]: the live status page (`/status`) and its sampler, which
//!   also trades samples with the other nodes over NATS.
//! - [`handshake`]: what every WebSocket handshake goes through before its
//!   101 (origin, token, per-address limits, a connection slot).
//! - [`exec`]: websocketd mode: a program per WebSocket, its stdout lines
//!   out, the client's messages in, with backpressure.
//! - [`server`]: accept, route, upgrade, shutdown.
//!
//! Why a session ended, with its close code and whether the client should
//! reconnect, is [`herald_protocol::Disconnect`]: the one place close codes
//! are chosen. The `herald` binary (`main.rs`, with the `pub`/`sub`/`check`
//! clients in `cli.rs`) sits on top and is the only code that uses `anyhow`.
#![warn(missing_docs)]

pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod deadlines;
pub mod exec;
pub mod handshake;
pub mod history;
pub mod http;
pub mod hub;
pub mod journal;
pub mod link;
pub mod members;
pub mod metrics;
pub mod natsio;
pub mod node;
pub mod outbound;
pub mod outbox;
pub mod params;
pub mod patterns;
pub mod preread;
pub mod rate;
pub mod rawstatus;
pub mod recovery;
pub mod roster;
pub mod router;
pub mod server;
pub mod session;
pub mod sessions;
pub mod shared;
pub mod snapshots;
pub mod status;
pub mod store;
pub mod stream;
pub mod subjects;
pub mod subscriber;
pub mod values;
pub mod writer;

pub use config::Config;
pub use node::Node;
pub use server::{bind, run, serve};
