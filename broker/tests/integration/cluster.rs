//! NATS-linked nodes behind a real HAProxy, with real `nats-server`s.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::external::*;

pub fn nodes(n: usize, nats: &str, extra: &[&str]) -> Vec<Herald> {
    (0..n)
        .map(|_| {
            let mut args = vec!["--nats", nats];
            args.extend_from_slice(extra);
            Herald::start(&args)
        })
        .collect()
}

pub async fn wait_linked(nodes: &[Herald]) {
    for n in nodes {
        eventually("node linked to NATS", || async {
            n.metric("herald_nats_connected").await == 1.0
        })
        .await;
    }
}

/// Waits until a message published on `via` reaches `client`: publishes
/// probes on `probe` (which the client must hold) until one arrives.
async fn until_routed(via: &Herald, client: &mut Client) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // While a link fails over a publish may be refused: keep probing.
        via.post("/v1/publish", "", r#"{"topic":"probe","data":"probe"}"#)
            .await;
        let got = tokio::time::timeout(Duration::from_millis(200), client.recv()).await;
        if let Ok(v) = got {
            if v["topic"] == "probe" {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages never crossed nodes"
        );
    }
}

/// Reads deliveries on `room` until every value in `expected` arrived,
/// returning how often each did (probes are skipped).
async fn collect(client: &mut Client, expected: &[Value]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    while !expected.iter().all(|e| seen.contains_key(&e.to_string())) {
        let v = client.recv().await;
        if v["topic"] == "room" {
            *seen.entry(v["data"].to_string()).or_default() += 1;
        }
    }
    seen
}

async fn total(nodes: &[Herald], metric: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += n.metric(metric).await;
    }
    sum
}

#[tokio::test]
async fn three_nodes_behind_haproxy_deliver_exactly_once() {
    let nats = NatsServer::start().await;
    let nodes = nodes(3, &nats.url(), &[]);
    wait_linked(&nodes).await;
    let lb = Haproxy::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&lb.url("sub=room&sub=probe")).await);
    }
    // Round robin put one client on each node.
    for n in &nodes {
        assert_eq!(n.metric("herald_connections").await, 1.0);
    }
    // Each node holds two subjects: NATS has all six subscriptions.
    eventually("subscriptions on NATS", || async {
        nats.monitor("/subsz").await["num_subscriptions"].as_u64() >= Some(6)
    })
    .await;
    for (i, c) in clients.iter_mut().enumerate() {
        c.publish("room", json!(i)).await;
    }
    nodes[1].publish("room", "\"http\"").await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    nc.publish("herald.room", "{\"from\":\"nats\"}".into())
        .await
        .unwrap();
    nc.publish("herald.room", "plain text".into()).await.unwrap();
    nc.flush().await.unwrap();
    let expected = [
        json!(0),
        json!(1),
        json!(2),
        json!("http"),
        json!({"from":"nats"}),
        json!("plain text"),
    ];
    for c in clients.iter_mut() {
        let seen = collect(c, &expected).await;
        for e in &expected {
            assert_eq!(seen.get(&e.to_string()), Some(&1), "{e} in {seen:?}");
        }
    }
    // Every socket got every message exactly once: 3 sockets x 6 messages.
    eventually("deliveries settle", || async {
        total(&nodes, "herald_deliveries_total").await >= 18.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(&nodes, "herald_deliveries_total").await, 18.0);
    // What clients publish is visible to plain NATS subscribers.
    let mut watch = nc.subscribe("herald.room").await.unwrap();
    nc.flush().await.unwrap();
    eventually("watcher registered", || async {
        nats.monitor("/subsz").await["num_subscriptions"].as_u64() >= Some(7)
    })
    .await;
    clients[0].publish("room", json!({"seen":"by nats"})).await;
    let m = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut watch))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], br#"{"seen":"by nats"}"#);
}

#[tokio::test]
async fn join_and_leave_reach_every_node() {
    let nats = NatsServer::start().await;
    let nodes = nodes(2, &nats.url(), &["--presence", "chat:*"]);
    wait_linked(&nodes).await;
    let mut ann = nodes[0].connect("sub=chat:lobby&sub=probe&name=ann").await;
    assert_eq!(ann.recv().await["event"], "join");
    until_routed(&nodes[1], &mut ann).await;
    let bob = nodes[1].connect("sub=chat:lobby&name=bob").await;
    let j = ann.recv().await;
    assert_eq!(
        (j["event"].as_str(), j["name"].as_str()),
        (Some("join"), Some("bob"))
    );
    let bob_id = j["client"].as_str().unwrap().to_owned();
    drop(bob);
    let l = ann.recv().await;
    assert_eq!(l["event"], "leave");
    assert_eq!(l["client"], bob_id.as_str());
}

#[tokio::test]
async fn losing_one_server_of_a_nats_cluster_keeps_nodes_linked() {
    let cluster = nats_cluster().await;
    let urls: Vec<String> = cluster.iter().map(|s| s.url()).collect();
    let urls = urls.join(",");
    let mut nodes = nodes(2, &urls, &[]);
    wait_linked(&nodes).await;
    let mut b = nodes[1].connect("sub=room&sub=probe").await;
    until_routed(&nodes[0], &mut b).await;
    // Kill a NATS server that holds at least one node's link.
    let mut victim = None;
    for (i, s) in cluster.iter().enumerate() {
        if s.connections().await > 0 {
            victim = Some(i);
            break;
        }
    }
    let mut cluster = cluster;
    cluster[victim.expect("a server with connections")].kill();
    // Cross-node delivery resumes by itself once the link fails over.
    until_routed(&nodes[0], &mut b).await;
    nodes[0].publish("room", "\"after failover\"").await;
    let seen = collect(&mut b, &[json!("after failover")]).await;
    assert_eq!(seen.get("\"after failover\""), Some(&1));
    for n in nodes.iter_mut() {
        assert!(n.is_running());
    }
}

#[tokio::test]
async fn nats_down_keeps_local_delivery_and_recovers_without_restarts() {
    let mut nats = NatsServer::start().await;
    let nodes = nodes(2, &nats.url(), &[]);
    wait_linked(&nodes).await;
    let mut a = nodes[0].connect("sub=room&sub=probe").await;
    let mut b = nodes[1].connect("sub=room&sub=probe").await;
    until_routed(&nodes[0], &mut b).await;
    nats.kill();
    eventually("link seen down", || async {
        nodes[0].get("/readyz").await.1.contains("nats: disconnected")
    })
    .await;
    assert_eq!(nodes[0].metric("herald_nats_connected").await, 0.0);
    // Local delivery continues; the publisher is told the cluster missed it.
    let (status, body) = nodes[0]
        .post("/v1/publish", "", r#"{"topic":"room","data":"local"}"#)
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("publish_failed") && body.contains("this node only"),
        "{body}"
    );
    let v = a
        .request(json!({"op":"pub","topic":"room","data":"ws local","id":7}))
        .await;
    assert_eq!(v["code"], "publish_failed", "{v}");
    let seen = collect(&mut a, &[json!("local"), json!("ws local")]).await;
    assert_eq!(seen.len(), 2);
    assert!(nodes[0].metric("herald_nats_publish_failures_total").await >= 2.0);
    // NATS returns on the same port: the nodes reconnect and re-subscribe.
    nats.restart().await;
    wait_linked(&nodes).await;
    until_routed(&nodes[0], &mut b).await;
    until_routed(&nodes[1], &mut a).await;
    nodes[0].publish("room", "\"back\"").await;
    assert_eq!(collect(&mut b, &[json!("back")]).await.get("\"back\""), Some(&1));
    assert!(nodes[0].metric("herald_nats_connects_total").await >= 2.0);
}

#[tokio::test]
async fn sigterm_moves_clients_to_the_other_nodes() {
    let nats = NatsServer::start().await;
    let mut nodes = nodes(3, &nats.url(), &["--drain-period", "300ms"]);
    wait_linked(&nodes).await;
    let lb = Haproxy::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&lb.url("sub=room")).await);
    }
    assert_eq!(nodes[0].metric("herald_connections").await, 1.0);
    nodes[0].sigterm();
    // Exactly one client (the one on node 0) is told to go away.
    let mut moved = None;
    for (i, c) in clients.iter_mut().enumerate() {
        if let Ok((code, reason)) = tokio::time::timeout(Duration::from_secs(3), c.recv_close()).await {
            assert_eq!(code, 1001, "{reason}");
            assert!(moved.replace(i).is_none(), "two clients closed");
        }
    }
    let moved = moved.expect("no client received 1001");
    assert!(nodes[0].wait_exit().await.success());
    // It reconnects through the load balancer and lands on a live node.
    clients[moved] = Client::connect(&lb.url("sub=room&sub=probe")).await;
    until_routed(&nodes[1], &mut clients[moved]).await;
    until_routed(&nodes[2], &mut clients[moved]).await;
    nodes[2].publish("room", "\"welcome back\"").await;
    let seen = collect(&mut clients[moved], &[json!("welcome back")]).await;
    assert_eq!(seen.get("\"welcome back\""), Some(&1));
}

#[tokio::test]
async fn a_node_without_subscribers_gets_no_traffic_for_a_topic() {
    let nats = NatsServer::start().await;
    let nodes = nodes(3, &nats.url(), &[]);
    wait_linked(&nodes).await;
    let mut b = nodes[1].connect("sub=room&sub=probe").await;
    let _c = nodes[2].connect("sub=elsewhere").await;
    until_routed(&nodes[0], &mut b).await;
    let before = nodes[2].metric("herald_nats_messages_in_total").await;
    for i in 0..20 {
        nodes[0].publish("room", &i.to_string()).await;
    }
    let expected: Vec<Value> = (0..20).map(|i| json!(i)).collect();
    collect(&mut b, &expected).await;
    // Node 2 holds only `elsewhere`: it received none of it.
    assert_eq!(nodes[2].metric("herald_nats_messages_in_total").await, before);
    assert_eq!(nodes[2].metric("herald_nats_subscriptions").await, 1.0);
    // And NATS agrees: only node 1 holds herald.room.
    let connz = nats.monitor("/connz?subs=1").await;
    let holders = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["subscriptions_list"]
                .as_array()
                .is_some_and(|l| l.iter().any(|s| s == "herald.room"))
        })
        .count();
    assert_eq!(holders, 1);
    // When the last subscriber leaves, the subject is dropped.
    drop(b);
    eventually("subject dropped", || async {
        nodes[1].metric("herald_nats_subscriptions").await == 0.0
    })
    .await;
}

/// docs/protocol.md promises that a `sub` (and a URL `?sub=`) is in effect
/// before its ack (before the 101). Each trial publishes from the other
/// node right after the ack, never waiting for routing, on a topic no node
/// held before, so each trial needs a new NATS subscription.
#[tokio::test]
async fn a_sub_is_in_effect_on_every_node_before_its_ack() {
    let nats = NatsServer::start().await;
    let nodes = nodes(
        2,
        &nats.url(),
        &["--max-subscriptions", "1000", "--subscribe-rate", "0"],
    );
    wait_linked(&nodes).await;
    let mut c = nodes[0].connect("").await;
    for i in 0..300 {
        let topic = format!("fresh:s{i}");
        c.sub(&topic).await;
        nodes[1].publish(&topic, &i.to_string()).await;
        let v = c.recv().await;
        assert_eq!(
            (v["topic"].as_str(), v["data"].as_i64()),
            (Some(topic.as_str()), Some(i))
        );
    }
    for i in 0..100 {
        let topic = format!("fresh:u{i}");
        let mut c = nodes[0].connect(&format!("sub={topic}")).await;
        nodes[1].publish(&topic, &i.to_string()).await;
        let v = c.recv().await;
        assert_eq!(
            (v["topic"].as_str(), v["data"].as_i64()),
            (Some(topic.as_str()), Some(i))
        );
    }
}

/// A raw-mode text grows when escaped into a JSON string: the size limit
/// applies to what every node would deliver, so a message too big for the
/// other nodes reaches nobody, and the publisher is told.
#[tokio::test]
async fn a_raw_publish_too_big_once_escaped_reaches_nobody() {
    let nats = NatsServer::start().await;
    let nodes = nodes(2, &nats.url(), &["--max-message-bytes", "100"]);
    wait_linked(&nodes).await;
    let mut local = nodes[0].connect("sub=chat:lobby&sub=probe").await;
    let mut remote = nodes[1].connect("sub=chat:lobby&sub=probe").await;
    until_routed(&nodes[0], &mut remote).await;
    let mut raw = nodes[0].connect("topic=chat:lobby&format=raw").await;
    raw.send("\"".repeat(60)).await;
    let err = raw.recv().await;
    assert_eq!(err["code"], "message_too_big", "{err}");
    raw.send("ok").await;
    for c in [&mut local, &mut remote] {
        loop {
            let v = c.recv().await;
            if v["topic"] == "chat:lobby" {
                assert_eq!(v["data"], "ok", "the oversized message was delivered: {v}");
                break;
            }
        }
    }
}

/// SIGTERM in the middle of a stream of HTTP publishes: every publish that
/// was answered 200 reaches a subscriber on another node.
#[tokio::test]
async fn shutdown_loses_no_publish_that_was_answered() {
    let nats = NatsServer::start().await;
    let mut nodes = nodes(2, &nats.url(), &["--drain-period", "0s", "--publish-rate", "0"]);
    wait_linked(&nodes).await;
    let mut sub = nodes[1].connect("sub=stream&sub=probe").await;
    until_routed(&nodes[0], &mut sub).await;
    let addr = nodes[0].addr;
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let mut publishers = Vec::new();
    for p in 0..4i64 {
        let answered = answered.clone();
        publishers.push(tokio::spawn(async move {
            for batch in 0i64.. {
                let ids: Vec<i64> = (0..200).map(|k| (p * 1_000_000) + batch * 200 + k).collect();
                let items: Vec<String> = ids
                    .iter()
                    .map(|id| format!(r#"{{"topic":"stream","data":{id}}}"#))
                    .collect();
                let body = format!("[{}]", items.join(","));
                let req = format!(
                    "POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let Ok(Ok(mut s)) = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await else {
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                if s.write_all(req.as_bytes()).await.is_err() {
                    return;
                }
                let mut out = Vec::new();
                let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
                if out.starts_with(b"HTTP/1.1 200") {
                    answered.lock().unwrap().extend(ids);
                } else if out.is_empty() {
                    return;
                }
            }
        }));
    }
    // Let the stream run, then stop the node under it.
    eventually("publishes flowing", || async {
        answered.lock().unwrap().len() > 5_000
    })
    .await;
    nodes[0].sigterm();
    nodes[0].wait_exit().await;
    for p in publishers {
        p.await.expect("publisher");
    }
    let want: std::collections::HashSet<i64> = answered.lock().unwrap().iter().copied().collect();
    let mut got = std::collections::HashSet::new();
    while !want.is_subset(&got) {
        let v = sub.recv().await;
        if v["topic"] == "stream" {
            got.insert(v["data"].as_i64().expect("id"));
        }
    }
}

/// A node configured for a cluster whose NATS link never came up is not
/// ready (it would split the cluster silently behind a load balancer); once
/// linked it is, and a later loss of the link keeps it ready.
#[tokio::test]
async fn readiness_waits_for_the_first_link() {
    let mut nats = NatsServer::start().await;
    nats.kill();
    let node = Herald::start(&["--nats", &nats.url()]);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("never connected"), "{body}");
    nats.restart().await;
    eventually("ready once linked", || async {
        node.get("/readyz").await.0 == 200
    })
    .await;
    nats.kill();
    eventually("link lost", || async {
        node.get("/readyz").await.1.contains("disconnected")
    })
    .await;
    assert_eq!(
        node.get("/readyz").await.0,
        200,
        "a node that lost its link still serves"
    );
}

/// A socket that holds `tN:lobby` (or, every other trial, `tN:>`) and adds
/// `tN:*` while another node publishes a numbered burst on `tN:lobby`
/// receives every message once, in order: the topic keeps arriving through
/// the subscription it already had, with no gap and no duplicate at the
/// seam. (Before the fix, the new wildcard took the topic over before its
/// subject was live, and messages fell in between.)
#[tokio::test]
async fn adding_a_wildcard_over_a_held_topic_loses_nothing() {
    let nats = NatsServer::start().await;
    let ns = nodes(2, &nats.url(), &["--publish-rate", "0"]);
    wait_linked(&ns).await;
    const N: u64 = 150;
    for trial in 0..12 {
        let topic = format!("t{trial}:lobby");
        let held = if trial % 2 == 0 {
            topic.clone()
        } else {
            format!("t{trial}:%3E")
        };
        let mut c = Client::connect(&ns[0].url(&format!("sub={held}"))).await;
        let publisher = {
            let addr = ns[1].addr;
            let topic = topic.clone();
            tokio::spawn(async move {
                for seq in 0..N {
                    let body = format!(r#"{{"topic":"{topic}","data":{seq}}}"#);
                    let req = format!(
                        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let (status, text) = http(addr, req.as_bytes()).await;
                    assert_eq!(status, 200, "{text}");
                }
            })
        };
        // Somewhere in the burst, add the wildcard and wait for its ack.
        tokio::time::sleep(Duration::from_millis(5 * (trial % 4))).await;
        let ack = c
            .request(json!({"op":"sub","topic":format!("t{trial}:*"),"id":"w"}))
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        publisher.await.unwrap();
        let mut got = Vec::new();
        while got.last() != Some(&(N - 1)) {
            let v = c.recv().await;
            got.push(v["data"].as_u64().unwrap());
        }
        let want: Vec<u64> = (0..N).collect();
        assert_eq!(got, want, "trial {trial}: every message once, in order");
    }
}

/// Defect 3's other side: a socket holding an older subscription and a
/// newer one that overlaps it drops the older while a backend publishes
/// on NATS as fast as it can. The older subscription carried the topic;
/// the newer one must take over with every message once, in order.
#[tokio::test]
async fn dropping_the_older_of_two_overlapping_subscriptions_loses_nothing() {
    let nats = NatsServer::start().await;
    let ns = nodes(1, &nats.url(), &[]);
    wait_linked(&ns).await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    const N: u64 = 3000;
    for trial in 0..12u64 {
        let topic = format!("t{trial}:lobby");
        let older = if trial % 2 == 0 {
            topic.clone()
        } else {
            format!("t{trial}:>")
        };
        let mut c = ns[0].connect("").await;
        for (id, p) in [("a", older.clone()), ("b", format!("t{trial}:*"))] {
            let ack = c.request(json!({"op":"sub","topic":p,"id":id})).await;
            assert_eq!(ack["op"], "ack", "{ack}");
        }
        let publisher = {
            let (nc, subject) = (nc.clone(), format!("herald.t{trial}.lobby"));
            tokio::spawn(async move {
                for seq in 0..N {
                    nc.publish(subject.clone(), seq.to_string().into()).await.unwrap();
                    if seq % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                nc.flush().await.unwrap();
            })
        };
        // Somewhere in the burst, drop the older subscription.
        tokio::time::sleep(Duration::from_millis(1 + 3 * (trial % 4))).await;
        let ack = c.request(json!({"op":"unsub","topic":older,"id":"u"})).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        publisher.await.unwrap();
        let mut got = Vec::new();
        while got.last() != Some(&(N - 1)) {
            let v = c.recv().await;
            got.push(v["data"].as_u64().unwrap());
        }
        let want: Vec<u64> = (0..N).collect();
        let missing: Vec<u64> = want.iter().copied().filter(|n| !got.contains(n)).collect();
        assert_eq!(got.len() as u64, N, "trial {trial}: missing {missing:?}");
        assert_eq!(got, want, "trial {trial}: every message once, in order");
    }
}

/// A subscription kept as a carrier after its unsub delivers only what a
/// live subscription of the socket still wants, comes back in place on a
/// new `sub`, and goes (with its NATS subject) once nothing overlaps it.
#[tokio::test]
async fn a_retired_subscription_carries_only_what_is_still_wanted() {
    let nats = NatsServer::start().await;
    let ns = nodes(2, &nats.url(), &[]);
    wait_linked(&ns).await;
    let node = &ns[0];
    let mut c = node.connect("").await;
    c.sub("r:>").await;
    c.sub("r:*").await;
    let base = node.metric("herald_nats_subscriptions").await;
    let ack = c.request(json!({"op":"unsub","topic":"r:>","id":"u"})).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(node.metric("herald_subscriptions").await, 1.0);
    // `r:>` still carries `r:a` (its subject stays), but `r:a:b` is no
    // longer wanted: published first, it must not arrive.
    assert_eq!(node.metric("herald_nats_subscriptions").await, base);
    ns[1].publish("r:a:b", "1").await;
    ns[1].publish("r:a", "2").await;
    let v = c.recv().await;
    assert_eq!(
        (v["topic"].as_str(), v["data"].as_u64()),
        (Some("r:a"), Some(2)),
        "{v}"
    );
    // A new `sub` to it makes it live again: `r:a:b` arrives.
    c.sub("r:>").await;
    assert_eq!(node.metric("herald_subscriptions").await, 2.0);
    ns[1].publish("r:a:b", "3").await;
    let v = c.recv().await;
    assert_eq!(
        (v["topic"].as_str(), v["data"].as_u64()),
        (Some("r:a:b"), Some(3)),
        "{v}"
    );
    // Retired again, then the newer one goes: both leave, and the node
    // drops both subjects.
    let ack = c.request(json!({"op":"unsub","topic":"r:>","id":"u2"})).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let ack = c.request(json!({"op":"unsub","topic":"r:*","id":"u3"})).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(node.metric("herald_subscriptions").await, 0.0);
    eventually("both subjects dropped", || async {
        node.metric("herald_nats_subscriptions").await == base - 2.0
    })
    .await;
    // Neither is held: a second unsub is refused, and nothing arrives.
    let err = c.request(json!({"op":"unsub","topic":"r:>","id":"u4"})).await;
    assert_eq!(err["op"], "error", "{err}");
    ns[1].publish("r:a", "4").await;
    c.sub("probe").await;
    ns[1].publish("probe", "5").await;
    let v = c.recv().await;
    assert_eq!(v["topic"], "probe", "{v}");
}

/// What a plain NATS client sends reaches sockets intact and in order
/// through the node's own reader: sizes from empty to half a megabyte
/// (split across many reads), with a reply subject, with headers, and
/// pipelined back to back.
#[tokio::test]
async fn the_link_reads_every_message_shape_nats_sends() {
    let nats = NatsServer::start().await;
    let ns = nodes(1, &nats.url(), &["--max-message-bytes", "1000000"]);
    wait_linked(&ns).await;
    let mut c = ns[0].connect("sub=shapes").await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let sizes: Vec<usize> = (0..60).map(|i| if i == 0 { 0 } else { 1 << (i % 20) }).collect();
    for (i, n) in sizes.iter().enumerate() {
        let body = format!("[{i},\"{}\"]", "x".repeat(*n));
        match i % 3 {
            0 => nc.publish("herald.shapes", body.into()).await.unwrap(),
            1 => nc
                .publish_with_reply("herald.shapes", "reply.to", body.into())
                .await
                .unwrap(),
            _ => {
                let mut h = async_nats::HeaderMap::new();
                h.insert("X-Other", "kept out of the data");
                nc.publish_with_headers("herald.shapes", h, body.into())
                    .await
                    .unwrap()
            }
        }
    }
    nc.flush().await.unwrap();
    for (i, n) in sizes.iter().enumerate() {
        let v = c.recv().await;
        assert_eq!(v["topic"], "shapes");
        assert_eq!(v["data"][0], i, "in order");
        assert_eq!(
            v["data"][1].as_str().map(str::len),
            Some(*n),
            "message {i} intact"
        );
    }
}
