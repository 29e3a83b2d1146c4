//! RFC 6455 frames, sans-I/O.
//!
//! [`Reader`] turns bytes a client sent into whole messages: it checks each
//! header before it parses (an explicit "incomplete" answer when more bytes are
//! needed), unmasks in place, reassembles fragments, validates UTF-8 and close
//! payloads, and enforces a message size limit before buffering the payload.
//! It holds no buffer of its own: the caller owns the `BytesMut` it reads into,
//! so an idle connection can drop its buffer entirely.
//!
//! The `encode_*` functions build unmasked server frames, header and payload
//! in one `Bytes`, so a frame is encoded once and shared by every recipient.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// A continuation of a fragmented message.
    Continuation,
    /// A text message (UTF-8).
    Text,
    /// A binary message.
    Binary,
    /// Close, with an optional code and reason.
    Close,
    /// Ping; answered with a pong carrying the same payload.
    Ping,
    /// Pong.
    Pong,
}

impl OpCode {
    fn from_u8(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Close code numbers. Which one a session ends with is chosen in one place,
/// [`crate::Disconnect`]. Codes 1000-1015 are RFC 6455's; 4000-4499 mean
/// "reconnect"; 4500-4999 mean "do not reconnect" (see docs/protocol.md).
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The node is shutting down or draining: reconnect (to another node).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol: terminal.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that was not UTF-8: terminal.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than the node's limit: terminal.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The connection was lost without a close frame (never sent; the
    /// code a client sees for a dropped connection).
    pub const ABNORMAL: u16 = 1006;
    /// The node failed on its side (an `--exec` program could not start).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The client did not read fast enough and its queue overflowed: reconnect.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// Nothing arrived (not even a pong) within the heartbeat window: reconnect.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The connection token expired without a refresh: get a new token,
    /// then reconnect.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The token was refused (bad, expired at connect, or missing): terminal.
    pub const UNAUTHORIZED: u16 = 4501;

    /// Whether a client that receives `code` should reconnect.
    pub fn should_reconnect(code: u16) -> bool {
        matches!(code, 1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 1014 | 4000..=4499)
    }
}

/// Why the client's bytes were refused. Each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcode 3-7 or 0xB-0xF.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// Clients must mask every frame.
    #[error("client frame not masked")]
    Unmasked,
    /// Control frames must be final and at most 125 bytes.
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControlFrame,
    /// A continuation with no message in progress, or a new message before the
    /// previous one finished.
    #[error("unexpected continuation or interleaved message")]
    BadFragmentation,
    /// A 64-bit length with the top bit set, or a non-minimal length encoding
    /// is fine per RFC; only the top bit is an error.
    #[error("invalid payload length")]
    BadLength,
    /// The message (all fragments together) exceeds the limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooBig {
        /// Size announced so far.
        size: u64,
        /// The configured limit.
        limit: usize,
    },
    /// A text message or close reason that is not UTF-8.
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A close payload of 1 byte, or a code that may not be sent.
    #[error("invalid close payload")]
    BadClose,
}

impl FrameError {
    /// The close code the node answers this error with.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig { .. } => close::MESSAGE_TOO_BIG,
            FrameError::InvalidUtf8 => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// A whole message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message, valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping with its payload (to echo in the pong).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame: the code (if any) and the reason.
    Close(Option<u16>, String),
}

/// Reassembles client messages from frames. Holds only the state of a
/// fragmented message in progress (nothing at all between messages).
#[derive(Debug, Default)]
pub struct Reader {
    /// Opcode and payload so far of a fragmented message in progress.
    partial: Option<(OpCode, BytesMut)>,
}

struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a client frame header at the start of `buf`: `Ok(None)` when more
/// bytes are needed.
fn parse_header(buf: &[u8], limit: usize, so_far: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, mut at): (u64, usize) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(FrameError::BadLength);
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::BadControlFrame);
    }
    if !opcode.is_control() && (so_far as u64).saturating_add(len) > limit as u64 {
        return Err(FrameError::TooBig {
            size: so_far as u64 + len,
            limit,
        });
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len: len as usize,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn parse_close(payload: &[u8]) -> Result<Message, FrameError> {
    match payload.len() {
        0 => Ok(Message::Close(None, String::new())),
        1 => Err(FrameError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(FrameError::BadClose);
            }
            let reason = simdutf8::basic::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Message::Close(Some(code), reason.to_owned()))
        }
    }
}

impl Reader {
    /// A reader with no message in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a fragmented message is being assembled.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes the next whole message from the front of `buf`, consuming the
    /// bytes it used. `Ok(None)`: more bytes are needed (whatever was consumed
    /// is kept inside the reader). `limit` bounds a message's payload size.
    pub fn read(&mut self, buf: &mut BytesMut, limit: usize) -> Result<Option<Message>, FrameError> {
        loop {
            let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len());
            let Some(h) = parse_header(buf, limit, so_far)? else {
                return Ok(None);
            };
            if buf.len() < h.header_len + h.payload_len {
                // Make room once for the whole frame so the next reads fill it.
                buf.reserve(h.header_len + h.payload_len - buf.len());
                return Ok(None);
            }
            buf.advance(h.header_len);
            let mut payload = buf.split_to(h.payload_len);
            unmask(&mut payload, h.mask);
            match h.opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong)),
                OpCode::Close => return parse_close(&payload).map(Some),
                OpCode::Continuation => {
                    let Some((_, acc)) = self.partial.as_mut() else {
                        return Err(FrameError::BadFragmentation);
                    };
                    acc.extend_from_slice(&payload);
                    if h.fin {
                        let (op, acc) = self.partial.take().expect("checked above");
                        return finish(op, acc).map(Some);
                    }
                }
                op @ (OpCode::Text | OpCode::Binary) => {
                    if self.partial.is_some() {
                        return Err(FrameError::BadFragmentation);
                    }
                    if h.fin {
                        return finish(op, payload).map(Some);
                    }
                    self.partial = Some((op, payload));
                }
            }
        }
    }
}

fn finish(op: OpCode, payload: BytesMut) -> Result<Message, FrameError> {
    if op == OpCode::Text {
        simdutf8::basic::from_utf8(&payload).map_err(|_| FrameError::InvalidUtf8)?;
        Ok(Message::Text(payload.freeze()))
    } else {
        Ok(Message::Binary(payload.freeze()))
    }
}

/// Length of the unmasked server frame header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes an unmasked, final frame header for `opcode` and `len` into `out`.
pub fn put_header(out: &mut impl BufMut, opcode: OpCode, len: usize) {
    out.put_u8(0x80 | opcode.as_u8());
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=65535 => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// One whole unmasked server frame.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// A close frame with `code` and `reason` (cut to fit 123 bytes on a char
/// boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OpCode::Close, &payload)
}

/// Masks and frames `payload` as a client would (for tests and tools).
pub fn encode_client_frame(fin: bool, opcode: OpCode, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + payload.len());
    put_client_frame(&mut out, fin, opcode, mask, payload);
    out
}

/// Appends one masked client frame to `out` (a load generator reuses `out`).
pub fn put_client_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, mask: [u8; 4], payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode.as_u8());
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: [u8; 4] = [1, 2, 3, 4];

    fn read_all(bytes: &[u8], limit: usize) -> Result<Vec<Message>, FrameError> {
        let mut r = Reader::new();
        let mut buf = BytesMut::from(bytes);
        let mut out = vec![];
        while let Some(m) = r.read(&mut buf, limit)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn reads_text_of_every_length_class() {
        for n in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload = "x".repeat(n);
            let f = encode_client_frame(true, OpCode::Text, M, payload.as_bytes());
            let msgs = read_all(&f, 1 << 20).unwrap();
            assert_eq!(msgs, vec![Message::Text(Bytes::from(payload))]);
        }
    }

    #[test]
    fn byte_at_a_time_yields_the_same_message() {
        let f = encode_client_frame(true, OpCode::Text, M, b"hello world");
        let mut r = Reader::new();
        let mut buf = BytesMut::new();
        let mut got = None;
        for b in f {
            buf.put_u8(b);
            if let Some(m) = r.read(&mut buf, 1024).unwrap() {
                got = Some(m);
            }
        }
        assert_eq!(got, Some(Message::Text(Bytes::from_static(b"hello world"))));
    }

    #[test]
    fn reassembles_fragments_around_a_ping() {
        let mut bytes = encode_client_frame(false, OpCode::Text, M, b"hel");
        bytes.extend(encode_client_frame(true, OpCode::Ping, M, b"p"));
        bytes.extend(encode_client_frame(true, OpCode::Continuation, M, b"lo"));
        let msgs = read_all(&bytes, 1024).unwrap();
        assert_eq!(
            msgs,
            vec![
                Message::Ping(Bytes::from_static(b"p")),
                Message::Text(Bytes::from_static(b"hello"))
            ]
        );
    }

    #[test]
    fn refuses_protocol_violations() {
        let unmasked = [0x81u8, 0x01, b'a'];
        assert_eq!(read_all(&unmasked, 10), Err(FrameError::Unmasked));
        let rsv = [0xC1u8, 0x80, 0, 0, 0, 0];
        assert_eq!(read_all(&rsv, 10), Err(FrameError::ReservedBits));
        let op = [0x83u8, 0x80, 0, 0, 0, 0];
        assert_eq!(read_all(&op, 10), Err(FrameError::UnknownOpcode(3)));
        let cont = encode_client_frame(true, OpCode::Continuation, M, b"x");
        assert_eq!(read_all(&cont, 10), Err(FrameError::BadFragmentation));
        let big_ping = encode_client_frame(true, OpCode::Ping, M, &[0; 126]);
        assert_eq!(read_all(&big_ping, 1000), Err(FrameError::BadControlFrame));
        let frag_ping = encode_client_frame(false, OpCode::Ping, M, b"");
        assert_eq!(read_all(&frag_ping, 1000), Err(FrameError::BadControlFrame));
        let bad_utf8 = encode_client_frame(true, OpCode::Text, M, &[0xff, 0xfe]);
        assert_eq!(read_all(&bad_utf8, 10), Err(FrameError::InvalidUtf8));
        let mut interleaved = encode_client_frame(false, OpCode::Text, M, b"a");
        interleaved.extend(encode_client_frame(true, OpCode::Text, M, b"b"));
        assert_eq!(read_all(&interleaved, 10), Err(FrameError::BadFragmentation));
        let close1 = encode_client_frame(true, OpCode::Close, M, &[3]);
        assert_eq!(read_all(&close1, 10), Err(FrameError::BadClose));
        let close_bad_code = encode_client_frame(true, OpCode::Close, M, &[0x03, 0xEE]);
        assert_eq!(read_all(&close_bad_code, 10), Err(FrameError::BadClose));
        let huge = [0x81u8, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(read_all(&huge, 10), Err(FrameError::BadLength));
    }

    #[test]
    fn refuses_oversize_from_the_header_alone() {
        // Only the header has arrived; the limit is enforced before buffering.
        let header = [0x81u8, 0xFF, 0, 0, 0, 0, 0, 0x10, 0, 0];
        let e = read_all(&header, 65536).unwrap_err();
        assert!(matches!(e, FrameError::TooBig { limit: 65536, .. }));
        assert_eq!(e.close_code(), close::MESSAGE_TOO_BIG);
        let mut frags = encode_client_frame(false, OpCode::Text, M, &[b'a'; 8]);
        frags.extend(encode_client_frame(true, OpCode::Continuation, M, &[b'a'; 8]));
        assert!(matches!(
            read_all(&frags, 10),
            Err(FrameError::TooBig { size: 16, .. })
        ));
    }

    #[test]
    fn close_payloads() {
        let f = encode_client_frame(true, OpCode::Close, M, &[0x03, 0xE8, b'b', b'y', b'e']);
        assert_eq!(
            read_all(&f, 10).unwrap(),
            vec![Message::Close(Some(1000), "bye".into())]
        );
        let f = encode_client_frame(true, OpCode::Close, M, b"");
        assert_eq!(
            read_all(&f, 10).unwrap(),
            vec![Message::Close(None, String::new())]
        );
    }

    #[test]
    fn encodes_server_frames_unmasked() {
        assert_eq!(&encode_frame(OpCode::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = encode_frame(OpCode::Text, &[0; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        let f = encode_frame(OpCode::Binary, &[0; 70000]);
        assert_eq!(f[1], 127);
        assert_eq!(f.len(), 10 + 70000);
        let c = encode_close(1001, &"é".repeat(100));
        assert_eq!(&c[2..4], &1001u16.to_be_bytes());
        assert!(c.len() <= 127);
        assert!(std::str::from_utf8(&c[4..]).is_ok());
        assert!(close::should_reconnect(close::GOING_AWAY));
        assert!(close::should_reconnect(close::SLOW_CONSUMER));
        assert!(!close::should_reconnect(close::PROTOCOL_ERROR));
        assert!(!close::should_reconnect(4500));
    }
}
