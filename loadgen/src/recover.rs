//! Recovery: N sockets come back at once with a history position
//! (`?sub=TOPIC&since=EPOCH:SEQ`, the way clients of a killed node
//! reconnect to the survivors) and each reads until it has every message
//! it missed. Measures how long until everyone is caught up, and what it
//! cost the servers. One process (a run of a few thousand sockets fits in
//! one process's descriptors); Herald only.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::report::{cpu_seconds, new_histogram, Percentiles};
use crate::wire::{self, Url};
use herald_protocol::ws::OpCode;

/// What the run measured.
#[derive(Debug, Serialize)]
pub struct RecoverReport {
    pub scenario: &'static str,
    pub sockets: usize,
    /// Messages each socket should recover.
    pub expect: u64,
    /// Sockets that got all of them (and an ack saying `recovered:true`).
    pub caught_up: usize,
    /// Sockets whose ack said `recovered:false`.
    pub refused: usize,
    /// Deliveries received in all.
    pub delivered: u64,
    /// Deliveries expected in all (`sockets × expect`).
    pub expected: u64,
    /// From the first connect to the last socket caught up.
    pub all_caught_up_ms: f64,
    /// Per socket, from its connect to its last missed message (µs).
    pub catch_up_us: Percentiles,
    pub recovered_per_sec: f64,
    pub server_pids: Vec<u32>,
    /// CPU seconds of each server process over the run, in `server_pids` order.
    pub server_cpu_seconds: Vec<f64>,
    pub first_error: Option<String>,
}

/// Runs the recovery of `sockets` sockets over `urls` (round robin), each
/// expecting `expect` messages on `topic` after position `since`, within
/// `limit`.
pub async fn run(
    urls: &[String],
    sockets: usize,
    topic: &str,
    since: &str,
    expect: u64,
    limit: Duration,
    server_pids: &[u32],
) -> anyhow::Result<RecoverReport> {
    let urls: Vec<Url> = urls.iter().map(|u| Url::parse(u)).collect::<Result<_, _>>()?;
    let cpu_before: Vec<f64> = server_pids
        .iter()
        .map(|p| cpu_seconds(*p).unwrap_or(0.0))
        .collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let start = Instant::now();
    let query = format!("sub={topic}&since={since}");
    let mut tasks = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let (url, query, sem, delivered) = (
            urls[i % urls.len()].clone(),
            query.clone(),
            sem.clone(),
            delivered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let began = Instant::now();
            let mut c = wire::connect(&url, &query, None).await?;
            drop(permit);
            let mut got = 0u64;
            let read = async {
                while got < expect {
                    let f = c.rd.next().await?.context("closed before catching up")?;
                    if f.opcode != OpCode::Text as u8 {
                        continue;
                    }
                    let p = c.rd.payload(&f);
                    if p.starts_with(br#"{"op":"ack""#) {
                        if p.windows(17).any(|w| w == br#""recovered":false"#) {
                            anyhow::bail!("refused: {}", String::from_utf8_lossy(p));
                        }
                        continue;
                    }
                    got += 1;
                    delivered.fetch_add(1, Relaxed);
                }
                anyhow::Ok(())
            };
            tokio::time::timeout(limit, read)
                .await
                .context("not caught up in time")??;
            anyhow::Ok((began.elapsed(), start.elapsed()))
        }));
    }
    let mut hist = new_histogram();
    let (mut caught_up, mut refused, mut last) = (0, 0, Duration::ZERO);
    let mut first_error = None;
    for t in tasks {
        match t.await? {
            Ok((own, all)) => {
                caught_up += 1;
                let _ = hist.record(own.as_micros() as u64);
                last = last.max(all);
            }
            Err(e) => {
                if e.to_string().starts_with("refused") {
                    refused += 1;
                }
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let server_cpu_seconds = server_pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| cpu_seconds(*p).unwrap_or(0.0) - b)
        .collect();
    let delivered = delivered.load(Relaxed);
    Ok(RecoverReport {
        scenario: "recover",
        sockets,
        expect,
        caught_up,
        refused,
        delivered,
        expected: sockets as u64 * expect,
        all_caught_up_ms: last.as_secs_f64() * 1e3,
        catch_up_us: Percentiles::from(&hist),
        recovered_per_sec: delivered as f64 / last.as_secs_f64().max(1e-9),
        server_pids: server_pids.to_vec(),
        server_cpu_seconds,
        first_error,
    })
}
