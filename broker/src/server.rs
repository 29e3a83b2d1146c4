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
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission;
use crate::auth::Identity;
use crate::config::Config;
use crate::http::{self, Body};
use crate::node::{Error, Node};
use crate::params;
use crate::preread::{self, Head, Prefixed};

/// Largest HTTP request head (request line and headers) a client may send.
const MAX_HEAD_BYTES: usize = 16 * 1024;

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
    let heartbeat = tokio::spawn(node.clone().heartbeat());
    let tokens = tokio::spawn(node.clone().watch_tokens());
    let reload = tokio::spawn(reload_on_hangup(node.clone()));
    let watchdog = tokio::spawn(node.clone().watch_writes());
    let stop = CancellationToken::new();
    let http = TaskTracker::new();
    let accept = tokio::spawn(accept_loop(node.clone(), listener, stop.clone(), http.clone()));
    let admin = metrics.map(|l| tokio::spawn(admin_loop(node.clone(), l, stop.clone())));
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
    http.close();
    if tokio::time::timeout(Duration::from_secs(5), http.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running after the grace period; exiting anyway");
    }
    node.router.bus().flush(Duration::from_secs(5)).await;
    heartbeat.abort();
    watchdog.abort();
    tokens.abort();
    reload.abort();
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

async fn accept_loop(node: Arc<Node>, listener: TcpListener, stop: CancellationToken, http: TaskTracker) {
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
                        Err(_) => refuse(&node, stream),
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
/// time per connection, under the same pending-connection bound.
async fn admin_loop(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = node.pending.clone().try_acquire_owned() else {
            refuse(&node, stream);
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, std::convert::Infallible>(http::handle_admin(&node, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Turns away a connection over `--max-pending-connections` without a
/// task or a wait: one non-blocking write of a 503, then close.
fn refuse(node: &Node, stream: TcpStream) {
    node.metrics.error(ErrorCode::Overloaded);
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
        Head::Arrived(prefix) => prefix,
        Head::Gone => return,
        Head::TimedOut => {
            tracing::debug!(%remote, "handshake_timeout: request head not received in time");
            return;
        }
    };
    let svc_node = node.clone();
    let svc = service_fn(move |req| route(svc_node.clone(), req, remote));
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

async fn route(
    node: Arc<Node>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path();
    Ok(match path {
        "/ws" => upgrade(node, req, false, remote).await,
        // A handshake on the bare address is served like /ws; plain GET /
        // still serves the demo page.
        "/" if fastwebsockets::upgrade::is_upgrade_request(&req) => upgrade(node, req, true, remote).await,
        _ => http::handle(&node, req).await,
    })
}

async fn upgrade(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    root: bool,
    remote: SocketAddr,
) -> Response<Body> {
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
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
    };
    let origin = header(hyper::header::ORIGIN);
    if !params::origin_allowed(origin, header(hyper::header::HOST), &node.config.allowed_origins) {
        node.metrics.error(ErrorCode::OriginNotAllowed);
        let msg = format!(
            "origin_not_allowed: {:?} may not open sockets here (--allowed-origins)",
            origin.unwrap_or("")
        );
        return http::error(hyper::StatusCode::FORBIDDEN, ErrorCode::OriginNotAllowed, &msg);
    }
    let query = req.uri().query().unwrap_or("");
    let params = match params::parse(query, node.config.max_subscriptions) {
        // `/` with no parameters: raw mode on --root-topic, when set.
        Ok(mut p) if root && query.is_empty() => {
            p.raw_topic.clone_from(&node.config.root_topic);
            p
        }
        Ok(p) => p,
        Err((code, msg)) => {
            node.metrics.error(code);
            return http::error(hyper::StatusCode::BAD_REQUEST, code, &msg);
        }
    };
    let bearer = header(hyper::header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
    let access = match access(&node, params.token.as_deref().or(bearer), &params) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let client = node.admission.client_ip(
        remote.ip(),
        header(hyper::header::HeaderName::from_static("x-forwarded-for")),
    );
    let per_ip = match node.admission.admit(client) {
        Ok(s) => s,
        Err(refusal) => {
            node.metrics.error(ErrorCode::RateLimited);
            let mut r = http::error(
                hyper::StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                &refusal.to_string(),
            );
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            return r;
        }
    };
    let Some(mut slot) = node.sessions.reserve() else {
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
    };
    if let Some(per_ip) = per_ip {
        slot.hold(Box::new(per_ip));
    }
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            drop(slot);
            return http::error(
                hyper::StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                &e.to_string(),
            );
        }
    };
    // Subscribed before the 101 goes out: once the client sees its socket
    // open, its URL subscriptions are in effect.
    let mut accepted = node.sessions.accept(params, slot, access);
    accepted.ready().await;
    node.sessions.track(async move {
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

/// What a handshake's socket may do: its token's identity, the anonymous
/// grants without one, or `None` on a node without access control. A bad
/// token is refused with 401, URL subscriptions outside the grants with 403.
#[allow(clippy::result_large_err)]
fn access(
    node: &Node,
    token: Option<&str>,
    params: &params::SessionParams,
) -> Result<Option<Arc<Identity>>, Response<Body>> {
    let Some(auth) = node.sessions.auth() else {
        return Ok(None);
    };
    let identity = match token {
        Some(t) => match auth.verify(t) {
            Ok(i) => Arc::new(i),
            Err(why) => {
                node.metrics.error(ErrorCode::Unauthorized);
                let msg = format!("unauthorized: {why}");
                return Err(http::error(
                    hyper::StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    &msg,
                ));
            }
        },
        None => match node.sessions.anonymous() {
            Some(a) => a.clone(),
            None => return Ok(None),
        },
    };
    for p in params.subs.iter().chain(params.raw_topic.iter()) {
        if let Some(msg) = identity.forbids(p, false) {
            node.metrics.error(ErrorCode::Forbidden);
            return Err(http::error(
                hyper::StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                &msg,
            ));
        }
    }
    Ok(Some(identity))
}
