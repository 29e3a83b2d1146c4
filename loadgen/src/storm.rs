//! The storm: idle subscribed sockets that, when their node goes away,
//! reconnect (with jitter, through the given URLs, typically a load
//! balancer) and resubscribe. Run beside a node kill, it measures how long
//! a cluster takes to take back a dead node's clients.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::{self, Target, Url};
use herald_protocol::ws::OpCode;

/// What the storm's sockets saw, per worker, then summed.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StormReport {
    /// Sockets whose connection was lost.
    pub lost: u64,
    /// Of those, how many connected and subscribed again.
    pub reconnected: u64,
    /// Connection attempts refused or failed on the way.
    pub failed_attempts: u64,
    /// When the first socket was lost (ns since the epoch; 0: none).
    pub first_loss_ns: u64,
    /// When the last lost socket was subscribed again.
    pub last_reconnect_ns: u64,
    /// The first refusal's text, for the report.
    pub first_failure: Option<String>,
}

impl StormReport {
    /// Adds another worker's figures.
    pub fn merge(&mut self, o: &StormReport) {
        self.lost += o.lost;
        self.reconnected += o.reconnected;
        self.failed_attempts += o.failed_attempts;
        if o.first_loss_ns > 0 && (self.first_loss_ns == 0 || o.first_loss_ns < self.first_loss_ns) {
            self.first_loss_ns = o.first_loss_ns;
        }
        self.last_reconnect_ns = self.last_reconnect_ns.max(o.last_reconnect_ns);
        if self.first_failure.is_none() {
            self.first_failure.clone_from(&o.first_failure);
        }
    }
}

#[derive(Default)]
pub struct Stats {
    lost: AtomicU64,
    reconnected: AtomicU64,
    failed: AtomicU64,
    first_loss_ns: AtomicU64,
    last_reconnect_ns: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Stats {
    pub fn report(&self) -> StormReport {
        StormReport {
            lost: self.lost.load(Relaxed),
            reconnected: self.reconnected.load(Relaxed),
            failed_attempts: self.failed.load(Relaxed),
            first_loss_ns: self.first_loss_ns.load(Relaxed),
            last_reconnect_ns: self.last_reconnect_ns.load(Relaxed),
            first_failure: self.first_failure.lock().unwrap().clone(),
        }
    }
}

/// A reconnect attempt that gets no answer in this long is given up and
/// retried (a browser's handshake would time out too).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A small per-socket random source (no dependency needed for jitter).
struct Jitter(u64);

impl Jitter {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

/// When the run ends: unset until the coordinator's `go`, then the end
/// of `--duration`.
pub type End = tokio::sync::watch::Receiver<Option<tokio::time::Instant>>;

async fn until_end(end: &mut End) {
    let at = loop {
        if let Some(at) = *end.borrow_and_update() {
            break at;
        }
        if end.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::time::sleep_until(at).await;
}

fn ended(end: &End) -> bool {
    end.borrow().is_some_and(|at| tokio::time::Instant::now() >= at)
}

/// Reads until the connection ends (answering pings, so the node's
/// heartbeat keeps it, from the moment it is subscribed), or until the run
/// ends. True when the connection ended.
async fn hold(c: &mut wire::Conn, end: &mut End) -> bool {
    loop {
        let next = tokio::select! {
            f = c.rd.next() => f,
            _ = until_end(end) => return false,
        };
        match next {
            Err(_) | Ok(None) => return true,
            Ok(Some(f)) => match f.opcode {
                0x8 => return true,
                0x9 => {
                    let p = c.rd.payload(&f).to_vec();
                    c.wr.frame(OpCode::Pong, &p);
                    if c.wr.flush().await.is_err() {
                        return true;
                    }
                }
                _ => {}
            },
        }
    }
}

/// One storm socket for the whole run: holds `c`; when it is lost,
/// reconnects through `urls` (round robin from `g`) after a random delay
/// of up to `jitter`, backing off while refused, and holds again.
#[allow(clippy::too_many_arguments)]
pub async fn socket(
    mut c: wire::Conn,
    g: usize,
    topic: String,
    urls: Arc<Vec<Url>>,
    source: Option<IpAddr>,
    jitter: Duration,
    stats: Arc<Stats>,
    mut end: End,
) {
    let mut rng = Jitter(0x9e37_79b9_7f4a_7c15 ^ (g as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    loop {
        if !hold(&mut c, &mut end).await {
            return;
        }
        stats.lost.fetch_add(1, Relaxed);
        let now = wire::now_ns();
        let _ = stats
            .first_loss_ns
            .fetch_update(Relaxed, Relaxed, |v| (v == 0 || now < v).then_some(now));
        tokio::time::sleep(Duration::from_millis(rng.below(jitter.as_millis() as u64 + 1))).await;
        let mut attempt = 0u32;
        c = loop {
            if ended(&end) || urls.is_empty() {
                return;
            }
            let url = &urls[(g + attempt as usize) % urls.len()];
            let r = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
                let mut c = wire::connect(url, &Target::Herald.url_query(&topic), source).await?;
                Target::Herald.subscribe(&mut c, &topic).await?;
                anyhow::Ok(c)
            })
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ATTEMPT_TIMEOUT:?}")));
            match r {
                Ok(c) => break c,
                Err(e) => {
                    stats.failed.fetch_add(1, Relaxed);
                    stats
                        .first_failure
                        .lock()
                        .unwrap()
                        .get_or_insert_with(|| e.to_string());
                    // A node that says when to come back is taken at its
                    // word (plus jitter, so the retries do not return as
                    // one wave); otherwise the backoff doubles.
                    let cap = 100u64 << attempt.min(5);
                    let wait = match wire::asked_to_wait(&e) {
                        Some(s) => s * 1000 + rng.below(s * 1000),
                        None => cap / 2 + rng.below(cap),
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    attempt += 1;
                }
            }
        };
        stats.reconnected.fetch_add(1, Relaxed);
        stats.last_reconnect_ns.fetch_max(wire::now_ns(), Relaxed);
    }
}
