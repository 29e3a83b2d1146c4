//! Positions in a topic's history: `seq` and `epoch`.
//!
//! Every delivery on a history topic carries where it stands:
//! `{"topic":T,"data":D,"seq":1742,"epoch":"k3f9"}`. `seq` grows with every
//! message the history keeps (one count across all history topics, so one
//! position also marks a place in a wildcard subscription's stream);
//! `epoch` names the history itself and changes only when it was lost. A
//! client hands the last position back in `sub` (`"since"`, or `since=`
//! in the URL as `EPOCH:SEQ`) to get what it missed.

use bytes::{Bytes, BytesMut};

use crate::ws::{self, OpCode};

/// Longest epoch accepted.
pub const MAX_EPOCH_LEN: usize = 32;

/// A place in the history, as a client gives it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    /// The last sequence number the client has.
    pub seq: u64,
    /// The history it came from.
    pub epoch: &'a str,
}

/// Why a position is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PositionError(pub String);

/// Whether `epoch` is a well-formed epoch: 1 to 32 ASCII letters and digits.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty() && epoch.len() <= MAX_EPOCH_LEN && epoch.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl<'a> Position<'a> {
    /// A position from its parts, checking the epoch.
    pub fn new(seq: u64, epoch: &'a str) -> Result<Self, PositionError> {
        if !valid_epoch(epoch) {
            return Err(PositionError(format!(
                "epoch must be 1 to {MAX_EPOCH_LEN} letters and digits"
            )));
        }
        Ok(Position { seq, epoch })
    }

    /// Parses the URL form `EPOCH:SEQ` (`since=k3f9:1742`).
    pub fn parse_url(s: &'a str) -> Result<Self, PositionError> {
        let (epoch, seq) = s
            .split_once(':')
            .ok_or_else(|| PositionError("since must be EPOCH:SEQ, e.g. since=k3f9:1742".into()))?;
        let seq = seq
            .parse::<u64>()
            .map_err(|_| PositionError(format!("since: {seq:?} is not a sequence number")))?;
        Position::new(seq, epoch)
    }
}

/// `{"topic":T,"data":D,"seq":N,"epoch":E}` as a whole text frame, appended
/// to `out`. `data` must be valid JSON and `epoch` valid.
pub fn put_delivery_at(out: &mut BytesMut, topic: &str, data: &[u8], seq: u64, epoch: &str) {
    const OPEN: &[u8] = b"{\"topic\":\"";
    const DATA: &[u8] = b"\",\"data\":";
    const SEQ: &[u8] = b",\"seq\":";
    const EPOCH: &[u8] = b",\"epoch\":\"";
    // Once per message, not per recipient.
    let digits = seq.to_string();
    let n = digits.len();
    let len =
        OPEN.len() + topic.len() + DATA.len() + data.len() + SEQ.len() + n + EPOCH.len() + epoch.len() + 2;
    out.reserve(ws::header_len(len) + len);
    ws::put_header(out, OpCode::Text, len);
    out.extend_from_slice(OPEN);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(DATA);
    out.extend_from_slice(data);
    out.extend_from_slice(SEQ);
    out.extend_from_slice(digits.as_bytes());
    out.extend_from_slice(EPOCH);
    out.extend_from_slice(epoch.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// [`put_delivery_at`] as its own buffer.
pub fn encode_delivery_at(topic: &str, data: &[u8], seq: u64, epoch: &str) -> Bytes {
    let mut out = BytesMut::new();
    put_delivery_at(&mut out, topic, data, seq, epoch);
    out.freeze()
}

/// Why a recovery could not give the client everything it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecovered {
    /// The history the position came from was lost (a new stream, an
    /// embedded node's restart).
    EpochChanged,
    /// Messages after the position are no longer retained.
    TooOld,
    /// More messages were missed than `--max-replay`.
    TooMany,
    /// The history store cannot be reached.
    HistoryUnavailable,
}

impl Unrecovered {
    /// The `reason` in the ack.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecovered::EpochChanged => "epoch_changed",
            Unrecovered::TooOld => "too_old",
            Unrecovered::TooMany => "too_many",
            Unrecovered::HistoryUnavailable => "history_unavailable",
        }
    }
}

/// The ack of a plain `sub` on a history topic: `{"op":"ack","id":ID,
/// "epoch":E,"seq":N}`, the history's position as the subscription took
/// effect (every message above `seq` follows), so a client that has
/// received nothing yet still knows where to recover from. `id` is the
/// request's JSON text, echoed as sent.
pub fn encode_ack_at(id: &str, epoch: &str, seq: u64) -> Bytes {
    let mut v = String::with_capacity(48 + id.len() + epoch.len());
    v.push_str("{\"op\":\"ack\",\"id\":");
    v.push_str(id);
    end_at(v, epoch, seq)
}

/// Ends an ack with the history's position and frames it.
fn end_at(mut v: String, epoch: &str, seq: u64) -> Bytes {
    v.push_str(",\"epoch\":\"");
    v.push_str(epoch);
    v.push_str("\",\"seq\":");
    v.push_str(&seq.to_string());
    v.push('}');
    ws::encode_frame(OpCode::Text, v.as_bytes())
}

/// The answer to a `sub` that asked for recovery (`since`):
/// `{"op":"ack","id":ID,"recovered":true}` or with `false` and a
/// `"reason"`; `"topic"` always names the pattern, so a URL subscription
/// (which has no id) is answered too. `epoch` and `seq` give the
/// history's current position.
pub fn encode_recovery_ack(
    id: Option<&str>,
    topic: &str,
    outcome: Result<(), Unrecovered>,
    epoch: &str,
    seq: u64,
) -> Bytes {
    let mut v = String::with_capacity(96 + topic.len());
    v.push_str("{\"op\":\"ack\"");
    if let Some(id) = id {
        v.push_str(",\"id\":");
        v.push_str(id);
    }
    v.push_str(",\"topic\":\"");
    v.push_str(topic);
    match outcome {
        Ok(()) => v.push_str("\",\"recovered\":true"),
        Err(r) => {
            v.push_str("\",\"recovered\":false,\"reason\":\"");
            v.push_str(r.as_str());
            v.push('"');
        }
    }
    end_at(v, epoch, seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_ack_on_history_carries_the_position() {
        let f = encode_ack_at("7", "k3f9", 1742);
        let v: serde_json::Value = serde_json::from_str(text(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"ack","id":7,"epoch":"k3f9","seq":1742})
        );
    }

    fn text(frame: &Bytes) -> &str {
        let hl = if frame[1] < 126 { 2 } else { 4 };
        std::str::from_utf8(&frame[hl..]).unwrap()
    }

    #[test]
    fn encodes_positions() {
        let f = encode_delivery_at("chat:lobby", br#"{"a":1}"#, 1742, "k3f9");
        assert_eq!(
            text(&f),
            r#"{"topic":"chat:lobby","data":{"a":1},"seq":1742,"epoch":"k3f9"}"#
        );
        let f = encode_delivery_at("t", b"0", 0, "e");
        assert_eq!(text(&f), r#"{"topic":"t","data":0,"seq":0,"epoch":"e"}"#);
        let f = encode_delivery_at("t", b"0", u64::MAX, "e");
        assert!(text(&f).contains("18446744073709551615"));
        let big = format!("\"{}\"", "x".repeat(200));
        let f = encode_delivery_at("t", big.as_bytes(), 7, "e");
        assert_eq!(f[1], 126);
        let v: serde_json::Value = serde_json::from_str(text(&f)).unwrap();
        assert_eq!(v["seq"], 7);
        let a = encode_recovery_ack(Some("1"), "chat:>", Err(Unrecovered::TooOld), "k3f9", 9);
        assert_eq!(
            text(&a),
            r#"{"op":"ack","id":1,"topic":"chat:>","recovered":false,"reason":"too_old","epoch":"k3f9","seq":9}"#
        );
        let a = encode_recovery_ack(None, "a", Ok(()), "e", 0);
        assert_eq!(
            text(&a),
            r#"{"op":"ack","topic":"a","recovered":true,"epoch":"e","seq":0}"#
        );
    }

    #[test]
    fn parses_url_positions() {
        assert_eq!(
            Position::parse_url("k3f9:1742").unwrap(),
            Position {
                seq: 1742,
                epoch: "k3f9"
            }
        );
        for bad in [
            "",
            "k3f9",
            ":1",
            "k3f9:",
            "k3f9:-1",
            "k3f9:x",
            "a-b:1",
            "k3f9:99999999999999999999",
        ] {
            assert!(Position::parse_url(bad).is_err(), "{bad}");
        }
        assert!(Position::new(1, &"a".repeat(33)).is_err());
    }
}
