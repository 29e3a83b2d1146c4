//! `herald-loadgen`: load generator for Herald and its peers.
//!
//! The coordinator (this process) splits a run into worker processes, each
//! with its own source address (127.0.0.2, 127.0.0.3, ...) so that one run
//! can hold more sockets than one process's file descriptors or one
//! address's ephemeral ports allow; it starts them together, shows progress,
//! and merges their counts and latency histograms into one report.

mod hostile;
mod recover;
mod report;
mod storm;
mod wire;
mod worker;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use report::{new_histogram, Percentiles, Report, ServerStats, WorkerReport};
use wire::Target;
use worker::{Kind, Spec};

const EXAMPLES: &str = "\
Scenarios (each run stops by itself after --duration; targets must be loopback):

  fanout   N subscribers on one topic, P publishers at rate R (0 = flat out).
           herald-loadgen --url ws://127.0.0.1:8080/ws fanout --subscribers 5000 --publishers 1 --rate 0 --size 64
  rooms    T topics x S subscribers each; publishes spread over the topics.
           herald-loadgen rooms --topics 100 --subscribers-per-topic 50 --publishers 4 --rate 500
  connect  Handshakes per second: C loops of open, subscribe, close.
           herald-loadgen connect --concurrency 64 --duration 10s
  idle     N idle subscribed sockets; with --server-pid, the server's RSS per socket.
           herald-loadgen --workers 2 --server-pid $(pidof herald) idle --sockets 19000
  cluster  Subscribers spread over the 2nd..last --url, publishers on the first,
           so every message crosses nodes.
           herald-loadgen --url ws://127.0.0.1:8081/ws --url ws://127.0.0.1:8082/ws cluster --subscribers 3000

Targets: --target herald (protocol v1), nats-ws (NATS protocol over nats-server's
websocket listener; topics map to subjects), ws-broadcast (a server that sends
every message to every client, such as the classic Node `ws` chat server).

With --server-pid (repeatable), the report includes the servers' CPU seconds,
deliveries per CPU-second and CPU per delivery. --json prints the report as JSON.";

#[derive(Parser)]
#[command(name = "herald-loadgen", version, about = "Load generator for Herald and its peers", after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Target WebSocket URL(s); repeat for several nodes.
    #[arg(long = "url", global = true, default_value = "ws://127.0.0.1:8080/ws")]
    urls: Vec<String>,
    /// Protocol the target speaks.
    #[arg(long, global = true, value_enum, default_value = "herald")]
    target: Target,
    /// Worker processes (each with its own source address 127.0.0.2, .3, ...).
    #[arg(long, global = true, default_value_t = 1)]
    workers: usize,
    /// How long publishing (or connecting) runs, e.g. 10s.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Server process(es) to read CPU and memory from (/proc).
    #[arg(long = "server-pid", global = true)]
    server_pids: Vec<u32>,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Herald only: before the run, hold this many distinct wildcard
    /// patterns (on extra sockets, 250 each) that no scenario topic matches.
    #[arg(long, global = true, default_value_t = 0)]
    patterns: usize,
    /// Herald only: during the run, this many extra sockets sub and unsub a
    /// wildcard in a loop, each waiting for its answer.
    #[arg(long, global = true, default_value_t = 0)]
    churn: usize,
    /// Also write a self-contained HTML report here: a latency histogram
    /// and deliveries per second over the run.
    #[arg(long, global = true)]
    html: Option<std::path::PathBuf>,
    /// Herald only: a connection token (JWT) every socket presents in its
    /// URL (`?token=`), to measure handshakes with access control on.
    #[arg(long, global = true, env = "HERALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Herald only: every subscriber also holds this topic (in its URL),
    /// and once everyone is connected one message is published on it
    /// (through the first URL): the report gives the time to its first and
    /// last delivery and how many sockets it reached.
    #[arg(long, global = true)]
    shared: Option<String>,
}

#[derive(Args, Clone)]
struct Flow {
    /// Publishers.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages per second per publisher (up to 1,000,000); 0 = as fast as the target takes.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    rate: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// N subscribers on one topic, P publishers.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[command(flatten)]
        flow: Flow,
    },
    /// T topics with S subscribers each; publishes spread over the topics.
    Rooms {
        #[arg(long, default_value_t = 100)]
        topics: usize,
        #[arg(long, default_value_t = 10)]
        subscribers_per_topic: usize,
        #[command(flatten)]
        flow: Flow,
    },
    /// Handshakes per second: open, subscribe, close, in C concurrent loops.
    Connect {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// N idle subscribed sockets; reports server RSS per socket.
    Idle {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        /// How long to hold the sockets after the measurement.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        hold: Duration,
        /// Topics the sockets spread over: 1 is one room for all, 0 gives
        /// each socket its own (the join-cost comparison).
        #[arg(long, default_value_t = 100)]
        topics: usize,
    },
    /// N idle subscribed sockets over the URLs (socket i on URL i mod
    /// URLs) held for --duration; a socket whose node goes away reconnects
    /// through --reconnect-url (a load balancer) after up to --jitter.
    /// Reports how long the last lost socket took to be subscribed again.
    Storm {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        /// Where lost sockets reconnect; repeat for several (round robin).
        #[arg(long = "reconnect-url", required = true)]
        reconnect_urls: Vec<String>,
        /// Each lost socket waits a random time up to this before its first attempt.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        jitter: Duration,
        /// Topics the sockets spread over.
        #[arg(long, default_value_t = 100)]
        topics: usize,
    },
    /// Subscribers on the 2nd..last URL, publishers on the first.
    Cluster {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[command(flatten)]
        flow: Flow,
    },
    /// Herald only: N sockets come back at once with a history position
    /// (`?sub=TOPIC&since=EPOCH:SEQ`) and each reads until it has
    /// --expect messages; reports the time until all are caught up and
    /// each server's CPU. --duration bounds the wait.
    Recover {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value = "load:t0")]
        topic: String,
        /// The position the sockets had (EPOCH:SEQ).
        #[arg(long)]
        since: String,
        /// Messages each socket must get.
        #[arg(long)]
        expect: u64,
    },
    /// Internal: one worker process.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        spec: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn split(total: usize, parts: usize, i: usize) -> (usize, usize) {
    let base = total / parts;
    let extra = total % parts;
    let first = i * base + i.min(extra);
    (first, base + usize::from(i < extra))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        if let Scenario::Worker { spec } = &cli.scenario {
            let spec: Spec = serde_json::from_str(spec).context("worker spec")?;
            return worker::run(spec).await;
        }
        if let Scenario::Recover {
            sockets,
            topic,
            since,
            expect,
        } = &cli.scenario
        {
            let c = &cli.common;
            let r = recover::run(
                &c.urls,
                *sockets,
                topic,
                since,
                *expect,
                c.duration,
                &c.server_pids,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if r.caught_up < r.sockets {
                bail!(
                    "{} of {} sockets did not catch up: {:?}",
                    r.sockets - r.caught_up,
                    r.sockets,
                    r.first_error
                );
            }
            return Ok(());
        }
        let report = coordinate(&cli).await?;
        if let Some(path) = &cli.common.html {
            let title = format!("herald-loadgen {} against {}", report.scenario, report.target);
            let page = report::html(&title, &[(report.target.clone(), &report)]);
            std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("herald-loadgen: wrote {}", path.display());
        }
        if cli.common.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        Ok(())
    })
}

async fn coordinate(cli: &Cli) -> anyhow::Result<Report> {
    let mut common = cli.common.clone();
    if let Some(t) = &common.token {
        for u in &mut common.urls {
            let sep = if u.contains('?') { '&' } else { '?' };
            *u = format!("{u}{sep}token={t}");
        }
    }
    let c = &common;
    for u in &c.urls {
        wire::Url::parse(u)?;
    }
    if c.workers == 0 || c.workers > 250 {
        bail!("--workers must be 1..250");
    }
    let (name, kind, subs, topics, flow, concurrency, hold) = match &cli.scenario {
        Scenario::Fanout { subscribers, flow } => (
            "fanout",
            Kind::Pubsub,
            *subscribers,
            1,
            Some(flow.clone()),
            0,
            None,
        ),
        Scenario::Rooms {
            topics,
            subscribers_per_topic,
            flow,
        } => (
            "rooms",
            Kind::Pubsub,
            topics * subscribers_per_topic,
            *topics,
            Some(flow.clone()),
            0,
            None,
        ),
        Scenario::Connect { concurrency } => ("connect", Kind::Connect, 0, 1, None, *concurrency, None),
        Scenario::Idle {
            sockets,
            hold,
            topics,
        } => {
            let topics = if *topics == 0 { *sockets } else { *topics };
            ("idle", Kind::Idle, *sockets, topics, None, 0, Some(*hold))
        }
        Scenario::Storm { sockets, topics, .. } => ("storm", Kind::Storm, *sockets, *topics, None, 0, None),
        Scenario::Cluster { subscribers, flow } => {
            if c.urls.len() < 2 {
                bail!("cluster needs at least two --url (publishers on the first, subscribers on the rest)");
            }
            (
                "cluster",
                Kind::Pubsub,
                *subscribers,
                1,
                Some(flow.clone()),
                0,
                None,
            )
        }
        Scenario::Worker { .. } | Scenario::Recover { .. } => unreachable!("handled in main"),
    };
    let topics = if c.target == Target::WsBroadcast {
        1
    } else {
        topics
    };
    let sub_urls: Vec<usize> = if name == "cluster" {
        (1..c.urls.len()).collect()
    } else {
        (0..c.urls.len()).collect()
    };
    let flow = flow.unwrap_or(Flow {
        publishers: 0,
        rate: 0,
        size: 64,
    });
    let publishers = if kind == Kind::Pubsub { flow.publishers } else { 0 };

    let first_url = wire::Url::parse(&c.urls[0])?;
    let held = if c.patterns > 0 {
        hostile::hold_patterns(&first_url, c.patterns)
            .await
            .context("holding patterns")?
    } else {
        Vec::new()
    };
    let rss_before: u64 = c.server_pids.iter().filter_map(|p| report::rss_kb(*p)).sum();
    let cpu_start: f64 = c.server_pids.iter().filter_map(|p| report::cpu_seconds(*p)).sum();
    let exe = std::env::current_exe()?;
    let spawned = Instant::now();
    let mut children = Vec::new();
    for i in 0..c.workers {
        let (sub_first, sub_count) = split(subs, c.workers, i);
        let (pub_first, pub_count) = split(publishers, c.workers, i);
        let spec = Spec {
            target: c.target,
            urls: c.urls.clone(),
            source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))),
            kind,
            sub_first,
            sub_count,
            pub_first,
            pub_count,
            topics,
            rate: flow.rate,
            size: flow.size.max(32),
            duration_ms: if kind == Kind::Idle {
                0
            } else {
                c.duration.as_millis() as u64
            },
            sub_urls: sub_urls.clone(),
            pub_url: 0,
            concurrency: split(concurrency, c.workers, i).1,
            reconnect_urls: match &cli.scenario {
                Scenario::Storm { reconnect_urls, .. } => reconnect_urls.clone(),
                _ => Vec::new(),
            },
            jitter_ms: match &cli.scenario {
                Scenario::Storm { jitter, .. } => jitter.as_millis() as u64,
                _ => 0,
            },
            shared: c.shared.clone(),
        };
        let child = tokio::process::Command::new(&exe)
            .args(["worker", "--spec", &serde_json::to_string(&spec)?])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        children.push(child);
    }

    // Wait for every worker's sockets.
    let tty = std::io::stderr().is_terminal() && !c.json;
    let mut lines = Vec::new();
    let mut stdins = Vec::new();
    let mut connected = 0u64;
    let mut connect_errors = 0u64;
    for child in children.iter_mut() {
        stdins.push(child.stdin.take().expect("stdin"));
        let mut l = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        loop {
            let line = l
                .next_line()
                .await?
                .context("a worker exited before it was ready")?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(n) = v.get("ready") {
                connected += n.as_u64().unwrap_or(0);
                connect_errors += v["connect_errors"].as_u64().unwrap_or(0);
                if let Some(e) = v["error"].as_str() {
                    eprintln!("connect error (first of {}): {e}", v["connect_errors"]);
                }
                if tty {
                    eprint!("\rconnected {connected} of {subs}   ");
                }
                break;
            }
        }
        lines.push(l);
    }
    if tty {
        eprintln!();
    }
    let connect_ms = spawned.elapsed().as_secs_f64() * 1e3;
    let mut rss_after = 0;
    if kind == Kind::Idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_after = c.server_pids.iter().filter_map(|p| report::rss_kb(*p)).sum();
        if let Some(h) = hold {
            tokio::time::sleep(h).await;
        }
    }
    let churn = if c.churn > 0 {
        Some(
            hostile::Churn::start(&first_url, c.churn)
                .await
                .context("starting the churn")?,
        )
    } else {
        None
    };
    let cpu_before: f64 = c.server_pids.iter().filter_map(|p| report::cpu_seconds(*p)).sum();
    let join_cpu = cpu_before - cpu_start;
    let start_ns = wire::now_ns() + 200_000_000;
    // Scripts that act during the run (a storm's node kill) wait for this.
    eprintln!("herald-loadgen: go, {connected} connected, {connect_errors} failed");
    for s in stdins.iter_mut() {
        s.write_all(format!("go {start_ns}\n").as_bytes()).await?;
        s.flush().await?;
    }
    let started = Instant::now();
    // The broadcast, half a second into the run.
    let broadcast = c.shared.clone().map(|topic| {
        let url = first_url.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_nanos(
                start_ns.saturating_sub(wire::now_ns()) + 500_000_000,
            ))
            .await;
            let mut conn = wire::connect(&url, "", None).await?;
            conn.wr
                .text(format!(r#"{{"op":"pub","topic":"{topic}","data":"broadcast"}}"#).as_bytes());
            let sent = wire::now_ns();
            conn.wr.flush().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            anyhow::Ok((topic, sent))
        })
    });

    // Progress and final reports.
    let delivered = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for (i, mut l) in lines.into_iter().enumerate() {
        let (delivered, published) = (delivered.clone(), published.clone());
        let workers = c.workers as u64;
        readers.push(tokio::spawn(async move {
            let mut last = (0u64, 0u64);
            while let Ok(Some(line)) = l.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(p) = v.get("progress") {
                    let d = p["delivered"].as_u64().unwrap_or(0);
                    let pu = p["published"].as_u64().unwrap_or(0);
                    delivered.fetch_add(d - last.0.min(d), Relaxed);
                    published.fetch_add(pu - last.1.min(pu), Relaxed);
                    last = (d, pu);
                } else if let Some(r) = v.get("report") {
                    let r: WorkerReport = serde_json::from_value(r.clone())?;
                    return anyhow::Ok(r);
                }
            }
            bail!("worker {i} of {workers} ended without a report")
        }));
    }
    // Deliveries (or handshakes) in each second, for the HTML report.
    let timeline = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let sampler = {
        let (d, t) = (delivered.clone(), timeline.clone());
        tokio::spawn(async move {
            let mut prev = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = d.load(Relaxed);
                t.lock().unwrap().push(now - prev.min(now));
                prev = now;
            }
        })
    };
    let ticker = if tty {
        let (d, p) = (delivered.clone(), published.clone());
        Some(tokio::spawn(async move {
            let mut prev = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = d.load(Relaxed);
                eprint!(
                    "\r{:>6.1}s  published {:>10}  delivered {:>12}  {:>10}/s   ",
                    started.elapsed().as_secs_f64(),
                    p.load(Relaxed),
                    now,
                    now - prev
                );
                prev = now;
            }
        }))
    } else {
        None
    };
    let mut reports = Vec::new();
    for r in readers {
        reports.push(r.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    sampler.abort();
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    if kind == Kind::Idle {
        // The node handles the closes after the workers sent them.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let cpu_after: f64 = c.server_pids.iter().filter_map(|p| report::cpu_seconds(*p)).sum();
    let churn_ops = match churn {
        Some(ch) => ch.finish().await.context("the churn")?,
        None => 0,
    };
    drop(held);
    for mut child in children {
        let _ = child.wait().await;
    }

    // Merge.
    let mut latency = new_histogram();
    let mut connect_latency = new_histogram();
    let mut per_topic = vec![0u64; topics];
    let mut out = Report {
        scenario: name.into(),
        target: format!("{:?}", c.target),
        urls: c.urls.clone(),
        workers: c.workers,
        subscribers: subs,
        publishers,
        topics,
        rate_per_publisher: flow.rate,
        size: flow.size.max(32),
        duration_s: c.duration.as_secs_f64(),
        patterns_held: c.patterns,
        churn_sockets: c.churn,
        churn_ops,
        connected,
        connect_errors,
        connect_ms,
        ..Default::default()
    };
    if let Some(b) = broadcast {
        let (topic, sent) = match b.await? {
            Ok(t) => t,
            Err(e) => {
                eprintln!("herald-loadgen: the broadcast was not published: {e:#}");
                (c.shared.clone().unwrap_or_default(), u64::MAX)
            }
        };
        let first = reports
            .iter()
            .map(|r| r.broadcast_first_ns)
            .min()
            .unwrap_or(u64::MAX);
        let last = reports.iter().map(|r| r.broadcast_last_ns).max().unwrap_or(0);
        let ms = |t: u64| t.saturating_sub(sent) as f64 / 1e6;
        let nodes = (0..c.urls.len())
            .map(|i| {
                let of = |k: usize| {
                    reports
                        .iter()
                        .filter_map(move |r| r.broadcast_by_node.get(i).map(|v| v[k]))
                };
                let (first, last) = (of(0).min().unwrap_or(u64::MAX), of(1).max().unwrap_or(0));
                report::NodeHop {
                    reached: of(2).sum(),
                    first_ms: if first == u64::MAX { 0.0 } else { ms(first) },
                    last_ms: ms(last),
                }
            })
            .collect();
        out.broadcast = Some(report::Broadcast {
            topic,
            reached: reports.iter().map(|r| r.broadcast_count).sum(),
            first_ms: if first == u64::MAX { 0.0 } else { ms(first) },
            last_ms: ms(last),
            nodes,
        });
    }
    for r in &reports {
        out.connect_retries += r.connect_retries;
        out.published += r.published;
        out.delivered += r.delivered;
        out.errors += r.errors;
        out.handshakes += r.handshakes;
        r.latency.merge_into(&mut latency);
        r.connect_latency.merge_into(&mut connect_latency);
        out.storm.merge(&r.storm);
        for (t, n) in r.published_per_topic.iter().enumerate() {
            per_topic[t] += n;
        }
    }
    // Subscriber g holds topic g % topics; only connected ones count.
    let mut subs_per_topic = vec![0u64; topics];
    for g in 0..subs {
        subs_per_topic[g % topics] += 1;
    }
    let scale = if subs == 0 {
        0.0
    } else {
        connected as f64 / subs as f64
    };
    out.expected = per_topic
        .iter()
        .zip(&subs_per_topic)
        .map(|(p, s)| (*p as f64 * *s as f64 * scale).round() as u64)
        .sum();
    out.lost = out.expected.saturating_sub(out.delivered);
    let run_s = c.duration.as_secs_f64().max(1e-3);
    // Deliveries per second over the span they took: from the start to the
    // last delivery (a target that falls behind is still delivering after
    // the publishers stop), but never less than the publishing time.
    let last = reports.iter().map(|r| r.last_delivery_ns).max().unwrap_or(0);
    let span_s = (last.saturating_sub(start_ns) as f64 / 1e9).max(run_s);
    out.deliveries_per_sec = out.delivered as f64 / span_s;
    out.latency_us = Percentiles::from(&latency);
    out.per_second = std::mem::take(&mut *timeline.lock().unwrap());
    out.latency_histogram = if latency.is_empty() {
        report::buckets(&connect_latency)
    } else {
        report::buckets(&latency)
    };
    out.handshakes_per_sec = out.handshakes as f64 / run_s;
    out.connect_latency_us = Percentiles::from(&connect_latency);
    let cpu = cpu_after - cpu_before;
    out.server = ServerStats {
        pids: c.server_pids.clone(),
        cpu_seconds: cpu,
        join_cpu_seconds: join_cpu,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        deliveries_per_cpu_second: (cpu > 0.0 && out.delivered > 0).then(|| out.delivered as f64 / cpu),
        cpu_us_per_delivery: (out.delivered > 0 && !c.server_pids.is_empty())
            .then(|| cpu * 1e6 / out.delivered as f64),
        bytes_per_socket: (kind == Kind::Idle && connected > 0 && rss_after > 0)
            .then(|| (rss_after.saturating_sub(rss_before) * 1024) as f64 / connected as f64),
    };
    out.duration_s = elapsed;
    if out.storm.first_loss_ns > 0 && out.storm.last_reconnect_ns > 0 {
        out.storm_recovery_ms = Some(
            out.storm
                .last_reconnect_ns
                .saturating_sub(out.storm.first_loss_ns) as f64
                / 1e6,
        );
    }
    Ok(out)
}
