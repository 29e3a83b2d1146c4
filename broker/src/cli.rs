//! `herald pub` and `herald sub`: command-line clients of a running node,
//! speaking protocol v1 over a WebSocket (fastwebsockets' client).

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use fastwebsockets::{handshake, FragmentCollector, Frame, OpCode, Payload};
use herald_protocol::url::WsUrl;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;

type Socket = FragmentCollector<TokioIo<Upgraded>>;

/// Where the node is.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// WebSocket URL of a node.
    #[arg(long, env = "HERALD_URL", default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Connection token (JWT), sent as `Authorization: Bearer` in the
    /// handshake (see `herald token`).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Opens a WebSocket to `url` (`ws://host:port/path?query`), adding
/// `query` to the URL's own.
async fn connect(target: &Target, query: &str) -> anyhow::Result<Socket> {
    let url = target.url.as_str();
    let parsed = WsUrl::parse(url)?;
    let authority = parsed.authority.as_str();
    let path = parsed.target_with(query);
    let stream = TcpStream::connect((parsed.host.as_str(), parsed.port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let mut req = Request::builder();
    if let Some(t) = target.token.as_deref().filter(|t| !t.is_empty()) {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .method("GET")
        .uri(path.as_str())
        .header(HOST, authority)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = handshake::client(&SpawnExecutor, req, stream)
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    Ok(FragmentCollector::new(ws))
}

async fn send_text(ws: &mut Socket, text: String) -> anyhow::Result<()> {
    ws.write_frame(Frame::text(Payload::Owned(text.into_bytes())))
        .await
        .context("sending")
}

/// Reads frames until the answer to request `id`: `Ok(None)` for an ack,
/// `Ok(Some((code, message)))` for an error.
async fn answer(ws: &mut Socket, id: u64) -> anyhow::Result<Option<(String, String)>> {
    loop {
        let frame = ws.read_frame().await.context("reading")?;
        match frame.opcode {
            OpCode::Text => {
                let v: Value = serde_json::from_slice(&frame.payload)?;
                if v.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                return Ok(match v.get("op").and_then(Value::as_str) {
                    Some("ack") => None,
                    _ => Some((
                        v["code"].as_str().unwrap_or("").to_owned(),
                        v["message"].as_str().unwrap_or("").to_owned(),
                    )),
                });
            }
            OpCode::Close => bail!("node closed the socket: {}", close_text(&frame.payload)),
            _ => {}
        }
    }
}

fn close_text(payload: &[u8]) -> String {
    if payload.len() < 2 {
        return "no code".into();
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    format!("{code} {}", String::from_utf8_lossy(&payload[2..]))
}

/// Publishes `data` (JSON text) to `topic`, waiting for the ack; retries
/// while the node answers `rate_limited`.
async fn publish_one(ws: &mut Socket, id: u64, topic: &str, data: &str) -> anyhow::Result<()> {
    loop {
        let req = format!(
            r#"{{"op":"pub","topic":{},"data":{data},"id":{id}}}"#,
            Value::from(topic)
        );
        send_text(ws, req).await?;
        match answer(ws, id).await? {
            None => return Ok(()),
            Some((code, _)) if code == "rate_limited" => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some((code, msg)) => bail!("{code}: {msg}"),
        }
    }
}

/// `herald pub`: publishes `data` once, or each stdin line as a JSON string.
/// `data` that is not valid JSON is sent as a JSON string.
pub async fn publish(target: &Target, topic: &str, data: Option<&str>, lines: bool) -> anyhow::Result<()> {
    let mut ws = connect(target, "").await?;
    if lines {
        let mut input = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut id = 0;
        while let Some(line) = input.next_line().await? {
            id += 1;
            let data = String::from_utf8(herald_protocol::message::json_string(&line))?;
            publish_one(&mut ws, id, topic, &data).await?;
        }
    } else {
        let data = data.ok_or_else(|| anyhow!("give DATA, or --lines to publish stdin"))?;
        let json = if herald_protocol::message::validate_json(data.as_bytes()).is_ok() {
            data.to_owned()
        } else {
            String::from_utf8(herald_protocol::message::json_string(data))?
        };
        publish_one(&mut ws, 1, topic, &json).await?;
    }
    let _ = ws.write_frame(Frame::close(1000, b"")).await;
    Ok(())
}

/// Why one connection of `herald sub` ended.
enum SubEnd {
    /// Done: the count was reached, or the node closed normally (1000).
    Done,
    /// The node refused a subscription, or closed with a terminal code.
    Terminal(anyhow::Error),
    /// Worth another connection: a lost or refused connection, a node
    /// going away (1001), a slow-consumer or heartbeat cut (4001, 4002).
    Retry(anyhow::Error),
}

/// `herald sub`: subscribes to `topics` and prints each delivery on its own
/// line (the whole frame, or only its `data`), stopping after `count`
/// deliveries when given. When the connection is lost or the node asks
/// clients to reconnect, it reconnects with jittered exponential backoff
/// and subscribes again, unless `once`. Exits 0 when done, 1 on an error.
pub async fn subscribe(
    target: &Target,
    topics: &[String],
    data_only: bool,
    count: Option<u64>,
    once: bool,
    from: Resume,
) -> anyhow::Result<()> {
    let mut seen = 0u64;
    let mut attempt = 0u32;
    let mut from = from;
    loop {
        let mut subscribed = false;
        match sub_session(
            target,
            topics,
            data_only,
            count,
            &mut seen,
            &mut subscribed,
            &mut from,
        )
        .await
        {
            SubEnd::Done => return Ok(()),
            SubEnd::Terminal(e) => return Err(e),
            SubEnd::Retry(e) if once => return Err(e),
            SubEnd::Retry(e) => {
                if subscribed {
                    attempt = 0;
                }
                let cap = 100u64 << attempt.min(6);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() as u64)
                    .unwrap_or(0);
                let delay = Duration::from_millis(cap / 2 + nanos % cap);
                eprintln!("herald sub: {e:#}; reconnecting in {delay:?}");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// Where `herald sub` starts in the history: its last position (from
/// `--since`, then from every delivery that carries one, so a reconnect
/// recovers what was missed), or the current values (`--last`).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// `(epoch, seq)` of the last message had.
    pub position: Option<(String, u64)>,
    /// Ask for each topic's latest message when there is no position.
    pub last: bool,
}

impl Resume {
    fn sub_request(&self, topic: &str, id: u64) -> String {
        let mut req = serde_json::json!({"op": "sub", "topic": topic, "id": id});
        if let Some((epoch, seq)) = &self.position {
            req["since"] = serde_json::json!({"seq": seq, "epoch": epoch});
        } else if self.last {
            req["last"] = true.into();
        }
        req.to_string()
    }

    fn track(&mut self, v: &Value) {
        if let (Some(seq), Some(epoch)) = (v["seq"].as_u64(), v["epoch"].as_str()) {
            let newer = self.position.as_ref().is_none_or(|(e, s)| e != epoch || seq > *s);
            if newer {
                self.position = Some((epoch.to_owned(), seq));
            }
        }
    }
}

async fn sub_session(
    target: &Target,
    topics: &[String],
    data_only: bool,
    count: Option<u64>,
    seen: &mut u64,
    subscribed: &mut bool,
    from: &mut Resume,
) -> SubEnd {
    let mut ws = match connect(target, "").await {
        Ok(ws) => ws,
        Err(e) => return SubEnd::Retry(e),
    };
    for (i, t) in topics.iter().enumerate() {
        if let Err(e) = send_text(&mut ws, from.sub_request(t, i as u64 + 1)).await {
            return SubEnd::Retry(e);
        }
    }
    let mut waiting = topics.len();
    let stdout = std::io::stdout();
    loop {
        if count.is_some_and(|c| *seen >= c) {
            let _ = ws.write_frame(Frame::close(1000, b"")).await;
            return SubEnd::Done;
        }
        let frame = match ws.read_frame().await {
            Ok(f) => f,
            Err(e) => return SubEnd::Retry(anyhow!("connection lost: {e}")),
        };
        match frame.opcode {
            OpCode::Text => {
                let v: Value = serde_json::from_slice(&frame.payload).unwrap_or_default();
                match v["op"].as_str() {
                    Some("ack") => {
                        if v["recovered"] == false {
                            let reason = v["reason"].as_str().unwrap_or("?");
                            eprintln!(
                                "herald sub: {}: not recovered ({reason}): messages may be missing",
                                v["topic"]
                            );
                            from.track(&v);
                        }
                        waiting = waiting.saturating_sub(1);
                        if waiting == 0 && !*subscribed {
                            *subscribed = true;
                            eprintln!("subscribed to {}", topics.join(", "));
                        }
                        continue;
                    }
                    Some("error") => {
                        let (code, msg) = (
                            v["code"].as_str().unwrap_or(""),
                            v["message"].as_str().unwrap_or(""),
                        );
                        let topic = v["id"].as_u64().and_then(|i| topics.get(i as usize - 1));
                        let Some(t) = topic else {
                            eprintln!("herald sub: {code}: {msg}");
                            continue;
                        };
                        let e = anyhow!("subscribing to {t}: {code}: {msg}");
                        return if code == "rate_limited" {
                            SubEnd::Retry(e)
                        } else {
                            SubEnd::Terminal(e)
                        };
                    }
                    _ => {}
                }
                from.track(&v);
                let mut out = stdout.lock();
                let written = if data_only {
                    match v.get("data") {
                        Some(d) => writeln!(out, "{d}"),
                        None => continue,
                    }
                } else {
                    out.write_all(&frame.payload).and_then(|()| out.write_all(b"\n"))
                };
                if let Err(e) = written.and_then(|()| out.flush()) {
                    // Standard output is gone (a closed pipe): stop.
                    return SubEnd::Terminal(e.into());
                }
                *seen += 1;
            }
            OpCode::Close => {
                let text = close_text(&frame.payload);
                let code = (frame.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                return match code {
                    Some(1000) => SubEnd::Done,
                    Some(c) if herald_protocol::ws::close::should_reconnect(c) => {
                        SubEnd::Retry(anyhow!("node closed the socket: {text}"))
                    }
                    None => SubEnd::Retry(anyhow!("node closed the socket without a code")),
                    Some(_) => SubEnd::Terminal(anyhow!("node closed the socket: {text}")),
                };
            }
            _ => {}
        }
    }
}

/// `herald check`: an end-to-end probe of a running node (or a Service in
/// front of several): subscribes over a WebSocket, publishes over HTTP, and
/// succeeds once the delivery arrives. Used by the Helm chart's test pod.
pub async fn check(target: &Target, api_key: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let topic = format!("herald:check:n{nonce}");
    let mut ws = connect(target, &format!("sub={topic}")).await?;
    let url = WsUrl::parse(&target.url)?;
    let authority = url.authority.as_str();
    let body = format!(r#"{{"topic":"{topic}","data":{{"check":"{nonce}"}}}}"#);
    let auth = api_key
        .or(target.token.as_deref())
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut http = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    http.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    http.read_to_string(&mut resp).await?;
    if !resp.starts_with("HTTP/1.1 200") {
        bail!(
            "HTTP publish refused: {}",
            resp.lines().next().unwrap_or("no response")
        );
    }
    let wait = async {
        loop {
            let frame = ws.read_frame().await.context("reading")?;
            match frame.opcode {
                OpCode::Text if String::from_utf8_lossy(&frame.payload).contains(&nonce.to_string()) => {
                    return anyhow::Ok(());
                }
                OpCode::Close => bail!("node closed the socket: {}", close_text(&frame.payload)),
                _ => {}
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("published over HTTP but nothing arrived within {timeout:?}"))??;
    println!("ok: subscribed over WebSocket, published over HTTP, delivery received");
    Ok(())
}

/// Claims of a development token (`herald token`).
#[derive(Debug, Clone, Args)]
pub struct Mint {
    /// File holding the HMAC secret (the node's --auth-hmac-key-file).
    #[arg(long)]
    pub key_file: String,
    /// User id (`sub`).
    #[arg(long)]
    pub sub: Option<String>,
    /// Patterns the token may subscribe within (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub subscribe: Vec<String>,
    /// Patterns whose topics the token may publish to.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime (e.g. 1h, 15m).
    #[arg(long, default_value = "1h", value_parser = herald_broker::parse_duration)]
    pub ttl: Duration,
    /// Audience (`aud`).
    #[arg(long)]
    pub aud: Option<String>,
    /// Issuer (`iss`).
    #[arg(long)]
    pub iss: Option<String>,
    /// Key id (`kid` header).
    #[arg(long)]
    pub kid: Option<String>,
}

/// Mints an HS256 token for development and tests.
pub fn mint(m: &Mint) -> anyhow::Result<String> {
    let key = std::fs::read(&m.key_file).with_context(|| format!("reading {}", m.key_file))?;
    let key = key.trim_ascii();
    if key.len() < 32 {
        bail!("{}: an HMAC key needs at least 32 bytes", m.key_file);
    }
    for p in m.subscribe.iter().chain(&m.publish) {
        herald_protocol::Pattern::parse(p).map_err(|e| anyhow!("{p:?}: {e}"))?;
    }
    let now = herald_broker::unix_secs();
    let mut claims = serde_json::json!({
        "iat": now,
        "exp": now + m.ttl.as_secs().max(1),
        "herald": {"subscribe": m.subscribe, "publish": m.publish},
    });
    for (k, v) in [("sub", &m.sub), ("aud", &m.aud), ("iss", &m.iss)] {
        if let Some(v) = v {
            claims[k] = serde_json::Value::String(v.clone());
        }
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid.clone_from(&m.kid);
    Ok(jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )?)
}
