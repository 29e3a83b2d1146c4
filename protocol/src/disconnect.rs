//! Every way a node ends a WebSocket session, with the close code and
//! reason it sends and whether the client should reconnect.
//!
//! This is the one place close codes are chosen. Codes 1000-1015 are RFC
//! 6455's; Herald's own codes 4000-4499 mean "reconnect" and 4500-4999 mean
//! "do not reconnect". docs/protocol.md's close-code table is checked
//! against [`Disconnect::KINDS`] by this module's tests.

use std::borrow::Cow;

use bytes::Bytes;

use crate::ws::{self, close, FrameError};

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// The client sent a close frame; its code (or 1000) is echoed.
    ClientClosed(Option<u16>),
    /// The node is shutting down or draining.
    GoingAway,
    /// The client broke the WebSocket protocol, sent text that is not UTF-8,
    /// or a message over the size limit.
    Protocol(FrameError),
    /// The socket's outbound queue passed its byte bound.
    SlowConsumer,
    /// Nothing arrived (not even a pong) for two ping intervals.
    HeartbeatTimeout,
    /// The TCP connection failed or was reset: no close frame can be sent.
    ConnectionLost,
    /// The node's writes to the socket made no progress for the write
    /// timeout: the connection is reset, nothing more is sent.
    WriteTimeout,
    /// The connection token expired without a refresh.
    TokenExpired,
    /// An `--exec` socket's program exited.
    ProgramExited,
    /// An `--exec` socket's program could not be started.
    ExecFailed,
    /// The token sent in an `auth` or `refresh` frame was refused, or none
    /// came in time; the text says why.
    Unauthorized(Cow<'static, str>),
}

impl Disconnect {
    /// One of each kind, for documentation and tests.
    pub const KINDS: &'static [Disconnect] = &[
        Disconnect::ClientClosed(None),
        Disconnect::GoingAway,
        Disconnect::Protocol(FrameError::Unmasked),
        Disconnect::Protocol(FrameError::InvalidUtf8),
        Disconnect::Protocol(FrameError::TooBig { size: 2, limit: 1 }),
        Disconnect::SlowConsumer,
        Disconnect::HeartbeatTimeout,
        Disconnect::ConnectionLost,
        Disconnect::WriteTimeout,
        Disconnect::TokenExpired,
        Disconnect::Unauthorized(Cow::Borrowed("token expired")),
        Disconnect::ProgramExited,
        Disconnect::ExecFailed,
    ];

    /// The close code sent (1006 is never sent: it names a lost connection).
    pub fn code(&self) -> u16 {
        match self {
            Disconnect::ClientClosed(code) => code.unwrap_or(close::NORMAL),
            Disconnect::GoingAway => close::GOING_AWAY,
            Disconnect::Protocol(e) => e.close_code(),
            Disconnect::SlowConsumer => close::SLOW_CONSUMER,
            Disconnect::HeartbeatTimeout => close::HEARTBEAT_TIMEOUT,
            Disconnect::ConnectionLost | Disconnect::WriteTimeout => close::ABNORMAL,
            Disconnect::TokenExpired => close::TOKEN_EXPIRED,
            Disconnect::ProgramExited => close::NORMAL,
            Disconnect::ExecFailed => close::INTERNAL_ERROR,
            Disconnect::Unauthorized(_) => close::UNAUTHORIZED,
        }
    }

    /// The close reason sent: a stable word, a colon, and an explanation.
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Disconnect::ClientClosed(_) | Disconnect::ConnectionLost | Disconnect::ProgramExited => {
                Cow::Borrowed("")
            }
            Disconnect::ExecFailed => Cow::Borrowed("exec_failed: the program could not be started"),
            Disconnect::WriteTimeout => Cow::Borrowed("write_timeout: the client took no bytes in time"),
            Disconnect::GoingAway => Cow::Borrowed("going_away: node shutting down, reconnect"),
            Disconnect::Protocol(e) => Cow::Owned(e.to_string()),
            Disconnect::SlowConsumer => Cow::Borrowed("slow_consumer: outbound queue limit exceeded"),
            Disconnect::HeartbeatTimeout => Cow::Borrowed("heartbeat_timeout: no answer to ping"),
            Disconnect::TokenExpired => Cow::Borrowed("token_expired: refresh or reconnect with a new token"),
            Disconnect::Unauthorized(why) => Cow::Owned(format!("unauthorized: {why}")),
        }
    }

    /// Whether the client should reconnect: the fault was the node's, the
    /// network's, or passing (a slow read); not the client's protocol.
    pub fn reconnect(&self) -> bool {
        match self {
            Disconnect::ClientClosed(_)
            | Disconnect::Protocol(_)
            | Disconnect::Unauthorized(_)
            | Disconnect::ProgramExited => false,
            Disconnect::ExecFailed
            | Disconnect::TokenExpired
            | Disconnect::GoingAway
            | Disconnect::SlowConsumer
            | Disconnect::HeartbeatTimeout
            | Disconnect::ConnectionLost
            | Disconnect::WriteTimeout => true,
        }
    }

    /// Whether frames already queued are sent before the close frame
    /// (the client is still reading), or dropped (it is not, or cannot).
    pub fn flushes(&self) -> bool {
        match self {
            Disconnect::ClientClosed(_)
            | Disconnect::GoingAway
            | Disconnect::Protocol(_)
            | Disconnect::TokenExpired
            | Disconnect::Unauthorized(_)
            | Disconnect::ProgramExited
            | Disconnect::ExecFailed => true,
            Disconnect::SlowConsumer
            | Disconnect::HeartbeatTimeout
            | Disconnect::ConnectionLost
            | Disconnect::WriteTimeout => false,
        }
    }

    /// The close frame to send, or `None` when the connection is lost.
    pub fn frame(&self) -> Option<Bytes> {
        match self {
            Disconnect::ConnectionLost | Disconnect::WriteTimeout => None,
            _ => Some(ws::encode_close(self.code(), &self.reason())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of docs/protocol.md's close-code table: code and the
    /// "Client should" column.
    fn documented() -> Vec<(u16, String)> {
        let doc = include_str!("../../docs/protocol.md");
        let table = doc
            .split("## Close codes")
            .nth(1)
            .expect("docs/protocol.md has a Close codes section");
        table
            .lines()
            .skip_while(|l| !l.starts_with("| Code"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].parse().expect("a numeric code"), cells[3].to_owned())
            })
            .collect()
    }

    #[test]
    fn the_documented_table_is_the_codes_sent() {
        let rows = documented();
        for d in Disconnect::KINDS {
            let row = rows.iter().find(|(c, _)| *c == d.code());
            let (_, should) = row.unwrap_or_else(|| panic!("{d:?}: code {} not documented", d.code()));
            assert_eq!(
                should.contains("reconnect"),
                d.reconnect(),
                "{d:?}: docs say {should:?}"
            );
            let word = d.reason();
            let word = word.split(':').next().unwrap_or("");
            if !word.is_empty() && d.code() >= 4000 || d.code() == close::GOING_AWAY {
                assert!(
                    doc_row_mentions(d.code(), word),
                    "{d:?}: reason {word:?} not in its row"
                );
            }
        }
        for (code, _) in &rows {
            assert!(
                Disconnect::KINDS.iter().any(|d| d.code() == *code),
                "docs list close code {code}, which the node never sends"
            );
        }
    }

    fn doc_row_mentions(code: u16, word: &str) -> bool {
        include_str!("../../docs/protocol.md")
            .lines()
            .any(|l| l.starts_with(&format!("| {code} |")) && l.contains(word))
    }

    #[test]
    fn close_frames_carry_code_and_reason() {
        let f = Disconnect::SlowConsumer.frame().unwrap();
        assert_eq!(&f[2..4], &4001u16.to_be_bytes());
        assert!(f[4..].starts_with(b"slow_consumer"));
        assert!(Disconnect::ConnectionLost.frame().is_none());
        assert_eq!(Disconnect::ClientClosed(Some(4100)).code(), 4100);
        for d in Disconnect::KINDS {
            assert_eq!(d.reconnect(), close::should_reconnect(d.code()), "{d:?}");
        }
    }
}
