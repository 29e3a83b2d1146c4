//! The handle of one socket that others hold: the hub (to deliver), the
//! heartbeat (to ping or reap) and shutdown (to close). It knows nothing of
//! the session that reads the socket.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use herald_protocol::Disconnect;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::sync::CancellationToken;

use crate::metrics::ConnectionSlot;
use crate::socket::outbox::{Outbox, Pushed};
use crate::socket::writer::{self, Writers};
use crate::sync::Lock;

/// A subscribed socket, shared as `Arc<Subscriber>`.
#[derive(Debug)]
pub struct Subscriber {
    /// Node-unique id; also the client id in presence notices (`c{id}`).
    pub id: u64,
    /// Raw format: deliveries carry only the data.
    pub raw: bool,
    /// Frames waiting for the writer.
    pub outbox: Outbox,
    /// Set once the socket holds a wildcard subscription, so fan-out knows
    /// when it must check for a second match.
    wildcard: AtomicBool,
    /// Set while a subscription recovers (live history deliveries it
    /// covers wait in its [`Hold`] until the replay is out) or has just
    /// recovered (it drops live deliveries the replay already gave).
    recovering: AtomicBool,
    /// Set while the socket keeps a retired subscription (see
    /// [`Subscription::retired`]): fan-out then checks that a topic is
    /// still wanted.
    retired: AtomicBool,
    /// The socket's subscriptions. Written by its session; read by fan-out
    /// from the cluster link only for sockets holding a wildcard.
    subs: Mutex<Vec<Subscription>>,
    /// Held while a join or leave of this socket is decided and announced,
    /// so they go out in the order they happen: a join decided after the
    /// socket's leave (a recovery finishing as the socket goes) finds its
    /// subscription gone and is never announced.
    pub announcing: Mutex<()>,
    /// Where a writer task is started when frames arrive for an idle socket.
    writers: Arc<Writers>,
    /// Counts the socket against `--max-connections` until this handle,
    /// which outlives both halves of its TCP stream, is gone.
    _slot: Option<ConnectionSlot>,
}

/// One pattern a socket holds.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The topic or pattern.
    pub pattern: Box<str>,
    /// Whether it holds `*` or `>`.
    pub wildcard: bool,
    /// Live deliveries held back while the subscription recovers.
    pub hold: Option<Box<Hold>>,
    /// After a recovery: live history deliveries up to this `seq` were in
    /// the replay (a node's feed may still bring them), so they are
    /// dropped; 0 once one above it arrived.
    pub floor: u64,
    /// Unsubscribed by the client, but kept as the carrier of the topics
    /// it shares with a newer subscription of the socket: in a cluster each
    /// key has its own subject subscription with no order between them, so
    /// handing those topics to the newer key at the unsub would lose or
    /// repeat what is in flight on both. A retired subscription delivers
    /// only topics a live one still matches, and goes once none overlaps it.
    pub retired: bool,
    /// Its join was announced on its presence topic, so its end announces
    /// a leave (and only then).
    pub announced: bool,
}

/// Live history deliveries that arrived while a replay was being read and
/// sent, with their `seq`: released after it, less what it covered.
#[derive(Debug, Clone, Default)]
pub struct Hold {
    frames: Vec<(u64, Bytes)>,
    bytes: usize,
    /// The recovery's right to send for this subscription.
    gate: Arc<Gate>,
}

/// A recovery's right to send on behalf of its subscription, ended at once
/// when the subscription ends (an `unsub`, a refresh that narrows the
/// grants, the socket leaving): nothing of its replay, its hold or its
/// join follows. The recovery runs beside the socket's read loop, so the
/// end can come at any point of it.
#[derive(Debug, Default)]
pub struct Gate {
    /// Held across each step the recovery takes and by [`Gate::end`]: a
    /// step happens wholly before the end, or not at all.
    turn: Mutex<()>,
    ended: CancellationToken,
    kept: AtomicBool,
}

impl Gate {
    /// Ends the recovery: no step starts after this returns.
    pub fn end(&self) {
        let _turn = self.turn.locked();
        self.ended.cancel();
    }

    /// Runs one step of the recovery, unless it has ended. The step must
    /// not end a gate itself.
    pub fn step<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        let _turn = self.turn.locked();
        (!self.ended.is_cancelled()).then(f)
    }

    /// Resolves once the recovery has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await
    }

    /// Whether the recovery has ended.
    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// A later `sub` of the same pattern was acked while this one
    /// recovered: the subscription must stay, whatever its recovery's
    /// outcome.
    pub fn keep(&self) {
        self.kept.store(true, Relaxed);
    }

    /// Whether [`Gate::keep`] was called.
    pub fn kept(&self) -> bool {
        self.kept.load(Relaxed)
    }
}

impl Subscription {
    /// A subscription to `pattern` (already validated).
    pub fn new(pattern: &str) -> Self {
        Subscription {
            pattern: pattern.into(),
            wildcard: pattern.contains(['*', '>']),
            hold: None,
            floor: 0,
            retired: false,
            announced: false,
        }
    }

    /// A subscription that holds its live history deliveries until
    /// [`Subscriber::release`].
    pub fn recovering(pattern: &str) -> Self {
        Subscription {
            hold: Some(Box::default()),
            ..Subscription::new(pattern)
        }
    }

    /// The gate of its recovery, while it recovers.
    pub fn gate(&self) -> Option<&Arc<Gate>> {
        self.hold.as_ref().map(|h| &h.gate)
    }

    /// Ends its recovery, if one runs: called wherever the subscription
    /// ends.
    pub fn end_recovery(&self) {
        if let Some(gate) = self.gate() {
            gate.end();
        }
    }
}

impl AsRef<Outbox> for Subscriber {
    fn as_ref(&self) -> &Outbox {
        &self.outbox
    }
}

impl Subscriber {
    /// A handle for socket `id`, counted by `slot` (none in unit tests and
    /// benchmarks); its writer tasks run under `writers`.
    pub fn new(
        id: u64,
        raw: bool,
        queue_limit: usize,
        now_ms: u64,
        writers: Arc<Writers>,
        slot: Option<ConnectionSlot>,
    ) -> Self {
        Subscriber {
            id,
            raw,
            outbox: Outbox::new(queue_limit).seen_at(now_ms),
            wildcard: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            subs: Mutex::new(Vec::new()),
            announcing: Mutex::new(()),
            writers,
            _slot: slot,
        }
    }

    /// Queues a frame for the socket, starting its writer if none runs.
    /// The push that overflows the queue closes the socket with 4001 and
    /// is counted, whoever made it (fan-out, an ack, an error frame).
    pub fn push(self: &Arc<Self>, frame: Bytes) -> Pushed {
        let (pushed, idle) = self.queue(frame);
        if let Some(wr) = idle {
            self.write(wr);
        }
        pushed
    }

    /// [`Subscriber::push`] without the write: when the frame found the
    /// socket idle, its write half comes back, and the caller hands it to
    /// [`Subscriber::write`] soon (once out of a lock). Until then nobody
    /// writes to the socket: later frames queue behind this one.
    pub fn queue(self: &Arc<Self>, frame: Bytes) -> (Pushed, Option<OwnedWriteHalf>) {
        let (pushed, start) = self.outbox.push(frame);
        if pushed == Pushed::Overflowed {
            self.writers.metrics.slow_consumers.fetch_add(1, Relaxed);
            tracing::info!(conn_id = self.id, "closing slow consumer");
        }
        match (pushed, start) {
            (Pushed::Queued, Some(wr)) => (pushed, Some(wr)),
            (_, start) => {
                self.start_writer(start);
                (pushed, None)
            }
        }
    }

    /// Writes what [`Subscriber::queue`] queued for an idle socket at once
    /// (see [`Outbox::write_now`]), or starts its writer.
    pub fn write(self: &Arc<Self>, wr: OwnedWriteHalf) {
        if let Some((wr, rest)) = self.outbox.write_now(wr, crate::clock::now_ms()) {
            self.spawn_writer(wr, rest);
        }
    }

    /// Asks for the socket to be closed (see [`Outbox::close`]); returns
    /// whether this request was the one taken.
    pub fn close(self: &Arc<Self>, why: Disconnect) -> bool {
        let (taken, start) = self.outbox.close(why);
        self.start_writer(start);
        taken
    }

    /// Hands the socket's write half to its outbox once the handshake is
    /// done, starting a writer if frames already wait.
    pub fn install(self: &Arc<Self>, wr: OwnedWriteHalf) {
        let start = self.outbox.install(wr);
        self.start_writer(start);
    }

    fn start_writer(self: &Arc<Self>, wr: Option<OwnedWriteHalf>) {
        if let Some(wr) = wr {
            self.spawn_writer(wr, None);
        }
    }

    fn spawn_writer(self: &Arc<Self>, wr: OwnedWriteHalf, rest: Option<Bytes>) {
        let writers = self.writers.clone();
        writers
            .tracker
            .spawn(writer::run(self.clone(), wr, rest, self.writers.clone()));
    }

    /// The socket's subscriptions, locked briefly (never across an await).
    pub fn subs(&self) -> MutexGuard<'_, Vec<Subscription>> {
        self.subs.locked()
    }

    /// Marks the socket as holding a wildcard, before the hub lists it
    /// under one, so fan-out checks it for a second match from then on.
    pub fn mark_wildcard(&self) {
        self.wildcard.store(true, Relaxed);
    }

    /// Records a subscription the socket now holds.
    pub fn add(&self, sub: Subscription) {
        if sub.wildcard {
            self.mark_wildcard();
        }
        if sub.hold.is_some() {
            self.recovering.store(true, Release);
        }
        let mut subs = self.subs();
        // Most sockets hold one or two subscriptions: grow one at a time.
        subs.reserve_exact(1);
        subs.push(sub);
    }

    /// Whether, of this socket's subscriptions matching `topic`, `key` is the
    /// oldest. A message that reaches the node once per matching subject
    /// subscription is delivered to the socket only through this one, so it
    /// arrives once; and a subscription added later never takes a topic over
    /// from one that already carries it (it would, before its own subject
    /// is live: a gap), so adding a wildcard over a held topic loses nothing.
    /// Dropping the older one leaves it carrying as a retired subscription
    /// (see [`Subscription::retired`]) while a live one wants the topic.
    pub fn is_first_match(&self, key: &str, topic: &str) -> bool {
        let subs = self.subs();
        let mut matching = subs
            .iter()
            .filter(|s| herald_protocol::topic::matches(&s.pattern, topic));
        let Some(first) = matching.next() else {
            return true;
        };
        &*first.pattern == key && (!first.retired || matching.any(|s| !s.retired))
    }

    /// Whether a live (not retired) subscription of the socket matches
    /// `topic`; checked by fan-out only for sockets keeping a retired one.
    pub fn wants(&self, topic: &str) -> bool {
        !self.retired.load(Acquire)
            || self
                .subs()
                .iter()
                .any(|s| !s.retired && herald_protocol::topic::matches(&s.pattern, topic))
    }

    /// The patterns the socket holds (not the retired ones), oldest first.
    pub fn patterns(&self) -> Vec<String> {
        let subs = self.subs();
        let live = subs.iter().filter(|s| !s.retired);
        live.map(|s| s.pattern.to_string()).collect()
    }

    /// Whether the socket keeps a retired subscription.
    pub fn has_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Retires the live subscription to `pattern` when a newer live one
    /// overlaps it and fewer than `max` are retired already; returns
    /// whether it did (else the caller removes it). One that still
    /// recovers is never retired: what it carries waits in its hold, which
    /// ends with its recovery.
    pub fn retire(&self, pattern: &str, max: usize) -> bool {
        let mut subs = self.subs();
        let Some(at) = subs.iter().position(|s| !s.retired && &*s.pattern == pattern) else {
            return false;
        };
        if subs[at].hold.is_some() {
            return false;
        }
        let overlapped = subs[at + 1..]
            .iter()
            .any(|s| !s.retired && herald_protocol::topic::overlaps(&s.pattern, pattern));
        if !overlapped || subs.iter().filter(|s| s.retired).count() >= max {
            return false;
        }
        subs[at].retired = true;
        self.retired.store(true, Release);
        true
    }

    /// Makes the retired subscription to `pattern` live again (it never
    /// stopped carrying its topics); returns whether there was one.
    pub fn revive(&self, pattern: &str) -> bool {
        let mut subs = self.subs();
        let Some(s) = subs.iter_mut().find(|s| s.retired && &*s.pattern == pattern) else {
            return false;
        };
        s.retired = false;
        self.retired.store(subs.iter().any(|s| s.retired), Release);
        true
    }

    /// Takes out the retired subscriptions that no live one newer than
    /// them overlaps any more: they carry nothing the socket wants.
    pub fn prune(&self) -> Vec<Subscription> {
        let mut subs = self.subs();
        let mut gone = Vec::new();
        let mut i = 0;
        while i < subs.len() {
            let s = &subs[i];
            let needed = !s.retired
                || subs[i + 1..]
                    .iter()
                    .any(|l| !l.retired && herald_protocol::topic::overlaps(&l.pattern, &s.pattern));
            if needed {
                i += 1;
            } else {
                gone.push(subs.remove(i));
            }
        }
        self.retired.store(subs.iter().any(|s| s.retired), Release);
        gone
    }

    /// Offers a live delivery of history message `seq` on `topic`: while a
    /// subscription covering it recovers, the frame waits in its hold;
    /// just after, one the replay already gave is dropped. Returns whether
    /// the frame was taken (held or dropped). Past four times the queue
    /// bound a hold closes the socket as a slow consumer.
    pub fn offer(self: &Arc<Self>, topic: &str, seq: u64, frame: &Bytes) -> bool {
        if !self.recovering.load(Acquire) {
            return false;
        }
        let mut subs = self.subs();
        let Some(s) = subs
            .iter_mut()
            .filter(|s| s.hold.is_some() || s.floor > 0)
            .find(|s| herald_protocol::topic::matches(&s.pattern, topic))
        else {
            return false;
        };
        if let Some(hold) = s.hold.as_mut() {
            hold.bytes += frame.len();
            hold.frames.push((seq, frame.clone()));
            if hold.bytes > 4 * self.outbox.limit() {
                drop(subs);
                self.writers.metrics.slow_consumers.fetch_add(1, Relaxed);
                self.close(Disconnect::SlowConsumer);
            }
            return true;
        }
        if seq <= s.floor {
            return true;
        }
        // Live has passed the replay: history arrives in stream order.
        s.floor = 0;
        self.settle(&subs);
        false
    }

    /// Ends `pattern`'s recovery: queues what its hold kept with a `seq`
    /// above `through` (the rest was in the replay), in order, before any
    /// later live delivery can pass it; later ones up to `through` are
    /// dropped as they come.
    ///
    /// The frames are pushed with the socket's subscriptions unlocked (a
    /// push may write to the socket, and fan-out takes that lock to offer
    /// the next delivery). The hold stays in place meanwhile, so a live
    /// delivery arriving then is held behind them, not sent ahead of them;
    /// the hold goes, under the lock, only once a look finds it empty: from
    /// then on deliveries are pushed by fan-out itself, after all of it.
    pub fn release(self: &Arc<Self>, pattern: &str, through: u64) {
        let mut out = Vec::new();
        let mut passed = false;
        loop {
            let mut subs = self.subs();
            let Some(s) = subs.iter_mut().find(|s| &*s.pattern == pattern) else {
                self.settle(&subs);
                return;
            };
            match s.hold.as_mut() {
                Some(hold) if !hold.frames.is_empty() => {
                    std::mem::swap(&mut out, &mut hold.frames);
                    hold.bytes = 0;
                }
                _ => {
                    s.hold = None;
                    // Past the replay's end already, or dropping up to it.
                    s.floor = if passed { 0 } else { through };
                    self.settle(&subs);
                    return;
                }
            }
            drop(subs);
            for (seq, frame) in out.drain(..) {
                if seq > through {
                    self.push(frame);
                    passed = true;
                }
            }
        }
    }

    /// Takes out the subscription whose recovery `gate` is, if it is still
    /// listed and recovering.
    pub fn take_recovering(&self, gate: &Arc<Gate>) -> Option<Subscription> {
        let mut subs = self.subs();
        let at = subs
            .iter()
            .position(|s| s.gate().is_some_and(|g| Arc::ptr_eq(g, gate)))?;
        let s = subs.remove(at);
        self.settle(&subs);
        Some(s)
    }

    fn settle(&self, subs: &[Subscription]) {
        let any = subs.iter().any(|s| s.hold.is_some() || s.floor > 0);
        self.recovering.store(any, Release);
    }

    /// Whether the socket holds (or held) a wildcard subscription.
    pub fn has_wildcard(&self) -> bool {
        self.wildcard.load(Relaxed)
    }

    /// Node clock (ms) when the client was last seen alive (see
    /// [`Outbox::last_seen`]).
    pub fn last_seen(&self) -> u64 {
        self.outbox.last_seen()
    }

    /// Records that something arrived from the client at `now_ms`.
    pub fn seen(&self, now_ms: u64) {
        self.outbox.seen(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(patterns: &[&str]) -> Subscriber {
        let s = Subscriber::new(1, false, 1 << 16, 0, Default::default(), None);
        for p in patterns {
            s.add(Subscription::new(p));
        }
        s
    }

    #[test]
    fn a_retired_subscription_carries_what_a_newer_one_wants() {
        let s = socket(&["a:>", "a:*"]);
        assert!(s.is_first_match("a:>", "a:x") && !s.is_first_match("a:*", "a:x"));
        // Nothing newer overlaps `a:*`: it cannot retire.
        assert!(!s.retire("a:*", 8));
        assert!(s.retire("a:>", 8));
        assert_eq!(s.patterns(), ["a:*"]);
        assert!(s.prune().is_empty(), "`a:*` still overlaps it");
        // `a:>` still carries `a:x`; `a:x:y` is wanted by nobody.
        assert!(s.is_first_match("a:>", "a:x") && !s.is_first_match("a:*", "a:x"));
        assert!(!s.is_first_match("a:>", "a:x:y") && !s.wants("a:x:y"));
        assert!(s.wants("a:x"));
        // Made live again in place, it still carries.
        assert!(s.revive("a:>") && !s.has_retired());
        assert!(s.is_first_match("a:>", "a:x:y"));
        // The bound: none may retire past `max`.
        assert!(!s.retire("a:>", 0));
        assert!(s.retire("a:>", 1));
        // The newer one goes: the retired one carries nothing wanted.
        s.subs().retain(|x| &*x.pattern != "a:*");
        let gone = s.prune();
        assert_eq!(gone.len(), 1);
        assert!(s.subs().is_empty() && !s.has_retired());
    }

    #[test]
    fn a_release_queues_what_the_replay_lacked_in_order_then_drops_repeats() {
        let s = Arc::new(socket(&[]));
        s.add(Subscription::recovering("room:>"));
        let frame = |seq: u64| Bytes::from(format!("{seq};"));
        // Live deliveries during the replay wait in the hold.
        for seq in [9, 10, 11, 12] {
            assert!(s.offer("room:a", seq, &frame(seq)));
        }
        assert!(s.outbox.try_take(Vec::new()).is_err(), "held, not queued");
        s.release("room:>", 10);
        let got = s.outbox.try_take(Vec::new()).unwrap().frames;
        assert_eq!(got, [frame(11), frame(12)], "above the replay, in order");
        assert!(s.subs()[0].hold.is_none());
        // Past the replay already: live flows, nothing is dropped.
        assert!(!s.offer("room:b", 13, &frame(13)));
        // Nothing above the replay held: repeats up to its end are
        // dropped until live passes it.
        s.add(Subscription::recovering("news:>"));
        assert!(s.offer("news:a", 20, &frame(20)));
        s.release("news:>", 21);
        assert!(s.outbox.try_take(Vec::new()).is_err());
        assert!(s.offer("news:a", 21, &frame(21)), "in the replay: dropped");
        assert!(!s.offer("news:b", 22, &frame(22)), "live again");
        assert!(!s.offer("news:a", 23, &frame(23)));
        assert!(!s.recovering.load(Acquire));
    }

    #[test]
    fn live_deliveries_during_a_release_queue_behind_it() {
        let s = Arc::new(Subscriber::new(1, false, 1 << 30, 0, Default::default(), None));
        s.add(Subscription::recovering("room:>"));
        let frame = |seq: u64| Bytes::from(seq.to_string());
        for seq in 1..=20_000 {
            assert!(s.offer("room:a", seq, &frame(seq)));
        }
        // Fan-out goes on while the release pushes (as `Sent::push` does:
        // offered first, pushed when not taken).
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for seq in 20_001..=40_000 {
                    let f = frame(seq);
                    if !s.offer("room:a", seq, &f) {
                        s.push(f);
                    }
                }
            });
            s.release("room:>", 5);
        });
        let got = s.outbox.try_take(Vec::new()).unwrap().frames;
        let want: Vec<Bytes> = (6..=40_000).map(frame).collect();
        assert!(got == want, "every frame once, in seq order");
    }
}
