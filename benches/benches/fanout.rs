//! Hub fan-out to 10,000 in-memory subscribers. The allocation profile shows
//! the point: a handful of allocations per message (the one encoded frame),
//! none per recipient — every subscriber's queue gets the same `Bytes`.
//!
//! Also: sockets that match a message through two subscriptions (each gets
//! it once), many topics under one wildcard (the match cache), and a
//! publish on a history topic (sequenced, stored, then fanned out).

use std::sync::Arc;

use bytes::Bytes;
use divan::{black_box, Bencher};
use herald_broker::Metrics;
use herald_broker::Subscriber as Conn;
use herald_broker::{Bus, Delivery, HistorySettings, Hub, Retention, Tasks};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

fn conns(n: usize) -> Vec<Arc<Conn>> {
    (0..n as u64)
        .map(|id| Arc::new(Conn::new(id, false, usize::MAX, 0, Default::default(), None)))
        .collect()
}

fn new_hub() -> Hub {
    Hub::new(Arc::new(Metrics::default()), Vec::new(), 100)
}

fn hub_with(n: usize, pattern: &str) -> (Hub, Vec<Arc<Conn>>) {
    let hub = new_hub();
    let conns = conns(n);
    for c in &conns {
        subscribe(&hub, pattern, c);
    }
    (hub, conns)
}

fn subscribe(hub: &Hub, pattern: &str, c: &Arc<Conn>) {
    let wildcard = pattern.contains(['*', '>']);
    if wildcard {
        c.mark_wildcard();
    }
    hub.subscribe(pattern, wildcard, c)
        .expect("under the pattern limit");
}

fn spares(n: usize) -> Vec<Vec<Bytes>> {
    (0..n).map(|_| Vec::with_capacity(4)).collect()
}

/// Empties every queue into a reused vector, so each iteration measures
/// the steady state.
fn drain(conns: &[Arc<Conn>], spares: &mut [Vec<Bytes>]) {
    for (c, spare) in conns.iter().zip(spares.iter_mut()) {
        *spare = match c.outbox.try_take(std::mem::take(spare)) {
            Ok(batch) => batch.frames,
            Err(back) => back,
        };
        spare.clear();
    }
}

const DATA: &[u8] = br#"{"text":"hello, room"}"#;

/// Delivers one message after emptying every queue.
fn deliver_once(hub: &Hub, conns: &[Arc<Conn>], spares: &mut [Vec<Bytes>]) -> usize {
    drain(conns, spares);
    hub.deliver("chat:lobby", Delivery::Data(DATA))
}

/// One message to 1,000 and 10,000 subscribers of the topic.
#[divan::bench(args = [1_000, 10_000])]
fn deliver(bencher: Bencher, n: usize) {
    let (hub, conns) = hub_with(n, "chat:lobby");
    let mut spares = spares(n);
    bencher.bench_local(|| black_box(deliver_once(&hub, &conns, &mut spares)));
}

/// The same through a wildcard subscription.
#[divan::bench(args = [10_000])]
fn deliver_wildcard(bencher: Bencher, n: usize) {
    let (hub, conns) = hub_with(n, "chat:*");
    let mut spares = spares(n);
    bencher.bench_local(|| black_box(deliver_once(&hub, &conns, &mut spares)));
}

/// Every socket holds `chat:*` and `chat:>`: each matches twice and must
/// get the message once.
#[divan::bench(args = [1_000, 10_000])]
fn deliver_two_patterns(bencher: Bencher, n: usize) {
    let (hub, conns) = hub_with(n, "chat:*");
    for c in &conns {
        subscribe(&hub, "chat:>", c);
    }
    let mut spares = spares(n);
    bencher.bench_local(|| {
        let sent = deliver_once(&hub, &conns, &mut spares);
        assert_eq!(sent, n);
        black_box(sent)
    });
}

/// The topic's 10,000 subscribers, and 100 sockets that also hold
/// `chat:*` (a dashboard watching every room).
#[divan::bench(args = [10_000])]
fn deliver_exact_and_pattern(bencher: Bencher, n: usize) {
    let (hub, mut conns) = hub_with(n, "chat:lobby");
    let watchers = conns_from(n, 100);
    for c in &watchers {
        subscribe(&hub, "chat:lobby", c);
        subscribe(&hub, "chat:*", c);
    }
    conns.extend(watchers);
    let mut spares = spares(conns.len());
    bencher.bench_local(|| {
        let sent = deliver_once(&hub, &conns, &mut spares);
        assert_eq!(sent, n + 100);
        black_box(sent)
    });
}

fn conns_from(first: usize, n: usize) -> Vec<Arc<Conn>> {
    (first as u64..(first + n) as u64)
        .map(|id| Arc::new(Conn::new(id, false, usize::MAX, 0, Default::default(), None)))
        .collect()
}

/// One message on each of `topics` topics in turn, under a wildcard held
/// by one socket: what the match cache costs when the working set is
/// under its bound (1,000) and over it (6,000). Each topic is matched once
/// before the timing; 12,800 messages are timed in all.
#[divan::bench(args = [1_000, 6_000], sample_count = 200, sample_size = 64)]
fn deliver_many_topics(bencher: Bencher, topics: usize) {
    let (hub, conns) = hub_with(1, "chat:*");
    let names: Vec<String> = (0..topics).map(|i| format!("chat:room{i}")).collect();
    let mut spares = spares(1);
    for name in &names {
        drain(&conns, &mut spares);
        hub.deliver(name, Delivery::Data(DATA));
    }
    let mut at = 0;
    bencher.bench_local(|| {
        drain(&conns, &mut spares);
        at = (at + 1) % names.len();
        black_box(hub.deliver(&names[at], Delivery::Data(DATA)))
    });
}

/// A publish on a history topic of an embedded node, to its 1,000 and
/// 10,000 subscribers: sequenced, stored, delivered with its position.
#[divan::bench(args = [1_000, 10_000])]
fn publish_history(bencher: Bencher, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _in = rt.enter();
    let (hub, conns) = hub_with(n, "chat:lobby");
    let settings = HistorySettings {
        rules: vec![Retention::parse("chat:>=100").expect("a rule")],
        bytes: 1 << 30,
        ..Default::default()
    };
    let bus = Bus::embedded(hub, Arc::new(Metrics::default()), &settings, &Tasks::default());
    let data = Bytes::from_static(DATA);
    let mut spares = spares(n);
    bencher.bench_local(|| {
        drain(&conns, &mut spares);
        black_box(bus.publish("chat:lobby", data.clone()).expect("embedded"))
    });
}
