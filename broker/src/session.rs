//! WebSocket sessions: the read loop and request handling of each socket
//! ([`Session`]), and the node's set of live sessions with what they share
//! ([`Sessions`]).
//!
//! The read loop owns the read half and a buffer it drops whenever it is
//! empty, so an idle socket holds no read buffer. It waits on readiness
//! (cancel-safe) rather than inside a frame read, decodes with the sans-I/O
//! [`Reader`], and answers requests by pushing frames to the socket's
//! outbox; the socket's writer task (see [`crate::writer`]) sends them.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use herald_protocol::message::{self, ErrorCode, Request};
use herald_protocol::ws::{self, Message, OpCode, Reader};
use herald_protocol::Disconnect;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::metrics::{ConnectionSlot, Metrics};
use crate::params::SessionParams;
use crate::rate::RateLimit;
use crate::router::Router;
use crate::subjects::Live;
use crate::subscriber::Subscriber;
use crate::writer::Writers;

/// Read buffer handed to the kernel when a socket becomes readable.
const READ_CHUNK: usize = 4096;

/// The node's live sessions and everything they share. Built once by the
/// node.
pub struct Sessions {
    config: Arc<Config>,
    router: Router,
    metrics: Arc<Metrics>,
    /// Open sessions, for the heartbeat and shutdown.
    live: DashMap<u64, Arc<Subscriber>>,
    /// Session tasks (read loops and writers), so shutdown can wait for them.
    tracker: TaskTracker,
    /// What every socket's writer shares (runs under `tracker`).
    writers: Arc<Writers>,
    /// The heartbeat word as a ready frame, shared by every reply.
    heartbeat_reply: Bytes,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(config: Arc<Config>, router: Router, metrics: Arc<Metrics>) -> Self {
        let tracker = TaskTracker::new();
        let writers = Arc::new(Writers {
            tracker: tracker.clone(),
            write_timeout: config.write_timeout,
            close_timeout: config.close_timeout,
            metrics: metrics.clone(),
            epoch: std::time::Instant::now(),
        });
        Sessions {
            writers,
            tracker,
            heartbeat_reply: ws::encode_frame(OpCode::Text, config.heartbeat_word.as_bytes()),
            config,
            router,
            metrics,
            live: DashMap::new(),
            next_id: AtomicU64::new(1),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the node started: a cheap clock for heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reserves a connection slot; `None` when the node is full.
    pub fn reserve(&self) -> Option<ConnectionSlot> {
        self.metrics.reserve_connection(self.config.max_connections)
    }

    /// Spawns a task that shutdown waits for (a handshake in progress).
    pub fn track(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Registers a session for a handshake about to be answered with 101,
    /// holding `slot` until its socket is gone. Subscribed before the 101
    /// goes out: once the client sees its socket open, its URL
    /// subscriptions are in effect; frames delivered meanwhile wait in the
    /// outbox.
    pub fn accept(self: &Arc<Self>, params: SessionParams, slot: ConnectionSlot) -> Accepted {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Subscriber::new(
            id,
            params.raw_topic.is_some(),
            self.config.max_queue_bytes,
            self.now_ms(),
            self.writers.clone(),
            Some(slot),
        ));
        self.live.insert(id, conn.clone());
        self.metrics.connections_total.fetch_add(1, Relaxed);
        let session = Session {
            rate: RateLimit::default(),
            sub_rate: RateLimit::default(),
            name: params.name,
            pending: None,
            conn,
            shared: self.clone(),
        };
        let mut waits = Vec::new();
        for p in params.subs.iter().chain(params.raw_topic.iter()) {
            // Validated and counted against the limit with the URL.
            if let Ok(Some(live)) = self
                .router
                .subscribe(&session.conn, p, session.name.as_deref(), None)
            {
                waits.push(live);
            }
        }
        Accepted { session, waits }
    }

    /// Milliseconds on the clock writers stamp their progress with.
    pub fn writers_now_ms(&self) -> u64 {
        self.writers.now_ms()
    }

    /// Every live socket, snapshotted so no map shard stays locked while
    /// the caller walks them.
    pub fn snapshot(&self) -> Vec<Arc<Subscriber>> {
        self.live.iter().map(|e| e.value().clone()).collect()
    }

    /// Waits (up to `grace`) for every session task to end; returns false
    /// if some were still running.
    pub async fn wait(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }
}

/// What the read loop does after a message.
enum Next {
    /// Read on.
    Go,
    /// Wait for a subscription to take effect (its ack follows), then read on.
    Wait(Live),
    /// End the session for this reason.
    Close(Disconnect),
}

/// How the read loop ended.
enum Exit {
    /// Close for this reason (client close, protocol error).
    Close(Disconnect),
    /// Someone else (hub, heartbeat, shutdown, writer) already asked to close.
    Closing,
    /// The peer is gone (EOF or I/O error).
    Gone,
}

/// One socket's read side and request handling.
struct Session {
    shared: Arc<Sessions>,
    conn: Arc<Subscriber>,
    /// Publishes per second (`--publish-rate`).
    rate: RateLimit,
    /// `sub`/`unsub` requests per second (8 bytes: every socket has one).
    sub_rate: RateLimit,
    name: Option<String>,
    /// Publishes without an id, in a row, on one topic, from the read buffer
    /// being processed: fanned out together when the buffer is done (or
    /// before anything else happens), so a burst costs each recipient one
    /// queue push and one write instead of one per message. Boxed: an idle
    /// session holds only the pointer.
    pending: Option<Box<(String, Vec<Bytes>)>>,
}

/// A session accepted but not yet upgraded (see [`Sessions::accept`]).
pub struct Accepted {
    session: Session,
    /// URL subscriptions the cluster link has yet to confirm.
    waits: Vec<Live>,
}

impl Accepted {
    /// Resolves once every URL subscription is in effect cluster-wide:
    /// answer the handshake only then.
    pub async fn ready(&mut self) {
        for live in self.waits.drain(..) {
            live.await;
        }
    }

    /// Starts the session on the upgraded TCP stream: its read task, tracked
    /// by the node, and its writer when frames already wait. `early` holds
    /// bytes the client sent right behind its handshake.
    ///
    /// Setup happens here, outside any future, so the read task's state
    /// holds only what the read loop needs: an idle socket stays small.
    pub fn start(self, stream: TcpStream, early: &[u8]) {
        let s = self.session;
        let remote = stream.peer_addr().ok();
        let span = tracing::info_span!("conn", conn_id = s.conn.id, remote_addr = ?remote);
        let _entered = span.enter();
        tracing::debug!("open");
        let (rd, wr) = stream.into_split();
        s.conn.install(wr);
        let buf = BytesMut::from(early);
        let tracker = s.shared.tracker.clone();
        tracker.spawn(s.run(rd, buf).instrument(span.clone()));
    }

    /// The upgrade failed: leave every topic and release the slot.
    pub fn abandon(self) {
        self.session.end();
    }
}

/// Reads and discards until the peer closes or `--close-timeout` passes,
/// so our close frame is not lost to a reset while the peer still sends.
async fn discard(rd: &OwnedReadHalf, mut scratch: BytesMut, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        scratch.clear();
        scratch.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, rd.readable()).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(())) => match rd.try_read_buf(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            },
        }
    }
}

impl Session {
    /// The read task: reads until the session ends, then leaves every topic,
    /// releases the connection slot and closes.
    async fn run(mut self, rd: OwnedReadHalf, mut buf: BytesMut) {
        let exit = self.read_loop(&rd, &mut buf).await;
        let grace = self.shared.config.close_timeout;
        let conn = self.end();
        match exit {
            Exit::Gone => {
                conn.close(Disconnect::ConnectionLost);
            }
            Exit::Close(why) => {
                tracing::debug!(code = why.code(), reason = %why.reason(), "closing");
                conn.close(why);
                // Boxed: the closing path's timer stays out of every idle
                // session's future.
                Box::pin(discard(&rd, buf, grace)).await;
            }
            Exit::Closing => Box::pin(discard(&rd, buf, grace)).await,
        }
        tracing::debug!("closed");
    }

    /// Leaves every topic and unregisters. The connection slot goes with
    /// the socket's handle, once both halves of its stream are dropped.
    fn end(self) -> Arc<Subscriber> {
        let Session {
            shared, conn, name, ..
        } = self;
        shared.router.leave_all(&conn, name.as_deref());
        shared.live.remove(&conn.id);
        conn
    }

    async fn read_loop(&mut self, rd: &OwnedReadHalf, buf: &mut BytesMut) -> Exit {
        let mut reader = Reader::new();
        let limit = self.shared.config.max_message_bytes;
        loop {
            loop {
                match reader.read(buf, limit) {
                    Ok(Some(msg)) => {
                        self.conn.seen(self.shared.now_ms());
                        match self.on_message(msg) {
                            Next::Go => {}
                            Next::Wait(live) => live.await,
                            Next::Close(why) => {
                                self.flush();
                                return Exit::Close(why);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.flush();
                        self.shared.metrics.protocol_errors.fetch_add(1, Relaxed);
                        return Exit::Close(Disconnect::Protocol(e));
                    }
                }
            }
            self.flush();
            if buf.is_empty() {
                // Hold no memory while idle.
                *buf = BytesMut::new();
            }
            tokio::select! {
                biased;
                _ = self.conn.outbox.closed() => return Exit::Closing,
                r = rd.readable() => if r.is_err() { return Exit::Gone },
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            match rd.try_read_buf(buf) {
                Ok(0) => return Exit::Gone,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Exit::Gone,
            }
        }
    }

    /// Queues a frame for this socket, after fanning out any pending
    /// publishes (so a publisher subscribed to its topic sees its message
    /// before the ack or error that follows it).
    fn send(&mut self, frame: Bytes) {
        self.flush();
        self.conn.push(frame);
    }

    fn error(&mut self, code: ErrorCode, message: &str, id: Option<&str>) {
        self.shared.metrics.error(code);
        self.send(message::encode_error(code, message, id));
    }

    fn ack(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.send(message::encode_ack(id));
        }
    }

    /// Fans out the pending publishes.
    fn flush(&mut self) {
        let Some(batch) = self.pending.take() else {
            return;
        };
        let (topic, datas) = *batch;
        if let Err(e) = self.shared.router.publish_batch(&topic, &datas) {
            self.error(ErrorCode::PublishFailed, &e.to_string(), None);
        }
    }

    /// Handles one message.
    fn on_message(&mut self, msg: Message) -> Next {
        match msg {
            Message::Text(t) => {
                // The reader validated UTF-8.
                let text = std::str::from_utf8(&t).unwrap_or_default();
                if text == self.shared.config.heartbeat_word {
                    self.send(self.shared.heartbeat_reply.clone());
                } else if let Some(topic) = self.raw_topic() {
                    // Escaping can grow text up to 6x: the limit applies to
                    // what every node would deliver, so all nodes agree.
                    let data = message::json_string(text);
                    let max = self.shared.config.max_message_bytes;
                    if data.len() > max {
                        let msg = format!(
                            "message_too_big: {} bytes as a JSON string, over {max}",
                            data.len()
                        );
                        self.error(ErrorCode::MessageTooBig, &msg, None);
                    } else {
                        self.publish(&topic, Bytes::from(data), None);
                    }
                } else {
                    return self.on_request(&t, text);
                }
            }
            Message::Binary(_) => self.error(
                ErrorCode::BinaryUnsupported,
                "binary frames are not supported; send JSON text frames",
                None,
            ),
            Message::Ping(p) => self.send(ws::encode_frame(OpCode::Pong, &p)),
            Message::Pong => {}
            Message::Close(code, _) => return Next::Close(Disconnect::ClientClosed(code)),
        }
        Next::Go
    }

    fn raw_topic(&self) -> Option<String> {
        if self.conn.raw {
            self.conn.subs().first().map(|s| s.pattern.to_string())
        } else {
            None
        }
    }

    /// Handles a request; `frame` is the text's buffer, so published data
    /// is kept as a view into it rather than copied.
    fn on_request(&mut self, frame: &Bytes, text: &str) -> Next {
        let req = message::parse_request(text);
        if !matches!(req, Ok(Request::Pub { .. })) {
            self.flush();
        }
        if let Ok(Request::Sub { id, .. } | Request::Unsub { id, .. }) = &req {
            let rate = self.shared.config.subscribe_rate;
            if !self.sub_rate.allow(rate, self.shared.now_ms()) {
                let msg =
                    format!("subscribe_rate: at most {rate} sub and unsub requests per second per socket");
                self.error(ErrorCode::RateLimited, &msg, *id);
                return Next::Go;
            }
        }
        let router = &self.shared.router;
        let name = self.name.as_deref();
        let (refused, id) = match req {
            Err(e) => {
                self.error(e.code, &e.message, e.id);
                return Next::Go;
            }
            Ok(Request::Sub { topic, id }) => match router.subscribe(&self.conn, topic.as_str(), name, id) {
                Ok(Some(live)) => return Next::Wait(live),
                Ok(None) => return Next::Go,
                Err(r) => (r, id),
            },
            Ok(Request::Unsub { topic, id }) => {
                match router.unsubscribe(&self.conn, topic.as_str(), name, id) {
                    Ok(()) => return Next::Go,
                    Err(r) => (r, id),
                }
            }
            Ok(Request::Pub { topic, data, id }) => {
                let data = frame.slice_ref(data.as_bytes());
                self.publish(topic.as_str(), data, id);
                return Next::Go;
            }
        };
        self.error(refused.code(), &refused.to_string(), id);
        Next::Go
    }

    fn publish(&mut self, topic: &str, data: Bytes, id: Option<&str>) {
        if !self
            .rate
            .allow(self.shared.config.publish_rate, self.shared.now_ms())
        {
            let msg = format!(
                "publish_rate: at most {} publishes per second per socket",
                self.shared.config.publish_rate
            );
            return self.error(ErrorCode::RateLimited, &msg, id);
        }
        if id.is_some() {
            // Answered one by one: the ack follows the delivery.
            self.flush();
            return match self.shared.router.publish(topic, data) {
                Ok(_) => self.ack(id),
                Err(e) => self.error(ErrorCode::PublishFailed, &e.to_string(), id),
            };
        }
        match &mut self.pending {
            Some(batch) if batch.0 == topic => batch.1.push(data),
            _ => {
                self.flush();
                self.pending = Some(Box::new((topic.to_owned(), vec![data])));
            }
        }
    }
}
