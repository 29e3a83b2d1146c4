//! The `herald` binary: flag parsing and process plumbing around the
//! `herald_broker` library, and the command-line clients (`cli`).

use std::io::Write;

use clap::{Parser, Subcommand};
use herald_broker::Config;

mod cli;
use cli::Target;

/// Herald: a WebSocket pub/sub broker.
#[derive(Parser)]
#[command(name = "herald", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (embedded mode: no NATS needed).
    Serve(Box<Config>),
    /// Publish to a topic on a running node.
    Pub {
        #[command(flatten)]
        target: Target,
        /// Publish each line of stdin as a JSON string (stream a program's output).
        #[arg(long)]
        lines: bool,
        /// Topic, e.g. todo:count.
        topic: String,
        /// JSON to publish (text that is not JSON is sent as a JSON string).
        data: Option<String>,
    },
    /// Check a running node end to end: subscribe, publish over HTTP, await the delivery.
    Check {
        #[command(flatten)]
        target: Target,
        /// Bearer key for the HTTP publish.
        #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// On a node with token auth: mint a short token for the check's
        /// own topics (herald:check:>) with this HMAC key file.
        #[arg(long)]
        token_key_file: Option<String>,
        /// How long to wait for the delivery.
        #[arg(long, default_value = "10s", value_parser = herald_broker::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Mint a connection token signed with an HMAC key (HS256), for
    /// development and tests only: in production your backend issues
    /// tokens (see docs/operations.md).
    Token(cli::Mint),
    /// Wait, then exit (a preStop hook for images without a shell).
    #[command(hide = true)]
    Sleep {
        #[arg(value_parser = herald_broker::parse_duration)]
        duration: std::time::Duration,
    },
    /// Subscribe to topics on a running node and print deliveries, one per line.
    Sub {
        #[command(flatten)]
        target: Target,
        /// Print only each delivery's data.
        #[arg(long)]
        data_only: bool,
        /// Exit after this many deliveries.
        #[arg(long)]
        count: Option<u64>,
        /// Exit when the connection ends instead of reconnecting (by
        /// default a lost connection, or close 1001/4001/4002, reconnects
        /// with backoff and subscribes again). Exit status: 0 when done,
        /// 1 on an error.
        #[arg(long)]
        once: bool,
        /// Start after this history position (EPOCH:SEQ, as deliveries
        /// carry them): what was published since is replayed first. A
        /// reconnect always recovers from the last position seen.
        #[arg(long, value_parser = parse_since)]
        since: Option<(String, u64)>,
        /// First print each matching topic's latest retained message.
        #[arg(long, conflicts_with = "since")]
        last: bool,
        /// Topics or patterns (todo:*, chat:>).
        #[arg(required = true)]
        topics: Vec<String>,
    },
}

fn parse_since(s: &str) -> Result<(String, u64), String> {
    let p = herald_protocol::position::Position::parse_url(s).map_err(|e| e.to_string())?;
    Ok((p.epoch.to_owned(), p.seq))
}

fn init_logs(config: &Config) {
    use std::io::IsTerminal;
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(config) => {
                init_logs(&config);
                // Refused before the port is bound, so a node that cannot
                // start never prints that it listens: the route table, the
                // key files, the NATS URLs, as the node will read them.
                herald_broker::check(&config)?;
                let listener = herald_broker::bind(config.listen, config.backlog)?;
                let addr = listener.local_addr()?;
                tracing::info!(%addr, "listening");
                // Machine-readable: tests and scripts read the chosen port here.
                println!("herald listening on {addr}");
                let metrics = match config.metrics_listen {
                    Some(m) => {
                        let l = tokio::net::TcpListener::bind(m).await?;
                        println!("herald metrics on {}", l.local_addr()?);
                        Some(l)
                    }
                    None => None,
                };
                std::io::stdout().flush()?;
                Ok(herald_broker::run(listener, metrics, *config, shutdown_signal()).await?)
            }
            Command::Pub {
                target,
                lines,
                topic,
                data,
            } => cli::publish(&target, &topic, data.as_deref(), lines).await,
            Command::Check {
                mut target,
                api_key,
                token_key_file,
                timeout,
            } => {
                if let (Some(key_file), None) = (token_key_file, &target.token) {
                    let grant = vec!["herald:check:>".to_owned()];
                    target.token = Some(cli::mint(&cli::Mint {
                        key_file,
                        sub: Some("herald-check".into()),
                        subscribe: grant.clone(),
                        publish: grant,
                        ttl: std::time::Duration::from_secs(300),
                        aud: std::env::var("HERALD_AUTH_AUDIENCE").ok(),
                        iss: std::env::var("HERALD_AUTH_ISSUER").ok(),
                        kid: None,
                    })?);
                }
                cli::check(&target, api_key.as_deref().filter(|k| !k.is_empty()), timeout).await
            }
            Command::Token(m) => {
                println!("{}", cli::mint(&m)?);
                Ok(())
            }
            Command::Sleep { duration } => {
                tokio::time::sleep(duration).await;
                Ok(())
            }
            Command::Sub {
                target,
                data_only,
                count,
                once,
                since,
                last,
                topics,
            } => {
                let from = cli::Resume {
                    position: since,
                    last,
                };
                cli::subscribe(&target, &topics, data_only, count, once, from).await
            }
        }
    })
}
