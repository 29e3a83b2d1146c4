//! Real external servers for cluster tests: `nats-server` and `haproxy`
//! (Debian packages), each on free loopback ports, stopped on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

async fn wait_listening(port: u16, what: &str) {
    eventually(&format!("{what} listening on {port}"), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
}

/// One `nats-server`, optionally part of a cluster.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor: u16,
    pub cluster_port: u16,
    routes: Vec<u16>,
    /// Whether clients learn the other servers' addresses (NATS's default):
    /// off, a client whose server dies is really cut off.
    advertise: bool,
    /// JetStream's file store, when JetStream is on (kept across restarts,
    /// removed on drop).
    store: Option<std::path::PathBuf>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_in_cluster(free_port(), &[]).await
    }

    /// A server with JetStream on, storing in files (`-js -sd DIR`).
    pub async fn start_js() -> NatsServer {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("herald-js-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            monitor: free_port(),
            cluster_port: free_port(),
            routes: Vec::new(),
            advertise: true,
            store: Some(dir),
        };
        s.spawn().await;
        s
    }

    /// A member of a cluster listening for routes on `cluster_port` and
    /// routing to the others' cluster ports.
    pub async fn start_in_cluster(cluster_port: u16, routes: &[u16]) -> NatsServer {
        Self::cluster_member(cluster_port, routes, true).await
    }

    /// A cluster member that does not tell clients of the other servers.
    pub async fn start_in_cluster_unadvertised(cluster_port: u16, routes: &[u16]) -> NatsServer {
        Self::cluster_member(cluster_port, routes, false).await
    }

    async fn cluster_member(cluster_port: u16, routes: &[u16], advertise: bool) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            monitor: free_port(),
            cluster_port,
            routes: routes.to_vec(),
            advertise,
            store: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = &self.store {
            cmd.arg("-js").arg("-sd").arg(dir);
        }
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", "herald-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", self.cluster_port)])
                .args(["--routes", &routes.join(",")]);
            if !self.advertise {
                cmd.arg("--no_advertise");
            }
        }
        self.child = Some(cmd.spawn().expect("nats-server (apt-get install nats-server)"));
        wait_listening(self.port, "nats-server").await;
        wait_listening(self.monitor, "nats-server monitor").await;
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Sends the server `signal` (`STOP`, `CONT`), by PID.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server (SIGKILL, by PID).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Starts it again on the same ports with its JetStream store emptied
    /// (a server whose volume was lost).
    pub async fn restart_empty(&mut self) {
        self.kill();
        if let Some(dir) = &self.store {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.spawn().await;
    }

    /// A monitoring endpoint's JSON (`/subsz`, `/connz?subs=1`, `/routez`).
    pub async fn monitor(&self, path: &str) -> serde_json::Value {
        let addr: SocketAddr = ([127, 0, 0, 1], self.monitor).into();
        let (status, body) = http(
            addr,
            // HTTP/1.0: the answer is never chunked (a chunk size that is
            // all digits would read as JSON).
            format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("monitor JSON: {e}: {body:?}"))
    }

    /// Client connections currently on this server.
    pub async fn connections(&self) -> u64 {
        self.monitor("/connz").await["num_connections"]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.store {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Three clustered `nats-server`s, fully routed.
pub async fn nats_cluster() -> Vec<NatsServer> {
    let ports = [free_port(), free_port(), free_port()];
    let mut servers = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let others: Vec<u16> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| *p)
            .collect();
        servers.push(NatsServer::start_in_cluster(*p, &others).await);
    }
    for s in &servers {
        eventually("NATS routes up", || async {
            s.monitor("/routez").await["num_routes"] == 2
        })
        .await;
    }
    servers
}

/// `haproxy` in front of several nodes: round robin, health-checked on
/// `/readyz`, WebSocket-friendly timeouts.
pub struct Haproxy {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Haproxy {
    pub async fn start(backends: &[SocketAddr]) -> Haproxy {
        Self::start_with(backends, "", "").await
    }

    /// With `server_opts` on every server line (e.g. `send-proxy`) and
    /// `defaults` lines added to the defaults section.
    pub async fn start_with(backends: &[SocketAddr], server_opts: &str, defaults: &str) -> Haproxy {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server h{i} {a} check inter 200ms fall 1 rise 2 {server_opts}\n"))
            .collect();
        let cfg = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\n  retries 3\n  option redispatch\n{defaults}\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (apt-get install haproxy)");
        wait_listening(port, "haproxy").await;
        // Let the first health checks pass.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Haproxy { child, port, dir }
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?{query}", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
