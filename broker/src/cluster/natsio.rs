//! The cluster link's topic traffic on a NATS connection of its own:
//! every subject subscription of the node and every plain publish travel
//! on one socket, and one task reads what arrives, in the server's order.
//!
//! Why not the NATS client library for this: it gives each subscription a
//! channel and a task of its own (about 8 KB before any message arrives: a
//! node holding 20,000 `user:N` topics spent 160 MB on them), and hands
//! the messages of different subscriptions over in no common order. Here a
//! subscription is two map entries (its subject, sent again on reconnect,
//! and its route, in the reader's table), and a PING after SUBs is answered
//! once the server has applied them: the barrier a `sub`'s ack waits for.
//! Publishes share the socket so that `echo:false` keeps the node's own
//! messages from coming back to it. JetStream, the status page and
//! presence snapshots keep the library's connection
//! ([`crate::cluster::link`]).
//!
//! What goes over the wire, both ways, is [`herald_protocol::nats`]'s to
//! read and write; this module does the I/O. The reader borrows each
//! message from its buffer and finds the subscription's route in a table of
//! its own, kept up to date from the changes subscribing and unsubscribing
//! record: a message costs no allocation and no lock.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicUsize};
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

/// What the writer sends, in one piece: a command, and for a publish its
/// payload (followed by the CRLF that ends it) with the permits for its
/// bytes, held until written.
struct Chunk {
    head: Bytes,
    payload: Option<(Bytes, OwnedSemaphorePermit)>,
}

impl Chunk {
    /// A command with no payload.
    fn command(head: Bytes) -> Chunk {
        Chunk { head, payload: None }
    }
}

/// Where a subscription's messages go.
enum Route {
    /// To the [`Dispatch`], for a topic or pattern key.
    Key(Arc<str>, bool),
    /// To a handler of the node's own (presence snapshots), in the same
    /// order as the topic traffic.
    Handler(Handler),
}

/// Handles a message's payload, on the reader task.
pub type Handler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The reader's own table of routes, by sid: brought up to date from
/// [`State::changed`] when [`NatsIo::routes_changed`] says there is news.
type Routes = HashMap<u64, Route>;

/// What a PONG answers.
enum Pending {
    Keepalive,
    Barrier(oneshot::Sender<()>),
}

#[derive(Default)]
struct State {
    /// Every subscription's subject, by sid: sent again on each reconnect.
    subs: HashMap<u64, Box<str>>,
    /// Routes taken (`Some`) or ended (`None`) since the reader last
    /// looked. Sids are never reused, so a route ended before the reader
    /// saw it is simply removed from here.
    changed: HashMap<u64, Option<Route>>,
    next_sid: u64,
    pending: VecDeque<Pending>,
    /// The current connection's writer; `None` while down.
    out: Option<mpsc::UnboundedSender<Chunk>>,
}

/// The connection, shared by the bus (publishes), the subjects' reconcile
/// task (SUB, UNSUB, barriers) and its own task (connect, read, reconnect).
pub struct NatsIo {
    state: Mutex<State>,
    /// Set (under the state lock) when [`State::changed`] has news.
    routes_changed: AtomicBool,
    connected: AtomicBool,
    /// Bounds the bytes of publishes waiting for the writer.
    budget: Arc<Semaphore>,
    /// The server's `max_payload` (from its INFO; NATS's default until the
    /// first connection): a message larger than it would make the server
    /// cut the connection, and with it every node's traffic on it.
    max_payload: AtomicUsize,
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
            routes_changed: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            budget: Arc::new(Semaphore::new(WRITE_BYTES)),
            max_payload: AtomicUsize::new(1 << 20),
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
        st.subs.insert(sid, subject.into());
        st.changed.insert(sid, Some(to));
        self.routes_changed.store(true, Release);
        send_now(&st, line.freeze());
        sid
    }

    /// Ends subscription `sid`; what is still in flight for it is dropped.
    pub fn unsubscribe(&self, sid: u64) {
        let mut st = self.state();
        if st.subs.remove(&sid).is_some() {
            if st.changed.remove(&sid).is_none() {
                // The reader holds the route: tell it to drop it.
                st.changed.insert(sid, None);
            }
            self.routes_changed.store(true, Release);
            let mut line = BytesMut::new();
            nats::unsub(&mut line, sid, None);
            send_now(&st, line.freeze());
        }
    }

    /// Applies the route changes recorded since the last call to the
    /// reader's table; with none (the usual case), one atomic load.
    fn take_routes(&self, routes: &mut Routes) {
        if !self.routes_changed.load(Acquire) {
            return;
        }
        let changed = {
            let mut st = self.state();
            self.routes_changed.store(false, Relaxed);
            std::mem::take(&mut st.changed)
        };
        for (sid, to) in changed {
            match to {
                Some(to) => routes.insert(sid, to),
                None => routes.remove(&sid),
            };
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
            if out.send(Chunk::command(Bytes::from_static(nats::PING))).is_err() {
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
        // What the server counts against max_payload: the header block
        // (`NATS/1.0`, each `name: value`, the blank line) and the payload.
        let size = payload.len()
            + headers.map_or(0, |h| {
                12 + h.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>()
            });
        let max = self.max_payload();
        if size > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a message of {size} bytes is over the NATS server's max_payload of {max}"),
            ));
        }
        let len = (subject.len() + payload.len() + 64).min(WRITE_BYTES) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(len)
            .await
            .map_err(|_| down())?;
        let out = self.state().out.clone().ok_or_else(down)?;
        // One chunk for line, headers, payload and end: nothing of another
        // publisher can come between them. The payload is not copied here:
        // the writer copies it once, into the buffer it writes from.
        let mut head = BytesMut::new();
        match headers {
            None => nats::publish_head(&mut head, subject, None, payload.len()),
            Some(h) => {
                // Values come from clients (display names); a NATS header
                // cannot hold a line break.
                let h: Vec<(&str, Cow<'_, str>)> = h.iter().map(|(n, v)| (*n, one_line(v))).collect();
                nats::hpub_head(&mut head, subject, None, &h, payload.len())
            }
        }
        .map_err(io::Error::other)?;
        let chunk = Chunk {
            head: head.freeze(),
            payload: Some((payload, permit)),
        };
        out.send(chunk).map_err(|_| down())
    }

    /// The largest message the server takes, headers included.
    pub fn max_payload(&self) -> usize {
        self.max_payload.load(Relaxed)
    }

    /// Connects, reads and reconnects for ever, handing messages to
    /// `dispatch`.
    pub async fn run(self: Arc<Self>, dispatch: Arc<dyn Dispatch>) {
        let mut routes = Routes::new();
        let mut attempt = 0usize;
        loop {
            let server = &self.servers[attempt % self.servers.len()];
            let delay = Duration::from_millis((100 * attempt as u64).min(1000));
            match link::dial(server, self.tls.as_ref()).await {
                Ok((io, early, max_payload)) => {
                    attempt = 0;
                    self.max_payload.store(max_payload, Relaxed);
                    let why = self.serve(io, early, dispatch.as_ref(), &mut routes).await;
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

    /// Runs one connection: the writer, the SUBs again, then reads (from
    /// what arrived with the server's answer to the handshake, `early`, on)
    /// until it fails. Returns why it ended.
    async fn serve(
        &self,
        io: Io,
        early: BytesMut,
        dispatch: &dyn Dispatch,
        routes: &mut Routes,
    ) -> io::Error {
        let (mut rd, wr) = tokio::io::split(io);
        let (out, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.state();
            let mut subs = BytesMut::new();
            for (sid, subject) in &st.subs {
                // Checked when it was taken.
                let _ = nats::sub(&mut subs, subject, None, *sid);
            }
            if !subs.is_empty() {
                let _ = out.send(Chunk::command(subs.freeze()));
            }
            st.out = Some(out.clone());
            st.pending.clear();
        }
        self.connected.store(true, Relaxed);
        self.metrics.nats_connected.store(1, Relaxed);
        self.metrics.nats_connects.fetch_add(1, Relaxed);
        tracing::info!("NATS link connected");
        let mut buf = early;
        buf.reserve(64 * 1024);
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        let reading = async {
            if let Err(e) = self.read_ops(&mut buf, &out, dispatch, routes) {
                return e;
            }
            loop {
                tokio::select! {
                    r = rd.read_buf(&mut buf) => match r {
                        Ok(0) => return io::Error::other("closed by the server"),
                        Ok(_) => {
                            if let Err(e) = self.read_ops(&mut buf, &out, dispatch, routes) {
                                return e;
                            }
                            if buf.capacity() - buf.len() < 4096 {
                                buf.reserve(64 * 1024);
                            }
                        }
                        Err(e) => return e,
                    },
                    _ = ping.tick() => {
                        let mut st = self.state();
                        let unanswered = st.pending.iter().filter(|p| matches!(p, Pending::Keepalive)).count();
                        if unanswered >= MAX_UNANSWERED {
                            return io::Error::other("PINGs unanswered for 90 s");
                        }
                        if out.send(Chunk::command(Bytes::from_static(nats::PING))).is_ok() {
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

    /// Handles every whole op in `buf`, leaving a partial one (with room
    /// made for the rest of it).
    fn read_ops(
        &self,
        buf: &mut BytesMut,
        out: &mpsc::UnboundedSender<Chunk>,
        dispatch: &dyn Dispatch,
        routes: &mut Routes,
    ) -> io::Result<()> {
        loop {
            let len = match nats::decode(buf, &LIMITS) {
                Ok(Decoded::Op { op, len }) => {
                    self.handle(op, out, dispatch, routes);
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
    fn handle(
        &self,
        op: ServerOp<'_>,
        out: &mpsc::UnboundedSender<Chunk>,
        dispatch: &dyn Dispatch,
        routes: &mut Routes,
    ) {
        match op {
            ServerOp::Msg(m) => {
                self.take_routes(routes);
                match routes.get(&m.sid) {
                    Some(Route::Key(key, wildcard)) => {
                        dispatch.message(key, *wildcard, m.subject, m.headers, m.payload)
                    }
                    Some(Route::Handler(handle)) => handle(m.payload),
                    None => {}
                }
            }
            ServerOp::Ping => {
                let _ = out.send(Chunk::command(Bytes::from_static(nats::PONG)));
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
        let _ = out.send(Chunk::command(chunk));
    }
}

async fn write_loop(mut wr: tokio::io::WriteHalf<Io>, mut rx: mpsc::UnboundedReceiver<Chunk>) {
    let mut chunks = Vec::with_capacity(64);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while rx.recv_many(&mut chunks, 64).await > 0 {
        // Permits go back once their bytes are written.
        let mut permits = Vec::with_capacity(chunks.len());
        for c in chunks.drain(..) {
            buf.extend_from_slice(&c.head);
            if let Some((payload, permit)) = c.payload {
                buf.extend_from_slice(&payload);
                buf.extend_from_slice(nats::END);
                permits.push(permit);
            }
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

    /// What reached the dispatch: key, wildcard, subject, headers, payload.
    type Seen = Vec<(String, bool, String, Option<Vec<u8>>, Vec<u8>)>;

    #[derive(Default)]
    struct Record(Mutex<Seen>);

    impl Dispatch for Record {
        fn message(&self, key: &str, wildcard: bool, subject: &str, headers: Option<&[u8]>, payload: &[u8]) {
            self.0.locked().push((
                key.into(),
                wildcard,
                subject.into(),
                headers.map(<[u8]>::to_vec),
                payload.to_vec(),
            ));
        }
    }

    fn io() -> Arc<NatsIo> {
        // Never connected: nothing here dials.
        let urls = ["nats://127.0.0.1:4222".to_owned()];
        NatsIo::new(&urls, &LinkAuth::default(), Arc::new(Metrics::default())).unwrap()
    }

    #[test]
    fn the_reader_routes_by_sid_and_drops_what_was_unsubscribed() {
        let io = io();
        let record = Record::default();
        let handled = Arc::new(Mutex::new(Vec::new()));
        let a = io.subscribe("herald.a", "a", false);
        let any = io.subscribe("herald.*", "*", true);
        let h = handled.clone();
        let own = io.subscribe_with(
            "_herald.presence.herald",
            Arc::new(move |p| h.locked().push(p.to_vec())),
        );
        let (out, mut sent) = mpsc::unbounded_channel();
        let mut routes = Routes::new();
        let mut buf = BytesMut::from(
            format!(
                "MSG herald.a {a} 2\r\nhi\r\n\
                 HMSG herald.b {any} _INBOX.1 12 13\r\nNATS/1.0\r\n\r\n!\r\n\
                 MSG _herald.presence.herald {own} 1\r\nx\r\n\
                 MSG herald.a 99 1\r\ny\r\n\
                 PING\r\n\
                 MSG herald.a {a} 1000\r\npart"
            )
            .as_bytes(),
        );
        io.read_ops(&mut buf, &out, &record, &mut routes).unwrap();
        assert_eq!(
            *record.0.locked(),
            vec![
                ("a".into(), false, "herald.a".into(), None, b"hi".to_vec()),
                (
                    "*".into(),
                    true,
                    "herald.b".into(),
                    Some(b"NATS/1.0\r\n\r\n".to_vec()),
                    b"!".to_vec()
                ),
            ]
        );
        assert_eq!(*handled.locked(), vec![b"x".to_vec()]);
        let pong = sent.try_recv().unwrap();
        assert_eq!(&pong.head[..], nats::PONG);
        assert!(pong.payload.is_none());
        // The partial message stays, with room made for all of it.
        assert!(buf.starts_with(b"MSG herald.a"));
        assert!(buf.capacity() >= format!("MSG herald.a {a} 1000\r\n").len() + 1002);

        // Unsubscribed before the rest arrives: dropped.
        io.unsubscribe(a);
        buf.extend_from_slice(&[b'.'; 996]);
        buf.extend_from_slice(format!("\r\nMSG herald.c {any} 1\r\nc\r\n").as_bytes());
        io.read_ops(&mut buf, &out, &record, &mut routes).unwrap();
        assert!(buf.is_empty());
        let seen = record.0.locked();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].2, "herald.c");
        drop(seen);
        assert!(!routes.contains_key(&a));

        buf.extend_from_slice(b"MSG herald.a 1 2\r\nhiXY");
        assert!(io.read_ops(&mut buf, &out, &record, &mut routes).is_err());
    }

    #[test]
    fn a_route_ended_before_the_reader_saw_it_leaves_nothing_behind() {
        let io = io();
        let sid = io.subscribe("herald.a", "a", false);
        io.unsubscribe(sid);
        assert!(io.state().changed.is_empty());
        assert!(io.state().subs.is_empty());
        let mut routes = Routes::new();
        io.take_routes(&mut routes);
        assert!(routes.is_empty());
        // Seen, then ended: the reader is told.
        let sid = io.subscribe("herald.a", "a", false);
        io.take_routes(&mut routes);
        assert!(routes.contains_key(&sid) && io.state().changed.is_empty());
        io.unsubscribe(sid);
        io.take_routes(&mut routes);
        assert!(routes.is_empty());
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
        // What the writer puts on the wire for a chunk.
        let wire = |c: Chunk| {
            let mut w = c.head.to_vec();
            if let Some((p, _)) = c.payload {
                w.extend_from_slice(&p);
                w.extend_from_slice(nats::END);
            }
            String::from_utf8(w).unwrap()
        };
        assert_eq!(wire(sent.try_recv().unwrap()), "PUB herald.a 2\r\n{}\r\n");
        assert_eq!(
            wire(sent.try_recv().unwrap()),
            "HPUB herald.a 52 52\r\nNATS/1.0\r\nHerald-Event: join\r\nHerald-Name: aB: c\r\n\r\n\r\n"
        );
        assert!(io.publish("herald a", None, Bytes::new()).await.is_err());
    }
}
