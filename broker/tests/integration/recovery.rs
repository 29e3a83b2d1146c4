//! Recovery under faults: three nodes on `nats-server -js` behind a real
//! HAProxy, a steady HTTP publisher, hundreds of subscribers that reconnect
//! with their last position, and every node restarted in turn (SIGTERM,
//! then SIGKILL). Every subscriber must end with every acknowledged
//! message exactly once, in `seq` order per topic. And a slow consumer cut
//! with 4001 comes back with its position and loses nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::*;

const TOPICS: u64 = 20;

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    ids: Vec<u64>,
    reconnects: usize,
}

/// A subscriber through `url` to `room:*` that reconnects with its last
/// position until it has every id in `done` (the publisher's acknowledged
/// ids, sent once it has stopped). No silence is taken for the end: a
/// subscriber that misses an acknowledged message fails at the deadline.
async fn subscriber(
    url: String,
    ready: Arc<tokio::sync::Semaphore>,
    done: watch::Receiver<Option<Arc<HashSet<u64>>>>,
) -> Result<Seen, String> {
    let mut seen = Seen::default();
    let mut position: Option<(String, u64)> = None;
    let mut last_per_topic: HashMap<String, u64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut first = true;
    let mut have = HashSet::new();
    loop {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("gave up; position {position:?}"));
        }
        let Ok(Ok((mut ws, _))) =
            tokio::time::timeout(Duration::from_secs(2), tokio_tungstenite::connect_async(&url)).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut sub = json!({"op":"sub","topic":"room:*","id":1});
        if let Some((epoch, seq)) = &position {
            sub["since"] = json!({"seq": seq, "epoch": epoch});
        }
        if ws.send(Message::Text(sub.to_string())).await.is_err() {
            continue;
        }
        loop {
            let complete = done
                .borrow()
                .as_ref()
                .is_some_and(|acked| acked.iter().all(|id| have.contains(id)));
            if complete {
                return Ok(seen);
            }
            let next = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
            let text = match next {
                Err(_) => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(format!("gave up waiting; position {position:?}"));
                    }
                    continue;
                }
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            if v["op"] == "ack" {
                if v.get("recovered").is_some() && v["recovered"] != true {
                    return Err(format!("not recovered: {v}"));
                }
                if first {
                    first = false;
                    ready.add_permits(1);
                }
                continue;
            }
            if v["op"] == "error" {
                return Err(format!("error: {v}"));
            }
            let (Some(topic), Some(seq), Some(id)) =
                (v["topic"].as_str(), v["seq"].as_u64(), v["data"]["id"].as_u64())
            else {
                return Err(format!("not a positioned delivery: {v}"));
            };
            let last = last_per_topic.entry(topic.to_owned()).or_default();
            if seq <= *last {
                return Err(format!("{topic}: seq {seq} after {last}"));
            }
            *last = seq;
            let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
            let at = position.as_ref().map_or(0, |p| p.1).max(seq);
            position = Some((epoch, at));
            seen.ids.push(id);
            have.insert(id);
        }
        seen.reconnects += 1;
    }
}

/// Publishes `{"id":i}` on `room:{i % 20}` at about 500 messages a second
/// through `addr` until `stop`; returns the ids answered 200 and the rest.
/// Publishes until told to stop and at least `MIN_ACKED` were answered 200
/// (a busy machine publishes slower; how many is not what is tested),
/// or for two minutes at most.
async fn publisher(addr: SocketAddr, stop: watch::Receiver<bool>) -> (HashSet<u64>, HashSet<u64>) {
    let (mut acked, mut unsure) = (HashSet::new(), HashSet::new());
    let mut next = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    while !(*stop.borrow() && acked.len() >= MIN_ACKED) && tokio::time::Instant::now() < give_up {
        tick.tick().await;
        let ids: Vec<u64> = (next..next + 10).collect();
        next += 10;
        let items: Vec<String> = ids
            .iter()
            .map(|i| format!(r#"{{"topic":"room:{}","data":{{"id":{i}}}}}"#, i % TOPICS))
            .collect();
        let body = format!("[{}]", items.join(","));
        let req = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = tokio::time::timeout(Duration::from_secs(5), http(addr, req.as_bytes())).await;
        match answer {
            Ok((200, _)) => acked.extend(ids),
            _ => unsure.extend(ids),
        }
    }
    (acked, unsure)
}

/// Messages a rolling restart's publisher gets acknowledged at least.
const MIN_ACKED: usize = 2000;

async fn rolling_restart(kill: bool) {
    let nats = NatsServer::start_js().await;
    let args = [
        "--history",
        "room:*=100000",
        "--drain-period",
        "300ms",
        "--max-connections",
        "2000",
    ];
    let mut nodes = nodes(3, &nats.url(), &args);
    wait_linked(&nodes).await;
    let ready_all = |nodes: &[Herald]| {
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        async move {
            for a in addrs {
                eventually("history stream available", || async move {
                    http(a, b"GET /readyz HTTP/1.0\r\n\r\n")
                        .await
                        .1
                        .contains("stream available")
                })
                .await;
            }
        }
    };
    ready_all(&nodes).await;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let lb = Haproxy::start(&addrs).await;
    let lb_addr: SocketAddr = ([127, 0, 0, 1], lb.port).into();

    let (done_tx, done_rx) = watch::channel(None);
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let subscribers = 300;
    let tasks: Vec<_> = (0..subscribers)
        .map(|_| tokio::spawn(subscriber(lb.url(""), ready.clone(), done_rx.clone())))
        .collect();
    let _all = tokio::time::timeout(Duration::from_secs(60), ready.acquire_many(subscribers as u32))
        .await
        .expect("subscribers subscribed");
    let (stop_tx, stop_rx) = watch::channel(false);
    let publishing = tokio::spawn(publisher(lb_addr, stop_rx));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarts = Arc::new(Mutex::new(Vec::new()));
    for i in 0..nodes.len() {
        let addr = nodes[i].addr;
        if kill {
            nodes[i].sigkill();
        } else {
            nodes[i].sigterm();
            let status = tokio::time::timeout(Duration::from_secs(20), nodes[i].wait_exit())
                .await
                .expect("drained");
            assert!(status.success(), "clean exit after SIGTERM: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let url = nats.url();
        let mut a = vec!["--nats", url.as_str()];
        a.extend_from_slice(&args);
        nodes[i] = Herald::start_on(addr, &a);
        wait_linked(&nodes[i..=i]).await;
        ready_all(&nodes[i..=i]).await;
        restarts.lock().unwrap().push(i);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop_tx.send_replace(true);
    let (acked, unsure) = publishing.await.expect("publisher");
    done_tx.send_replace(Some(Arc::new(acked.clone())));
    assert!(acked.len() >= MIN_ACKED, "published {} acknowledged", acked.len());
    let mut reconnects = 0;
    for t in tasks {
        let seen = t
            .await
            .expect("subscriber task")
            .unwrap_or_else(|e| panic!("subscriber: {e}"));
        reconnects += seen.reconnects;
        let mut once = HashSet::new();
        for id in &seen.ids {
            assert!(once.insert(*id), "id {id} delivered twice");
            assert!(
                acked.contains(id) || unsure.contains(id),
                "id {id} never published"
            );
        }
        let missing: Vec<_> = acked.iter().filter(|id| !once.contains(id)).take(10).collect();
        assert!(missing.is_empty(), "acknowledged ids missing, e.g. {missing:?}");
    }
    // Each restart cut a third of the sockets.
    assert!(reconnects >= subscribers, "only {reconnects} reconnects");
    eprintln!(
        "rolling {}: {} acknowledged, {} unsure, {reconnects} reconnects, every subscriber complete",
        if kill { "SIGKILL" } else { "SIGTERM" },
        acked.len(),
        unsure.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_for_recovering_subscribers() {
    rolling_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_node_in_turn_loses_nothing_for_recovering_subscribers() {
    rolling_restart(true).await;
}

#[tokio::test]
async fn a_slow_consumer_cut_with_4001_recovers_everything() {
    let h = Herald::start(&["--history", "feed:*=100000", "--max-queue-bytes", "32768"]);
    let mut c = h.connect("").await;
    c.sub("feed:a").await;
    h.publish("feed:a", r#"{"n":0}"#).await;
    let first = c.recv().await;
    let (epoch, mut seq) = (
        first["epoch"].as_str().unwrap().to_owned(),
        first["seq"].as_u64().unwrap(),
    );
    // Stop reading; the burst overflows the queue and the node cuts us.
    let pad = "y".repeat(5000);
    for start in (1..3001).step_by(20) {
        let items: Vec<String> = (start..start + 20)
            .map(|n| format!(r#"{{"topic":"feed:a","data":{{"n":{n},"pad":"{pad}"}}}}"#))
            .collect();
        h.post("/v1/publish", "", &format!("[{}]", items.join(","))).await;
    }
    let mut next = 1;
    // Read again: whatever arrived before the cut counts.
    loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await.expect("close") {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["data"]["n"], next);
                next += 1;
                seq = v["seq"].as_u64().unwrap();
            }
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4001, "{f:?}");
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(next < 3001, "the queue bound cut the socket before the end");
    let mut c = h.connect("").await;
    let ack = c
        .request(json!({"op":"sub","topic":"feed:a","id":1,"since":{"seq":seq,"epoch":epoch}}))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    while next < 3001 {
        let v = c.recv().await;
        assert_eq!(v["data"]["n"], next);
        next += 1;
    }
    assert_eq!(h.metric("herald_slow_consumer_disconnects_total").await, 1.0);
}
