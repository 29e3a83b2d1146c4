//! How a message reaches every node that has subscribers for it.
//!
//! Embedded mode (the default) is in-process: a publish goes straight to the
//! local hub. Every publisher in the node — WebSocket `pub`, HTTP publish,
//! presence notices — goes through [`Bus`], so a cluster link can be added
//! here without touching them; the hub reports interest changes
//! ([`crate::hub::Interest`]) for a link that subscribes per subject.

use std::sync::atomic::Ordering::Relaxed;

use crate::hub::{Body, Hub, Interest};
use crate::metrics::Metrics;
use std::sync::Arc;

/// Why a publish could not be handed on.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The cluster link is down; the message reached local subscribers only.
    #[error("cluster link unavailable: {0}")]
    LinkDown(String),
}

/// The node's bus. Cloning is a refcount.
#[derive(Clone)]
pub struct Bus {
    hub: Hub,
    metrics: Arc<Metrics>,
}

impl Bus {
    /// The in-process bus of an embedded node.
    pub fn embedded(hub: Hub, metrics: Arc<Metrics>) -> Self {
        Bus { hub, metrics }
    }

    /// The hub this bus delivers into.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Publishes `data` (well-formed JSON) on concrete `topic`. Returns the
    /// number of local deliveries.
    pub fn publish(&self, topic: &str, data: &[u8]) -> Result<usize, BusError> {
        self.metrics.messages_in.fetch_add(1, Relaxed);
        self.metrics.bytes_in.fetch_add(data.len() as u64, Relaxed);
        Ok(self.hub.deliver(topic, Body::Data(data)))
    }

    /// Announces that `client` joined or left `topic`.
    pub fn presence(&self, topic: &str, event: &str, client: &str, name: Option<&str>) {
        self.hub.deliver(topic, Body::Presence { event, client, name });
    }

    /// Called when the hub gains or loses all local interest in a pattern.
    /// The embedded bus has nothing to do.
    pub fn interest(&self, _pattern: &str, _change: Interest) {}
}
