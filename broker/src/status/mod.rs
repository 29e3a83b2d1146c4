//! The live status page: `/status` (a self-contained page, no CDN) and
//! `/status.json` (what it draws). A sampler takes the node's figures once
//! a second into [`crate::node::samples`]; in a cluster it also publishes each
//! sample on NATS (`_herald.status.<prefix>`) and keeps the other nodes'
//! latest, so every node's page shows the whole cluster.
//!
//! Open to loopback clients only (the client address after
//! `--trusted-proxies`), or to whoever presents `--admin-key`.
//!
//! Uses: `clock`, `http`, `node`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_protocol::ErrorCode;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::http::{self, Body};
use crate::node::Node;

const PAGE: &str = include_str!("status.html");

/// Error codes that mean a refused handshake or connection.
const REFUSALS: [ErrorCode; 10] = [
    ErrorCode::ConnectionLimit,
    ErrorCode::Overloaded,
    ErrorCode::OriginNotAllowed,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::RateLimited,
    ErrorCode::HandshakeTimeout,
    ErrorCode::ShuttingDown,
    ErrorCode::ExecLimit,
    ErrorCode::BadTopic,
];

/// The NATS subject samples are traded on.
fn subject(prefix: &str) -> String {
    format!("_herald.status.{prefix}")
}

/// Counter values at one instant, to turn into rates.
#[derive(Default, Clone, Copy)]
struct Counts {
    messages_in: u64,
    deliveries: u64,
    bytes_out: u64,
}

fn counts(node: &Node) -> Counts {
    let m = &node.metrics;
    Counts {
        messages_in: m.messages_in.load(Relaxed),
        deliveries: m.deliveries.load(Relaxed),
        bytes_out: m.bytes_out.load(Relaxed),
    }
}

/// One sample: the node's gauges, its rates over the last `secs`, and its
/// refusals so far by reason.
fn sample(node: &Node, name: &str, now: Counts, before: Counts, secs: f64) -> Value {
    let m = &node.metrics;
    let (topics, patterns) = node.router.hub().counts();
    let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs).round();
    let refused: serde_json::Map<String, Value> = REFUSALS
        .iter()
        .map(|c| (c.as_str().to_owned(), json!(m.errors[c.index()].load(Relaxed))))
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect();
    let link = match node.router.bus().link_state() {
        None => "embedded",
        Some(true) => "connected",
        Some(false) => "disconnected",
    };
    json!({
        "node": name,
        "t": crate::clock::unix_ms(),
        "connections": m.connections.load(Relaxed),
        "subscriptions": m.subscriptions.load(Relaxed),
        "topics": topics,
        "patterns": patterns,
        "messages_in_per_s": rate(now.messages_in, before.messages_in),
        "deliveries_per_s": rate(now.deliveries, before.deliveries),
        "bytes_out_per_s": rate(now.bytes_out, before.bytes_out),
        "slow_consumers": m.slow_consumers.load(Relaxed),
        "heartbeat_timeouts": m.heartbeat_timeouts.load(Relaxed),
        "exec_processes": m.exec_processes.load(Relaxed),
        "refused": refused,
        "nats": link,
        "ready": node.ready.load(Relaxed),
    })
}

/// Samples the node once a second for its lifetime; `name` tells it from
/// the other nodes (host and listen address).
pub async fn sampler(node: Arc<Node>, name: String) {
    let client = node.router.bus().nats_client();
    let subject = node.router.bus().prefix().map(subject);
    // The other nodes' samples, read beside the sampling below (in this
    // task, so both end when the node stops).
    let peers = async {
        let (Some(c), Some(s)) = (&client, &subject) else {
            return;
        };
        let Ok(mut sub) = c.subscribe(s.clone()).await else {
            return;
        };
        while let Some(msg) = sub.next().await {
            let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            match v["node"].as_str() {
                Some(n) if n != name && n.len() <= 256 => node.history.peer(n.to_owned(), v),
                _ => {}
            }
        }
    };
    let sampling = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = counts(&node);
        let mut at = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let now = counts(&node);
            let secs = at.elapsed().as_secs_f64().max(0.001);
            at = tokio::time::Instant::now();
            let s = sample(&node, &name, now, before, secs);
            before = now;
            if let (Some(c), Some(subj)) = (&client, &subject) {
                let _ = c.publish(subj.clone(), s.to_string().into()).await;
            }
            node.history.push(s);
        }
    };
    tokio::join!(peers, sampling);
}

/// A name for this node on the status page.
pub fn node_name(listen: SocketAddr) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "herald".into());
    format!("{host}:{}", listen.port())
}

/// Whether the request may see the status page: with `--admin-key`, only
/// a request presenting it, loopback included (behind a sidecar proxy or
/// an untrusted local one every client is loopback, so a key set means
/// the key is asked of all); without one, loopback clients only.
fn allowed(node: &Node, req: &Request<Incoming>, remote: SocketAddr) -> bool {
    if let Some(key) = node.config.admin_key.as_deref().filter(|k| !k.is_empty()) {
        let bearer = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let query = http::query_param(req.uri().query().unwrap_or(""), "key")
            .ok()
            .flatten();
        return [bearer, query.as_deref()]
            .into_iter()
            .flatten()
            .any(|given| http::constant_time_eq(given.as_bytes(), key.as_bytes()));
    }
    node.admission
        .client_ip(remote.ip(), http::forwarded_for(req))
        .is_ok_and(|ip| ip.is_loopback())
}

/// Serves `/status`, or with `json` `/status.json`.
pub fn handle(node: &Node, req: &Request<Incoming>, remote: SocketAddr, json: bool) -> Response<Body> {
    if !allowed(node, req, remote) {
        node.metrics.error(ErrorCode::Forbidden);
        let msg = if node.config.admin_key.as_deref().is_some_and(|k| !k.is_empty()) {
            "forbidden: the status page asks ?key= or a bearer matching --admin-key (of loopback clients too)"
        } else {
            "forbidden: the status page answers loopback clients only; set --admin-key to let others in with ?key= or a bearer"
        };
        if let Some(held) = node.refusals.allow("status_page") {
            tracing::warn!(%remote, suppressed = held, "status page refused: 403 {msg}");
        }
        return http::error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, msg);
    }
    let (body, kind) = if json {
        let samples = node.history.samples();
        let mut nodes: Vec<Value> = samples.last().cloned().into_iter().collect();
        for (name, age, mut v) in node.history.peers() {
            v["node"] = json!(name);
            v["age_ms"] = json!(age.as_millis() as u64);
            nodes.push(v);
        }
        let v = json!({"history": samples, "nodes": nodes});
        (v.to_string(), "application/json")
    } else {
        (PAGE.to_owned(), "text/html; charset=utf-8")
    };
    let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
