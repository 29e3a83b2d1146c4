//! Counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: the fan-out path adds once per message (a count of
//! deliveries), never once per recipient, so no cache line bounces per
//! delivery.
//!
//! Uses: nothing of the crate.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use herald_protocol::ErrorCode;

/// The node's metrics. One per node, shared by reference.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WebSocket connections held: from the handshake until the TCP
    /// connection is gone (see [`ConnectionSlot`]).
    pub connections: AtomicI64,
    /// Programs running for `--exec` sockets, until each is reaped.
    pub exec_processes: AtomicI64,
    /// WebSocket connections accepted since start.
    pub connections_total: AtomicU64,
    /// Subscriptions held by all sockets.
    pub subscriptions: AtomicI64,
    /// Messages published into this node (WebSocket and HTTP).
    pub messages_in: AtomicU64,
    /// Bytes of `data` published into this node.
    pub bytes_in: AtomicU64,
    /// Messages this node delivered (one per recipient socket).
    pub deliveries: AtomicU64,
    /// Bytes of WebSocket frames queued for delivery.
    pub bytes_out: AtomicU64,
    /// Sockets closed because their outbound queue overflowed.
    pub slow_consumers: AtomicU64,
    /// Sockets closed because they stopped answering pings.
    pub heartbeat_timeouts: AtomicU64,
    /// Sockets cut because a write made no progress for `--write-timeout`,
    /// or a close did not finish within `--close-timeout`.
    pub write_timeouts: AtomicU64,
    /// HTTP connections closed for not sending headers in time.
    pub handshake_timeouts: AtomicU64,
    /// WebSocket connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
    /// 1 while the cluster link is connected (cluster mode only).
    pub nats_connected: AtomicI64,
    /// Times the cluster link (re)connected.
    pub nats_connects: AtomicU64,
    /// Subject subscriptions the node holds on NATS.
    pub nats_subscriptions: AtomicI64,
    /// Messages received from NATS.
    pub nats_messages_in: AtomicU64,
    /// Messages published onto NATS.
    pub nats_messages_out: AtomicU64,
    /// Publishes that reached local subscribers but not NATS.
    pub nats_publish_failures: AtomicU64,
    /// History publishes the stream did not store (delivered live).
    pub history_failures: AtomicU64,

    /// Subscriptions that recovered everything they missed.
    pub recoveries: AtomicU64,
    /// Recoveries answered `recovered:false`.
    pub recoveries_refused: AtomicU64,
    /// Messages replayed to recovering or `last` subscriptions.
    pub replayed: AtomicU64,
    /// Recoveries (a `sub` with `since` or `last`) running or queued
    /// behind another of their socket's, until each has ended.
    pub recoveries_running: AtomicI64,
    /// WebSocket publishes waiting for the history stream to store them
    /// before their ack.
    pub publishes_storing: AtomicI64,
    /// Bytes the in-memory history holds against `--history-bytes` (an
    /// embedded node's, or a cluster node's copy of the stream's tail):
    /// data and what holding it costs.
    pub history_bytes: AtomicI64,
    /// Topics the in-memory history holds a message of.
    pub history_topics: AtomicI64,
    /// Messages the in-memory history holds.
    pub history_messages: AtomicI64,
    /// Topic rings the in-memory history read for replays and pages: a
    /// recovery's work, which follows what its pattern matches.
    pub history_rings_read: AtomicU64,
    /// Messages from NATS dropped as unusable (bad subject, not UTF-8, too big).
    pub nats_dropped: AtomicU64,
    /// Error frames and HTTP errors sent, by code.
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
}

/// One connection counted in `herald_connections` (and against
/// `--max-connections`) until this guard drops. The socket's handle owns
/// it, and the handle outlives both halves of the TCP stream, so a socket
/// counts until its connection is really gone, closing or not.
pub struct ConnectionSlot(Arc<Metrics>, Option<Box<dyn Send + Sync>>);

impl ConnectionSlot {
    /// Holds `also` (another count, such as the client address's) for as
    /// long as this slot.
    pub fn hold(&mut self, also: Box<dyn Send + Sync>) {
        self.1 = Some(also);
    }
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Relaxed);
    }
}

/// One unit of a gauge, held until this guard drops (however the work it
/// counts ends: done, failed or dropped).
pub struct Held {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicI64,
}

impl Held {
    /// Counts one in `gauge` of `metrics`.
    pub fn new(metrics: Arc<Metrics>, gauge: fn(&Metrics) -> &AtomicI64) -> Self {
        gauge(&metrics).fetch_add(1, Relaxed);
        Held { metrics, gauge }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    /// Takes a connection slot, or `None` when `max` are held.
    pub fn reserve_connection(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        if self.connections.fetch_add(1, Relaxed) >= max as i64 {
            self.connections.fetch_sub(1, Relaxed);
            return None;
        }
        Some(ConnectionSlot(self.clone(), None))
    }

    /// Counts one error answered with `code`.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition. `topics`, `patterns` and `ready` come
    /// from the hub and the server, which own them; the `herald_nats_*`
    /// series appear on linked (cluster) nodes only.
    pub fn render(&self, topics: usize, patterns: usize, ready: bool, cluster: bool) -> String {
        let get = |a: &AtomicU64| a.load(Relaxed) as i64;
        let gauge = |a: &AtomicI64| a.load(Relaxed);
        let mut series: Vec<(&str, &str, &str, i64)> = vec![
            (
                "herald_connections",
                "gauge",
                "WebSocket connections held, from the handshake until the TCP connection is gone.",
                gauge(&self.connections),
            ),
            (
                "herald_exec_processes",
                "gauge",
                "Programs running for --exec sockets, from spawn until reaped.",
                gauge(&self.exec_processes),
            ),
            (
                "herald_connections_accepted_total",
                "counter",
                "WebSocket connections accepted since start.",
                get(&self.connections_total),
            ),
            (
                "herald_subscriptions",
                "gauge",
                "Subscriptions held by all sockets.",
                gauge(&self.subscriptions),
            ),
            (
                "herald_topics",
                "gauge",
                "Distinct concrete topics with at least one local subscriber.",
                topics as i64,
            ),
            (
                "herald_patterns",
                "gauge",
                "Distinct wildcard patterns with at least one local subscriber.",
                patterns as i64,
            ),
            (
                "herald_messages_in_total",
                "counter",
                "Messages published into this node.",
                get(&self.messages_in),
            ),
            (
                "herald_bytes_in_total",
                "counter",
                "Bytes of published data received by this node.",
                get(&self.bytes_in),
            ),
            (
                "herald_deliveries_total",
                "counter",
                "Messages queued to local subscriber sockets.",
                get(&self.deliveries),
            ),
            (
                "herald_bytes_out_total",
                "counter",
                "Bytes of delivery frames queued to local sockets.",
                get(&self.bytes_out),
            ),
            (
                "herald_slow_consumer_disconnects_total",
                "counter",
                "Sockets closed because their outbound queue overflowed.",
                get(&self.slow_consumers),
            ),
            (
                "herald_heartbeat_timeouts_total",
                "counter",
                "Sockets closed because nothing arrived within a ping interval.",
                get(&self.heartbeat_timeouts),
            ),
            (
                "herald_write_timeouts_total",
                "counter",
                "Sockets cut because a write made no progress, or a close did not finish, in time.",
                get(&self.write_timeouts),
            ),
            (
                "herald_handshake_timeouts_total",
                "counter",
                "HTTP connections closed for not sending request headers in time.",
                get(&self.handshake_timeouts),
            ),
            (
                "herald_protocol_errors_total",
                "counter",
                "WebSocket connections closed for a protocol violation.",
                get(&self.protocol_errors),
            ),
            (
                "herald_ready",
                "gauge",
                "1 while the node accepts new sockets, 0 while draining.",
                i64::from(ready),
            ),
        ];
        series.extend([
            (
                "herald_recoveries_total",
                "counter",
                "Subscriptions that recovered everything they missed.",
                get(&self.recoveries),
            ),
            (
                "herald_recoveries_refused_total",
                "counter",
                "Recoveries answered recovered:false (epoch changed, too old, too many, history unavailable).",
                get(&self.recoveries_refused),
            ),
            (
                "herald_recoveries_running",
                "gauge",
                "Recoveries (sub with since or last) running or queued behind another of their socket's.",
                gauge(&self.recoveries_running),
            ),
            (
                "herald_publishes_storing",
                "gauge",
                "WebSocket publishes on history topics waiting for the stream to store them before their ack.",
                gauge(&self.publishes_storing),
            ),
            (
                "herald_replayed_messages_total",
                "counter",
                "History messages replayed to recovering and last-value subscriptions.",
                get(&self.replayed),
            ),
            (
                "herald_history_bytes",
                "gauge",
                "Bytes the in-memory history holds against --history-bytes: data and its overhead (rings, index, allocations).",
                gauge(&self.history_bytes),
            ),
            (
                "herald_history_topics",
                "gauge",
                "Topics the in-memory history holds a message of.",
                gauge(&self.history_topics),
            ),
            (
                "herald_history_messages",
                "gauge",
                "Messages the in-memory history holds.",
                gauge(&self.history_messages),
            ),
            (
                "herald_history_rings_read_total",
                "counter",
                "Topic rings the in-memory history read for replays and history pages.",
                get(&self.history_rings_read),
            ),
            (
                "herald_history_failures_total",
                "counter",
                "History publishes the stream did not store (delivered live without a position).",
                get(&self.history_failures),
            ),
        ]);
        if cluster {
            series.extend([
                (
                    "herald_nats_connected",
                    "gauge",
                    "1 while the NATS link is connected.",
                    gauge(&self.nats_connected),
                ),
                (
                    "herald_nats_connects_total",
                    "counter",
                    "Times the NATS link connected or reconnected.",
                    get(&self.nats_connects),
                ),
                (
                    "herald_nats_subscriptions",
                    "gauge",
                    "Subject subscriptions held on NATS (one per locally subscribed topic or pattern).",
                    gauge(&self.nats_subscriptions),
                ),
                (
                    "herald_nats_messages_in_total",
                    "counter",
                    "Messages received from NATS.",
                    get(&self.nats_messages_in),
                ),
                (
                    "herald_nats_messages_out_total",
                    "counter",
                    "Messages published onto NATS.",
                    get(&self.nats_messages_out),
                ),
                (
                    "herald_nats_publish_failures_total",
                    "counter",
                    "Publishes delivered locally that could not reach NATS.",
                    get(&self.nats_publish_failures),
                ),
                (
                    "herald_nats_dropped_total",
                    "counter",
                    "Messages from NATS dropped as unusable (subject, encoding, size).",
                    get(&self.nats_dropped),
                ),
            ]);
        }
        let mut out = String::with_capacity(4096);
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP herald_errors_total Errors answered to clients, by code.\n# TYPE herald_errors_total counter"
        );
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "herald_errors_total{{code=\"{}\"}} {}",
                code.as_str(),
                self.errors[code.index()].load(Relaxed)
            );
        }
        out
    }
}
