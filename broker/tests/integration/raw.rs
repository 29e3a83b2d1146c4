//! Raw mode: pages written for a plain WebSocket server, and streaming a
//! program's output with `herald pub --lines`.

use std::process::{Command, Stdio};

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn two_raw_clients_chat() {
    let h = Herald::start(&[]);
    let mut a = h.connect("topic=chat:lobby&format=raw").await;
    let mut b = h.connect("topic=chat:lobby&format=raw").await;
    let mut watcher = h.connect("sub=chat:lobby").await;
    a.send("hello from a").await;
    assert_eq!(b.recv_text().await, "hello from a");
    assert_eq!(a.recv_text().await, "hello from a");
    b.send(r#"{"not":"parsed"}"#).await;
    // What a raw client sends arrives byte for byte at raw clients...
    assert_eq!(a.recv_text().await, r#"{"not":"parsed"}"#);
    // ...and as a JSON string at protocol clients. (Order is kept per
    // publisher; a and b are two publishers, so either may arrive first.)
    let mut seen = vec![watcher.recv().await, watcher.recv().await];
    seen.sort_by_key(|v| v.to_string());
    assert_eq!(
        seen,
        vec![
            json!({"topic":"chat:lobby","data":"hello from a"}),
            json!({"topic":"chat:lobby","data":r#"{"not":"parsed"}"#}),
        ]
    );
    // A protocol publish of a non-string reaches raw clients as JSON text.
    watcher.publish("chat:lobby", json!({"n":[1,2]})).await;
    assert_eq!(b.recv_text().await, r#"{"not":"parsed"}"#);
    assert_eq!(b.recv_text().await, r#"{"n":[1,2]}"#);
}

#[tokio::test]
async fn raw_subscriber_receives_pub_lines_output() {
    let h = Herald::start(&[]);
    let mut page = h.connect("topic=count&format=raw").await;
    let mut child = Command::new(herald_bin())
        .args(["pub", "--url", &h.url(""), "--lines", "count"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn herald pub");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for i in 1..=10 {
            writeln!(stdin, "{i}").unwrap();
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    for i in 1..=10 {
        assert_eq!(page.recv_text().await, i.to_string());
    }
}

#[tokio::test]
async fn cli_sub_prints_deliveries() {
    let h = Herald::start(&[]);
    let url = h.url("");
    let sub = tokio::task::spawn_blocking(move || {
        Command::new(herald_bin())
            .args(["sub", "--url", &url, "--count", "2", "todo:*"])
            .stderr(Stdio::piped())
            .output()
            .expect("herald sub")
    });
    eventually("cli subscriber is subscribed", || async {
        h.metric("herald_subscriptions").await == 1.0
    })
    .await;
    let publish = |data: &'static str| {
        let url = h.url("");
        tokio::task::spawn_blocking(move || {
            Command::new(herald_bin())
                .args(["pub", "--url", &url, "todo:count", data])
                .status()
                .expect("herald pub")
        })
    };
    assert!(publish("{\"n\":1}").await.unwrap().success());
    assert!(publish("not json").await.unwrap().success());
    let out = sub.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"topic\":\"todo:count\",\"data\":{\"n\":1}}\n{\"topic\":\"todo:count\",\"data\":\"not json\"}\n"
    );
    let bad = Command::new(herald_bin())
        .args(["pub", "--url", &h.url(""), "todo:*", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad_topic"));
    // A refused subscription is not worth a reconnect: herald sub exits 1.
    let mut refused = Command::new(herald_bin())
        .args(["sub", "--url", &h.url(""), "a..b"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = refused.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "herald sub kept retrying a refused topic"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
}

/// `herald sub` outlives its node: when the node dies and comes back on
/// the same port, it reconnects, subscribes again and keeps printing.
#[tokio::test]
async fn cli_sub_survives_a_node_restart_on_the_same_port() {
    use std::io::{BufRead, BufReader};
    let h = Herald::start(&[]);
    let addr = h.addr;
    let mut sub = Command::new(herald_bin())
        .args(["sub", "--url", &h.url(""), "--data-only", "feed"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("herald sub");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stdout = sub.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    eventually("subscribed", || async {
        h.metric("herald_subscriptions").await == 1.0
    })
    .await;
    h.publish("feed", "1").await;
    assert_eq!(rx.recv().await.as_deref(), Some("1"));
    drop(h); // SIGKILL
    let h = Herald::start_on(addr, &[]);
    eventually("subscribed again", || async {
        h.metric("herald_subscriptions").await == 1.0
    })
    .await;
    h.publish("feed", "2").await;
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a delivery after the restart");
    assert_eq!(got.as_deref(), Some("2"));
    assert!(sub.try_wait().expect("try_wait").is_none(), "herald sub exited");
    let _ = sub.kill();
    let _ = sub.wait();
}

/// The classic broadcast-chat page opens `ws://host:port` with no path and
/// no parameters: with --root-topic that is a raw socket on the topic, and
/// plain GET / still serves the demo page.
#[tokio::test]
async fn the_bare_address_is_a_raw_socket_on_the_root_topic() {
    let h = Herald::start(&["--root-topic", "chat:lobby"]);
    let bare = format!("ws://{}", h.addr);
    let mut a = Client::connect(&bare).await;
    let mut b = Client::connect(&bare).await;
    let mut watcher = h.connect("sub=chat:lobby").await;
    a.send(r#"{"text":"hi","user":"ann"}"#).await;
    assert_eq!(b.recv_text().await, r#"{"text":"hi","user":"ann"}"#);
    assert_eq!(
        watcher.recv().await,
        json!({"topic":"chat:lobby","data":"{\"text\":\"hi\",\"user\":\"ann\"}"})
    );
    // Parameters on / work as on /ws; and the page is still there.
    let mut c = Client::connect(&format!("ws://{}/?sub=news", h.addr)).await;
    h.publish("news", "1").await;
    assert_eq!(c.recv().await, json!({"topic":"news","data":1}));
    let (status, body) = h.get("/").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"),
        "{body}"
    );
}
