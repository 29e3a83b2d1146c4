//! Protocol v1 JSON messages: client requests in, server frames out.
//!
//! Requests are parsed without building a JSON tree: `data` stays the
//! publisher's bytes ([`RawValue`] checks well-formedness only) and travels
//! byte for byte to every subscriber. Server frames are written straight into
//! a WebSocket frame buffer (header included), so one encode serves every
//! recipient.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::position::Position;
use crate::topic::{Pattern, Topic, TopicError};
use crate::ws::{self, OpCode};

/// Longest request `id` accepted (as JSON text).
pub const MAX_ID_LEN: usize = 64;

/// Error codes carried in error frames (`{"op":"error","code":...}`) and HTTP
/// error bodies. Stable: clients switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not well-formed JSON, or a field has the wrong type.
    BadJson,
    /// `op` names no known operation.
    UnknownOp,
    /// A required field is missing, or the request is otherwise malformed.
    BadRequest,
    /// The topic or pattern breaks the topic grammar.
    BadTopic,
    /// A binary frame where text is expected.
    BinaryUnsupported,
    /// The socket already holds the most subscriptions allowed.
    SubscriptionLimit,
    /// The socket publishes faster than allowed.
    RateLimited,
    /// `unsub` for a topic the socket is not subscribed to.
    NotSubscribed,
    /// A message larger than the limit (HTTP publish).
    MessageTooBig,
    /// The node holds the most connections allowed.
    ConnectionLimit,
    /// Missing or wrong API key (HTTP publish).
    Unauthorized,
    /// The publish could not be handed to the bus.
    PublishFailed,
    /// The node is draining.
    ShuttingDown,
    /// The client did not send its request head within the handshake timeout.
    HandshakeTimeout,
    /// An HTTP request body did not arrive within the body timeout.
    BodyTimeout,
    /// The node holds `--max-patterns` distinct wildcard patterns.
    PatternLimit,
    /// No such HTTP route.
    NotFound,
    /// A browser handshake from an origin the node does not allow.
    OriginNotAllowed,
    /// The token's grants do not cover the topic or pattern.
    Forbidden,
    /// The node runs `--exec-max-processes` programs already.
    ExecLimit,
    /// The node is at a bound for connections not yet upgraded (or for its
    /// file descriptors): retry after the `Retry-After` seconds.
    Overloaded,
    /// The history store cannot be reached (`GET /v1/history`).
    HistoryUnavailable,
}

impl ErrorCode {
    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownOp,
        ErrorCode::BadRequest,
        ErrorCode::BadTopic,
        ErrorCode::BinaryUnsupported,
        ErrorCode::SubscriptionLimit,
        ErrorCode::RateLimited,
        ErrorCode::NotSubscribed,
        ErrorCode::MessageTooBig,
        ErrorCode::ConnectionLimit,
        ErrorCode::Unauthorized,
        ErrorCode::PublishFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::HandshakeTimeout,
        ErrorCode::BodyTimeout,
        ErrorCode::Overloaded,
        ErrorCode::PatternLimit,
        ErrorCode::NotFound,
        ErrorCode::OriginNotAllowed,
        ErrorCode::Forbidden,
        ErrorCode::ExecLimit,
        ErrorCode::HistoryUnavailable,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadTopic => "bad_topic",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::SubscriptionLimit => "subscription_limit",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::MessageTooBig => "message_too_big",
            ErrorCode::ConnectionLimit => "connection_limit",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::PublishFailed => "publish_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::PatternLimit => "pattern_limit",
            ErrorCode::NotFound => "not_found",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ExecLimit => "exec_limit",
            ErrorCode::HistoryUnavailable => "history_unavailable",
        }
    }

    /// Index into [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        ErrorCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// A refused request: its code, a human message, and the request's `id` (if
/// the request got far enough to have one) so the error can be matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError<'a> {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// The request's `id`, as its JSON text.
    pub id: Option<&'a str>,
}

/// A parsed client request. Borrows from the frame it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Subscribe to a topic or pattern.
    Sub {
        /// What to subscribe to.
        topic: Pattern<'a>,
        /// Echoed in the ack; JSON text (a number or a string).
        id: Option<&'a str>,
        /// Recover what was missed after this position (`"since"`).
        since: Option<Position<'a>>,
        /// First deliver the latest retained message of each matching
        /// topic (`"last":true`).
        last: bool,
    },
    /// Drop a subscription.
    Unsub {
        /// The pattern as it was subscribed.
        topic: Pattern<'a>,
        /// Echoed in the ack.
        id: Option<&'a str>,
    },
    /// Publish `data` to `topic`.
    Pub {
        /// A concrete topic.
        topic: Topic<'a>,
        /// The publisher's JSON, byte for byte.
        data: &'a str,
        /// Echoed in the ack.
        id: Option<&'a str>,
    },
    /// Present a connection token (the first frame, when the URL had none).
    Auth {
        /// The JWT.
        token: &'a str,
        /// Echoed in the ack.
        id: Option<&'a str>,
    },
    /// Who is on a presence topic.
    Presence {
        /// A concrete topic.
        topic: Topic<'a>,
        /// Echoed in the answer.
        id: Option<&'a str>,
        /// Counts only (`presence_stats`).
        stats: bool,
    },
    /// Replace the connection token before it expires.
    Refresh {
        /// The new JWT (same `sub`).
        token: &'a str,
        /// Echoed in the ack.
        id: Option<&'a str>,
    },
}

/// A field that may be absent but, when present, keeps even `null` raw.
#[derive(Default)]
struct Raw<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|v| Raw(Some(v)))
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    op: Raw<'a>,
    #[serde(borrow, default)]
    topic: Raw<'a>,
    #[serde(borrow, default)]
    id: Raw<'a>,
    #[serde(borrow, default)]
    data: Raw<'a>,
    #[serde(borrow, default)]
    token: Raw<'a>,
    #[serde(borrow, default)]
    since: Raw<'a>,
    #[serde(borrow, default)]
    last: Raw<'a>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSince<'a> {
    seq: u64,
    #[serde(borrow)]
    epoch: &'a str,
}

fn err<'a>(code: ErrorCode, message: impl Into<String>, id: Option<&'a str>) -> RequestError<'a> {
    RequestError {
        code,
        message: message.into(),
        id,
    }
}

fn topic_err(e: TopicError, id: Option<&str>) -> RequestError<'_> {
    err(ErrorCode::BadTopic, e.to_string(), id)
}

/// The text of a JSON string with no escapes, straight from the frame.
fn plain_str(raw: &RawValue) -> Option<Result<&str, ()>> {
    let t = raw.get();
    let inner = t.strip_prefix('"')?.strip_suffix('"')?;
    Some(if inner.contains('\\') { Err(()) } else { Ok(inner) })
}

fn topic_field<'a>(topic: Raw<'a>, id: Option<&'a str>) -> Result<&'a str, RequestError<'a>> {
    let raw = topic
        .0
        .ok_or_else(|| err(ErrorCode::BadRequest, "missing field `topic`", id))?;
    match plain_str(raw) {
        Some(Ok(t)) => Ok(t),
        Some(Err(())) => Err(err(
            ErrorCode::BadTopic,
            "topic must not contain JSON escapes",
            id,
        )),
        None => Err(err(ErrorCode::BadRequest, "`topic` must be a string", id)),
    }
}

/// Parses one text frame as a request.
///
/// Topics must be plain JSON strings without escapes (the grammar has no
/// character that needs one), so a topic borrows from the frame.
pub fn parse_request(text: &str) -> Result<Request<'_>, RequestError<'_>> {
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| {
        let code = if e.is_data() {
            ErrorCode::BadRequest
        } else {
            ErrorCode::BadJson
        };
        err(code, e.to_string(), None)
    })?;
    let id = match wire.id.0 {
        None => None,
        Some(raw) => {
            let t = raw.get();
            let ok_kind = t.starts_with('"') || t.starts_with('-') || t.as_bytes()[0].is_ascii_digit();
            if !ok_kind || t.len() > MAX_ID_LEN {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("id must be a number or a string of at most {MAX_ID_LEN} bytes"),
                    None,
                ));
            }
            Some(t)
        }
    };
    let op_raw = wire
        .op
        .0
        .ok_or_else(|| err(ErrorCode::BadRequest, "missing field `op`", id))?;
    let op = match plain_str(op_raw) {
        Some(Ok(op)) => op,
        _ => return Err(err(ErrorCode::BadRequest, "`op` must be a plain string", id)),
    };
    match op {
        "sub" | "unsub" => {
            let t = topic_field(wire.topic, id)?;
            let topic = Pattern::parse(t).map_err(|e| topic_err(e, id))?;
            if op == "sub" {
                let since = match wire.since.0 {
                    None => None,
                    Some(raw) => {
                        let p: WireSince<'_> = serde_json::from_str(raw.get()).map_err(|_| {
                            err(
                                ErrorCode::BadRequest,
                                "since must be {\"seq\":N,\"epoch\":\"E\"}",
                                id,
                            )
                        })?;
                        Some(
                            Position::new(p.seq, p.epoch)
                                .map_err(|e| err(ErrorCode::BadRequest, format!("since: {e}"), id))?,
                        )
                    }
                };
                let last = match wire.last.0.map(RawValue::get) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(_) => return Err(err(ErrorCode::BadRequest, "last must be true or false", id)),
                };
                if last && since.is_some() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "`since` and `last` do not go together",
                        id,
                    ));
                }
                Ok(Request::Sub {
                    topic,
                    id,
                    since,
                    last,
                })
            } else {
                Ok(Request::Unsub { topic, id })
            }
        }
        "pub" => {
            let t = topic_field(wire.topic, id)?;
            let topic = Topic::parse(t).map_err(|e| topic_err(e, id))?;
            let data = wire
                .data
                .0
                .ok_or_else(|| err(ErrorCode::BadRequest, "missing field `data`", id))?;
            Ok(Request::Pub {
                topic,
                data: data.get(),
                id,
            })
        }
        "presence" | "presence_stats" => {
            let t = topic_field(wire.topic, id)?;
            let topic = Topic::parse(t).map_err(|e| topic_err(e, id))?;
            Ok(Request::Presence {
                topic,
                id,
                stats: op == "presence_stats",
            })
        }
        "auth" | "refresh" => {
            let raw = wire
                .token
                .0
                .ok_or_else(|| err(ErrorCode::BadRequest, "missing field `token`", id))?;
            let Some(Ok(token)) = plain_str(raw) else {
                return Err(err(
                    ErrorCode::BadRequest,
                    "`token` must be a string without escapes",
                    id,
                ));
            };
            Ok(if op == "auth" {
                Request::Auth { token, id }
            } else {
                Request::Refresh { token, id }
            })
        }
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            Err(err(
                ErrorCode::UnknownOp,
                format!("unknown op {shown:?}; expected sub, unsub, pub, presence, presence_stats, auth or refresh"),
                id,
            ))
        }
    }
}

#[derive(Deserialize)]
struct WireItem<'a> {
    #[serde(borrow, default)]
    topic: Raw<'a>,
    #[serde(borrow, default)]
    data: Raw<'a>,
}

/// One message of an HTTP publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// A concrete topic.
    pub topic: Topic<'a>,
    /// The JSON to deliver, byte for byte.
    pub data: &'a str,
}

/// Parses an HTTP publish body: one `{"topic":T,"data":D}` object, or a JSON
/// array of them (a batch). All items are validated before any is accepted;
/// an error names the item. `max_data` bounds each item's `data`.
pub fn parse_publish(body: &[u8], max_data: usize) -> Result<Vec<Publish<'_>>, RequestError<'_>> {
    let text = std::str::from_utf8(body).map_err(|_| err(ErrorCode::BadJson, "body is not UTF-8", None))?;
    // Check well-formedness first so a syntax error is reported as such
    // rather than as "no variant matched".
    validate_json(body).map_err(|e| err(ErrorCode::BadJson, e, None))?;
    let shape = |e: serde_json::Error| {
        err(
            ErrorCode::BadRequest,
            format!("body must be {{\"topic\":..,\"data\":..}} or an array of them: {e}"),
            None,
        )
    };
    // RawValue fields cannot go through serde's untagged buffering, so the
    // first byte picks the shape.
    let batch = text.trim_start().starts_with('[');
    let items: Vec<WireItem<'_>> = if batch {
        serde_json::from_str(text).map_err(shape)?
    } else {
        vec![serde_json::from_str(text).map_err(shape)?]
    };
    let mut out = Vec::with_capacity(items.len());
    for (n, item) in items.into_iter().enumerate() {
        let at = |m: &str| {
            if batch {
                format!("item {n}: {m}")
            } else {
                m.to_owned()
            }
        };
        let t = topic_field(item.topic, None).map_err(|e| err(e.code, at(&e.message), None))?;
        let topic = Topic::parse(t).map_err(|e| err(ErrorCode::BadTopic, at(&e.to_string()), None))?;
        let data = item
            .data
            .0
            .ok_or_else(|| err(ErrorCode::BadRequest, at("missing field `data`"), None))?
            .get();
        if data.len() > max_data {
            let m = format!(
                "data of {} bytes exceeds the limit of {max_data} bytes",
                data.len()
            );
            return Err(err(ErrorCode::MessageTooBig, at(&m), None));
        }
        out.push(Publish { topic, data });
    }
    Ok(out)
}

/// A whole text frame built by appending JSON pieces; the header is filled in
/// by [`FrameBuilder::finish`] without copying the body twice.
struct FrameBuilder {
    buf: BytesMut,
}

impl FrameBuilder {
    fn with_body_capacity(n: usize) -> Self {
        let mut buf = BytesMut::with_capacity(10 + n);
        buf.put_bytes(0, 10);
        FrameBuilder { buf }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(s);
        self
    }

    fn push_json_str(&mut self, s: &str) -> &mut Self {
        // Writing to a BytesMut cannot fail.
        let _ = serde_json::to_writer((&mut self.buf).writer(), s);
        self
    }

    fn finish(mut self) -> Bytes {
        let len = self.buf.len() - 10;
        let hl = ws::header_len(len);
        let mut head = [0u8; 10];
        ws::put_header(&mut &mut head[..], OpCode::Text, len);
        self.buf[10 - hl..10].copy_from_slice(&head[..hl]);
        let mut b = self.buf.freeze();
        bytes::Buf::advance(&mut b, 10 - hl);
        b
    }
}

/// `{"topic":T,"data":D}` as a whole text frame. `data` must be valid JSON.
pub fn encode_delivery(topic: &str, data: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    put_delivery(&mut out, topic, data);
    out.freeze()
}

/// Appends `{"topic":T,"data":D}` as a whole text frame to `out`, so a burst
/// of deliveries is encoded straight into one buffer.
pub fn put_delivery(out: &mut BytesMut, topic: &str, data: &[u8]) {
    const OPEN: &[u8] = b"{\"topic\":\"";
    const MIDDLE: &[u8] = b"\",\"data\":";
    let len = OPEN.len() + topic.len() + MIDDLE.len() + data.len() + 1;
    out.reserve(ws::header_len(len) + len);
    ws::put_header(out, OpCode::Text, len);
    out.extend_from_slice(OPEN);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(MIDDLE);
    out.extend_from_slice(data);
    out.extend_from_slice(b"}");
}

/// A join or leave notice as a whole text frame:
/// `{"topic":T,"event":"join","client":C}` (with `"name":N` when known).
pub fn encode_presence(
    topic: &str,
    event: &str,
    client: &str,
    user: Option<&str>,
    name: Option<&str>,
) -> Bytes {
    let mut f = FrameBuilder::with_body_capacity(64 + topic.len());
    f.push(b"{\"topic\":\"")
        .push(topic.as_bytes())
        .push(b"\",\"event\":")
        .push_json_str(event)
        .push(b",\"client\":")
        .push_json_str(client);
    if let Some(u) = user {
        f.push(b",\"user\":").push_json_str(u);
    }
    if let Some(n) = name {
        f.push(b",\"name\":").push_json_str(n);
    }
    f.push(b"}");
    f.finish()
}

/// The bare data as a raw-mode text frame: a JSON string becomes its text,
/// anything else stays its JSON text.
pub fn encode_raw(data: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    put_raw(&mut out, data);
    out.freeze()
}

/// Appends [`encode_raw`]'s frame to `out`.
pub fn put_raw(out: &mut BytesMut, data: &[u8]) {
    let text: Cow<'_, [u8]> = match data.first() {
        Some(b'"') => match serde_json::from_slice::<Cow<'_, str>>(data) {
            Ok(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
            Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
            Err(_) => Cow::Borrowed(data),
        },
        _ => Cow::Borrowed(data),
    };
    out.reserve(ws::header_len(text.len()) + text.len());
    ws::put_header(out, OpCode::Text, text.len());
    out.extend_from_slice(&text);
}

/// `{"op":"ack","id":ID}` as a whole text frame.
pub fn encode_ack(id: &str) -> Bytes {
    let mut f = FrameBuilder::with_body_capacity(20 + id.len());
    f.push(b"{\"op\":\"ack\",\"id\":").push(id.as_bytes()).push(b"}");
    f.finish()
}

/// An answer with a body: the JSON object `body` with `"op":"ack"` (and
/// `"id"` when given) added, as a whole text frame. The id is the
/// request's JSON text, echoed byte for byte (never parsed: `1e999` or a
/// 30-digit integer would not survive a round trip through a value).
pub fn encode_ack_with(id: Option<&str>, mut body: serde_json::Value) -> Bytes {
    if let Some(m) = body.as_object_mut() {
        m.remove("id");
    }
    body["op"] = "ack".into();
    let rest = body.to_string();
    let Some(id) = id else {
        return ws::encode_frame(OpCode::Text, rest.as_bytes());
    };
    // `rest` is an object with at least `op`: `{` then its members.
    let mut f = FrameBuilder::with_body_capacity(8 + id.len() + rest.len());
    f.push(b"{\"id\":")
        .push(id.as_bytes())
        .push(b",")
        .push(&rest.as_bytes()[1..]);
    f.finish()
}

/// An error a client is answered with: its code and a message saying why
/// and, where there is one, what to do instead. The one shape every layer
/// returns an answerable refusal in (an error frame, an HTTP body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong, as clients match on it.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ErrorReply {
    /// A reply with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorReply {}

/// `{"op":"error","code":C,"message":M}` (with `"id"` when known) as a whole
/// text frame.
pub fn encode_error(code: ErrorCode, message: &str, id: Option<&str>) -> Bytes {
    let mut f = FrameBuilder::with_body_capacity(48 + message.len());
    f.push(b"{\"op\":\"error\",");
    if let Some(id) = id {
        f.push(b"\"id\":").push(id.as_bytes()).push(b",");
    }
    f.push(b"\"code\":\"")
        .push(code.as_str().as_bytes())
        .push(b"\",\"message\":")
        .push_json_str(message)
        .push(b"}");
    f.finish()
}

/// The JSON body (no frame header) of an error, for HTTP responses:
/// `{"error":{"code":C,"message":M}}`.
pub fn error_body(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(48 + message.len());
    v.extend_from_slice(b"{\"error\":{\"code\":\"");
    v.extend_from_slice(code.as_str().as_bytes());
    v.extend_from_slice(b"\",\"message\":");
    let _ = serde_json::to_writer(&mut v, message);
    v.extend_from_slice(b"}}");
    v
}

/// A JSON string for `text`, as a publish would carry it (`herald pub --lines`,
/// raw-mode publishes).
pub fn json_string(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 2);
    let _ = serde_json::to_writer(&mut v, text);
    v
}

/// Checks that `data` is one well-formed JSON value, without building a tree.
pub fn validate_json(data: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<&RawValue>(data)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{Message, Reader};

    fn body(frame: &Bytes) -> String {
        let mut buf = BytesMut::from(&frame[..]);
        // Server frames are unmasked; re-mask by hand so the client reader
        // (which insists on masks) can check the header is well formed.
        let b1 = buf[1];
        let hl = ws::header_len(
            frame.len()
                - if b1 < 126 {
                    2
                } else if b1 == 126 {
                    4
                } else {
                    10
                },
        );
        let payload = buf.split_off(hl);
        let f = ws::encode_client_frame(true, OpCode::Text, [9, 9, 9, 9], &payload);
        match Reader::new().read(&mut BytesMut::from(&f[..]), 1 << 20).unwrap() {
            Some(Message::Text(t)) => String::from_utf8(t.to_vec()).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse_request(r#"{"op":"sub","topic":"todo:*","id":1}"#).unwrap(),
            Request::Sub {
                topic: Pattern::parse("todo:*").unwrap(),
                id: Some("1"),
                since: None,
                last: false,
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"sub","topic":"chat:>","since":{"seq":1742,"epoch":"k3f9"}}"#).unwrap(),
            Request::Sub {
                topic: Pattern::parse("chat:>").unwrap(),
                id: None,
                since: Some(Position {
                    seq: 1742,
                    epoch: "k3f9"
                }),
                last: false,
            }
        );
        assert!(matches!(
            parse_request(r#"{"op":"sub","topic":"a","last":true}"#).unwrap(),
            Request::Sub { last: true, .. }
        ));
        assert_eq!(
            parse_request(r#"{"op":"unsub","topic":"a","id":"x"}"#).unwrap(),
            Request::Unsub {
                topic: Pattern::parse("a").unwrap(),
                id: Some("\"x\"")
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"pub","topic":"a:b","data": {"n" : [1, 2]} }"#).unwrap(),
            Request::Pub {
                topic: Topic::parse("a:b").unwrap(),
                data: r#"{"n" : [1, 2]}"#,
                id: None
            }
        );
        assert!(matches!(
            parse_request(r#"{"op":"pub","topic":"a","data":null}"#).unwrap(),
            Request::Pub { data: "null", .. }
        ));
    }

    #[test]
    fn refuses_with_codes() {
        let code = |s: &str| parse_request(s).unwrap_err().code;
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"topic":"a"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"nope"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"sub"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"sub","topic":"a..b"}"#), ErrorCode::BadTopic);
        assert_eq!(
            code(r#"{"op":"pub","topic":"a:*","data":1}"#),
            ErrorCode::BadTopic
        );
        assert_eq!(code(r#"{"op":"pub","topic":"a"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"pub","topic":"a","data":}"#), ErrorCode::BadJson);
        assert_eq!(code(r#"{"op":"sub","topic":"a","id":{}}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"sub","topic":"\u0061"}"#), ErrorCode::BadTopic);
        assert_eq!(
            code(r#"{"op":"sub","op":"sub","topic":"a"}"#),
            ErrorCode::BadRequest
        );
        for bad in [
            r#"{"op":"sub","topic":"a","since":{"seq":-1,"epoch":"e"}}"#,
            r#"{"op":"sub","topic":"a","since":{"seq":1}}"#,
            r#"{"op":"sub","topic":"a","since":{"seq":1,"epoch":"e-1"}}"#,
            r#"{"op":"sub","topic":"a","since":{"seq":1,"epoch":"e","x":1}}"#,
            r#"{"op":"sub","topic":"a","since":"e:1"}"#,
            r#"{"op":"sub","topic":"a","last":1}"#,
            r#"{"op":"sub","topic":"a","last":true,"since":{"seq":1,"epoch":"e"}}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::BadRequest, "{bad}");
        }
        let e = parse_request(r#"{"op":"sub","topic":"a b","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some("7"));
    }

    #[test]
    fn parses_http_publish_bodies() {
        let one = parse_publish(br#"{"topic":"a:b","data":{"x":1}}"#, 100).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data, r#"{"x":1}"#);
        let many = parse_publish(br#"[{"topic":"a","data":1},{"topic":"b","data":"s"}]"#, 100).unwrap();
        assert_eq!(many.len(), 2);
        fn code(b: &[u8]) -> RequestError<'_> {
            parse_publish(b, 100).unwrap_err()
        }
        assert_eq!(code(b"{").code, ErrorCode::BadJson);
        assert_eq!(code(b"\xff").code, ErrorCode::BadJson);
        assert_eq!(code(b"1").code, ErrorCode::BadRequest);
        assert_eq!(code(br#"{"data":1}"#).code, ErrorCode::BadRequest);
        let e = code(br#"[{"topic":"a","data":1},{"topic":"a:*","data":1}]"#);
        assert_eq!(e.code, ErrorCode::BadTopic);
        assert!(e.message.starts_with("item 1:"), "{}", e.message);
        let big = format!(r#"{{"topic":"a","data":"{}"}}"#, "x".repeat(200));
        assert_eq!(code(big.as_bytes()).code, ErrorCode::MessageTooBig);
    }

    #[test]
    fn encodes_frames() {
        let d = encode_delivery("a:b", br#"{"x": 1}"#);
        assert_eq!(body(&d), r#"{"topic":"a:b","data":{"x": 1}}"#);
        let big = "y".repeat(70_000);
        let d = encode_delivery("t", format!("\"{big}\"").as_bytes());
        assert_eq!(d[1], 127);
        assert_eq!(body(&encode_ack("3")), r#"{"op":"ack","id":3}"#);
        for id in ["1e999", "123456789012345678901234567890", "-0.10", r#""\u00e9""#] {
            let f = encode_ack_with(Some(id), serde_json::json!({"clients": 2}));
            assert_eq!(
                body(&f),
                format!(r#"{{"id":{id},"clients":2,"op":"ack"}}"#),
                "the id as sent"
            );
        }
        assert_eq!(
            body(&encode_ack_with(None, serde_json::json!({}))),
            r#"{"op":"ack"}"#
        );
        assert_eq!(
            body(&encode_error(ErrorCode::BadTopic, "say \"no\"", Some("1"))),
            r#"{"op":"error","id":1,"code":"bad_topic","message":"say \"no\""}"#
        );
        assert_eq!(
            body(&encode_presence("chat:lobby", "join", "c1", None, Some("ann"))),
            r#"{"topic":"chat:lobby","event":"join","client":"c1","name":"ann"}"#
        );
        assert_eq!(&encode_raw(br#""a\"b""#)[2..], b"a\"b");
        assert_eq!(&encode_raw(b"[1]")[2..], b"[1]");
        assert_eq!(json_string("a\"b"), br#""a\"b""#);
        assert!(validate_json(b" [1, 2] ").is_ok());
        assert!(validate_json(b"[1, 2] x").is_err());
    }
}
