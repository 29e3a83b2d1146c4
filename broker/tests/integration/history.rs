//! History and recovery: positions on deliveries, `since` replays with no
//! gap and no duplicate at the seam, `last`, the refusals, and the same
//! against a real `nats-server -js` cluster.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::*;

/// A subscriber that keeps its last position, the way the JS client does.
pub struct Tracker {
    pub epoch: String,
    pub seq: u64,
    /// `(topic, data.n)` in arrival order.
    pub got: Vec<(String, u64)>,
    /// Every seq seen, in order.
    pub seqs: Vec<u64>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            epoch: String::new(),
            seq: 0,
            got: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// Takes one frame; returns whether it was a delivery.
    pub fn take(&mut self, v: &Value) -> bool {
        let Some(topic) = v["topic"].as_str() else {
            return false;
        };
        if v.get("data").is_none() {
            return false;
        }
        let seq = v["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("delivery without seq: {v}"));
        self.epoch = v["epoch"].as_str().expect("epoch").to_owned();
        self.seq = seq;
        self.seqs.push(seq);
        self.got
            .push((topic.to_owned(), v["data"]["n"].as_u64().unwrap_or(u64::MAX)));
        true
    }

    /// The `sub` request that recovers from the last position.
    pub fn resub(&self, pattern: &str) -> Value {
        json!({"op":"sub","topic":pattern,"id":"r","since":{"seq":self.seq,"epoch":self.epoch}})
    }

    /// Every seq strictly increasing, and per topic the `n`s exactly
    /// `0..count`.
    pub fn check(&self, per_topic: &HashMap<String, u64>) {
        assert!(
            self.seqs.windows(2).all(|w| w[0] < w[1]),
            "seqs not increasing: {:?}",
            self.seqs
        );
        let mut by_topic: HashMap<&str, Vec<u64>> = HashMap::new();
        for (t, n) in &self.got {
            by_topic.entry(t).or_default().push(*n);
        }
        for (t, count) in per_topic {
            let ns = by_topic.remove(t.as_str()).unwrap_or_default();
            let want: Vec<u64> = (0..*count).collect();
            assert_eq!(ns, want, "topic {t}: every message once and in order");
        }
        assert!(by_topic.is_empty(), "unexpected topics {:?}", by_topic.keys());
    }
}

/// Publishes `count` messages `{"n":i}` on `topic` through `node`'s HTTP
/// endpoint, ten per request.
async fn publish_numbered(node: &Herald, topic: &str, count: u64) {
    for start in (0..count).step_by(10) {
        let items: Vec<String> = (start..(start + 10).min(count))
            .map(|n| format!(r#"{{"topic":"{topic}","data":{{"n":{n}}}}}"#))
            .collect();
        let (status, body) = node
            .post("/v1/publish", "", &format!("[{}]", items.join(",")))
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Reads deliveries into `t` until `done` says so; other frames are
/// returned.
async fn read_until(c: &mut Client, t: &mut Tracker, done: impl Fn(&Tracker) -> bool) -> Vec<Value> {
    let mut other = Vec::new();
    while !done(t) {
        let v = c.recv().await;
        if !t.take(&v) {
            other.push(v);
        }
    }
    other
}

fn last_n(t: &Tracker, topic: &str) -> Option<u64> {
    t.got.iter().rev().find(|(x, _)| x == topic).map(|(_, n)| *n)
}

#[tokio::test]
async fn embedded_recovery_gets_what_was_missed_across_topics_in_order() {
    let h = Herald::start(&["--history", "room:*=1000"]);
    let mut t = Tracker::new();
    let mut c = h.connect("").await;
    c.sub("room:*").await;
    publish_numbered(&h, "room:a", 5).await;
    publish_numbered(&h, "room:b", 5).await;
    read_until(&mut c, &mut t, |t| t.got.len() == 10).await;
    drop(c);
    // Missed while away, on both topics and one no history keeps.
    publish_numbered(&h, "room:a", 8).await; // n 0..8 again: a new run
    publish_numbered(&h, "plain", 1).await;
    let mut c = h.connect("").await;
    let ack = c.request(t.resub("room:*")).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(ack["epoch"], t.epoch.as_str());
    publish_numbered(&h, "room:b", 1).await;
    read_until(&mut c, &mut t, |t| t.got.len() == 19).await;
    let tail: Vec<_> = t.got[10..].iter().map(|(t, n)| format!("{t}/{n}")).collect();
    let mut want: Vec<String> = (0..8).map(|n| format!("room:a/{n}")).collect();
    want.push("room:b/0".into());
    assert_eq!(tail, want);
    assert!(t.seqs.windows(2).all(|w| w[0] < w[1]));
    // The same position again, on a fresh socket: the same replay.
    let mut c2 = h.connect("").await;
    let ack = c2
        .request(json!({"op":"sub","topic":"room:a","id":1,"since":{"seq":t.seqs[9],"epoch":t.epoch}}))
        .await;
    assert_eq!(ack["recovered"], true);
    let mut t2 = Tracker::new();
    read_until(&mut c2, &mut t2, |t| t.got.len() == 8).await;
    assert_eq!(t2.seqs, t.seqs[10..18]);
}

/// A subscriber drops its socket mid-stream and comes back with its
/// position while a publisher keeps going: every message exactly once, in
/// order, whatever the timing of the seam.
async fn seam_trials(publish_via: &Herald, read_via: &[&Herald], trials: u64) {
    for trial in 0..trials {
        // A topic and a wildcard of the trial's own: a node's feed may
        // still bring the previous trial's last messages to a subscription
        // made after they were stored (a plain sub gets what reaches the
        // node after it).
        let topic = format!("seam:t{trial}:x");
        let pattern = format!("seam:t{trial}:>");
        let total = 600;
        let mut t = Tracker::new();
        let mut c = read_via[0].connect("").await;
        c.sub(&pattern).await;
        let publisher = async {
            publish_numbered(publish_via, &topic, total).await;
        };
        let reader = async {
            let cut = 50 + trial * 37 % 200;
            read_until(&mut c, &mut t, |t| t.got.len() as u64 >= cut).await;
            drop(c);
            let mut c = read_via[trial as usize % read_via.len()].connect("").await;
            let ack = c.request(t.resub(&pattern)).await;
            assert_eq!(ack["recovered"], true, "{ack}");
            read_until(&mut c, &mut t, |t| last_n(t, &topic) == Some(total - 1)).await;
        };
        tokio::join!(publisher, reader);
        t.check(&HashMap::from([(topic.clone(), total)]));
    }
}

#[tokio::test]
async fn embedded_seam_loses_nothing_and_repeats_nothing() {
    let h = Herald::start(&["--history", "seam:>=100000"]);
    seam_trials(&h, &[&h], 6).await;
}

#[tokio::test]
async fn refusals_say_why_and_keep_the_socket() {
    let h = Herald::start(&["--history", "room:*=3", "--max-replay", "4"]);
    let mut c = h.connect("").await;
    c.sub("room:a").await;
    publish_numbered(&h, "room:a", 1).await;
    let first = c.recv().await;
    let (epoch, seq) = (
        first["epoch"].as_str().unwrap().to_owned(),
        first["seq"].as_u64().unwrap(),
    );
    publish_numbered(&h, "room:a", 3).await;
    publish_numbered(&h, "room:b", 3).await;
    let ask = |pattern: &str, seq: u64, epoch: &str| json!({"op":"sub","topic":pattern,"id":pattern,"since":{"seq":seq,"epoch":epoch}});
    let mut d = h.connect("").await;
    // room:a kept 3 of 4: the first one after `seq - 1` is gone.
    let ack = d.request(ask("room:a", seq - 1, &epoch)).await;
    assert_eq!(
        (ack["recovered"].clone(), ack["reason"].clone()),
        (json!(false), json!("too_old")),
        "{ack}"
    );
    // From `seq`: 3 on room:a and 3 on room:b is over --max-replay 4.
    let mut e = h.connect("").await;
    let ack = e.request(ask("room:*", seq, &epoch)).await;
    assert_eq!(ack["reason"], "too_many", "{ack}");
    // Live goes on after a refusal.
    publish_numbered(&h, "room:a", 1).await;
    let v = d.recv().await;
    assert_eq!(v["topic"], "room:a");
    let v = e.recv().await;
    assert_eq!(v["topic"], "room:a");
    let ack = d.request(ask("room:c", seq, "elsewhere")).await;
    assert_eq!(ack["reason"], "epoch_changed", "{ack}");
    let ack = d.request(ask("plain:x", 1, &epoch)).await;
    assert_eq!(ack["reason"], "history_unavailable", "{ack}");
    // From the future: bad_request, and the subscription is not held.
    let ack = d.request(ask("room:d", seq + 1000, &epoch)).await;
    assert_eq!(
        (ack["op"].as_str(), ack["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{ack}"
    );
    let again = d.request(json!({"op":"unsub","topic":"room:d","id":"u"})).await;
    assert_eq!(again["code"], "not_subscribed");
    for bad in [
        json!({"op":"sub","topic":"room:e","id":1,"since":{"seq":"1","epoch":epoch}}),
        json!({"op":"sub","topic":"room:e","id":1,"since":{"seq":1,"epoch":"no-dash"}}),
        json!({"op":"sub","topic":"room:e","id":1,"since":{"seq":1}}),
        json!({"op":"sub","topic":"room:e","id":1,"since":{"seq":1,"epoch":epoch},"last":true}),
    ] {
        let v = d.request(bad.clone()).await;
        assert_eq!(v["code"], "bad_request", "{bad} -> {v}");
    }
    let host = h.addr.to_string();
    let (status, body) = h
        .http(&upgrade_request("/ws?sub=room:a&since=nocolon", &host, ""))
        .await;
    assert_eq!(status, 400, "{body}");
    // A pattern the socket holds already: acked as a plain sub, no replay.
    let again = d.request(ask("room:a", seq - 1, &epoch)).await;
    assert_eq!(again["op"], "ack", "{again}");
    assert!(again.get("recovered").is_none(), "{again}");
    // The socket still works.
    d.sub("room:f").await;
    publish_numbered(&h, "room:f", 1).await;
    assert_eq!(d.recv().await["topic"], "room:f");
}

#[tokio::test]
async fn an_embedded_restart_changes_the_epoch() {
    let mut h = Herald::start(&["--history", "room:*=100"]);
    let mut c = h.connect("").await;
    c.sub("room:a").await;
    publish_numbered(&h, "room:a", 2).await;
    let mut t = Tracker::new();
    read_until(&mut c, &mut t, |t| t.got.len() == 2).await;
    let addr = h.addr;
    h.sigkill();
    drop(c);
    let h = Herald::start_on(addr, &["--history", "room:*=100"]);
    let mut c = h.connect("").await;
    let ack = c.request(t.resub("room:a")).await;
    assert_eq!(
        (ack["recovered"].clone(), ack["reason"].clone()),
        (json!(false), json!("epoch_changed")),
        "{ack}"
    );
    assert_ne!(ack["epoch"], t.epoch.as_str());
}

#[tokio::test]
async fn last_gives_the_current_value_of_each_topic_then_live() {
    let h = Herald::start(&["--history", "price:*=1"]);
    let items: Vec<String> = (0..1000)
        .flat_map(|i| [0, 1].map(move |n| format!(r#"{{"topic":"price:p{i}","data":{{"n":{n},"i":{i}}}}}"#)))
        .collect();
    for chunk in items.chunks(200) {
        let (status, body) = h.post("/v1/publish", "", &format!("[{}]", chunk.join(","))).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut c = h.connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"price:*","id":1,"last":true}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut t = Tracker::new();
    read_until(&mut c, &mut t, |t| t.got.len() == 1000).await;
    assert!(t.got.iter().all(|(_, n)| *n == 1), "only each topic's latest");
    assert!(t.seqs.windows(2).all(|w| w[0] < w[1]));
    publish_numbered(&h, "price:p7", 1).await;
    let v = c.recv().await;
    assert_eq!(
        (v["topic"].as_str(), v["data"]["n"].as_u64()),
        (Some("price:p7"), Some(0))
    );
    // The URL form, for a read-only client.
    let mut u = h.connect("sub=price:p9&last=1").await;
    assert_eq!(u.recv().await["data"]["i"], 9);
    // HTTP: a page of one topic.
    let (status, body) = h.get("/v1/history?topic=price:p7&since=0&limit=10").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["complete"], false, "count 1: older ones are gone");
    let (status, _) = h.get("/v1/history?topic=plain&since=0").await;
    assert_eq!(status, 400);
    let (status, _) = h.get("/v1/history?topic=price:p7&since=x").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_replay_larger_than_the_queue_is_paced_not_cut() {
    // 2,000 messages of ~1 KiB through a 64 KiB queue.
    let h = Herald::start(&["--history", "big:*=5000", "--max-queue-bytes", "65536"]);
    let mut c = h.connect("").await;
    c.sub("big:a").await;
    publish_numbered(&h, "big:a", 1).await;
    let first = c.recv().await;
    let (epoch, seq) = (
        first["epoch"].as_str().unwrap().to_owned(),
        first["seq"].as_u64().unwrap(),
    );
    // Gone from the node before the burst (a closing socket that still
    // held the topic would overflow).
    let v = c.request(json!({"op":"unsub","topic":"big:a","id":"u"})).await;
    assert_eq!(v["op"], "ack");
    drop(c);
    let pad = "x".repeat(1000);
    for start in (1..2001).step_by(50) {
        let items: Vec<String> = (start..start + 50)
            .map(|n| format!(r#"{{"topic":"big:a","data":{{"n":{n},"pad":"{pad}"}}}}"#))
            .collect();
        let (status, body) = h.post("/v1/publish", "", &format!("[{}]", items.join(","))).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut c = h.connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"big:a","id":1,"since":{"seq":seq,"epoch":epoch}}))
        .await;
    assert_eq!(ack["recovered"], true);
    let mut n = 1;
    while n <= 2000 {
        // Read slowly at first: the replay must wait for us.
        if n < 100 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let v = c.recv().await;
        assert_eq!(v["data"]["n"], n, "{}", v["topic"]);
        n += 1;
    }
    // The URL form, the same replay: paced after the socket opens.
    let mut u = h.connect(&format!("sub=big:a&since={epoch}:{seq}")).await;
    let ack = u.recv().await;
    assert_eq!(
        (ack["recovered"].clone(), ack["topic"].clone()),
        (json!(true), json!("big:a")),
        "{ack}"
    );
    for n in 1..=2000 {
        assert_eq!(u.recv().await["data"]["n"], n);
    }
    assert_eq!(h.metric("herald_slow_consumer_disconnects_total").await, 0.0);
}

/// Three nodes on one `nats-server -js`.
async fn js_cluster(extra: &[&str]) -> (NatsServer, Vec<Herald>) {
    let nats = NatsServer::start_js().await;
    let mut args = vec!["--history", "seam:>=100000", "--history", "room:>=1000/10m"];
    args.extend_from_slice(extra);
    let nodes = nodes(3, &nats.url(), &args);
    wait_linked(&nodes).await;
    for n in &nodes {
        eventually("history stream ready", || async {
            n.get("/readyz").await.1.contains("stream available")
        })
        .await;
    }
    (nats, nodes)
}

#[tokio::test]
async fn cluster_positions_are_the_same_on_every_node_and_increase_per_topic() {
    let (_nats, nodes) = js_cluster(&[]).await;
    let mut readers = Vec::new();
    for n in &nodes {
        let mut c = n.connect("").await;
        c.sub("room:x").await;
        readers.push(c);
    }
    // Two publishers on two nodes at once, one topic.
    let total = 300;
    let a = async {
        for i in 0..total {
            nodes[0]
                .publish("room:x", &format!(r#"{{"n":{i},"by":"a"}}"#))
                .await;
        }
    };
    let b = async {
        for i in 0..total {
            nodes[1]
                .publish("room:x", &format!(r#"{{"n":{i},"by":"b"}}"#))
                .await;
        }
    };
    tokio::join!(a, b);
    let mut seen: Vec<HashMap<(String, u64), u64>> = Vec::new();
    for c in &mut readers {
        let mut last = 0;
        let mut map = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..2 * total {
            let v = c.recv().await;
            let seq = v["seq"].as_u64().expect("seq");
            order.push(seq);
            assert!(
                seq > last,
                "seq {seq} after {last}: {:?}",
                &order[order.len().saturating_sub(12)..]
            );
            last = seq;
            map.insert(
                (
                    v["data"]["by"].as_str().unwrap().to_owned(),
                    v["data"]["n"].as_u64().unwrap(),
                ),
                seq,
            );
        }
        assert_eq!(map.len(), 2 * total as usize);
        seen.push(map);
    }
    assert_eq!(seen[0], seen[1], "same seq for the same message on every node");
    assert_eq!(seen[0], seen[2]);
}

#[tokio::test]
async fn cluster_seam_loses_nothing_across_nodes() {
    let (_nats, nodes) = js_cluster(&[]).await;
    seam_trials(&nodes[0], &[&nodes[1], &nodes[2]], 6).await;
}

#[tokio::test]
async fn cluster_seam_loses_nothing_reading_the_stream_itself() {
    // No in-memory tail: every recovery is a JetStream consumer.
    let (_nats, nodes) = js_cluster(&["--history-tail-bytes", "0"]).await;
    seam_trials(&nodes[0], &[&nodes[1], &nodes[2]], 4).await;
}

#[tokio::test]
async fn cluster_recovers_a_wildcard_over_fifty_topics() {
    let (_nats, nodes) = js_cluster(&[]).await;
    let mut c = nodes[1].connect("").await;
    c.sub("room:>").await;
    let mut t = Tracker::new();
    publish_numbered(&nodes[0], "room:t0", 1).await;
    read_until(&mut c, &mut t, |t| t.got.len() == 1).await;
    drop(c);
    let mut counts = HashMap::from([("room:t0".to_owned(), 1)]);
    for i in 0..50 {
        let topic = format!("room:t{i}:sub");
        publish_numbered(&nodes[i % 3], &topic, 10).await;
        counts.insert(topic, 10);
    }
    let mut c = nodes[2].connect("").await;
    let ack = c.request(t.resub("room:>")).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    read_until(&mut c, &mut t, |t| t.got.len() == 501).await;
    t.check(&counts);
    // And the HTTP page reads the stream too.
    let (status, body) = nodes[0]
        .get("/v1/history?topic=room:t3:sub&since=0&limit=4")
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let ns: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [0, 1, 2, 3]);
}

#[tokio::test]
async fn jetstream_restart_keeps_positions_and_epoch() {
    let (mut nats, nodes) = js_cluster(&[]).await;
    let mut c = nodes[0].connect("").await;
    c.sub("room:a").await;
    let mut t = Tracker::new();
    publish_numbered(&nodes[1], "room:a", 3).await;
    read_until(&mut c, &mut t, |t| t.got.len() == 3).await;
    let before = t.epoch.clone();
    drop(c);
    nats.restart().await;
    for n in &nodes {
        eventually("relinked", || async {
            n.metric("herald_nats_connects_total").await >= 2.0
        })
        .await;
    }
    wait_linked(&nodes).await;
    for n in &nodes {
        eventually("history stream back", || async {
            n.get("/readyz").await.1.contains("stream available")
        })
        .await;
    }
    // Published after the restart; recovered from before it.
    eventually("publish after restart", || async {
        nodes[1]
            .post("/v1/publish", "", r#"{"topic":"room:a","data":{"n":3}}"#)
            .await
            .0
            == 200
    })
    .await;
    let mut c = nodes[2].connect("").await;
    let ack = c.request(t.resub("room:a")).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(ack["epoch"], before.as_str(), "same stream, same epoch");
    read_until(&mut c, &mut t, |t| t.got.len() == 4).await;
    assert_eq!(t.got[3].1, 3);
    assert_eq!(t.seqs[3], t.seqs[2] + 1);
}

/// A node that has not reached the history stream yet is not ready: the
/// first 200 of a freshly started node already serves recoveries (a client
/// sent there by a load balancer is never told `history_unavailable`, and
/// to reload, while nothing was lost). Five fresh nodes, each asked the
/// moment it first says ready.
#[tokio::test]
async fn readiness_waits_for_the_history_stream() {
    let (nats, nodes) = js_cluster(&[]).await;
    let mut c = nodes[0].connect("").await;
    c.sub("room:a").await;
    let mut t = Tracker::new();
    publish_numbered(&nodes[1], "room:a", 3).await;
    read_until(&mut c, &mut t, |t| t.got.len() == 3).await;
    let url = nats.url();
    for round in 0..5 {
        let fresh = Herald::start(&["--nats", &url, "--history", "room:>=1000/10m"]);
        let deadline = tokio::time::Instant::now() + WAIT;
        let body = loop {
            let (status, body) = fresh.get("/readyz").await;
            if status == 200 {
                break body;
            }
            assert!(tokio::time::Instant::now() < deadline, "never ready: {body}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert!(
            body.contains("stream available"),
            "round {round}: ready before the stream: {body}"
        );
        let mut r = fresh.connect("").await;
        let ack = r.request(t.resub("room:a")).await;
        assert_eq!(ack["recovered"], true, "round {round}: {ack}");
    }
}

#[tokio::test]
async fn without_jetstream_history_publishes_are_refused_and_recovery_says_unavailable() {
    let nats = NatsServer::start().await;
    let nodes = nodes(2, &nats.url(), &["--history", "room:*=100"]);
    wait_linked(&nodes).await;
    // Never reached: not ready, so a load balancer sends it no client.
    eventually("readyz says so", || async {
        let (status, body) = nodes[0].get("/readyz").await;
        status == 503 && body.contains("stream not reached yet")
    })
    .await;
    let mut c = nodes[1].connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"room:a","id":1,"since":{"seq":5,"epoch":"abc"}}))
        .await;
    assert_eq!(ack["reason"], "history_unavailable", "{ack}");
    c.sub("plain").await;
    // A history topic's publish cannot be stored: refused, over HTTP and
    // WebSocket alike, so the publisher can send it again; nobody gets it.
    let (status, body) = nodes[0]
        .post("/v1/publish", "", r#"{"topic":"room:a","data":{"n":1}}"#)
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("history_unavailable"), "{body}");
    let mut p = nodes[0].connect("").await;
    let v = p
        .request(json!({"op":"pub","topic":"room:a","data":{"n":2},"id":"w"}))
        .await;
    assert_eq!(v["code"], "publish_failed", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("history_unavailable"),
        "{v}"
    );
    // Plain topics still go everywhere.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        nodes[0].publish("plain", r#"{"n":3}"#).await;
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
            assert_eq!(v["topic"], "plain", "nothing of room:a: {v}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never routed");
    }
    let (status, _) = nodes[0].get("/v1/history?topic=room:a").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn herald_sub_starts_from_a_position_or_the_last_value() {
    let h = Herald::start(&["--history", "room:*=100"]);
    let mut c = h.connect("").await;
    c.sub("room:a").await;
    publish_numbered(&h, "room:a", 4).await;
    let first = c.recv().await;
    let since = format!("{}:{}", first["epoch"].as_str().unwrap(), first["seq"]);
    let url = h.url("");
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(herald_bin())
            .arg("sub")
            .args(args)
            .output();
        let out = tokio::time::timeout(WAIT, out)
            .await
            .expect("herald sub finished")
            .expect("herald sub");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["--url", &url, "--data-only"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let replayed = run(args(&["--count", "3", "--since", &since, "room:a"])).await;
    assert_eq!(replayed, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
    let last = run(args(&["--count", "1", "--last", "room:*"])).await;
    assert_eq!(last, "{\"n\":3}\n");
    let out = std::process::Command::new(herald_bin())
        .args(["sub", "--url", &url, "--since", "nocolon", "room:a"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("EPOCH:SEQ"));
}

#[tokio::test]
async fn cluster_last_gives_the_current_value_of_a_thousand_topics() {
    let (_nats, nodes) = js_cluster(&[]).await;
    let items: Vec<String> = (0..1000)
        .flat_map(|i| [0, 1].map(move |n| format!(r#"{{"topic":"room:p{i}","data":{{"n":{n},"i":{i}}}}}"#)))
        .collect();
    for chunk in items.chunks(200) {
        let (status, body) = nodes[0]
            .post("/v1/publish", "", &format!("[{}]", chunk.join(",")))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut c = nodes[1].connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"room:>","id":1,"last":true}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut t = Tracker::new();
    read_until(&mut c, &mut t, |t| t.got.len() == 1000).await;
    assert!(t.got.iter().all(|(_, n)| *n == 1), "only each topic's latest");
    let topics: std::collections::HashSet<_> = t.got.iter().map(|(topic, _)| topic.clone()).collect();
    assert_eq!(topics.len(), 1000);
    assert!(t.seqs.windows(2).all(|w| w[0] < w[1]));
    // Then live, from another node.
    publish_numbered(&nodes[2], "room:p7", 1).await;
    let v = c.recv().await;
    assert_eq!(
        (v["topic"].as_str(), v["data"]["n"].as_u64()),
        (Some("room:p7"), Some(0))
    );
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// What history keeps is its own copy of the value, not a slice of the
/// frame it came in: 3,000 publishes of a 1-byte value beside a 60 KB
/// ignored field, all kept (`--history-bytes 1000000` is far above their
/// 3,000 bytes), hold a few KB, where slices would pin 180 MB of frames.
#[tokio::test]
async fn history_keeps_its_own_copy_not_the_frame_it_came_in() {
    let h = Herald::start(&[
        "--history",
        "pin:*=5000",
        "--history-bytes",
        "1000000",
        "--publish-rate",
        "0",
    ]);
    let mut c = h.connect("").await;
    let pad = "p".repeat(60_000);
    // Warm up the node's buffers first, so what follows measures the store.
    for i in 0..50 {
        c.send(json!({"op":"pub","topic":"warm:a","data":i,"pad":pad}).to_string())
            .await;
    }
    c.request(json!({"op":"pub","topic":"warm:a","data":0,"id":"w"}))
        .await;
    let before = rss(h.pid());
    for i in 0..3000 {
        c.send(json!({"op":"pub","topic":"pin:a","data":i % 10,"pad":pad}).to_string())
            .await;
    }
    let ack = c
        .request(json!({"op":"pub","topic":"pin:a","data":1,"id":"done"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let (status, body) = h.get("/v1/history?topic=pin:a&since=0&limit=10").await;
    assert_eq!(status, 200, "{body}");
    let grown = rss(h.pid()).saturating_sub(before);
    assert!(
        grown < 60 << 20,
        "RSS grew by {} MB for 3,000 bytes of history",
        grown >> 20
    );
}

/// `last` over more topics holding a value than `--max-replay` says why, as
/// a `since` does (it was a plain ack with no values and no reason), and the
/// subscription is live.
#[tokio::test]
async fn last_over_more_topics_than_max_replay_says_why() {
    let h = Herald::start(&["--history", "room:*=3", "--max-replay", "4"]);
    for t in 0..6 {
        publish_numbered(&h, &format!("room:t{t}"), 1).await;
    }
    let mut c = h.connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"room:*","id":"l","last":true}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_eq!(ack["reason"], "too_many", "{ack}");
    h.publish("room:t9", "\"live\"").await;
    let v = c.recv().await;
    assert_eq!(
        (v["topic"].as_str(), v["data"].as_str()),
        (Some("room:t9"), Some("live")),
        "{v}"
    );
    // Within the bound, a plain ack and the values.
    let mut d = h.connect("").await;
    let ack = d
        .request(json!({"op":"sub","topic":"room:t1","id":"m","last":true}))
        .await;
    assert!(ack.get("recovered").is_none(), "{ack}");
}

/// A history stream the server refuses (here: another stream already takes
/// the same subjects) is reported at warn in the server's own words, once,
/// not as a bare "unavailable" at debug.
#[tokio::test]
async fn a_refused_history_stream_says_why_in_the_log() {
    let nats = NatsServer::start_js().await;
    let first = Herald::start(&["--nats", &nats.url(), "--history", "h:*=10"]);
    eventually("the first node's stream is there", || async {
        let (status, _) = first.get("/v1/history?topic=h:a&since=0").await;
        status == 200
    })
    .await;
    let second = Herald::start_logged(&[
        "--nats",
        &nats.url(),
        "--history",
        "h:*=10",
        "--history-stream",
        "OTHER",
    ]);
    eventually("the refusal is logged with its reason", || async {
        second
            .log()
            .iter()
            .any(|l| l.contains("history unavailable") && l.contains("overlap"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let said = second
        .log()
        .iter()
        .filter(|l| l.contains("history unavailable"))
        .count();
    assert_eq!(said, 1, "once, not every retry: {:?}", second.log());
}

/// Fills `topic` with `count` messages `{"n":i,"pad":..}` of about `size`
/// bytes through HTTP (with `headers`), fifty per request; returns the
/// position just before the first.
async fn fill_padded(h: &Herald, topic: &str, count: u64, size: usize, headers: &str) -> (String, u64) {
    let pad = "x".repeat(size);
    let mut before = None;
    for start in (1..=count).step_by(50) {
        let items: Vec<String> = (start..(start + 50).min(count + 1))
            .map(|n| format!(r#"{{"topic":"{topic}","data":{{"n":{n},"pad":"{pad}"}}}}"#))
            .collect();
        let (status, body) = h
            .post("/v1/publish", headers, &format!("[{}]", items.join(",")))
            .await;
        assert_eq!(status, 200, "{body}");
        if before.is_none() {
            let get = format!(
                "GET /v1/history?topic={topic}&since=0&limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"
            );
            let (_, page) = h.http(&get).await;
            let v: Value = serde_json::from_str(&page).unwrap_or(Value::Null);
            if let (Some(e), Some(s)) = (v["epoch"].as_str(), v["messages"][0]["seq"].as_u64()) {
                before = Some((e.to_owned(), s - 1));
            }
        }
    }
    before.expect("a position")
}

/// Issue 24, item 10: a replay that takes longer than the heartbeat's two
/// intervals, to a client that reads slowly but answers every ping, goes
/// to the end. The read loop used to await the whole replay, so the pongs
/// went unread and the socket was cut 4002 after a part of it, on every
/// retry.
///
/// 3 MB read at about 1 MB/s through a 16 KiB receive buffer, pinged
/// every second: the kernel holds only a little of it unsent (the
/// listener's TCP_NOTSENT_LOWAT), so each ping reaches the client soon and
/// the replay waits for its reads. (With the kernel free to hold it all,
/// the pings came after the whole replay, 3 s later: a 4002.)
#[tokio::test]
async fn a_long_replay_keeps_reading_the_socket() {
    let h = Herald::start(&[
        "--history",
        "big:*=10000",
        "--max-queue-bytes",
        "65536",
        "--ping-interval",
        "1s",
    ]);
    let (epoch, seq) = fill_padded(&h, "big:a", 3000, 1000, "").await;
    let mut c = Client::connect_small(h.addr, &h.url(""), 16 * 1024).await;
    let ack = c
        .request(json!({"op":"sub","topic":"big:a","id":1,"since":{"seq":seq,"epoch":epoch}}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    // The client's library answers each ping as it reads.
    for n in 1..=3000 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let v = c.recv().await;
        assert_eq!(v["data"]["n"], n, "{v}");
    }
    // And the socket still works.
    c.publish("big:b", json!(1)).await;
    assert_eq!(h.metric("herald_heartbeat_timeouts_total").await, 0.0);
    assert_eq!(h.metric("herald_recoveries_running").await, 0.0);
}

/// Issue 24, item 9: a subscription that ends during its replay (a refresh
/// that narrows the grants, an `unsub`, for a `sub` frame and a URL
/// subscription alike) ends the replay at once: nothing of it follows the
/// `forbidden` frame or the `unsub` ack, and the end is handled while the
/// replay runs, not after it. 8 MB through a 16 KiB receive buffer: more
/// than the kernel holds for the client, so the replay waits for its
/// reads.
#[tokio::test]
async fn a_replay_ends_with_its_subscription() {
    let key = KeyFile::new("replay-end");
    let h = Herald::start(&[
        "--auth-hmac-key-file",
        key.arg(),
        "--api-key",
        "k",
        "--history",
        "room:secret=10000",
        "--max-queue-bytes",
        "65536",
    ]);
    let auth = "Authorization: Bearer k\r\n";
    let (epoch, seq) = fill_padded(&h, "room:secret", 8000, 1000, auth).await;
    let wide = key.token("ann", &["room:*"]);
    let narrow = key.token("ann", &["room:public"]);
    let since = json!({"seq":seq,"epoch":epoch});

    // Reads until `done` says so, counting `room:secret` deliveries.
    async fn count_until(c: &mut Client, done: impl Fn(&Value) -> bool) -> u64 {
        let mut n = 0;
        loop {
            let v = c.recv().await;
            if done(&v) {
                return n;
            }
            if v["topic"] == "room:secret" {
                n += 1;
            }
        }
    }
    let marker = |v: &Value| v["topic"] == "room:public" && v["data"] == "marker";

    for how in ["refresh", "unsub", "url-refresh"] {
        let mut c = if how == "url-refresh" {
            // `since` asks of both: room:public keeps no history.
            let q = format!("token={wide}&sub=room:public&sub=room:secret&since={epoch}:{seq}");
            let mut c = Client::connect_small(h.addr, &h.url(&q), 16 * 1024).await;
            let ack = c.recv().await;
            assert_eq!(ack["reason"], "history_unavailable", "{how}: {ack}");
            let ack = c.recv().await;
            assert_eq!(ack["recovered"], true, "{how}: {ack}");
            c
        } else {
            let mut c = Client::connect_small(h.addr, &h.url(&format!("token={wide}")), 16 * 1024).await;
            c.sub("room:public").await;
            let ack = c
                .request(json!({"op":"sub","topic":"room:secret","id":"s","since":since}))
                .await;
            assert_eq!(ack["recovered"], true, "{how}: {ack}");
            c
        };
        // A few read, then the subscription ends while most of the
        // replay waits for the client.
        for _ in 0..10 {
            let v = c.recv().await;
            assert_eq!(v["topic"], "room:secret", "{how}: {v}");
        }
        let before_end = if how == "unsub" {
            c.send(json!({"op":"unsub","topic":"room:secret","id":"u"}).to_string())
                .await;
            count_until(&mut c, |v| v["id"] == "u").await
        } else {
            c.send(json!({"op":"refresh","token":narrow,"id":"r"}).to_string())
                .await;
            count_until(&mut c, |v| v["code"] == "forbidden").await
        };
        assert!(
            10 + before_end < 8000,
            "{how}: the end was handled after the whole replay ({before_end} more came first)"
        );
        let body = r#"{"topic":"room:public","data":"marker"}"#;
        assert_eq!(h.post("/v1/publish", auth, body).await.0, 200);
        let after_end = count_until(&mut c, marker).await;
        assert_eq!(after_end, 0, "{how}: replay frames after the subscription ended");
        eventually("the recovery is gone", || async {
            h.metric("herald_recoveries_running").await == 0.0
        })
        .await;
    }
    assert!(h.metric("herald_replayed_messages_total").await < 24000.0);
}

/// Reads `n` frames and drops them.
async fn skip(c: &mut Client, n: usize) {
    for _ in 0..n {
        c.recv().await;
    }
}

/// Issue 26, items 1 and 2 (the node's side): the ack of a plain `sub` on
/// a history topic carries the history's position, so a client that has
/// received nothing yet recovers what it missed from there; and a refusal
/// carries the real position, not 0, embedded and in a cluster.
#[tokio::test]
async fn every_history_ack_carries_the_position() {
    let embedded = Herald::start(&["--history", "pos:*=3"]);
    let (_nats, cluster) = js_cluster(&["--history", "pos:*=3"]).await;
    for h in [&embedded, &cluster[0]] {
        // Live deliveries show the node's feed has passed what was
        // published (a cluster node's position is what its feed delivered).
        let mut watch = h.connect("").await;
        watch.sub("pos:*").await;
        publish_numbered(h, "pos:warm", 5).await;
        skip(&mut watch, 5).await;
        let mut c = h.connect("").await;
        let ack = c.request(json!({"op":"sub","topic":"pos:a","id":"p"})).await;
        let (epoch, seq) = (
            ack["epoch"].as_str().expect("epoch").to_owned(),
            ack["seq"].as_u64().unwrap(),
        );
        assert!(seq >= 5, "{ack}");
        drop(c);
        // Published while it was away: 1, 2, 3 (with nothing received).
        publish_numbered(h, "pos:a", 3).await;
        skip(&mut watch, 3).await;
        let mut c = h.connect("").await;
        let ack = c
            .request(json!({"op":"sub","topic":"pos:a","id":1,"since":{"seq":seq,"epoch":epoch}}))
            .await;
        assert_eq!(ack["recovered"], true, "{ack}");
        for n in 0..3 {
            assert_eq!(c.recv().await["data"]["n"], n);
        }
        // A plain sub to a topic outside the history: a plain ack.
        let plain = c.request(json!({"op":"sub","topic":"other","id":2})).await;
        assert!(plain.get("seq").is_none(), "{plain}");
        // Refusals say where the history is: the client reloads from there.
        let now = ack["seq"].as_u64().unwrap();
        let gone = c
            .request(json!({"op":"sub","topic":"pos:b","id":3,"since":{"seq":seq,"epoch":"0other"}}))
            .await;
        assert_eq!(gone["reason"], "epoch_changed", "{gone}");
        assert_eq!(gone["seq"].as_u64(), Some(now), "{gone}");
        publish_numbered(h, "pos:c", 5).await;
        skip(&mut watch, 5).await;
        let old = c
            .request(json!({"op":"sub","topic":"pos:c","id":4,"since":{"seq":seq,"epoch":epoch}}))
            .await;
        assert_eq!(old["reason"], "too_old", "{old}");
        assert_eq!(old["seq"].as_u64(), Some(now + 5), "{old}");
    }
}

/// Issue 32: an acknowledged publish on a history topic is a stored one,
/// even when the stream stalls (its server stopped with SIGSTOP for 12 s,
/// past the stream's ack timeouts). A WebSocket publisher sends 20 a
/// second throughout; each publish is acked only once stored, or refused
/// (`publish_failed`, to send again). Afterwards every acked message is in
/// the stream, and a subscriber on another node got each acked one once,
/// in order. (Before, one timed-out stream ack put the node in a live-only
/// mode whose acks and 200s were never stored.)
#[tokio::test]
async fn a_stalled_stream_acknowledges_only_what_it_stored() {
    let (nats, nodes) = js_cluster(&[]).await;
    let mut sub = nodes[1].connect("").await;
    let ack = sub
        .request(json!({"op":"sub","topic":"room:stall","id":"s"}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut p = nodes[0].connect("").await;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let (mut acked, mut refused) = (Vec::new(), 0u64);
    let mut stopped = false;
    let mut resumed = false;
    // Publish for 20 s (the stall from 2 s to 14 s), then collect answers.
    loop {
        let t = started.elapsed();
        if !stopped && t > Duration::from_secs(2) {
            nats.signal("STOP");
            stopped = true;
        }
        if stopped && !resumed && t > Duration::from_secs(14) {
            nats.signal("CONT");
            resumed = true;
        }
        if t < Duration::from_secs(20) {
            let req = json!({"op":"pub","topic":"room:stall","data":{"n":sent},"id":sent});
            p.send(req.to_string()).await;
            sent += 1;
        } else if acked.len() as u64 + refused == sent {
            break;
        }
        // Answers as they come, for 50 ms.
        let until = tokio::time::Instant::now() + Duration::from_millis(50);
        while let Ok(text) = tokio::time::timeout_at(until, p.recv_text()).await {
            let v: Value = serde_json::from_str(&text).unwrap();
            match v["op"].as_str() {
                Some("ack") => acked.push(v["id"].as_u64().unwrap()),
                Some("error") => {
                    assert_eq!(v["code"], "publish_failed", "{v}");
                    refused += 1;
                }
                _ => {}
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "answers missing");
    }
    // Every acked message is in the stream.
    let (status, page) = nodes[2]
        .get("/v1/history?topic=room:stall&since=0&limit=1000")
        .await;
    assert_eq!(status, 200, "{page}");
    let page: Value = serde_json::from_str(&page).unwrap();
    let stored: std::collections::HashSet<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["n"].as_u64().unwrap())
        .collect();
    let unstored: Vec<u64> = acked.iter().copied().filter(|n| !stored.contains(n)).collect();
    assert!(unstored.is_empty(), "acked but not stored: {unstored:?}");
    assert!(
        refused > 0,
        "the stall outlasted the stream's timeouts: some were refused"
    );
    // And the subscriber got each acked one once, in seq order.
    let mut got = Vec::new();
    let mut last = 0;
    while let Ok(v) = tokio::time::timeout(Duration::from_secs(2), sub.recv()).await {
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq > last, "in order, once: {seq} after {last}");
        last = seq;
        got.push(v["data"]["n"].as_u64().unwrap());
    }
    let got: std::collections::HashSet<u64> = got.into_iter().collect();
    let missed: Vec<u64> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
    assert!(missed.is_empty(), "acked but never delivered: {missed:?}");
}

/// Issue 32 (causes 4 and 5): a stream replaced under the nodes (its
/// server restarted with an empty store) is read from its start, under its
/// new epoch: what is published into it reaches every subscriber, and a
/// recovery from the old epoch is refused `epoch_changed`, not answered
/// from the old stream's tail. (Before, the feed skipped every `seq` up to
/// the old stream's last, and the tail kept the old messages.)
#[tokio::test]
async fn a_replaced_stream_is_read_from_its_start() {
    let (mut nats, nodes) = js_cluster(&[]).await;
    let mut sub = nodes[1].connect("").await;
    sub.sub("room:new").await;
    publish_numbered(&nodes[0], "room:new", 20).await;
    let mut old = None;
    for n in 0..20 {
        let v = sub.recv().await;
        assert_eq!(v["data"]["n"], n);
        old = Some((
            v["epoch"].as_str().unwrap().to_owned(),
            v["seq"].as_u64().unwrap(),
        ));
    }
    let (old_epoch, _) = old.unwrap();
    nats.restart_empty().await;
    wait_linked(&nodes).await;
    // Each node finds the new stream (made again by a node's check).
    for n in &nodes {
        eventually("a new epoch", || async {
            let (status, body) = n.get("/v1/history?topic=room:new&since=0").await;
            status == 200 && !body.contains(&old_epoch)
        })
        .await;
    }
    // Publishes into the new stream (seq 1, 2, 3: below the old last) go out.
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        let (status, body) = nodes[0]
            .post("/v1/publish", "", r#"{"topic":"room:new","data":{"n":100}}"#)
            .await;
        if status == 200 {
            break sub.recv().await;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first["data"]["n"], 100, "{first}");
    assert_ne!(first["epoch"], old_epoch.as_str(), "{first}");
    assert!(first["seq"].as_u64().unwrap() < 20, "{first}");
    // A recovery from the old epoch is told so, by every node.
    for n in &nodes {
        let mut c = n.connect("").await;
        let ack = c
            .request(json!({"op":"sub","topic":"room:new","id":1,"since":{"seq":5,"epoch":old_epoch}}))
            .await;
        assert_eq!(ack["reason"], "epoch_changed", "{ack}");
    }
}

/// From the outside attack on recoveries beside the read loop: requests
/// sent right behind a recovering `sub`, in the same write.
/// - A later plain `sub` of the pattern is acked; a `since` ahead of the
///   history then must not drop the subscription it acked.
/// - An `unsub` right behind it: no `recovered:true` ack after the unsub's.
/// - An ahead `since` counts as a `bad_request` error.
#[tokio::test]
async fn requests_behind_a_recovery_keep_their_answers() {
    let h = Herald::start(&["--history", "chat:*=100"]);
    let mut c = h.connect("").await;
    let ack = c.request(json!({"op":"sub","topic":"chat:warm","id":0})).await;
    let epoch = ack["epoch"].as_str().expect("epoch").to_owned();
    let before = h.metric("herald_errors_total{code=\"bad_request\"}").await;
    // Ahead, then a plain sub of the same pattern, in one write.
    let ahead = json!({"op":"sub","topic":"chat:x","id":2,"since":{"seq":999999,"epoch":epoch}});
    let plain = json!({"op":"sub","topic":"chat:x","id":3});
    c.send_together(&[ahead.to_string(), plain.to_string()]).await;
    let (mut refused, mut acked) = (false, false);
    while !(refused && acked) {
        let v = c.recv().await;
        match v["id"].as_u64() {
            Some(2) => refused = v["code"] == "bad_request",
            Some(3) => acked = v["op"] == "ack",
            _ => {}
        }
    }
    // Once the refused recovery has run its course.
    eventually("the recovery ended", || async {
        h.metric("herald_recoveries_running").await == 0.0
    })
    .await;
    h.publish("chat:x", r#"{"after":1}"#).await;
    let v = c.recv().await;
    assert_eq!(v["data"]["after"], 1, "the acked subscription holds: {v}");
    assert_eq!(
        h.metric("herald_errors_total{code=\"bad_request\"}").await,
        before + 1.0
    );
    // sub since + unsub, 20 times: a recovered:true never follows the
    // unsub's ack.
    for round in 0..20 {
        let topic = format!("chat:r{round}");
        let sub = json!({"op":"sub","topic":topic,"id":"s","since":{"seq":0,"epoch":epoch}});
        let unsub = json!({"op":"unsub","topic":topic,"id":"u"});
        c.send_together(&[sub.to_string(), unsub.to_string()]).await;
        let (mut s_answer, mut u_seen) = (None, false);
        while s_answer.is_none() || !u_seen {
            let v = c.recv().await;
            if v["id"] == "u" {
                u_seen = true;
            } else if v["id"] == "s" {
                s_answer = Some((v.clone(), u_seen));
            }
        }
        let (v, after_unsub) = s_answer.unwrap();
        assert!(
            !(after_unsub && v["recovered"] == true),
            "round {round}: recovered:true after the unsub's ack: {v}"
        );
    }
}

/// Issue 32 (cause 9): in a cluster, a publisher subscribed to its own
/// history topic gets its message before the ack, as for plain topics
/// (the ack waited only for the stream, and often came first).
#[tokio::test]
async fn a_history_ack_follows_the_publishers_own_copy() {
    let (_nats, nodes) = js_cluster(&[]).await;
    let mut c = nodes[0].connect("").await;
    c.sub("room:own").await;
    for n in 0..50 {
        c.send(json!({"op":"pub","topic":"room:own","data":{"n":n},"id":n}).to_string())
            .await;
        let first = c.recv().await;
        assert_eq!(first["data"]["n"], n, "the copy before the ack: {first}");
        assert!(first["seq"].as_u64().is_some(), "{first}");
        let ack = c.recv().await;
        assert_eq!(
            (ack["op"].clone(), ack["id"].clone()),
            (json!("ack"), json!(n)),
            "{ack}"
        );
    }
}

/// A socket's recoveries wait their turn, at most `--max-subscriptions` at
/// once: one that ended (unsubscribed) while waiting still counts until
/// its turn, so a client cannot queue more by churning.
#[tokio::test]
async fn recoveries_waiting_on_a_socket_are_bounded() {
    let h = Herald::start(&[
        "--history",
        "big:*=10000",
        "--max-queue-bytes",
        "65536",
        "--max-subscriptions",
        "2",
    ]);
    let (epoch, seq) = fill_padded(&h, "big:a", 1500, 1000, "").await;
    let since = json!({"seq":seq,"epoch":epoch});
    // A small receive buffer, not read yet: the first replay waits.
    let mut c = Client::connect_small(h.addr, &h.url(""), 16 * 1024).await;
    c.send_together(&[
        json!({"op":"sub","topic":"big:a","id":"a","since":since}).to_string(),
        json!({"op":"sub","topic":"big:b","id":"b","since":since}).to_string(),
        json!({"op":"unsub","topic":"big:b","id":"ub"}).to_string(),
        json!({"op":"sub","topic":"big:c","id":"c","since":since}).to_string(),
    ])
    .await;
    let (mut replayed, mut refused) = (0, None);
    while replayed < 1500 || refused.is_none() {
        let v = c.recv().await;
        if v["id"] == "c" {
            refused = Some(v);
        } else if v["topic"] == "big:a" && v.get("seq").is_some() {
            replayed += 1;
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("recovery_limit"),
        "{refused}"
    );
    eventually("every recovery ended", || async {
        h.metric("herald_recoveries_running").await == 0.0
    })
    .await;
}
