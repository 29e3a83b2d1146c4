//! The harness: a real `herald` process on a free port, real WebSocket
//! clients (tokio-tungstenite, independent of the broker's own codec), a
//! byte-level client for hostile frames, and a minimal HTTP/1.1 client.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails. Not a
/// performance threshold: a generous bound so a broken build fails instead
/// of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// An HMAC key in a temporary file, for nodes with `--auth-hmac-key-file`,
/// and tokens minted with it by `herald token`; removed on drop.
pub struct KeyFile {
    dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl KeyFile {
    pub fn new(name: &str) -> KeyFile {
        let dir = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("hmac");
        std::fs::write(&path, format!("{name}-").repeat(40)).expect("key file");
        KeyFile { dir, path }
    }

    /// The file's path, as a flag value.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 path")
    }

    /// A one-hour token for user `sub` granting `subscribe`.
    pub fn token(&self, sub: &str, subscribe: &[&str]) -> String {
        let mut cmd = Command::new(herald_bin());
        cmd.args(["token", "--key-file", self.arg(), "--sub", sub]);
        for p in subscribe {
            cmd.args(["--subscribe", p]);
        }
        let out = cmd.output().expect("herald token");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8").trim().to_owned()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `herald serve`, killed on drop.
pub struct Herald {
    child: Child,
    pub addr: SocketAddr,
    /// The `--metrics-listen` address, when given.
    pub metrics: Option<SocketAddr>,
    /// What the node wrote to stderr so far, when started with
    /// [`Herald::start_logged`].
    log: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

impl Herald {
    pub fn start(args: &[&str]) -> Herald {
        Self::spawn(Command::new(herald_bin()), "127.0.0.1:0", args)
    }

    /// A node whose stderr (its log, at `--log-level warn`) is kept for
    /// [`Herald::log`] instead of passed through.
    pub fn start_logged(args: &[&str]) -> Herald {
        Self::spawn_at(Command::new(herald_bin()), "127.0.0.1:0", args, Some("warn"))
    }

    /// [`Herald::start_logged`] at another `--log-level`.
    pub fn start_logged_at(level: &str, args: &[&str]) -> Herald {
        Self::spawn_at(Command::new(herald_bin()), "127.0.0.1:0", args, Some(level))
    }

    /// The lines the node logged so far (only for [`Herald::start_logged`]).
    pub fn log(&self) -> Vec<String> {
        let log = self.log.as_ref().expect("started with start_logged");
        let text = log.lock().unwrap_or_else(|e| e.into_inner());
        text.lines().map(String::from).collect()
    }

    /// A node on a given address (to restart one on the same port).
    pub fn start_on(addr: SocketAddr, args: &[&str]) -> Herald {
        Self::spawn(Command::new(herald_bin()), &addr.to_string(), args)
    }

    /// A node whose open-file limit is `nofile` (set by the shell that
    /// then becomes the node).
    pub fn start_with_nofile(nofile: u32, args: &[&str]) -> Herald {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
            herald_bin(),
        ]);
        Self::spawn(cmd, "127.0.0.1:0", args)
    }

    /// A node started under a soft open-file limit of `soft`, the hard one
    /// left as it is.
    pub fn start_with_soft_nofile(soft: u32, args: &[&str]) -> Herald {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -Sn {soft} && exec \"$0\" \"$@\""),
            herald_bin(),
        ]);
        Self::spawn(cmd, "127.0.0.1:0", args)
    }

    fn spawn(cmd: Command, listen: &str, args: &[&str]) -> Herald {
        Self::spawn_at(cmd, listen, args, None)
    }

    /// Spawns `herald serve`; with `logged`, at that level, its stderr kept.
    fn spawn_at(mut cmd: Command, listen: &str, args: &[&str], logged: Option<&str>) -> Herald {
        cmd.stderr(if logged.is_some() {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        let mut child = cmd
            .arg("serve")
            .args(["--listen", listen, "--log-level", logged.unwrap_or("warn")])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let log = child.stderr.take().map(|stderr| {
            let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let keep = log.clone();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stderr);
                let mut line = String::new();
                while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                    eprint!("{line}");
                    keep.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line);
                    line.clear();
                }
            });
            log
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read listen line");
        let addr = line
            .trim()
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        let metrics = args.contains(&"--metrics-listen").then(|| {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read metrics line");
            line.trim()
                .strip_prefix("herald metrics on ")
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .parse()
                .expect("address")
        });
        Herald {
            child,
            addr,
            metrics,
            log,
        }
    }

    /// Runs `herald serve` with `args`, expecting it to refuse to start:
    /// its stderr. Fails if it starts listening or does not exit.
    pub fn refusal(args: &[&str]) -> String {
        let mut child = Command::new(herald_bin())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herald serve {args:?} started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().expect("output");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(!status.success(), "herald serve {args:?} exited 0: {stderr}");
        assert!(
            !stdout.contains("herald listening"),
            "herald serve {args:?} bound its port before refusing: {stdout}"
        );
        stderr
    }

    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/ws", self.addr)
        } else {
            format!("ws://{}/ws?{query}", self.addr)
        }
    }

    pub async fn connect(&self, query: &str) -> Client {
        Client::connect(&self.url(query)).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills this process at once (SIGKILL, by PID): no drain, no goodbye.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM to this process (by PID).
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "herald did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub async fn http(&self, raw_request: &str) -> (u16, String) {
        http(self.addr, raw_request.as_bytes()).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        self.http(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
        .await
    }

    pub async fn post(&self, path: &str, headers: &str, body: &str) -> (u16, String) {
        self.http(&format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        ))
        .await
    }

    pub async fn publish(&self, topic: &str, data: &str) {
        let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
        let (status, text) = self.post("/v1/publish", "", &body).await;
        assert_eq!(status, 200, "{text}");
    }

    /// The value of an unlabelled metric (or `name{label}` as written).
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing"))
            .trim()
            .parse()
            .expect("number")
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one HTTP request on a fresh connection; returns the whole answer,
/// head and body.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("http response");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one HTTP request on a fresh connection; returns status and body.
pub async fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let text = http_raw(addr, request).await;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for an answer, handed out by `recv` first.
    pending: std::collections::VecDeque<String>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client {
            ws,
            pending: Default::default(),
        }
    }

    /// A client whose socket takes at most about `rcvbuf` bytes ahead of
    /// its reads (the kernel's buffer would otherwise hold megabytes).
    pub async fn connect_small(addr: SocketAddr, url: &str, rcvbuf: u32) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = sock.connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Client {
            ws,
            pending: Default::default(),
        }
    }

    /// Sends several text frames in one write (the node reads them in one
    /// go, before anything it spawned for the first can run).
    pub async fn send_together(&mut self, texts: &[String]) {
        for t in texts {
            self.ws.feed(Message::Text(t.clone())).await.expect("feed");
        }
        self.ws.flush().await.expect("flush");
    }

    pub async fn send(&mut self, text: impl Into<String>) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    /// Next text frame, skipping pings and pongs.
    pub async fn recv_text(&mut self) -> String {
        if let Some(t) = self.pending.pop_front() {
            return t;
        }
        self.next_text().await
    }

    async fn next_text(&mut self) -> String {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a message")
                .expect("stream ended")
                .expect("websocket error");
            match m {
                Message::Text(t) => return t,
                Message::Close(c) => panic!("closed while waiting for a message: {c:?}"),
                _ => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        let t = self.recv_text().await;
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON: {t:?}: {e}"))
    }

    /// Sends a request with `id` and returns the answer for it; frames that
    /// arrive first (deliveries) stay queued for `recv`.
    pub async fn request(&mut self, req: Value) -> Value {
        let id = req["id"].clone();
        self.send(req.to_string()).await;
        loop {
            let t = self.next_text().await;
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            if v["id"] == id && v.get("op").is_some() {
                return v;
            }
            self.pending.push_back(t);
        }
    }

    pub async fn sub(&mut self, topic: &str) {
        let v = self
            .request(serde_json::json!({"op":"sub","topic":topic,"id":topic}))
            .await;
        assert_eq!(v["op"], "ack", "sub {topic}: {v}");
    }

    pub async fn publish(&mut self, topic: &str, data: Value) {
        let v = self
            .request(serde_json::json!({"op":"pub","topic":topic,"data":data,"id":"p"}))
            .await;
        assert_eq!(v["op"], "ack", "pub {topic}: {v}");
    }

    /// Waits for the close frame; returns its code and reason.
    pub async fn recv_close(&mut self) -> (u16, String) {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match m {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.into_owned()),
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("error before close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }
}

/// A WebSocket handshake for `path` sent as `Host: host`, with `extra`
/// header lines (each ending in `\r\n`); a refused one closes the
/// connection, so [`Herald::http`] reads the whole answer.
pub fn upgrade_request(path: &str, host: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Upgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A byte-level WebSocket client: sends arbitrary frames, reads server frames.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

pub const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

impl RawWs {
    pub async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, addr, path).await
    }

    pub async fn handshake(mut stream: TcpStream, addr: SocketAddr, path: &str) -> RawWs {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("handshake timed out")
                .expect("read");
            assert!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "bad accept key: {head}"
        );
        buf.drain(..end);
        RawWs { stream, buf }
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    /// Next server frame: (opcode byte, payload); `None` at EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let len7 = (self.buf[1] & 0x7f) as usize;
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are unmasked");
                let (len, hl) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.buf.len() >= hl + len {
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[hl..hl + len].to_vec();
                    self.buf.drain(..hl + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("timed out reading a frame"),
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until a close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        while let Some((op, payload)) = self.read_frame().await {
            if op == 0x8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
        panic!("connection ended without a close frame");
    }
}

/// Polls `f` until it returns true or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
