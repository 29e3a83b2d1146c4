//! Hub fan-out to 10,000 in-memory subscribers. The allocation profile shows
//! the point: a handful of allocations per message (the one encoded frame),
//! none per recipient — every subscriber's queue gets the same `Bytes`.

use std::sync::Arc;

use divan::{black_box, Bencher};
use herald_broker::Metrics;
use herald_broker::Subscriber as Conn;
use herald_broker::{Body, Hub};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

fn hub_with(n: usize, pattern: &str) -> (Hub, Vec<Arc<Conn>>) {
    let hub = Hub::new(Arc::new(Metrics::default()), Vec::new(), 100);
    let conns: Vec<Arc<Conn>> = (0..n as u64)
        .map(|id| Arc::new(Conn::new(id, false, usize::MAX, 0, Default::default(), None)))
        .collect();
    for c in &conns {
        hub.subscribe(pattern, pattern.contains('*'), c)
            .expect("under the pattern limit");
    }
    (hub, conns)
}

/// Delivers one message after emptying every queue into a reused vector,
/// so each iteration measures the steady state.
fn deliver_once(hub: &Hub, conns: &[Arc<Conn>], spares: &mut [Vec<bytes::Bytes>]) -> usize {
    for (c, spare) in conns.iter().zip(spares.iter_mut()) {
        *spare = match c.outbox.try_take(std::mem::take(spare)) {
            Ok(batch) => batch.frames,
            Err(back) => back,
        };
        spare.clear();
    }
    hub.deliver("chat:lobby", Body::Data(br#"{"text":"hello, room"}"#))
}

/// One message to 1,000 and 10,000 subscribers of the topic.
#[divan::bench(args = [1_000, 10_000])]
fn deliver(bencher: Bencher, n: usize) {
    let (hub, conns) = hub_with(n, "chat:lobby");
    let mut spares: Vec<Vec<bytes::Bytes>> = (0..n).map(|_| Vec::with_capacity(4)).collect();
    bencher.bench_local(|| black_box(deliver_once(&hub, &conns, &mut spares)));
}

/// The same through a wildcard subscription.
#[divan::bench(args = [10_000])]
fn deliver_wildcard(bencher: Bencher, n: usize) {
    let (hub, conns) = hub_with(n, "chat:*");
    let mut spares: Vec<Vec<bytes::Bytes>> = (0..n).map(|_| Vec::with_capacity(4)).collect();
    bencher.bench_local(|| black_box(deliver_once(&hub, &conns, &mut spares)));
}
