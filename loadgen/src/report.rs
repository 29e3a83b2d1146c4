//! Histograms, per-worker reports, and the merged report (table or JSON).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// A histogram as (value, count) pairs, for sending between processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Hist(pub Vec<(u64, u64)>);

impl From<&Histogram<u64>> for Hist {
    fn from(h: &Histogram<u64>) -> Self {
        Hist(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }
}

impl Hist {
    pub fn merge_into(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            let _ = h.record_n(v.max(1), n);
        }
    }
}

/// What one worker measured.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub connected: u64,
    pub connect_errors: u64,
    /// Handshakes answered 503 (a node shedding a storm) and tried again.
    #[serde(default)]
    pub connect_retries: u64,
    pub published: u64,
    pub published_per_topic: Vec<u64>,
    pub delivered: u64,
    pub errors: u64,
    pub handshakes: u64,
    /// When the last delivery arrived (ns since the epoch), so throughput is
    /// counted over the time deliveries actually took.
    pub last_delivery_ns: u64,
    pub latency: Hist,
    pub connect_latency: Hist,
    #[serde(default)]
    pub storm: crate::storm::StormReport,
    /// The `--shared` broadcast: when its first and last copy arrived (ns
    /// since the epoch; first is `u64::MAX` when none did), and how many.
    #[serde(default)]
    pub broadcast_first_ns: u64,
    #[serde(default)]
    pub broadcast_last_ns: u64,
    #[serde(default)]
    pub broadcast_count: u64,
    /// The same per `--url` (node): first, last, count.
    #[serde(default)]
    pub broadcast_by_node: Vec<[u64; 3]>,
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    /// `p50 .. p90 .. p99 .. p99.9 .. max ..` for the human table.
    fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {}",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}

impl From<&Histogram<u64>> for Percentiles {
    fn from(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Server-side figures read from `/proc`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ServerStats {
    pub pids: Vec<u32>,
    pub cpu_seconds: f64,
    /// Server CPU while the sockets connected and subscribed (idle: the
    /// join cost; `cpu_seconds` is then the leave cost).
    pub join_cpu_seconds: f64,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
    pub deliveries_per_cpu_second: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    pub bytes_per_socket: Option<f64>,
}

/// One message on the `--shared` topic, published once everyone is
/// connected: how long it took to reach the first and the last socket.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Broadcast {
    pub topic: String,
    /// Sockets it reached.
    pub reached: u64,
    /// From its publish to its first and last delivery.
    pub first_ms: f64,
    pub last_ms: f64,
    /// The same on each node (by `--url`): where the time goes, hop by
    /// hop. A node's first delivery comes after NATS handed it the
    /// message; its first to last is its own fan-out.
    pub nodes: Vec<NodeHop>,
}

/// One node's share of a broadcast.
#[derive(Debug, Default, Clone, Serialize)]
pub struct NodeHop {
    /// Sockets it reached there.
    pub reached: u64,
    /// From the publish to the node's first and last delivery.
    pub first_ms: f64,
    pub last_ms: f64,
}

/// The merged result of a run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub urls: Vec<String>,
    pub workers: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub topics: usize,
    pub rate_per_publisher: u64,
    pub size: usize,
    pub duration_s: f64,
    /// Wildcard patterns held beside the scenario (`--patterns`).
    pub patterns_held: usize,
    /// Sockets churning sub/unsub beside the scenario (`--churn`).
    pub churn_sockets: usize,
    /// Sub/unsub requests the node answered for them.
    pub churn_ops: u64,
    pub connected: u64,
    pub connect_errors: u64,
    /// Handshakes answered 503 (a node shedding a storm) and tried again.
    pub connect_retries: u64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub deliveries_per_sec: f64,
    pub latency_us: Percentiles,
    pub handshakes: u64,
    pub handshakes_per_sec: f64,
    pub connect_latency_us: Percentiles,
    pub errors: u64,
    pub server: ServerStats,
    /// The storm scenario's reconnects.
    pub storm: crate::storm::StormReport,
    /// From starting the workers to every socket connected and subscribed.
    pub connect_ms: f64,
    /// The `--shared` broadcast, when asked for.
    pub broadcast: Option<Broadcast>,
    /// Milliseconds from the first lost socket to the last one subscribed
    /// again (storm).
    pub storm_recovery_ms: Option<f64>,
    /// Deliveries (handshakes in the connect scenario) in each second of
    /// the run, for the HTML report's time line.
    pub per_second: Vec<u64>,
    /// The latency histogram (the connect latency in the connect scenario)
    /// as (upper bound µs, count) in doubling buckets.
    pub latency_histogram: Vec<(u64, u64)>,
}

/// Doubling buckets of a histogram: (upper bound, count).
pub fn buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_log(1, 2.0)
        .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
        .collect()
}

/// The self-contained HTML report: `systems` are (name, report) pairs drawn
/// side by side, a latency histogram and a per-second time line each.
pub fn html(title: &str, systems: &[(String, &Report)]) -> String {
    let data = serde_json::json!({
        "title": title,
        "systems": systems.iter().map(|(n, r)| serde_json::json!({"name": n, "report": r})).collect::<Vec<_>>(),
    });
    // Inside <script>: no "</" may end it early.
    let data = data.to_string().replace("</", "<\\/");
    include_str!("report.html")
        .replace("__TITLE__", &title.replace('<', "&lt;"))
        .replace("__DATA__", &data)
}

fn ms(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            (
                "scenario".into(),
                format!(
                    "{} against {} ({})",
                    self.scenario,
                    self.target,
                    self.urls.join(", ")
                ),
            ),
            ("workers".into(), self.workers.to_string()),
        ];
        let mut add = |k: &str, v: String| rows.push((k.to_owned(), v));
        if self.scenario == "connect" {
            add(
                "handshakes",
                format!("{} ({:.0}/s)", self.handshakes, self.handshakes_per_sec),
            );
            let l = &self.connect_latency_us;
            add("open+subscribe+close", l.line());
            add("errors", self.errors.to_string());
        } else if self.scenario == "storm" {
            add(
                "sockets",
                format!("{} connected, {} failed", self.connected, self.connect_errors),
            );
            let st = &self.storm;
            add("lost", st.lost.to_string());
            add("subscribed again", st.reconnected.to_string());
            add("failed attempts", st.failed_attempts.to_string());
            if let Some(f) = &st.first_failure {
                add("first failure", f.clone());
            }
            if let Some(ms) = self.storm_recovery_ms {
                add(
                    "recovery",
                    format!("{ms:.0} ms from the first loss to the last resubscribe"),
                );
            }
        } else if self.scenario == "idle" {
            add(
                "sockets",
                format!("{} connected, {} failed", self.connected, self.connect_errors),
            );
            add(
                "server RSS",
                format!(
                    "{} KiB -> {} KiB",
                    self.server.rss_before_kb, self.server.rss_after_kb
                ),
            );
            if let Some(b) = self.server.bytes_per_socket {
                add("per socket", format!("{:.0} bytes", b));
            }
            if !self.server.pids.is_empty() {
                add("topics", self.topics.to_string());
                add(
                    "join CPU",
                    format!("{:.3} s (connect and subscribe)", self.server.join_cpu_seconds),
                );
                add("leave CPU", format!("{:.3} s (close)", self.server.cpu_seconds));
            }
        } else {
            add(
                "shape",
                format!(
                    "{} subscribers, {} publishers, {} topics, {} B payload, rate {}",
                    self.subscribers,
                    self.publishers,
                    self.topics,
                    self.size,
                    if self.rate_per_publisher == 0 {
                        "flat out".to_owned()
                    } else {
                        format!("{}/s per publisher", self.rate_per_publisher)
                    }
                ),
            );
            add(
                "connected",
                format!("{} ({} failed)", self.connected, self.connect_errors),
            );
            add("published", self.published.to_string());
            add(
                "delivered",
                format!(
                    "{} of {} expected ({} lost)",
                    self.delivered, self.expected, self.lost
                ),
            );
            add("deliveries/s", format!("{:.0}", self.deliveries_per_sec));
            let l = &self.latency_us;
            add("latency", l.line());
            if !self.server.pids.is_empty() {
                add("server CPU", format!("{:.2} s", self.server.cpu_seconds));
                if let Some(d) = self.server.deliveries_per_cpu_second {
                    add("deliveries per CPU-second", format!("{d:.0}"));
                }
                if let Some(us) = self.server.cpu_us_per_delivery {
                    add("server CPU per delivery", format!("{us:.3} µs"));
                }
            }
            add("errors", self.errors.to_string());
        }
        if self.patterns_held > 0 {
            add("patterns held", self.patterns_held.to_string());
        }
        if self.churn_sockets > 0 {
            add(
                "churn",
                format!(
                    "{} sockets, {} sub/unsub answered",
                    self.churn_sockets, self.churn_ops
                ),
            );
        }
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter().map(|(k, v)| format!("{k:>w$}  {v}\n")).collect()
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // Linux reports these in USER_HZ, 100 per second on every mainstream build.
    Some((utime + stime) / 100.0)
}

/// Resident set size in KiB, from `/proc/PID/status`.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
