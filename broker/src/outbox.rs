//! One socket's outbound queue: ready-to-send frames, bounded in bytes.
//!
//! Producers (the hub's fan-out, the socket's own read loop, the heartbeat)
//! push shared `Bytes` and never wait. The socket's writer task takes the
//! whole queue at once and writes it with vectored writes, many frames per
//! system call. Past its byte bound the queue refuses further frames and asks
//! the writer to abort: a slow consumer never delays anyone else.

use std::borrow::Cow;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// How a socket is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// Close code sent to the client.
    pub code: u16,
    /// Close reason sent to the client.
    pub reason: Cow<'static, str>,
    /// Send what is already queued first (shutdown, client-initiated close),
    /// or drop it (slow consumer, dead peer).
    pub flush: bool,
}

/// What [`Outbox::push`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the writer.
    Queued,
    /// The socket is closing; the frame was dropped with it.
    Closing,
    /// The frame would pass the byte bound: the socket is now closing as a
    /// slow consumer (reported once, to the push that overflowed).
    Overflowed,
}

#[derive(Debug, Default)]
struct State {
    frames: Vec<Bytes>,
    bytes: usize,
    close: Option<CloseRequest>,
    /// The socket's write half while no writer task runs (an idle socket
    /// holds no writer task at all).
    parked: Option<OwnedWriteHalf>,
    /// A writer task owns the write half.
    running: bool,
}

impl State {
    /// Hands out the parked write half when there is work and no writer:
    /// the caller must start a writer task with it.
    fn wake(&mut self) -> Option<OwnedWriteHalf> {
        if self.running || (self.frames.is_empty() && self.close.is_none()) {
            return None;
        }
        let wr = self.parked.take()?;
        self.running = true;
        Some(wr)
    }
}

/// The queue. Lives in the socket's shared [`crate::connection::Conn`].
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: frames or a close request arrived.
    ready: Notify,
    /// Interrupts a write in progress: the socket is to close without flushing.
    abort: Notify,
    /// Tells the read loop that a close was requested.
    closed: Notify,
    limit: usize,
}

/// A batch the writer took: frames to send, then maybe a close.
#[derive(Debug, Default)]
pub struct Batch {
    /// Frames in order.
    pub frames: Vec<Bytes>,
    /// Send a close frame after `frames` and stop.
    pub close: Option<CloseRequest>,
}

impl Outbox {
    /// An empty queue bounded at `limit` bytes. Allocates nothing until used.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            abort: Notify::new(),
            closed: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent
        // (every update is a single push or swap), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one frame. Never waits. When it returns a write half, no
    /// writer is running and the caller must start one with it.
    pub fn push(&self, frame: Bytes) -> (Pushed, Option<OwnedWriteHalf>) {
        let mut s = self.lock();
        if s.close.is_some() {
            return (Pushed::Closing, None);
        }
        if s.bytes + frame.len() > self.limit {
            s.frames = Vec::new();
            s.bytes = 0;
            s.close = Some(CloseRequest {
                code: herald_protocol::ws::close::SLOW_CONSUMER,
                reason: Cow::Borrowed("slow_consumer: outbound queue limit exceeded"),
                flush: false,
            });
            let start = s.wake();
            drop(s);
            self.abort.notify_one();
            self.closed.notify_one();
            self.ready.notify_one();
            return (Pushed::Overflowed, start);
        }
        s.bytes += frame.len();
        s.frames.push(frame);
        let first = s.frames.len() == 1;
        let start = s.wake();
        drop(s);
        if first {
            self.ready.notify_one();
        }
        (Pushed::Queued, start)
    }

    /// Asks the writer to close the socket. The first request wins; later
    /// ones are ignored. Returns whether this request was the one taken,
    /// and (like [`Outbox::push`]) a write half when a writer must start.
    pub fn close(&self, req: CloseRequest) -> (bool, Option<OwnedWriteHalf>) {
        let mut s = self.lock();
        if s.close.is_some() {
            return (false, None);
        }
        let flush = req.flush;
        if !flush {
            s.frames = Vec::new();
            s.bytes = 0;
        }
        s.close = Some(req);
        let start = s.wake();
        drop(s);
        if !flush {
            self.abort.notify_one();
        }
        self.closed.notify_one();
        self.ready.notify_one();
        (true, start)
    }

    /// Gives the outbox its socket's write half once the handshake is done.
    /// Returns it back when work is already waiting (start a writer).
    pub fn install(&self, wr: OwnedWriteHalf) -> Option<OwnedWriteHalf> {
        let mut s = self.lock();
        s.parked = Some(wr);
        s.wake()
    }

    /// A writer with nothing to do hands the write half back and ends;
    /// `Err` returns it when work arrived meanwhile (keep writing).
    pub fn park(&self, wr: OwnedWriteHalf) -> Result<(), OwnedWriteHalf> {
        let mut s = self.lock();
        if !s.frames.is_empty() || s.close.is_some() {
            return Err(wr);
        }
        s.parked = Some(wr);
        s.running = false;
        Ok(())
    }

    /// Waits until frames or a close may be waiting (a wakeup may be stale:
    /// check with [`Outbox::try_take`]).
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes everything queued (swapping in `spare`, an empty vector whose
    /// capacity is reused), or waits until there is something.
    pub async fn take(&self, spare: Vec<Bytes>) -> Batch {
        let mut spare = spare;
        loop {
            let notified = self.ready.notified();
            match self.try_take(spare) {
                Ok(batch) => return batch,
                Err(back) => spare = back,
            }
            notified.await;
        }
    }

    /// Takes everything queued, swapping in `spare`; gives `spare` back when
    /// there is nothing to take.
    pub fn try_take(&self, spare: Vec<Bytes>) -> Result<Batch, Vec<Bytes>> {
        let mut s = self.lock();
        if s.frames.is_empty() && s.close.is_none() {
            return Err(spare);
        }
        let frames = std::mem::replace(&mut s.frames, spare);
        s.bytes = 0;
        Ok(Batch {
            frames,
            close: s.close.clone(),
        })
    }

    /// Resolves once a close was requested (by anyone).
    pub async fn closed(&self) {
        self.closed.notified().await
    }

    /// Resolves when a close without flushing was requested.
    pub async fn aborted(&self) {
        self.abort.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflows_once_then_refuses() {
        let o = Outbox::new(10);
        assert_eq!(o.push(Bytes::from_static(b"12345")).0, Pushed::Queued);
        assert_eq!(o.push(Bytes::from_static(b"12345")).0, Pushed::Queued);
        assert_eq!(o.push(Bytes::from_static(b"1")).0, Pushed::Overflowed);
        assert_eq!(o.push(Bytes::from_static(b"1")).0, Pushed::Closing);
        let b = o.take(Vec::new()).await;
        assert!(b.frames.is_empty());
        assert_eq!(b.close.unwrap().code, 4001);
    }

    #[tokio::test]
    async fn take_returns_frames_in_order_and_frees_the_bound() {
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"a"));
        o.push(Bytes::from_static(b"b"));
        let b = o.take(Vec::new()).await;
        assert_eq!(b.frames, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert!(b.close.is_none());
        assert_eq!(o.push(Bytes::from_static(b"0123456789")).0, Pushed::Queued);
    }

    #[tokio::test]
    async fn flushing_close_keeps_queued_frames() {
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"a"));
        assert!(
            o.close(CloseRequest {
                code: 1001,
                reason: "bye".into(),
                flush: true
            })
            .0
        );
        assert!(
            !o.close(CloseRequest {
                code: 1000,
                reason: "".into(),
                flush: false
            })
            .0
        );
        let b = o.take(Vec::new()).await;
        assert_eq!(b.frames.len(), 1);
        assert_eq!(b.close.unwrap().code, 1001);
    }
}
