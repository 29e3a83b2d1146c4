//! Arbitrary text through the request, HTTP publish and topic parsers: no
//! panics, and whatever is accepted satisfies the grammar.
#![no_main]

use herald_protocol::message::{self, Request};
use herald_protocol::{Pattern, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match message::parse_request(text) {
            Ok(Request::Pub { topic, data, .. }) => {
                assert!(Topic::parse(topic.as_str()).is_ok());
                assert!(message::validate_json(data.as_bytes()).is_ok());
            }
            Ok(Request::Sub { topic, .. }) | Ok(Request::Unsub { topic, .. }) => {
                assert!(Pattern::parse(topic.as_str()).is_ok());
            }
            Ok(Request::Presence { topic, .. }) => {
                assert!(Topic::parse(topic.as_str()).is_ok());
            }
            Ok(Request::Auth { token, .. }) | Ok(Request::Refresh { token, .. }) => {
                assert!(!token.contains('"') && !token.contains('\\'));
            }
            Err(e) => assert!(!e.message.is_empty()),
        }
        // A grant covers a pattern only if it matches every topic the
        // pattern matches: check it on the pattern's own text as a topic.
        if let Some((g, p)) = text.split_once('|') {
            if let (Ok(_), Ok(t)) = (Pattern::parse(g), Topic::parse(p)) {
                assert_eq!(herald_protocol::topic::covers(g, p), herald_protocol::topic::matches(g, t.as_str()));
            }
        }
        if let Ok(t) = Topic::parse(text) {
            assert!(herald_protocol::topic::matches(text, t.as_str()));
            assert!(Pattern::parse(text).unwrap().matches(text));
        }
    }
    if let Ok(items) = message::parse_publish(data, 1024) {
        for i in items {
            assert!(i.data.len() <= 1024);
        }
    }
});
