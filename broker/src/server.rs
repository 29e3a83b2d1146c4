//! Accepting connections, routing requests, upgrading sockets, and
//! shutdown.
//!
//! [`run`] takes a bound listener, an optional `--metrics-listen` listener,
//! a [`Config`] and a shutdown future, so tests and the binary start the
//! same server. [`serve`] starts the node's background tasks (heartbeat,
//! key reloads, the write watchdog, the status sampler, presence sync, the
//! reaper of the `--exec` programs' orphans) and the accept loops, and
//! drains on shutdown.
//!
//! Each public TCP connection is admitted (the pending-connection bound, a
//! PROXY header from a trusted proxy, the first request head under the
//! handshake timeout) and served as HTTP/1 with upgrades. Every request, on
//! either listener, is decided once by the route table
//! ([`crate::net::routes`]); [`route`] matches on that decision and calls
//! the handler: the endpoints in [`crate::http`] and [`crate::status`], an
//! `--exec` program ([`crate::exec`]), or a pub/sub WebSocket, whose
//! handshake is checked (URL parameters, limits, then the token) before
//! the 101 and whose socket then becomes a session the node tracks so
//! shutdown can drain it.
//!
//! Uses: `config`, `net`, `session`, `node`, `http`, `status`, `exec`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{ErrorCode, ErrorReply};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::exec;
use crate::http::handshake;
use crate::http::{self, Body};
use crate::net::admission;
use crate::net::preread::{self, Head, Prefixed};
use crate::net::routes::{Listener, Route};
use crate::node::{Error, Node};
use crate::session::params;
use crate::status;

/// Largest HTTP request head (request line and headers) a client may send.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Connections the `--metrics-listen` address serves at once. Its own
/// bound, not `--max-pending-connections`: probes never wait behind client
/// admission, and a flood of the metrics port is bounded too.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Bytes of a socket's stream the kernel may hold unsent (see [`bind`]).
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Binds `addr` with a deep listen backlog (tokio's `bind` uses 128, which
/// drops handshakes during connection storms).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit it: the kernel holds at most this much
    // unsent for a client, so a write waits (and a reader shows itself
    // alive, see `Outbox::last_seen`) once a slow client is that far
    // behind, and a ping is never queued behind megabytes in the kernel.
    socket.set_tcp_notsent_lowat(NOTSENT_LOWAT)?;
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
    metrics: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let node = Node::new(config).await?;
    serve(node, listener, metrics, shutdown).await;
    Ok(())
}

/// [`run`] with a node built by the caller (so it can inspect it).
///
/// On shutdown the listener stays open through the drain period, answering
/// `/readyz` with 503 and `/ws` with 503 `shutting_down`, so a load balancer
/// sees the node leave before its port closes.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let tasks = &node.tasks;
    tasks.spawn(node.clone().heartbeat());
    tasks.spawn(node.clone().watch_tokens());
    tasks.spawn(reload_on_hangup(node.clone()));
    tasks.spawn(node.clone().watch_writes());
    let name = status::node_name(listener.local_addr().unwrap_or(node.config.listen));
    tasks.spawn(status::sampler(node.clone(), name));
    tasks.spawn(node.clone().presence_sync());
    if let Some(reaper) = exec::reaper(&node) {
        tasks.spawn(reaper);
    }
    let stop = CancellationToken::new();
    let http = Http::default();
    let accept = tasks.spawn_owned(accept_loop(node.clone(), listener, stop.clone(), http.clone()));
    let admin = metrics.map(|l| tasks.spawn_owned(admin_loop(node.clone(), l, stop.clone(), http.clone())));
    shutdown.await;
    node.ready.store(false, Relaxed);
    node.drain().await;
    // HTTP requests in flight finish (idle kept-alive connections close),
    // then whatever they published reaches NATS before the process exits.
    stop.cancel();
    let _ = accept.await;
    if let Some(a) = admin {
        let _ = a.await;
    }
    http.tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), http.tracker.wait())
        .await
        .is_err()
    {
        // Bounded: a request that never ends (a body trickled in) must not
        // hold the process past the grace the orchestrator gives it.
        tracing::warn!(
            running = http.tracker.len(),
            "HTTP requests still running after the 5 s grace; ending them"
        );
        http.abort.cancel();
        http.tracker.wait().await;
    }
    node.router.bus().flush(Duration::from_secs(5)).await;
    // Then every task of the node ends, the sessions' and writers' last,
    // and the NATS connections close: nothing of the node outlives this.
    node.tasks.stop().await;
    node.sessions.finish().await;
    node.router.bus().close().await;
}

/// The HTTP connections' tasks: tracked, so shutdown lets their requests
/// finish, and ended, after its grace, all at once.
#[derive(Clone, Default)]
struct Http {
    tracker: TaskTracker,
    abort: CancellationToken,
}

impl Http {
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = abort.cancelled() => {}
            }
        });
    }
}

/// Re-reads the key files on each SIGHUP (key rotation).
async fn reload_on_hangup(node: Arc<Node>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        node.reload_keys();
    }
}

async fn accept_loop(node: Arc<Node>, listener: TcpListener, stop: CancellationToken, http: Http) {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff = Duration::from_millis(5);
                    match node.pending.clone().try_acquire_owned() {
                        Ok(permit) => {
                            http.spawn(serve_http(node.clone(), stream, remote, permit, stop.clone()));
                        }
                        Err(_) => refuse(
                            &node,
                            stream,
                            "pending_connections",
                            "raise --max-pending-connections if clients are legitimate",
                        ),
                    }
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

/// Serves the `--metrics-listen` address: plain HTTP/1, one request at a
/// time per connection, under its own bound ([`MAX_ADMIN_CONNECTIONS`]),
/// so a public port full of pending connections never turns a probe away;
/// the route table's admin rows (`/metrics`, `/healthz`, `/readyz`),
/// answered as the public listener answers them.
async fn admin_loop(node: Arc<Node>, listener: TcpListener, stop: CancellationToken, http: Http) {
    let bound = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, remote)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = bound.clone().try_acquire_owned() else {
            let fix = format!("--metrics-listen serves {MAX_ADMIN_CONNECTIONS} connections at once");
            refuse(&node, stream, "metrics_connections", &fix);
            continue;
        };
        let node = node.clone();
        http.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| route(node.clone(), Listener::Admin, req, remote));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Turns away a connection over its listener's bound without a task or a
/// wait: one non-blocking write of a 503, then close; logged once per
/// `reason` per window, with `fix`.
fn refuse(node: &Node, stream: TcpStream, reason: &'static str, fix: &str) {
    node.metrics.error(ErrorCode::Overloaded);
    if let Some(held) = node.refusals.allow(reason) {
        let peer = stream.peer_addr().ok();
        tracing::warn!(
            ?peer,
            suppressed = held,
            "connection refused: 503 overloaded: too many connections in progress; {fix}"
        );
    }
    let body = herald_protocol::message::error_body(
        ErrorCode::Overloaded,
        "overloaded: too many connections in progress; retry shortly",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.try_write(&[head.as_bytes(), &body].concat());
}

/// Serves one TCP connection as HTTP/1 until it ends or is upgraded;
/// `_permit` counts it against `--max-pending-connections` meanwhile.
async fn serve_http(
    node: Arc<Node>,
    mut stream: TcpStream,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let timeout = node.config.handshake_timeout;
    // A trusted proxy may name the client in a PROXY protocol header.
    let mut remote = remote;
    if node.admission.trusts(remote.ip()) {
        match tokio::time::timeout(timeout, admission::read_proxy_header(&mut stream)).await {
            Ok(Ok(Some(client))) => remote = client,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "bad PROXY protocol header");
                return;
            }
            Err(_) => return,
        }
    }
    let head = tokio::select! {
        h = preread::first_head(&mut stream, timeout, MAX_HEAD_BYTES, &node.metrics) => h,
        _ = stop.cancelled() => return,
    };
    let prefix = match head {
        Head::Arrived(prefix) => match preread::bad_target(&prefix) {
            None => prefix,
            Some(msg) => {
                if let Some(held) = node.refusals.allow("bad_target") {
                    tracing::warn!(%remote, suppressed = held, "request refused: 400 {msg}");
                }
                preread::refuse(
                    &mut stream,
                    "400 Bad Request",
                    ErrorCode::BadRequest,
                    &msg,
                    &node.metrics,
                )
                .await;
                return;
            }
        },
        Head::Gone => return,
        Head::TimedOut => {
            tracing::debug!(%remote, "handshake_timeout: request head not received in time");
            return;
        }
    };
    let svc_node = node.clone();
    let svc = service_fn(move |req| route(svc_node.clone(), Listener::Public, req, remote));
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
    tokio::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            // Shutdown: finish the request in flight, take no more.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = done {
        if e.is_timeout() {
            node.metrics.handshake_timeouts.fetch_add(1, Relaxed);
            tracing::debug!(%remote, "handshake_timeout: request headers not received in time");
        } else {
            tracing::trace!(%remote, error = %e, "http connection error");
        }
    }
}

/// Answers one request: the route table decides, once, and this calls the
/// handler it names.
async fn route(
    node: Arc<Node>,
    listener: Listener,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Result<Response<Body>, std::convert::Infallible> {
    let handshake = fastwebsockets::upgrade::is_upgrade_request(&req);
    let decided = node
        .routes
        .decide(listener, req.method(), req.uri().path(), handshake);
    Ok(match decided {
        Route::Socket { root } => upgrade(node, req, root, remote).await,
        Route::Exec(i) => {
            let exec = node.routes.exec(i).clone();
            exec::upgrade(node, req, remote, exec).await
        }
        Route::Publish => http::publish(&node, req).await,
        Route::Presence { stats } => http::presence(&node, &req, stats),
        Route::History => http::history(&node, &req).await,
        Route::Health => http::health(),
        Route::Ready => http::ready(&node),
        Route::Status { json } => status::handle(&node, &req, remote, json),
        Route::Metrics => http::metrics(&node),
        Route::MetricsElsewhere => http::metrics_elsewhere(),
        Route::Demo => http::demo(),
        Route::Client => http::client(),
        Route::WrongMethod(allowed) => http::wrong_method(req.method(), allowed),
        Route::NotFound => http::not_found(&node, listener, req.uri().path()),
    })
}

async fn upgrade(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    root: bool,
    remote: SocketAddr,
) -> Response<Body> {
    match admitted(&node, &mut req, root, remote).await {
        Ok(r) => r,
        Err(refused) => *refused,
    }
}

async fn admitted(
    node: &Arc<Node>,
    req: &mut Request<Incoming>,
    root: bool,
    remote: SocketAddr,
) -> Result<Response<Body>, handshake::Refused> {
    handshake::screen(node, req)?;
    let query = req.uri().query().unwrap_or("");
    let params = match params::parse(query, node.config.max_subscriptions) {
        // `/` with no parameters: raw mode on --root-topic, when set.
        Ok(mut p) if root && query.is_empty() => {
            p.raw_topic.clone_from(&node.config.root_topic);
            p
        }
        Ok(p) => p,
        Err(ErrorReply { code, message: msg }) => {
            let fix = "fix the /ws URL parameters (docs/protocol.md, \"Connecting\")";
            return Err(handshake::refuse(
                node,
                (hyper::StatusCode::BAD_REQUEST, code),
                &msg,
                "url_parameters",
                fix,
            ));
        }
    };
    // The cheap limits first, then the token: a signature check costs
    // ten times a refusal, so a flood of bad tokens is shed by the rates
    // before any is verified. A refused token drops the slot it took.
    let slot = handshake::admit(node, req, remote)?;
    let token = params.token.as_deref().or(handshake::bearer(req));
    let access = handshake::access(node, token, params.subs.iter().chain(params.raw_topic.iter()))?;
    let (response, fut) = fastwebsockets::upgrade::upgrade(req).map_err(|e| {
        let status = (hyper::StatusCode::BAD_REQUEST, ErrorCode::BadRequest);
        handshake::refuse(
            node,
            status,
            &e.to_string(),
            "upgrade",
            "send a WebSocket handshake (RFC 6455)",
        )
    })?;
    // Subscribed before the 101 goes out: once the client sees its socket
    // open, its URL subscriptions are in effect.
    let mut accepted = node.sessions.accept(params, slot, access);
    accepted.ready().await;
    node.sessions.track(async move {
        // The session gets tasks of its own, so the long-lived tasks hold
        // none of the handshake's state.
        match handshake::stream(fut).await {
            Some((stream, early)) => accepted.start(stream, &early),
            None => accepted.abandon(),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, http::empty()))
}
