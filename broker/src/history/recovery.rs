//! Recovery: a `sub` that asks for what it missed (`since`) or for the
//! current value (`last`) gets retained messages first, then live, with
//! no gap and no duplicate at the seam.
//!
//! The seam: the subscription is created holding its live history
//! deliveries (see [`Subscriber::offer`]); once it is live cluster-wide,
//! the store is read from the client's position up to its current end;
//! the ack goes out, then the replay, paced by the socket's own queue (a
//! large replay waits for the client, it never overflows it into a 4001);
//! then the held deliveries above the replay's end.
//!
//! A recovery runs beside the socket's read loop (one at a time per
//! socket, in the order asked), so a long replay never stops the node
//! from reading the socket: its pongs and heartbeats, its other requests,
//! and the `unsub` or narrowing `refresh` that ends the subscription, and
//! with it the replay, at once (see [`Gate`]). A live message
//! published while the store was being read is either in the replay or in
//! the hold (or both, and then sent once).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use herald_protocol::message::{self, ErrorCode, ErrorReply};
use herald_protocol::position::{self, Unrecovered};

use crate::history::memory::{From, Replay, ReplayError};
use crate::history::store::{History, Store};
use crate::metrics::Metrics;
use crate::socket::subscriber::{Gate, Subscriber};

/// What a `sub` asked of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Everything after this position.
    Since {
        /// The last `seq` the client has.
        seq: u64,
        /// Its history's epoch.
        epoch: String,
    },
    /// The latest retained message of each matching topic.
    Last,
}

impl Ask {
    /// What a `sub` request asked for: `since` a position, or `last`.
    pub fn from_request(since: Option<position::Position<'_>>, last: bool) -> Option<Ask> {
        match since {
            Some(p) => Some(Ask::Since {
                seq: p.seq,
                epoch: p.epoch.to_owned(),
            }),
            None => last.then_some(Ask::Last),
        }
    }
}

/// What one `sub` asked of the history.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// The new subscription's pattern.
    pub pattern: &'a str,
    /// What it asked for.
    pub ask: &'a Ask,
    /// Most messages to replay (`--max-replay`).
    pub max: usize,
    /// The request's id, echoed by the ack.
    pub id: Option<&'a str>,
}

/// Why a recovery ended the subscription instead.
#[derive(Debug)]
pub struct Ahead;

/// Answers the new subscription `sub` holds to `asked.pattern` with what
/// it asked for: the ack, then the replay. Returns the replay's end
/// (`through`), for the caller to release the subscription's hold with,
/// or `None` when there is nothing to release: the subscription ended, or
/// the socket closed, before the replay was out. A position ahead of the
/// history is answered `bad_request`; the caller then drops the
/// subscription.
///
/// It runs beside the socket's read loop, so the subscription can end at
/// any point of it (see [`Gate`]). Ended before its ack (an `unsub` sent
/// right behind the `sub`), it is acked plainly, claiming no recovery;
/// from its end on, not one frame of the replay follows.
pub async fn recover(
    history: Option<&History>,
    metrics: &Metrics,
    sub: &Arc<Subscriber>,
    gate: &Gate,
    asked: Asked<'_>,
) -> Result<Option<u64>, Ahead> {
    let Asked {
        pattern,
        ask,
        max,
        id,
    } = asked;
    let plain = || {
        if let Some(id) = id {
            sub.push(message::encode_ack(id));
        }
        Ok(None)
    };
    if gate.is_ended() {
        return plain();
    }
    let (result, epoch) = read(history, pattern, ask, max).await;
    // A refusal says where the history is now (the client that reloads
    // starts from there), unless it cannot be read at all.
    let through = match &result {
        Ok(r) => r.through,
        Err(_) => history.and_then(|h| h.position()).map_or(0, |p| p.1),
    };
    let outcome = match result {
        Err(ReplayError::Future(at)) => {
            let msg = format!("since is ahead of the history: it is at {at}");
            metrics.error(ErrorCode::BadRequest);
            sub.push(message::encode_error(ErrorCode::BadRequest, &msg, id));
            return Err(Ahead);
        }
        Err(ReplayError::Unrecovered(why)) => Err(why),
        Ok(replay) => Ok(replay),
    };
    let epoch = epoch.as_deref().unwrap_or("");
    // The ack in the gate's turn: a subscription that ended meanwhile gets
    // the plain one.
    let acked = gate.step(|| match ask {
        Ask::Since { .. } => {
            let ack = outcome.as_ref().map(|_| ()).map_err(|w| *w);
            let counter = if ack.is_ok() {
                &metrics.recoveries
            } else {
                &metrics.recoveries_refused
            };
            counter.fetch_add(1, Relaxed);
            sub.push(position::encode_recovery_ack(id, pattern, ack, epoch, through));
        }
        // A plain ack when the values come; when they cannot (more topics
        // than --max-replay hold one, or no history), the same
        // `recovered:false` and reason a `since` gets, so nothing fails
        // silently.
        Ask::Last => match &outcome {
            Ok(_) => {
                if let Some(id) = id {
                    sub.push(message::encode_ack(id));
                }
            }
            Err(why) => {
                metrics.recoveries_refused.fetch_add(1, Relaxed);
                sub.push(position::encode_recovery_ack(
                    id,
                    pattern,
                    Err(*why),
                    epoch,
                    through,
                ));
            }
        },
    });
    if acked.is_none() {
        return plain();
    }
    if let Ok(replay) = outcome {
        let sent = send(sub, gate, &replay, epoch).await;
        metrics.replayed.fetch_add(sent as u64, Relaxed);
        if sent < replay.messages.len() {
            // Cut short: the socket is closing, or the subscription ended.
            return Ok(None);
        }
    }
    Ok(Some(through))
}

/// Reads the store: the replay, or why not; and the history's epoch.
async fn read(
    history: Option<&History>,
    pattern: &str,
    ask: &Ask,
    max: usize,
) -> (Result<Replay, ReplayError>, Option<Arc<str>>) {
    let unavailable = Err(ReplayError::Unrecovered(Unrecovered::HistoryUnavailable));
    let Some(history) = history else {
        return (unavailable, None);
    };
    if !history.covers(pattern) {
        return (unavailable, None);
    }
    let epoch = match &history.store {
        Store::Memory(j) => Some(j.epoch()),
        Store::Stream(s) if s.available() => s.epoch(),
        Store::Stream(_) => None,
    };
    let Some(epoch) = epoch else {
        return (unavailable, None);
    };
    let from = match ask {
        Ask::Since { epoch: e, .. } if **e != *epoch => {
            return (
                Err(ReplayError::Unrecovered(Unrecovered::EpochChanged)),
                Some(epoch),
            );
        }
        Ask::Since { seq, .. } => From::Since(*seq),
        Ask::Last => From::Last,
    };
    let result = match &history.store {
        Store::Memory(j) => j.replay(pattern, from, max),
        Store::Stream(s) => s.replay(pattern, from, max).await,
    };
    (result, Some(epoch))
}

/// Queues the replay, waiting whenever the socket's queue is half full
/// until its writer takes it (woken by the outbox, not by a timer); stops
/// as soon as the socket is closing or the subscription has ended. Returns
/// how many messages it queued.
async fn send(sub: &Arc<Subscriber>, gate: &Gate, replay: &Replay, epoch: &str) -> usize {
    let half = sub.outbox.limit() / 2;
    for (n, (topic, seq, data)) in replay.messages.iter().enumerate() {
        let frame = if sub.raw {
            message::encode_raw(data)
        } else {
            position::encode_delivery_at(topic, data, *seq, epoch)
        };
        let room = tokio::select! {
            biased;
            _ = gate.ended() => false,
            room = sub.outbox.wait_room(half.max(frame.len())) => room,
        };
        if !room || gate.step(|| sub.push(frame)).is_none() {
            return n;
        }
    }
    replay.messages.len()
}

/// One page of concrete `topic`'s history after `since` (at most `limit`
/// messages), for `GET /v1/history`: `{"topic","epoch","messages":
/// [{"seq","data"}..],"complete"}`, where `complete` is false when
/// messages after `since` are no longer retained.
pub async fn page(
    history: Option<&History>,
    topic: &str,
    since: u64,
    limit: usize,
) -> Result<String, ErrorReply> {
    let unavailable = |why: &str| ErrorReply::new(ErrorCode::HistoryUnavailable, why);
    let history = history.ok_or_else(|| unavailable("no history: the node has no --history rules"))?;
    if crate::config::values::Retention::find(&history.rules, topic).is_none() {
        let msg = format!("{topic:?} keeps no history: it is under none of the node's --history patterns");
        return Err(ErrorReply::new(ErrorCode::BadRequest, msg));
    }
    let (epoch, messages, complete) = match &history.store {
        Store::Memory(j) => {
            let (page, complete) = j.read(topic, since, limit);
            (j.epoch(), page, complete)
        }
        Store::Stream(s) => {
            let epoch = s
                .epoch()
                .filter(|_| s.available())
                .ok_or_else(|| unavailable("the history stream cannot be reached"))?;
            match s.page(topic, since, limit).await {
                Ok((r, complete)) => (
                    epoch,
                    r.messages.into_iter().map(|m| (m.1, m.2)).collect(),
                    complete,
                ),
                Err(ReplayError::Future(at)) => {
                    return Err(ErrorReply::new(
                        ErrorCode::BadRequest,
                        format!("since is ahead of the history: it is at {at}"),
                    ))
                }
                Err(ReplayError::Unrecovered(_)) => {
                    return Err(unavailable("the history stream cannot be read"))
                }
            }
        }
    };
    let mut out = format!("{{\"topic\":\"{topic}\",\"epoch\":\"{epoch}\",\"messages\":[");
    for (i, (seq, data)) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{{\"seq\":{seq},\"data\":"));
        out.push_str(std::str::from_utf8(data).unwrap_or("null"));
        out.push('}');
    }
    out.push_str(&format!("],\"complete\":{complete}}}"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use herald_protocol::Disconnect;

    fn replay(n: u64) -> Replay {
        let topic: Arc<str> = "room:a".into();
        let messages = (1..=n)
            .map(|seq| (topic.clone(), seq, Bytes::from(format!("{{\"n\":{seq}}}"))))
            .collect();
        Replay { messages, through: n }
    }

    /// A socket whose queue holds four of the replay's frames.
    fn room_for_four() -> Arc<Subscriber> {
        let frame_len = position::encode_delivery_at("room:a", b"{\"n\":1}", 1, "e").len();
        Arc::new(Subscriber::new(
            1,
            false,
            4 * frame_len,
            0,
            Default::default(),
            None,
        ))
    }

    /// Lets the replay task run until it waits.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_replay_waits_for_room_resumes_when_it_frees_and_ends_with_the_socket() {
        // Room for four frames: the replay queues while half is free.
        let sub = room_for_four();
        let task = tokio::spawn({
            let sub = sub.clone();
            async move { send(&sub, &Gate::default(), &replay(100), "e").await }
        });
        settle().await;
        let first = sub.outbox.try_take(Vec::new()).unwrap().frames;
        assert_eq!(first.len(), 3, "queued up to half the bound, then waited");
        assert!(!task.is_finished());
        // Taking the queue (what the writer does) wakes it: it goes on.
        settle().await;
        let next = sub.outbox.try_take(Vec::new()).unwrap().frames;
        assert_eq!(next.len(), 3);
        assert!(
            next[0].windows(8).any(|w| w == b"\"seq\":4,"),
            "in order, from where it stopped"
        );
        settle().await;
        assert!(!task.is_finished(), "waiting again, on a full half");
        // The socket closes: the replay ends at once, with the rest unsent.
        sub.close(Disconnect::GoingAway);
        settle().await;
        assert!(task.is_finished());
        assert_eq!(task.await.unwrap(), 9);
        let left = sub.outbox.try_take(Vec::new()).unwrap();
        assert_eq!(left.frames.len(), 3, "nothing queued after the close");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_replay_ends_at_once_with_its_subscription_even_while_it_waits() {
        let sub = room_for_four();
        let gate = Arc::new(Gate::default());
        let task = tokio::spawn({
            let (sub, gate) = (sub.clone(), gate.clone());
            async move { send(&sub, &gate, &replay(100), "e").await }
        });
        settle().await;
        assert!(!task.is_finished(), "waiting for room");
        // The subscription ends (an unsub, a narrowing refresh): the
        // replay stops though the queue never frees.
        gate.end();
        settle().await;
        assert!(task.is_finished());
        assert_eq!(task.await.unwrap(), 3);
        // And a gate ended before a step refuses it.
        assert_eq!(gate.step(|| 1), None);
    }
}
