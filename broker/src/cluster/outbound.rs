//! The cluster link's sender task: hands publishes to the NATS client in
//! order, and history publishes to the stream, awaiting their acks
//! alongside so one slow ack never holds up the next publish.

use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::natsio::{Headers, NatsIo};
use crate::history::jetstream::StreamHistory;
use crate::metrics::Metrics;

/// What the sender task is handed.
pub enum Outbound {
    /// A message for NATS.
    Message {
        /// Where it goes.
        subject: String,
        /// Presence notices travel in headers.
        headers: Option<Headers>,
        /// The data.
        payload: Bytes,
    },
    /// A message on a history topic, for the stream.
    Stored {
        /// The topic.
        topic: String,
        /// The data.
        payload: Bytes,
        /// Told the message's `seq` once stored, or why not.
        done: Option<Confirm>,
    },
    /// Answered once everything queued before it is written to NATS.
    Flush(oneshot::Sender<()>),
}

/// Where a history publish's outcome goes: its `seq`, or why it was not
/// stored.
pub type Confirm = oneshot::Sender<Result<u64, String>>;

type Acked = (String, Option<Confirm>, Result<u64, String>);
type Acks = futures_util::stream::FuturesUnordered<Pin<Box<dyn std::future::Future<Output = Acked> + Send>>>;

/// Hands publishes to the NATS client in order. History publishes go to
/// the stream; their acks are awaited alongside, and each outcome is told
/// to its publisher (see [`settle`]).
pub async fn send_loop(
    io: Arc<NatsIo>,
    mut rx: mpsc::Receiver<Outbound>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    stream: Option<Arc<StreamHistory>>,
) {
    let mut acks: Acks = Default::default();
    loop {
        let o = tokio::select! {
            o = rx.recv() => match o { Some(o) => o, None => break },
            Some(acked) = acks.next(), if !acks.is_empty() => {
                settle(&metrics, acked).await;
                continue;
            }
        };
        let (subject, headers, payload) = match o {
            Outbound::Message {
                subject,
                headers,
                payload,
            } => (subject, headers, payload),
            Outbound::Stored { topic, payload, done } => {
                queued.fetch_sub(payload.len(), Relaxed);
                let Some(s) = &stream else { continue };
                match s.publish(&topic, payload).await {
                    Ok(ack) => {
                        metrics.nats_messages_out.fetch_add(1, Relaxed);
                        acks.push(Box::pin(async move {
                            let r = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
                            (topic, done, r)
                        }));
                    }
                    Err(e) => settle(&metrics, (topic, done, Err(e))).await,
                }
                continue;
            }
            Outbound::Flush(done) => {
                // Written, and applied by the server: a round trip after
                // the last publish (a bare flush only empties the buffer);
                // and every history publish stored (or delivered live).
                io.barrier().await;
                while let Some(acked) = acks.next().await {
                    settle(&metrics, acked).await;
                }
                let _ = done.send(());
                continue;
            }
        };
        queued.fetch_sub(payload.len(), Relaxed);
        let r = io.publish(&subject, headers.as_ref(), payload).await;
        match r {
            Ok(()) => {
                metrics.nats_messages_out.fetch_add(1, Relaxed);
            }
            Err(e) => {
                metrics.nats_publish_failures.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "publish onto NATS failed");
            }
        }
    }
}

/// A history publish's outcome, told to whoever waits for it. One the
/// stream did not store goes nowhere: its publisher is told (a WebSocket
/// ack or HTTP 200 means stored), and nobody receives what no recovery
/// could give again. Which can still be stored after a timeout: then the
/// feed delivers it, once, with its position.
async fn settle(metrics: &Metrics, (topic, done, result): Acked) {
    let error = match result {
        Ok(seq) => {
            if let Some(done) = done {
                let _ = done.send(Ok(seq));
            }
            return;
        }
        Err(e) => e,
    };
    metrics.history_failures.fetch_add(1, Relaxed);
    if QUIET.allow("history publish not stored").is_some() {
        tracing::warn!(%error, topic, "history publish not stored; its publisher is told");
    }
    if let Some(done) = done {
        let _ = done.send(Err(error));
    }
}

/// Failed history publishes come in bursts (a stalled stream): one line
/// per window.
static QUIET: std::sync::LazyLock<crate::rate::Quiet> = std::sync::LazyLock::new(Default::default);
