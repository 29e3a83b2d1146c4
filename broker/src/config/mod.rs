//! Node settings: every one a `herald serve` flag with a `HERALD_*`
//! environment variable, so a container can be configured without a file.
//!
//! Uses: nothing of the crate.
//!
//! - [`values`]: setting values that are more than a number or a string
//!   (an `--exec` route, an address block).

pub(crate) mod values;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use herald_protocol::Pattern;

pub use crate::config::values::{parse_duration, Cidr, ExecRoute, Retention};

/// Settings of one node. `Config::default()` is the embedded default that
/// `herald serve` runs with no flags.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on for WebSocket and HTTP (port 0 picks a free port;
    /// the chosen address is printed on stdout).
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A second address serving only /metrics, /healthz and /readyz (e.g.
    /// 0.0.0.0:9090), so a public port never exposes metrics. When set, the
    /// main listener answers /metrics with 404.
    #[arg(long, env = "HERALD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Listen backlog: how many handshakes may wait for accept during a
    /// connection storm (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "HERALD_BACKLOG", default_value_t = 4096)]
    pub backlog: u32,

    /// Largest WebSocket message or published `data`, in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most subscriptions one socket may hold.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 256)]
    pub max_subscriptions: usize,

    /// Most `sub`, `unsub`, `auth` and `refresh` requests per second one
    /// socket may make (burst of the same size); 0 = no limit. Bounds
    /// join/leave notice floods.
    #[arg(long, env = "HERALD_SUBSCRIBE_RATE", default_value_t = 100)]
    pub subscribe_rate: u32,

    /// Most distinct wildcard patterns the node holds; a `sub` that would
    /// add one more is refused with `pattern_limit`.
    #[arg(long, env = "HERALD_MAX_PATTERNS", default_value_t = 10_000)]
    pub max_patterns: usize,

    /// Most publishes per second one socket may make (burst of the same size,
    /// at most 65,534); 0 = no limit.
    #[arg(long, env = "HERALD_PUBLISH_RATE", default_value_t = 1000)]
    pub publish_rate: u32,

    /// Most `presence` and `presence_stats` requests per second one socket
    /// may make (burst of the same size); 0 = no limit. Each answer is a
    /// member list (up to `--presence-max-members`), so it has its own
    /// budget, smaller than a publish's.
    #[arg(long, env = "HERALD_PRESENCE_RATE", default_value_t = 20)]
    pub presence_rate: u32,

    /// Most WebSocket connections this node holds at once.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Time a client has to send its HTTP request headers (e.g. 10s, 500ms).
    #[arg(long, env = "HERALD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time a client has to send a whole HTTP request body (a publish).
    #[arg(long, env = "HERALD_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Most TCP connections not yet upgraded to WebSockets (handshakes and
    /// HTTP requests in progress); past it new ones get 503 `overloaded`.
    #[arg(long, env = "HERALD_MAX_PENDING_CONNECTIONS", default_value_t = 1024)]
    pub max_pending_connections: usize,

    /// How often the node pings each socket; a socket from which nothing (not
    /// even a pong) arrived for two whole intervals is closed with 4002.
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A text frame equal to this word is answered at once with the same word
    /// (the common browser heartbeat); never published.
    #[arg(long, env = "HERALD_HEARTBEAT_WORD", default_value = "HeartBeat")]
    pub heartbeat_word: String,

    /// Bytes that may wait in one socket's outbound queue; past it the socket
    /// is closed with 4001 slow_consumer so it never delays anyone else.
    #[arg(long, env = "HERALD_MAX_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_queue_bytes: usize,

    /// A write to a socket that makes no progress for this long cuts the
    /// socket (a client that stopped reading holds no memory for longer).
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Once a socket is closing, what it still owes (queued frames when the
    /// close flushes, then the close frame) must be sent within this; then
    /// the TCP connection is reset.
    #[arg(long, env = "HERALD_CLOSE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub close_timeout: Duration,

    /// Topic patterns whose subscribers get join/leave notices (repeat the
    /// flag or separate with commas), e.g. 'chat:*'.
    #[arg(long = "presence", env = "HERALD_PRESENCE", value_delimiter = ',', value_parser = parse_pattern)]
    pub presence: Vec<String>,

    /// History: topics matching a pattern keep their last messages, so a
    /// client that reconnects with its last position (`since`) gets what
    /// it missed, and `last` gets the current value. `PATTERN=COUNT`,
    /// `PATTERN=AGE` or `PATTERN=COUNT/AGE`, repeated or comma-separated,
    /// e.g. 'chat:*=1000/10m,orders:>=1h'. Embedded nodes keep it in
    /// memory; linked nodes in a NATS JetStream stream.
    #[arg(long = "history", env = "HERALD_HISTORY", value_delimiter = ',', value_parser = Retention::parse)]
    pub history: Vec<Retention>,

    /// Most bytes of history kept: in memory on an embedded node (oldest
    /// messages go first), the stream's size in a cluster.
    #[arg(long, env = "HERALD_HISTORY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub history_bytes: u64,

    /// Copies of the history stream the NATS cluster keeps (1, 3 or 5).
    #[arg(long, env = "HERALD_HISTORY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub history_replicas: u8,

    /// Cluster: bytes of the history stream's latest messages each node
    /// also keeps in memory, so recoveries of the last minutes (a killed
    /// node's clients coming back) are served without reading the stream;
    /// 0 reads the stream for every recovery.
    #[arg(long, env = "HERALD_HISTORY_TAIL_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub history_tail_bytes: u64,

    /// Name of the JetStream stream that holds the history (created or
    /// updated at start).
    #[arg(long, env = "HERALD_HISTORY_STREAM", default_value = "HERALD", value_parser = parse_stream)]
    pub history_stream: String,

    /// Most messages one recovery replays; past it the ack says
    /// `recovered:false`, `too_many`, and the client reloads.
    #[arg(long, env = "HERALD_MAX_REPLAY", default_value_t = 10_000)]
    pub max_replay: usize,

    /// Raw-mode topics (patterns, comma-separated) that keep the classic
    /// chat server's status: a JSON object a raw socket sends is published
    /// with `"status":1`, and when the socket goes away (for any reason)
    /// its last object is published again with `"status":0`.
    #[arg(long, env = "HERALD_RAW_STATUS", value_delimiter = ',', value_parser = parse_pattern)]
    pub raw_status: Vec<String>,

    /// Presence notices and counts per socket (`client`, the default) or
    /// per user (`user`: a user's first socket joins, its last one leaves;
    /// sockets without a token count as their own user).
    #[arg(long, env = "HERALD_PRESENCE_BY", default_value = "client", value_parser = ["client", "user"])]
    pub presence_by: String,

    /// Most members a presence answer lists; past it the answer says
    /// `"truncated":true` and still gives the true counts.
    #[arg(long, env = "HERALD_PRESENCE_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_max_members: usize,

    /// A node not heard from for this long (killed, or cut off from NATS)
    /// has its members removed, with leave notices from the other nodes.
    #[arg(long, env = "HERALD_PRESENCE_TTL", default_value = "15s", value_parser = parse_duration)]
    pub presence_ttl: Duration,

    /// Origins whose pages may open WebSockets (comma-separated): exact
    /// (`https://app.example.com`), a subdomain wildcard
    /// (`https://*.example.com`), `null` (sandboxed pages and files), or `*`
    /// for any. Empty: a page may connect only from the node's own host.
    /// Clients that send no Origin (not browsers) are always let in.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// A WebSocket opened on `/` with no parameters becomes a raw-mode
    /// socket on this topic, so a page written for a plain broadcast server
    /// (`new WebSocket("ws://host:8080")`) works with its URL unchanged.
    #[arg(long, env = "HERALD_ROOT_TOPIC", value_parser = parse_topic)]
    pub root_topic: Option<String>,

    /// Connection tokens (JWT) signed with this HMAC secret (HS256/384/512;
    /// at least 32 bytes, surrounding whitespace ignored). Any `--auth-*`
    /// key turns access control on.
    #[arg(long, env = "HERALD_AUTH_HMAC_KEY_FILE")]
    pub auth_hmac_key_file: Option<String>,

    /// Connection tokens signed with the private half of this PEM public key
    /// (RSA: RS256/384/512 and PS256/384/512; EC: ES256/384; Ed25519: EdDSA).
    #[arg(long, env = "HERALD_AUTH_PUBLIC_KEY_FILE")]
    pub auth_public_key_file: Option<String>,

    /// Connection tokens checked against this JWKS (keys chosen by the
    /// token's `kid`); re-read on SIGHUP, so keys rotate without a restart.
    #[arg(long, env = "HERALD_AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<String>,

    /// When set, a token's `aud` must include this.
    #[arg(long, env = "HERALD_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// When set, a token's `iss` must be this.
    #[arg(long, env = "HERALD_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    #[arg(long, env = "HERALD_AUTH_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub auth_leeway: Duration,

    /// With access control on: patterns a socket (or HTTP publish) without a
    /// token may subscribe within (comma-separated; default none).
    #[arg(long, env = "HERALD_ANONYMOUS_SUBSCRIBE", value_delimiter = ',', value_parser = parse_pattern)]
    pub anonymous_subscribe: Vec<String>,

    /// With access control on: patterns whose topics a client without a
    /// token may publish to (default none).
    #[arg(long, env = "HERALD_ANONYMOUS_PUBLISH", value_delimiter = ',', value_parser = parse_pattern)]
    pub anonymous_publish: Vec<String>,

    /// Most WebSocket connections from one client address; 0 = no limit.
    /// Past it a handshake gets 429 `rate_limited`.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,

    /// Most new WebSocket connections per second on this node, from all
    /// addresses together (burst of the same size); 0 = no limit. Past it:
    /// 503 `overloaded` with Retry-After. Spreads a reconnect storm (a node
    /// of the cluster died) so the sockets already held keep their latency.
    #[arg(long, env = "HERALD_CONNECT_RATE", default_value_t = 0)]
    pub connect_rate: u32,

    /// Most new WebSocket connections per second from one client address
    /// (burst of the same size); 0 = no limit. Past it: 429 with Retry-After.
    #[arg(long, env = "HERALD_CONNECT_RATE_PER_IP", default_value_t = 0)]
    pub connect_rate_per_ip: u32,

    /// Proxies (CIDRs, comma-separated, e.g. 10.0.0.0/8,127.0.0.1) whose
    /// connections carry the client's address: in a PROXY protocol v1/v2
    /// header, or else in X-Forwarded-For (the right-most untrusted hop).
    #[arg(long, env = "HERALD_TRUSTED_PROXIES", value_delimiter = ',', value_parser = Cidr::parse)]
    pub trusted_proxies: Vec<Cidr>,

    /// websocketd mode: `PATH=PROGRAM ARGS...` (repeat the flag, or put
    /// one route a line in the variable). Each WebSocket to PATH starts PROGRAM (split on whitespace,
    /// never run through a shell): its stdout lines become text messages,
    /// client messages become stdin lines. Trusted programs only. A path
    /// the node serves itself (/ws, /v1/history, /status, ...) is refused
    /// at start.
    #[arg(long = "exec", env = "HERALD_EXEC", value_delimiter = '\n', value_parser = ExecRoute::parse)]
    pub exec: Vec<ExecRoute>,

    /// Like --exec, but `PATH=COMMAND` runs through `/bin/sh -c COMMAND`
    /// (pipes, redirections): the shell is used only when asked for here.
    #[arg(long = "exec-shell", env = "HERALD_EXEC_SHELL", value_delimiter = '\n', value_parser = ExecRoute::parse_shell)]
    pub exec_shell: Vec<ExecRoute>,

    /// Most --exec programs running at once; past it a handshake gets 503
    /// `exec_limit`.
    #[arg(long, env = "HERALD_EXEC_MAX_PROCESSES", default_value_t = 256)]
    pub exec_max_processes: usize,

    /// When an --exec socket closes, its program gets SIGTERM, then SIGKILL
    /// after this.
    #[arg(long, env = "HERALD_EXEC_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub exec_grace: Duration,

    /// NATS server URL(s), comma-separated, linking this node to the others
    /// (cluster mode). Without it the node runs embedded, on its own.
    #[arg(long = "nats", env = "HERALD_NATS_URL", value_delimiter = ',')]
    pub nats: Vec<String>,

    /// NATS user for the cluster link (with --nats-password).
    #[arg(long, env = "HERALD_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password for the cluster link.
    #[arg(long, env = "HERALD_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// PEM file of the CA that signed the NATS servers' certificates: the
    /// link then requires TLS.
    #[arg(long, env = "HERALD_NATS_TLS_CA")]
    pub nats_tls_ca: Option<String>,

    /// Subject prefix on NATS: topic `chat:lobby` is subject `herald.chat.lobby`.
    #[arg(long, env = "HERALD_NATS_PREFIX", default_value = "herald", value_parser = parse_prefix)]
    pub nats_prefix: String,

    /// Bearer key required by POST /v1/publish (no key and no `--auth-*`
    /// key: open; empty: no key).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// A file of API keys, one a line (blank lines and `#` comments
    /// skipped), each accepted like `--api-key`: rotate by adding the new
    /// key, moving clients, then removing the old one.
    #[arg(long, env = "HERALD_API_KEY_FILE")]
    pub api_key_file: Option<String>,

    /// Key for the status page (`/status`, `?key=` or a bearer), then
    /// asked of every client, loopback included; without it the page
    /// answers loopback clients only.
    #[arg(long, env = "HERALD_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Largest HTTP publish body (a batch), in bytes.
    #[arg(long, env = "HERALD_MAX_HTTP_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_http_body_bytes: usize,

    /// On SIGTERM/SIGINT, sockets are closed with 1001 spread over this period
    /// so clients do not all reconnect at the same instant.
    #[arg(long, env = "HERALD_DRAIN_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub drain_period: Duration,

    /// Serve the demo page at / and the browser client at /herald.js.
    #[arg(long, env = "HERALD_DEMO", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo: bool,

    /// Log format: text or json.
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "HERALD_LOG_LEVEL", default_value = "info")]
    pub log_level: tracing::Level,
}

impl Default for Config {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        Wrapper::parse_from(["herald"]).config
    }
}

fn parse_stream(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: a stream name is 1 to 64 of A-Z a-z 0-9 _ -"))
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a prefix is dot-separated tokens of A-Z a-z 0-9 _ -"
        ))
    }
}

fn parse_topic(s: &str) -> Result<String, String> {
    herald_protocol::Topic::parse(s)
        .map(|t| t.as_str().to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

fn parse_pattern(s: &str) -> Result<String, String> {
    Pattern::parse(s)
        .map(|p| p.as_str().to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn default_is_the_embedded_node() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.heartbeat_word, "HeartBeat");
        assert!(c.presence.is_empty());
    }
}
