//! websocketd mode against real programs: lines both ways, the CGI
//! environment, the program ended when the socket goes, the process limit,
//! and backpressure from a slow reader to a fast program.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(h: &Herald, path_query: &str) -> Ws {
    let url = format!("ws://{}{path_query}", h.addr);
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map(|mut r| {
            r.headers_mut().insert("x-test", "yes".parse().unwrap());
            r
        })
        .unwrap();
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
}

/// The next text message, or the close code if the socket closes first.
async fn next(ws: &mut Ws) -> Result<String, u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out") {
            Some(Ok(Message::Text(t))) => return Ok(t),
            Some(Ok(Message::Close(f))) => return Err(f.map_or(1005, |f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("websocket error: {e}"),
            None => return Err(1006),
        }
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[tokio::test]
async fn lines_round_trip_with_the_cgi_environment() {
    let h = Herald::start(&[
        "--exec",
        "/echo=cat",
        "--exec-shell",
        "/env=echo \"$REMOTE_ADDR|$QUERY_STRING|$HTTP_X_TEST|$SCRIPT_NAME\"; printf 'no newline'",
    ]);
    let mut ws = open(&h, "/echo").await;
    for line in ["hello", "two words", "ünïcode ✓", ""] {
        ws.send(Message::Text(line.into())).await.unwrap();
        assert_eq!(next(&mut ws).await, Ok(line.to_owned()));
    }
    let mut env = open(&h, "/env?a=1").await;
    assert_eq!(next(&mut env).await, Ok("127.0.0.1|a=1|yes|/env".to_owned()));
    assert_eq!(
        next(&mut env).await,
        Ok("no newline".to_owned()),
        "the last line without a newline"
    );
    assert_eq!(next(&mut env).await, Err(1000), "the program exited: close 1000");
    // A plain GET on an exec path is told to upgrade.
    let (status, body) = h.get("/echo").await;
    assert_eq!(status, 426, "{body}");
}

#[tokio::test]
async fn closing_the_socket_ends_the_program_even_one_that_ignores_sigterm() {
    let h = Herald::start(&[
        "--exec-shell",
        "/sleep=echo $$; exec sleep 1000",
        "--exec-shell",
        "/stubborn=trap '' TERM; echo $$; while :; do sleep 0.1; done",
        "--exec-grace",
        "500ms",
        "--exec-max-processes",
        "2",
    ]);
    let mut a = open(&h, "/sleep").await;
    let pid_a: u32 = next(&mut a).await.unwrap().parse().unwrap();
    let mut b = open(&h, "/stubborn").await;
    let pid_b: u32 = next(&mut b).await.unwrap().parse().unwrap();
    assert!(alive(pid_a) && alive(pid_b));
    assert_eq!(h.metric("herald_exec_processes").await, 2.0);
    // The limit: a third is refused while two run.
    let (status, body) = h.http(&upgrade_request("/sleep", "127.0.0.1", "")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("exec_limit"), "{body}");

    a.close(None).await.unwrap();
    drop(a);
    eventually("SIGTERM ends the program", || async { !alive(pid_a) }).await;
    drop(b); // gone without a close frame
    eventually("SIGKILL ends the one that ignores SIGTERM", || async {
        !alive(pid_b)
    })
    .await;
    eventually("the gauge counts them until reaped", || async {
        h.metric("herald_exec_processes").await == 0.0
    })
    .await;
    let mut c = open(&h, "/sleep").await;
    let pid_c: u32 = next(&mut c).await.expect("room again").parse().unwrap();
    // The node is killed at the end, its program left behind: ended here.
    let _leftovers = Leftovers(vec![pid_c]);
}

#[tokio::test]
async fn a_fast_program_waits_for_a_slow_reader_and_nothing_is_lost() {
    const N: u64 = 3_000_000; // ~26 MB of frames: more than the socket buffers hold
    let h = Herald::start(&["--exec-shell", &format!("/flood=echo $$; exec seq 1 {N}")]);
    let mut ws = open(&h, "/flood").await;
    let pid: u32 = next(&mut ws).await.unwrap().parse().unwrap();
    // Not reading: the program fills the pipe and the socket, then blocks
    // in a write (sleeping, alive: 26 MB is more than every buffer holds).
    // A loaded machine only takes longer to get there.
    eventually("seq blocks in a write", || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        alive(pid) && stat.contains(") S ")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "seq would have finished unless it was blocked");
    let mut expect = 1u64;
    loop {
        match next(&mut ws).await {
            Ok(t) => {
                assert_eq!(t, expect.to_string());
                expect += 1;
            }
            Err(code) => {
                assert_eq!(code, 1000, "closed normally, never cut");
                break;
            }
        }
    }
    assert_eq!(expect, N + 1, "every line arrived, in order");
}

/// With access control on, a program runs only for a valid token.
#[tokio::test]
async fn with_access_control_a_program_needs_a_token() {
    let key = KeyFile::new("exec-auth");
    let h = Herald::start(&[
        "--exec",
        "/echo=cat",
        "--auth-hmac-key-file",
        key.arg(),
        "--anonymous-subscribe",
        "public:>",
    ]);
    let (status, body) = h.http(&upgrade_request("/echo", "127.0.0.1", "")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = h.http(&upgrade_request("/echo?token=bad", "127.0.0.1", "")).await;
    assert_eq!(status, 401, "{body}");
    let token = key.token("ops", &[]);
    let mut ws = open(&h, &format!("/echo?token={token}")).await;
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(next(&mut ws).await, Ok("hi".to_owned()));
}

/// An `--exec` path that is a built-in route's is refused at start, with
/// the route named: it would otherwise shadow the API, or never be reached.
#[test]
fn an_exec_path_on_a_built_in_route_is_refused_at_start() {
    let err = Herald::refusal(&["--exec", "/v1/history=cat"]);
    assert!(
        err.contains(r#"--exec /v1/history: the path is the built-in route "history" (GET /v1/history)"#),
        "{err}"
    );
    let err = Herald::refusal(&["--exec", "/status=cat"]);
    assert!(
        err.contains(r#"--exec /status: the path is the built-in route "status""#),
        "{err}"
    );
    for (flag, path) in [
        ("--exec-shell", "/v1/presence"),
        ("--exec", "/v1/presence/stats"),
        ("--exec", "/status.json"),
        ("--exec", "/ws"),
        ("--exec", "/"),
        ("--exec", "/metrics"),
        ("--exec", "/herald.js"),
    ] {
        let err = Herald::refusal(&[flag, &format!("{path}=cat")]);
        assert!(
            err.contains(&format!("{flag} {path}: the path is the built-in route")),
            "{flag} {path}: {err}"
        );
    }
    // Off by a flag is still the node's: --demo false keeps /herald.js.
    let err = Herald::refusal(&["--demo", "false", "--exec", "/herald.js=cat"]);
    assert!(err.contains("built-in route"), "{err}");
    // The same path twice has no one answer either.
    let err = Herald::refusal(&["--exec", "/a=cat", "--exec-shell", "/a=cat"]);
    assert!(
        err.contains("--exec-shell /a: the path is given twice (also as --exec /a)"),
        "{err}"
    );
}

/// Beside `--exec` routes (one just off a built-in path), every built-in
/// route answers as it did: the table sends each request to one of them.
#[tokio::test]
async fn built_in_routes_answer_beside_exec_routes() {
    let h = Herald::start(&[
        "--exec",
        "/echo=cat",
        "--exec",
        "/v1/history/=echo exec",
        "--history",
        "log:*=10",
        "--presence",
        "room:*",
        "--root-topic",
        "raw:root",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let admin = h.metrics.expect("metrics address");
    // The exec routes: a program per WebSocket, a plain GET told to upgrade.
    let mut ws = open(&h, "/echo").await;
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(next(&mut ws).await, Ok("hi".to_owned()));
    let mut near = open(&h, "/v1/history/").await;
    assert_eq!(next(&mut near).await, Ok("exec".to_owned()));
    assert_eq!(h.get("/echo").await.0, 426);

    // WebSockets: /ws (subscribed in the URL) and the bare address.
    let mut sub = h.connect("sub=log:a&sub=raw:root").await;
    let mut root = Client::connect(&format!("ws://{}", h.addr)).await;
    let _member = h.connect("sub=room:1").await;
    h.publish("log:a", "1").await;
    assert_eq!(sub.recv().await["data"], 1);
    root.send("from the root").await;
    assert_eq!(
        sub.recv().await,
        serde_json::json!({"topic":"raw:root","data":"from the root"})
    );

    let (status, body) = h.post("/v1/publish", "", r#"{"topic":"log:a","data":3}"#).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"published":1,"deliveries":1}"#)
    );
    let (status, body) = h.get("/v1/history?topic=log:a&since=0").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(2), "{v}");
    let (status, body) = h.get("/v1/presence?topic=room:1").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"members\""), "{body}");
    let (status, body) = h.get("/v1/presence/stats?topic=room:1").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"clients\":1"), "{body}");

    let (status, body) = h.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = h.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready\n"), "{body}");
    let (status, body) = h.get("/status").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<html") || body.contains("<!doctype"), "a page");
    let (status, body) = h.get("/status.json").await;
    assert_eq!(status, 200, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["history"].is_array());
    let (status, body) = h.get("/").await;
    assert_eq!(status, 200);
    assert!(body.contains("herald.js"), "the demo page");
    let (status, body) = h.get("/herald.js").await;
    assert_eq!(status, 200);
    assert!(body.contains("WebSocket"), "the browser client");

    // Refusals as before: moved metrics, a wrong method, an unknown path.
    assert_eq!(h.get("/metrics").await.0, 404);
    assert_eq!(h.get("/v1/publish").await.0, 405);
    assert_eq!(h.post("/healthz", "", "").await.0, 405);
    assert_eq!(h.post("/v1/history", "", "").await.0, 404);
    let (status, body) = h.get("/v1/history/x").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("/echo (WebSocket, --exec)"), "{body}");

    // The metrics address: its three routes, nothing else.
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, body) = http(admin, get("/metrics").as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("herald_exec_processes"), "{body}");
    assert_eq!(http(admin, get("/healthz").as_bytes()).await.0, 200);
    assert_eq!(http(admin, get("/readyz").as_bytes()).await.0, 200);
    for path in ["/echo", "/status", "/v1/history", "/"] {
        let (status, body) = http(admin, get(path).as_bytes()).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("on the metrics address"), "{body}");
    }
}

/// `(state, ppid, pgid)` of a process from /proc, `None` once it is gone.
fn stat(pid: u32) -> Option<(char, u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = s[s.rfind(')')? + 2..].split(' ');
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Every process (zombies too) whose parent is `ppid`.
fn children(ppid: u32) -> Vec<(u32, char)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| stat(pid).filter(|s| s.1 == ppid).map(|s| (pid, s.0)))
        .collect()
}

/// Processes a test made (indirectly) that must not outlive it: killed by
/// PID on drop, so a failing test leaves nothing running.
struct Leftovers(Vec<u32>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in &self.0 {
            if stat(*pid).is_some_and(|s| s.0 != 'Z') {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// `--exec-shell` runs `/bin/sh -c`: a pipeline is the shell's children.
/// Closing the socket ends every process of the program's group, not just
/// the shell, and `herald_exec_processes` counts the program until the
/// last of them is gone, even one that ignores SIGTERM.
#[tokio::test]
async fn closing_the_socket_ends_a_whole_pipeline() {
    let h = Herald::start(&[
        "--exec-shell",
        "/pipe=echo $$; tail -f /dev/null | grep ERROR",
        "--exec-shell",
        "/stubborn=echo $$; sh -c \"trap '' TERM; while :; do sleep 0.1; done\" | cat",
        "--exec-grace",
        "1s",
        "--exec-max-processes",
        "4",
    ]);
    let mut leftovers = Leftovers(Vec::new());
    for _ in 0..3 {
        let mut ws = open(&h, "/pipe").await;
        let sh: u32 = next(&mut ws).await.unwrap().parse().unwrap();
        let mut kids = Vec::new();
        eventually("the pipeline starts", || {
            kids = children(sh).into_iter().map(|c| c.0).collect();
            let n = kids.len();
            async move { n == 2 }
        })
        .await;
        leftovers.0.extend(&kids);
        ws.close(None).await.unwrap();
        drop(ws);
        eventually("no process of the pipeline remains", || async {
            kids.iter()
                .all(|&k| stat(k).is_none_or(|s| s.0 == 'Z' && s.1 != h.pid()))
                && stat(sh).is_none()
        })
        .await;
        eventually("the gauge is back to 0", || async {
            h.metric("herald_exec_processes").await == 0.0
        })
        .await;
    }

    let mut ws = open(&h, "/stubborn").await;
    let sh: u32 = next(&mut ws).await.unwrap().parse().unwrap();
    let mut kids = Vec::new();
    eventually("the pipeline starts", || {
        kids = children(sh).into_iter().map(|c| c.0).collect();
        let n = kids.len();
        async move { n == 2 }
    })
    .await;
    leftovers.0.extend(&kids);
    drop(ws);
    eventually("the shell ends", || async { stat(sh).is_none() }).await;
    // Its group lives on in the child that ignores SIGTERM: still counted.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counted = h.metric("herald_exec_processes").await;
        if !kids.iter().any(|&k| stat(k).is_some_and(|s| s.0 != 'Z')) {
            break;
        }
        assert_eq!(counted, 1.0, "a process of the group still runs");
        assert!(tokio::time::Instant::now() < deadline, "the group never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("SIGKILL ends the group after the grace", || async {
        kids.iter().all(|&k| stat(k).is_none_or(|s| s.0 == 'Z'))
    })
    .await;
    eventually("the gauge is back to 0", || async {
        h.metric("herald_exec_processes").await == 0.0
    })
    .await;
}

/// A masked client text frame.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// A program that never reads its stdin, and a client that floods it and
/// then vanishes: the socket is not stuck behind the full pipe. The node
/// closes it, ends the program and frees its slot.
#[tokio::test]
async fn a_program_that_never_reads_stdin_does_not_hold_its_socket() {
    let h = Herald::start(&[
        "--exec-shell",
        "/deaf=echo $$; exec sleep 1000",
        "--exec-max-processes",
        "1",
        "--ping-interval",
        "1s",
        "--write-timeout",
        "1s",
    ]);
    let mut ws = RawWs::connect(h.addr, "/deaf").await;
    let (op, pid) = ws.read_frame().await.expect("the program's pid");
    assert_eq!(op, 0x1);
    let pid: u32 = String::from_utf8(pid).unwrap().parse().unwrap();
    let mut leftovers = Leftovers(vec![pid]);
    // Far more than the pipe holds, then gone without a word; the flood
    // itself stops when the node stops taking it.
    let frame = text_frame(&[b'x'; 1000]);
    for _ in 0..4000 {
        let sent = tokio::time::timeout(Duration::from_millis(500), ws.stream.write_all(&frame)).await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    drop(ws);
    eventually("the program ends", || async {
        stat(pid).is_none_or(|s| s.0 == 'Z')
    })
    .await;
    eventually("the slot is free", || async {
        h.metric("herald_exec_processes").await == 0.0
    })
    .await;
    let mut again = open(&h, "/deaf").await;
    let pid: u32 = next(&mut again)
        .await
        .expect("a new socket is taken")
        .parse()
        .unwrap();
    leftovers.0.push(pid);
}

/// The node is its programs' subreaper (as PID 1 is in a container with no
/// init): an orphan a program leaves is re-parented to the node, which
/// reaps it when it ends, in the program's group or out of it (`setsid`),
/// so no zombie of the node remains.
#[tokio::test]
async fn orphans_of_programs_are_reaped_by_the_node() {
    let h = Herald::start(&[
        "--exec-shell",
        "/orphans=(sleep 1000 & echo $!); (setsid sleep 1 & echo $!); exec cat",
    ]);
    let node = h.pid();
    let mut leftovers = Leftovers(Vec::new());
    for _ in 0..3 {
        let mut ws = open(&h, "/orphans").await;
        let in_group: u32 = next(&mut ws).await.unwrap().parse().unwrap();
        let outside: u32 = next(&mut ws).await.unwrap().parse().unwrap();
        leftovers.0.extend([in_group, outside]);
        for orphan in [in_group, outside] {
            eventually("the orphan's parent is the node", || async {
                stat(orphan).is_some_and(|s| s.1 == node)
            })
            .await;
        }
        ws.send(Message::Text("still cat".into())).await.unwrap();
        assert_eq!(next(&mut ws).await, Ok("still cat".to_owned()));
        drop(ws);
        eventually("both orphans end and are reaped", || async {
            stat(in_group).is_none() && stat(outside).is_none()
        })
        .await;
        eventually("no zombie of the node remains", || async {
            children(node).iter().all(|c| c.1 != 'Z')
        })
        .await;
        eventually("the gauge is back to 0", || async {
            h.metric("herald_exec_processes").await == 0.0
        })
        .await;
    }
}

/// With every program slot taken, a handshake is refused with 503
/// `exec_limit` before its token is checked: a bad token costs a refusal,
/// not a signature check, and holds nothing afterwards.
#[tokio::test]
async fn the_process_limit_is_checked_before_the_token() {
    let key = KeyFile::new("exec-limit-first");
    let h = Herald::start(&[
        "--exec",
        "/echo=cat",
        "--auth-hmac-key-file",
        key.arg(),
        "--exec-max-processes",
        "1",
    ]);
    let token = key.token("ops", &[]);
    let mut held = open(&h, &format!("/echo?token={token}")).await;
    held.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(next(&mut held).await, Ok("hi".to_owned()));
    for _ in 0..5 {
        let (status, body) = h.http(&upgrade_request("/echo?token=bad", "127.0.0.1", "")).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("exec_limit"), "{body}");
    }
    assert_eq!(h.metric("herald_errors_total{code=\"unauthorized\"}").await, 0.0);
    assert_eq!(h.metric("herald_exec_processes").await, 1.0);
    drop(held);
    eventually("the slot is free", || async {
        h.metric("herald_exec_processes").await == 0.0
    })
    .await;
    // A bad token, once there is room, is refused and keeps no slot.
    let (status, body) = h.http(&upgrade_request("/echo?token=bad", "127.0.0.1", "")).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(h.metric("herald_exec_processes").await, 0.0);
    let mut again = open(&h, &format!("/echo?token={token}")).await;
    again.send(Message::Text("again".into())).await.unwrap();
    assert_eq!(next(&mut again).await, Ok("again".to_owned()));
}

/// The state and send queue of the node's side of the TCP connection to
/// the client's `port`, from /proc/net/tcp; `None` once it is gone.
fn node_side(node_port: u16, port: u16) -> Option<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let remote = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
        if (local, remote) != (node_port, port) {
            return None;
        }
        let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
        let tx = u64::from_str_radix(f.get(4)?.split(':').next()?, 16).ok()?;
        Some((state, tx))
    })
}

/// A client that closes while not reading a flood: the node's writer is
/// stuck behind a full socket. The socket counts in `herald_connections`
/// for as long as the node holds it open, and the node lets go of it
/// after `--close-timeout`, not after its writes time out.
#[tokio::test]
async fn an_exec_socket_counts_until_the_node_lets_go_of_it() {
    const ESTABLISHED: u8 = 1;
    let h = Herald::start(&[
        "--exec-shell",
        "/flood=echo $$; exec seq 1 100000000",
        "--close-timeout",
        "500ms",
        "--write-timeout",
        "60s",
    ]);
    let mut ws = RawWs::connect(h.addr, "/flood").await;
    let port = ws.stream.local_addr().unwrap().port();
    let (_, pid) = ws.read_frame().await.expect("the program's pid");
    let pid: u32 = String::from_utf8(pid).unwrap().parse().unwrap();
    let _leftovers = Leftovers(vec![pid]);
    // Filling the client's buffers takes a while on a loaded machine: a
    // bound of its own, well inside --write-timeout.
    let filled = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        let before = node_side(h.addr.port(), port).map_or(0, |s| s.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = node_side(h.addr.port(), port).map_or(0, |s| s.1);
        if before > 0 && before == after && stat(pid).is_some_and(|s| s.0 == 'S') {
            break;
        }
        assert!(tokio::time::Instant::now() < filled, "the socket never filled");
    }
    assert_eq!(h.metric("herald_connections").await, 1.0);
    // A close frame (1000), and never a read.
    let close: Vec<u8> = [0x88, 0x82]
        .into_iter()
        .chain(MASK)
        .chain([0x03 ^ MASK[0], 0xE8 ^ MASK[1]])
        .collect();
    ws.send_bytes(&close).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counted = h.metric("herald_connections").await;
        if node_side(h.addr.port(), port).is_none_or(|s| s.0 != ESTABLISHED) {
            break;
        }
        assert_eq!(counted, 1.0, "the node still holds the socket open");
        assert!(tokio::time::Instant::now() < deadline, "the node never let go");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the slot is free", || async {
        h.metric("herald_connections").await == 0.0
    })
    .await;
}

/// The program exiting closes its socket with 1000 even when something it
/// started in the background keeps its stdout open: its output is read for
/// `--exec-grace` at most, the program is reaped (no zombie), and what it
/// left running goes with its group and is counted until it has.
#[tokio::test]
async fn a_program_that_exits_closes_its_socket_whatever_it_left_running() {
    let h = Herald::start(&[
        "--exec-grace",
        "1s",
        "--exec-shell",
        "/bg=sleep 60 & echo $!; echo started; exit 0",
    ]);
    let node = h.pid();
    let mut ws = open(&h, "/bg").await;
    let child: u32 = next(&mut ws).await.unwrap().parse().unwrap();
    let _leftovers = Leftovers(vec![child]);
    assert_eq!(next(&mut ws).await, Ok("started".to_owned()));
    // Within WAIT (10 s), long before the background sleep's 60 s.
    assert_eq!(next(&mut ws).await, Err(1000), "closed as the program exited");
    eventually("the background child goes with the group", || async {
        !alive(child)
    })
    .await;
    eventually("no zombie of the node remains", || async {
        children(node).iter().all(|c| c.1 != 'Z')
    })
    .await;
    eventually("the gauge is back to 0", || async {
        h.metric("herald_exec_processes").await == 0.0
    })
    .await;
}

/// On shutdown `--exec` sockets are closed in the same spread over
/// `--drain-period` as the WebSocket sessions.
#[tokio::test]
async fn the_drain_spreads_exec_sockets_with_the_sessions() {
    // Each program notes when the drain ends it (its group gets SIGTERM as
    // its socket closes): the node's own timing, not the test's reads. A
    // Python program, whose handler runs at once even in a blocked read.
    let dir = std::env::temp_dir().join(format!("herald-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marks = dir.join("marks");
    let script = dir.join("echo.py");
    std::fs::write(
        &script,
        format!(
            "import signal, sys, time\n\
             def end(*_):\n    open({marks:?}, 'a').write(f'{{time.time()}}\\n')\n    sys.exit(0)\n\
             signal.signal(signal.SIGTERM, end)\n\
             for line in sys.stdin:\n    print(line, end='', flush=True)\n",
            marks = marks.display().to_string()
        ),
    )
    .expect("script");
    let program = format!("/t=python3 {}", script.display());
    // A long grace: on a loaded machine a program's handler may take more
    // than the default 2 s to run, and a SIGKILL notes nothing.
    let h = Herald::start(&["--drain-period", "2s", "--exec-grace", "20s", "--exec", &program]);
    let mut execs = Vec::new();
    for _ in 0..6 {
        let mut ws = open(&h, "/t").await;
        ws.send(Message::Text("up".into())).await.unwrap();
        assert_eq!(next(&mut ws).await, Ok("up".to_owned()));
        execs.push(ws);
    }
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(h.connect("sub=t").await);
    }
    h.sigterm();
    for ws in &mut execs {
        assert_eq!(next(ws).await, Err(1001));
    }
    let times: Vec<f64> = std::fs::read_to_string(&marks)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    // Under a loaded machine a program may be killed past --exec-grace
    // before its handler runs; most note their end.
    assert!(times.len() >= 4, "too few programs noted their end: {times:?}");
    let span =
        times.iter().cloned().fold(f64::MIN, f64::max) - times.iter().cloned().fold(f64::MAX, f64::min);
    // Twelve sockets in twelve steps over 2 s, the six exec sockets in six
    // of them: their ends span five pauses of 1/12 of the period (a slow
    // machine only stretches that). Before, all six went in one instant.
    assert!(span >= 0.5, "the exec sockets were not spread: {times:?}");
    drop(sessions);
}

/// A refused exec handshake (no token where one is needed, every program
/// slot taken) leaves a warn line naming the fix, as every refusal does.
#[tokio::test]
async fn exec_refusals_are_logged() {
    let key = KeyFile::new("exec-log");
    let h = Herald::start_logged(&[
        "--auth-hmac-key-file",
        key.arg(),
        "--anonymous-subscribe",
        "public:>",
        "--exec",
        "/cat=cat",
        "--exec-max-processes",
        "1",
    ]);
    let (status, _) = h.http(&upgrade_request("/cat", "127.0.0.1", "")).await;
    assert_eq!(status, 401);
    eventually("the 401 is logged with its fix", || async {
        h.log()
            .iter()
            .any(|l| l.contains("handshake refused") && l.contains("?token="))
    })
    .await;
    let (status, _) = h.http(&upgrade_request("/ws?sub=a%20b", "127.0.0.1", "")).await;
    assert_eq!(status, 400);
    eventually("a bad URL parameter is logged", || async {
        h.log()
            .iter()
            .any(|l| l.contains("handshake refused") && l.contains("URL parameters"))
    })
    .await;
}

/// A program that exits with output still on its way loses none of it to a
/// slow reader: the wait after its exit ends only on a pipe left open and
/// empty for `--exec-grace`, not after the grace in all.
#[tokio::test]
async fn a_program_that_exits_loses_no_output_to_a_slow_reader() {
    const N: u64 = 3_000_000; // ~26 MB: more than the pipe and the socket hold
                              // The program exits at once; what it started writes on.
    let h = Herald::start(&[
        "--exec-grace",
        "1s",
        "--exec-shell",
        &format!("/burst=(seq 1 {N} &); exit 0"),
    ]);
    let mut ws = open(&h, "/burst").await;
    // Not reading for longer than the grace, while the program has exited.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut expect = 1u64;
    loop {
        match next(&mut ws).await {
            Ok(t) => {
                assert_eq!(t, expect.to_string());
                expect += 1;
            }
            Err(code) => {
                assert_eq!(code, 1000);
                break;
            }
        }
    }
    assert_eq!(expect, N + 1, "every line, then the close");
}
