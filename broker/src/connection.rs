//! One WebSocket session: its shared handle ([`Conn`]), its read loop and its
//! writer task.
//!
//! The read loop owns the read half and a buffer it drops whenever it is
//! empty, so an idle socket holds no read buffer. It waits on readiness
//! (cancel-safe) rather than inside a frame read, decodes with the sans-I/O
//! [`Reader`], and answers requests by pushing frames to the socket's
//! [`Outbox`]. The writer task owns the write half and writes whatever the
//! outbox holds in vectored batches.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use herald_protocol::message::{self, ErrorCode, Request};
use herald_protocol::ws::{self, close, Message, OpCode, Reader};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::outbox::{CloseRequest, Outbox, Pushed};
use crate::server::Node;

/// How long a closing socket waits for the peer's close reply (or for a
/// stuck write to finish its frame) before the TCP connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Read buffer handed to the kernel when a socket becomes readable.
const READ_CHUNK: usize = 4096;

/// The part of a session others can reach: the hub (to deliver), the
/// heartbeat (to ping or reap) and shutdown (to close).
#[derive(Debug)]
pub struct Conn {
    /// Node-unique id; also the client id in presence notices (`c{id}`).
    pub id: u64,
    /// Raw format: deliveries carry only the data.
    pub raw: bool,
    /// Frames waiting for the writer.
    pub outbox: Outbox,
    /// Set once the socket holds a wildcard subscription, so fan-out knows
    /// when it must check for a second match.
    pub(crate) wildcard: AtomicBool,
    /// Node clock (ms) when anything last arrived from the client.
    last_seen: AtomicU64,
    /// The socket's subscriptions. Written by its read loop; read by fan-out
    /// from the cluster link only for sockets holding a wildcard.
    subs: Mutex<Vec<Subscription>>,
    /// Where a writer task is started when frames arrive for an idle socket.
    tracker: TaskTracker,
}

impl Conn {
    /// A handle for socket `id`; writer tasks start under `tracker`.
    pub fn new(id: u64, raw: bool, queue_limit: usize, now_ms: u64, tracker: TaskTracker) -> Self {
        Conn {
            id,
            raw,
            outbox: Outbox::new(queue_limit),
            wildcard: AtomicBool::new(false),
            last_seen: AtomicU64::new(now_ms),
            subs: Mutex::new(Vec::new()),
            tracker,
        }
    }

    /// Queues a frame for the socket, starting its writer if none runs.
    pub fn push(self: &Arc<Self>, frame: Bytes) -> Pushed {
        let (pushed, start) = self.outbox.push(frame);
        self.start_writer(start);
        pushed
    }

    /// Asks for the socket to be closed (see [`Outbox::close`]); returns
    /// whether this request was the one taken.
    pub fn close(self: &Arc<Self>, req: CloseRequest) -> bool {
        let (taken, start) = self.outbox.close(req);
        self.start_writer(start);
        taken
    }

    fn start_writer(self: &Arc<Self>, wr: Option<OwnedWriteHalf>) {
        if let Some(wr) = wr {
            self.tracker.spawn(write_loop(self.clone(), wr));
        }
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, Vec<Subscription>> {
        self.subs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether, of this socket's subscriptions matching `topic`, `key` is the
    /// first (in byte order). A message that reaches the node once per
    /// matching subject subscription is delivered to the socket only through
    /// this one, so it arrives once.
    pub fn is_first_match(&self, key: &str, topic: &str) -> bool {
        self.subs()
            .iter()
            .filter(|s| herald_protocol::topic::matches(&s.pattern, topic))
            .map(|s| &*s.pattern)
            .min()
            .is_none_or(|first| first == key)
    }

    /// Whether the socket holds (or held) a wildcard subscription.
    pub fn has_wildcard(&self) -> bool {
        self.wildcard.load(Relaxed)
    }

    /// Node clock (ms) of the last frame from the client.
    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Relaxed)
    }
}

/// What the URL asked for, validated before the handshake was answered.
#[derive(Debug, Default, Clone)]
pub struct SessionParams {
    /// Subscriptions to hold from the start (`?sub=`).
    pub subs: Vec<String>,
    /// Raw mode's topic (`?topic=..&format=raw`).
    pub raw_topic: Option<String>,
    /// Display name for presence notices (`?name=`).
    pub name: Option<String>,
}

#[derive(Debug)]
struct Subscription {
    pattern: Box<str>,
    wildcard: bool,
}

/// A token bucket: `rate` publishes per second, bursts of `rate`.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        RateLimit {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How the read loop ended.
enum Exit {
    /// Close with this request (client close, protocol error).
    Close(CloseRequest),
    /// Someone else (hub, heartbeat, shutdown, writer) already asked to close.
    Closing,
    /// The peer is gone (EOF or I/O error).
    Gone,
}

struct Session {
    node: Arc<Node>,
    conn: Arc<Conn>,
    rate: RateLimit,
    name: Option<String>,
    /// Publishes without an id, in a row, on one topic, from the read buffer
    /// being processed: fanned out together when the buffer is done (or
    /// before anything else happens), so a burst costs each recipient one
    /// queue push and one write instead of one per message. Boxed: an idle
    /// session holds only the pointer.
    pending: Option<Box<(String, Vec<Bytes>)>>,
}

/// A session accepted but not yet upgraded: registered and subscribed, so
/// that by the time the client sees its socket open, its URL subscriptions
/// are in effect. Frames delivered meanwhile wait in the outbox.
pub struct Accepted {
    session: Session,
}

/// Registers a session for a handshake about to be answered with 101. The
/// caller reserved a connection slot in the metrics; the session releases
/// it when it ends (or [`Accepted::abandon`] does).
pub fn accept(node: &Arc<Node>, params: SessionParams) -> Accepted {
    let id = node.next_conn_id();
    let conn = Arc::new(Conn::new(
        id,
        params.raw_topic.is_some(),
        node.config.max_queue_bytes,
        node.now_ms(),
        node.tracker.clone(),
    ));
    node.sessions.insert(id, conn.clone());
    node.metrics.connections_total.fetch_add(1, Relaxed);
    let mut session = Session {
        rate: RateLimit::new(node.config.publish_rate),
        name: params.name,
        pending: None,
        conn,
        node: node.clone(),
    };
    for p in params.subs.iter().chain(params.raw_topic.iter()) {
        session.subscribe(p, None);
    }
    Accepted { session }
}

impl Accepted {
    /// Starts the session on the upgraded TCP stream: its writer task and
    /// its read task, both tracked by the node. `early` holds bytes the
    /// client sent right behind its handshake.
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
        // The writer runs only while there is something to write.
        let start = s.conn.outbox.install(wr);
        s.conn.start_writer(start);
        let buf = BytesMut::from(early);
        let tracker = s.node.tracker.clone();
        tracker.spawn(s.run(rd, buf).instrument(span.clone()));
    }

    /// The upgrade failed: leave every topic and release the slot.
    pub fn abandon(self) {
        let mut s = self.session;
        s.leave_all();
        s.node.sessions.remove(&s.conn.id);
        s.node.metrics.connections.fetch_sub(1, Relaxed);
    }
}

/// Reads and discards until the peer closes or [`CLOSE_GRACE`] passes, so
/// our close frame is not lost to a reset while the peer still sends.
async fn drain(rd: &OwnedReadHalf, mut scratch: BytesMut) {
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
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
        self.leave_all();
        let Session { node, conn, .. } = self;
        node.sessions.remove(&conn.id);
        node.metrics.connections.fetch_sub(1, Relaxed);
        match exit {
            Exit::Gone => {
                conn.close(CloseRequest {
                    code: 1006,
                    reason: "".into(),
                    flush: false,
                });
            }
            Exit::Close(req) => {
                tracing::debug!(code = req.code, reason = %req.reason, "closing");
                conn.close(req);
                // Boxed: the closing path's timer stays out of every idle
                // session's future.
                Box::pin(drain(&rd, buf)).await;
            }
            Exit::Closing => Box::pin(drain(&rd, buf)).await,
        }
        tracing::debug!("closed");
    }

    async fn read_loop(&mut self, rd: &OwnedReadHalf, buf: &mut BytesMut) -> Exit {
        let mut reader = Reader::new();
        let limit = self.node.config.max_message_bytes;
        loop {
            loop {
                match reader.read(buf, limit) {
                    Ok(Some(msg)) => {
                        self.conn.last_seen.store(self.node.now_ms(), Relaxed);
                        if let Some(req) = self.on_message(msg) {
                            self.flush();
                            return Exit::Close(req);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.flush();
                        self.node.metrics.protocol_errors.fetch_add(1, Relaxed);
                        return Exit::Close(CloseRequest {
                            code: e.close_code(),
                            reason: e.to_string().into(),
                            flush: true,
                        });
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
        self.node.metrics.error(code);
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
        if let Err(e) = self.node.bus.publish_batch(&topic, &datas) {
            self.error(ErrorCode::PublishFailed, &e.to_string(), None);
        }
    }

    /// Handles one message; `Some` ends the session with that close.
    fn on_message(&mut self, msg: Message) -> Option<CloseRequest> {
        match msg {
            Message::Text(t) => {
                // The reader validated UTF-8.
                let text = std::str::from_utf8(&t).unwrap_or_default();
                if text == self.node.config.heartbeat_word {
                    self.send(self.node.heartbeat_reply.clone());
                } else if let Some(topic) = self.raw_topic() {
                    self.publish(&topic, Bytes::from(message::json_string(text)), None);
                } else {
                    self.on_request(&t, text);
                }
            }
            Message::Binary(_) => self.error(
                ErrorCode::BinaryUnsupported,
                "binary frames are not supported; send JSON text frames",
                None,
            ),
            Message::Ping(p) => self.send(ws::encode_frame(OpCode::Pong, &p)),
            Message::Pong => {}
            Message::Close(code, _) => {
                return Some(CloseRequest {
                    code: code.unwrap_or(close::NORMAL),
                    reason: "".into(),
                    flush: true,
                })
            }
        }
        None
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
    fn on_request(&mut self, frame: &Bytes, text: &str) {
        let req = message::parse_request(text);
        if !matches!(req, Ok(Request::Pub { .. })) {
            self.flush();
        }
        match req {
            Err(e) => self.error(e.code, &e.message, e.id),
            Ok(Request::Sub { topic, id }) => {
                let held = {
                    let subs = self.conn.subs();
                    (subs.iter().any(|s| &*s.pattern == topic.as_str()), subs.len())
                };
                if held.0 {
                    return self.ack(id);
                }
                let max = self.node.config.max_subscriptions;
                if held.1 >= max {
                    let msg = format!("at most {max} subscriptions per socket");
                    return self.error(ErrorCode::SubscriptionLimit, &msg, id);
                }
                self.subscribe(topic.as_str(), id);
            }
            Ok(Request::Unsub { topic, id }) => {
                let removed = {
                    let mut subs = self.conn.subs();
                    let at = subs.iter().position(|s| &*s.pattern == topic.as_str());
                    at.map(|i| subs.swap_remove(i))
                };
                match removed {
                    Some(sub) => {
                        self.ack(id);
                        self.leave(&sub);
                    }
                    None => {
                        let msg = format!("not subscribed to {:?}", topic.as_str());
                        self.error(ErrorCode::NotSubscribed, &msg, id);
                    }
                }
            }
            Ok(Request::Pub { topic, data, id }) => {
                let data = frame.slice_ref(data.as_bytes());
                self.publish(topic.as_str(), data, id)
            }
        }
    }

    fn publish(&mut self, topic: &str, data: Bytes, id: Option<&str>) {
        if !self.rate.allow() {
            let msg = format!(
                "publish_rate: at most {} publishes per second per socket",
                self.node.config.publish_rate
            );
            return self.error(ErrorCode::RateLimited, &msg, id);
        }
        if id.is_some() {
            // Answered one by one: the ack follows the delivery.
            self.flush();
            return match self.node.bus.publish(topic, data) {
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

    /// Adds a subscription (already validated and under the limit), then
    /// acks it (when `ack` is given): a client that has the ack receives
    /// every message published after it.
    fn subscribe(&mut self, pattern: &str, ack: Option<&str>) {
        let wildcard = pattern.contains(['*', '>']);
        if wildcard {
            self.conn.wildcard.store(true, Relaxed);
        }
        let node = self.node.clone();
        let bus = &node.bus;
        {
            let mut subs = self.conn.subs();
            // Most sockets hold one or two subscriptions: grow one at a time.
            subs.reserve_exact(1);
            subs.push(Subscription {
                pattern: pattern.into(),
                wildcard,
            });
        }
        let interest = bus.hub().subscribe(pattern, wildcard, &self.conn);
        bus.interest(pattern, interest);
        self.node.metrics.subscriptions.fetch_add(1, Relaxed);
        self.ack(ack);
        if !wildcard && bus.hub().has_presence(pattern) {
            bus.presence(pattern, "join", &self.client(), self.name.as_deref());
        }
    }

    /// The socket's id in presence notices: unique across a cluster.
    fn client(&self) -> String {
        format!("c{}{}", self.conn.id, self.node.client_suffix)
    }

    fn leave(&self, sub: &Subscription) {
        let bus = &self.node.bus;
        let interest = bus.hub().unsubscribe(&sub.pattern, sub.wildcard, self.conn.id);
        bus.interest(&sub.pattern, interest);
        self.node.metrics.subscriptions.fetch_sub(1, Relaxed);
        if !sub.wildcard && bus.hub().has_presence(&sub.pattern) {
            bus.presence(&sub.pattern, "leave", &self.client(), self.name.as_deref());
        }
    }

    fn leave_all(&mut self) {
        let subs = std::mem::take(&mut *self.conn.subs());
        for sub in subs {
            self.leave(&sub);
        }
    }
}

/// Where a batch write stopped: frame index and offset inside it.
#[derive(Default)]
struct Cursor {
    frame: usize,
    offset: usize,
}

async fn write_frames(wr: &mut OwnedWriteHalf, frames: &[Bytes], at: &mut Cursor) -> io::Result<()> {
    const MAX_IOV: usize = 64;
    while at.frame < frames.len() {
        // The slices are built inside the poll so they never live in the
        // task's state: an idle writer stays small.
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (k, f) in frames[at.frame..].iter().take(MAX_IOV).enumerate() {
                let start = if k == 0 { at.offset } else { 0 };
                slices[n] = IoSlice::new(&f[start..]);
                n += 1;
            }
            std::pin::Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..n])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let left = frames[at.frame].len() - at.offset;
            if written >= left {
                written -= left;
                at.frame += 1;
                at.offset = 0;
            } else {
                at.offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}

/// How long a writer with nothing to write waits before it hands the write
/// half back and ends (an idle socket then holds no writer task).
const WRITER_IDLE: Duration = Duration::from_secs(2);

/// The writer task: drains the outbox until a close is requested (then
/// sends the close frame and shuts the write half), or until it has been
/// idle for [`WRITER_IDLE`] (then parks the write half in the outbox).
async fn write_loop(conn: Arc<Conn>, mut wr: OwnedWriteHalf) {
    let mut spare = Vec::new();
    loop {
        let ready = conn.outbox.ready();
        let mut batch = match conn.outbox.try_take(spare) {
            Ok(batch) => batch,
            Err(back) => {
                spare = back;
                if tokio::time::timeout(WRITER_IDLE, ready).await.is_err() {
                    match conn.outbox.park(wr) {
                        Ok(()) => return,
                        Err(back) => wr = back,
                    }
                }
                continue;
            }
        };
        let mut at = Cursor::default();
        if !batch.frames.is_empty() {
            let res = tokio::select! {
                r = write_frames(&mut wr, &batch.frames, &mut at) => r,
                _ = conn.outbox.aborted() => Err(io::ErrorKind::Interrupted.into()),
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // Aborted mid-batch: finish the frame on the wire so the
                    // close frame that follows is readable, then close.
                    let req = conn.outbox.take(Vec::new()).await.close;
                    let partial = (at.offset > 0).then(|| batch.frames[at.frame].slice(at.offset..));
                    return Box::pin(finish(&mut wr, partial, req)).await;
                }
                Err(_) => {
                    conn.close(CloseRequest {
                        code: 1006,
                        reason: "".into(),
                        flush: false,
                    });
                    return;
                }
            }
        }
        if let Some(req) = batch.close.take() {
            return Box::pin(finish(&mut wr, None, Some(req))).await;
        }
        batch.frames.clear();
        spare = batch.frames;
        if spare.capacity() > 256 {
            spare = Vec::new();
        }
    }
}

async fn finish(wr: &mut OwnedWriteHalf, partial: Option<Bytes>, req: Option<CloseRequest>) {
    let send = async {
        if let Some(p) = partial {
            wr.write_all(&p).await?;
        }
        if let Some(req) = req {
            if req.code != 1006 {
                wr.write_all(&ws::encode_close(req.code, &req.reason)).await?;
            }
        }
        wr.shutdown().await
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, send).await;
}
