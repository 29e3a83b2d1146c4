//! The protocol's hot paths: topic validation and wildcard matching, frame
//! reading and encoding, request parsing (publish validation).

use bytes::BytesMut;
use divan::{black_box, Bencher};
use herald_protocol::message::{self, parse_request};
use herald_protocol::topic::{matches, Pattern, Topic};
use herald_protocol::ws::{encode_client_frame, OpCode, Reader};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

#[divan::bench]
fn topic_parse() -> bool {
    Topic::parse(black_box("park:staff:7:shift")).is_ok()
}

#[divan::bench]
fn pattern_parse() -> bool {
    Pattern::parse(black_box("park:*:7:>")).is_ok()
}

#[divan::bench(args = ["todo:count", "todo:*", "chat:>", "*:*:*:x"])]
fn wildcard_match(pattern: &str) -> bool {
    matches(black_box(pattern), black_box("todo:count"))
}

#[divan::bench(args = [64, 1024, 16384])]
fn encode_delivery(bencher: Bencher, size: usize) {
    let data = format!("\"{}\"", "x".repeat(size));
    bencher.bench(|| message::encode_delivery(black_box("chat:lobby"), black_box(data.as_bytes())));
}

#[divan::bench(args = [64, 1024, 16384])]
fn read_client_frame(bencher: Bencher, size: usize) {
    let frame = encode_client_frame(true, OpCode::Text, [1, 2, 3, 4], "x".repeat(size).as_bytes());
    bencher
        .with_inputs(|| (Reader::new(), BytesMut::from(&frame[..])))
        .bench_local_refs(|(r, buf)| r.read(buf, 1 << 20).map(|m| m.is_some()));
}

#[divan::bench]
fn parse_publish_request(bencher: Bencher) {
    let req = r#"{"op":"pub","topic":"todo:count","data":{"n":41,"items":["a","b",{"c":[1,2,3]}]},"id":17}"#;
    bencher.bench(|| parse_request(black_box(req)).is_ok());
}

#[divan::bench]
fn validate_json_1k(bencher: Bencher) {
    let data = format!(
        r#"{{"list":[{}]}}"#,
        (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    bencher.bench(|| message::validate_json(black_box(data.as_bytes())).is_ok());
}
