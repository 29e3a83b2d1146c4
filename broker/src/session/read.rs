//! A WebSocket session: the read loop and request handling of one socket
//! ([`Session`]), and what every session shares ([`Shared`]).
//!
//! The read loop owns the read half and a buffer it drops whenever it is
//! empty, so an idle socket holds no read buffer. It waits on readiness
//! (cancel-safe) rather than inside a frame read, decodes with the sans-I/O
//! [`Reader`], and answers requests by pushing frames to the socket's
//! outbox; the socket's writer task (see [`crate::socket::writer`]) sends them.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use herald_protocol::message::{self, ErrorCode, ErrorReply, Request};
use herald_protocol::ws::{self, Message, OpCode, Reader};
use herald_protocol::Disconnect;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::auth::Identity;
use crate::cluster::subjects::Barrier;
use crate::history::recovery::Ask;
use crate::metrics::Held;
use crate::rate::RateLimit;
use crate::router::{Pending, Storing, Who};
use crate::session::deadlines::Due;
use crate::session::rawstatus;
pub use crate::session::state::Shared;
use crate::socket::subscriber::Subscriber;
use crate::socket::writer::discard;

/// Read buffer handed to the kernel when a socket becomes readable.
const READ_CHUNK: usize = 4096;

/// What the read loop does after a message.
enum Next {
    /// Read on.
    Go,
    /// Wait for a subscription to take effect (its ack follows), then read on.
    Wait(Barrier),
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
pub struct Session {
    shared: Arc<Shared>,
    conn: Arc<Subscriber>,
    /// Whom the socket's token names and what it may do; `None` on a node
    /// without access control.
    access: Option<Arc<Identity>>,
    /// No request handled yet: an `auth` frame is still welcome.
    fresh: bool,
    /// Publishes per second (`--publish-rate`).
    rate: RateLimit,
    /// `sub`/`unsub`/`auth`/`refresh` requests per second (8 bytes: every
    /// socket has one).
    sub_rate: RateLimit,
    /// `presence`/`presence_stats` requests per second: each answer is a
    /// member list, the costliest answer a socket can ask for.
    presence_rate: RateLimit,
    name: Option<String>,
    /// Publishes without an id, in a row, on one topic, from the read buffer
    /// being processed: fanned out together when the buffer is done (or
    /// before anything else happens), so a burst costs each recipient one
    /// queue push and one write instead of one per message. Boxed: an idle
    /// session holds only the pointer.
    pending: Option<Box<(String, Vec<Bytes>)>>,
    /// `--raw-status`: the last object this raw socket published.
    last: Option<Box<rawstatus::Last>>,
    /// The socket's recoveries, run one after another beside the read
    /// loop (boxed: most sockets never recover).
    recoveries: Option<Box<Recoveries>>,
    /// One clone per publish of this socket waiting for the history
    /// stream (see [`Session::answer_stored`]).
    stored: Option<Arc<()>>,
}

/// Most publishes one socket may have waiting for the history stream at
/// once (each waits at most the stream's store timeout).
const MAX_STORING: usize = 1024;

/// A socket's recoveries (see [`Session::recover`]).
struct Recoveries {
    /// The one queued last; the next waits for it.
    last: tokio::task::JoinHandle<()>,
    /// One clone per recovery that has not ended.
    queued: Arc<()>,
}

impl Session {
    /// A session for socket `conn`, with URL parameter `name` and `access`.
    pub fn new(
        shared: Arc<Shared>,
        conn: Arc<Subscriber>,
        name: Option<String>,
        access: Option<Arc<Identity>>,
    ) -> Self {
        Session {
            shared,
            conn,
            access,
            fresh: true,
            rate: RateLimit::default(),
            sub_rate: RateLimit::default(),
            presence_rate: RateLimit::default(),
            name,
            pending: None,
            last: None,
            recoveries: None,
            stored: None,
        }
    }

    /// Runs recovery `work` (see [`crate::router::Pending::Recovery`])
    /// beside the read loop, after the socket's earlier ones: one replay
    /// at a time per socket, in the order the client asked, each in its
    /// own seq order.
    pub fn recover(&mut self, work: Barrier) {
        let (before, queued) = match self.recoveries.take() {
            Some(r) => (Some(r.last), r.queued),
            None => (None, Arc::new(())),
        };
        // Counted, and against the socket's bound, until it has ended.
        let running = Held::new(self.shared.metrics.clone(), |m| &m.recoveries_running);
        let token = queued.clone();
        let last = self.shared.tracker.spawn(async move {
            let _counted = (running, token);
            if let Some(before) = before {
                let _ = before.await;
            }
            work.await;
        });
        self.recoveries = Some(Box::new(Recoveries { last, queued }));
    }

    /// Acks publish `id` once `storing` says the history stream stored it
    /// (or answers why not, and the publisher may send it again), beside
    /// the read loop.
    fn answer_stored(&mut self, storing: Storing, id: &str) {
        let queued = self.stored.get_or_insert_with(Default::default).clone();
        let (conn, metrics, id) = (self.conn.clone(), self.shared.metrics.clone(), id.to_owned());
        let storing_gauge = Held::new(metrics.clone(), |m| &m.publishes_storing);
        self.shared.tracker.spawn(async move {
            let _counted = (storing_gauge, queued);
            let answer = match storing.await {
                Ok(_) => message::encode_ack(&id),
                Err(why) => {
                    metrics.error(ErrorCode::PublishFailed);
                    message::encode_error(ErrorCode::PublishFailed, &why, Some(&id))
                }
            };
            conn.push(answer);
        });
    }

    /// Publishes of this socket waiting for the history stream.
    fn storing(&self) -> usize {
        self.stored.as_ref().map_or(0, |q| Arc::strong_count(q) - 1)
    }

    /// Recoveries of this socket that have yet to end.
    fn recovering(&self) -> usize {
        self.recoveries
            .as_ref()
            .map_or(0, |r| Arc::strong_count(&r.queued) - 1)
    }

    /// The socket's handle.
    pub fn conn(&self) -> &Arc<Subscriber> {
        &self.conn
    }

    /// Who the socket is, for presence.
    pub fn who(&self) -> Who<'_> {
        Who {
            name: self.name.as_deref(),
            user: self.access.as_ref().and_then(|a| a.user.as_deref()),
        }
    }

    /// Starts the session on the upgraded TCP stream: its read task, tracked
    /// by the node, and its writer when frames already wait. `early` holds
    /// bytes the client sent right behind its handshake.
    ///
    /// Setup happens here, outside any future, so the read task's state
    /// holds only what the read loop needs: an idle socket stays small.
    pub fn start(self, stream: TcpStream, early: &[u8]) {
        let remote = stream.peer_addr().ok();
        let user = self.access.as_ref().and_then(|a| a.user.clone());
        // The address itself (`127.0.0.1:5000`, not `Some(..)`); the field
        // is left out when the socket has none.
        let span = tracing::info_span!(
            "conn",
            conn_id = self.conn.id,
            remote_addr = remote.map(tracing::field::display),
            user = user.as_deref()
        );
        let _entered = span.enter();
        tracing::debug!("open");
        let (rd, wr) = stream.into_split();
        self.conn.install(wr);
        let buf = BytesMut::from(early);
        let tracker = self.shared.tracker.clone();
        tracker.spawn(self.run(rd, buf).instrument(span.clone()));
    }

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
    pub fn end(self) -> Arc<Subscriber> {
        let Session {
            shared,
            conn,
            name,
            access,
            last,
            ..
        } = self;
        let raw_topic = conn
            .raw
            .then(|| conn.subs().first().map(|s| s.pattern.to_string()))
            .flatten();
        let user = access.as_ref().and_then(|a| a.user.as_deref());
        let who = Who {
            name: name.as_deref(),
            user,
        };
        shared.router.leave_all(&conn, who);
        if let (Some(last), Some(topic)) = (last, raw_topic) {
            rawstatus::leave(&shared.router, &topic, &last);
        }
        shared.live.remove(&conn.id);
        shared.deadlines.clear(conn.id);
        conn
    }

    async fn read_loop(&mut self, rd: &OwnedReadHalf, buf: &mut BytesMut) -> Exit {
        let mut reader = Reader::new();
        let limit = self.shared.config.max_message_bytes;
        loop {
            loop {
                match reader.read(buf, limit) {
                    Ok(Some(msg)) => {
                        self.conn.seen(crate::clock::now_ms());
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
                    let marked = rawstatus::mark(&self.shared.config.raw_status, &topic, text);
                    // Escaping can grow text up to 6x: the limit applies to
                    // what every node would deliver, so all nodes agree.
                    let data = message::json_string(marked.as_deref().unwrap_or(text));
                    let max = self.shared.config.max_message_bytes;
                    if data.len() > max {
                        let msg = format!(
                            "message_too_big: {} bytes as a JSON string, over {max}",
                            data.len()
                        );
                        self.error(ErrorCode::MessageTooBig, &msg, None);
                    } else if self.publish(&topic, Bytes::from(data), None) {
                        // Remembered only once published: a refused object
                        // (too big, over the rate, forbidden) never goes
                        // out at leave either.
                        if let Some(marked) = marked {
                            let (router, conn) = (&self.shared.router, &self.conn);
                            rawstatus::remember(router, conn, &topic, &marked, &mut self.last);
                        }
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

    fn forbids(&self, topic: &str, publish: bool) -> Option<String> {
        self.access.as_ref()?.forbids(topic, publish)
    }

    /// `auth` (first request of a socket opened without a token; a refused
    /// token closes it with 4501) and `refresh` (a new token, same `sub`; a
    /// refused one gets an error and the current token stays until `exp`).
    fn token(&mut self, token: &str, id: Option<&str>, refresh: bool, fresh: bool) -> Next {
        let (Some(auth), Some(old)) = (self.shared.auth.clone(), self.access.clone()) else {
            self.error(
                ErrorCode::BadRequest,
                "no access control here: no token needed",
                id,
            );
            return Next::Go;
        };
        let checked = if refresh {
            auth.refresh(&old, token)
        } else if !fresh || old.has_token() {
            let msg = "auth must be the first request of a socket opened without a token; use refresh";
            Err(ErrorReply::new(ErrorCode::BadRequest, msg))
        } else {
            match auth.verify(token) {
                Ok(identity) => Ok(identity),
                Err(why) => {
                    self.shared.metrics.error(ErrorCode::Unauthorized);
                    return Next::Close(Disconnect::Unauthorized(why.into()));
                }
            }
        };
        match checked {
            Ok(identity) => {
                self.grant(identity);
                self.ack(id);
            }
            Err(ErrorReply { code, message: msg }) => self.error(code, &msg, id),
        }
        Next::Go
    }

    /// Takes `identity` as the socket's access, with its token's deadline,
    /// and ends the subscriptions its grants do not allow, each with a
    /// `forbidden` error frame.
    fn grant(&mut self, identity: Identity) {
        let deadline = identity.expires.saturating_mul(1000);
        self.shared
            .deadlines
            .set(self.conn.id, deadline, Due::TokenExpired);
        let grants = identity.grants.clone();
        self.access = Some(Arc::new(identity));
        let held = self.conn.patterns();
        for p in held.into_iter().filter(|p| !grants.may_subscribe(p)) {
            let _ = self.shared.router.unsubscribe(&self.conn, &p, self.who(), None);
            let msg = format!("forbidden: the token does not cover {p:?}; unsubscribed");
            self.error(ErrorCode::Forbidden, &msg, None);
        }
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
        let fresh = std::mem::replace(&mut self.fresh, false);
        if let Ok(
            Request::Sub { id, .. }
            | Request::Unsub { id, .. }
            | Request::Auth { id, .. }
            | Request::Refresh { id, .. },
        ) = &req
        {
            let rate = self.shared.config.subscribe_rate;
            if !self.sub_rate.allow(rate, crate::clock::now_ms()) {
                let msg =
                    format!("subscribe_rate: at most {rate} sub, unsub, auth and refresh requests per second per socket");
                self.error(ErrorCode::RateLimited, &msg, *id);
                return Next::Go;
            }
        }
        let router = &self.shared.router;
        let who = self.who();
        let (refused, id) = match req {
            Err(e) => {
                self.error(e.code, &e.message, e.id);
                return Next::Go;
            }
            Ok(Request::Sub {
                topic,
                id,
                since,
                last,
            }) => {
                if let Some(refusal) = self.forbids(topic.as_str(), false) {
                    self.error(ErrorCode::Forbidden, &refusal, id);
                    return Next::Go;
                }
                let ask = Ask::from_request(since, last);
                let max = self.shared.config.max_subscriptions;
                if ask.is_some() && self.recovering() >= max {
                    let msg = format!(
                        "recovery_limit: at most {max} recoveries at a time per socket (--max-subscriptions)"
                    );
                    self.error(ErrorCode::RateLimited, &msg, id);
                    return Next::Go;
                }
                match router.subscribe(&self.conn, topic.as_str(), who, id, ask.as_ref()) {
                    Ok(Some(Pending::Live(live))) => return Next::Wait(live),
                    Ok(Some(Pending::Recovery(work))) => {
                        self.recover(work);
                        return Next::Go;
                    }
                    Ok(None) => return Next::Go,
                    Err(r) => (r, id),
                }
            }
            Ok(Request::Unsub { topic, id }) => {
                match router.unsubscribe(&self.conn, topic.as_str(), who, id) {
                    Ok(()) => return Next::Go,
                    Err(r) => (r, id),
                }
            }
            Ok(Request::Presence { topic, id, stats }) => {
                let rate = self.shared.config.presence_rate;
                if !self.presence_rate.allow(rate, crate::clock::now_ms()) {
                    let msg = format!(
                        "presence_rate: at most {rate} presence and presence_stats requests per second per socket"
                    );
                    self.error(ErrorCode::RateLimited, &msg, id);
                    return Next::Go;
                }
                let answer = match self.forbids(topic.as_str(), false) {
                    Some(refusal) => Err(ErrorReply::new(ErrorCode::Forbidden, refusal)),
                    None => router.presence(topic.as_str(), stats, self.shared.config.presence_max_members),
                };
                match answer {
                    Ok(v) => self.send(message::encode_ack_with(id, v)),
                    Err(ErrorReply { code, message: msg }) => self.error(code, &msg, id),
                }
                return Next::Go;
            }
            Ok(Request::Auth { token, id }) => return self.token(token, id, false, fresh),
            Ok(Request::Refresh { token, id }) => return self.token(token, id, true, fresh),
            Ok(Request::Pub { topic, data, id }) => {
                let data = frame.slice_ref(data.as_bytes());
                self.publish(topic.as_str(), data, id);
                return Next::Go;
            }
        };
        self.error(refused.code(), &refused.to_string(), id);
        Next::Go
    }

    /// Publishes `data` on `topic` unless the grants or `--publish-rate`
    /// refuse it (with an error frame); true when it went out (or was
    /// queued to, with the batch), even if the cluster link then failed.
    fn publish(&mut self, topic: &str, data: Bytes, id: Option<&str>) -> bool {
        if let Some(refusal) = self.forbids(topic, true) {
            self.error(ErrorCode::Forbidden, &refusal, id);
            return false;
        }
        if !self
            .rate
            .allow(self.shared.config.publish_rate, crate::clock::now_ms())
        {
            let msg = format!(
                "publish_rate: at most {} publishes per second per socket",
                self.shared.config.publish_rate
            );
            self.error(ErrorCode::RateLimited, &msg, id);
            return false;
        }
        if let Some(id) = id {
            // Answered one by one: the ack follows the delivery.
            self.flush();
            if self.storing() >= MAX_STORING {
                let msg = format!(
                    "publish_rate: at most {MAX_STORING} publishes per socket waiting for the history stream"
                );
                self.error(ErrorCode::RateLimited, &msg, Some(id));
                return false;
            }
            match self.shared.router.publish_answered(topic, data) {
                Ok(None) => self.ack(Some(id)),
                Ok(Some(storing)) => self.answer_stored(storing, id),
                Err(e) => self.error(ErrorCode::PublishFailed, &e.to_string(), Some(id)),
            }
            return true;
        }
        match &mut self.pending {
            Some(batch) if batch.0 == topic => batch.1.push(data),
            _ => {
                self.flush();
                self.pending = Some(Box::new((topic.to_owned(), vec![data])));
            }
        }
        true
    }
}
