//! The node: everything one Herald process shares, built once at start;
//! the heartbeat that pings and reaps its sockets, and the drain that
//! closes them on shutdown.
//!
//! Uses: `sync`, `clock`, `tasks`, `config`, `metrics`, `rate`, `auth`,
//! `socket`, `presence`, `fanout`, `history`, `cluster`, `router`,
//! `session`, `net`.
//!
//! - [`samples`]: the last minutes of the node's figures and its peers'
//!   latest, for the status page.

pub(crate) mod samples;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::ws::{self, OpCode};
use herald_protocol::Disconnect;
use tokio::sync::Semaphore;

use crate::auth::{Auth, KeyError};
use crate::cluster::bus::Bus;
use crate::cluster::link::{LinkAuth, LinkError, LinkSettings};
use crate::config::Config;
use crate::fanout::hub::{Delivery, Hub};
use crate::history::store::HistorySettings;
use crate::metrics::Metrics;
use crate::net::admission::Admission;
use crate::net::routes::{Collision, Routes};
use crate::presence::roster::{Change, Event};
use crate::presence::snapshots::Assembler;
use crate::router::Router;
use crate::session::live::Sessions;
use crate::sync::{Lock, ReadWrite};
use crate::tasks::Tasks;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster link's settings are wrong.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// A key file (`--auth-*`, `--api-key-file`) could not be used.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// An `--exec` path is a built-in route's, or given twice.
    #[error(transparent)]
    Routes(#[from] Collision),
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
    /// One permit per TCP connection not yet upgraded (HTTP in progress).
    pub pending: Arc<Semaphore>,
    /// Per-address counts and the trusted proxies.
    pub admission: Arc<Admission>,
    /// Refused connections and handshakes already logged, so a flood of
    /// them logs a line per reason per window.
    pub refusals: crate::rate::Quiet,
    /// Keys accepted by HTTP publish (`--api-key`, `--api-key-file`).
    pub api_keys: std::sync::RwLock<Vec<String>>,
    /// `--api-key-file`'s modification time when last read, so a file
    /// changed in place (a mounted Secret) is re-read without a SIGHUP.
    api_keys_read: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The last minutes of figures, for the status page.
    pub history: crate::node::samples::History,
    /// Cancelled once the drain has closed every socket: an `--exec`
    /// socket still open (one that arrived meanwhile) closes with 1001.
    pub exec_stop: tokio_util::sync::CancellationToken,
    /// Each open `--exec` socket's own close, which the drain spreads over
    /// its period with the WebSocket sessions.
    pub execs: dashmap::DashMap<u64, tokio_util::sync::CancellationToken>,
    /// Every task the node starts; `run()` returns once all have ended.
    pub tasks: Tasks,
    /// What answers each request: the built-in endpoints and the `--exec`
    /// routes.
    pub routes: Routes,
}

impl Node {
    /// A node: embedded, or linked to others through NATS when
    /// `config.nats` names servers (the link connects in the background).
    pub async fn new(mut config: Config) -> Result<Arc<Self>, Error> {
        // First: a table without one answer per path is refused before
        // anything connects.
        let routes = Routes::new(&config)?;
        fit_to_descriptors(&mut config);
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(metrics.clone(), config.presence.clone(), config.max_patterns);
        let tasks = Tasks::default();
        let history = HistorySettings {
            rules: config.history.clone(),
            bytes: config.history_bytes,
            replicas: config.history_replicas,
            tail_bytes: config.history_tail_bytes,
            stream: config.history_stream.clone(),
        };
        let (bus, client_suffix) = if config.nats.is_empty() {
            (
                Bus::embedded(hub, metrics.clone(), &history, &tasks),
                String::new(),
            )
        } else {
            let bus = Bus::cluster(
                hub,
                metrics.clone(),
                &LinkSettings {
                    urls: config.nats.clone(),
                    prefix: config.nats_prefix.clone(),
                    auth: LinkAuth {
                        user: config.nats_user.clone().filter(|u| !u.is_empty()),
                        password: config.nats_password.clone().filter(|p| !p.is_empty()),
                        tls_ca: config.nats_tls_ca.clone(),
                    },
                },
                config.max_message_bytes,
                &history,
                &tasks,
            )
            .await?;
            (bus, format!("-{}", node_tag()))
        };
        let by_user = config.presence_by == "user";
        let router = Router::new(
            bus,
            metrics.clone(),
            client_suffix,
            config.max_subscriptions,
            by_user,
            config.max_replay,
        );
        let auth = Auth::from_config(&config)?.map(Arc::new);
        if auth.is_none() && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "no --auth-* key: anyone who can reach this address may subscribe and publish to every topic"
            );
        }
        let api_keys_read = modified(config.api_key_file.as_deref());
        let api_keys = api_keys(&config)?;
        let sessions = Arc::new(Sessions::new(
            config.clone(),
            router.clone(),
            metrics.clone(),
            auth,
        ));
        Ok(Arc::new(Node {
            admission: Arc::new(Admission::new(&config)),
            refusals: Default::default(),
            exec_stop: Default::default(),
            execs: Default::default(),
            tasks,
            routes,
            history: Default::default(),
            api_keys: std::sync::RwLock::new(api_keys),
            api_keys_read: std::sync::Mutex::new(api_keys_read),
            pending: Arc::new(Semaphore::new(config.max_pending_connections)),
            config,
            router,
            sessions,
            metrics,
            ready: AtomicBool::new(true),
        }))
    }
}

/// Checks what [`Node::new`] would refuse, without building a node or
/// connecting anything: the route table, the token keys, the API key file
/// and the `--nats` URLs. The binary calls it before it binds its port, so
/// a node that cannot start never says it listens.
pub fn check(config: &Config) -> Result<(), Error> {
    Routes::new(config)?;
    Auth::from_config(config)?;
    api_keys(config)?;
    let auth = LinkAuth {
        user: config.nats_user.clone(),
        password: config.nats_password.clone(),
        tls_ca: config.nats_tls_ca.clone(),
    };
    for url in &config.nats {
        crate::cluster::link::server(url, &auth)?;
    }
    Ok(())
}

/// The HTTP publish keys: `--api-key` and the lines of `--api-key-file`
/// (blank lines and `#` comments skipped; an empty key means none).
fn api_keys(config: &Config) -> Result<Vec<String>, KeyError> {
    let mut keys: Vec<String> = config.api_key.iter().cloned().collect();
    if let Some(path) = &config.api_key_file {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .map(String::from),
        );
    }
    keys.retain(|k| !k.is_empty());
    Ok(keys)
}

/// A file's modification time, if it can be read.
fn modified(path: Option<&str>) -> Option<std::time::SystemTime> {
    std::fs::metadata(path?).and_then(|m| m.modified()).ok()
}

impl Node {
    /// Whether `--api-key-file` changed since it was read.
    fn api_keys_changed(&self) -> bool {
        let now = modified(self.config.api_key_file.as_deref());
        *self.api_keys_read.locked() != now
    }

    /// Re-reads the key files (SIGHUP, or one changed): the token keys and
    /// `--api-key-file`. On an error the keys in use stay.
    pub fn reload_keys(&self) {
        if let Some(auth) = self.sessions.auth() {
            match auth.reload() {
                Ok(n) => tracing::info!(keys = n, "token keys reloaded"),
                Err(e) => tracing::error!(error = %e, "token keys not reloaded; the old ones stay"),
            }
        }
        // Stamped before reading: a change made while it is read is seen
        // at the next check.
        let stamp = modified(self.config.api_key_file.as_deref());
        match api_keys(&self.config) {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "API keys reloaded");
                *self.api_keys.writing() = keys;
                *self.api_keys_read.locked() = stamp;
            }
            Err(e) => tracing::error!(error = %e, "API keys not reloaded; the old ones stay"),
        }
    }

    /// Closes sockets whose token expired (4003) or that sent none in time
    /// (4501), four times a second; forgets idle client addresses; reloads
    /// key files that changed (every 5 s).
    pub async fn watch_tokens(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rounds = 0u64;
        loop {
            tick.tick().await;
            self.sessions.expire();
            rounds += 1;
            if rounds.is_multiple_of(240) {
                self.admission.sweep(Duration::from_secs(60));
            }
            // A mounted Secret is updated in place: reload on change.
            if rounds.is_multiple_of(20)
                && (self.sessions.auth().is_some_and(|a| a.changed()) || self.api_keys_changed())
            {
                self.reload_keys();
            }
        }
    }

    /// Keeps presence right across the cluster: publishes this node's
    /// members three times per `--presence-ttl`, applies the other nodes'
    /// snapshots, and drops nodes silent past the TTL, telling this node's
    /// sockets of every change.
    pub async fn presence_sync(self: Arc<Self>) {
        let bus = self.router.bus();
        // Snapshots share the topic connection with the notices: a node's
        // snapshot never overtakes a join it sent before it.
        let (Some(io), Some(prefix)) = (bus.natsio(), bus.prefix()) else {
            return; // embedded: no other nodes
        };
        if self.config.presence.is_empty() && self.config.raw_status.is_empty() {
            return;
        }
        let subject = format!("_herald.presence.{prefix}");
        let me = self.router.node_id().to_owned();
        // Weak: the handler lives in the link's subscription table, which
        // the node owns; a strong reference would keep the node (and its
        // JetStream context's task) alive after it stops.
        let node = Arc::downgrade(&self);
        let (id, parts) = (me.clone(), Assembler::default());
        let handler = move |payload: &[u8]| {
            let Some(node) = node.upgrade() else { return };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
                return;
            };
            let Some(from) = v["node"].as_str().filter(|n| *n != id) else {
                return;
            };
            let roster = node.router.hub().roster();
            roster.touch(from);
            if let Some(whole) = parts.part(v) {
                let changes = roster.apply_snapshot(&whole);
                node.tell(changes);
            }
        };
        io.subscribe_with(&subject, Arc::new(handler));
        let ttl = self.config.presence_ttl.max(Duration::from_millis(300));
        let every = ttl / 3;
        let mut tick = tokio::time::interval(Duration::from_millis(100).max(every / 5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now() - every;
        let mut gen = 0u64;
        loop {
            tick.tick().await;
            let roster = self.router.hub().roster();
            if last.elapsed() >= every {
                last = tokio::time::Instant::now();
                gen += 1;
                // Each part within half the server's max_payload: a bigger
                // message would make the server cut the link.
                let max = (io.max_payload() / 2).clamp(4096, 512 << 10);
                for part in roster.snapshot_parts(&me, gen, max) {
                    let _ = io.publish(&subject, None, part.to_string().into()).await;
                }
            }
            let gone = roster.expire(ttl);
            // A dead node's raw-status sockets: their last objects go out
            // with status 0, once, from the first surviving node.
            if !gone.is_empty() && roster.first_of_nodes(&me) {
                for Change { topic, member: m, .. } in &gone {
                    if let Some(last) = &m.last {
                        crate::session::rawstatus::publish_zero(&self.router, topic, last);
                    }
                }
            }
            self.tell(gone);
        }
    }

    /// Tells this node's sockets of joins and leaves learnt from elsewhere
    /// (with `--presence-by user`, only a user's first and last socket).
    fn tell(&self, changes: Vec<Change>) {
        let hub = self.router.hub();
        for Change {
            topic,
            event,
            member: m,
        } in changes
        {
            if !hub.has_presence(&topic) {
                continue; // a --raw-status member only
            }
            if let (true, Some(u)) = (self.router.by_user(), m.user.as_deref()) {
                let now = hub.roster().sockets_of(&topic, u);
                if (event == Event::Join && now != 1) || (event == Event::Leave && now != 0) {
                    continue;
                }
            }
            let body = Delivery::Presence {
                event: event.as_str(),
                client: &m.client,
                user: m.user.as_deref(),
                name: m.name.as_deref(),
            };
            hub.deliver(&topic, body);
        }
    }

    /// Closes every session with 1001, spread over `--drain-period` so
    /// clients do not all reconnect at the same instant; then waits (a few
    /// seconds at most) for their tasks to end.
    pub async fn drain(&self) {
        let period = self.config.drain_period;
        // Every socket, WebSocket sessions and `--exec` ones alike, closed
        // in one spread.
        let mut closes: Vec<Box<dyn Fn() + Send + Sync>> = Vec::new();
        for c in self.sessions.snapshot() {
            closes.push(Box::new(move || {
                c.close(Disconnect::GoingAway);
            }));
        }
        for e in self.execs.iter() {
            let token = e.value().clone();
            closes.push(Box::new(move || token.cancel()));
        }
        tracing::info!(sockets = closes.len(), ?period, "draining");
        if !closes.is_empty() {
            let steps = closes.len().min(50);
            let per_step = closes.len().div_ceil(steps);
            let pause = period / steps as u32;
            for (i, chunk) in closes.chunks(per_step).enumerate() {
                if i > 0 {
                    tokio::time::sleep(pause).await;
                }
                for close in chunk {
                    close();
                }
            }
        }
        drop(closes);
        self.exec_stop.cancel();
        if !self.sessions.wait(Duration::from_secs(5)).await {
            tracing::warn!("sessions still open after the drain grace period; exiting anyway");
        }
        tracing::info!("drained");
    }

    /// Cuts sockets whose writer has had bytes in flight with no progress
    /// for `--write-timeout`, checking a few times per timeout: the write
    /// path itself arms no timer. A cut socket is reset (close code 1006
    /// for the client) and counted in `herald_write_timeouts_total`.
    pub async fn watch_writes(self: Arc<Self>) {
        let limit = self.config.write_timeout;
        if limit.is_zero() {
            return;
        }
        let limit_ms = limit.as_millis() as u64;
        let period = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = crate::clock::now_ms();
            for c in self.sessions.snapshot() {
                if c.outbox
                    .stalled_since()
                    .is_some_and(|t| now.saturating_sub(t) > limit_ms)
                {
                    c.close(Disconnect::WriteTimeout);
                }
            }
        }
    }

    /// Pings every socket each `--ping-interval` and reaps those from which
    /// nothing (not even a pong) arrived for two whole intervals, so one
    /// late pong on a busy machine is forgiven. One task for the node: no
    /// timer per socket, and the ping frame is encoded once. The sockets
    /// are taken in twenty slices spread over the interval (by id), not all
    /// at once: a node's pings and its clients' pongs would otherwise come
    /// as one burst every interval, on every node at about the same time,
    /// and every socket's latency would pay for it.
    pub async fn heartbeat(self: Arc<Self>) {
        let interval = self.config.ping_interval;
        if interval.is_zero() {
            return;
        }
        let ping = ws::encode_frame(OpCode::Ping, b"");
        let slices = (interval.as_millis() as u64 / 50).clamp(1, 20);
        let mut tick = tokio::time::interval(interval / slices as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let silent_ms = 2 * interval.as_millis() as u64;
        for round in 0u64.. {
            tick.tick().await;
            // Silent since before this: it missed a ping and a whole
            // interval after it.
            let deadline = crate::clock::now_ms().saturating_sub(silent_ms);
            for c in self.sessions.slice(slices, round % slices) {
                if c.last_seen() < deadline {
                    if c.close(Disconnect::HeartbeatTimeout) {
                        self.metrics.heartbeat_timeouts.fetch_add(1, Relaxed);
                    }
                } else {
                    c.push(ping.clone());
                }
            }
        }
    }
}

/// Descriptors kept back for the listener, the NATS link, logs and the
/// brief refusals of connections over the limits.
const FD_RESERVE: u64 = 64;

/// The process's soft limit on open files, from `/proc/self/limits`.
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Lowers the connection bounds to what the descriptor limit can hold, so
/// the node refuses with 503 before `accept` itself fails.
/// Raises the soft open-file limit to the hard one, as nats-server and the
/// Go runtime do: a container or shell often starts a process at 1,024
/// soft under a far higher hard limit, and every socket is a descriptor.
/// Logs both limits.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let was = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's nr_open.
    let hard = was.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let mut soft = was.current;
    if let Some(hard) = hard {
        if soft.is_some_and(|s| s < hard) {
            let raised = rustix::process::Rlimit {
                current: Some(hard),
                maximum: was.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => soft = Some(hard),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
            }
        }
    }
    tracing::info!(
        soft_was = ?was.current,
        soft = ?soft,
        hard = ?was.maximum,
        "open-file limit"
    );
}

fn fit_to_descriptors(config: &mut Config) {
    raise_fd_limit();
    let Some(limit) = fd_limit() else { return };
    let budget = limit.saturating_sub(FD_RESERVE).max(2) as usize;
    let wanted = config.max_connections + config.max_pending_connections;
    if wanted <= budget {
        return;
    }
    let pending = config.max_pending_connections.min(budget / 4).max(1);
    let connections = budget - pending;
    tracing::info!(
        fd_limit = limit,
        max_connections = connections,
        max_pending_connections = pending,
        "connection bounds fitted to the open-file limit"
    );
    config.max_connections = config.max_connections.min(connections);
    config.max_pending_connections = pending;
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
