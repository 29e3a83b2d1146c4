//! Background load beside a scenario, for Herald targets: sockets that hold
//! many wildcard patterns, and sockets that churn sub/unsub as fast as the
//! node answers them. The scenario's own clients measure what that costs
//! everyone else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::{anyhow, bail};

use crate::wire::{self, Url};

/// Patterns per holding socket (under Herald's default 256 subscriptions).
const PER_SOCKET: usize = 250;

/// Opens sockets that together hold `n` distinct wildcard patterns none of
/// the scenario's topics match (`hK:pJ:>`), subscribed in the URL.
pub async fn hold_patterns(url: &Url, n: usize) -> anyhow::Result<Vec<wire::Conn>> {
    let mut held = Vec::new();
    for k in 0..n.div_ceil(PER_SOCKET) {
        let count = PER_SOCKET.min(n - k * PER_SOCKET);
        let query: Vec<String> = (0..count).map(|j| format!("sub=h{k}:p{j}:%3E")).collect();
        let mut c = wire::connect(url, &query.join("&"), None).await?;
        crate::wire::Target::Herald
            .subscribe(&mut c, &format!("h{k}:p0:>"))
            .await?;
        held.push(c);
    }
    Ok(held)
}

/// Sockets doing sub then unsub of a wildcard in a loop, each waiting for
/// its answer, until `stop`. Counts the requests answered; refusals
/// (`rate_limited`) count as answered: the node did the work of refusing.
pub struct Churn {
    stop: Arc<AtomicBool>,
    pub ops: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Churn {
    pub async fn start(url: &Url, sockets: usize) -> anyhow::Result<Churn> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for k in 0..sockets {
            let mut c = wire::connect(url, "", None).await?;
            let (stop, ops) = (stop.clone(), ops.clone());
            tasks.push(tokio::spawn(async move {
                let mut id = 0u64;
                while !stop.load(Relaxed) {
                    id += 1;
                    let op = if id % 2 == 1 { "sub" } else { "unsub" };
                    let req = format!(r#"{{"op":"{op}","topic":"churn{k}:*","id":{id}}}"#);
                    c.wr.text(req.as_bytes());
                    c.wr.flush().await?;
                    let want = format!(r#""id":{id}"#);
                    loop {
                        let f = c.rd.next().await?.ok_or_else(|| anyhow!("closed"))?;
                        let p = c.rd.payload(&f);
                        if f.opcode == 0x8 {
                            bail!("closed: {}", String::from_utf8_lossy(p));
                        }
                        if p.windows(want.len()).any(|w| w == want.as_bytes()) {
                            break;
                        }
                    }
                    ops.fetch_add(1, Relaxed);
                }
                c.wr.close().await;
                Ok(())
            }));
        }
        Ok(Churn { stop, ops, tasks })
    }

    /// Stops the churn; returns the requests answered.
    pub async fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(self.ops.load(Relaxed))
    }
}
