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

/// `herald serve`'s settings, parsed as the binary parses them.
#[derive(clap::Parser)]
struct Serve {
    #[command(flatten)]
    config: herald_broker::Config,
}

/// `run()` returns only once every task it started has ended and its NATS
/// connections are closed. A node with the cluster link, JetStream
/// history, presence, a live socket and HTTP traffic runs inside this
/// process, on a runtime of the test's own; after `run()` returns, the
/// runtime holds no task but the test's, and nats-server shows no
/// connection.
#[test]
fn run_returns_with_every_task_ended_and_nats_closed() {
    use clap::Parser;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let nats = crate::external::NatsServer::start_js().await;
        let url = nats.url();
        let Serve { config } = Serve::parse_from([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--nats",
            &url,
            "--history",
            "h:*=100",
            "--presence",
            "room:*",
            "--drain-period",
            "100ms",
        ]);
        let listener = herald_broker::bind(config.listen, 128).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let before = alive();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let node = tokio::spawn(herald_broker::run(listener, None, config, async {
            let _ = stopped.await;
        }));

        // Use what spawns tasks: the link (both NATS connections), the
        // stream, a socket with its presence, an HTTP publish.
        eventually("both NATS connections", || async { nats.connections().await == 2 }).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?sub=room:a&sub=h:x"))
            .await
            .expect("ws");
        let body = r#"{"topic":"h:x","data":1}"#;
        let req = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        eventually("a stored publish delivered", || async {
            let (status, _) = http(addr, req.as_bytes()).await;
            status == 200
        })
        .await;
        let got = tokio::time::timeout(WAIT, async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && m.to_text().unwrap_or("").contains("\"h:x\"") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(got, Ok(true), "the socket got the stored message");
        let during = alive();
        assert!(during > before + 5, "the node runs tasks ({before} before, {during} now)");

        stop.send(()).expect("node still running");
        node.await.expect("run's task").expect("run");
        // The NATS library's own helpers (its event relay and JetStream
        // acker, which it gives no handle to join) end as their channels
        // close with the node, within moments; a task of the node's would
        // stay.
        eventually("no task of the node left after run()", || async { alive() == before }).await;
        eventually("nats-server shows no connection from the node", || async {
            nats.connections().await == 0
        })
        .await;
        drop(ws);
    });
}

/// Shutdown gives HTTP requests in flight a grace of 5 s, then ends them:
/// a publish whose body trickles in (or never comes) does not hold the
/// process past it. (It waited for them with no bound, so no termination
/// grace period covered it.)
#[tokio::test]
async fn shutdown_ends_a_request_that_never_finishes() {
    use tokio::io::AsyncWriteExt;
    // The body's own deadline far off: only the shutdown's grace ends it.
    let mut h = Herald::start(&["--drain-period", "0s", "--body-timeout", "120s"]);
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"topic\":")
        .await
        .unwrap();
    // The request is in: its body is being read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.sigterm();
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}");
    drop(s);
}

/// A connection's span names its peer as an address (`remote_addr=
/// 127.0.0.1:PORT`), not as a Rust `Option` (`Some(127.0.0.1:PORT)`).
#[tokio::test]
async fn the_log_names_the_remote_address_itself() {
    let h = Herald::start_logged_at("debug", &[]);
    let c = h.connect("").await;
    drop(c);
    eventually("a line in a connection's span", || async {
        h.log().iter().any(|l| l.contains("remote_addr"))
    })
    .await;
    let lines = h.log();
    let line = lines.iter().find(|l| l.contains("remote_addr")).unwrap();
    assert!(line.contains("remote_addr=127.0.0.1:"), "{line}");
    assert!(!line.contains("Some("), "{line}");
}
