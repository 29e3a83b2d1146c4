//! What every WebSocket session shares, built once by the node's set of
//! sessions: settings, the router, counters, token checks, the live
//! sockets, their token deadlines, and the writers' common state.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, Identity};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::deadlines::Deadlines;
use crate::socket::subscriber::Subscriber;
use crate::socket::writer::Writers;

/// What every session shares: built once by [`crate::session::live::Sessions`].
pub struct Shared {
    /// Settings.
    pub config: Arc<Config>,
    /// Subscriptions and publishes.
    pub router: Router,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Token checks; `None` when the node has no access control.
    pub auth: Option<Arc<Auth>>,
    /// Grants of sockets without a token, when `auth` is set.
    pub anonymous: Option<Arc<Identity>>,
    /// Open sessions, for the heartbeat and shutdown.
    pub live: DashMap<u64, Arc<Subscriber>>,
    /// When each socket's token (or its wait for one) runs out.
    pub deadlines: Deadlines,
    /// Session tasks (read loops and writers), so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// What every socket's writer shares (runs under `tracker`).
    pub writers: Arc<Writers>,
    /// The heartbeat word as a ready frame, shared by every reply.
    pub heartbeat_reply: Bytes,
}

impl Shared {}
