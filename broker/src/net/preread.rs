//! A connection's first request head, read under the handshake timeout
//! before hyper sees the connection, so a client that is too slow gets a
//! named refusal (408 `handshake_timeout`) instead of a silent close.
//!
//! The bytes read are handed to hyper through [`Prefixed`], an I/O wrapper
//! that serves them first and then reads the socket. A head whose request
//! target hyper would refuse with a bare 400 gets the JSON error every
//! other refusal carries instead ([`bad_target`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use herald_protocol::ErrorCode;

use crate::metrics::Metrics;
use std::sync::atomic::Ordering::Relaxed;

/// What happened to the first request head.
pub enum Head {
    /// The head (or more than the head limit) arrived: serve the connection.
    Arrived(Bytes),
    /// The client closed, or the socket failed, before a head arrived.
    Gone,
    /// The handshake timeout passed first; the client was told with 408.
    TimedOut,
}

/// Reads until the end of the first request head (or `limit` bytes, which
/// hyper then refuses with 431), at most for `timeout`. A timeout is counted
/// in `metrics` before the client is told.
pub async fn first_head(stream: &mut TcpStream, timeout: Duration, limit: usize, metrics: &Metrics) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    // Where the search for the head's end resumes: each byte is scanned
    // once, however the head is split over reads.
    let mut scanned = 0;
    let read = async {
        loop {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(1024);
            }
            if stream.readable().await.is_err() {
                return false;
            }
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return false,
                Ok(_) => {
                    if buf[scanned..].windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= limit {
                        return true;
                    }
                    scanned = buf.len().saturating_sub(3);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(true) => Head::Arrived(buf.freeze()),
        Ok(false) => Head::Gone,
        Err(_) => {
            metrics.handshake_timeouts.fetch_add(1, Relaxed);
            let msg = format!("handshake_timeout: request head not received within {timeout:?}");
            refuse(
                stream,
                "408 Request Timeout",
                ErrorCode::HandshakeTimeout,
                &msg,
                metrics,
            )
            .await;
            Head::TimedOut
        }
    }
}

/// Answers a connection before hyper sees it: `status` with the JSON error
/// body every refusal carries, then closes (waiting at most a second for a
/// client that does not read).
pub async fn refuse(stream: &mut TcpStream, status: &str, code: ErrorCode, msg: &str, metrics: &Metrics) {
    metrics.error(code);
    let body = herald_protocol::message::error_body(code, msg);
    let response = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}

/// Why the head's request target is not a URI hyper accepts, if it is not:
/// a client that sends `/ws?sub=chat:>` with `>` unencoded (browsers send
/// `%3E`) would otherwise get hyper's bare 400 with an empty body. `None`
/// when the target parses, or when the request line is not one (hyper
/// answers that itself).
pub fn bad_target(head: &[u8]) -> Option<String> {
    let line = head.split(|&b| b == b'\r' || b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let (_method, target) = (parts.next()?, parts.next()?);
    if target.is_empty() || hyper::Uri::try_from(target).is_ok() {
        return None;
    }
    let shown: String = String::from_utf8_lossy(target).chars().take(64).collect();
    let msg = match target.iter().find(|b| !b.is_ascii_graphic() || b"\"<>\\^`{|}".contains(b)) {
        Some(&b) if b.is_ascii_graphic() => format!(
            "the request target {shown:?} holds {:?}, which a URL must percent-encode (as %{b:02X}); browsers do so",
            b as char
        ),
        _ => format!("the request target {shown:?} is not a valid URI; percent-encode what it holds"),
    };
    Some(format!("bad_request: {msg}"))
}

/// A TCP stream with bytes already read from it put back in front.
pub struct Prefixed {
    /// Bytes read before hyper took over, not yet handed to it.
    pub prefix: Bytes,
    /// The socket.
    pub inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::bad_target;

    #[test]
    fn a_target_hyper_refuses_is_named() {
        let why = bad_target(b"GET /ws?sub=chat:> HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(why.contains("'>'") && why.contains("%3E"), "{why}");
        assert!(bad_target(b"GET /ws?sub=chat:%3E HTTP/1.1\r\n\r\n").is_none());
        assert!(bad_target(b"GET /ws?sub=todo:*&sub=a HTTP/1.1\r\n\r\n").is_none());
        assert!(bad_target(b"GET /a\"b?x=<y> HTTP/1.1\r\n\r\n").is_some());
        assert!(bad_target(b"nonsense\r\n\r\n").is_none());
    }
}
