//! Heartbeat reaping and graceful shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn silent_socket_is_reaped_by_ping_timeout() {
    let h = Herald::start(&["--ping-interval", "500ms"]);
    // Answers nothing: it never reads, so it never sends a pong.
    let mut silent = RawWs::connect(h.addr, "/ws?sub=t").await;
    // A live client whose library answers pings while it reads.
    let mut live = h.connect("sub=t").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = live.ws.next().await {
            if m.is_text() && tx.send(m.into_text().unwrap()).is_err() {
                break;
            }
        }
    });
    eventually("silent socket reaped", || async {
        h.metric("herald_heartbeat_timeouts_total").await >= 1.0
    })
    .await;
    // The live client stays through several more ping rounds. (It has a
    // whole second to answer each ping: a generous bound, not a measurement.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.metric("herald_heartbeat_timeouts_total").await, 1.0);
    // The reaped socket counts until its connection is gone: the node
    // waits --close-timeout for the silent peer's close reply.
    eventually("reaped socket gone", || async {
        h.metric("herald_connections").await == 1.0
    })
    .await;
    h.publish("t", "\"still here\"").await;
    let got = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, r#"{"topic":"t","data":"still here"}"#);
    reader.abort();
    // The silent socket received pings, then close 4002.
    let mut pings = 0;
    let code = loop {
        match silent.read_frame().await {
            Some((0x9, _)) => pings += 1,
            Some((0x8, p)) => break u16::from_be_bytes([p[0], p[1]]),
            Some(_) => {}
            None => panic!("ended without close"),
        }
    };
    assert!(pings >= 1);
    assert_eq!(code, 4002);
}

#[tokio::test]
async fn graceful_shutdown_sends_1001_and_exits_zero() {
    let mut h = Herald::start(&["--drain-period", "1500ms"]);
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(h.connect("sub=t").await);
    }
    h.publish("t", "\"before\"").await;
    h.sigterm();
    // While draining: not ready, new sockets refused, old ones still served
    // until their turn.
    eventually("readyz turns 503", || async { h.get("/readyz").await.0 == 503 }).await;
    let (status, body) = h.http(&upgrade_request("/ws", "x", "")).await;
    assert_eq!(status, 503);
    assert!(body.contains("shutting_down"), "{body}");
    for c in clients.iter_mut() {
        // Queued frames are flushed before the close.
        assert_eq!(c.recv().await, json!({"topic":"t","data":"before"}));
        let (code, reason) = c.recv_close().await;
        assert_eq!(code, 1001);
        assert!(reason.contains("going_away"), "{reason}");
    }
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}");
}

/// Logs carry no colour codes when stderr is not a terminal (here, a file),
/// so `herald serve 2>log` and the tests' output stay clean.
#[tokio::test]
async fn logs_to_a_file_carry_no_escape_bytes() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("herald-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("herald.log");
    let log = std::fs::File::create(&path).expect("log file");
    let mut child = std::process::Command::new(herald_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-level", "debug"])
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listen line");
    let addr: std::net::SocketAddr = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    // Something to log at debug: a socket opens and closes.
    drop(Client::connect(&format!("ws://{addr}/ws")).await);
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
    let _ = child.wait();
    let text = std::fs::read(&path).expect("read log");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.windows(9).any(|w| w == b"listening"), "the log is empty");
    assert!(!text.contains(&0x1b), "escape bytes in a log written to a file");
}
