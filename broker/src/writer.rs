//! A socket's writing side, its whole life: the bounded queue of ready
//! frames ([`Outbox`]), the writer task that drains it ([`run`]), and the
//! close that ends it.
//!
//! Producers (the hub's fan-out, the socket's own read loop, the heartbeat)
//! push shared `Bytes` and never wait. The writer task takes the whole queue
//! at once and writes it with vectored writes, many frames per system call.
//! Past its byte bound the queue refuses further frames and asks the writer
//! to abort: a slow consumer never delays anyone else.
//!
//! An idle socket holds no writer task: the write half is parked in the
//! outbox and a push that finds it parked hands it back to be started.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::Disconnect;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// What every writer on a node shares: where writer tasks run, their
/// deadlines, and where timeouts are counted.
#[derive(Debug)]
pub struct Writers {
    /// Writer tasks run here, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// A write that makes no progress for this long cuts the socket.
    pub write_timeout: Duration,
    /// A closing socket must have sent what it owes within this.
    pub close_timeout: Duration,
    /// Counts the cuts.
    pub metrics: Arc<Metrics>,
}

impl Default for Writers {
    fn default() -> Self {
        Writers {
            tracker: TaskTracker::new(),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            metrics: Arc::default(),
        }
    }
}

/// How long a writer with nothing to write waits before it hands the write
/// half back and ends (an idle socket then holds no writer task).
const WRITER_IDLE: Duration = Duration::from_secs(2);

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
    ready: Notify,
    /// Interrupts a write in progress: a close was requested (the writer
    /// then aborts, or arms the close deadline and goes on flushing).
    interrupt: Notify,
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
        drop(s);
        self.interrupt.notify_one();
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
    fn park(&self, wr: OwnedWriteHalf) -> Result<(), OwnedWriteHalf> {
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
        Ok(Batch {
            frames,
            close: s.close.clone(),
        })
    }

    /// Whether a close that drops queued frames was requested.
    fn aborting(&self) -> bool {
        self.lock().close.as_ref().is_some_and(|c| !c.flushes())
    }

    /// Resolves once a close was requested (by anyone).
    pub async fn closed(&self) {
        self.closed.notified().await
    }
}

/// Where a batch write stopped: frame index and offset inside it.
#[derive(Default)]
struct Cursor {
    frame: usize,
    offset: usize,
}

/// Writes `frames` from `at` on; each system call that makes no progress
/// within `stall` fails with `TimedOut`.
async fn write_frames(
    wr: &mut OwnedWriteHalf,
    frames: &[Bytes],
    at: &mut Cursor,
    stall: Duration,
) -> io::Result<()> {
    const MAX_IOV: usize = 64;
    while at.frame < frames.len() {
        // The slices are built inside the poll so they never live in the
        // task's state: an idle writer stays small.
        let write = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (k, f) in frames[at.frame..].iter().take(MAX_IOV).enumerate() {
                let start = if k == 0 { at.offset } else { 0 };
                slices[n] = IoSlice::new(&f[start..]);
                n += 1;
            }
            std::pin::Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..n])
        });
        let mut written = match tokio::time::timeout(stall, write).await {
            Ok(r) => r?,
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let left = frames[at.frame].len() - at.offset;
            if written >= left {
                written -= left;
                at.frame += 1;
                at.offset = 0;
            } else {
                at.offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}

/// How a batch write ended.
enum Wrote {
    /// Every frame is on the wire.
    All,
    /// A close without flushing was requested mid-batch.
    Aborted,
    /// The close deadline passed, or a write made no progress in time.
    TimedOut,
    /// The connection failed.
    Failed,
}

/// Writes a batch, watching for a close request: one that drops queued
/// frames interrupts the write; one that flushes arms `deadline`, by which
/// everything the socket owes must be sent.
async fn write_batch(
    outbox: &Outbox,
    writers: &Writers,
    wr: &mut OwnedWriteHalf,
    frames: &[Bytes],
    at: &mut Cursor,
    deadline: &mut Option<Instant>,
) -> Wrote {
    let write = write_frames(wr, frames, at, writers.write_timeout);
    tokio::pin!(write);
    loop {
        let until = deadline.unwrap_or_else(|| Instant::now() + writers.write_timeout * 2);
        tokio::select! {
            r = &mut write => return match r {
                Ok(()) => Wrote::All,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => Wrote::TimedOut,
                Err(_) => Wrote::Failed,
            },
            _ = outbox.interrupt.notified() => {
                if outbox.aborting() {
                    return Wrote::Aborted;
                }
                deadline.get_or_insert_with(|| Instant::now() + writers.close_timeout);
            }
            _ = tokio::time::sleep_until(until), if deadline.is_some() => return Wrote::TimedOut,
        }
    }
}

/// The writer task of the socket whose handle `owner` is: drains the
/// outbox until a close is requested (then sends the close frame and shuts
/// the write half, all within the close timeout), or until it has been
/// idle for [`WRITER_IDLE`] (then parks the write half in the outbox and
/// ends).
pub async fn run<T: AsRef<Outbox>>(owner: Arc<T>, mut wr: OwnedWriteHalf, writers: Arc<Writers>) {
    let outbox: &Outbox = (*owner).as_ref();
    let mut spare = Vec::new();
    // Set once a close is requested: what the socket owes is due by then.
    let mut deadline: Option<Instant> = None;
    loop {
        let ready = outbox.ready.notified();
        let mut batch = match outbox.try_take(spare) {
            Ok(batch) => batch,
            Err(back) => {
                spare = back;
                if tokio::time::timeout(WRITER_IDLE, ready).await.is_err() {
                    match outbox.park(wr) {
                        Ok(()) => return,
                        Err(back) => wr = back,
                    }
                }
                continue;
            }
        };
        if batch.close.is_some() {
            deadline.get_or_insert_with(|| Instant::now() + writers.close_timeout);
        }
        let mut at = Cursor::default();
        if !batch.frames.is_empty() {
            match write_batch(outbox, &writers, &mut wr, &batch.frames, &mut at, &mut deadline).await {
                Wrote::All => {}
                Wrote::Aborted => {
                    // Finish the frame on the wire so the close frame that
                    // follows is readable, then close.
                    let why = outbox.take(Vec::new()).await.close;
                    let partial = (at.offset > 0).then(|| batch.frames[at.frame].slice(at.offset..));
                    let due = *deadline.get_or_insert_with(|| Instant::now() + writers.close_timeout);
                    return Box::pin(finish(wr, partial, why, due, &writers)).await;
                }
                Wrote::TimedOut => return cut(outbox, wr, &writers),
                Wrote::Failed => {
                    outbox.close(Disconnect::ConnectionLost);
                    return;
                }
            }
        }
        if let Some(why) = batch.close.take() {
            let due = deadline.unwrap_or_else(|| Instant::now() + writers.close_timeout);
            return Box::pin(finish(wr, None, Some(why), due, &writers)).await;
        }
        batch.frames.clear();
        spare = batch.frames;
        if spare.capacity() > 256 {
            spare = Vec::new();
        }
    }
}

/// Gives up on a socket that did not take its bytes in time: resets the
/// connection, so neither the node nor the kernel keeps what it owed.
fn cut(outbox: &Outbox, wr: OwnedWriteHalf, writers: &Writers) {
    writers.metrics.write_timeouts.fetch_add(1, Relaxed);
    outbox.close(Disconnect::ConnectionLost);
    reset_on_drop(&wr);
    drop(wr);
}

/// Makes dropping `wr` (with the read half) reset the connection rather
/// than leave the kernel trying to deliver what the peer never read.
fn reset_on_drop(wr: &OwnedWriteHalf) {
    let stream: &tokio::net::TcpStream = wr.as_ref();
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Sends the rest of a cut frame and the close frame, then shuts the write
/// half, all by `due`; past it the connection is reset.
async fn finish(
    mut wr: OwnedWriteHalf,
    partial: Option<Bytes>,
    why: Option<Disconnect>,
    due: Instant,
    writers: &Writers,
) {
    let send = async {
        if let Some(p) = partial {
            wr.write_all(&p).await?;
        }
        if let Some(frame) = why.and_then(|w| w.frame()) {
            wr.write_all(&frame).await?;
        }
        wr.shutdown().await
    };
    if tokio::time::timeout_at(due, send).await.is_err() {
        writers.metrics.write_timeouts.fetch_add(1, Relaxed);
        reset_on_drop(&wr);
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
}
