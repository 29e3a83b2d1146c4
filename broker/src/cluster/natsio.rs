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
//!
//! What goes over the wire, both ways, is [`herald_protocol::nats`]'s to
//! read and write; this module does the I/O. The reader borrows each
//! message from its buffer: a message costs no allocation.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::rustls;
use bytes::{Buf, Bytes, BytesMut};
use herald_protocol::nats::{self, Decoded, ServerOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::cluster::link::{self, Io, LinkAuth, LinkError, Server, ANSWER_TIMEOUT, LIMITS};
use crate::metrics::Metrics;
use crate::sync::Lock;

/// Headers of a message sent (presence notices); line breaks in values
/// are dropped when sent.
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
        let mut line = BytesMut::new();
        if let Err(e) = nats::sub(&mut line, subject, None, sid) {
            // Subjects come from valid topics and prefixes: not expected.
            tracing::error!(error = %e, "subscription not taken");
            return sid;
        }
        st.subs.insert(
            sid,
            Sub {
                to,
                subject: subject.into(),
            },
        );
        send_now(&st, line.freeze());
        sid
    }

    /// Ends subscription `sid`; what is still in flight for it is dropped.
    pub fn unsubscribe(&self, sid: u64) {
        let mut st = self.state();
        if st.subs.remove(&sid).is_some() {
            let mut line = BytesMut::new();
            nats::unsub(&mut line, sid, None);
            send_now(&st, line.freeze());
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
            if out.send((Bytes::from_static(nats::PING), None)).is_err() {
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
        // One chunk for line, headers, payload and end: nothing of another
        // publisher can come between them.
        let mut chunk = BytesMut::new();
        match headers {
            None => nats::publish(&mut chunk, subject, None, &payload),
            Some(h) => {
                // Values come from clients (display names); a NATS header
                // cannot hold a line break.
                let h: Vec<(&str, Cow<'_, str>)> = h.iter().map(|(n, v)| (*n, one_line(v))).collect();
                nats::hpub(&mut chunk, subject, None, &h, &payload)
            }
        }
        .map_err(io::Error::other)?;
        out.send((chunk.freeze(), Some(permit))).map_err(|_| down())
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
        let writer = tokio::spawn(write_loop(wr, rx));
        {
            let mut st = self.state();
            let mut subs = BytesMut::new();
            for (sid, s) in &st.subs {
                // Checked when it was taken.
                let _ = nats::sub(&mut subs, &s.subject, None, *sid);
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
        let why = loop {
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => break io::Error::other("closed by the server"),
                    Ok(_) => {
                        if let Err(e) = self.read_ops(&mut buf, &out, dispatch) {
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
                    if out.send((Bytes::from_static(nats::PING), None)).is_ok() {
                        st.pending.push_back(Pending::Keepalive);
                    }
                }
            }
        };
        writer.abort();
        why
    }

    /// Handles every whole op in `buf`, leaving a partial one (with room
    /// made for the rest of it).
    fn read_ops(
        &self,
        buf: &mut BytesMut,
        out: &mpsc::UnboundedSender<Chunk>,
        dispatch: &dyn Dispatch,
    ) -> io::Result<()> {
        loop {
            let len = match nats::decode(buf, &LIMITS) {
                Ok(Decoded::Op { op, len }) => {
                    self.handle(op, out, dispatch);
                    len
                }
                Ok(Decoded::Incomplete { need }) => {
                    if let Some(need) = need {
                        buf.reserve(need.saturating_sub(buf.len()));
                    }
                    return Ok(());
                }
                Err(e) => return Err(io::Error::other(format!("bad input from NATS: {e}"))),
            };
            buf.advance(len);
        }
    }

    /// Acts on one op from the server.
    fn handle(&self, op: ServerOp<'_>, out: &mpsc::UnboundedSender<Chunk>, dispatch: &dyn Dispatch) {
        match op {
            ServerOp::Msg(m) => {
                // The lock is not held while delivering.
                let to = self.state().subs.get(&m.sid).map(|s| s.to.clone());
                match to {
                    Some(Route::Key(key, wildcard)) => {
                        dispatch.message(&key, wildcard, m.subject, m.headers, m.payload)
                    }
                    Some(Route::Handler(handle)) => handle(m.payload),
                    None => {}
                }
            }
            ServerOp::Ping => {
                let _ = out.send((Bytes::from_static(nats::PONG), None));
            }
            ServerOp::Pong => {
                if let Some(Pending::Barrier(tx)) = self.state().pending.pop_front() {
                    let _ = tx.send(());
                }
            }
            ServerOp::Ok | ServerOp::Info(_) => {}
            ServerOp::Err(_) => {
                // Permission and parser errors end the connection
                // server-side; others (a slow consumer warning) are logged.
                tracing::warn!(error = %op, "NATS said");
            }
        }
    }
}

/// `v` without line breaks.
fn one_line(v: &str) -> Cow<'_, str> {
    if v.contains(['\r', '\n']) {
        v.replace(['\r', '\n'], "").into()
    } else {
        v.into()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> Arc<NatsIo> {
        // Never connected: nothing here dials.
        let urls = ["nats://127.0.0.1:4222".to_owned()];
        NatsIo::new(&urls, &LinkAuth::default(), Arc::new(Metrics::default())).unwrap()
    }

    #[tokio::test]
    async fn publishes_are_whole_commands_with_line_breaks_kept_out_of_headers() {
        let io = io();
        let (out, mut sent) = mpsc::unbounded_channel();
        io.state().out = Some(out);
        io.publish("herald.a", None, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let headers: Headers = vec![
            ("Herald-Event", "join".into()),
            ("Herald-Name", "a\r\nB: c\n".into()),
        ];
        io.publish("herald.a", Some(&headers), Bytes::new())
            .await
            .unwrap();
        let (plain, _) = sent.try_recv().unwrap();
        assert_eq!(&plain[..], b"PUB herald.a 2\r\n{}\r\n");
        let (notice, _) = sent.try_recv().unwrap();
        assert_eq!(
            std::str::from_utf8(&notice).unwrap(),
            "HPUB herald.a 52 52\r\nNATS/1.0\r\nHerald-Event: join\r\nHerald-Name: aB: c\r\n\r\n\r\n"
        );
        assert!(io.publish("herald a", None, Bytes::new()).await.is_err());
    }
}
