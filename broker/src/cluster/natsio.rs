//! The cluster link's topic traffic on a NATS connection of its own:
//! every subject subscription of the node and every plain publish travel
//! on one socket, and one task reads what arrives, in the server's order.
//!
//! Why not the NATS client library for this: it gives each subscription a
//! channel and a task of its own (about 8 KB before any message arrives: a
//! node holding 20,000 `user:N` topics spent 160 MB on them), and hands
//! the messages of different subscriptions over in no common order. Here a
//! subscription is a map entry, and a PING after SUBs is answered once the
//! server has applied them: the barrier a `sub`'s ack waits for. Publishes
//! share the socket so that `echo:false` keeps the node's own messages
//! from coming back to it. JetStream, the status page and presence
//! snapshots keep the library's connection ([`crate::cluster::link`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::rustls;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::cluster::link::{self, Io, LinkAuth, LinkError, Server, ANSWER_TIMEOUT, MAX_LINE};
use crate::metrics::Metrics;
use crate::sync::Lock;

/// Headers of a message sent (presence notices): names and values
/// without line breaks.
pub type Headers = Vec<(&'static str, String)>;

/// Where the reader hands what arrives.
pub trait Dispatch: Send + Sync + 'static {
    /// A message on `subject` that came through the subscription to `key`
    /// (`headers`: the raw header block, `NATS/1.0` line included).
    fn message(&self, key: &str, wildcard: bool, subject: &str, headers: Option<&[u8]>, payload: &[u8]);
}

/// A PING this often; [`MAX_UNANSWERED`] left unanswered end the
/// connection. A server applies a connection's commands in order, so a
/// PING waits behind the SUBs sent before it: a node subscribing 17,000
/// topics to a server taking 2,000,000 waited more than 40 s for one.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// PINGs left unanswered that end the connection (90 s of silence).
const MAX_UNANSWERED: usize = 3;
/// Bytes of publishes queued for the writer: past it, publishers wait.
const WRITE_BYTES: usize = 8 << 20;
/// The largest message the reader buffers (NATS's own max_payload
/// ceiling is 64 MiB).
const MAX_MESSAGE: usize = 64 << 20;

/// A chunk for the writer; a publish holds its bytes' permits until written.
type Chunk = (Bytes, Option<OwnedSemaphorePermit>);

/// Where a subscription's messages go.
#[derive(Clone)]
enum Route {
    /// To the [`Dispatch`], for a topic or pattern key.
    Key(Arc<str>, bool),
    /// To a handler of the node's own (presence snapshots), in the same
    /// order as the topic traffic.
    Handler(Handler),
}

/// Handles a message's payload, on the reader task.
pub type Handler = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct Sub {
    to: Route,
    subject: Box<str>,
}

/// What a PONG answers.
enum Pending {
    Keepalive,
    Barrier(oneshot::Sender<()>),
}

#[derive(Default)]
struct State {
    subs: HashMap<u64, Sub>,
    next_sid: u64,
    pending: VecDeque<Pending>,
    /// The current connection's writer; `None` while down.
    out: Option<mpsc::UnboundedSender<Chunk>>,
}

/// The connection, shared by the bus (publishes), the subjects' reconcile
/// task (SUB, UNSUB, barriers) and its own task (connect, read, reconnect).
pub struct NatsIo {
    state: Mutex<State>,
    connected: AtomicBool,
    /// Bounds the bytes of publishes waiting for the writer.
    budget: Arc<Semaphore>,
    servers: Vec<Server>,
    tls: Option<Arc<rustls::ClientConfig>>,
    metrics: Arc<Metrics>,
}

impl NatsIo {
    /// A connection to the first of `urls` that answers (credentials and
    /// TLS as in `auth`); [`NatsIo::run`] connects it.
    pub fn new(urls: &[String], auth: &LinkAuth, metrics: Arc<Metrics>) -> Result<Arc<Self>, LinkError> {
        let servers = urls
            .iter()
            .map(|u| link::server(u, auth))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match &auth.tls_ca {
            Some(ca) => Some(Arc::new(link::tls_config(ca).map_err(|reason| {
                LinkError::Url {
                    url: ca.clone(),
                    reason,
                }
            })?)),
            None => None,
        };
        Ok(Arc::new(NatsIo {
            state: Mutex::default(),
            connected: AtomicBool::new(false),
            budget: Arc::new(Semaphore::new(WRITE_BYTES)),
            servers,
            tls,
            metrics,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Relaxed)
    }

    /// Subscribes to `subject` for `key`; returns the subscription's id.
    /// Sent at once when connected, and again on every reconnect.
    pub fn subscribe(&self, subject: &str, key: &str, wildcard: bool) -> u64 {
        self.route(subject, Route::Key(key.into(), wildcard))
    }

    /// Subscribes to `subject` with a handler of the node's own; its
    /// messages are handled in order with the topic traffic (a node's
    /// presence snapshots after its notices).
    pub fn subscribe_with(&self, subject: &str, handler: Handler) -> u64 {
        self.route(subject, Route::Handler(handler))
    }

    fn route(&self, subject: &str, to: Route) -> u64 {
        let mut st = self.state();
        st.next_sid += 1;
        let sid = st.next_sid;
        st.subs.insert(
            sid,
            Sub {
                to,
                subject: subject.into(),
            },
        );
        let line = Bytes::from(format!("SUB {subject} {sid}\r\n"));
        send_now(&st, line);
        sid
    }

    /// Ends subscription `sid`; what is still in flight for it is dropped.
    pub fn unsubscribe(&self, sid: u64) {
        let mut st = self.state();
        if st.subs.remove(&sid).is_some() {
            send_now(&st, Bytes::from(format!("UNSUB {sid}\r\n")));
        }
    }

    /// Resolves true once the server has applied everything sent before
    /// (its PONG to a PING sent now); false when the connection is down or
    /// goes down first, or the server takes longer than [`ANSWER_TIMEOUT`].
    pub async fn barrier(&self) -> bool {
        let rx = {
            let mut st = self.state();
            let Some(out) = st.out.clone() else { return false };
            let (tx, rx) = oneshot::channel();
            // Queued under the lock: PINGs and their pending entries stay
            // in the same order.
            if out.send((Bytes::from_static(b"PING\r\n"), None)).is_err() {
                return false;
            }
            st.pending.push_back(Pending::Barrier(tx));
            rx
        };
        matches!(tokio::time::timeout(ANSWER_TIMEOUT, rx).await, Ok(Ok(())))
    }

    /// Publishes `payload` on `subject`, after what was published before;
    /// waits while the connection's write queue is full. An error when the
    /// connection is down.
    pub async fn publish(&self, subject: &str, headers: Option<&Headers>, payload: Bytes) -> io::Result<()> {
        let down = || io::Error::other("NATS link down");
        let len = (subject.len() + payload.len() + 64).min(WRITE_BYTES) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(len)
            .await
            .map_err(|_| down())?;
        let out = self.state().out.clone().ok_or_else(down)?;
        let mut head = BytesMut::with_capacity(subject.len() + 48);
        match headers {
            None => head.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes()),
            Some(h) => {
                let mut block = String::from("NATS/1.0\r\n");
                for (name, value) in h {
                    block.push_str(name);
                    block.push_str(": ");
                    block.extend(value.chars().filter(|c| *c != '\r' && *c != '\n'));
                    block.push_str("\r\n");
                }
                block.push_str("\r\n");
                let total = block.len() + payload.len();
                head.extend_from_slice(format!("HPUB {subject} {} {total}\r\n", block.len()).as_bytes());
                head.extend_from_slice(block.as_bytes());
            }
        }
        // One chunk for head, payload and end: nothing of another
        // publisher can come between them.
        head.extend_from_slice(&payload);
        head.extend_from_slice(b"\r\n");
        out.send((head.freeze(), Some(permit))).map_err(|_| down())
    }

    /// Connects, reads and reconnects for ever, handing messages to
    /// `dispatch`.
    pub async fn run(self: Arc<Self>, dispatch: Arc<dyn Dispatch>) {
        let mut attempt = 0usize;
        loop {
            let server = &self.servers[attempt % self.servers.len()];
            let delay = Duration::from_millis((100 * attempt as u64).min(1000));
            match link::dial(server, self.tls.as_ref()).await {
                Ok(io) => {
                    attempt = 0;
                    let why = self.serve(io, dispatch.as_ref()).await;
                    self.down();
                    tracing::warn!(error = %why, "NATS link lost; serving local subscribers, reconnecting");
                }
                Err(e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, host = %server.host, "NATS connect failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn down(&self) {
        let mut st = self.state();
        st.out = None;
        // Waiters see their sender dropped: not confirmed.
        st.pending.clear();
        self.connected.store(false, Relaxed);
        self.metrics.nats_connected.store(0, Relaxed);
    }

    /// Runs one connection: the writer, the SUBs again, then reads until
    /// it fails. Returns why it ended.
    async fn serve(&self, io: Io, dispatch: &dyn Dispatch) -> io::Error {
        let (mut rd, wr) = tokio::io::split(io);
        let (out, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.state();
            let mut subs = BytesMut::new();
            for (sid, s) in &st.subs {
                subs.extend_from_slice(format!("SUB {} {sid}\r\n", s.subject).as_bytes());
            }
            if !subs.is_empty() {
                let _ = out.send((subs.freeze(), None));
            }
            st.out = Some(out.clone());
            st.pending.clear();
        }
        self.connected.store(true, Relaxed);
        self.metrics.nats_connected.store(1, Relaxed);
        self.metrics.nats_connects.fetch_add(1, Relaxed);
        tracing::info!("NATS link connected");
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        let reading = async {
            loop {
                tokio::select! {
                    r = rd.read_buf(&mut buf) => match r {
                        Ok(0) => break io::Error::other("closed by the server"),
                        Ok(_) => {
                            if let Err(e) = self.parse(&mut buf, &out, dispatch) {
                                break e;
                            }
                            if buf.capacity() - buf.len() < 4096 {
                                buf.reserve(64 * 1024);
                            }
                        }
                        Err(e) => break e,
                    },
                    _ = ping.tick() => {
                        let mut st = self.state();
                        let unanswered = st.pending.iter().filter(|p| matches!(p, Pending::Keepalive)).count();
                        if unanswered >= MAX_UNANSWERED {
                            break io::Error::other("PINGs unanswered for 90 s");
                        }
                        if out.send((Bytes::from_static(b"PING\r\n"), None)).is_ok() {
                            st.pending.push_back(Pending::Keepalive);
                        }
                    }
                }
            }
        };
        // The writer runs in this task, beside the reader: dropping the
        // connection's future (the node stopping) ends both at once, and
        // the socket closes with them.
        tokio::select! {
            why = reading => why,
            () = write_loop(wr, rx) => io::Error::other("writing to the server failed"),
        }
    }

    /// Handles every whole op in `buf`, leaving a partial one.
    fn parse(
        &self,
        buf: &mut BytesMut,
        out: &mpsc::UnboundedSender<Chunk>,
        dispatch: &dyn Dispatch,
    ) -> io::Result<()> {
        loop {
            let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                if buf.len() > MAX_LINE {
                    return Err(io::Error::other("line too long from NATS"));
                }
                return Ok(());
            };
            let line = std::str::from_utf8(&buf[..end]).map_err(io::Error::other)?;
            let mut args = line.split_ascii_whitespace();
            let op = args.next().unwrap_or("");
            if op.eq_ignore_ascii_case("MSG") || op.eq_ignore_ascii_case("HMSG") {
                let args: Vec<&str> = args.collect();
                let headers = op.len() == 4;
                let (n, hdr) = match (headers, args.len()) {
                    (false, 3 | 4) => (args[args.len() - 1], None),
                    (true, 4 | 5) => (args[args.len() - 1], Some(args[args.len() - 2])),
                    _ => return Err(io::Error::other(format!("bad {op} from NATS: {line:?}"))),
                };
                let bad = |_| io::Error::other(format!("bad {op} from NATS: {line:?}"));
                let total: usize = n.parse().map_err(bad)?;
                let hlen: usize = hdr.map_or(Ok(0), |h| h.parse().map_err(bad))?;
                let sid: u64 = args[1].parse().map_err(bad)?;
                // The server bounds payloads by its max_payload; a size
                // past any it could allow is a broken stream, not a buffer
                // to grow for.
                if hlen > total || total > MAX_MESSAGE {
                    return Err(io::Error::other(format!("bad {op} from NATS: {line:?}")));
                }
                if buf.len() < end + 2 + total + 2 {
                    buf.reserve(end + 2 + total + 2 - buf.len());
                    return Ok(());
                }
                let subject = args[0].to_owned();
                buf.advance(end + 2);
                let body = buf.split_to(total);
                buf.advance(2);
                // The lock is not held while delivering.
                let to = self.state().subs.get(&sid).map(|s| s.to.clone());
                let (h, payload) = body.split_at(hlen);
                match to {
                    Some(Route::Key(key, wildcard)) => {
                        dispatch.message(&key, wildcard, &subject, headers.then_some(h), payload)
                    }
                    Some(Route::Handler(handle)) => handle(payload),
                    None => {}
                }
                continue;
            }
            match op {
                "PING" => {
                    let _ = out.send((Bytes::from_static(b"PONG\r\n"), None));
                }
                "PONG" => {
                    if let Some(Pending::Barrier(tx)) = self.state().pending.pop_front() {
                        let _ = tx.send(());
                    }
                }
                "+OK" | "INFO" => {}
                "-ERR" => {
                    let e = line.to_owned();
                    // Permission and parser errors end the connection
                    // server-side; others (a slow consumer warning) are
                    // logged.
                    tracing::warn!(error = %e, "NATS said");
                }
                _ => return Err(io::Error::other(format!("unknown op from NATS: {line:?}"))),
            }
            buf.advance(end + 2);
        }
    }
}

fn send_now(st: &State, chunk: Bytes) {
    if let Some(out) = &st.out {
        // Closed: the connection is going; every SUB is sent again when
        // it reconnects.
        let _ = out.send((chunk, None));
    }
}

async fn write_loop(mut wr: tokio::io::WriteHalf<Io>, mut rx: mpsc::UnboundedReceiver<Chunk>) {
    let mut chunks = Vec::with_capacity(64);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while rx.recv_many(&mut chunks, 64).await > 0 {
        // Permits go back once their bytes are written.
        let mut permits = Vec::with_capacity(chunks.len());
        for (c, p) in chunks.drain(..) {
            buf.extend_from_slice(&c);
            permits.extend(p);
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        if wr.flush().await.is_err() {
            return;
        }
        drop(permits);
    }
}
