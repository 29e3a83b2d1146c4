//! What a connection meets before it is a request of the node's: the
//! PROXY header and the client address behind trusted proxies, per-address
//! admission, the first request head read under a deadline, and the route
//! table that decides which endpoint answers each request.
//!
//! The node holds the admission state, so this folder sits below
//! [`crate::node`]; the handlers that need the node are in [`crate::http`].
//!
//! Uses: `sync`, `clock`, `config`, `metrics`, `rate`.
//!
//! - [`admission`]: per-address connection counts and rates, and the client
//!   address behind a trusted proxy (PROXY protocol, X-Forwarded-For).
//! - [`preread`]: the first request head, read under the handshake timeout.
//! - [`routes`]: the route table: each request's path and method to the
//!   built-in endpoint or `--exec` route that answers it, and the start
//!   check that no `--exec` path is a built-in one.

pub(crate) mod admission;
pub(crate) mod preread;
pub(crate) mod routes;
