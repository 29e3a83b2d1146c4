//! Every limit, refused by name; and the slow consumer that never delays
//! anyone else.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::common::*;

#[tokio::test]
async fn message_size_limit() {
    let h = Herald::start(&["--max-message-bytes", "1024"]);
    let mut bystander = h.connect("sub=t").await;
    let mut c = h.connect("").await;
    let big = format!(r#"{{"op":"pub","topic":"t","data":"{}"}}"#, "x".repeat(2000));
    c.send(big).await;
    let (code, reason) = c.recv_close().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("exceeds the limit of 1024 bytes"), "{reason}");
    let body = format!(r#"{{"topic":"t","data":"{}"}}"#, "x".repeat(2000));
    let (status, text) = h.post("/v1/publish", "", &body).await;
    assert_eq!(status, 413);
    assert!(text.contains("message_too_big"), "{text}");
    h.publish("t", "\"small\"").await;
    assert_eq!(bystander.recv().await, json!({"topic":"t","data":"small"}));
}

#[tokio::test]
async fn subscription_limit() {
    let h = Herald::start(&["--max-subscriptions", "2"]);
    let mut c = h.connect("").await;
    c.sub("a").await;
    c.sub("b:*").await;
    let e = c.request(json!({"op":"sub","topic":"c","id":3})).await;
    assert_eq!(e["code"], "subscription_limit");
    assert!(e["message"].as_str().unwrap().contains("at most 2"));
    // The socket keeps working and keeps its subscriptions.
    h.publish("a", "1").await;
    assert_eq!(c.recv().await, json!({"topic":"a","data":1}));
    let (status, body) = h.http(&upgrade_request("/ws?sub=a&sub=b&sub=c", "x", "")).await;
    assert_eq!(status, 400);
    assert!(body.contains("subscription_limit"), "{body}");
}

#[tokio::test]
async fn publish_rate_limit() {
    let h = Herald::start(&["--publish-rate", "1"]);
    let mut c = h.connect("").await;
    let started = std::time::Instant::now();
    for i in 0..20 {
        c.send(json!({"op":"pub","topic":"t","data":i,"id":i}).to_string())
            .await;
    }
    let mut acks = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let v = c.recv().await;
        match v["op"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                assert!(v["message"].as_str().unwrap().contains("publish_rate"));
                limited += 1;
            }
            _ => panic!("{v}"),
        }
    }
    // A burst of one, then one a second: never more acks than that.
    let allowed = 1 + started.elapsed().as_secs() as usize + 1;
    assert!(
        acks >= 1 && acks <= allowed,
        "acks {acks} in {:?}",
        started.elapsed()
    );
    assert_eq!(acks + limited, 20);
    assert_eq!(
        h.metric("herald_errors_total{code=\"rate_limited\"}").await,
        limited as f64
    );
}

#[tokio::test]
async fn connection_limit() {
    let h = Herald::start(&["--max-connections", "2"]);
    let a = h.connect("").await;
    let _b = h.connect("").await;
    let url = h.url("");
    let err = tokio_tungstenite::connect_async(&url).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("connection_limit"), "{body}");
        }
        other => panic!("expected HTTP 503, got {other}"),
    }
    drop(a);
    eventually("a slot frees up", || async {
        tokio_tungstenite::connect_async(&url).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn handshake_timeout() {
    let h = Herald::start(&["--handshake-timeout", "300ms"]);
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut half = TcpStream::connect(h.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for s in [&mut silent, &mut half] {
        let mut buf = Vec::new();
        // The node says why, then closes.
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("not closed")
            .expect("read");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(r#""code":"handshake_timeout""#), "{text}");
    }
    assert_eq!(h.metric("herald_handshake_timeouts_total").await, 2.0);
    assert_eq!(
        h.metric("herald_errors_total{code=\"handshake_timeout\"}").await,
        2.0
    );
    // Timely clients are unaffected.
    let mut c = h.connect("sub=t").await;
    h.publish("t", "1").await;
    assert_eq!(c.recv().await["data"], 1);
}

#[tokio::test]
async fn slow_consumer_is_closed_while_fast_subscriber_gets_everything() {
    // A long close timeout: the node waits for the slow client to read its
    // way to the close frame instead of resetting it.
    let h = Herald::start(&[
        "--max-queue-bytes",
        "1048576",
        "--max-http-body-bytes",
        "4194304",
        "--close-timeout",
        "120s",
        "--write-timeout",
        "120s",
    ]);
    // The slow client shrinks its receive buffer and never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(h.addr).await.unwrap();
    let mut slow = RawWs::handshake(stream, h.addr, "/ws?sub=feed").await;
    let mut fast = h.connect("sub=feed").await;
    eventually("both subscribed", || async {
        h.metric("herald_subscriptions").await == 2.0
    })
    .await;
    let payload = "y".repeat(1000);
    let batches = 48;
    let per_batch = 250;
    let total = (batches * per_batch) as u64;
    let (progress, mut seen) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < total {
            let v = fast.recv().await;
            assert_eq!(v["data"]["i"], n, "out of order or lost");
            n += 1;
            let _ = progress.send(n);
        }
        n
    });
    for b in 0..batches {
        // Publish a batch (~260 KB) once the fast reader has the previous
        // one, so only the slow consumer can fall behind.
        let done = (b * per_batch) as u64;
        seen.wait_for(|n| *n >= done).await.unwrap();
        let items: Vec<String> = (0..per_batch)
            .map(|k| {
                format!(
                    r#"{{"topic":"feed","data":{{"i":{},"p":"{payload}"}}}}"#,
                    b * per_batch + k
                )
            })
            .collect();
        let (status, body) = h.post("/v1/publish", "", &format!("[{}]", items.join(","))).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(reader.await.unwrap(), total);
    assert_eq!(h.metric("herald_slow_consumer_disconnects_total").await, 1.0);
    // The slow socket, when it finally reads, finds the frames written before
    // the overflow, then the close 4001.
    let mut received = 0;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((op, payload)) = slow.read_frame().await {
            match op {
                0x1 => received += 1,
                0x8 => return Some(u16::from_be_bytes([payload[0], payload[1]])),
                _ => {}
            }
        }
        None
    })
    .await
    .expect("slow socket was never closed");
    assert_eq!(end, Some(4001));
    assert!(received < total, "slow consumer got everything");
}

/// With --metrics-listen, metrics live only on that address: the public
/// port answers /metrics with 404, and the metrics port serves nothing else.
#[tokio::test]
async fn metrics_can_move_off_the_public_port() {
    let h = Herald::start(&["--metrics-listen", "127.0.0.1:0"]);
    let admin = h.metrics.expect("metrics address");
    let (status, body) = h.get("/metrics").await;
    assert_eq!(status, 404, "{body}");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, body) = http(admin, get("/metrics").as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("herald_connections "), "{body}");
    assert_eq!(http(admin, get("/readyz").as_bytes()).await.0, 200);
    let (status, _) = http(admin, get("/v1/publish").as_bytes()).await;
    assert_eq!(status, 404, "the metrics port must not publish");
    let (status, _) = http(
        admin,
        b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 22\r\n\r\n{\"topic\":\"t\",\"data\":1}",
    )
    .await;
    assert_eq!(status, 404, "the metrics port must not publish");
    // The public port still publishes.
    h.publish("t", "1").await;
}

/// Health, readiness and metrics on `--metrics-listen` never wait behind
/// client admission: with the public port's `--max-pending-connections`
/// all held by idle connections, the probes still answer 200.
#[tokio::test]
async fn probes_do_not_wait_behind_client_admission() {
    let h = Herald::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-pending-connections",
        "4",
        "--handshake-timeout",
        "60s",
    ]);
    let admin = h.metrics.expect("metrics address");
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(h.addr).await.unwrap());
    }
    // The public port is full: a new connection is turned away at once.
    let (status, body) = h.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overloaded"), "{body}");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = http(admin, get(path).as_bytes()).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    drop(idle);
}
