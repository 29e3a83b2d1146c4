//! The embedded history's bounds under hostile load: what it holds costs
//! its real memory against `--history-bytes`, and a recovery reads only
//! the topics its pattern can match, however many the node holds.

use serde_json::json;

use crate::common::*;
use crate::history::rss;

/// Publishes `count` one-byte values over HTTP, a thousand per request, on
/// the topics `topic(i)` gives.
async fn flood(h: &Herald, count: usize, topic: impl Fn(usize) -> String) {
    for start in (0..count).step_by(1000) {
        let items: Vec<String> = (start..(start + 1000).min(count))
            .map(|i| format!(r#"{{"topic":"{}","data":{}}}"#, topic(i), i % 10))
            .collect();
        let (status, body) = h.post("/v1/publish", "", &format!("[{}]", items.join(","))).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Room for what the process allocates besides the history while it is
/// flooded (request buffers, allocator arenas): a fixed few MB, not a
/// share of what is published.
const BASELINE: u64 = 8 << 20;

/// 200,000 distinct history topics, then 300,000 one-byte messages on one
/// topic, under `--history-bytes 2000000`: the node grows by about the cap,
/// not by what the rings, the topic index and each entry's allocations cost
/// beside the data (when only data counted, +86 MB and +30 MB). The oldest
/// messages, and with them the oldest topics, go to make room, so the cap
/// bounds the number of topics too; the gauges say what is held.
#[tokio::test]
async fn history_memory_stays_within_its_cap_however_many_topics() {
    let cap = 2_000_000;
    let h = Herald::start(&["--history", "t:>=10", "--history-bytes", "2000000"]);
    // The HTTP path's own buffers, before measuring.
    flood(&h, 20_000, |i| format!("plain:{i}")).await;
    let before = rss(h.pid());
    flood(&h, 200_000, |i| format!("t:{i}")).await;
    let grown = rss(h.pid()).saturating_sub(before);
    assert!(
        grown < cap + BASELINE,
        "200,000 topics grew RSS by {} KB under a {} KB cap",
        grown >> 10,
        cap >> 10
    );
    flood(&h, 300_000, |_| "t:one".into()).await;
    let grown = rss(h.pid()).saturating_sub(before);
    assert!(
        grown < cap + BASELINE,
        "then 300,000 one-byte messages: RSS grew by {} KB under a {} KB cap",
        grown >> 10,
        cap >> 10
    );
    let held = h.metric("herald_history_bytes").await;
    assert!(held > 0.0 && held <= cap as f64, "herald_history_bytes {held}");
    let topics = h.metric("herald_history_topics").await;
    assert!(
        (1.0..200_000.0).contains(&topics),
        "the cap bounds topics: {topics} held"
    );
    // The newest survive: the last topic flooded still has its value.
    let (status, body) = h.get("/v1/history?topic=t:one&since=0&limit=1").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"seq\""), "{body}");
}

/// Recovering one concrete topic reads its ring alone, and a wildcard reads
/// the rings it matches, with 100,000 other history topics held (each
/// recovery scanned every topic, under the journal's lock).
#[tokio::test]
async fn a_recovery_reads_only_the_topics_its_pattern_matches() {
    let h = Herald::start(&["--history", ">=10"]);
    flood(&h, 100_000, |i| format!("t:{i}")).await;
    flood(&h, 30, |i| format!("room:{}:x", i % 10)).await;
    flood(&h, 5, |i| format!("room:{i}-1:x")).await;
    let mut c = h.connect("").await;
    c.sub("room:3:x").await;
    h.publish("room:3:x", "1").await;
    let v = c.recv().await;
    let (epoch, seq) = (
        v["epoch"].as_str().unwrap().to_owned(),
        v["seq"].as_u64().unwrap(),
    );
    let read = || h.metric("herald_history_rings_read_total");
    let since = |pattern: &str, seq: u64| json!({"op":"sub","topic":pattern,"id":pattern,"since":{"seq":seq,"epoch":epoch}});
    let mut d = h.connect("").await;
    let before = read().await;
    let ack = d.request(since("room:3:x", seq - 1)).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(d.recv().await["seq"], seq);
    assert_eq!(read().await - before, 1.0, "a concrete topic is one lookup");
    // A wildcard: the ten room:N:x topics and the five room:N-1:x ones.
    let before = read().await;
    let ack = d.request(since("room:*:x", seq)).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(read().await - before, 15.0, "a wildcard reads what it matches");
    let before = read().await;
    let ack = d
        .request(json!({"op":"sub","topic":"room:>","id":"l","last":true}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    for _ in 0..15 {
        assert!(d.recv().await["topic"].as_str().unwrap().starts_with("room:"));
    }
    assert_eq!(read().await - before, 15.0);
    // A page of one topic, the same.
    let before = read().await;
    let (status, body) = h.get("/v1/history?topic=t:77&since=0").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(read().await - before, 1.0);
}
