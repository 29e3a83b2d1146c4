//! WebSocket sessions: each socket's read loop and request handling, what
//! every session shares, and the node's set of live sessions.
//!
//! Uses: `sync`, `clock`, `config`, `metrics`, `rate`, `auth`, `socket`,
//! `presence`, `history`, `cluster`, `router`.
//!
//! - [`params`]: the `/ws` URL parameters, validated before the 101.
//! - [`deadlines`]: each socket's next deadline (token expiry), in time
//!   order for one sweep.
//! - [`rawstatus`]: `--raw-status`, the classic chat server's status 1 and
//!   its last message with status 0 when a raw socket goes.
//! - [`state`]: what every session shares (settings, router, counters,
//!   token checks, the live sockets and their deadlines).
//! - [`read`]: a socket's read loop and request handling.
//! - [`live`]: the set of live sessions: accepting a handshake into one,
//!   the snapshot the heartbeat walks, token deadlines.

pub(crate) mod deadlines;
pub(crate) mod live;
pub(crate) mod params;
pub(crate) mod rawstatus;
pub(crate) mod read;
pub(crate) mod state;
