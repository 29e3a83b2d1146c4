//! Herald's client protocol, and the NATS protocol its cluster link speaks,
//! sans-I/O: bytes in, typed values out, and back.
//!
//! # Layout
//!
//! - [`topic`]: topic names (`todo:count`), subscription patterns (`todo:*`,
//!   `chat:>`), matching, and the mapping to NATS subjects.
//! - [`ws`]: RFC 6455 frames: a [`ws::Reader`] that assembles client messages
//!   from a caller-owned buffer, and encoders for unmasked server frames.
//! - [`message`]: protocol v1 JSON: client requests (`sub`, `unsub`, `pub`)
//!   and server frames (deliveries, acks, errors, presence notices).
//! - [`nats`]: the NATS client protocol: a decoder for what a server sends
//!   (`MSG`, `HMSG`, `PING`, ...) that borrows from a caller-owned buffer,
//!   and encoders for what a client sends (`SUB`, `PUB`, `HPUB`, ...).
//! - [`position`]: a place in a topic's history (`seq`, `epoch`), the
//!   deliveries that carry it and the answer to a recovery.
//! - [`disconnect`]: every way a node ends a session: close code, reason,
//!   and whether the client should reconnect.
//! - [`url`]: `ws://` URLs as command-line clients take them.
//!
//! Nothing here does I/O or depends on a runtime, so every parser can be
//! fuzzed and benchmarked alone.
#![warn(missing_docs, unreachable_pub)]

pub mod disconnect;
pub mod message;
pub mod nats;
pub mod position;
pub mod topic;
pub mod url;
pub mod ws;

pub use disconnect::Disconnect;

pub use message::{ErrorCode, ErrorReply, Request, RequestError};
pub use topic::{Pattern, Topic, TopicError};
