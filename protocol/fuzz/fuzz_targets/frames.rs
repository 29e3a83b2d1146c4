//! Client bytes, split at an input-chosen point, through the frame reader:
//! it must never panic, never return a message larger than the limit, and
//! give the same messages however the bytes are split.
#![no_main]

use bytes::BytesMut;
use herald_protocol::ws::{Message, Reader};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fn run(chunks: &[&[u8]]) -> (Vec<Message>, bool) {
    let mut reader = Reader::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match reader.read(&mut buf, LIMIT) {
                Ok(Some(m)) => {
                    if let Message::Text(t) | Message::Binary(t) = &m {
                        assert!(t.len() <= LIMIT);
                    }
                    if let Message::Text(t) = &m {
                        assert!(std::str::from_utf8(t).is_ok());
                    }
                    out.push(m);
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let body = &data[1..];
    let split = split.min(body.len());
    let whole = run(&[body]);
    let parts = run(&[&body[..split], &body[split..]]);
    assert_eq!(whole, parts);
});
