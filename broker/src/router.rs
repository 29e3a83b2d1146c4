//! The one owner of a subscription's life and of a publish's way in.
//!
//! A subscription touches four things that must agree: the socket's own
//! list, the hub's fan-out table, the cluster link's interest (the NATS
//! subject subscription), and presence. [`Router`] changes them together
//! and in one order, for WebSocket sessions and HTTP alike, so no caller
//! can forget one or do them in another order.
//!
//! Uses: `sync`, `metrics`, `socket`, `presence`, `fanout`, `history`, `cluster`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use herald_protocol::message::{self, ErrorCode, ErrorReply};
use herald_protocol::position;

use crate::cluster::bus::{Bus, BusError};
use crate::cluster::subjects::Barrier;
use crate::fanout::hub::Hub;
use crate::history::jetstream::STORE_TIMEOUT;
use crate::history::recovery::{self, Ask};
use crate::history::store::Store;
use crate::metrics::Metrics;
use crate::presence::roster::{Event, Member, On};
use crate::socket::subscriber::{Subscriber, Subscription};
use crate::sync::Lock;

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
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

impl SubscribeError {
    /// The error code the client is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::Limit { .. } => ErrorCode::SubscriptionLimit,
            SubscribeError::NotSubscribed(_) => ErrorCode::NotSubscribed,
            SubscribeError::PatternLimit { .. } => ErrorCode::PatternLimit,
        }
    }
}

/// A history publish on its way into the stream (see
/// [`Router::publish_answered`]).
pub type Storing = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send>>;

/// What a `subscribe` leaves for its caller to run.
pub enum Pending {
    /// The ack and join, once the cluster link confirms the subscription:
    /// awaited before the socket's next request.
    Live(Barrier),
    /// A recovery: the ack, the replay, then the join; run beside the
    /// socket's next requests, after its earlier recoveries.
    Recovery(Barrier),
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
    /// `--presence-by user`: notices for a user's first and last socket.
    by_user: bool,
    /// `--max-replay`.
    max_replay: usize,
}

/// Who a socket is, for presence: its `?name=` and its token's user id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// The display name.
    pub name: Option<&'a str>,
    /// The token's `sub`.
    pub user: Option<&'a str>,
}

impl<'a> Who<'a> {
    /// Who an owned `(name, user)` names (kept by a task that outlives
    /// the request).
    fn of((name, user): &'a (Option<String>, Option<String>)) -> Self {
        Who {
            name: name.as_deref(),
            user: user.as_deref(),
        }
    }
}

impl Router {
    /// A router publishing through `bus`.
    pub fn new(
        bus: Bus,
        metrics: Arc<Metrics>,
        client_suffix: String,
        max_subscriptions: usize,
        by_user: bool,
        max_replay: usize,
    ) -> Self {
        Router {
            inner: Arc::new(Inner {
                bus,
                metrics,
                client_suffix,
                max_subscriptions,
                by_user,
                max_replay,
            }),
        }
    }

    /// This node's tag in client ids (`""` on an embedded node).
    pub fn node_id(&self) -> &str {
        self.inner.client_suffix.trim_start_matches('-')
    }

    /// Whether notices are per user (`--presence-by user`).
    pub fn by_user(&self) -> bool {
        self.inner.by_user
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
    pub fn client_id(&self, sub: &Subscriber) -> String {
        self.client(sub)
    }

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
    /// returned [`Pending::Live`], which the caller awaits before its next
    /// request.
    ///
    /// With `ask` (a new subscription that wants what it missed, or the
    /// current value), the ack, the replay from the history and then the
    /// join are a [`Pending::Recovery`] instead (see
    /// [`crate::history::recovery`]), which runs beside the caller's next
    /// requests: it may take as long as the client takes to read it, and
    /// ends at once if the subscription does.
    pub fn subscribe(
        &self,
        sub: &Arc<Subscriber>,
        pattern: &str,
        who: Who<'_>,
        ack: Option<&str>,
        ask: Option<&Ask>,
    ) -> Result<Option<Pending>, SubscribeError> {
        let revived = sub.has_retired() && self.unretire(sub, pattern, ask.is_some());
        let (held, count) = {
            let subs = sub.subs();
            let held = subs.iter().find(|s| !s.retired && &*s.pattern == pattern);
            // Acked now: a recovery still running for it must not drop it.
            if let Some(g) = held.and_then(|s| s.gate()) {
                g.keep();
            }
            (held.is_some(), subs.iter().filter(|s| !s.retired).count())
        };
        let mut gate = None;
        if !held {
            let max = self.inner.max_subscriptions;
            if count >= max {
                return Err(SubscribeError::Limit { max });
            }
            // Listed on the socket (holding, if it recovers) before the
            // hub can deliver through it.
            let s = match ask {
                Some(_) => Subscription::recovering(pattern),
                None => Subscription::new(pattern),
            };
            gate = s.gate().cloned();
            let wildcard = s.wildcard;
            sub.add(s);
            let bus = &self.inner.bus;
            let interest = match bus.hub().subscribe(pattern, wildcard, sub) {
                Ok(i) => i,
                Err(e) => {
                    sub.subs().retain(|s| &*s.pattern != pattern);
                    sub.release(pattern, u64::MAX);
                    return Err(SubscribeError::PatternLimit { max: e.max });
                }
            };
            bus.interest(pattern, interest);
            self.inner.metrics.subscriptions.fetch_add(1, Relaxed);
        }
        let new = !held || revived;
        let recovery = ask.cloned().zip(gate);
        let live = self.inner.bus.until_live(pattern);
        if live.is_none() && recovery.is_none() {
            self.subscribed(sub, pattern, who, ack, new);
            return Ok(None);
        }
        let (router, sub) = (self.clone(), sub.clone());
        let (pattern, name, user, ack) = (
            pattern.to_owned(),
            who.name.map(str::to_owned),
            who.user.map(str::to_owned),
            ack.map(str::to_owned),
        );
        let who = (name, user);
        let Some((ask, gate)) = recovery else {
            return Ok(Some(Pending::Live(Box::pin(async move {
                if let Some(live) = live {
                    live.await;
                }
                router.subscribed(&sub, &pattern, Who::of(&who), ack.as_deref(), new);
            }))));
        };
        Ok(Some(Pending::Recovery(Box::pin(async move {
            if let Some(live) = live {
                live.await;
            }
            let inner = &router.inner;
            let asked = recovery::Asked {
                pattern: &pattern,
                ask: &ask,
                max: inner.max_replay,
                id: ack.as_deref(),
            };
            let through = recovery::recover(inner.bus.history(), &inner.metrics, &sub, &gate, asked).await;
            // Nothing is announced for a socket already closing: its
            // leave would follow at once.
            let live = || !sub.outbox.is_closing();
            match through {
                Ok(Some(through)) => {
                    gate.step(|| {
                        sub.release(&pattern, through);
                        if live() {
                            router.subscribed(&sub, &pattern, Who::of(&who), None, true);
                        }
                    });
                }
                Ok(None) => {}
                // Acked again by a later plain `sub` meanwhile: it stays,
                // live from here.
                Err(_) if gate.kept() => {
                    gate.step(|| {
                        sub.release(&pattern, 0);
                        if live() {
                            router.subscribed(&sub, &pattern, Who::of(&who), None, true);
                        }
                    });
                }
                Err(_) => {
                    // Never announced: dropped without a leave notice,
                    // unless the client ended it first.
                    if let Some(s) = sub.take_recovering(&gate) {
                        router.leave(&sub, &s, None);
                    }
                }
            }
        }))))
    }

    /// The subscription is in effect: ack (with the history's position,
    /// on a pattern that keeps history), then announce a new one.
    fn subscribed(&self, sub: &Arc<Subscriber>, pattern: &str, who: Who<'_>, ack: Option<&str>, new: bool) {
        if let Some(id) = ack {
            let history = self.inner.bus.history().filter(|h| h.covers(pattern));
            sub.push(match history.and_then(|h| h.position()) {
                Some((epoch, seq)) => position::encode_ack_at(id, &epoch, seq),
                None => message::encode_ack(id),
            });
        }
        if new {
            self.join(sub, pattern, who);
        }
    }

    /// Announces the join of `sub`'s live subscription to `pattern`, unless
    /// it is gone already (the socket left or unsubscribed while the
    /// subscription waited to be live or recovered): in the socket's turn,
    /// so its leave, if it comes, is announced after.
    fn join(&self, sub: &Arc<Subscriber>, pattern: &str, who: Who<'_>) {
        let _turn = sub.announcing.locked();
        {
            let mut subs = sub.subs();
            let Some(s) = subs.iter_mut().find(|s| !s.retired && *s.pattern == *pattern) else {
                return;
            };
            if std::mem::replace(&mut s.announced, true) {
                return;
            }
        }
        self.announce(sub, &Subscription::new(pattern), Event::Join, who);
    }

    /// Ends socket `sub`'s subscription to `pattern`, then answers `ack`.
    pub fn unsubscribe(
        &self,
        sub: &Arc<Subscriber>,
        pattern: &str,
        who: Who<'_>,
        ack: Option<&str>,
    ) -> Result<(), SubscribeError> {
        // In a cluster, a subscription that a newer one overlaps stays as
        // the carrier of their shared topics (see `Subscription::retired`).
        let max = self.inner.max_subscriptions;
        if self.inner.bus.is_cluster() && sub.retire(pattern, max) {
            self.inner.metrics.subscriptions.fetch_sub(1, Relaxed);
            let _turn = sub.announcing.locked();
            let announced = {
                let mut subs = sub.subs();
                let s = subs
                    .iter_mut()
                    .rev()
                    .find(|s| s.retired && *s.pattern == *pattern);
                s.is_some_and(|s| std::mem::take(&mut s.announced))
            };
            if announced {
                self.announce(sub, &Subscription::new(pattern), Event::Leave, who);
            }
        } else {
            let removed = {
                let mut subs = sub.subs();
                let at = subs.iter().position(|s| !s.retired && &*s.pattern == pattern);
                // In order: the oldest matching subscription carries a
                // topic (see `Subscriber::is_first_match`).
                at.map(|i| subs.remove(i))
            };
            let Some(s) = removed else {
                return Err(SubscribeError::NotSubscribed(pattern.to_owned()));
            };
            // In effect before the ack: nothing on `pattern` reaches the
            // socket after the client has it.
            self.leave(sub, &s, Some(who));
        }
        for s in sub.prune() {
            self.leave(sub, &s, None);
        }
        if let Some(id) = ack {
            sub.push(message::encode_ack(id));
        }
        Ok(())
    }

    /// Ends every subscription of a socket that is going away.
    pub fn leave_all(&self, sub: &Arc<Subscriber>, who: Who<'_>) {
        let subs = std::mem::take(&mut *sub.subs());
        for s in subs {
            self.leave(sub, &s, Some(who));
        }
    }

    /// A `sub` to a pattern the socket keeps retired: made live again in
    /// place, or, when it recovers (it must hold its deliveries from the
    /// start), taken out first.
    /// Returns whether it was made live again.
    fn unretire(&self, sub: &Arc<Subscriber>, pattern: &str, recovers: bool) -> bool {
        if !recovers {
            // Counted and announced again; the hub never let it go.
            let revived = sub.revive(pattern);
            if revived {
                self.inner.metrics.subscriptions.fetch_add(1, Relaxed);
            }
            return revived;
        }
        let taken = {
            let mut subs = sub.subs();
            let at = subs.iter().position(|s| s.retired && &*s.pattern == pattern);
            at.map(|i| subs.remove(i))
        };
        if let Some(s) = taken {
            self.leave(sub, &s, None);
        }
        false
    }

    /// Ends one subscription; `who` announces the leave on a presence
    /// topic (`None` for one that never announced its join). A retired
    /// one was uncounted and announced when the client dropped it.
    fn leave(&self, sub: &Arc<Subscriber>, s: &Subscription, who: Option<Who<'_>>) {
        s.end_recovery();
        let bus = &self.inner.bus;
        let interest = bus.hub().unsubscribe(&s.pattern, s.wildcard, sub.id);
        bus.interest(&s.pattern, interest);
        if s.retired {
            return;
        }
        self.inner.metrics.subscriptions.fetch_sub(1, Relaxed);
        if let (Some(who), true) = (who, s.announced) {
            let _turn = sub.announcing.locked();
            self.announce(sub, s, Event::Leave, who);
        }
    }

    /// Records a join or leave on a presence topic in the roster and tells
    /// every node; with `--presence-by user`, sockets hear of a user's first
    /// socket joining and its last one leaving only.
    fn announce(&self, sub: &Subscriber, s: &Subscription, event: Event, who: Who<'_>) {
        let bus = &self.inner.bus;
        if s.wildcard || !bus.hub().has_presence(&s.pattern) {
            return;
        }
        let (topic, client) = (&*s.pattern, self.client(sub));
        let roster = bus.hub().roster();
        let before = match (self.inner.by_user, who.user) {
            (true, Some(u)) => Some(roster.sockets_of(topic, u)),
            _ => None,
        };
        if event == Event::Join {
            let member = Member {
                client: client.clone(),
                user: who.user.map(String::from),
                name: who.name.map(String::from),
                last: None,
            };
            roster.join(On::Here, topic, member);
        } else {
            roster.leave(On::Here, topic, &client);
        }
        let notify = match before {
            Some(n) if event == Event::Join => n == 0,
            Some(n) => n <= 1,
            None => true,
        };
        bus.presence(topic, event, &client, who.user, who.name, notify);
    }

    /// Who is on presence topic `topic`, cluster-wide: `{"members":[..],
    /// "clients":N,"users":M}` (at most `max` members, then
    /// `"truncated":true`), or with `stats` the counts only. Refused with the error's
    /// code and text when the topic has no presence.
    pub fn presence(&self, topic: &str, stats: bool, max: usize) -> Result<serde_json::Value, ErrorReply> {
        let hub = self.inner.bus.hub();
        if !hub.has_presence(topic) {
            let msg = format!("no presence on {topic:?}: it is not under the node's --presence patterns");
            return Err(ErrorReply::new(ErrorCode::BadRequest, msg));
        }
        let roster = hub.roster();
        let (clients, users) = roster.stats(topic);
        Ok(if stats {
            serde_json::json!({"clients": clients, "users": users})
        } else {
            let (mut members, mut truncated) =
                roster.members(topic, if self.inner.by_user { usize::MAX } else { max });
            if self.inner.by_user {
                // One entry per user (its first socket); sockets without a
                // user stay one each.
                let mut seen = std::collections::HashSet::new();
                members.retain(|m| m.user.as_ref().is_none_or(|u| seen.insert(u.clone())));
                truncated = members.len() > max;
                members.truncate(max);
            }
            let members: Vec<_> = members.iter().map(Member::to_json).collect();
            let mut v = serde_json::json!({"members": members, "clients": clients, "users": users});
            if truncated {
                v["truncated"] = true.into();
            }
            v
        })
    }

    /// Publishes `data` (well-formed JSON) on concrete `topic` to every
    /// subscriber in the cluster; returns the local deliveries.
    pub fn publish(&self, topic: &str, data: Bytes) -> Result<usize, BusError> {
        self.inner.bus.publish(topic, data)
    }

    /// Publishes `data` on `topic` for a request that is answered: `None`
    /// when the answer may go at once; for a history topic kept in the
    /// cluster's stream, a future that resolves once the stream stored the
    /// message and this node delivered it (so the publisher's own copy
    /// comes before its ack), with its `seq`, or with why not (then the
    /// message reached nobody, and may be sent again).
    pub fn publish_answered(&self, topic: &str, data: Bytes) -> Result<Option<Storing>, BusError> {
        let mut confirms = Vec::new();
        self.inner
            .bus
            .publish_confirmed(topic, std::slice::from_ref(&data), &mut confirms)?;
        let (Some(rx), Some(Store::Stream(stream))) =
            (confirms.pop(), self.inner.bus.history().map(|h| &h.store))
        else {
            return Ok(None);
        };
        let stream = stream.clone();
        Ok(Some(Box::pin(async move {
            let seq = match tokio::time::timeout(STORE_TIMEOUT, rx).await {
                Ok(Ok(Ok(seq))) => seq,
                Ok(Ok(Err(e))) => {
                    return Err(format!("not stored in the history stream ({e}); publish again"))
                }
                Ok(Err(_)) => return Err("not stored: the cluster link closed; publish again".to_owned()),
                Err(_) => {
                    return Err(format!(
                        "the history stream did not confirm within {STORE_TIMEOUT:?}; publish again"
                    ))
                }
            };
            // Bounded: a stalled feed delays the ack, never withholds it.
            let own = stream.delivered_through(seq);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), own).await;
            Ok(seq)
        })))
    }

    /// Publishes several messages in a row on one topic, with a receiver
    /// per message bound for the history stream (see
    /// [`Bus::publish_confirmed`]).
    pub fn publish_confirmed(
        &self,
        topic: &str,
        datas: &[Bytes],
        confirms: &mut Vec<tokio::sync::oneshot::Receiver<Result<u64, String>>>,
    ) -> Result<usize, BusError> {
        self.inner.bus.publish_confirmed(topic, datas, confirms)
    }

    /// Publishes several messages in a row on one topic (see
    /// [`Bus::publish_batch`]).
    pub fn publish_batch(&self, topic: &str, datas: &[Bytes]) -> Result<usize, BusError> {
        self.inner.bus.publish_batch(topic, datas)
    }
}
