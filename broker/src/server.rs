//! Accepting connections, routing requests, the heartbeat, and shutdown.
//!
//! [`run`] takes a bound listener, a [`Config`] and a shutdown future, so
//! tests and the binary start the same server. Each TCP connection is served
//! as HTTP/1 with upgrades; `/ws` is checked (limits, URL parameters) before
//! the 101 is sent, and the upgraded socket becomes a session tracked by the
//! node so shutdown can drain it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use herald_protocol::ws::{self, close, OpCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::Config;
use crate::connection::{self, Conn};
use crate::http::{self, Body};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::outbox::CloseRequest;
use crate::preread::{self, Head, Prefixed};

/// Largest HTTP request head (request line and headers) a client may send.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// State shared by everything in one node.
pub struct Node {
    /// Settings.
    pub config: Config,
    /// Where publishes go.
    pub bus: Bus,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Open sessions, for the heartbeat and shutdown.
    pub sessions: DashMap<u64, Arc<Conn>>,
    /// Session tasks (read loops and writers), so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// False once shutdown began: `/readyz` fails and `/ws` refuses.
    pub ready: AtomicBool,
    /// The heartbeat word as a ready frame, shared by every reply.
    pub heartbeat_reply: Bytes,
    /// Appended to socket ids in presence notices so they are unique across
    /// a cluster (empty on an embedded node).
    pub client_suffix: String,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Node {
    /// A node: embedded, or linked to others through NATS when
    /// `config.nats` names servers (the link connects in the background).
    pub async fn new(config: Config) -> anyhow::Result<Arc<Self>> {
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
        Ok(Arc::new(Node {
            client_suffix,
            heartbeat_reply: ws::encode_frame(OpCode::Text, config.heartbeat_word.as_bytes()),
            config,
            bus,
            metrics,
            sessions: DashMap::new(),
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
        }))
    }

    /// A fresh session id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    /// Milliseconds since the node started: a cheap clock for heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reserves a connection slot; false when the node is full.
    pub fn reserve_connection(&self) -> bool {
        let max = self.config.max_connections as i64;
        if self.metrics.connections.fetch_add(1, Relaxed) >= max {
            self.metrics.connections.fetch_sub(1, Relaxed);
            return false;
        }
        true
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

/// Binds `addr` with a deep listen backlog (tokio's `bind` uses 128, which
/// drops handshakes during connection storms).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}

/// Serves on `listener` until `shutdown` resolves, then drains: readiness
/// turns false, the listener closes, every socket gets 1001 spread over the
/// drain period, queued frames are flushed, and the function returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let node = Node::new(config).await?;
    serve(node, listener, shutdown).await;
    Ok(())
}

/// [`run`] with a node built by the caller (so it can inspect it).
///
/// On shutdown the listener stays open through the drain period, answering
/// `/readyz` with 503 and `/ws` with 503 `shutting_down`, so a load balancer
/// sees the node leave before its port closes.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let heartbeat = tokio::spawn(heartbeat(node.clone()));
    let stop = CancellationToken::new();
    let accept = tokio::spawn(accept_loop(node.clone(), listener, stop.clone()));
    shutdown.await;
    node.ready.store(false, Relaxed);
    drain(&node).await;
    stop.cancel();
    let _ = accept.await;
    heartbeat.abort();
}

async fn accept_loop(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff = Duration::from_millis(5);
                    tokio::spawn(serve_http(node.clone(), stream, remote));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

async fn drain(node: &Arc<Node>) {
    let conns: Vec<Arc<Conn>> = node.sessions.iter().map(|e| e.value().clone()).collect();
    tracing::info!(sockets = conns.len(), period = ?node.config.drain_period, "draining");
    if !conns.is_empty() {
        let steps = conns.len().min(50);
        let per_step = conns.len().div_ceil(steps);
        let pause = node.config.drain_period / steps as u32;
        for (i, chunk) in conns.chunks(per_step).enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            for c in chunk {
                c.close(CloseRequest {
                    code: close::GOING_AWAY,
                    reason: "going_away: node shutting down, reconnect".into(),
                    flush: true,
                });
            }
        }
    }
    drop(conns);
    node.tracker.close();
    let grace = Duration::from_secs(5);
    if tokio::time::timeout(grace, node.tracker.wait()).await.is_err() {
        tracing::warn!("sessions still open after the drain grace period; exiting anyway");
    }
    tracing::info!("drained");
}

/// Pings every socket each interval and reaps those from which nothing
/// (not even a pong) arrived for two whole intervals, so one late pong on a
/// busy machine is forgiven. One task for the node: no timer per socket, and
/// the ping frame is encoded once.
async fn heartbeat(node: Arc<Node>) {
    let interval = node.config.ping_interval;
    if interval.is_zero() {
        return;
    }
    let ping = ws::encode_frame(OpCode::Ping, b"");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Node clock at the previous two rounds: a socket silent since the
    // older one missed a ping and a whole interval after it. Zero at first,
    // so sockets accepted while this task starts are never reaped early.
    let mut rounds = [0u64; 2];
    loop {
        tick.tick().await;
        let now = node.now_ms();
        let deadline = rounds[0];
        for entry in node.sessions.iter() {
            let c = entry.value();
            if c.last_seen() < deadline {
                if c.close(CloseRequest {
                    code: close::HEARTBEAT_TIMEOUT,
                    reason: "heartbeat_timeout: no answer to ping".into(),
                    flush: false,
                }) {
                    node.metrics.heartbeat_timeouts.fetch_add(1, Relaxed);
                }
            } else {
                c.push(ping.clone());
            }
        }
        rounds = [rounds[1], now];
    }
}

async fn serve_http(node: Arc<Node>, mut stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let timeout = node.config.handshake_timeout;
    let prefix = match preread::first_head(&mut stream, timeout, MAX_HEAD_BYTES, &node.metrics).await {
        Head::Arrived(prefix) => prefix,
        Head::Gone => return,
        Head::TimedOut => {
            tracing::debug!(%remote, "handshake_timeout: request head not received in time");
            return;
        }
    };
    let svc_node = node.clone();
    let svc = service_fn(move |req| route(svc_node.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // Later requests on a kept-alive connection get the same bound.
        .header_read_timeout(node.config.handshake_timeout)
        // Request heads past this are refused with 431: a handshake needs ~1 KiB.
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(
            TokioIo::new(Prefixed {
                prefix,
                inner: stream,
            }),
            svc,
        )
        .with_upgrades();
    if let Err(e) = conn.await {
        if e.is_timeout() {
            node.metrics.handshake_timeouts.fetch_add(1, Relaxed);
            tracing::debug!(%remote, "handshake_timeout: request headers not received in time");
        } else {
            tracing::trace!(%remote, error = %e, "http connection error");
        }
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path();
    Ok(match path {
        "/ws" => upgrade(node, req),
        _ => http::handle(&node, req).await,
    })
}

fn upgrade(node: Arc<Node>, mut req: Request<Incoming>) -> Response<Body> {
    use herald_protocol::ErrorCode;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return http::error(
            hyper::StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            "/ws takes WebSocket connections (Upgrade: websocket)",
        );
    }
    if !node.ready.load(Relaxed) {
        return http::error(
            hyper::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "node is draining; connect to another node",
        );
    }
    let params = match http::session_params(req.uri().query().unwrap_or(""), node.config.max_subscriptions) {
        Ok(p) => p,
        Err((code, msg)) => {
            node.metrics.error(code);
            return http::error(hyper::StatusCode::BAD_REQUEST, code, &msg);
        }
    };
    if !node.reserve_connection() {
        node.metrics.error(ErrorCode::ConnectionLimit);
        let msg = format!(
            "max_connections: node holds {} connections",
            node.config.max_connections
        );
        return http::error(
            hyper::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ConnectionLimit,
            &msg,
        );
    }
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            node.metrics.connections.fetch_sub(1, Relaxed);
            return http::error(
                hyper::StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                &e.to_string(),
            );
        }
    };
    // Subscribed before the 101 goes out: once the client sees its socket
    // open, its URL subscriptions are in effect.
    let accepted = connection::accept(&node, params);
    node.tracker.spawn(async move {
        let upgraded = match fut.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return accepted.abandon();
            }
        };
        match upgraded.downcast::<TokioIo<Prefixed>>() {
            // The session gets tasks of its own, so the long-lived tasks hold
            // none of the handshake's state.
            Ok(parts) => {
                let Prefixed { prefix, inner } = parts.io.into_inner();
                if prefix.is_empty() {
                    accepted.start(inner, &parts.read_buf)
                } else {
                    accepted.start(inner, &[&prefix[..], &parts.read_buf[..]].concat())
                }
            }
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                accepted.abandon();
            }
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, http::empty())
}
