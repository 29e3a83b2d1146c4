//! The NATS client protocol, sans-I/O: what a server sends, decoded from
//! the caller's buffer, and what a client sends, encoded into one.
//!
//! [`decode`] looks at the front of a buffer and answers with the next whole
//! server operation ([`ServerOp`]: `INFO`, `MSG`, `HMSG`, `PING`, `PONG`,
//! `+OK`, `-ERR`) and how many bytes it took, or that the buffer holds only
//! the start of one ([`Decoded::Incomplete`], with the whole length once a
//! `MSG` line says it), or why the bytes cannot be NATS ([`DecodeError`]).
//! It checks before it parses: a control line longer than the limit, or a
//! size past the largest message allowed, is refused from the line alone,
//! before any payload is buffered. It holds no state and copies nothing:
//! subject, reply, header block and payload borrow from the buffer (slice a
//! `Bytes` with `Bytes::slice_ref` to keep one), and the same bytes give
//! the same answer however they were split across reads. Operation names
//! are case-insensitive, as NATS servers accept them.
//!
//! The encoders write client commands (`CONNECT`, `SUB`, `UNSUB`, `PUB`,
//! `HPUB`, `PING`, `PONG`) into a `BytesMut`, reserving what they write.
//! A subject, queue group or header that would break the line framing
//! (whitespace in a subject, a line break in a header value) is refused
//! with an [`EncodeError`] before anything is written.

use std::fmt;

use bytes::{BufMut, BytesMut};

/// NATS's own ceiling for a message (headers and payload): the largest
/// `max_payload` a server can be configured with.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// The longest control line accepted by default, CRLF not counted.
pub const MAX_LINE: usize = 64 * 1024;
/// A whole `PING`, for a caller that sends it as a static chunk.
pub const PING: &[u8] = b"PING\r\n";
/// A whole `PONG`.
pub const PONG: &[u8] = b"PONG\r\n";
/// The first line of every header block.
pub const HEADER_LINE: &str = "NATS/1.0";

/// Bounds on what [`decode`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest control line, CRLF not counted.
    pub max_line: usize,
    /// Largest message, headers and payload together.
    pub max_payload: usize,
}

impl Default for Limits {
    /// [`MAX_LINE`] and [`MAX_PAYLOAD`].
    fn default() -> Self {
        Limits {
            max_line: MAX_LINE,
            max_payload: MAX_PAYLOAD,
        }
    }
}

/// An operation a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// `INFO {json}`: the server's description of itself (the JSON text,
    /// not parsed).
    Info(&'a str),
    /// `MSG` or `HMSG`: a message for one of the client's subscriptions.
    Msg(Msg<'a>),
    /// `PING`: answer with `PONG`.
    Ping,
    /// `PONG`: the answer to the oldest `PING` not yet answered.
    Pong,
    /// `+OK` (verbose mode only).
    Ok,
    /// `-ERR 'message'`: the message, without its quotes.
    Err(&'a str),
}

/// A message delivered for a subscription: `MSG subject sid [reply] size`,
/// or `HMSG subject sid [reply] header_size total_size` with a header block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg<'a> {
    /// The subject it was published on.
    pub subject: &'a str,
    /// The subscription it came through.
    pub sid: u64,
    /// Where to reply, when the publisher gave an inbox.
    pub reply: Option<&'a str>,
    /// `HMSG`: the raw header block, `NATS/1.0` line and closing blank line
    /// included (see [`header`]); `None` for `MSG`.
    pub headers: Option<&'a [u8]>,
    /// The payload.
    pub payload: &'a [u8],
}

/// What the front of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole operation, which took the first `len` bytes.
    Op {
        /// The operation.
        op: ServerOp<'a>,
        /// Bytes it took, CRLFs included.
        len: usize,
    },
    /// Only the start of an operation: more bytes are needed. `need` is its
    /// whole length when known (a `MSG` whose line has arrived), so the
    /// caller can make room once.
    Incomplete {
        /// The operation's whole length, when known.
        need: Option<usize>,
    },
}

/// Why bytes from a server cannot be NATS. Every one ends the connection:
/// there is no telling where the next operation starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No CRLF within the line limit.
    #[error("line longer than {limit} bytes")]
    LineTooLong {
        /// The limit.
        limit: usize,
    },
    /// A control line that is not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// A line that names no operation a server sends.
    #[error("unknown operation: {0:?}")]
    UnknownOp(String),
    /// Missing or extra arguments.
    #[error("malformed line: {0:?}")]
    BadLine(String),
    /// A sid or size that is not a decimal number (or overflows).
    #[error("bad number in {0:?}")]
    BadNumber(String),
    /// An `HMSG` whose header block is larger than the whole message.
    #[error("header size {header} exceeds total size {total}")]
    HeaderTooBig {
        /// The header block's announced size.
        header: usize,
        /// The message's announced size.
        total: usize,
    },
    /// A message larger than the limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooBig {
        /// The announced size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A message's bytes not followed by CRLF.
    #[error("message not followed by CRLF")]
    MissingCrlf,
}

/// Why a client command cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A subject, reply subject or queue group that is empty or holds
    /// whitespace or a control character.
    #[error("subject {0:?} is empty or holds whitespace or a control character")]
    BadSubject(String),
    /// A header name that is empty or holds `:`, whitespace or a control
    /// character.
    #[error("header name {0:?} is empty or holds ':', whitespace or a control character")]
    BadHeaderName(String),
    /// A header value with a line break.
    #[error("header value {0:?} holds a line break")]
    BadHeaderValue(String),
    /// `CONNECT` options with a line break.
    #[error("CONNECT options hold a line break")]
    BadConnect,
}

/// The longest excerpt of a bad line an error carries.
const EXCERPT: usize = 128;

fn excerpt(line: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&line[..line.len().min(EXCERPT)]).into_owned();
    if line.len() > EXCERPT {
        s.push('…');
    }
    s
}

/// Where the first CRLF in `buf` starts.
fn find_crlf(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let at = from + i;
        if at > 0 && buf[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

/// A decimal number of digits only.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.bytes().try_fold(0u64, |n, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Takes the next whole server operation from the front of `buf`. Never
/// panics; the answer for a prefix of some bytes is either
/// [`Decoded::Incomplete`] or the answer for the whole.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, DecodeError> {
    let scan = limits.max_line.saturating_add(2);
    let Some(end) = find_crlf(&buf[..buf.len().min(scan)]) else {
        if buf.len() >= scan {
            return Err(DecodeError::LineTooLong {
                limit: limits.max_line,
            });
        }
        return Ok(Decoded::Incomplete { need: None });
    };
    let raw = &buf[..end];
    let line = std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8)?;
    let line = line.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let op_end = line.find(|c: char| c.is_ascii_whitespace()).unwrap_or(line.len());
    let (name, rest) = line.split_at(op_end);
    let rest = rest.trim_matches(|c: char| c.is_ascii_whitespace());
    let len = end + 2;
    let bare = |op: ServerOp<'a>| {
        if rest.is_empty() {
            Ok(Decoded::Op { op, len })
        } else {
            Err(DecodeError::BadLine(excerpt(raw)))
        }
    };
    if name.eq_ignore_ascii_case("MSG") {
        msg(buf, raw, rest, len, false, limits)
    } else if name.eq_ignore_ascii_case("HMSG") {
        msg(buf, raw, rest, len, true, limits)
    } else if name.eq_ignore_ascii_case("PING") {
        bare(ServerOp::Ping)
    } else if name.eq_ignore_ascii_case("PONG") {
        bare(ServerOp::Pong)
    } else if name.eq_ignore_ascii_case("+OK") {
        bare(ServerOp::Ok)
    } else if name.eq_ignore_ascii_case("INFO") {
        if rest.is_empty() {
            return Err(DecodeError::BadLine(excerpt(raw)));
        }
        Ok(Decoded::Op {
            op: ServerOp::Info(rest),
            len,
        })
    } else if name.eq_ignore_ascii_case("-ERR") {
        let text = rest
            .strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .unwrap_or(rest);
        Ok(Decoded::Op {
            op: ServerOp::Err(text),
            len,
        })
    } else {
        Err(DecodeError::UnknownOp(excerpt(raw)))
    }
}

/// `MSG`/`HMSG` once its line (`raw`, arguments `args`, `head` bytes with
/// its CRLF) has arrived.
fn msg<'a>(
    buf: &'a [u8],
    raw: &[u8],
    args: &'a str,
    head: usize,
    with_headers: bool,
    limits: &Limits,
) -> Result<Decoded<'a>, DecodeError> {
    let mut a = [""; 5];
    let mut n = 0;
    for word in args.split_ascii_whitespace() {
        if n == a.len() {
            return Err(DecodeError::BadLine(excerpt(raw)));
        }
        a[n] = word;
        n += 1;
    }
    // subject sid [reply] [header_size] size
    let fixed = if with_headers { 4 } else { 3 };
    if n != fixed && n != fixed + 1 {
        return Err(DecodeError::BadLine(excerpt(raw)));
    }
    let reply = (n == fixed + 1).then_some(a[2]);
    let bad = || DecodeError::BadNumber(excerpt(raw));
    let sid = number(a[1]).ok_or_else(bad)?;
    let size = |s: &str| number(s).and_then(|v| usize::try_from(v).ok()).ok_or_else(bad);
    let total = size(a[n - 1])?;
    let hlen = if with_headers { size(a[n - 2])? } else { 0 };
    if hlen > total {
        return Err(DecodeError::HeaderTooBig { header: hlen, total });
    }
    let too_big = DecodeError::TooBig {
        size: total,
        limit: limits.max_payload,
    };
    if total > limits.max_payload {
        return Err(too_big);
    }
    let need = head
        .checked_add(total)
        .and_then(|v| v.checked_add(2))
        .ok_or(too_big)?;
    if buf.len() < need {
        return Ok(Decoded::Incomplete { need: Some(need) });
    }
    let body = &buf[head..head + total];
    if &buf[head + total..need] != b"\r\n" {
        return Err(DecodeError::MissingCrlf);
    }
    let (h, payload) = body.split_at(hlen);
    Ok(Decoded::Op {
        op: ServerOp::Msg(Msg {
            subject: a[0],
            sid,
            reply,
            headers: with_headers.then_some(h),
            payload,
        }),
        len: need,
    })
}

/// The value of header `name` (matched case-insensitively, as HTTP-style
/// names are) in a raw header block, trimmed; `None` when absent or when
/// the block is not UTF-8.
pub fn header<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(block).ok()?;
    text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl fmt::Display for ServerOp<'_> {
    /// The operation's control line, as a server would send it (without
    /// the CRLF); for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerOp::Info(json) => write!(f, "INFO {json}"),
            ServerOp::Msg(m) => {
                let op = if m.headers.is_some() { "HMSG" } else { "MSG" };
                write!(f, "{op} {} {}", m.subject, m.sid)?;
                if let Some(r) = m.reply {
                    write!(f, " {r}")?;
                }
                let hlen = m.headers.map_or(0, <[u8]>::len);
                if m.headers.is_some() {
                    write!(f, " {hlen}")?;
                }
                write!(f, " {}", hlen + m.payload.len())
            }
            ServerOp::Ping => f.write_str("PING"),
            ServerOp::Pong => f.write_str("PONG"),
            ServerOp::Ok => f.write_str("+OK"),
            ServerOp::Err(e) => write!(f, "-ERR '{e}'"),
        }
    }
}

// Encoding.

fn check_subject(s: &str) -> Result<(), EncodeError> {
    if s.is_empty() || s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(EncodeError::BadSubject(excerpt(s.as_bytes())));
    }
    Ok(())
}

/// Decimal digits of `n`, right-aligned in a stack buffer.
struct Digits {
    buf: [u8; 20],
    at: usize,
}

impl Digits {
    fn new(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return Digits { buf, at };
            }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.at..]
    }
}

/// `CONNECT {options}`: `options` is the JSON object (serde_json's compact
/// output never holds a raw line break).
pub fn connect(out: &mut BytesMut, options: &str) -> Result<(), EncodeError> {
    if options.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(EncodeError::BadConnect);
    }
    out.reserve(8 + options.len() + 2);
    out.put_slice(b"CONNECT ");
    out.put_slice(options.as_bytes());
    out.put_slice(b"\r\n");
    Ok(())
}

/// `SUB subject [queue] sid`.
pub fn sub(out: &mut BytesMut, subject: &str, queue: Option<&str>, sid: u64) -> Result<(), EncodeError> {
    check_subject(subject)?;
    if let Some(q) = queue {
        check_subject(q)?;
    }
    let sid = Digits::new(sid);
    out.reserve(4 + subject.len() + queue.map_or(0, |q| q.len() + 1) + 1 + sid.as_bytes().len() + 2);
    out.put_slice(b"SUB ");
    out.put_slice(subject.as_bytes());
    if let Some(q) = queue {
        out.put_u8(b' ');
        out.put_slice(q.as_bytes());
    }
    out.put_u8(b' ');
    out.put_slice(sid.as_bytes());
    out.put_slice(b"\r\n");
    Ok(())
}

/// `UNSUB sid [max]`: ends subscription `sid`, at once or after `max`
/// more messages.
pub fn unsub(out: &mut BytesMut, sid: u64, max: Option<u64>) {
    let sid = Digits::new(sid);
    let max = max.map(Digits::new);
    out.reserve(6 + sid.as_bytes().len() + max.as_ref().map_or(0, |m| m.as_bytes().len() + 1) + 2);
    out.put_slice(b"UNSUB ");
    out.put_slice(sid.as_bytes());
    if let Some(m) = &max {
        out.put_u8(b' ');
        out.put_slice(m.as_bytes());
    }
    out.put_slice(b"\r\n");
}

/// `PUB subject [reply] size`, the payload and its CRLF: one whole command.
pub fn publish(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    payload: &[u8],
) -> Result<(), EncodeError> {
    publish_head(out, subject, reply, payload.len())?;
    out.reserve(payload.len() + 2);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
    Ok(())
}

/// The `PUB subject [reply] size` line alone, for a writer that sends the
/// payload (and the CRLF after it, [`END`]) from buffers of its own.
pub fn publish_head(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    size: usize,
) -> Result<(), EncodeError> {
    check_subject(subject)?;
    if let Some(r) = reply {
        check_subject(r)?;
    }
    let size = Digits::new(size as u64);
    let line = 4 + subject.len() + reply.map_or(0, |r| r.len() + 1) + 1 + size.as_bytes().len() + 2;
    out.reserve(line);
    out.put_slice(b"PUB ");
    out.put_slice(subject.as_bytes());
    if let Some(r) = reply {
        out.put_u8(b' ');
        out.put_slice(r.as_bytes());
    }
    out.put_u8(b' ');
    out.put_slice(size.as_bytes());
    out.put_slice(b"\r\n");
    Ok(())
}

/// What ends every payload.
pub const END: &[u8] = b"\r\n";

/// The size of the header block [`hpub`] writes for `headers`.
fn block_len<K: AsRef<str>, V: AsRef<str>>(headers: &[(K, V)]) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(k, v)| k.as_ref().len() + 2 + v.as_ref().len() + 2)
        .sum();
    HEADER_LINE.len() + 2 + lines + 2
}

/// `HPUB subject [reply] header_size total_size`, a `NATS/1.0` header block
/// with `headers` (`Name: value` lines, in order), the payload and its
/// CRLF: one whole command. Header names may not hold `:`, whitespace or
/// control characters; values may not hold a line break.
pub fn hpub<K: AsRef<str>, V: AsRef<str>>(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    headers: &[(K, V)],
    payload: &[u8],
) -> Result<(), EncodeError> {
    hpub_head(out, subject, reply, headers, payload.len())?;
    out.reserve(payload.len() + 2);
    out.put_slice(payload);
    out.put_slice(b"\r\n");
    Ok(())
}

/// The `HPUB` line and its header block alone, for a payload of `size`
/// bytes the writer sends (then [`END`]) from buffers of its own.
pub fn hpub_head<K: AsRef<str>, V: AsRef<str>>(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    headers: &[(K, V)],
    size: usize,
) -> Result<(), EncodeError> {
    check_subject(subject)?;
    if let Some(r) = reply {
        check_subject(r)?;
    }
    for (k, v) in headers {
        let (k, v) = (k.as_ref(), v.as_ref());
        if k.is_empty()
            || k.bytes()
                .any(|b| b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(EncodeError::BadHeaderName(excerpt(k.as_bytes())));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(EncodeError::BadHeaderValue(excerpt(v.as_bytes())));
        }
    }
    let block = block_len(headers);
    let (hsize, tsize) = (Digits::new(block as u64), Digits::new((block + size) as u64));
    let line = 5
        + subject.len()
        + reply.map_or(0, |r| r.len() + 1)
        + 1
        + hsize.as_bytes().len()
        + 1
        + tsize.as_bytes().len()
        + 2;
    out.reserve(line + block);
    out.put_slice(b"HPUB ");
    out.put_slice(subject.as_bytes());
    if let Some(r) = reply {
        out.put_u8(b' ');
        out.put_slice(r.as_bytes());
    }
    out.put_u8(b' ');
    out.put_slice(hsize.as_bytes());
    out.put_u8(b' ');
    out.put_slice(tsize.as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(HEADER_LINE.as_bytes());
    out.put_slice(b"\r\n");
    for (k, v) in headers {
        out.put_slice(k.as_ref().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_ref().as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    Ok(())
}

/// `PING`.
pub fn ping(out: &mut BytesMut) {
    out.put_slice(PING);
}

/// `PONG`.
pub fn pong(out: &mut BytesMut) {
    out.put_slice(PONG);
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_head_then_the_payload_is_the_whole_command() {
        let h = [("Herald-Event", "join")];
        for payload in [&b""[..], b"{}", b"a\r\nb"] {
            let (mut whole, mut parts) = (BytesMut::new(), BytesMut::new());
            publish(&mut whole, "t.a", Some("r"), payload).unwrap();
            publish_head(&mut parts, "t.a", Some("r"), payload.len()).unwrap();
            parts.extend_from_slice(payload);
            parts.extend_from_slice(END);
            assert_eq!(whole, parts);
            let (mut whole, mut parts) = (BytesMut::new(), BytesMut::new());
            hpub(&mut whole, "t.a", None, &h, payload).unwrap();
            hpub_head(&mut parts, "t.a", None, &h, payload.len()).unwrap();
            parts.extend_from_slice(payload);
            parts.extend_from_slice(END);
            assert_eq!(whole, parts);
        }
    }

    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    /// Every operation in `bytes`, and the error that ended them (if any);
    /// panics on a trailing incomplete operation.
    fn all<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Vec<ServerOp<'a>>, DecodeError> {
        let mut at = 0;
        let mut ops = vec![];
        while at < bytes.len() {
            match decode(&bytes[at..], limits)? {
                Decoded::Op { op, len } => {
                    assert!(len > 0 && at + len <= bytes.len());
                    ops.push(op);
                    at += len;
                }
                Decoded::Incomplete { need } => panic!("incomplete at {at} (need {need:?})"),
            }
        }
        Ok(ops)
    }

    fn one(bytes: &[u8]) -> ServerOp<'_> {
        match decode(bytes, &limits()) {
            Ok(Decoded::Op { op, len }) => {
                assert_eq!(len, bytes.len(), "one op takes all of {bytes:?}");
                op
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
    }

    fn msg<'a>(subject: &'a str, sid: u64, reply: Option<&'a str>, payload: &'a [u8]) -> ServerOp<'a> {
        ServerOp::Msg(Msg {
            subject,
            sid,
            reply,
            headers: None,
            payload,
        })
    }

    fn hmsg<'a>(
        subject: &'a str,
        sid: u64,
        reply: Option<&'a str>,
        headers: &'a [u8],
        payload: &'a [u8],
    ) -> ServerOp<'a> {
        ServerOp::Msg(Msg {
            subject,
            sid,
            reply,
            headers: Some(headers),
            payload,
        })
    }

    const H: &[u8] = b"NATS/1.0\r\nA: 1\r\n\r\n";

    #[test]
    fn decodes_every_operation() {
        assert_eq!(
            one(b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n"),
            ServerOp::Info("{\"server_id\":\"x\",\"max_payload\":1048576}")
        );
        assert_eq!(one(b"PING\r\n"), ServerOp::Ping);
        assert_eq!(one(b"PONG\r\n"), ServerOp::Pong);
        assert_eq!(one(b"+OK\r\n"), ServerOp::Ok);
        assert_eq!(
            one(b"-ERR 'Authorization Violation'\r\n"),
            ServerOp::Err("Authorization Violation")
        );
        assert_eq!(one(b"-ERR\r\n"), ServerOp::Err(""));
        assert_eq!(one(b"MSG a.b 7 5\r\nhello\r\n"), msg("a.b", 7, None, b"hello"));
        assert_eq!(
            one(b"HMSG a.b 7 18 23\r\nNATS/1.0\r\nA: 1\r\n\r\nhello\r\n"),
            hmsg("a.b", 7, None, H, b"hello")
        );
    }

    #[test]
    fn reply_subject_present_or_absent() {
        assert_eq!(
            one(b"MSG a 1 _INBOX.x 2\r\nhi\r\n"),
            msg("a", 1, Some("_INBOX.x"), b"hi")
        );
        assert_eq!(one(b"MSG a 1 2\r\nhi\r\n"), msg("a", 1, None, b"hi"));
        assert_eq!(
            one(b"HMSG a 1 _INBOX.x 18 20\r\nNATS/1.0\r\nA: 1\r\n\r\nhi\r\n"),
            hmsg("a", 1, Some("_INBOX.x"), H, b"hi")
        );
        assert_eq!(
            one(b"HMSG a 1 18 20\r\nNATS/1.0\r\nA: 1\r\n\r\nhi\r\n"),
            hmsg("a", 1, None, H, b"hi")
        );
    }

    #[test]
    fn empty_payloads_and_headers_without_payload() {
        assert_eq!(one(b"MSG a 1 0\r\n\r\n"), msg("a", 1, None, b""));
        assert_eq!(
            one(b"HMSG a 1 18 18\r\nNATS/1.0\r\nA: 1\r\n\r\n\r\n"),
            hmsg("a", 1, None, H, b"")
        );
        // A zero-size header block is still an HMSG: headers present, empty.
        assert_eq!(one(b"HMSG a 1 0 2\r\nhi\r\n"), hmsg("a", 1, None, b"", b"hi"));
        assert_eq!(one(b"HMSG a 1 0 0\r\n\r\n"), hmsg("a", 1, None, b"", b""));
    }

    #[test]
    fn payload_may_hold_crlf_and_anything_else() {
        assert_eq!(
            one(b"MSG a 1 12\r\nPING\r\nMSG \r\n\r\n"),
            msg("a", 1, None, b"PING\r\nMSG \r\n")
        );
        let bin: Vec<u8> = (0..=255).collect();
        let mut m = b"MSG a 1 256\r\n".to_vec();
        m.extend_from_slice(&bin);
        m.extend_from_slice(b"\r\n");
        assert_eq!(one(&m), msg("a", 1, None, &bin));
    }

    #[test]
    fn operation_names_are_case_insensitive() {
        assert_eq!(one(b"ping\r\n"), ServerOp::Ping);
        assert_eq!(one(b"Pong\r\n"), ServerOp::Pong);
        assert_eq!(one(b"+ok\r\n"), ServerOp::Ok);
        assert_eq!(one(b"info {}\r\n"), ServerOp::Info("{}"));
        assert_eq!(one(b"-err 'x'\r\n"), ServerOp::Err("x"));
        assert_eq!(one(b"msg A.b 1 1\r\nx\r\n"), msg("A.b", 1, None, b"x"));
        assert_eq!(one(b"hMsG a 1 0 1\r\nx\r\n"), hmsg("a", 1, None, b"", b"x"));
    }

    #[test]
    fn arguments_may_be_separated_by_tabs_and_runs_of_spaces() {
        assert_eq!(one(b"MSG  a\t1   2\r\nhi\r\n"), msg("a", 1, None, b"hi"));
        assert_eq!(one(b"PING \r\n"), ServerOp::Ping);
    }

    /// Each whole stream, cut at every byte: the first part alone is
    /// incomplete, and the whole gives the operation.
    #[test]
    fn split_at_every_byte_boundary() {
        let streams: [&[u8]; 7] = [
            b"MSG a.b 7 _INBOX.1 5\r\nhello\r\n",
            b"HMSG a.b 7 18 23\r\nNATS/1.0\r\nA: 1\r\n\r\nhello\r\n",
            b"MSG a 1 0\r\n\r\n",
            b"INFO {\"a\":1}\r\n",
            b"PING\r\n",
            b"-ERR 'Stale Connection'\r\n",
            b"MSG a 1 4\r\n\r\n\r\n\r\n",
        ];
        for s in streams {
            let whole = one(s);
            for cut in 0..s.len() {
                match decode(&s[..cut], &limits()) {
                    Ok(Decoded::Incomplete { need }) => {
                        if let Some(n) = need {
                            assert_eq!(n, s.len(), "need for {s:?} cut at {cut}");
                        }
                    }
                    other => panic!("{s:?} cut at {cut}: {other:?}"),
                }
                // The caller's way: keep the first read, append the second.
                let mut buf = BytesMut::from(&s[..cut]);
                buf.extend_from_slice(&s[cut..]);
                assert_eq!(one(&buf), whole);
            }
        }
    }

    #[test]
    fn knows_the_whole_length_once_the_line_is_in() {
        assert_eq!(
            decode(b"MSG a 1 100\r\nabc", &limits()),
            Ok(Decoded::Incomplete {
                need: Some(13 + 100 + 2)
            })
        );
        assert_eq!(
            decode(b"MSG a 1 100", &limits()),
            Ok(Decoded::Incomplete { need: None })
        );
        assert_eq!(decode(b"", &limits()), Ok(Decoded::Incomplete { need: None }));
    }

    #[test]
    fn several_operations_in_one_buffer() {
        let bytes = b"PING\r\nMSG a 1 2\r\nhi\r\nHMSG b 2 r 18 19\r\nNATS/1.0\r\nA: 1\r\n\r\n!\r\n+OK\r\nPONG\r\nINFO {}\r\n-ERR 'e'\r\nMSG c 3 0\r\n\r\n";
        assert_eq!(
            all(bytes, &limits()).unwrap(),
            vec![
                ServerOp::Ping,
                msg("a", 1, None, b"hi"),
                hmsg("b", 2, Some("r"), H, b"!"),
                ServerOp::Ok,
                ServerOp::Pong,
                ServerOp::Info("{}"),
                ServerOp::Err("e"),
                msg("c", 3, None, b""),
            ]
        );
    }

    #[test]
    fn refuses_malformed_input() {
        let l = limits();
        let err = |b: &[u8]| decode(b, &l).unwrap_err();
        assert!(matches!(err(b"HELLO\r\n"), DecodeError::UnknownOp(_)));
        assert!(matches!(err(b"\r\n"), DecodeError::UnknownOp(_)));
        assert!(matches!(err(b"PINGPONG\r\n"), DecodeError::UnknownOp(_)));
        assert!(matches!(err(b"PING x\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"+OK x\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"INFO\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"MSG a 1\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"MSG\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"MSG a 1 r x 2\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"HMSG a 1 2\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"HMSG a 1 r 0 2 3\r\n"), DecodeError::BadLine(_)));
        assert!(matches!(err(b"MSG a x 2\r\n"), DecodeError::BadNumber(_)));
        assert!(matches!(err(b"MSG a 1 -2\r\n"), DecodeError::BadNumber(_)));
        assert!(matches!(err(b"MSG a 1 +2\r\n"), DecodeError::BadNumber(_)));
        assert!(matches!(err(b"MSG a 1 2x\r\n"), DecodeError::BadNumber(_)));
        assert!(matches!(
            err(b"MSG a 1 99999999999999999999999\r\n"),
            DecodeError::BadNumber(_)
        ));
        assert!(matches!(
            err(b"MSG a 18446744073709551616 1\r\n"),
            DecodeError::BadNumber(_)
        ));
        assert!(matches!(err(b"HMSG a 1 x 2\r\n"), DecodeError::BadNumber(_)));
        assert_eq!(
            err(b"HMSG a 1 5 4\r\n"),
            DecodeError::HeaderTooBig { header: 5, total: 4 }
        );
        assert_eq!(err(b"MSG a 1 2\r\nhiXY"), DecodeError::MissingCrlf);
        assert_eq!(err(b"MSG a 1 2\r\nhi\n\r"), DecodeError::MissingCrlf);
        assert_eq!(err(b"MSG a 1 \xff 2\r\n"), DecodeError::NotUtf8);
        // The error carries the line, cut short.
        let long = format!("NOPE {}\r\n", "x".repeat(1000));
        match err(long.as_bytes()) {
            DecodeError::UnknownOp(e) => assert!(e.starts_with("NOPE x") && e.len() < 200, "{e}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn refuses_a_size_past_the_limit_from_the_line_alone() {
        let l = Limits {
            max_line: 1024,
            max_payload: 64 << 20,
        };
        assert_eq!(
            decode(b"MSG a 1 67108865\r\n", &l),
            Err(DecodeError::TooBig {
                size: 67108865,
                limit: 64 << 20
            })
        );
        assert_eq!(
            decode(b"HMSG a 1 10 67108865\r\n", &l),
            Err(DecodeError::TooBig {
                size: 67108865,
                limit: 64 << 20
            })
        );
        assert_eq!(
            decode(b"MSG a 1 67108864\r\n", &l),
            Ok(Decoded::Incomplete {
                need: Some(18 + (64 << 20) + 2)
            })
        );
        let unbounded = Limits {
            max_line: 1024,
            max_payload: usize::MAX,
        };
        let line = format!("MSG a 1 {}\r\n", usize::MAX);
        assert!(matches!(
            decode(line.as_bytes(), &unbounded),
            Err(DecodeError::TooBig { .. })
        ));
    }

    #[test]
    fn refuses_a_line_past_the_limit_however_it_arrives() {
        let l = Limits {
            max_line: 16,
            max_payload: 1024,
        };
        // 16 bytes of line: accepted; 17: refused, whole or not.
        assert!(matches!(
            decode(b"MSG abcdefgh 1 0\r\n\r\n", &l),
            Ok(Decoded::Op { .. })
        ));
        assert_eq!(
            decode(b"MSG abcdefghi 1 0\r\n\r\n", &l),
            Err(DecodeError::LineTooLong { limit: 16 })
        );
        // Without its CRLF yet: incomplete until the line could not fit.
        assert_eq!(
            decode(b"MSG abcdefgh 1 0", &l),
            Ok(Decoded::Incomplete { need: None })
        );
        assert_eq!(
            decode(b"MSG abcdefgh 1 0\r", &l),
            Ok(Decoded::Incomplete { need: None })
        );
        assert_eq!(
            decode(b"MSG abcdefghi 1 0\r", &l),
            Err(DecodeError::LineTooLong { limit: 16 })
        );
        assert_eq!(
            decode(&[b'x'; 100], &l),
            Err(DecodeError::LineTooLong { limit: 16 })
        );
    }

    #[test]
    fn never_panics_on_prefixes_of_malformed_input() {
        let l = Limits {
            max_line: 32,
            max_payload: 64,
        };
        let inputs: [&[u8]; 8] = [
            b"\r\n\r\n\r\n",
            b"\n\n\n\r\r\r",
            b"MSG \r\n",
            b"HMSG a 1 0 99999999999999999999\r\n",
            b"MSG a 1 65\r\n",
            b"\xff\xfe\r\n",
            b"HMSG a 1 3 2\r\nabc\r\n",
            b"-ERR '\r\n",
        ];
        for s in inputs {
            for cut in 0..=s.len() {
                let _ = decode(&s[..cut], &l);
                let _ = decode(&s[cut..], &l);
            }
        }
    }

    #[test]
    fn reads_headers_from_a_block() {
        let block = b"NATS/1.0\r\nHerald-Event: join\r\nherald-client:  c1-ab \r\n\r\n";
        assert_eq!(header(block, "Herald-Event"), Some("join"));
        assert_eq!(header(block, "HERALD-CLIENT"), Some("c1-ab"));
        assert_eq!(header(block, "Herald-Name"), None);
        // The status line is not a header.
        assert_eq!(header(b"NATS/1.0 503:x\r\n\r\n", "NATS/1.0 503"), None);
        assert_eq!(header(b"\xff\r\nA: 1\r\n\r\n", "A"), None);
    }

    #[test]
    fn encodes_every_command() {
        let mut out = BytesMut::new();
        connect(&mut out, r#"{"verbose":false}"#).unwrap();
        sub(&mut out, "herald.a", None, 1).unwrap();
        sub(&mut out, "herald.*", Some("q"), 18446744073709551615).unwrap();
        unsub(&mut out, 1, None);
        unsub(&mut out, 20, Some(5));
        publish(&mut out, "a.b", None, b"hi").unwrap();
        publish(&mut out, "a.b", Some("_INBOX.1"), b"").unwrap();
        hpub(&mut out, "a.b", None, &[("A", "1")], b"hello").unwrap();
        hpub::<&str, &str>(&mut out, "a.b", Some("r"), &[], b"").unwrap();
        ping(&mut out);
        pong(&mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "CONNECT {\"verbose\":false}\r\n\
             SUB herald.a 1\r\n\
             SUB herald.* q 18446744073709551615\r\n\
             UNSUB 1\r\n\
             UNSUB 20 5\r\n\
             PUB a.b 2\r\nhi\r\n\
             PUB a.b _INBOX.1 0\r\n\r\n\
             HPUB a.b 18 23\r\nNATS/1.0\r\nA: 1\r\n\r\nhello\r\n\
             HPUB a.b r 12 12\r\nNATS/1.0\r\n\r\n\r\n\
             PING\r\n\
             PONG\r\n"
        );
    }

    #[test]
    fn reserves_exactly_what_it_writes() {
        let mut out = BytesMut::new();
        hpub(&mut out, "a.b", Some("r"), &[("Name", "value")], &[7; 1000]).unwrap();
        assert_eq!(out.capacity(), out.len());
        let mut out = BytesMut::new();
        publish(&mut out, "a.b", None, &[7; 1000]).unwrap();
        assert_eq!(out.capacity(), out.len());
    }

    #[test]
    fn refuses_what_would_break_the_framing() {
        let mut out = BytesMut::new();
        for bad in ["", "a b", "a\tb", "a\r\nb", "a\nb", "a\0b"] {
            assert!(matches!(
                sub(&mut out, bad, None, 1),
                Err(EncodeError::BadSubject(_))
            ));
            assert!(matches!(
                publish(&mut out, bad, None, b""),
                Err(EncodeError::BadSubject(_))
            ));
            assert!(matches!(
                publish(&mut out, "a", Some(bad), b""),
                Err(EncodeError::BadSubject(_))
            ));
            assert!(matches!(
                sub(&mut out, "a", Some(bad), 1),
                Err(EncodeError::BadSubject(_))
            ));
            assert!(matches!(
                hpub::<&str, &str>(&mut out, bad, None, &[], b""),
                Err(EncodeError::BadSubject(_))
            ));
        }
        for bad in ["", "A B", "A:B", "A\r\n", "A\n"] {
            assert!(matches!(
                hpub(&mut out, "a", None, &[(bad, "v")], b""),
                Err(EncodeError::BadHeaderName(_))
            ));
        }
        for bad in ["a\r\nB: 2", "a\n", "\r"] {
            assert!(matches!(
                hpub(&mut out, "a", None, &[("A", bad)], b""),
                Err(EncodeError::BadHeaderValue(_))
            ));
        }
        assert_eq!(connect(&mut out, "{}\r\nPUB a 0"), Err(EncodeError::BadConnect));
        // Nothing was written for any refused command.
        assert!(out.is_empty());
        // A value may hold spaces and colons.
        hpub(&mut out, "a", None, &[("A", "b: c d")], b"").unwrap();
    }

    /// What a server delivers for a client's `PUB`/`HPUB` to a subscriber
    /// holding `sid`: the same bytes after a control line that names the
    /// sid (`PUB s [r] n` becomes `MSG s sid [r] n`).
    fn delivered(command: &[u8], sid: u64) -> Vec<u8> {
        let end = find_crlf(command).unwrap();
        let line = std::str::from_utf8(&command[..end]).unwrap();
        let mut words = line.split(' ');
        let op = match words.next().unwrap() {
            "PUB" => "MSG",
            "HPUB" => "HMSG",
            other => panic!("not a publish: {other}"),
        };
        let subject = words.next().unwrap();
        let rest: Vec<&str> = words.collect();
        let mut out = format!("{op} {subject} {sid} {}", rest.join(" ")).into_bytes();
        out.extend_from_slice(&command[end..]);
        out
    }

    #[test]
    fn what_the_encoder_publishes_reads_back_as_delivered() {
        let payloads: [&[u8]; 4] = [b"", b"{\"a\":1}", b"line\r\nbreak\r\n", &[0, 255, 13, 10, 13]];
        let headers: [&[(&str, &str)]; 3] = [
            &[],
            &[("Herald-Event", "join")],
            &[
                ("Herald-Event", "leave"),
                ("Herald-Client", "c1-x"),
                ("X", "a: b c"),
            ],
        ];
        for payload in payloads {
            for reply in [None, Some("_INBOX.abc")] {
                let mut out = BytesMut::new();
                publish(&mut out, "herald.chat.lobby", reply, payload).unwrap();
                let wire = delivered(&out, 42);
                assert_eq!(
                    one(&wire),
                    msg("herald.chat.lobby", 42, reply, payload),
                    "{out:?}"
                );
                for hs in headers {
                    let mut out = BytesMut::new();
                    hpub(&mut out, "herald.chat.lobby", reply, hs, payload).unwrap();
                    let wire = delivered(&out, 7);
                    let ServerOp::Msg(m) = one(&wire) else {
                        panic!("{wire:?}")
                    };
                    assert_eq!((m.subject, m.sid, m.reply), ("herald.chat.lobby", 7, reply));
                    assert_eq!(m.payload, payload);
                    let block = m.headers.unwrap();
                    assert!(block.starts_with(b"NATS/1.0\r\n") && block.ends_with(b"\r\n\r\n"));
                    for (k, v) in hs {
                        assert_eq!(header(block, k), Some(*v));
                    }
                    let lines = std::str::from_utf8(block).unwrap().split("\r\n").count();
                    assert_eq!(
                        lines,
                        hs.len() + 3,
                        "NATS/1.0, the headers, a blank line, the end"
                    );
                }
            }
        }
    }

    #[test]
    fn displays_operations_as_their_lines() {
        let ops = [
            "INFO {}",
            "MSG a 1 2",
            "MSG a 1 r 2",
            "HMSG a 1 18 20",
            "PING",
            "PONG",
            "+OK",
            "-ERR 'x y'",
        ];
        let bytes = b"INFO {}\r\nMSG a 1 2\r\nhi\r\nMSG a 1 r 2\r\nhi\r\nHMSG a 1 18 20\r\nNATS/1.0\r\nA: 1\r\n\r\nhi\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'x y'\r\n";
        let shown: Vec<String> = all(bytes, &limits())
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ops);
    }
}
