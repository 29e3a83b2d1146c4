//! `--raw-status`: the classic broadcast-chat server's status, for raw-mode
//! sockets on matching topics. A JSON object a socket sends is published
//! with `"status":1` (an existing `status` replaced); the socket's last one
//! is remembered (in the roster, so other nodes have it too) and, when the
//! socket goes, published again with `"status":0` by its node, or, if that
//! node dies, by the first surviving node after `--presence-ttl`.

use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::message;
use herald_protocol::topic::matches;
use serde_json::Value;

use crate::presence::roster::{Member, On};
use crate::router::Router;
use crate::socket::subscriber::Subscriber;

/// `text` with `"status"` set, if it is a JSON object; otherwise `None`
/// (published as it is).
pub fn with_status(text: &str, status: u8) -> Option<String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut m)) => {
            m.insert("status".into(), status.into());
            Some(Value::Object(m).to_string())
        }
        _ => None,
    }
}

/// A raw socket's last object, and its client id in the roster.
pub struct Last {
    client: String,
    text: String,
}

/// For a raw socket on `topic`: the text to publish with `"status":1` when
/// `--raw-status` covers the topic and the text is a JSON object. Nothing
/// is remembered yet: the caller checks it (size, rate, grants) and, once
/// it is published, calls [`remember`].
pub fn mark(patterns: &[String], topic: &str, text: &str) -> Option<String> {
    if !patterns.iter().any(|p| matches(p, topic)) {
        return None;
    }
    with_status(text, 1)
}

/// Records `marked`, an object [`mark`] gave and that was published, as
/// the socket's `last` object: the one published again with status 0 when
/// the socket goes. The socket joins the roster once, at its first object;
/// later ones only replace its last text there (one shard lock, the
/// buffers reused).
pub fn remember(
    router: &Router,
    conn: &Arc<Subscriber>,
    topic: &str,
    marked: &str,
    last: &mut Option<Box<Last>>,
) {
    let roster = router.hub().roster();
    let l = last.get_or_insert_with(|| {
        let client = router.client_id(conn);
        let member = Member {
            client: client.clone(),
            user: None,
            name: None,
            last: None,
        };
        roster.join(On::Here, topic, member);
        Box::new(Last {
            client,
            text: String::new(),
        })
    });
    l.text.clear();
    l.text.push_str(marked);
    roster.set_last(&l.client, marked);
}

/// The socket is gone: publish its last object with `"status":0`.
pub fn leave(router: &Router, topic: &str, last: &Last) {
    let roster = router.hub().roster();
    roster.leave(On::Here, topic, &last.client);
    roster.clear_last(&last.client);
    publish_zero(router, topic, &last.text);
}

/// Publishes `last` with `"status":0` on `topic`, as raw text.
pub fn publish_zero(router: &Router, topic: &str, last: &str) {
    if let Some(zero) = with_status(last, 0) {
        if let Err(e) = router.publish(topic, Bytes::from(message::json_string(&zero))) {
            tracing::warn!(topic, error = %e, "raw-status leave not published to every node");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_get_a_status_other_text_does_not() {
        let v: Value =
            serde_json::from_str(&with_status(r#"{"user":"ann","status":7}"#, 1).unwrap()).unwrap();
        assert_eq!(v["status"], 1);
        assert_eq!(v["user"], "ann");
        for text in ["hello", "[1,2]", "\"s\"", "3", "{bad"] {
            assert!(with_status(text, 1).is_none(), "{text}");
        }
    }
}
