//! Malformed and hostile input at every layer: JSON requests, WebSocket
//! frames at the byte level, and HTTP. Each gets a clear answer (an error
//! frame, a close code with a reason, an HTTP status with a message); after
//! all of them the node still serves the clients it had and new ones.

use herald_protocol::ws::{encode_client_frame, OpCode};
use serde_json::json;

use crate::common::*;

/// Requests answered with an error frame of the given code; the socket stays.
fn bad_requests() -> Vec<(String, &'static str)> {
    let mut v: Vec<(String, &str)> = vec![
        ("{".into(), "bad_json"),
        ("".into(), "bad_json"),
        ("   ".into(), "bad_json"),
        ("nul".into(), "bad_json"),
        ("[]".into(), "bad_request"),
        ("null".into(), "bad_request"),
        ("\"sub\"".into(), "bad_request"),
        ("123".into(), "bad_request"),
        (r#"{"op":1}"#.into(), "bad_request"),
        (r#"{"op":null,"topic":"a"}"#.into(), "bad_request"),
        (r#"{"op":"\u0073ub","topic":"a"}"#.into(), "bad_request"),
        (r#"{"topic":"a"}"#.into(), "bad_request"),
        (r#"{"op":"nope"}"#.into(), "unknown_op"),
        (r#"{"op":"SUB","topic":"a"}"#.into(), "unknown_op"),
        (r#"{"op":"sub"}"#.into(), "bad_request"),
        (r#"{"op":"sub","topic":5}"#.into(), "bad_request"),
        (r#"{"op":"sub","topic":""}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a..b"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a::b"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":":a"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a b"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a.b"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":">:a"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a*"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"caf\u00e9"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"café"}"#.into(), "bad_topic"),
        (r#"{"op":"sub","topic":"a\nb"}"#.into(), "bad_topic"),
        (r#"{"op":"pub","topic":"a:*","data":1}"#.into(), "bad_topic"),
        (r#"{"op":"pub","topic":"a:>","data":1}"#.into(), "bad_topic"),
        (r#"{"op":"pub","topic":"a"}"#.into(), "bad_request"),
        (r#"{"op":"pub","topic":"a","data":}"#.into(), "bad_json"),
        (r#"{"op":"pub","topic":"a","data":1,}"#.into(), "bad_json"),
        (r#"{"op":"pub","topic":"a","data":NaN}"#.into(), "bad_json"),
        (r#"{"op":"pub","topic":"a","data":'x'}"#.into(), "bad_json"),
        (r#"{"op":"pub","topic":"a","data":1} trailing"#.into(), "bad_json"),
        (r#"{"op":"sub","topic":"a","id":{}}"#.into(), "bad_request"),
        (r#"{"op":"sub","topic":"a","id":[1]}"#.into(), "bad_request"),
        (r#"{"op":"sub","topic":"a","id":true}"#.into(), "bad_request"),
        (
            format!(r#"{{"op":"sub","topic":"a","id":"{}"}}"#, "i".repeat(100)),
            "bad_request",
        ),
        (r#"{"op":"sub","op":"pub","topic":"a"}"#.into(), "bad_request"),
        (r#"{"op":"unsub","topic":"never"}"#.into(), "not_subscribed"),
        (
            format!(r#"{{"op":"sub","topic":"{}"}}"#, "a".repeat(300)),
            "bad_topic",
        ),
        (
            format!(r#"{{"op":"sub","topic":"{}"}}"#, ["s"; 17].join(":")),
            "bad_topic",
        ),
    ];
    // Deep nesting that never closes: refused without recursion trouble.
    let deep = format!(r#"{{"op":"pub","topic":"a","data":{}1}}"#, "[".repeat(400));
    v.push((deep, "bad_json"));
    v
}

/// Byte-level frames after a good handshake, each on its own socket, and the
/// close code each must get.
fn bad_frames() -> Vec<(&'static str, Vec<u8>, u16)> {
    let m = MASK;
    let mut interleaved = encode_client_frame(false, OpCode::Text, m, b"a");
    interleaved.extend(encode_client_frame(true, OpCode::Text, m, b"b"));
    let mut too_big_frags = encode_client_frame(false, OpCode::Text, m, &[b'a'; 800]);
    too_big_frags.extend(encode_client_frame(true, OpCode::Continuation, m, &[b'a'; 800]));
    let mut split_utf8 = encode_client_frame(false, OpCode::Text, m, &[0xE2, 0x82]);
    split_utf8.extend(encode_client_frame(true, OpCode::Continuation, m, &[0x28]));
    vec![
        ("unmasked text", vec![0x81, 0x02, b'h', b'i'], 1002),
        ("rsv1 set", vec![0xC1, 0x80, 0, 0, 0, 0], 1002),
        ("rsv3 set", vec![0x91, 0x80, 0, 0, 0, 0], 1002),
        ("opcode 3", vec![0x83, 0x80, 0, 0, 0, 0], 1002),
        ("opcode 0xB", vec![0x8B, 0x80, 0, 0, 0, 0], 1002),
        (
            "orphan continuation",
            encode_client_frame(true, OpCode::Continuation, m, b"x"),
            1002,
        ),
        (
            "fragmented ping",
            encode_client_frame(false, OpCode::Ping, m, b""),
            1002,
        ),
        (
            "ping over 125 bytes",
            encode_client_frame(true, OpCode::Ping, m, &[0; 126]),
            1002,
        ),
        ("interleaved messages", interleaved, 1002),
        (
            "close with 1 byte",
            encode_client_frame(true, OpCode::Close, m, &[3]),
            1002,
        ),
        (
            "close code 999",
            encode_client_frame(true, OpCode::Close, m, &[0x03, 0xE7]),
            1002,
        ),
        (
            "close code 1005",
            encode_client_frame(true, OpCode::Close, m, &[0x03, 0xED]),
            1002,
        ),
        (
            "close reason not utf-8",
            encode_client_frame(true, OpCode::Close, m, &[0x03, 0xE8, 0xFF]),
            1007,
        ),
        (
            "text not utf-8",
            encode_client_frame(true, OpCode::Text, m, &[0xC3, 0x28]),
            1007,
        ),
        ("utf-8 split across fragments, invalid", split_utf8, 1007),
        (
            "64-bit length top bit",
            vec![0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
            1002,
        ),
        (
            "length over the limit",
            vec![0x81, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4],
            1009,
        ),
        ("fragments over the limit", too_big_frags, 1009),
    ]
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n";

/// HTTP requests and the status each must get.
fn bad_http() -> Vec<(String, u16)> {
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
    };
    let up = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}{key}\r\n");
    let post = |body: &str| {
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    vec![
        (get("/ws", ""), 426),
        (format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n"), 400),
        (
            format!("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 8\r\n{key}\r\n"),
            400,
        ),
        (up("/ws?sub=a..b"), 400),
        (up("/ws?sub=%zz"), 400),
        (up("/ws?sub=%FF"), 400),
        (up("/ws?format=raw"), 400),
        (up("/ws?topic=a"), 400),
        (up("/ws?topic=a:*&format=raw"), 400),
        (up("/ws?format=xml"), 400),
        (up("/ws?name="), 400),
        (get("/nope", ""), 404),
        (get("/v1/publish", ""), 405),
        (post("{"), 400),
        (post(""), 400),
        (post("[1,2]"), 400),
        (post(r#"{"topic":"a"}"#), 400),
        (post(r#"{"topic":"a b","data":1}"#), 400),
        (post(r#"[{"topic":"a","data":1},{"topic":"*","data":1}]"#), 400),
        ("HELLO\r\n\r\n".into(), 400),
        (format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000)), 431),
    ]
}

#[tokio::test]
async fn hostile_inputs_get_clear_answers_and_harm_no_one() {
    let mut h = Herald::start(&["--max-message-bytes", "1024"]);
    let mut old = h.connect("sub=keep").await;
    let mut total = 0;

    let mut c = h.connect("").await;
    for (req, code) in bad_requests() {
        c.send(req.clone()).await;
        let v = c.recv().await;
        assert_eq!(v["op"], "error", "{req:?} -> {v}");
        assert_eq!(v["code"], code, "{req:?} -> {v}");
        assert!(!v["message"].as_str().unwrap().is_empty());
        total += 1;
    }
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(c.recv().await["code"], "binary_unsupported");
    total += 1;
    // The same socket still works after all of that.
    c.sub("keep").await;

    for (what, bytes, code) in bad_frames() {
        let mut raw = RawWs::connect(h.addr, "/ws").await;
        raw.send_bytes(&bytes).await;
        let (got, reason) = raw.expect_close().await;
        assert_eq!(got, code, "{what}: {reason}");
        assert!(!reason.is_empty(), "{what}: close without a reason");
        total += 1;
    }

    for (req, status) in bad_http() {
        let (got, body) = h.http(&req).await;
        assert_eq!(got, status, "{:?} -> {body}", &req[..req.len().min(60)]);
        total += 1;
    }

    let not_utf8 =
        b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\n\xff\xfe\x00";
    let (got, body) = http(h.addr, not_utf8).await;
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("bad_json"), "{body}");
    total += 1;

    // A handshake followed by garbage bytes, and a client that vanishes
    // mid-frame.
    let mut raw = RawWs::connect(h.addr, "/ws").await;
    raw.send_bytes(&[0xFF; 64]).await;
    assert_eq!(raw.expect_close().await.0, 1002);
    let mut raw = RawWs::connect(h.addr, "/ws").await;
    raw.send_bytes(&encode_client_frame(true, OpCode::Text, MASK, b"{\"op\":\"pub\"")[..8])
        .await;
    drop(raw);
    total += 2;

    assert!(h.is_running(), "the node died after {total} hostile inputs");
    // The node saw each hostile frame and refused it once: every table
    // entry and the garbage bytes, not the client that vanished.
    eventually("every protocol error counted", || async {
        h.metric("herald_protocol_errors_total").await >= (bad_frames().len() + 1) as f64
    })
    .await;
    assert_eq!(
        h.metric("herald_protocol_errors_total").await,
        (bad_frames().len() + 1) as f64
    );

    // Old and new clients are served.
    let mut new = h.connect("sub=keep").await;
    h.publish("keep", r#"{"still":"serving"}"#).await;
    for client in [&mut old, &mut c, &mut new] {
        assert_eq!(
            client.recv().await,
            json!({"topic":"keep","data":{"still":"serving"}})
        );
    }
}

use futures_util::SinkExt;

#[tokio::test]
async fn an_unknown_route_names_every_route() {
    let h = Herald::start(&["--exec", "/count=true"]);
    let (status, body) = h.get("/nope").await;
    assert_eq!(status, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["code"], "not_found");
    let msg = v["error"]["message"].as_str().unwrap();
    for route in [
        "/ws",
        "/v1/publish",
        "/healthz",
        "/readyz",
        "/metrics",
        "/herald.js",
        "/ (the demo page)",
        "/status",
        "/count (WebSocket, --exec)",
    ] {
        assert!(msg.contains(route), "{route} missing from {msg:?}");
    }
}

/// A browser page may open sockets only from an allowed origin: by default
/// the node's own host; clients that send no Origin are not browsers.
#[tokio::test]
async fn only_allowed_origins_may_open_sockets() {
    let handshake = |host: &str, origin: Option<&str>| {
        let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
        upgrade_request("/ws", host, &origin)
    };
    async fn status(h: &Herald, req: String) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        (
            text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0),
            text,
        )
    }
    let h = Herald::start(&[]);
    let host = h.addr.to_string();
    let own = format!("http://{host}");
    assert_eq!(status(&h, handshake(&host, None)).await.0, 101, "no Origin");
    assert_eq!(status(&h, handshake(&host, Some(&own))).await.0, 101, "same host");
    for bad in ["https://evil.example", "null"] {
        let (code, text) = status(&h, handshake(&host, Some(bad))).await;
        assert_eq!(code, 403, "{bad}: {text}");
        assert!(text.contains("origin_not_allowed"), "{text}");
    }
    let h = Herald::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org,null",
    ]);
    let host = h.addr.to_string();
    for ok in ["https://app.example.com", "https://a.example.org", "null"] {
        assert_eq!(status(&h, handshake(&host, Some(ok))).await.0, 101, "{ok}");
    }
    for bad in ["https://evil.example", &format!("http://{host}")] {
        assert_eq!(status(&h, handshake(&host, Some(bad))).await.0, 403, "{bad}");
    }
}

/// Every answer echoes the request's id as the JSON text the client sent,
/// byte for byte: ids a JSON value would rewrite (`1e999` becomes `null`,
/// a long integer a float) come back unchanged, for every op, ack or error.
#[tokio::test]
async fn every_answer_echoes_the_id_as_sent() {
    let h = Herald::start(&["--presence", "chat:*"]);
    let mut c = h.connect("").await;
    let ids = [
        "1e999",
        "123456789012345678901234567890",
        "-0.50",
        r#""\u00e9""#,
        "12345678901234567890",
    ];
    let requests = [
        r#"{"op":"presence","topic":"chat:lobby","id":ID}"#,
        r#"{"op":"presence_stats","topic":"chat:lobby","id":ID}"#,
        r#"{"op":"presence","topic":"news:x","id":ID}"#,
        r#"{"op":"sub","topic":"chat:lobby","id":ID}"#,
        r#"{"op":"sub","topic":"a..b","id":ID}"#,
        r#"{"op":"pub","topic":"chat:lobby","data":1,"id":ID}"#,
        r#"{"op":"unsub","topic":"chat:lobby","id":ID}"#,
        r#"{"op":"auth","token":"x","id":ID}"#,
        r#"{"op":"nope","id":ID}"#,
    ];
    for id in ids {
        for req in requests {
            let req = req.replace("ID", id);
            c.send(req.clone()).await;
            // Deliveries of its own publish come first; the answer names an op.
            let answer = loop {
                let t = c.recv_text().await;
                if t.starts_with("{\"topic\"") && !t.contains("\"op\"") {
                    continue;
                }
                break t;
            };
            assert!(
                answer.contains(&format!("\"id\":{id},")) || answer.contains(&format!("\"id\":{id}}}")),
                "{req} -> {answer}"
            );
        }
    }
}

/// A refused handshake says why in the log, at warn, naming the fix; a
/// flood of them adds at most one line per reason per 10 s window.
#[tokio::test]
async fn refused_handshakes_are_logged_once_per_reason_per_window() {
    let h = Herald::start_logged(&[]);
    let host = h.addr.to_string();
    let started = std::time::Instant::now();
    let from_page = upgrade_request("/ws", &host, "Origin: http://localhost:3000\r\n");
    let (status, body) = h.http(&from_page).await;
    assert_eq!(status, 403, "{body}");
    let origin_lines = |h: &Herald| {
        h.log()
            .into_iter()
            .filter(|l| l.contains("WARN") && l.contains("http://localhost:3000"))
            .collect::<Vec<_>>()
    };
    eventually("the refusal is logged", || async { !origin_lines(&h).is_empty() }).await;
    let line = origin_lines(&h).remove(0);
    assert!(
        line.contains("--allowed-origins http://localhost:3000"),
        "names the fix: {line}"
    );
    for _ in 0..50 {
        assert_eq!(h.http(&from_page).await.0, 403);
    }
    // Another reason is logged on its own; once its line is there, so is
    // any the burst wrote before it.
    let (status, _) = h.get("/ws").await;
    assert_eq!(status, 426);
    eventually("the other reason is logged", || async {
        h.log()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("Upgrade: websocket"))
    })
    .await;
    let windows = 1 + started.elapsed().as_secs() as usize / 10;
    let n = origin_lines(&h).len();
    assert!(
        n <= windows,
        "{n} lines for one reason in {windows} window(s): {:?}",
        origin_lines(&h)
    );
}

/// A request target hyper refuses (`>` sent bare, as curl or a hand-built
/// URL may; browsers send `%3E`) gets the JSON error of every other
/// handshake refusal, naming the character, not an empty 400; the encoded
/// form still subscribes.
#[tokio::test]
async fn a_bare_wildcard_in_the_url_gets_a_json_refusal() {
    let h = Herald::start(&[]);
    for path in ["/ws?sub=chat:>", "/ws?sub=<b>", "/ws?sub=\"x\""] {
        let (status, body) = h.http(&upgrade_request(path, "x", "")).await;
        assert_eq!(status, 400, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
        assert_eq!(v["error"]["code"], "bad_request", "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("percent-encode"),
            "{path}: {v}"
        );
    }
    let (_, body) = h.http(&upgrade_request("/ws?sub=chat:>", "x", "")).await;
    assert!(body.contains("%3E"), "{body}");
    let mut c = h.connect("sub=chat:%3E").await;
    h.publish("chat:lobby", "1").await;
    assert_eq!(c.recv().await["data"], 1);
}

/// The rows of docs/protocol.md's close-code table, as `(code, text)`.
fn close_rows() -> Vec<(u16, String)> {
    let doc = include_str!("../../../docs/protocol.md");
    let section = doc.split("## Close codes").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            Some((cells.get(1)?.parse().ok()?, l.to_owned()))
        })
        .collect()
}

/// A close whose reason is not UTF-8 gets 1007 (RFC 6455 §7.4.1), and the
/// docs' 1007 row says so; a client's close code, 4321 say, is echoed as
/// RFC 6455 §5.5.1 asks, and the docs say that too.
#[tokio::test]
async fn close_answers_are_the_documented_ones() {
    let h = Herald::start(&[]);
    let mut raw = RawWs::connect(h.addr, "/ws").await;
    raw.send_bytes(&encode_client_frame(
        true,
        OpCode::Close,
        MASK,
        &[0x03, 0xE8, 0xFF, 0xFE],
    ))
    .await;
    let (code, reason) = raw.expect_close().await;
    assert_eq!(code, 1007, "{reason}");
    let rows = close_rows();
    let (_, row) = rows.iter().find(|(c, _)| *c == code).expect("1007 documented");
    assert!(row.contains("close frame's reason"), "docs' 1007 row: {row}");
    assert!(
        !rows.iter().any(|(c, l)| *c == 1002 && l.contains("reason")),
        "docs list a bad close reason under 1002"
    );

    let mut raw = RawWs::connect(h.addr, "/ws").await;
    raw.send_bytes(&encode_client_frame(
        true,
        OpCode::Close,
        MASK,
        &[0x10, 0xE1, b'b', b'y', b'e'],
    ))
    .await;
    let (code, _) = raw.expect_close().await;
    assert_eq!(code, 4321, "the client's code, echoed");
    let doc = include_str!("../../../docs/protocol.md");
    let section = doc
        .split("## Close codes")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    assert!(
        section.contains("client's own code") && section.contains("4321 gets 4321 back"),
        "docs/protocol.md's close codes say a client's code is echoed"
    );
}

/// The `unknown_op` row of docs/protocol.md names every op the node's own
/// answer lists.
#[tokio::test]
async fn the_unknown_op_row_names_every_op() {
    let h = Herald::start(&[]);
    let mut c = h.connect("").await;
    let v = c.request(json!({"op":"nope","id":1})).await;
    assert_eq!(v["code"], "unknown_op", "{v}");
    let msg = v["message"].as_str().unwrap();
    let list = msg.split("expected ").nth(1).expect("the ops listed");
    let ops: Vec<&str> = list
        .split([',', ' '])
        .filter(|w| !w.is_empty() && *w != "or")
        .collect();
    assert!(ops.contains(&"presence_stats"), "{msg}");
    let doc = include_str!("../../../docs/protocol.md");
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `unknown_op` |"))
        .expect("row");
    for op in ops {
        assert!(
            row.contains(&format!("`{op}`")),
            "unknown_op row omits {op}: {row}"
        );
    }
}
