//! The node: everything one Herald process shares, built once at start.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::bus::{Bus, LinkError};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::Sessions;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster link's settings are wrong.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Binding or reading the listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// State shared by the accept loop, HTTP handlers and sessions.
pub struct Node {
    /// Settings.
    pub config: Arc<Config>,
    /// Subscriptions and publishes.
    pub router: Router,
    /// The live WebSocket sessions.
    pub sessions: Arc<Sessions>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// False once shutdown began: `/readyz` fails and `/ws` refuses.
    pub ready: AtomicBool,
}

impl Node {
    /// A node: embedded, or linked to others through NATS when
    /// `config.nats` names servers (the link connects in the background).
    pub async fn new(config: Config) -> Result<Arc<Self>, Error> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(metrics.clone(), config.presence.clone());
        let (bus, client_suffix) = if config.nats.is_empty() {
            (Bus::embedded(hub, metrics.clone()), String::new())
        } else {
            let bus = Bus::cluster(
                hub,
                metrics.clone(),
                &config.nats,
                &config.nats_prefix,
                config.max_message_bytes,
            )
            .await?;
            (bus, format!("-{}", node_tag()))
        };
        let router = Router::new(bus, metrics.clone(), client_suffix, config.max_subscriptions);
        let sessions = Arc::new(Sessions::new(config.clone(), router.clone(), metrics.clone()));
        Ok(Arc::new(Node {
            config,
            router,
            sessions,
            metrics,
            ready: AtomicBool::new(true),
        }))
    }
}

/// A short tag that tells this node's sockets from other nodes' in a
/// cluster: process id and start time, hashed.
fn node_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:06x}", h.finish() & 0xff_ffff)
}
