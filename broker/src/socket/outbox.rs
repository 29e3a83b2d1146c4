//! A socket's outbound queue: ready frames, bounded in bytes, and the
//! socket's write half while no writer task runs.
//!
//! Producers (the hub's fan-out, the socket's own read loop, the heartbeat)
//! push shared `Bytes` and never wait. The writer task (see
//! [`crate::socket::writer`]) takes the whole queue at once. Past its byte bound the
//! queue refuses further frames and asks the writer to abort: a slow
//! consumer never delays anyone else. An idle socket holds no writer task:
//! the write half is parked here, and a push that finds it parked hands it
//! back to be started.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use bytes::Bytes;
use herald_protocol::Disconnect;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::sync::Lock;

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
    close: Option<Disconnect>,
    /// The socket's write half while no writer task runs.
    parked: Option<OwnedWriteHalf>,
    /// A writer task owns the write half.
    running: bool,
    /// Writers' clock (ms, wrapping) of the last frame written at once.
    inline_at: u32,
    /// A replay waits in [`Outbox::wait_room`]: whoever frees bytes (or
    /// closes) wakes it.
    waiting: bool,
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

/// The queue. Lives inside the socket's shared handle.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer: frames or a close request arrived.
    pub(crate) ready: Notify,
    /// Interrupts a write in progress: a close was requested (the writer
    /// then aborts, or arms the close deadline and goes on flushing).
    pub(crate) interrupt: Notify,
    /// Tells the read loop that a close was requested.
    closed: Notify,
    /// Wakes [`Outbox::wait_room`]: bytes left the queue, or a close was
    /// requested. Notified only while one waits (see `State::waiting`).
    room: Notify,
    limit: usize,
    /// Writers' clock (ms) when the writer last made progress, or 0 while
    /// it has nothing in flight. Read by [`Outbox::stalled_since`].
    pub(crate) progress: AtomicU64,
    /// Node clock (ms) when the client was last seen alive (see
    /// [`Outbox::last_seen`]).
    seen: AtomicU64,
}

/// A batch the writer took: frames to send, then maybe a close.
#[derive(Debug, Default)]
pub struct Batch {
    /// Frames in order.
    pub frames: Vec<Bytes>,
    /// Send a close frame after `frames` and stop.
    pub close: Option<Disconnect>,
}

impl Outbox {
    /// An empty queue bounded at `limit` bytes. Allocates nothing until used.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            interrupt: Notify::new(),
            closed: Notify::new(),
            room: Notify::new(),
            limit,
            progress: AtomicU64::new(0),
            seen: AtomicU64::new(0),
        }
    }

    /// The queue, its client seen alive at `now_ms` (its handshake).
    pub fn seen_at(self, now_ms: u64) -> Self {
        self.seen(now_ms);
        self
    }

    /// Records that the client was seen alive at `now_ms`.
    pub fn seen(&self, now_ms: u64) {
        self.seen.store(now_ms, Relaxed);
    }

    /// Node clock (ms) when the client was last seen alive: something
    /// arrived from it, or it took bytes that had waited for it (a write
    /// that found the kernel's buffer full went on, which takes a reader).
    /// The second counts because a client reading a large backlog (a
    /// replay, a burst) meets the heartbeat's ping only behind everything
    /// the kernel already holds for it, however promptly it answers; a
    /// dead or stalled client takes nothing, and is still reaped.
    pub fn last_seen(&self) -> u64 {
        self.seen.load(Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent
        // (every update is a single push or swap), so poisoning is ignored.
        self.state.locked()
    }

    /// Queues one frame. Never waits. When it returns a write half, no
    /// writer is running and the caller must start one with it.
    pub fn push(&self, frame: Bytes) -> (Pushed, Option<OwnedWriteHalf>) {
        let mut s = self.lock();
        if s.close.is_some() {
            return (Pushed::Closing, None);
        }
        if s.bytes + frame.len() > self.limit {
            drop(s);
            let (_, start) = self.close(Disconnect::SlowConsumer);
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
    pub fn close(&self, why: Disconnect) -> (bool, Option<OwnedWriteHalf>) {
        let mut s = self.lock();
        if s.close.is_some() {
            return (false, None);
        }
        let flush = why.flushes();
        if !flush {
            s.frames = Vec::new();
            s.bytes = 0;
        }
        s.close = Some(why);
        let start = s.wake();
        let waiting = std::mem::take(&mut s.waiting);
        drop(s);
        self.interrupt.notify_one();
        self.closed.notify_one();
        self.ready.notify_one();
        if waiting {
            self.room.notify_waiters();
        }
        (true, start)
    }

    /// Gives the outbox its socket's write half once the handshake is done.
    /// Returns it back when work is already waiting (start a writer).
    pub fn install(&self, wr: OwnedWriteHalf) -> Option<OwnedWriteHalf> {
        let mut s = self.lock();
        s.parked = Some(wr);
        s.wake()
    }

    /// A push that found the socket idle (no writer task; it got `wr`)
    /// writes its one frame at once, without waiting: a broadcast to many
    /// idle sockets then costs one system call each, no task. A socket
    /// that had a frame written this way within the last second is busy:
    /// it gets a writer task, which batches frames and stays a while.
    /// Returns `wr` when a writer must start (busy, the socket would block,
    /// more arrived, or a close waits), with the rest of the frame when
    /// only part of it went out: that rest is owed whatever comes next (the
    /// writer sends it first, even before a close that drops the queue).
    /// Otherwise parks `wr` again. `now_ms` is the node's clock ([`crate::clock`]).
    pub fn write_now(&self, wr: OwnedWriteHalf, now_ms: u64) -> Option<(OwnedWriteHalf, Option<Bytes>)> {
        let mut s = self.lock();
        let now = now_ms as u32;
        let busy = s.inline_at != 0 && now.wrapping_sub(s.inline_at) < 1000;
        if busy || s.close.is_some() || s.frames.len() != 1 {
            return Some((wr, None));
        }
        s.inline_at = now.max(1);
        let frame = &s.frames[0];
        let out = match wr.try_write(frame) {
            Ok(n) if n == frame.len() => {
                // An idle socket holds no queue.
                s.frames = Vec::new();
                s.bytes = 0;
                s.parked = Some(wr);
                s.running = false;
                None
            }
            Ok(n) => {
                let rest = frame.slice(n..);
                s.frames = Vec::new();
                s.bytes = 0;
                Some((wr, Some(rest)))
            }
            // Would block (or failed): the writer takes it from here.
            Err(_) => return Some((wr, None)),
        };
        let waiting = std::mem::take(&mut s.waiting);
        drop(s);
        if waiting {
            self.room.notify_waiters();
        }
        out
    }

    /// A writer with nothing to do hands the write half back and ends;
    /// `Err` returns it when work arrived meanwhile (keep writing).
    pub(crate) fn park(&self, wr: OwnedWriteHalf) -> Result<(), OwnedWriteHalf> {
        let mut s = self.lock();
        if !s.frames.is_empty() || s.close.is_some() {
            return Err(wr);
        }
        s.parked = Some(wr);
        s.running = false;
        Ok(())
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
        let close = s.close.clone();
        let waiting = std::mem::take(&mut s.waiting);
        drop(s);
        if waiting {
            self.room.notify_waiters();
        }
        Ok(Batch { frames, close })
    }

    /// When the writer, with bytes in flight, last made progress (writers'
    /// clock, ms); `None` when it has nothing in flight. A watchdog cuts
    /// sockets stalled for longer than the write timeout, so the write
    /// path itself arms no timer.
    pub fn stalled_since(&self) -> Option<u64> {
        match self.progress.load(Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// Waits until `need` more bytes (at most the bound) may be queued;
    /// false, at once, when the socket is closing. A replay paces itself
    /// by it: it sleeps until the writer takes the queue (or a frame is
    /// written at once, or a close is asked for), with nothing polled.
    pub async fn wait_room(&self, need: usize) -> bool {
        let need = need.min(self.limit);
        loop {
            // Listening before the look: a wake between the two is kept.
            let freed = self.room.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.close.is_some() {
                    return false;
                }
                if self.limit.saturating_sub(s.bytes) >= need {
                    return true;
                }
                s.waiting = true;
            }
            freed.await;
        }
    }

    /// The byte bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a close that drops queued frames was requested.
    pub(crate) fn aborting(&self) -> bool {
        self.lock().close.as_ref().is_some_and(|c| !c.flushes())
    }

    /// Whether a close was requested (by anyone).
    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Resolves once a close was requested (by anyone).
    pub async fn closed(&self) {
        self.closed.notified().await
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
        assert_eq!(b.close, Some(Disconnect::SlowConsumer));
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
        assert!(o.close(Disconnect::GoingAway).0);
        assert!(!o.close(Disconnect::ConnectionLost).0);
        let b = o.take(Vec::new()).await;
        assert_eq!(b.frames.len(), 1);
        assert_eq!(b.close, Some(Disconnect::GoingAway));
    }

    #[tokio::test]
    async fn an_idle_socket_takes_a_frame_at_once_and_stays_idle() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        let (_rd, wr) = server.into_split();
        let o = Outbox::new(1 << 20);
        assert!(o.install(wr).is_none(), "nothing queued: parked");
        for (text, now) in [(&b"one"[..], 10_000), (b"two", 12_000)] {
            let (pushed, start) = o.push(Bytes::copy_from_slice(text));
            assert_eq!(pushed, Pushed::Queued);
            let wr = start.expect("idle: the push gets the write half");
            assert!(o.write_now(wr, now).is_none(), "written at once, parked again");
            assert!(o.try_take(Vec::new()).is_err(), "nothing left queued");
        }
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");
        // Another within the second: busy, a writer must run (and batch).
        let (_, start) = o.push(Bytes::from_static(b"x"));
        let wr = start.unwrap();
        let Some((wr, None)) = o.write_now(wr, 12_500) else {
            panic!("a busy socket gets a writer");
        };
        assert_eq!(o.try_take(Vec::new()).unwrap().frames.len(), 1, "still queued");
        // With a close waiting, the writer must run.
        assert!(o.park(wr).is_ok());
        let (_, start) = o.push(Bytes::from_static(b"y"));
        let wr = start.unwrap();
        o.close(Disconnect::GoingAway);
        assert!(matches!(o.write_now(wr, 60_000), Some((_, None))));
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    #[test]
    fn waiting_for_room_wakes_only_when_room_frees_or_the_socket_closes() {
        use std::future::Future;
        use std::task::{Context, Poll};
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || count.0.load(Relaxed);
        let o = Outbox::new(10);
        o.push(Bytes::from_static(b"12345678"));
        let mut wait = std::pin::pin!(o.wait_room(5));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        // A push takes room, it frees none: no wake.
        o.push(Bytes::from_static(b"1"));
        assert_eq!(wakes(), 0);
        let b = o.try_take(Vec::new()).unwrap();
        assert_eq!(b.frames.len(), 2);
        assert_eq!(wakes(), 1, "woken by the take");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(true));
        // Room enough already: at once. More than the bound: the bound.
        assert_eq!(std::pin::pin!(o.wait_room(10)).poll(&mut cx), Poll::Ready(true));
        assert_eq!(
            std::pin::pin!(o.wait_room(1 << 20)).poll(&mut cx),
            Poll::Ready(true)
        );
        o.push(Bytes::from_static(b"123456"));
        let mut wait = std::pin::pin!(o.wait_room(5));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(o.close(Disconnect::GoingAway).0);
        assert_eq!(wakes(), 2, "woken by the close");
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(false));
        assert_eq!(std::pin::pin!(o.wait_room(1)).poll(&mut cx), Poll::Ready(false));
    }
}
