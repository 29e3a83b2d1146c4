//! A lean WebSocket client and the three target adapters.
//!
//! The client does its own handshake and framing (masking what it sends,
//! reading unmasked server frames) so it costs as little CPU per message as
//! possible: a load generator must not be the bottleneck it measures.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use herald_protocol::url::WsUrl;
use herald_protocol::ws::{put_client_frame, OpCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// Which server protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum Target {
    /// Herald's protocol v1 (`sub` with ack, `pub`, JSON deliveries).
    Herald,
    /// The NATS client protocol over nats-server's WebSocket listener.
    NatsWs,
    /// A server that broadcasts every message it receives to every client
    /// (no topics): the classic Node `ws` chat server.
    WsBroadcast,
}

/// A parsed `ws://host:port/path` URL.
#[derive(Debug, Clone)]
pub struct Url {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> anyhow::Result<Url> {
        let url = WsUrl::parse(s)?;
        let ip: IpAddr = match url.host.as_str() {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            h => h
                .parse()
                .with_context(|| format!("{s}: host must be an IP address"))?,
        };
        let addr = SocketAddr::new(ip, url.port);
        if !addr.ip().is_loopback() {
            bail!("{s}: load goes to loopback targets only");
        }
        Ok(Url {
            addr,
            host: url.authority.clone(),
            path: url.target,
        })
    }
}

/// One client connection, split for a reader task and a writer.
pub struct Conn {
    pub rd: Reader,
    pub wr: Writer,
}

pub struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
    /// Payload bytes of the frame last returned, dropped on the next read.
    consumed: usize,
}

pub struct Writer {
    half: OwnedWriteHalf,
    out: Vec<u8>,
    mask: u32,
}

/// A frame from the server: opcode and payload (a view into the reader's
/// buffer, valid until the next read).
pub struct Frame {
    pub opcode: u8,
    pub len: usize,
}

/// Opens a TCP connection from `source` (a loopback address, so many
/// processes can each use their own ephemeral port range) and upgrades it.
pub async fn connect(url: &Url, query: &str, source: Option<IpAddr>) -> anyhow::Result<Conn> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream: TcpStream = socket
        .connect(url.addr)
        .await
        .with_context(|| format!("connect {}", url.addr))?;
    stream.set_nodelay(true)?;
    let (half_r, half_w) = stream.into_split();
    let mut c = Conn {
        rd: Reader {
            half: half_r,
            // Small until frames need more: a million idle sockets hold these.
            buf: BytesMut::with_capacity(1024),
            consumed: 0,
        },
        wr: Writer {
            half: half_w,
            out: Vec::new(),
            mask: 0x5a17_c3e9,
        },
    };
    let path = if query.is_empty() {
        url.path.clone()
    } else if url.path.contains('?') {
        format!("{}&{query}", url.path)
    } else {
        format!("{}?{query}", url.path)
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        url.host
    );
    c.wr.half.write_all(req.as_bytes()).await?;
    loop {
        if let Some(end) = c.rd.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&c.rd.buf[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 101") {
                let retry = retry_after(&head)
                    .map(|s| format!(" (retry after {s} s)"))
                    .unwrap_or_default();
                bail!("handshake refused: {}{retry}", head.lines().next().unwrap_or(""));
            }
            c.rd.buf.advance(end + 4);
            return Ok(c);
        }
        if c.rd.half.read_buf(&mut c.rd.buf).await? == 0 {
            bail!("closed during handshake");
        }
    }
}

impl Reader {
    /// The next whole frame; `None` at EOF. Its payload is
    /// [`Reader::payload`] until the next call.
    pub async fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        self.buf.advance(std::mem::take(&mut self.consumed));
        loop {
            if let Some((hl, len, op)) = parse_header(&self.buf) {
                if self.buf.len() >= hl + len {
                    self.buf.advance(hl);
                    self.consumed = len;
                    return Ok(Some(Frame { opcode: op, len }));
                }
                self.buf.reserve(hl + len - self.buf.len());
            }
            if self.buf.capacity() - self.buf.len() < 512 {
                self.buf.reserve(8 * 1024);
            }
            if self.half.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The payload of the frame last returned by [`Reader::next`].
    pub fn payload(&self, f: &Frame) -> &[u8] {
        &self.buf[..f.len]
    }
}

fn parse_header(b: &[u8]) -> Option<(usize, usize, u8)> {
    if b.len() < 2 {
        return None;
    }
    let op = b[0] & 0x0f;
    match b[1] & 0x7f {
        126 if b.len() >= 4 => Some((4, u16::from_be_bytes([b[2], b[3]]) as usize, op)),
        127 if b.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            Some((10, u64::from_be_bytes(n) as usize, op))
        }
        126 | 127 => None,
        n => Some((2, n as usize, op)),
    }
}

impl Writer {
    /// Appends one masked frame to the pending output.
    pub fn frame(&mut self, op: OpCode, payload: &[u8]) {
        self.mask = self.mask.rotate_left(7) ^ 0x9e37_79b9;
        put_client_frame(&mut self.out, true, op, self.mask.to_ne_bytes(), payload);
    }

    pub fn text(&mut self, payload: &[u8]) {
        self.frame(OpCode::Text, payload)
    }

    /// Writes everything pending in one system call (or as few as it takes).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.out.is_empty() {
            self.half.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    pub fn pending(&self) -> usize {
        self.out.len()
    }

    pub async fn close(&mut self) {
        self.frame(OpCode::Close, &1000u16.to_be_bytes());
        let _ = self.flush().await;
        let _ = self.half.shutdown().await;
    }
}

/// Nanoseconds since the Unix epoch: the clock every process on the machine
/// shares, so latency can be measured across processes.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The message body every target carries: `T<send ns>:<seq>:` padded with
/// `x` to `size` bytes.
pub fn body(ts: u64, seq: u64, size: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    out.clear();
    let _ = write!(out, "T{ts}:{seq}:");
    while out.len() < size {
        out.push(b'x');
    }
}

/// The send timestamp in a payload that contains a body.
pub fn timestamp(payload: &[u8]) -> Option<u64> {
    let at = memchr_t(payload)?;
    let mut v: u64 = 0;
    let mut any = false;
    for &b in &payload[at + 1..] {
        if b.is_ascii_digit() {
            v = v * 10 + (b - b'0') as u64;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(v)
}

fn memchr_t(p: &[u8]) -> Option<usize> {
    // The body starts right after `"data":"` (Herald), at the payload start
    // (broadcast) or after the MSG line (NATS): find `T` followed by a digit.
    p.windows(2).position(|w| w[0] == b'T' && w[1].is_ascii_digit())
}

/// What each target needs to subscribe, publish and recognise deliveries.
impl Target {
    /// Query string that subscribes at connect time, if the target has one.
    pub fn url_query(self, topic: &str) -> String {
        match self {
            Target::Herald => format!("sub={topic}"),
            _ => String::new(),
        }
    }

    /// Completes a subscription to `topic` on a fresh connection: for
    /// Herald the URL did it (an ack is awaited through a no-op `sub`), for
    /// NATS a CONNECT/SUB/PING answered by PONG.
    pub async fn subscribe(self, c: &mut Conn, topic: &str) -> anyhow::Result<()> {
        match self {
            Target::Herald => {
                c.wr.text(format!(r#"{{"op":"sub","topic":"{topic}","id":0}}"#).as_bytes());
                c.wr.flush().await?;
                loop {
                    let f = c.rd.next().await?.ok_or_else(|| anyhow!("closed"))?;
                    let p = c.rd.payload(&f);
                    if p.starts_with(br#"{"op":"ack""#) {
                        return Ok(());
                    }
                    if p.starts_with(br#"{"op":"error""#) {
                        bail!("{}", String::from_utf8_lossy(p));
                    }
                }
            }
            Target::NatsWs => {
                let subject = topic.replace(':', ".");
                let cmd = format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":false}}\r\nSUB {subject} 1\r\nPING\r\n"
                );
                c.wr.frame(OpCode::Binary, cmd.as_bytes());
                c.wr.flush().await?;
                let mut acc = Vec::new();
                loop {
                    let f = c.rd.next().await?.ok_or_else(|| anyhow!("closed"))?;
                    acc.extend_from_slice(c.rd.payload(&f));
                    if acc.windows(6).any(|w| w == b"PONG\r\n") {
                        return Ok(());
                    }
                    if acc.windows(4).any(|w| w == b"-ERR") {
                        bail!("{}", String::from_utf8_lossy(&acc));
                    }
                }
            }
            Target::WsBroadcast => Ok(()),
        }
    }

    /// Prepares a publishing connection (NATS needs CONNECT first).
    pub fn hello(self, w: &mut Writer) {
        if self == Target::NatsWs {
            w.frame(
                OpCode::Binary,
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":false}\r\n",
            );
        }
    }

    /// Appends one publish of `body` on `topic` to the writer.
    pub fn publish(self, w: &mut Writer, topic: &str, body: &[u8], scratch: &mut Vec<u8>) {
        scratch.clear();
        match self {
            Target::Herald => {
                scratch.extend_from_slice(br#"{"op":"pub","topic":""#);
                scratch.extend_from_slice(topic.as_bytes());
                scratch.extend_from_slice(br#"","data":""#);
                scratch.extend_from_slice(body);
                scratch.extend_from_slice(br#""}"#);
                w.frame(OpCode::Text, scratch);
            }
            Target::NatsWs => {
                use std::io::Write;
                let _ = write!(scratch, "PUB {} {}\r\n", topic.replace(':', "."), body.len());
                scratch.extend_from_slice(body);
                scratch.extend_from_slice(b"\r\n");
                w.frame(OpCode::Binary, scratch);
            }
            Target::WsBroadcast => w.frame(OpCode::Text, body),
        }
    }
}

/// A refused handshake's `Retry-After` in seconds, if it has one.
fn retry_after(head: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())?
    })
}

/// The seconds a refusal from [`connect`] asked to wait, if any.
pub fn asked_to_wait(e: &anyhow::Error) -> Option<u64> {
    let s = e.to_string();
    let at = s.find(" (retry after ")? + " (retry after ".len();
    s[at..].split(' ').next()?.parse().ok()
}
