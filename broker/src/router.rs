//! The one owner of a subscription's life and of a publish's way in.
//!
//! A subscription touches four things that must agree: the socket's own
//! list, the hub's fan-out table, the cluster link's interest (the NATS
//! subject subscription), and presence. [`Router`] changes them together
//! and in one order, for WebSocket sessions and HTTP alike, so no caller
//! can forget one or do them in another order.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::message::{self, ErrorCode};

use crate::bus::{Bus, BusError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::subjects::Live;
use crate::subscriber::{Subscriber, Subscription};

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The socket already holds the most subscriptions allowed.
    #[error("at most {max} subscriptions per socket")]
    Limit {
        /// `--max-subscriptions`.
        max: usize,
    },
    /// `unsub` of a pattern the socket does not hold.
    #[error("not subscribed to {0:?}")]
    NotSubscribed(String),
    /// The node holds the most distinct wildcard patterns allowed.
    #[error("pattern_limit: the node holds {max} distinct wildcard patterns; subscribe to a held one or a concrete topic")]
    PatternLimit {
        /// `--max-patterns`.
        max: usize,
    },
}

impl Refused {
    /// The error code the client is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refused::Limit { .. } => ErrorCode::SubscriptionLimit,
            Refused::NotSubscribed(_) => ErrorCode::NotSubscribed,
            Refused::PatternLimit { .. } => ErrorCode::PatternLimit,
        }
    }
}

/// Subscriptions and publishes for every caller on the node. Cloning is a
/// refcount.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    metrics: Arc<Metrics>,
    /// Appended to socket ids in presence notices so they are unique across
    /// a cluster (empty on an embedded node).
    client_suffix: String,
    max_subscriptions: usize,
}

impl Router {
    /// A router publishing through `bus`.
    pub fn new(bus: Bus, metrics: Arc<Metrics>, client_suffix: String, max_subscriptions: usize) -> Self {
        Router {
            inner: Arc::new(Inner {
                bus,
                metrics,
                client_suffix,
                max_subscriptions,
            }),
        }
    }

    /// The local fan-out table.
    pub fn hub(&self) -> &Hub {
        self.inner.bus.hub()
    }

    /// The bus (for the link's state).
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The socket's id in presence notices: unique across a cluster.
    fn client(&self, sub: &Subscriber) -> String {
        format!("c{}{}", sub.id, self.inner.client_suffix)
    }

    /// Subscribes socket `sub` to `pattern` (already validated), then,
    /// once the subscription is in effect cluster-wide, answers request
    /// `ack` (when given) and announces the join on a presence topic. A
    /// client that has the ack receives every message published anywhere
    /// after it. Subscribing again to a held pattern is acked and changes
    /// nothing.
    ///
    /// Local deliveries start at once. When the cluster link has yet to
    /// confirm the pattern's subject, the ack and the join wait in the
    /// returned future, which the caller awaits before its next request.
    pub fn subscribe(
        &self,
        sub: &Arc<Subscriber>,
        pattern: &str,
        name: Option<&str>,
        ack: Option<&str>,
    ) -> Result<Option<Live>, Refused> {
        let (held, count) = {
            let subs = sub.subs();
            (subs.iter().any(|s| &*s.pattern == pattern), subs.len())
        };
        if !held {
            let max = self.inner.max_subscriptions;
            if count >= max {
                return Err(Refused::Limit { max });
            }
            let s = Subscription::new(pattern);
            let wildcard = s.wildcard;
            if wildcard {
                sub.mark_wildcard();
            }
            let bus = &self.inner.bus;
            let interest = bus
                .hub()
                .subscribe(pattern, wildcard, sub)
                .map_err(|e| Refused::PatternLimit { max: e.max })?;
            sub.add(s);
            bus.interest(pattern, interest);
            self.inner.metrics.subscriptions.fetch_add(1, Relaxed);
        }
        let Some(live) = self.inner.bus.until_live(pattern) else {
            self.subscribed(sub, pattern, name, ack, !held);
            return Ok(None);
        };
        let (router, sub) = (self.clone(), sub.clone());
        let (pattern, name, ack) = (
            pattern.to_owned(),
            name.map(str::to_owned),
            ack.map(str::to_owned),
        );
        Ok(Some(Box::pin(async move {
            live.await;
            router.subscribed(&sub, &pattern, name.as_deref(), ack.as_deref(), !held);
        })))
    }

    /// The subscription is in effect: ack, then announce a new one.
    fn subscribed(
        &self,
        sub: &Arc<Subscriber>,
        pattern: &str,
        name: Option<&str>,
        ack: Option<&str>,
        new: bool,
    ) {
        if let Some(id) = ack {
            sub.push(message::encode_ack(id));
        }
        if new {
            self.announce(sub, &Subscription::new(pattern), "join", name);
        }
    }

    /// Ends socket `sub`'s subscription to `pattern`, then answers `ack`.
    pub fn unsubscribe(
        &self,
        sub: &Arc<Subscriber>,
        pattern: &str,
        name: Option<&str>,
        ack: Option<&str>,
    ) -> Result<(), Refused> {
        let removed = {
            let mut subs = sub.subs();
            let at = subs.iter().position(|s| &*s.pattern == pattern);
            at.map(|i| subs.swap_remove(i))
        };
        let Some(s) = removed else {
            return Err(Refused::NotSubscribed(pattern.to_owned()));
        };
        // In effect before the ack: nothing on `pattern` reaches the socket
        // after the client has it.
        self.leave(sub, &s, name);
        if let Some(id) = ack {
            sub.push(message::encode_ack(id));
        }
        Ok(())
    }

    /// Ends every subscription of a socket that is going away.
    pub fn leave_all(&self, sub: &Arc<Subscriber>, name: Option<&str>) {
        let subs = std::mem::take(&mut *sub.subs());
        for s in subs {
            self.leave(sub, &s, name);
        }
    }

    fn leave(&self, sub: &Arc<Subscriber>, s: &Subscription, name: Option<&str>) {
        let bus = &self.inner.bus;
        let interest = bus.hub().unsubscribe(&s.pattern, s.wildcard, sub.id);
        bus.interest(&s.pattern, interest);
        self.inner.metrics.subscriptions.fetch_sub(1, Relaxed);
        self.announce(sub, s, "leave", name);
    }

    fn announce(&self, sub: &Subscriber, s: &Subscription, event: &str, name: Option<&str>) {
        let bus = &self.inner.bus;
        if !s.wildcard && bus.hub().has_presence(&s.pattern) {
            bus.presence(&s.pattern, event, &self.client(sub), name);
        }
    }

    /// Publishes `data` (well-formed JSON) on concrete `topic` to every
    /// subscriber in the cluster; returns the local deliveries.
    pub fn publish(&self, topic: &str, data: Bytes) -> Result<usize, BusError> {
        self.inner.bus.publish(topic, data)
    }

    /// Publishes several messages in a row on one topic (see
    /// [`Bus::publish_batch`]).
    pub fn publish_batch(&self, topic: &str, datas: &[Bytes]) -> Result<usize, BusError> {
        self.inner.bus.publish_batch(topic, datas)
    }
}
