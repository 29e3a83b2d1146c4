//! A socket's writer task, its whole life: it drains the socket's
//! [`Outbox`] with vectored writes, many frames per system call, parks the
//! write half when idle, and ends the connection: the close frame within
//! the close timeout, or a reset when the client took nothing in time.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use herald_protocol::Disconnect;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::socket::outbox::Outbox;

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

impl Writers {}

/// How long a writer with nothing to write waits before it hands the write
/// half back and ends (an idle socket then holds no writer task).
const WRITER_IDLE: Duration = Duration::from_secs(2);

/// Where a batch write stopped: frame index and offset inside it.
#[derive(Default)]
struct Cursor {
    frame: usize,
    offset: usize,
}

/// Writes `frames` from `at` on, stamping `progress` (the node's clock, ms;
/// never 0 while in flight) after each system call that moved bytes, and
/// the client as seen (see [`Outbox::last_seen`]) when one moved bytes
/// after the socket had been full.
async fn write_frames(
    wr: &mut OwnedWriteHalf,
    frames: &[Bytes],
    at: &mut Cursor,
    outbox: &Outbox,
) -> io::Result<()> {
    const MAX_IOV: usize = 64;
    let progress = &outbox.progress;
    progress.store(crate::clock::now_ms().max(1), Relaxed);
    while at.frame < frames.len() {
        let mut waited = false;
        // The slices are built inside the poll so they never live in the
        // task's state: an idle writer stays small.
        let mut written = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (k, f) in frames[at.frame..].iter().take(MAX_IOV).enumerate() {
                let start = if k == 0 { at.offset } else { 0 };
                slices[n] = IoSlice::new(&f[start..]);
                n += 1;
            }
            let polled = std::pin::Pin::new(&mut *wr).poll_write_vectored(cx, &slices[..n]);
            waited |= polled.is_pending();
            polled
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let now = crate::clock::now_ms();
        progress.store(now.max(1), Relaxed);
        if waited {
            outbox.seen(now);
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
    /// The close deadline passed.
    TimedOut,
    /// The connection failed.
    Failed,
}

/// Writes a batch, watching for a close request: one that drops queued
/// frames interrupts the write; one that flushes arms `deadline`, by which
/// everything the socket owes must be sent. The common path holds no timer;
/// the closing path's is boxed, so an idle writer task stays small.
async fn write_batch(
    outbox: &Outbox,
    writers: &Writers,
    wr: &mut OwnedWriteHalf,
    frames: &[Bytes],
    at: &mut Cursor,
    deadline: &mut Option<Instant>,
) -> Wrote {
    let write = write_frames(wr, frames, at, outbox);
    tokio::pin!(write);
    let result = loop {
        if let Some(due) = *deadline {
            break match Box::pin(tokio::time::timeout_at(due, &mut write)).await {
                Ok(r) => r,
                Err(_) => {
                    outbox.progress.store(0, Relaxed);
                    return Wrote::TimedOut;
                }
            };
        }
        tokio::select! {
            r = &mut write => break r,
            _ = outbox.interrupt.notified() => {
                if outbox.aborting() {
                    outbox.progress.store(0, Relaxed);
                    return Wrote::Aborted;
                }
                *deadline = Some(Instant::now() + writers.close_timeout);
            }
        }
    };
    outbox.progress.store(0, Relaxed);
    match result {
        Ok(()) => Wrote::All,
        Err(_) => Wrote::Failed,
    }
}

/// The writer task of the socket whose handle `owner` is: sends `rest`
/// (the end of a frame already partly on the wire, see
/// [`Outbox::write_now`]) first, then drains the outbox until a close is
/// requested (then sends the close frame and shuts the write half, all
/// within the close timeout), or until it has been idle for
/// [`WRITER_IDLE`] (then parks the write half in the outbox and ends).
pub async fn run<T: AsRef<Outbox>>(
    owner: Arc<T>,
    mut wr: OwnedWriteHalf,
    rest: Option<Bytes>,
    writers: Arc<Writers>,
) {
    let outbox: &Outbox = (*owner).as_ref();
    let mut spare = Vec::new();
    // Set once a close is requested: what the socket owes is due by then.
    let mut deadline: Option<Instant> = None;
    if let Some(rest) = rest {
        let frames = [rest];
        let mut at = Cursor::default();
        match write_batch(outbox, &writers, &mut wr, &frames, &mut at, &mut deadline).await {
            Wrote::All => {}
            // Owed even when nothing more of it went out: the frame began.
            Wrote::Aborted => {
                return aborted(outbox, wr, Some(frames[0].slice(at.offset..)), deadline, &writers).await
            }
            Wrote::TimedOut => return cut(outbox, wr, &writers),
            Wrote::Failed => {
                outbox.close(Disconnect::ConnectionLost);
                return;
            }
        }
    }
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
                    let partial = (at.offset > 0).then(|| batch.frames[at.frame].slice(at.offset..));
                    return aborted(outbox, wr, partial, deadline, &writers).await;
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

/// A close that drops the queue interrupted a write: finishes the frame
/// on the wire (`partial`) so the close frame that follows is readable,
/// then closes.
async fn aborted(
    outbox: &Outbox,
    wr: OwnedWriteHalf,
    partial: Option<Bytes>,
    mut deadline: Option<Instant>,
    writers: &Writers,
) {
    let why = outbox.take(Vec::new()).await.close;
    match why {
        // Stalled: nothing more will get through.
        Some(Disconnect::WriteTimeout) => return cut(outbox, wr, writers),
        // Gone: nothing to send.
        Some(Disconnect::ConnectionLost) | None => return reset_on_drop(&wr),
        _ => {}
    }
    let due = *deadline.get_or_insert_with(|| Instant::now() + writers.close_timeout);
    Box::pin(finish(wr, partial, why, due, writers)).await
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

/// Reads and discards until the peer closes or `--close-timeout` passes,
/// so our close frame is not lost to a reset while the peer still sends.
pub async fn discard(rd: &OwnedReadHalf, mut scratch: BytesMut, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        scratch.clear();
        scratch.reserve(4096);
        match tokio::time::timeout_at(deadline, rd.readable()).await {
            Err(_) | Ok(Err(_)) => return,
            Ok(Ok(())) => match rd.try_read_buf(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            },
        }
    }
}
