//! `--raw-status`: the classic chat server's status 1 on every object, and
//! the last object again with status 0 when a raw socket goes, whatever
//! the reason, once, on every node; from a survivor when a node dies.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{nodes, wait_linked};
use crate::common::*;
use crate::external::NatsServer;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(addr: std::net::SocketAddr) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{addr}"))
        .await
        .expect("connect")
        .0
}

async fn text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return t,
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

/// Texts until `marker`, which is sent by `from` after `before` ran.
async fn until_marker(ws: &mut Ws, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let t = text(ws).await;
        if t == marker {
            return seen;
        }
        seen.push(t);
    }
}

fn json(t: &str) -> Value {
    serde_json::from_str(t).unwrap_or(Value::Null)
}

#[tokio::test]
async fn status_one_on_objects_and_the_last_again_with_status_zero() {
    let h = Herald::start(&["--root-topic", "chat:lobby", "--raw-status", "chat:*"]);
    let mut ann = raw(h.addr).await;
    let mut bob = raw(h.addr).await;
    ann.send(Message::Text(r#"{"user":"ann","text":"hi","status":5}"#.into()))
        .await
        .unwrap();
    let v = json(&text(&mut bob).await);
    assert_eq!(
        (v["user"].as_str(), v["text"].as_str(), v["status"].as_u64()),
        (Some("ann"), Some("hi"), Some(1))
    );
    ann.send(Message::Text(r#"{"user":"ann","text":"bye"}"#.into()))
        .await
        .unwrap();
    ann.send(Message::Text("plain words".into())).await.unwrap();
    ann.send(Message::Text("[1,2]".into())).await.unwrap();
    assert_eq!(json(&text(&mut bob).await)["text"], "bye");
    assert_eq!(text(&mut bob).await, "plain words", "not an object: as sent");
    assert_eq!(text(&mut bob).await, "[1,2]");
    // A socket that never published leaves nothing behind.
    let quiet = raw(h.addr).await;
    drop(quiet);
    // Ann closes: her last object, status 0, once.
    ann.close(None).await.unwrap();
    let v = json(&text(&mut bob).await);
    assert_eq!(
        (v["text"].as_str(), v["status"].as_u64()),
        (Some("bye"), Some(0)),
        "{v}"
    );
    // Lost without a close frame: the same.
    let mut cy = raw(h.addr).await;
    cy.send(Message::Text(r#"{"user":"cy","text":"x"}"#.into()))
        .await
        .unwrap();
    assert_eq!(json(&text(&mut bob).await)["user"], "cy");
    drop(cy);
    let v = json(&text(&mut bob).await);
    assert_eq!(
        (v["user"].as_str(), v["status"].as_u64()),
        (Some("cy"), Some(0)),
        "{v}"
    );
    bob.send(Message::Text("marker".into())).await.unwrap();
    let extra = until_marker(&mut bob, "marker").await;
    assert!(
        extra.is_empty(),
        "exactly once, nothing from the quiet socket: {extra:?}"
    );
}

/// In a cluster the leave reaches every node once; when the socket's node
/// dies, a survivor publishes it after the presence TTL.
#[tokio::test]
async fn across_nodes_and_after_a_node_dies() {
    let nats = NatsServer::start().await;
    let args = [
        "--root-topic",
        "chat:lobby",
        "--raw-status",
        "chat:*",
        "--presence",
        "chat:*",
        "--presence-ttl",
        "2s",
    ];
    let mut ns = nodes(3, &nats.url(), &args);
    wait_linked(&ns).await;
    let mut watch0 = raw(ns[0].addr).await;
    let mut watch1 = raw(ns[1].addr).await;
    let mut ann = raw(ns[2].addr).await;
    ann.send(Message::Text(r#"{"user":"ann","text":"hi"}"#.into()))
        .await
        .unwrap();
    for w in [&mut watch0, &mut watch1] {
        assert_eq!(json(&text(w).await)["status"], 1);
    }
    // Let a presence snapshot carry ann's last object to the others.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ns[2].sigkill();
    for w in [&mut watch0, &mut watch1] {
        let v = json(&text(w).await);
        assert_eq!(
            (v["user"].as_str(), v["status"].as_u64()),
            (Some("ann"), Some(0)),
            "{v}"
        );
    }
    watch0.send(Message::Text("marker".into())).await.unwrap();
    for w in [&mut watch0, &mut watch1] {
        let extra = until_marker(w, "marker").await;
        assert!(extra.is_empty(), "once, from one survivor: {extra:?}");
    }
}

/// A node's presence snapshot is cut into parts that each fit the NATS
/// server's real `max_payload` (1 MB by default), however big the members'
/// raw-status objects: 24 raw sockets holding 60 KB objects each (1.4 MB in
/// all) never get the node's topic link cut, so no message between the
/// nodes is lost and no false leave reaches the other node's sockets.
#[tokio::test]
async fn snapshot_parts_fit_the_servers_max_payload() {
    let nats = NatsServer::start().await;
    let args = [
        "--root-topic",
        "chat:lobby",
        "--raw-status",
        "chat:*",
        "--presence-ttl",
        "1s",
    ];
    let ns = nodes(2, &nats.url(), &args);
    wait_linked(&ns).await;
    let mut watch = raw(ns[1].addr).await;
    let mut held = Vec::new();
    let big = "x".repeat(60_000);
    for i in 0..24 {
        let mut ws = raw(ns[0].addr).await;
        ws.send(Message::Text(format!(r#"{{"user":"u{i}","text":"{big}"}}"#)))
            .await
            .unwrap();
        assert_eq!(json(&text(&mut watch).await)["status"], 1, "object {i}");
        held.push(ws);
    }
    // Several snapshot rounds (every ttl/3) go by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ns[0].metric("herald_nats_connects_total").await,
        1.0,
        "node 0's topic link was cut and made again"
    );
    // Nothing was lost between the nodes, and node 1's socket heard of no
    // leave (a status 0) while every sender is still there.
    held[0]
        .send(Message::Text(r#"{"user":"u0","text":"marker"}"#.into()))
        .await
        .unwrap();
    loop {
        let v = json(&text(&mut watch).await);
        assert_ne!(
            v["status"],
            0,
            "a false leave: {}",
            &v.to_string()[..80.min(v.to_string().len())]
        );
        if v["text"] == "marker" {
            break;
        }
    }
}

/// Only an object that was published is remembered: one refused (too big,
/// or over `--publish-rate`) is not what goes out with status 0 at leave,
/// and nothing over `--max-message-bytes` ever does.
#[tokio::test]
async fn a_refused_object_is_not_the_one_published_at_leave() {
    let limit = 1024;
    let h = Herald::start(&[
        "--root-topic",
        "chat:lobby",
        "--raw-status",
        "chat:*",
        "--max-message-bytes",
        &limit.to_string(),
        "--publish-rate",
        "1",
    ]);
    let mut ann = raw(h.addr).await;
    let mut bob = raw(h.addr).await;
    let mut json_sub = h.connect("sub=chat:lobby").await;
    ann.send(Message::Text(r#"{"user":"ann","text":"ok"}"#.into()))
        .await
        .unwrap();
    assert_eq!(json(&text(&mut bob).await)["text"], "ok");
    assert_eq!(json(&text(&mut ann).await)["text"], "ok", "her own, echoed");
    // Under the limit as a frame, over it as the JSON string every node
    // would deliver (each `\"` grows to four bytes): refused, whatever the
    // rate.
    let big = format!(r#"{{"user":"ann","text":"{}"}}"#, r#"\""#.repeat(300));
    assert!(big.len() < limit);
    ann.send(Message::Text(big)).await.unwrap();
    let v = json(&text(&mut ann).await);
    assert_eq!(v["code"], "message_too_big", "{v}");
    ann.close(None).await.unwrap();
    let t = text(&mut bob).await;
    let v = json(&t);
    assert_eq!(
        (v["text"].as_str(), v["status"].as_u64()),
        (Some("ok"), Some(0)),
        "{t:.200}"
    );
    // A JSON subscriber gets the object as a JSON string: within the limit.
    assert_eq!(
        json(&json_sub.recv_text().await)["data"],
        r#"{"status":1,"text":"ok","user":"ann"}"#
    );
    let t = json_sub.recv_text().await;
    let data = json(&t)["data"].to_string();
    assert!(
        data.len() <= limit,
        "{} bytes of data at leave, over {limit}",
        data.len()
    );
    assert!(data.contains(r#"\"text\":\"ok\""#), "{t:.200}");
    // Right behind the first: over a rate of 1 a second, unless this
    // machine took a second since; then it is published and is the last.
    let mut cy = raw(h.addr).await;
    for text in ["ok", "second"] {
        let obj = format!(r#"{{"user":"cy","text":"{text}"}}"#);
        cy.send(Message::Text(obj)).await.unwrap();
    }
    assert_eq!(json(&text(&mut bob).await)["text"], "ok");
    assert_eq!(json(&text(&mut cy).await)["text"], "ok");
    let v = json(&text(&mut cy).await);
    let last = if v["code"] == "rate_limited" {
        "ok"
    } else {
        assert_eq!(v["text"], "second", "{v}");
        assert_eq!(json(&text(&mut bob).await)["text"], "second");
        "second"
    };
    cy.close(None).await.unwrap();
    let v = json(&text(&mut bob).await);
    assert_eq!(
        (v["user"].as_str(), v["text"].as_str(), v["status"].as_u64()),
        (Some("cy"), Some(last), Some(0)),
        "{v}"
    );
}
