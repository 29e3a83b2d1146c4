//! Presence's costs: a join (and the "first socket of this user?" check of
//! `--presence-by user`) in an empty room against one of 20,000 members; a
//! member-list query and a count query on 20,000 members; and the size of
//! the snapshot a node publishes three times per `--presence-ttl`.

use divan::{black_box, Bencher};
use herald_broker::{Member, On, Roster};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    let r = room(20_000);
    let snapshot = r.snapshot("node").to_string();
    println!(
        "snapshot of a 20,000-member room: {} bytes; at --presence-ttl 15s (one every 5 s) {:.0} bytes/s per node",
        snapshot.len(),
        snapshot.len() as f64 / 5.0
    );
    divan::main();
}

fn member(i: usize) -> Member {
    Member {
        client: format!("c{i}-abc123"),
        user: Some(format!("user{}", i / 3)),
        name: Some(format!("name {i}")),
        last: None,
    }
}

fn room(n: usize) -> Roster {
    let r = Roster::default();
    for i in 0..n {
        r.join(On::Here, "chat:lobby", member(i));
    }
    r
}

#[divan::bench(args = [0, 20_000])]
fn join_and_leave(bencher: Bencher, members: usize) {
    let r = room(members);
    let m = member(1_000_000);
    bencher.bench(|| {
        let first = r.sockets_of("chat:lobby", "user333333") == 0;
        r.join(On::Here, "chat:lobby", black_box(m.clone()));
        r.leave(On::Here, "chat:lobby", &m.client);
        first
    });
}

#[divan::bench(args = [20_000])]
fn member_list(bencher: Bencher, members: usize) {
    let r = room(members);
    bencher.bench(|| r.members("chat:lobby", 1000).0.len());
}

#[divan::bench(args = [20_000])]
fn counts(bencher: Bencher, members: usize) {
    let r = room(members);
    bencher.bench(|| r.stats("chat:lobby"));
}
