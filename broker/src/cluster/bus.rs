//! How a message reaches every node that has subscribers for it.
//!
//! Embedded mode (the default) is in-process: a publish goes straight to the
//! local hub. Cluster mode (`--nats URL`) adds a NATS link:
//!
//! - A publish is queued for the link, then delivered to local subscribers
//!   at once (while the link sends it on), on the topic's subject
//!   (`herald.chat.lobby`). Topic traffic has a NATS
//!   connection of its own ([`crate::cluster::natsio`]: every subscription and plain
//!   publish, read in the server's order) with `echo:false`, so NATS never
//!   hands a node its own messages back: local
//!   subscribers get each message once, and the link's loss never stops local
//!   delivery. A publish that cannot reach NATS is counted and reported.
//! - Interest: the node holds one subject subscription per topic or pattern
//!   that has a local subscriber, taken when the first one arrives and
//!   dropped when the last leaves, so a topic's traffic reaches only the
//!   nodes that need it. A message arriving through key K is delivered by
//!   [`Hub::deliver_via`], which gives each socket the message once.
//! - Anything on a subject under the prefix is delivered, whoever published
//!   it: a backend can push with any NATS client. JSON payloads travel byte
//!   for byte; other UTF-8 payloads are delivered as a JSON string.
//! - Presence notices travel as empty messages with `Herald-Event`,
//!   `Herald-Client` and `Herald-Name` headers.
//!
//! Both connections reconnect by themselves; the topic connection re-sends
//! its subscriptions. JetStream (history) and the status page's samples
//! use the async-nats client.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_protocol::topic;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::link::{self, LinkError, LinkSettings};
use crate::cluster::natsio::{Headers, NatsIo};
use crate::cluster::outbound::{send_loop, Confirm, Outbound};
use crate::cluster::subjects::{usable, Barrier, Receiver, Subjects};
use crate::config::values::Retention;
use crate::fanout::hub::{Delivery, Hub, Interest};
use crate::history::jetstream::StreamHistory;
use crate::history::memory::Journal;
use crate::history::store::{History, HistorySettings, Store};
use crate::metrics::Metrics;
use crate::presence::notice::Notice;
use crate::presence::roster::Event;
use crate::tasks::Tasks;
/// Publishes waiting for the link's sender task; past it a publish fails
/// rather than queueing without bound.
const OUTBOUND_CAPACITY: usize = 65_536;
/// Payload bytes waiting for the link's sender task; past it a publish
/// fails (`publish_failed`, backlog full) rather than holding more memory.
const OUTBOUND_BYTES: usize = 64 * 1024 * 1024;

/// Why a publish did not reach every node.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The cluster link is down; the message reached local subscribers only.
    #[error("cluster link down: delivered to {local} subscriber(s) on this node only")]
    LinkDown {
        /// Local deliveries made.
        local: usize,
    },
    /// The link's outbound queue is full.
    #[error("cluster link backlog full: delivered to {local} subscriber(s) on this node only")]
    Backlog {
        /// Local deliveries made.
        local: usize,
    },
    /// A history topic's message with the history stream out of reach:
    /// neither stored nor delivered, so the publisher may send it again.
    #[error("history_unavailable: the history stream cannot be reached; not stored and not delivered, publish again")]
    HistoryUnavailable,
}

impl BusError {
    /// Deliveries made on this node despite the error.
    pub fn local(&self) -> usize {
        match self {
            BusError::LinkDown { local } | BusError::Backlog { local } => *local,
            BusError::HistoryUnavailable => 0,
        }
    }

    fn with_local(self, local: usize) -> Self {
        match self {
            BusError::LinkDown { .. } => BusError::LinkDown { local },
            BusError::Backlog { .. } => BusError::Backlog { local },
            BusError::HistoryUnavailable => BusError::HistoryUnavailable,
        }
    }
}

/// The node's bus. Cloning is a refcount.
#[derive(Clone)]
pub struct Bus {
    hub: Hub,
    metrics: Arc<Metrics>,
    link: Option<Arc<Link>>,
    history: Option<Arc<History>>,
}

/// What a forward carries.
enum Forward {
    /// A message on an ordinary topic.
    Plain,
    /// A presence notice, in headers.
    Notice(Headers),
    /// A message on a history topic, for the stream.
    Stored(Option<Confirm>),
}

struct Link {
    client: async_nats::Client,
    /// Topic traffic: subscriptions and plain publishes.
    io: Arc<NatsIo>,
    prefix: String,
    outbound: mpsc::Sender<Outbound>,
    /// Payload bytes waiting in `outbound`, bounded by [`OUTBOUND_BYTES`].
    queued: Arc<AtomicUsize>,
    /// The subject subscriptions and their liveness.
    subjects: Arc<Subjects>,
}

impl Bus {
    /// The in-process bus of an embedded node; history (if any rules)
    /// in memory.
    pub fn embedded(hub: Hub, metrics: Arc<Metrics>, history: &HistorySettings, tasks: &Tasks) -> Self {
        let history = History::embedded(history, &metrics, tasks).map(Arc::new);
        Bus {
            hub,
            metrics,
            link: None,
            history,
        }
    }

    /// The history topics and their store; `None` without `--history`.
    pub fn history(&self) -> Option<&History> {
        self.history.as_deref()
    }

    /// A bus linked through NATS as `settings` say. Returns at once: the link
    /// connects (and reconnects) in the background, and the node serves its
    /// local subscribers meanwhile.
    pub async fn cluster(
        hub: Hub,
        metrics: Arc<Metrics>,
        settings: &LinkSettings,
        max_message_bytes: usize,
        history: &HistorySettings,
        tasks: &Tasks,
    ) -> Result<Self, LinkError> {
        let (urls, prefix, auth) = (&settings.urls[..], settings.prefix.as_str(), &settings.auth);
        let client = link::connect(urls, auth).await?;
        let io = NatsIo::new(urls, auth, metrics.clone())?;
        let (outbound, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let subjects = Arc::new(Subjects::default());
        let stream = (!history.rules.is_empty()).then(|| {
            let s = Arc::new(StreamHistory::new(
                client.clone(),
                &history.stream,
                prefix,
                history.rules.clone(),
                history.bytes,
                (history.tail_bytes > 0).then(|| Journal::new(history.tail_bytes, metrics.clone())),
                history.replicas,
            ));
            tasks.spawn(s.clone().keep());
            s
        });
        let link = Arc::new(Link {
            client,
            io: io.clone(),
            prefix: prefix.to_owned(),
            outbound,
            queued: Arc::default(),
            subjects: subjects.clone(),
        });
        tasks.spawn(send_loop(
            io.clone(),
            out_rx,
            link.queued.clone(),
            metrics.clone(),
            stream.clone(),
        ));
        if let Some(s) = &stream {
            let (hub, metrics, history) = (hub.clone(), metrics.clone(), s.clone());
            tasks.spawn(s.clone().feed(move |topic, seq, payload| {
                metrics.nats_messages_in.fetch_add(1, Relaxed);
                let Some(epoch) = history.epoch() else { return };
                if let Some(data) = usable(payload, max_message_bytes, &metrics, topic) {
                    hub.deliver(
                        topic,
                        Delivery::Stored {
                            data: &data,
                            seq,
                            epoch: &epoch,
                        },
                    );
                }
            }));
        }
        let receiver = Receiver {
            hub: hub.clone(),
            metrics: metrics.clone(),
            prefix: prefix.to_owned(),
            max_message_bytes,
        };
        tasks.spawn(io.clone().run(Arc::new(receiver.clone())));
        tasks.spawn(subjects.run(io, receiver));
        Ok(Bus {
            hub,
            metrics,
            link: Some(link),
            history: stream.map(|s| {
                Arc::new(History {
                    rules: history.rules.clone(),
                    store: Store::Stream(s),
                })
            }),
        })
    }

    /// Closes the link's NATS client connection (its topic connection
    /// closed when the node's tasks stopped), flushing what it holds.
    pub async fn close(&self) {
        let Some(l) = &self.link else { return };
        // The library closes in its own task; a flush fails once that task
        // has ended (its command channel is gone), so wait for that.
        let closed = async {
            let _ = l.client.drain().await;
            while l.client.flush().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .is_err()
        {
            tracing::warn!("NATS client did not close within 5 s");
        }
    }

    /// The link's topic connection (`None` on an embedded node).
    pub fn natsio(&self) -> Option<Arc<NatsIo>> {
        self.link.as_ref().map(|l| l.io.clone())
    }

    /// The hub this bus delivers into.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The NATS client of the cluster link, for node-to-node chatter that
    /// is not a topic (status samples); `None` when embedded.
    pub fn nats_client(&self) -> Option<async_nats::Client> {
        self.link.as_ref().map(|l| l.client.clone())
    }

    /// The subject prefix topics map under (`herald` by default).
    pub fn prefix(&self) -> Option<&str> {
        self.link.as_ref().map(|l| l.prefix.as_str())
    }

    /// Whether this node is linked to others, and if so whether the link is
    /// up.
    pub fn link_state(&self) -> Option<bool> {
        self.link.as_ref().map(|l| l.io.connected())
    }

    /// Publishes `data` (well-formed JSON) on concrete `topic`: queued for
    /// the other nodes, then to local subscribers at once. Returns the
    /// number of local deliveries.
    pub fn publish(&self, topic: &str, data: Bytes) -> Result<usize, BusError> {
        self.publish_batch(topic, std::slice::from_ref(&data))
    }

    /// Queues a copy of `payload` for the link. An error says no local
    /// delivery yet (`local: 0`); the caller sets the count once it has
    /// fanned out.
    fn forward(&self, topic: &str, kind: Forward, payload: &[u8]) -> Result<(), BusError> {
        let local = 0;
        let Some(link) = &self.link else {
            return Ok(());
        };
        let fail = |e: BusError| {
            self.metrics.nats_publish_failures.fetch_add(1, Relaxed);
            Err(e)
        };
        if !link.io.connected() {
            return fail(BusError::LinkDown { local });
        }
        // Counted by its own bytes: a copy, so a small message never pins
        // the large read buffer it was sliced from while it waits. The one
        // copy the bus makes: from here it travels as this `Bytes`.
        let len = payload.len();
        if link.queued.fetch_add(len, Relaxed) + len > OUTBOUND_BYTES {
            link.queued.fetch_sub(len, Relaxed);
            return fail(BusError::Backlog { local });
        }
        let payload = Bytes::copy_from_slice(payload);
        let out = match kind {
            Forward::Stored(done) => Outbound::Stored {
                topic: topic.to_owned(),
                payload,
                done,
            },
            Forward::Plain | Forward::Notice(_) => Outbound::Message {
                subject: topic::to_subject(&link.prefix, topic),
                headers: match kind {
                    Forward::Notice(h) => Some(h),
                    _ => None,
                },
                payload,
            },
        };
        match link.outbound.try_send(out) {
            Ok(()) => Ok(()),
            Err(e) => {
                link.queued.fetch_sub(len, Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => fail(BusError::Backlog { local }),
                    mpsc::error::TrySendError::Closed(_) => fail(BusError::LinkDown { local }),
                }
            }
        }
    }

    /// Publishes several messages in a row on one topic (each well-formed
    /// JSON): fanned out locally as one buffer per recipient, forwarded to
    /// the other nodes one by one. Returns the number of local deliveries.
    pub fn publish_batch(&self, topic: &str, datas: &[Bytes]) -> Result<usize, BusError> {
        self.publish_inner(topic, datas, None)
    }

    /// [`Bus::publish_batch`], and for each message bound for the history
    /// stream a receiver told its `seq` once stored (or why not).
    pub fn publish_confirmed(
        &self,
        topic: &str,
        datas: &[Bytes],
        confirms: &mut Vec<oneshot::Receiver<Result<u64, String>>>,
    ) -> Result<usize, BusError> {
        self.publish_inner(topic, datas, Some(confirms))
    }

    fn publish_inner(
        &self,
        topic: &str,
        datas: &[Bytes],
        mut confirms: Option<&mut Vec<oneshot::Receiver<Result<u64, String>>>>,
    ) -> Result<usize, BusError> {
        let m = &self.metrics;
        m.messages_in.fetch_add(datas.len() as u64, Relaxed);
        m.bytes_in
            .fetch_add(datas.iter().map(|d| d.len() as u64).sum(), Relaxed);
        if let Some(h) = &self.history {
            if let Some(rule) = Retention::find(&h.rules, topic) {
                match &h.store {
                    Store::Memory(j) => {
                        let epoch = j.epoch();
                        let mut local = 0;
                        for d in datas {
                            // Queued in the journal's delivery turn, so
                            // deliveries leave in `seq` order; the frames
                            // written at once go out after it (see
                            // `history::memory`).
                            let queued = j.append(topic, rule, d.clone(), |seq| {
                                let body = Delivery::Stored {
                                    data: d,
                                    seq,
                                    epoch: &epoch,
                                };
                                self.hub.queue(topic, body)
                            });
                            local += queued.write();
                        }
                        return Ok(local);
                    }
                    // Through the stream, which hands it back to every
                    // node (this one too) with its position.
                    Store::Stream(s) if s.available() => {
                        let mut result = Ok(0);
                        for d in datas {
                            let done = confirms.as_deref_mut().map(|c| {
                                let (tx, rx) = oneshot::channel();
                                c.push(rx);
                                tx
                            });
                            if let Err(e) = self.forward(topic, Forward::Stored(done), d) {
                                result = Err(e);
                            }
                        }
                        return result;
                    }
                    // Out of reach: refused, so that an acknowledged
                    // publish always means a stored one (delivered live
                    // without a position it would be missing from every
                    // recovery, and sent again by a publisher that
                    // retries, repeated).
                    Store::Stream(_) => {
                        m.history_failures.fetch_add(datas.len() as u64, Relaxed);
                        return Err(BusError::HistoryUnavailable);
                    }
                }
            }
        }
        // Handed to the link first: the other nodes fan out while this
        // one does (a broadcast's slowest hop was waiting here for the
        // local fan-out of thousands of sockets before leaving the node).
        let mut failed = None;
        for d in datas {
            if let Err(e) = self.forward(topic, Forward::Plain, d) {
                failed = Some(e);
            }
        }
        let local = self.hub.deliver(topic, Delivery::Batch(datas));
        match failed {
            None => Ok(local),
            Some(e) => Err(e.with_local(local)),
        }
    }

    /// Tells every node that `client` joined or left `topic`; `notify`
    /// false updates their rosters without a notice to sockets (a user's
    /// second socket, with `--presence-by user`).
    pub fn presence(
        &self,
        topic: &str,
        event: Event,
        client: &str,
        user: Option<&str>,
        name: Option<&str>,
        notify: bool,
    ) {
        if notify {
            let body = Delivery::Presence {
                event: event.as_str(),
                client,
                user,
                name,
            };
            self.hub.deliver(topic, body);
        }
        if self.link.is_some() {
            let notice = Notice {
                event,
                client,
                user,
                name,
                quiet: !notify,
            };
            let h: Headers = notice.headers();
            // A lost notice is logged, not fatal: presence is advisory.
            if let Err(e) = self.forward(topic, Forward::Notice(h), &[]) {
                tracing::debug!(error = %e, topic, event = event.as_str(), "presence notice not forwarded");
            }
        }
    }

    /// Tells the link that the hub gained or lost all local interest in a
    /// topic or pattern.
    pub fn interest(&self, key: &str, change: Interest) {
        if let Some(link) = &self.link {
            link.subjects.changed(key, change);
        }
    }

    /// Whether the node is linked to others (its messages arrive once per
    /// matching key, in no order between keys).
    pub fn is_cluster(&self) -> bool {
        self.link.is_some()
    }

    /// A future that resolves once messages published on `key` anywhere in
    /// the cluster reach this node; `None` when they already do (always on
    /// an embedded node).
    pub fn until_live(&self, key: &str) -> Option<Barrier> {
        self.link.as_ref()?.subjects.until_live(key)
    }

    /// Waits (up to `grace`) until every publish accepted so far has been
    /// written to NATS: on shutdown, nothing answered 200 is left behind.
    pub async fn flush(&self, grace: Duration) {
        let Some(link) = &self.link else { return };
        let (tx, rx) = oneshot::channel();
        let done = async {
            if link.outbound.send(Outbound::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(grace, done).await.is_err() {
            tracing::warn!("NATS link not flushed within the grace period");
        }
    }
}
