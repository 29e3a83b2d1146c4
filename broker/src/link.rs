//! The cluster link's NATS connection: server addresses, credentials,
//! TLS, reconnecting for ever, and the connection events the metrics
//! count.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// Why the cluster link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A `--nats` URL that is not a server address.
    #[error("--nats {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The NATS client refused its options.
    #[error("NATS link: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// How the link proves itself to NATS: a user and password, and the CA
/// that signed the servers' TLS certificates (TLS is then required).
#[derive(Debug, Default, Clone)]
pub struct LinkAuth {
    /// NATS user.
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// PEM file of the CA to trust.
    pub tls_ca: Option<String>,
}

/// Connects to NATS at `urls` (in the background: returns at once, and
/// connects and reconnects for ever), counting connections in `metrics`.
pub async fn connect(
    urls: &[String],
    auth: &LinkAuth,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, LinkError> {
    let addrs = urls
        .iter()
        .map(|u| {
            u.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| LinkError::Url {
                    url: u.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let events = metrics;
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    let client = options
        .name("herald")
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(1000)))
        .event_callback(move |event| {
            let m = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        m.nats_connected.store(1, Relaxed);
                        m.nats_connects.fetch_add(1, Relaxed);
                        tracing::info!("NATS link connected");
                    }
                    async_nats::Event::Disconnected => {
                        m.nats_connected.store(0, Relaxed);
                        tracing::warn!("NATS link lost; serving local subscribers, reconnecting");
                    }
                    other => tracing::info!(event = %other, "NATS link event"),
                }
            }
        })
        .connect(addrs)
        .await?;
    Ok(client)
}
