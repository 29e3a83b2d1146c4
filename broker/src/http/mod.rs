//! The handlers of the plain HTTP endpoints: publish, history, presence,
//! health, readiness, metrics, the demo page and the browser client, and
//! the 404 and 405 answers. Which one answers a request is not decided
//! here: the route table ([`crate::net::routes`]) decides, and
//! [`crate::server`] calls the handler it names.
//!
//! Uses: `sync`, `config`, `metrics`, `auth`, `history`, `session`, `net`,
//! `node`.
//!
//! - [`handshake`]: what every WebSocket handshake goes through before its
//!   101 (origin, token, per-address limits, a connection slot).

pub(crate) mod handshake;

use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use herald_protocol::message::{self, ErrorCode, ErrorReply};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use std::sync::Arc;

use crate::auth::Identity;
use crate::net::routes::{Listener, Methods};
use crate::node::Node;
pub use crate::session::params::query_param;
use crate::sync::ReadWrite;

/// Longest an HTTP publish on history topics waits for the stream.
use crate::history::jetstream::STORE_TIMEOUT;

/// Response body type for every route.
pub type Body = Full<Bytes>;

/// An empty body.
pub fn empty() -> Body {
    Full::new(Bytes::new())
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON error response: `{"error":{"code":..,"message":..}}`.
pub fn error(status: StatusCode, code: ErrorCode, msg: &str) -> Response<Body> {
    respond(status, "application/json", message::error_body(code, msg))
}

/// The demo page and the browser client it uses, built into the binary.
const DEMO_PAGE: &str = include_str!("demo.html");
const BROWSER_CLIENT: &str = include_str!("../../../clients/js/herald.js");

/// `GET /metrics`: the Prometheus exposition of the node's metrics.
pub fn metrics(node: &Node) -> Response<Body> {
    let (topics, patterns) = node.router.hub().counts();
    let cluster = node.router.bus().link_state().is_some();
    let text = node
        .metrics
        .render(topics, patterns, node.ready.load(Relaxed), cluster);
    respond(StatusCode::OK, "text/plain; version=0.0.4", text)
}

/// `GET /metrics` on the public address while `--metrics-listen` serves it.
pub fn metrics_elsewhere() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::BadRequest,
        "metrics are served on the --metrics-listen address",
    )
}

/// `GET /`: the demo page.
pub fn demo() -> Response<Body> {
    respond(StatusCode::OK, "text/html; charset=utf-8", DEMO_PAGE)
}

/// `GET /herald.js`: the browser client.
pub fn client() -> Response<Body> {
    respond(StatusCode::OK, "text/javascript; charset=utf-8", BROWSER_CLIENT)
}

/// `GET /healthz`: the process runs.
pub fn health() -> Response<Body> {
    respond(StatusCode::OK, "text/plain", "ok\n")
}

/// `GET /readyz`: whether the node takes sockets, with its link's and its
/// history's state.
pub fn ready(node: &Node) -> Response<Body> {
    // A node whose link was up and dropped stays ready: it still
    // serves its own sockets, and async-nats reconnects. A node in
    // cluster mode whose link never came up is not ready: behind a
    // load balancer it would split the cluster silently.
    let never_linked =
        node.router.bus().link_state() == Some(false) && node.metrics.nats_connects.load(Relaxed) == 0;
    let link = match node.router.bus().link_state() {
        None => "",
        Some(true) => "nats: connected\n",
        Some(false) if never_linked => "nats: never connected\n",
        Some(false) => "nats: disconnected\n",
    };
    // Likewise a node with history in a stream it has never reached: it
    // would answer every recovery `history_unavailable` (a client told
    // to reload with nothing lost). Once reached it stays ready if the
    // stream is lost: live delivery goes on, and recoveries say why not.
    let store = node.router.bus().history().map(|h| &h.store);
    let never_stored = matches!(store, Some(crate::history::store::Store::Stream(s)) if s.epoch().is_none());
    let history = match store {
        Some(crate::history::store::Store::Stream(_)) if never_stored => {
            "history: jetstream stream not reached yet (is JetStream enabled?)\n"
        }
        Some(crate::history::store::Store::Stream(s)) if s.available() => {
            "history: jetstream stream available\n"
        }
        Some(crate::history::store::Store::Stream(_)) => {
            "history: jetstream stream unavailable (is JetStream enabled? live delivery goes on)\n"
        }
        Some(crate::history::store::Store::Memory(_)) => "history: in memory\n",
        None => "",
    };
    let link = format!("{link}{history}");
    if !node.ready.load(Relaxed) {
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("draining\n{link}"),
        )
    } else if never_linked || never_stored {
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready\n{link}"),
        )
    } else {
        respond(StatusCode::OK, "text/plain", format!("ready\n{link}"))
    }
}

/// A built-in path asked with a method it does not answer: 405, with the
/// `Allow` header RFC 9110 asks of it.
pub fn wrong_method(method: &Method, allowed: Methods) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        &format!("method {method} not allowed here; allowed: {}", allowed.allowed()),
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed.allowed()));
    r
}

/// No route for `path` on `listener`: the message lists the routes there.
pub fn not_found(node: &Node, listener: Listener, path: &str) -> Response<Body> {
    let routes = node.routes.listed(listener).join(", ");
    let msg = match listener {
        Listener::Public => format!("no route {path:?}; routes: {routes}"),
        Listener::Admin => format!("no route {path:?} on the metrics address; routes: {routes}"),
    };
    error(StatusCode::NOT_FOUND, ErrorCode::NotFound, &msg)
}

/// What an HTTP publish may do: `Ok(None)` for any topic (an API key, or
/// an open node), or the grants of its bearer token (or of anonymous
/// clients). A wrong key or token is 401.
#[allow(clippy::result_large_err)]
fn publisher(node: &Node, req: &Request<Incoming>) -> Result<Option<Arc<Identity>>, Response<Body>> {
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let bearer = given.map(|g| g.strip_prefix("Bearer ").unwrap_or("").trim());
    let auth = node.sessions.auth();
    let keys = node.api_keys.reading();
    if auth.is_none() && keys.is_empty() {
        return Ok(None); // an open node
    }
    let refuse = |msg: String| {
        node.metrics.error(ErrorCode::Unauthorized);
        if let Some(held) = node.refusals.allow("http_unauthorized") {
            tracing::warn!(
                path = req.uri().path(),
                suppressed = held,
                "HTTP request refused: 401 {msg}; send a key of --api-key or --api-key-file, or a valid token"
            );
        }
        Err(error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, &msg))
    };
    match bearer {
        Some(b) if keys.iter().any(|k| constant_time_eq(b.as_bytes(), k.as_bytes())) => Ok(None),
        Some(b) => match auth {
            Some(auth) if b.matches('.').count() == 2 => match auth.verify(b) {
                Ok(identity) => Ok(Some(Arc::new(identity))),
                Err(why) => refuse(format!("unauthorized: {why}")),
            },
            _ => refuse("unauthorized: wrong API key (Authorization: Bearer KEY)".into()),
        },
        None if !keys.is_empty() => {
            refuse("unauthorized: missing API key or token (Authorization: Bearer ...)".into())
        }
        None => Ok(node.sessions.anonymous().cloned()),
    }
}

/// Every `X-Forwarded-For` line of `req`, in the order received (a value
/// that is not visible ASCII reads as one that names no address, so it is
/// refused rather than skipped).
pub fn forwarded_for<B>(req: &Request<B>) -> impl DoubleEndedIterator<Item = &str> {
    req.headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

enum BodyError {
    TooBig,
    Read(String),
}

/// Reads a request body of at most `limit` bytes, copying each chunk into
/// one buffer: memory follows the bytes received, however finely the
/// client splits them (a chunk kept as is would pin its whole read buffer).
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let declared = body.size_hint().exact().unwrap_or(0);
    if declared > limit as u64 {
        return Err(BodyError::TooBig);
    }
    let mut out = BytesMut::with_capacity(declared as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(BodyError::TooBig);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// `GET /v1/history?topic=T&since=N&limit=L`: retained messages of a
/// history topic after `since` (0: from the oldest), at most `limit`
/// (100 by default, at most `--max-replay`), with the same keys and grants
/// as subscribing.
pub async fn history(node: &Node, req: &Request<Incoming>) -> Response<Body> {
    let access = match publisher(node, req) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let fail = |status, code, msg: &str| {
        node.metrics.error(code);
        error(status, code, msg)
    };
    let query = req.uri().query().unwrap_or("");
    let topic = match query_param(query, "topic") {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => return fail(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e),
    };
    let topic = topic.as_str();
    if let Err(e) = herald_protocol::Topic::parse(topic) {
        return fail(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadTopic,
            &format!("topic={topic:?}: {e}"),
        );
    }
    let number = |name: &str, default: u64| match query_param(query, name)? {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| format!("{name}={v:?} is not a number")),
    };
    let (since, limit) = match (number("since", 0), number("limit", 100)) {
        (Ok(s), Ok(l)) => (s, (l as usize).min(node.config.max_replay)),
        (Err(m), _) | (_, Err(m)) => return fail(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &m),
    };
    if let Some(msg) = access.as_ref().and_then(|a| a.forbids(topic, false)) {
        return fail(StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg);
    }
    match crate::history::recovery::page(node.router.bus().history(), topic, since, limit).await {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(ErrorReply { code, message: msg }) => {
            let status = match code {
                ErrorCode::HistoryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            fail(status, code, &msg)
        }
    }
}

/// `GET /v1/presence?topic=T` (members) and, with `stats`,
/// `/v1/presence/stats?topic=T` (counts), with the same keys and grants as
/// subscribing.
pub fn presence(node: &Node, req: &Request<Incoming>, stats: bool) -> Response<Body> {
    let access = match publisher(node, req) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let topic = match query_param(req.uri().query().unwrap_or(""), "topic") {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => {
            node.metrics.error(ErrorCode::BadRequest);
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e);
        }
    };
    let topic = topic.as_str();
    if let Err(e) = herald_protocol::Topic::parse(topic) {
        node.metrics.error(ErrorCode::BadTopic);
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadTopic,
            &format!("topic={topic:?}: {e}"),
        );
    }
    if let Some(msg) = access.as_ref().and_then(|a| a.forbids(topic, false)) {
        node.metrics.error(ErrorCode::Forbidden);
        return error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg);
    }
    match node
        .router
        .presence(topic, stats, node.config.presence_max_members)
    {
        Ok(mut v) => {
            v["topic"] = topic.into();
            respond(StatusCode::OK, "application/json", v.to_string())
        }
        Err(ErrorReply { code, message: msg }) => {
            node.metrics.error(code);
            error(StatusCode::BAD_REQUEST, code, &msg)
        }
    }
}

/// `POST /v1/publish`: one message or an array of them, answered once
/// every history topic's message is stored.
pub async fn publish(node: &Node, req: Request<Incoming>) -> Response<Body> {
    let fail = |status, code, msg: &str| {
        node.metrics.error(code);
        error(status, code, msg)
    };
    let access = match publisher(node, &req) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let limit = node.config.max_http_body_bytes;
    let timeout = node.config.body_timeout;
    let body = match tokio::time::timeout(timeout, read_body(req.into_body(), limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::TooBig)) => {
            let msg = format!("max_http_body_bytes: body exceeds {limit} bytes");
            return fail(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooBig, &msg);
        }
        Ok(Err(BodyError::Read(e))) => return fail(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &e),
        Err(_) => {
            let msg = format!("body_timeout: request body not received within {timeout:?}");
            let mut r = fail(StatusCode::REQUEST_TIMEOUT, ErrorCode::BodyTimeout, &msg);
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    let items = match message::parse_publish(&body, node.config.max_message_bytes) {
        Ok(items) => items,
        Err(e) => {
            let status = if e.code == ErrorCode::MessageTooBig {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return fail(status, e.code, &e.message);
        }
    };
    if let Some(access) = &access {
        if let Some(msg) = items.iter().find_map(|i| access.forbids(i.topic.as_str(), true)) {
            return fail(StatusCode::FORBIDDEN, ErrorCode::Forbidden, &msg);
        }
    }
    // Runs of items on one topic go out as one burst (one queue push per
    // recipient); the data stays a view into the request body.
    // A cluster link failure still lets every run reach local subscribers;
    // the publisher is told the other nodes missed them.
    let mut deliveries = 0;
    let mut link_error = None;
    let mut confirms = Vec::new();
    for run in items.chunk_by(|a, b| a.topic == b.topic) {
        let datas: Vec<Bytes> = run.iter().map(|i| body.slice_ref(i.data.as_bytes())).collect();
        match node
            .router
            .publish_confirmed(run[0].topic.as_str(), &datas, &mut confirms)
        {
            Ok(d) => deliveries += d,
            Err(e) => {
                deliveries += e.local();
                link_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = link_error {
        let msg = format!(
            "{e} (request: {} item(s), {deliveries} local deliveries)",
            items.len()
        );
        return fail(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PublishFailed, &msg);
    }
    // A 200 for a history topic means stored in the stream.
    let stored = async {
        let mut unstored = 0;
        for c in confirms {
            if !matches!(c.await, Ok(Ok(_))) {
                unstored += 1;
            }
        }
        unstored
    };
    match tokio::time::timeout(STORE_TIMEOUT, stored).await {
        Ok(0) => {}
        Ok(n) => {
            let msg = format!(
                "{n} message(s) not stored in the history stream (delivered live without a position)"
            );
            return fail(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PublishFailed, &msg);
        }
        Err(_) => {
            let msg = format!("the history stream did not confirm within {STORE_TIMEOUT:?}");
            return fail(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PublishFailed, &msg);
        }
    }
    let body = format!("{{\"published\":{},\"deliveries\":{deliveries}}}", items.len());
    respond(StatusCode::OK, "application/json", body)
}
