//! Server bytes (raw, or spelled from grammar tokens), split at two
//! input-chosen points, through the NATS decoder: it must never panic,
//! never take more bytes than it has or ask for fewer than it has, and give
//! the same operations (and the same error, if any) however the bytes are
//! split.
#![no_main]

use bytes::{Buf, BytesMut};
use herald_protocol::nats::{self, DecodeError, Decoded, Limits, ServerOp};
use libfuzzer_sys::fuzz_target;

/// Small, so that inputs reach both limits.
const LIMITS: Limits = Limits {
    max_line: 64,
    max_payload: 512,
};

/// An operation, owned, to compare across runs.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    Info(String),
    Msg {
        subject: String,
        sid: u64,
        reply: Option<String>,
        headers: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Ok,
    Err(String),
}

fn own(op: ServerOp<'_>) -> Op {
    match op {
        ServerOp::Info(j) => Op::Info(j.into()),
        ServerOp::Msg(m) => {
            assert!(m.headers.map_or(0, <[u8]>::len) + m.payload.len() <= LIMITS.max_payload);
            assert!(!m.subject.is_empty() && !m.subject.contains(|c: char| c.is_ascii_whitespace()));
            Op::Msg {
                subject: m.subject.into(),
                sid: m.sid,
                reply: m.reply.map(Into::into),
                headers: m.headers.map(<[u8]>::to_vec),
                payload: m.payload.to_vec(),
            }
        }
        ServerOp::Ping => Op::Ping,
        ServerOp::Pong => Op::Pong,
        ServerOp::Ok => Op::Ok,
        ServerOp::Err(e) => Op::Err(e.into()),
    }
}

/// The reader's loop: append each read, take every whole op.
fn run(reads: &[&[u8]]) -> (Vec<Op>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    for r in reads {
        buf.extend_from_slice(r);
        loop {
            match nats::decode(&buf, &LIMITS) {
                Ok(Decoded::Op { op, len }) => {
                    assert!(len > 0 && len <= buf.len());
                    ops.push(own(op));
                    buf.advance(len);
                }
                Ok(Decoded::Incomplete { need }) => {
                    assert!(buf.len() <= LIMITS.max_line + 1 || need.is_some());
                    if let Some(n) = need {
                        assert!(n > buf.len());
                        assert!(n <= LIMITS.max_line + 2 + LIMITS.max_payload + 2);
                    }
                    break;
                }
                Err(e) => return (ops, Some(e)),
            }
        }
    }
    (ops, None)
}

/// Pieces of the grammar: in token mode each input byte below their
/// count stands for one, so the fuzzer reaches whole MSG and HMSG lines
/// without having to spell them.
const TOKENS: &[&[u8]] = &[
    b"MSG ",
    b"HMSG ",
    b"hmsg ",
    b"PING",
    b"PONG",
    b"+OK",
    b"-ERR '",
    b"INFO {}",
    b" ",
    b"\t",
    b"\r\n",
    b"\r",
    b"\n",
    b"0",
    b"1",
    b"2",
    b"5",
    b"12",
    b"13",
    b"64",
    b"512",
    b"18446744073709551616",
    b"a.b",
    b"_INBOX.x",
    b"NATS/1.0\r\n",
    b"A: 1\r\n",
    b"MSG a 1 2\r\nhi\r\n",
    b"HMSG a 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let spelled: Vec<u8>;
    let body = if data[2] & 1 == 0 {
        &data[3..]
    } else {
        spelled = data[3..]
            .iter()
            .flat_map(|b| {
                TOKENS
                    .get(*b as usize)
                    .copied()
                    .unwrap_or(std::slice::from_ref(b))
            })
            .copied()
            .collect();
        &spelled
    };
    // Two cuts anywhere: at data[0]/255 of the way, then data[1]/255 of the rest.
    let a = data[0] as usize * body.len() / 255;
    let b = a + data[1] as usize * (body.len() - a) / 255;
    let whole = run(&[body]);
    assert_eq!(whole, run(&[&body[..a], &body[a..]]));
    assert_eq!(whole, run(&[&body[..a], &body[a..b], &body[b..]]));
});
