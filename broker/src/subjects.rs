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
use std::time::Duration;

use futures_util::StreamExt;
use herald_protocol::{message, topic};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::hub::{Body, Hub, Interest};
use crate::metrics::Metrics;
use crate::roster::Member;

/// Presence notices travel as empty messages with these headers.
pub const HEADER_EVENT: &str = "Herald-Event";
/// The client that joined or left.
pub const HEADER_CLIENT: &str = "Herald-Client";
/// Its display name.
pub const HEADER_NAME: &str = "Herald-Name";
/// The joining socket's user id (its token's `sub`).
pub const HEADER_USER: &str = "Herald-User";
/// Present on a notice that updates rosters only (no notice to sockets).
pub const HEADER_QUIET: &str = "Herald-Quiet";

/// Longest wait for NATS to confirm new subscriptions; past it they are
/// taken as live (the client re-sends them on reconnect) so acks never hang.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves once a key's subject subscription is live.
pub type Live = Pin<Box<dyn Future<Output = ()> + Send>>;

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
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    pub fn until_live(&self, key: &str) -> Option<Live> {
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
    /// the node holds exactly one per key with local interest, confirms
    /// new ones with a flush, and retries failures.
    pub async fn run(self: Arc<Self>, client: async_nats::Client, receiver: Receiver) {
        let mut held: HashMap<Box<str>, JoinHandle<()>> = HashMap::new();
        let mut backoff = Duration::from_millis(50);
        loop {
            let keys: Vec<Box<str>> = lock(&self.dirty).drain().collect();
            if keys.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let mut taken = Vec::new();
            let mut failed = false;
            for key in keys {
                let wildcard = key.contains(['*', '>']);
                let want = receiver.hub.has_key(&key, wildcard);
                match (want, held.contains_key(&key)) {
                    (true, false) => {
                        let subject = topic::to_subject(&receiver.prefix, &key);
                        match client.subscribe(subject).await {
                            Ok(sub) => {
                                receiver.metrics.nats_subscriptions.fetch_add(1, Relaxed);
                                let task =
                                    tokio::spawn(read_subject(sub, key.clone(), wildcard, receiver.clone()));
                                held.insert(key.clone(), task);
                                taken.push(key);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, %key, "NATS subscribe failed; retrying");
                                lock(&self.dirty).insert(key);
                                failed = true;
                            }
                        }
                    }
                    (false, true) => {
                        if let Some(task) = held.remove(&key) {
                            // Dropping the subscriber unsubscribes on NATS.
                            task.abort();
                            receiver.metrics.nats_subscriptions.fetch_sub(1, Relaxed);
                        }
                    }
                    (true, true) => self.confirm(&key),
                    (false, false) => {}
                }
            }
            if !taken.is_empty() {
                barrier(&client, &receiver.prefix).await;
                for key in &taken {
                    self.confirm(key);
                }
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            } else {
                backoff = Duration::from_millis(50);
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

impl Receiver {
    fn on_message(&self, key: &str, wildcard: bool, msg: async_nats::Message) {
        let m = &self.metrics;
        m.nats_messages_in.fetch_add(1, Relaxed);
        let Some(topic) = topic::from_subject(&self.prefix, msg.subject.as_str()) else {
            m.nats_dropped.fetch_add(1, Relaxed);
            tracing::debug!(subject = %msg.subject, "dropped: subject is not a topic");
            return;
        };
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        if let (Some(event), Some(client)) = (header(HEADER_EVENT), header(HEADER_CLIENT)) {
            let (name, user) = (header(HEADER_NAME), header(HEADER_USER));
            // Client ids end in their node's tag: `c7-3f9a2c`.
            let node = client.rsplit_once('-').map_or("?", |(_, n)| n);
            let roster = self.hub.roster();
            if event == "join" {
                let member = Member {
                    client: client.clone(),
                    user: user.clone(),
                    name: name.clone(),
                    last: None,
                };
                roster.join(node, &topic, member);
            } else {
                roster.leave(node, &topic, &client);
            }
            if header(HEADER_QUIET).is_none() {
                let body = Body::Presence {
                    event: &event,
                    client: &client,
                    user: user.as_deref(),
                    name: name.as_deref(),
                };
                self.hub.deliver_via(key, wildcard, &topic, body);
            }
            return;
        }
        if let Some(data) = usable(&msg.payload, self.max_message_bytes, m, &msg.subject) {
            self.hub.deliver_via(key, wildcard, &topic, Body::Data(&data));
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

/// Waits until the NATS server has applied every command this connection
/// sent before: a request to a subject nobody serves is answered by the
/// server itself ("no responders"), in order with the SUBs before it. (A
/// flush only empties the client's buffer.) Gives up after
/// [`CONFIRM_TIMEOUT`]: the client re-sends its subscriptions on reconnect.
pub async fn barrier(client: &async_nats::Client, prefix: &str) {
    use async_nats::RequestErrorKind;
    let subject = format!("_{prefix}.barrier.{}", client.new_inbox());
    let answer = tokio::time::timeout(CONFIRM_TIMEOUT, client.request(subject, bytes::Bytes::new())).await;
    match answer {
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {}
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "NATS did not confirm subscriptions; they resend on reconnect")
        }
        Err(_) => tracing::warn!("NATS did not confirm subscriptions in time; they resend on reconnect"),
    }
}

async fn read_subject(mut sub: async_nats::Subscriber, key: Box<str>, wildcard: bool, receiver: Receiver) {
    while let Some(msg) = sub.next().await {
        receiver.on_message(&key, wildcard, msg);
    }
}
