//! Hostile clients and faults: sockets that stop reading, closes that
//! cannot flush, writes that make no progress. Each test fails on a node
//! that lets such a socket hold resources without a deadline.

use std::net::SocketAddr;

use herald_protocol::ws::{encode_client_frame, OpCode};
use tokio::net::TcpSocket;

use crate::common::*;

/// A subscriber that reads nothing: its receive buffer is as small as the
/// kernel allows, so the node's writes to it stall quickly.
async fn stalled(addr: SocketAddr, path: &str) -> RawWs {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    RawWs::handshake(stream, addr, path).await
}

/// Publishes about `mib` MiB to `topic` over HTTP, in 960 KiB batches.
async fn flood(h: &Herald, topic: &str, mib: usize) {
    let item = format!(r#"{{"topic":"{topic}","data":"{}"}}"#, "x".repeat(60 * 1024));
    let body = format!("[{}]", vec![item; 16].join(","));
    for _ in 0..(mib * 16 / 15) {
        let (status, text) = h.post("/v1/publish", "", &body).await;
        assert_eq!(status, 200, "{text}");
    }
}

/// Sockets the node's process holds open (listener included).
fn sockets_held(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

fn close_frame() -> Vec<u8> {
    encode_client_frame(true, OpCode::Close, MASK, &1000u16.to_be_bytes())
}

/// Flags for a node whose queues hold a flood rather than cutting it.
const DEEP_QUEUES: [&str; 4] = ["--max-queue-bytes", "67108864", "--ping-interval", "0"];

#[tokio::test]
async fn a_closing_socket_counts_against_the_limit_until_its_connection_is_gone() {
    let mut args = vec![
        "--max-connections",
        "3",
        "--close-timeout",
        "60s",
        "--write-timeout",
        "60s",
    ];
    args.extend(DEEP_QUEUES);
    let h = Herald::start(&args);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(stalled(h.addr, "/ws?sub=flood:x").await);
    }
    flood(&h, "flood:x", 12).await;
    for c in &mut clients {
        c.send_bytes(&close_frame()).await;
    }
    // The sessions ended, but their sockets still owe a flush: they count.
    let upgrade = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (status, body) = h.http(upgrade).await;
    assert_eq!(
        status, 503,
        "a fourth socket was let in past --max-connections: {body}"
    );
    assert!(body.contains("connection_limit"), "{body}");
    assert_eq!(h.metric("herald_connections").await, 3.0);
    // Once the clients' connections are really gone, their slots are free.
    drop(clients);
    eventually("slots freed", || async {
        h.metric("herald_connections").await == 0.0
    })
    .await;
    RawWs::connect(h.addr, "/ws").await;
}

#[tokio::test]
async fn a_close_that_cannot_flush_is_reset_at_its_deadline() {
    let mut args = vec!["--close-timeout", "1s", "--write-timeout", "60s"];
    args.extend(DEEP_QUEUES);
    let h = Herald::start(&args);
    let before = sockets_held(h.pid());
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(stalled(h.addr, "/ws?sub=flood:x").await);
    }
    flood(&h, "flood:x", 12).await;
    for c in &mut clients {
        c.send_bytes(&close_frame()).await;
    }
    // The clients keep their ends open and never read: only the node's
    // close deadline can free its side.
    eventually("the node let go of every closing socket", || async {
        sockets_held(h.pid()) <= before
    })
    .await;
    eventually("counted gone", || async {
        h.metric("herald_connections").await == 0.0
    })
    .await;
    assert!(h.metric("herald_write_timeouts_total").await >= 3.0);
    drop(clients);
}

#[tokio::test]
async fn a_write_that_makes_no_progress_is_cut() {
    let mut args = vec!["--write-timeout", "1s"];
    args.extend(DEEP_QUEUES);
    let h = Herald::start(&args);
    let before = sockets_held(h.pid());
    let quiet = stalled(h.addr, "/ws?sub=flood:x").await;
    let mut reader = h.connect("sub=flood:y").await;
    flood(&h, "flood:x", 8).await;
    eventually("the stalled socket was cut", || async {
        sockets_held(h.pid()) <= before + 1
    })
    .await;
    assert_eq!(h.metric("herald_write_timeouts_total").await, 1.0);
    // Everyone else is served as before.
    h.publish("flood:y", "1").await;
    assert_eq!(reader.recv().await["data"], 1);
    drop(quiet);
}
