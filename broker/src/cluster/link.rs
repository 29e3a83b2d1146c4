//! The cluster link's NATS client connection (JetStream, the status
//! page's samples): server addresses, credentials, TLS, reconnecting for
//! ever; and how the link proves itself, for both of its connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::rustls;
use bytes::{Buf, BytesMut};
use herald_protocol::nats::{self, Decoded, Limits, ServerOp};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long the server may take to greet, or to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest line the server may send.
pub const MAX_LINE: usize = 64 * 1024;
/// What the link reads from the server: lines up to [`MAX_LINE`],
/// messages up to NATS's own max_payload ceiling (64 MiB); a size past any
/// a server could allow is a broken stream, not a buffer to grow for.
pub const LIMITS: Limits = Limits {
    max_line: MAX_LINE,
    max_payload: nats::MAX_PAYLOAD,
};

/// The link's byte stream, plain or TLS.
pub type Io = Pin<Box<dyn AsyncReadWrite>>;
/// What [`Io`] can do.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// Why the cluster link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A `--nats` URL that is not a server address.
    #[error("--nats {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The NATS client refused its options.
    #[error("NATS link: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// How the link proves itself to NATS: a user and password, and the CA
/// that signed the servers' TLS certificates (TLS is then required).
#[derive(Debug, Default, Clone)]
pub struct LinkAuth {
    /// NATS user.
    pub user: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// PEM file of the CA to trust.
    pub tls_ca: Option<String>,
}

/// Where the link connects and what its subjects start with.
#[derive(Debug, Default, Clone)]
pub struct LinkSettings {
    /// The NATS servers (`nats://host:port`).
    pub urls: Vec<String>,
    /// The subject prefix topics map under (`herald` by default).
    pub prefix: String,
    /// Credentials and TLS.
    pub auth: LinkAuth,
}

/// Connects to NATS at `urls` (in the background: returns at once, and
/// connects and reconnects for ever). This connection carries JetStream
/// and the status page's samples; topic traffic has its own, which the
/// link's metrics count ([`crate::cluster::natsio`]).
pub async fn connect(urls: &[String], auth: &LinkAuth) -> Result<async_nats::Client, LinkError> {
    let addrs = urls
        .iter()
        .map(|u| {
            u.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| LinkError::Url {
                    url: u.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    let client = options
        .name("herald")
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| Duration::from_millis((100 * attempts as u64).min(1000)))
        .event_callback(|event| async move {
            tracing::info!(event = %event, "NATS client event (JetStream, status)");
        })
        .connect(addrs)
        .await?;
    Ok(client)
}

/// A server to connect to, from a `--nats` URL.
#[derive(Debug, Clone)]
pub struct Server {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `tls://`: TLS required.
    pub tls: bool,
    /// User, from `LinkAuth` or the URL.
    pub user: Option<String>,
    /// Password.
    pub pass: Option<String>,
}

/// The server a `--nats` URL names, with the credentials to use there.
pub fn server(url: &str, auth: &LinkAuth) -> Result<Server, LinkError> {
    let addr = url
        .trim()
        .parse::<async_nats::ServerAddr>()
        .map_err(|e| LinkError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Server {
        host: addr.host().to_owned(),
        port: addr.port(),
        tls: addr.tls_required(),
        user: auth.user.clone().or_else(|| addr.username().map(str::to_owned)),
        pass: auth
            .password
            .clone()
            .or_else(|| addr.password().map(str::to_owned)),
    })
}

/// A TLS client trusting only the CA certificates in PEM file `ca`.
pub fn tls_config(ca: &str) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{ca}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{ca}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{ca}: no certificate"));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Connects to `s` for the link's topic traffic: TCP (and TLS with
/// `tls`, which a `tls://` URL or the server's INFO requires), INFO,
/// CONNECT (`echo:false`, headers, credentials), and a PING answered.
/// Returns the connection, what arrived after the answer, and the largest
/// message (headers and payload) the server takes (its INFO's
/// `max_payload`).
pub async fn dial(s: &Server, tls: Option<&Arc<rustls::ClientConfig>>) -> io::Result<(Io, BytesMut, usize)> {
    let tcp = tokio::time::timeout(
        ANSWER_TIMEOUT,
        tokio::net::TcpStream::connect((s.host.as_str(), s.port)),
    )
    .await
    .map_err(|_| io::Error::other("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut tcp = tcp;
    let mut buf = BytesMut::with_capacity(4096);
    let info = next_op(&mut tcp, &mut buf, |op| match op {
        ServerOp::Info(json) => serde_json::from_str::<serde_json::Value>(json).map_err(io::Error::other),
        op => {
            let line = op.to_string();
            Err(io::Error::other(format!("expected INFO, got {line:?}")))
        }
    });
    let info = tokio::time::timeout(ANSWER_TIMEOUT, info)
        .await
        .map_err(|_| io::Error::other("no INFO"))???;
    let server_tls = info["tls_required"].as_bool().unwrap_or(false);
    // NATS's default when a server does not say.
    let max_payload = info["max_payload"].as_u64().unwrap_or(1 << 20) as usize;
    let mut io: Io = if s.tls || server_tls || tls.is_some() {
        let config = match tls {
            Some(c) => c.clone(),
            None => return Err(io::Error::other("the server requires TLS: set --nats-tls-ca")),
        };
        let name = rustls::pki_types::ServerName::try_from(s.host.clone()).map_err(io::Error::other)?;
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        let tls = tokio::time::timeout(ANSWER_TIMEOUT, tls)
            .await
            .map_err(|_| io::Error::other("TLS handshake timed out"))??;
        Box::pin(tls)
    } else {
        Box::pin(tcp)
    };
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "name": "herald", "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"), "protocol": 1, "echo": false,
        "headers": true, "no_responders": true,
        "tls_required": tls.is_some(),
    });
    if let (Some(u), Some(p)) = (&s.user, &s.pass) {
        connect["user"] = u.as_str().into();
        connect["pass"] = p.as_str().into();
    }
    let mut hello = BytesMut::new();
    nats::connect(&mut hello, &connect.to_string()).map_err(io::Error::other)?;
    nats::ping(&mut hello);
    io.write_all(&hello).await?;
    loop {
        let answer = next_op(&mut io, &mut buf, |op| match op {
            ServerOp::Pong => Ok(true),
            ServerOp::Ok | ServerOp::Info(_) => Ok(false),
            op => Err(io::Error::other(format!("NATS refused the connection: {op}"))),
        });
        let pong = tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| io::Error::other("no answer to CONNECT"))???;
        if pong {
            break;
        }
    }
    Ok((io, buf, max_payload))
}

/// Reads until `buf` starts with a whole operation, and consumes it with
/// `take`.
async fn next_op<R: AsyncRead + Unpin, T>(
    io: &mut R,
    buf: &mut BytesMut,
    take: impl FnOnce(ServerOp<'_>) -> T,
) -> io::Result<T> {
    loop {
        match nats::decode(buf, &LIMITS) {
            Ok(Decoded::Op { op, len }) => {
                let taken = take(op);
                buf.advance(len);
                return Ok(taken);
            }
            Ok(Decoded::Incomplete { .. }) => {}
            Err(e) => return Err(io::Error::other(format!("bad input from NATS: {e}"))),
        }
        if io.read_buf(buf).await? == 0 {
            return Err(io::Error::other("closed by the server"));
        }
    }
}
