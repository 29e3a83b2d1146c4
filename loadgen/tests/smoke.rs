//! A short run of every scenario against real `herald` processes: the
//! messages arrive, and the JSON report parses and adds up. No timing is
//! asserted.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

fn bin(name: &str) -> PathBuf {
    let loadgen = PathBuf::from(env!("CARGO_BIN_EXE_herald-loadgen"));
    let p = loadgen.with_file_name(name);
    assert!(
        p.exists(),
        "{} not built (run the workspace's tests)",
        p.display()
    );
    p
}

struct Proc {
    child: Child,
    port: u16,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn herald(extra: &[&str]) -> Proc {
    let mut child = Command::new(bin("herald"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--publish-rate",
            "0",
            "--log-level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("herald");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    Proc { child, port }
}

fn loadgen(urls: &[u16], pid: u32, args: &[&str]) -> Value {
    let mut cmd = Command::new(bin("herald-loadgen"));
    for p in urls {
        cmd.args(["--url", &format!("ws://127.0.0.1:{p}/ws")]);
    }
    let out = cmd
        .args(["--server-pid", &pid.to_string(), "--json", "--duration", "1s"])
        .args(args)
        .output()
        .expect("herald-loadgen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn assert_all_delivered(r: &Value) {
    assert!(r["published"].as_u64().unwrap() > 0, "{r}");
    assert!(r["expected"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["delivered"], r["expected"], "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["latency_us"]["count"], r["delivered"], "{r}");
    assert!(r["server"]["cpu_seconds"].as_f64().unwrap() >= 0.0);
}

#[test]
fn fanout_rooms_connect_idle() {
    let h = herald(&[]);
    let pid = h.child.id();
    let r = loadgen(
        &[h.port],
        pid,
        &["--workers", "2", "fanout", "--subscribers", "50", "--rate", "50"],
    );
    assert_eq!(r["connected"], 50);
    assert_all_delivered(&r);

    let r = loadgen(
        &[h.port],
        pid,
        &[
            "rooms",
            "--topics",
            "5",
            "--subscribers-per-topic",
            "4",
            "--publishers",
            "3",
            "--rate",
            "40",
        ],
    );
    assert_eq!(r["topics"], 5);
    assert_all_delivered(&r);

    let r = loadgen(&[h.port], pid, &["connect", "--concurrency", "4"]);
    assert!(r["handshakes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["connect_latency_us"]["count"], r["handshakes"]);

    let r = loadgen(
        &[h.port],
        pid,
        &["--workers", "2", "idle", "--sockets", "200", "--hold", "0s"],
    );
    assert_eq!(r["connected"], 200, "{r}");
    assert!(r["server"]["rss_after_kb"].as_u64().unwrap() > 0, "{r}");
}

/// A nats-server and two nodes linked by it, both ready.
fn linked_pair() -> (Child, Proc, Proc) {
    let nats_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nats = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &nats_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (apt-get install nats-server)");
    let url = format!("nats://127.0.0.1:{nats_port}");
    let a = herald(&["--nats", &url]);
    let b = herald(&["--nats", &url]);
    // The loadgen subscribes before it publishes: wait until both links
    // are up.
    for p in [a.port, b.port] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !get(p, "/readyz").contains("nats: connected") {
            assert!(std::time::Instant::now() < deadline, "node never linked");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    (nats, a, b)
}

#[test]
fn cluster_scenario_crosses_nodes() {
    let (mut nats, a, b) = linked_pair();
    // Subscribers on b, publisher on a: every delivery crossed NATS.
    let r = loadgen(
        &[a.port, b.port],
        b.child.id(),
        &["cluster", "--subscribers", "20", "--rate", "50"],
    );
    let _ = nats.kill();
    let _ = nats.wait();
    assert_all_delivered(&r);
}

/// `--html` writes a self-contained report carrying its charts' data: the
/// latency histogram and the deliveries of each second.
#[test]
fn html_report_carries_its_charts_data() {
    let h = herald(&[]);
    let path = std::env::temp_dir().join(format!("herald-report-{}.html", std::process::id()));
    let r = loadgen(
        &[h.port],
        h.child.id(),
        &[
            "--html",
            path.to_str().unwrap(),
            "fanout",
            "--subscribers",
            "20",
            "--rate",
            "500",
        ],
    );
    assert_all_delivered(&r);
    let page = std::fs::read_to_string(&path).expect("the report");
    let _ = std::fs::remove_file(&path);
    assert!(!page.contains("__DATA__"));
    for external in ["src=\"http", "href=\"http", "<link", "import("] {
        assert!(!page.contains(external), "self-contained: {external}");
    }
    assert!(page.contains(r#"<svg id="hist""#) && page.contains(r#"<svg id="timeline""#));
    let json = page
        .split(r#"<script id="data" type="application/json">"#)
        .nth(1)
        .and_then(|s| s.split("</script>").next())
        .expect("the data block");
    let data: Value = serde_json::from_str(json).expect("the data is JSON");
    let report = &data["systems"][0]["report"];
    let buckets = report["latency_histogram"].as_array().unwrap();
    let counted: u64 = buckets.iter().map(|b| b[1].as_u64().unwrap()).sum();
    assert_eq!(
        counted,
        report["latency_us"]["count"].as_u64().unwrap(),
        "every latency in a bucket"
    );
    let seconds = report["per_second"].as_array().unwrap();
    assert!(!seconds.is_empty(), "{seconds:?}");
    let per_second: u64 = seconds.iter().map(|v| v.as_u64().unwrap()).sum();
    assert!(per_second > 0 && per_second <= report["delivered"].as_u64().unwrap());
}

/// The million-socket run's code path at 10,000 sockets (what CI can
/// hold): two nodes linked by NATS, two load workers, every socket on its
/// own topic and the shared one; everyone connects, the broadcast reaches
/// every socket, and the per-socket messages all arrive.
#[test]
fn ten_thousand_sockets_on_the_million_path() {
    let (mut nats, a, b) = linked_pair();
    let r = loadgen(
        &[a.port, b.port],
        a.child.id(),
        &[
            "--workers",
            "2",
            "--shared",
            "load:all",
            "rooms",
            "--topics",
            "10000",
            "--subscribers-per-topic",
            "1",
            "--publishers",
            "1",
            "--rate",
            "200",
        ],
    );
    let _ = nats.kill();
    let _ = nats.wait();
    assert_eq!(r["connected"], 10000, "{r}");
    assert_eq!(r["connect_errors"], 0, "{r}");
    assert!(r["connect_ms"].as_f64().unwrap() > 0.0);
    let b = &r["broadcast"];
    assert_eq!(b["reached"], 10000, "the broadcast reached every socket: {b}");
    assert!(b["last_ms"].as_f64().unwrap() >= b["first_ms"].as_f64().unwrap());
    assert_all_delivered(&r);
}
