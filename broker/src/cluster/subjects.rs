//! The cluster link's subjects: one NATS subscription per topic or pattern
//! with local subscribers, taken when the first arrives and dropped when
//! the last leaves, and the turning of what arrives into deliveries.
//!
//! Changes are recorded in a set of dirty keys (so churn on one key costs
//! one entry, however fast it comes) and reconciled by one task against
//! the hub's current state. Each key with local interest also has a
//! liveness flag: it turns true once the NATS server has applied the SUB
//! (a round trip after it, see [`barrier`]), and a `sub` is acked only
//! then, so a message published anywhere in the cluster after the ack
//! reaches it. (Across a NATS cluster's routes, interest spreads on its own
//! schedule; the promise is exact for nodes on one NATS server.)

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use herald_protocol::{message, nats, topic};
use tokio::sync::{watch, Notify};

use crate::cluster::natsio::{Dispatch, NatsIo};
use crate::fanout::hub::{Delivery, Hub, Interest};
use crate::metrics::Metrics;
use crate::presence::notice::Notice;
use crate::presence::roster::{Event, On};
use crate::sync::Lock;

/// Resolves once a key's subject subscription is live.
pub type Barrier = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The link's subject subscriptions. Shared by the bus and the task that
/// reconciles them.
#[derive(Default)]
pub struct Subjects {
    /// Keys whose subscription may need taking or dropping.
    dirty: Mutex<HashSet<Box<str>>>,
    /// Wakes the reconcile task.
    wake: Notify,
    /// Per key with local interest: whether its subscription is confirmed.
    live: Mutex<HashMap<Box<str>, watch::Sender<bool>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.locked()
}

impl Subjects {
    /// Records that the hub gained or lost all local interest in `key`.
    pub fn changed(&self, key: &str, change: Interest) {
        match change {
            Interest::Unchanged => return,
            Interest::Gained => {
                lock(&self.live).insert(key.into(), watch::channel(false).0);
            }
            Interest::Lost => {
                lock(&self.live).remove(key);
            }
        }
        lock(&self.dirty).insert(key.into());
        self.wake.notify_one();
    }

    /// A future that resolves once `key`'s subscription is live, or `None`
    /// when it already is (or the key has no local interest).
    pub fn until_live(&self, key: &str) -> Option<Barrier> {
        let live = lock(&self.live);
        let tx = live.get(key)?;
        if *tx.borrow() {
            return None;
        }
        let mut rx = tx.subscribe();
        Some(Box::pin(async move {
            // An error means the key lost its interest meanwhile: done.
            let _ = rx.wait_for(|v| *v).await;
        }))
    }

    fn confirm(&self, key: &str) {
        if let Some(tx) = lock(&self.live).get(key) {
            tx.send_replace(true);
        }
    }

    /// The reconcile task: takes and drops subject subscriptions so that
    /// the node holds exactly one per key with local interest, and
    /// confirms new ones once the server has applied them.
    pub async fn run(self: Arc<Self>, io: Arc<NatsIo>, receiver: Receiver) {
        let mut held: HashMap<Box<str>, u64> = HashMap::new();
        loop {
            let keys: Vec<Box<str>> = lock(&self.dirty).drain().collect();
            if keys.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let mut taken = Vec::new();
            for key in keys {
                let wildcard = key.contains(['*', '>']);
                let want = receiver.hub.has_key(&key, wildcard);
                match (want, held.contains_key(&key)) {
                    (true, false) => {
                        let subject = topic::to_subject(&receiver.prefix, &key);
                        let sid = io.subscribe(&subject, &key, wildcard);
                        receiver.metrics.nats_subscriptions.fetch_add(1, Relaxed);
                        held.insert(key.clone(), sid);
                        taken.push(key);
                    }
                    (false, true) => {
                        if let Some(sid) = held.remove(&key) {
                            io.unsubscribe(sid);
                            receiver.metrics.nats_subscriptions.fetch_sub(1, Relaxed);
                        }
                    }
                    (true, true) => self.confirm(&key),
                    (false, false) => {}
                }
            }
            if !taken.is_empty() {
                // Down (or no answer in time): taken as live, so acks never
                // hang; the SUBs are sent again on reconnect.
                if io.connected() && !io.barrier().await {
                    tracing::warn!("NATS did not confirm subscriptions; they resend on reconnect");
                }
                for key in &taken {
                    self.confirm(key);
                }
            }
        }
    }
}

/// Turns messages from NATS into deliveries.
#[derive(Clone)]
pub struct Receiver {
    /// Where deliveries go.
    pub hub: Hub,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The subject prefix (`herald`).
    pub prefix: String,
    /// Larger payloads are dropped (and counted).
    pub max_message_bytes: usize,
}

impl Dispatch for Receiver {
    fn message(&self, key: &str, wildcard: bool, subject: &str, headers: Option<&[u8]>, payload: &[u8]) {
        let m = &self.metrics;
        m.nats_messages_in.fetch_add(1, Relaxed);
        // The topic is spelled out on the stack: no allocation per message.
        let mut spelled = [0; topic::MAX_TOPIC_LEN];
        let Some(topic) = topic::from_subject_in(&self.prefix, subject, &mut spelled) else {
            m.nats_dropped.fetch_add(1, Relaxed);
            tracing::debug!(subject, "dropped: subject is not a topic");
            return;
        };
        let header = |name: &str| headers.and_then(|h| nats::header(h, name));
        if let Some(notice) = Notice::parse(header) {
            let Ok(notice) = notice else {
                m.nats_dropped.fetch_add(1, Relaxed);
                tracing::debug!(subject, "dropped: a presence notice of no known event");
                return;
            };
            let roster = self.hub.roster();
            let on = On::Node(notice.node());
            match notice.event {
                Event::Join => roster.join(on, topic, notice.member()),
                Event::Leave => roster.leave(on, topic, notice.client),
            }
            if !notice.quiet {
                let body = Delivery::Presence {
                    event: notice.event.as_str(),
                    client: notice.client,
                    user: notice.user,
                    name: notice.name,
                };
                self.hub.deliver_via(key, wildcard, topic, body);
            }
            return;
        }
        if let Some(data) = usable(payload, self.max_message_bytes, m, subject) {
            self.hub.deliver_via(key, wildcard, topic, Delivery::Data(&data));
        }
    }
}

/// A payload from NATS as data to deliver: JSON byte for byte, other
/// UTF-8 text as a JSON string (a plain NATS publisher sent text); `None`
/// (counted as dropped) when over `max` bytes or not UTF-8.
pub fn usable<'a>(
    payload: &'a [u8],
    max: usize,
    m: &Metrics,
    subject: &str,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    if payload.len() > max {
        m.nats_dropped.fetch_add(1, Relaxed);
        tracing::debug!(subject, "dropped: over --max-message-bytes");
        return None;
    }
    if message::validate_json(payload).is_ok() {
        return Some(payload.into());
    }
    if let Ok(t) = std::str::from_utf8(payload) {
        return Some(message::json_string(t).into());
    }
    m.nats_dropped.fetch_add(1, Relaxed);
    tracing::debug!(subject, "dropped: payload is not UTF-8");
    None
}
