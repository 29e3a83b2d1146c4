//! What every WebSocket handshake goes through before its 101, whatever
//! the socket will be (a pub/sub session, or a program's pipe in
//! websocketd mode): the upgrade and draining checks, the page's origin,
//! the client address's limits and a connection slot ([`admit`]), and only
//! then the token and its grants ([`access`]), so the rates shed a flood
//! of bad tokens before any signature is checked; and, after the 101, the
//! TCP stream taken back from hyper.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, HOST, ORIGIN, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::auth::Identity;
use crate::http::{self, Body};
use crate::metrics::ConnectionSlot;
use crate::net::preread::Prefixed;
use crate::node::Node;
use crate::session::params;

/// A refused handshake: the HTTP answer to send instead of 101.
pub type Refused = Box<Response<Body>>;

/// Refuses a handshake with `msg`, and says so in the log at warn, naming
/// the `fix`: once per `reason` per window (a flood of one refusal logs a
/// line every 10 s, with how many it held back), so a page that cannot
/// connect leaves a trace for whoever runs the node.
pub fn refuse(
    node: &Node,
    (status, code): (StatusCode, ErrorCode),
    msg: &str,
    reason: &'static str,
    fix: &str,
) -> Refused {
    node.metrics.error(code);
    if let Some(held) = node.refusals.allow(reason) {
        tracing::warn!(
            status = status.as_u16(),
            code = code.as_str(),
            suppressed = held,
            "handshake refused: {msg}; {fix}"
        );
    }
    Box::new(http::error(status, code, msg))
}

/// At most this much of a client-sent value goes into a log line.
const MAX_LOGGED: usize = 120;

/// `value` cut to [`MAX_LOGGED`] bytes (at a character boundary).
fn logged(value: &str) -> &str {
    let mut end = value.len().min(MAX_LOGGED);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

fn header<'a>(req: &'a Request<Incoming>, name: &HeaderName) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The handshake is a WebSocket upgrade, the node is not draining, and the
/// page's origin may open sockets here.
pub fn screen(node: &Node, req: &Request<Incoming>) -> Result<(), Refused> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        let msg = format!(
            "{} takes WebSocket connections (Upgrade: websocket)",
            req.uri().path()
        );
        return Err(refuse(
            node,
            (StatusCode::UPGRADE_REQUIRED, ErrorCode::BadRequest),
            &msg,
            "not_an_upgrade",
            "connect with a WebSocket client",
        ));
    }
    if !node.ready.load(Relaxed) {
        let msg = "node is draining; connect to another node";
        return Err(refuse(
            node,
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ShuttingDown),
            msg,
            "draining",
            "clients reconnect to another node",
        ));
    }
    let origin = header(req, &ORIGIN);
    if !params::origin_allowed(origin, header(req, &HOST), &node.config.allowed_origins) {
        let msg = format!(
            "origin_not_allowed: {:?} may not open sockets here (--allowed-origins)",
            origin.unwrap_or("")
        );
        let fix = format!(
            "to let pages from this origin connect, start herald with --allowed-origins {}",
            logged(origin.unwrap_or("").trim())
        );
        return Err(refuse(
            node,
            (StatusCode::FORBIDDEN, ErrorCode::OriginNotAllowed),
            &msg,
            "origin",
            &fix,
        ));
    }
    Ok(())
}

/// The handshake's bearer token (`Authorization: Bearer`), if any.
pub fn bearer(req: &Request<Incoming>) -> Option<&str> {
    header(req, &AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "))
}

/// What the socket may do: its token's identity, the anonymous grants
/// without one, or `None` on a node without access control. A bad token is
/// refused with 401, a pattern in `subs` outside the grants with 403.
/// Called after [`admit`]: a refusal here drops the slot admit took.
pub fn access<'a>(
    node: &Node,
    token: Option<&str>,
    subs: impl IntoIterator<Item = &'a String>,
) -> Result<Option<Arc<Identity>>, Refused> {
    let Some(auth) = node.sessions.auth() else {
        return Ok(None);
    };
    let identity = match token {
        Some(t) => match auth.verify(t) {
            Ok(i) => Arc::new(i),
            Err(why) => {
                let msg = format!("unauthorized: {why}");
                return Err(refuse(
                    node,
                    (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
                    &msg,
                    "token",
                    "the token must be signed with a key of --auth-hmac-key-file, --auth-public-key-file or --auth-jwks-file, unexpired, and name --auth-audience if set",
                ));
            }
        },
        None => match node.sessions.anonymous() {
            Some(a) => a.clone(),
            None => return Ok(None),
        },
    };
    for p in subs {
        if let Some(msg) = identity.forbids(p, false) {
            return Err(refuse(
                node,
                (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
                &msg,
                "grants",
                "the URL subscribes outside the token's grants (or --anonymous-subscribe without a token)",
            ));
        }
    }
    Ok(Some(identity))
}

/// Paces new sockets to the node's `--connect-rate`, counts the socket
/// against its client address's limits and the node's `--max-connections`; the slot holds both until the connection is gone.
pub fn admit(node: &Node, req: &Request<Incoming>, remote: SocketAddr) -> Result<ConnectionSlot, Refused> {
    if let Err(rate) = node.admission.paced() {
        let msg =
            format!("overloaded: this node takes at most {rate} new connections a second; retry shortly");
        let mut r = refuse(
            node,
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Overloaded),
            &msg,
            "connect_rate",
            "raise --connect-rate if the load is legitimate",
        );
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    }
    let client = match node.admission.client_ip(remote.ip(), http::forwarded_for(req)) {
        Ok(ip) => ip,
        Err(e) => {
            return Err(refuse(
                node,
                (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
                &e.to_string(),
                "forwarded_for",
                "check the proxy's X-Forwarded-For and --trusted-proxies",
            ))
        }
    };
    let per_ip = match node.admission.admit(client) {
        Ok(s) => s,
        Err(refusal) => {
            let mut r = refuse(
                node,
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
                &refusal.to_string(),
                "per_address",
                "if many clients share an address (NAT, or a proxy missing from --trusted-proxies), raise --max-connections-per-ip or --connect-rate-per-ip",
            );
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(r);
        }
    };
    let Some(mut slot) = node.sessions.reserve() else {
        let msg = format!(
            "max_connections: node holds {} connections",
            node.config.max_connections
        );
        return Err(refuse(
            node,
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ConnectionLimit),
            &msg,
            "max_connections",
            "raise --max-connections (and the open-file limit), or add nodes",
        ));
    };
    if let Some(per_ip) = per_ip {
        slot.hold(Box::new(per_ip));
    }
    Ok(slot)
}

/// The TCP stream of an upgraded connection, with the bytes the client
/// sent right behind its handshake; `None` if the upgrade failed.
pub async fn stream(fut: fastwebsockets::upgrade::UpgradeFut) -> Option<(TcpStream, Bytes)> {
    let upgraded = match fut.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<Prefixed>>() {
        Ok(parts) => {
            let Prefixed { prefix, inner } = parts.io.into_inner();
            let early = if prefix.is_empty() {
                parts.read_buf
            } else {
                Bytes::from([&prefix[..], &parts.read_buf[..]].concat())
            };
            Some((inner, early))
        }
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            None
        }
    }
}
