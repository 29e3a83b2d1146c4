//! One worker process: a share of the subscribers and publishers of a run.
//!
//! The coordinator starts workers with a [`Spec`], and talks to each over
//! its stdin and stdout, one JSON object per line: the worker says
//! `{"ready":..}` once its sockets are subscribed, waits for `go START_NS`,
//! runs, reports progress, and ends with `{"report":..}`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::report::{new_histogram, Hist, WorkerReport};
use crate::wire::{self, Target, Url};
use herald_protocol::ws::OpCode;

/// What a worker runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub target: Target,
    pub urls: Vec<String>,
    /// Source address for this worker's sockets.
    pub source: Option<IpAddr>,
    pub kind: Kind,
    /// Global index of this worker's first subscriber (topic and URL are
    /// assigned by global index, so the coordinator knows the layout).
    pub sub_first: usize,
    pub sub_count: usize,
    /// Global index of this worker's first publisher.
    pub pub_first: usize,
    pub pub_count: usize,
    pub topics: usize,
    /// Publishes per second per publisher; 0 = as fast as the target takes.
    pub rate: u64,
    pub size: usize,
    pub duration_ms: u64,
    /// URL indexes subscribers are spread over; publishers use `pub_url`.
    pub sub_urls: Vec<usize>,
    pub pub_url: usize,
    /// Connect scenario: concurrent open/subscribe/close loops.
    pub concurrency: usize,
    /// Storm: where lost sockets reconnect (a load balancer), and the most
    /// each waits first.
    #[serde(default)]
    pub reconnect_urls: Vec<String>,
    #[serde(default)]
    pub jitter_ms: u64,
    /// A topic every subscriber also holds (`--shared`).
    #[serde(default)]
    pub shared: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    /// Subscribers and publishers (fanout, rooms, cluster).
    Pubsub,
    /// Open, subscribe, close, in a loop.
    Connect,
    /// Idle subscribed sockets.
    Idle,
    /// Idle subscribed sockets that reconnect when lost.
    Storm,
}

pub fn topic_name(i: usize) -> String {
    format!("load:t{i}")
}

struct Shared {
    /// `{"topic":"<--shared>"`: how a broadcast delivery starts.
    broadcast: Option<Vec<u8>>,
    broadcast_first_ns: AtomicU64,
    broadcast_last_ns: AtomicU64,
    broadcast_count: AtomicU64,
    /// Per `--url` (node): first and last arrival, and count.
    broadcast_by_node: Vec<[AtomicU64; 3]>,
    delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    published: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

fn say(v: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Runs a worker to completion.
pub async fn run(spec: Spec) -> anyhow::Result<()> {
    let urls: Vec<Url> = spec
        .urls
        .iter()
        .map(|u| Url::parse(u))
        .collect::<Result<_, _>>()?;
    let shared = Arc::new(Shared {
        broadcast: spec
            .shared
            .as_ref()
            .map(|t| format!(r#"{{"topic":"{t}""#).into_bytes()),
        broadcast_first_ns: AtomicU64::new(u64::MAX),
        broadcast_last_ns: AtomicU64::new(0),
        broadcast_count: AtomicU64::new(0),
        broadcast_by_node: (0..urls.len())
            .map(|_| [AtomicU64::new(u64::MAX), AtomicU64::new(0), AtomicU64::new(0)])
            .collect(),
        delivered: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        published: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency: Mutex::new(new_histogram()),
    });
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();

    // Storm sockets hold (and answer pings) from the moment they are
    // subscribed: a connect phase of a minute would otherwise outlast the
    // node's heartbeat.
    let (end_tx, end_rx) = tokio::sync::watch::channel(None);
    let storm_stats = Arc::new(crate::storm::Stats::default());
    let storm_urls: Arc<Vec<Url>> = Arc::new(
        spec.reconnect_urls
            .iter()
            .map(|u| Url::parse(u))
            .collect::<Result<_, _>>()?,
    );
    let mut storm_tasks = Vec::new();

    // 1. Subscribers (and idle sockets), a bounded number connecting at once.
    let mut subs = Vec::with_capacity(spec.sub_count);
    let retried = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut connecting = Vec::new();
    for k in 0..spec.sub_count {
        let g = spec.sub_first + k;
        let node = spec.sub_urls[g % spec.sub_urls.len()];
        let url = urls[node].clone();
        // Storm sockets hold topics of their own: a probe run beside them
        // (another load generator on `load:t0`) must not fan out to them.
        let topic = match spec.kind {
            Kind::Storm => format!("storm:t{}", g % spec.topics.max(1)),
            _ => topic_name(g % spec.topics.max(1)),
        };
        let (target, source, sem) = (spec.target, spec.source, sem.clone());
        let retried = retried.clone();
        let query = match &spec.shared {
            Some(t) => format!("{}&sub={t}", target.url_query(&topic)),
            None => target.url_query(&topic),
        };
        let storm = (spec.kind == Kind::Storm).then(|| {
            (
                storm_urls.clone(),
                storm_stats.clone(),
                end_rx.clone(),
                Duration::from_millis(spec.jitter_ms),
            )
        });
        // Subscribers read (and answer pings) from the moment they are
        // subscribed, as storm sockets do: a connect phase of minutes
        // would otherwise outlast the node's heartbeat.
        let reader = (spec.kind == Kind::Pubsub).then(|| (shared.clone(), end_rx.clone()));
        connecting.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            // A node shedding a connection storm answers 503 with
            // Retry-After: come back, as clients do.
            let mut attempt = 0;
            let mut c = loop {
                match wire::connect(&url, &query, source).await {
                    Ok(c) => break c,
                    Err(e) if attempt < 30 && e.to_string().contains(" 503 ") => {
                        attempt += 1;
                        retried.fetch_add(1, Relaxed);
                        // Retry-After, spread over a second by the socket's
                        // number so the retries do not come back as one wave.
                        let spread = (g as u64).wrapping_mul(7919) % 1000;
                        let ms = wire::asked_to_wait(&e).map_or(50 * attempt.min(20), |s| s * 1000 + spread);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            target.subscribe(&mut c, &topic).await?;
            if let Some((urls, stats, end, jitter)) = storm {
                let task = tokio::spawn(crate::storm::socket(
                    c, g, topic, urls, source, jitter, stats, end,
                ));
                return anyhow::Ok(Err(task));
            }
            if let Some((shared, end)) = reader {
                return anyhow::Ok(Err(tokio::spawn(read_deliveries(c, node, target, shared, end))));
            }
            anyhow::Ok(Ok((c, node)))
        }));
    }
    let mut connect_errors = 0u64;
    let mut first_error = None;
    for h in connecting {
        match h.await? {
            Ok(Ok(c)) => subs.push(c),
            Ok(Err(task)) => storm_tasks.push(task),
            Err(e) => {
                connect_errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    say(
        serde_json::json!({"ready": subs.len() + storm_tasks.len(), "connect_errors": connect_errors, "error": first_error}),
    );

    // 2. Wait for the coordinator's start time.
    let start_ns: u64 = loop {
        match stdin.next_line().await? {
            Some(l) if l.starts_with("go ") => break l[3..].trim().parse()?,
            Some(_) => continue,
            None => anyhow::bail!("coordinator went away"),
        }
    };
    let now = wire::now_ns();
    if start_ns > now {
        tokio::time::sleep(Duration::from_nanos(start_ns - now)).await;
    }
    let run_for = Duration::from_millis(spec.duration_ms);
    let deadline = tokio::time::Instant::now() + run_for;

    let mut report = WorkerReport {
        connected: (subs.len() + storm_tasks.len()) as u64,
        connect_errors,
        connect_retries: retried.load(Relaxed),
        ..Default::default()
    };
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                say(serde_json::json!({"progress": {
                    "delivered": shared.delivered.load(Relaxed),
                    "published": shared.published.load(Relaxed),
                }}));
            }
        })
    };

    match spec.kind {
        Kind::Storm => {
            let _ = end_tx.send(Some(deadline));
            let stats = storm_stats.clone();
            let tasks = std::mem::take(&mut storm_tasks);
            let ticker = {
                let stats = stats.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        say(serde_json::json!({ "storm": stats.report() }));
                    }
                })
            };
            for t in tasks {
                let _ = t.await;
            }
            ticker.abort();
            report.storm = stats.report();
        }
        Kind::Idle => {
            for (mut c, _) in subs {
                c.wr.close().await;
            }
        }
        Kind::Connect => {
            let hist = Arc::new(Mutex::new(new_histogram()));
            let mut loops = Vec::new();
            for k in 0..spec.concurrency {
                let url = urls[spec.sub_urls[k % spec.sub_urls.len()]].clone();
                let (target, source, hist, shared) = (spec.target, spec.source, hist.clone(), shared.clone());
                loops.push(tokio::spawn(async move {
                    let topic = topic_name(k);
                    while tokio::time::Instant::now() < deadline {
                        let t0 = std::time::Instant::now();
                        let r = async {
                            let mut c = wire::connect(&url, &target.url_query(&topic), source).await?;
                            target.subscribe(&mut c, &topic).await?;
                            c.wr.close().await;
                            anyhow::Ok(())
                        }
                        .await;
                        match r {
                            Ok(()) => {
                                let us = t0.elapsed().as_micros() as u64;
                                let _ = hist.lock().unwrap().record(us.max(1));
                                shared.delivered.fetch_add(1, Relaxed);
                            }
                            Err(_) => {
                                shared.errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }));
            }
            for l in loops {
                let _ = l.await;
            }
            report.handshakes = shared.delivered.load(Relaxed);
            report.connect_latency = Hist::from(&*hist.lock().unwrap());
        }
        Kind::Pubsub => {
            let topics_n = spec.topics.max(1);
            let mut published_per_topic = vec![0u64; topics_n];
            let _ = end_tx.send(Some(deadline));
            let readers = std::mem::take(&mut storm_tasks);
            let mut pubs = Vec::new();
            for k in 0..spec.pub_count {
                let g = spec.pub_first + k;
                let url = urls[spec.pub_url].clone();
                let spec = spec.clone();
                let shared = shared.clone();
                pubs.push(tokio::spawn(async move {
                    publish(spec, g, url, shared, start_ns, deadline, topics_n).await
                }));
            }
            for p in pubs {
                match p.await? {
                    Ok(per_topic) => {
                        for (i, n) in per_topic.into_iter().enumerate() {
                            published_per_topic[i] += n;
                        }
                    }
                    Err(e) => {
                        report.errors += 1;
                        eprintln!("publisher: {e}");
                    }
                }
            }
            for r in readers {
                let _ = r.await;
            }
            report.published_per_topic = published_per_topic;
        }
    }
    progress.abort();
    report.broadcast_first_ns = shared.broadcast_first_ns.load(Relaxed);
    report.broadcast_last_ns = shared.broadcast_last_ns.load(Relaxed);
    report.broadcast_count = shared.broadcast_count.load(Relaxed);
    report.broadcast_by_node = (shared.broadcast_by_node.iter())
        .map(|[f, l, n]| [f.load(Relaxed), l.load(Relaxed), n.load(Relaxed)])
        .collect();
    report.delivered = shared.delivered.load(Relaxed);
    report.last_delivery_ns = shared.last_delivery_ns.load(Relaxed);
    report.published = shared.published.load(Relaxed);
    report.errors += shared.errors.load(Relaxed);
    report.latency = Hist::from(&*shared.latency.lock().unwrap());
    say(serde_json::json!({ "report": report }));
    Ok(())
}

/// A subscriber: counts deliveries and records their latency until
/// `stop_at` (the end of publishing plus a drain allowance), or earlier once
/// publishing has ended and the stream has gone quiet. A target that is
/// still flooding its backlog past `stop_at` is not waited for.
async fn read_deliveries(
    mut c: wire::Conn,
    node: usize,
    target: Target,
    shared: Arc<Shared>,
    mut run: crate::storm::End,
) {
    // Until the run starts: answer pings, count nothing.
    let end = loop {
        if let Some(at) = *run.borrow_and_update() {
            break at;
        }
        tokio::select! {
            f = c.rd.next() => match f {
                Ok(Some(f)) if f.opcode == 0x9 => {
                    let p = c.rd.payload(&f).to_vec();
                    c.wr.frame(OpCode::Pong, &p);
                    if c.wr.flush().await.is_err() {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                _ => return,
            },
            changed = run.changed() => if changed.is_err() {
                return;
            },
        }
    };
    let stop_at = end + Duration::from_secs(3);
    // Grows on first use: a million idle readers hold nothing here.
    let mut local: Vec<u64> = Vec::new();
    let mut nats = NatsStream::default();
    // When the last delivery arrived (not when it was counted).
    let mut last_ns = 0u64;
    let flush = |local: &mut Vec<u64>, last_ns: u64| {
        let mut h = shared.latency.lock().unwrap();
        for &us in local.iter() {
            let _ = h.record(us.max(1));
        }
        if !local.is_empty() {
            shared.delivered.fetch_add(local.len() as u64, Relaxed);
            shared.last_delivery_ns.fetch_max(last_ns, Relaxed);
        }
        local.clear();
    };
    loop {
        let now = tokio::time::Instant::now();
        if now >= stop_at {
            break;
        }
        // Before the end, wait as long as it takes; after it, a quiet second
        // means the backlog is drained.
        let wait = if now < end {
            stop_at - now
        } else {
            Duration::from_secs(1).min(stop_at - now)
        };
        let next = match tokio::time::timeout(wait, c.rd.next()).await {
            Ok(Ok(Some(f))) => f,
            _ => break,
        };
        let now = wire::now_ns();
        let before = local.len();
        let payload = c.rd.payload(&next);
        match target {
            Target::NatsWs => {
                let (stamps, pings) = nats.feed(payload);
                for ts in stamps {
                    local.push(now.saturating_sub(ts) / 1000);
                }
                for _ in 0..pings {
                    c.wr.frame(OpCode::Binary, b"PONG\r\n");
                }
            }
            _ => {
                if next.opcode == 0x9 {
                    let p = payload.to_vec();
                    c.wr.frame(OpCode::Pong, &p);
                } else if next.opcode == 0x1 {
                    if shared.broadcast.as_ref().is_some_and(|b| payload.starts_with(b)) {
                        shared.broadcast_first_ns.fetch_min(now, Relaxed);
                        shared.broadcast_last_ns.fetch_max(now, Relaxed);
                        shared.broadcast_count.fetch_add(1, Relaxed);
                        let [first, last, count] = &shared.broadcast_by_node[node];
                        first.fetch_min(now, Relaxed);
                        last.fetch_max(now, Relaxed);
                        count.fetch_add(1, Relaxed);
                    } else if let Some(ts) = wire::timestamp(payload) {
                        local.push(now.saturating_sub(ts) / 1000);
                    }
                }
            }
        }
        if local.len() > before {
            last_ns = now;
        }
        if c.wr.pending() > 0 {
            let _ = c.wr.flush().await;
        }
        if local.len() >= 256 {
            flush(&mut local, last_ns);
        }
    }
    flush(&mut local, last_ns);
}

/// Reassembles the NATS protocol from WebSocket frames: counts `MSG`s (with
/// their timestamps) and `PING`s.
#[derive(Default)]
struct NatsStream {
    acc: Vec<u8>,
}

impl NatsStream {
    fn feed(&mut self, bytes: &[u8]) -> (Vec<u64>, usize) {
        self.acc.extend_from_slice(bytes);
        let mut stamps = Vec::new();
        let mut pings = 0;
        let mut at = 0;
        loop {
            let rest = &self.acc[at..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = &rest[..eol];
            if line.starts_with(b"MSG ") {
                let len: usize = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if rest.len() < eol + 2 + len + 2 {
                    break;
                }
                if let Some(ts) = wire::timestamp(&rest[eol + 2..eol + 2 + len]) {
                    stamps.push(ts);
                }
                at += eol + 2 + len + 2;
            } else {
                if line == b"PING" {
                    pings += 1;
                }
                at += eol + 2;
            }
        }
        self.acc.drain(..at);
        (stamps, pings)
    }
}

/// A publisher: at `rate` per second (each message stamped with its
/// intended send time, which corrects for coordinated omission) or flat out
/// (stamped with the actual time). Returns messages sent per topic.
async fn publish(
    spec: Spec,
    g: usize,
    url: Url,
    shared: Arc<Shared>,
    start_ns: u64,
    deadline: tokio::time::Instant,
    topics: usize,
) -> anyhow::Result<Vec<u64>> {
    let c = wire::connect(&url, "", spec.source).await?;
    let wire::Conn { rd, mut wr } = c;
    // Drain whatever the target sends back (broadcast echoes, pings).
    let drain = tokio::spawn(async move {
        let mut rd = rd;
        while let Ok(Some(_)) = rd.next().await {}
    });
    spec.target.hello(&mut wr);
    let names: Vec<String> = (0..topics).map(topic_name).collect();
    let mut per_topic = vec![0u64; topics];
    let mut body = Vec::with_capacity(spec.size + 32);
    let mut scratch = Vec::with_capacity(spec.size + 128);
    let mut seq: u64 = 0;
    let mut next_topic = g % topics;
    let mut send = |wr: &mut wire::Writer, ts: u64, seq: u64, per_topic: &mut Vec<u64>| {
        wire::body(ts, seq, spec.size, &mut body);
        spec.target.publish(wr, &names[next_topic], &body, &mut scratch);
        per_topic[next_topic] += 1;
        next_topic = (next_topic + 1) % topics;
    };
    if let Some(period_ns) = 1_000_000_000u64.checked_div(spec.rate) {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while tokio::time::Instant::now() < deadline {
            tick.tick().await;
            let elapsed = wire::now_ns().saturating_sub(start_ns);
            let due = elapsed / period_ns + 1;
            let before = seq;
            while seq < due {
                send(&mut wr, start_ns + seq * period_ns, seq, &mut per_topic);
                seq += 1;
            }
            if wr.flush().await.is_err() {
                shared.errors.fetch_add(1, Relaxed);
                break;
            }
            shared.published.fetch_add(seq - before, Relaxed);
        }
    } else {
        while tokio::time::Instant::now() < deadline {
            let ts = wire::now_ns();
            for _ in 0..32 {
                send(&mut wr, ts, seq, &mut per_topic);
                seq += 1;
            }
            if wr.flush().await.is_err() {
                // The target dropped the publisher: what was sent counts.
                shared.errors.fetch_add(1, Relaxed);
                break;
            }
            shared.published.fetch_add(32, Relaxed);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    wr.close().await;
    drain.abort();
    Ok(per_topic)
}
