//! Admission per client address: how many sockets one address holds
//! (`--max-connections-per-ip`) and how fast it opens them
//! (`--connect-rate-per-ip`), and which address a connection is from when
//! it came through a trusted proxy (`--trusted-proxies`: the PROXY protocol
//! v1/v2, or `X-Forwarded-For`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::TcpStream;

use crate::config::{Cidr, Config};
use crate::rate::RateLimit;
use crate::sync::Lock;

/// Addresses tracked at most; past it, new addresses are refused until the
/// sweep frees entries (a flood from many addresses cannot grow the map).
const MAX_TRACKED: usize = 1 << 20;

#[derive(Default)]
struct Entry {
    conns: u32,
    bucket: RateLimit,
    /// Milliseconds (node clock) of the last handshake, for the sweep.
    last_ms: u64,
}

/// The node's per-address counts.
pub struct Admission {
    table: DashMap<IpAddr, Entry>,
    max_per_ip: u32,
    rate_per_ip: u32,
    /// `--connect-rate`, and its node-wide bucket.
    rate: u32,
    bucket: std::sync::Mutex<RateLimit>,
    trusted: Vec<Cidr>,
}

/// Why a handshake was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum AdmitError {
    /// The address holds `--max-connections-per-ip` sockets.
    TooMany(u32),
    /// The address opened sockets faster than `--connect-rate-per-ip`.
    TooFast(u32),
    /// The node tracks too many addresses.
    Crowded,
}

impl std::fmt::Display for AdmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdmitError::TooMany(n) => write!(
                f,
                "rate_limited: this address holds {n} connections (--max-connections-per-ip)"
            ),
            AdmitError::TooFast(n) => write!(
                f,
                "rate_limited: at most {n} new connections per second per address"
            ),
            AdmitError::Crowded => f.write_str("rate_limited: too many client addresses; retry shortly"),
        }
    }
}

/// One socket counted against its address until dropped.
pub struct AddressSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(mut e) = self.admission.table.get_mut(&self.ip) {
            e.conns = e.conns.saturating_sub(1);
        }
    }
}

impl Admission {
    /// The node's admission settings.
    pub fn new(config: &Config) -> Self {
        Admission {
            table: DashMap::new(),
            max_per_ip: config.max_connections_per_ip,
            rate_per_ip: config.connect_rate_per_ip,
            rate: config.connect_rate,
            bucket: Default::default(),
            trusted: config.trusted_proxies.clone(),
        }
    }

    /// Whether a proxy at `ip` is trusted to name the client.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Takes a token of the node-wide `--connect-rate`: false (with the
    /// rate) when new sockets come faster.
    pub fn paced(&self) -> Result<(), u32> {
        if self.rate == 0 {
            return Ok(());
        }
        let now = crate::clock::now_ms();
        let mut b = self.bucket.locked();
        b.allow(self.rate, now).then_some(()).ok_or(self.rate)
    }

    /// Counts a new socket from `ip`; `Ok(None)` when no per-address limit
    /// is configured (nothing is tracked).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<AddressSlot>, AdmitError> {
        if self.max_per_ip == 0 && self.rate_per_ip == 0 {
            return Ok(None);
        }
        if self.table.len() >= MAX_TRACKED && !self.table.contains_key(&ip) {
            return Err(AdmitError::Crowded);
        }
        let now = crate::clock::now_ms();
        let mut e = self.table.entry(ip).or_default();
        e.last_ms = now;
        if self.max_per_ip > 0 && e.conns >= self.max_per_ip {
            return Err(AdmitError::TooMany(self.max_per_ip));
        }
        if !e.bucket.allow(self.rate_per_ip, now) {
            return Err(AdmitError::TooFast(self.rate_per_ip));
        }
        e.conns += 1;
        Ok(Some(AddressSlot {
            admission: self.clone(),
            ip,
        }))
    }

    /// Forgets addresses that hold no socket and have not connected for
    /// `idle` (their rate bucket has refilled by then).
    pub fn sweep(&self, idle: Duration) {
        let now = crate::clock::now_ms();
        let idle = idle.as_millis() as u64;
        self.table
            .retain(|_, e| e.conns > 0 || now.saturating_sub(e.last_ms) < idle);
    }

    /// The client's address for a request that reached us from `peer`,
    /// given every `X-Forwarded-For` header line in the order received.
    ///
    /// A proxy appends its hop to the end (HAProxy `option forwardfor` adds
    /// a header line after any the client sent), so what the client wrote
    /// comes first and the truth last: the lines are read as one list, right
    /// to left, and the client is the right-most hop that is not itself a
    /// trusted proxy (or the left-most hop, when every one is). A hop that is
    /// not an IP address is refused, never skipped: what lies to its left is
    /// the client's own claim, and falling back to the trusted peer would
    /// hand every client the proxy's address.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Result<IpAddr, BadForwarded> {
        if !self.trusts(peer) {
            return Ok(peer);
        }
        let mut client = peer;
        for hop in forwarded_for.rev().flat_map(|line| line.rsplit(',')) {
            let hop = hop.trim();
            if hop.is_empty() {
                continue; // an empty list element (RFC 9110, 5.6.1)
            }
            let Some(ip) = parse_hop(hop) else {
                return Err(BadForwarded {
                    hop: hop.chars().take(64).collect(),
                });
            };
            if !self.trusts(ip) {
                return Ok(ip);
            }
            client = ip;
        }
        Ok(client)
    }
}

/// An `X-Forwarded-For` from a trusted proxy that names no usable client.
#[derive(Debug, thiserror::Error)]
#[error("X-Forwarded-For names no client address: hop {hop:?} is not an IP address")]
pub struct BadForwarded {
    /// The hop that does not parse (at most 64 characters of it).
    hop: String,
}

/// One hop: an IP address, or one with a port (`1.2.3.4:80`, `[::1]:80`);
/// an IPv4 address mapped into IPv6 counts as the IPv4 one.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))?;
    Some(ip.to_canonical())
}

/// The PROXY protocol v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY protocol v1 or v2 header, if the connection starts with
/// one, and returns the client address it names (`None` for no header, or
/// a v2 LOCAL/unspecified one). Reads exactly the header, so the request
/// that follows is untouched. Call only for trusted peers.
pub async fn read_proxy_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 16];
    let mut seen = 0;
    // Peek until the first bytes tell a header from a request.
    while seen < 16 {
        seen = stream.peek(&mut head).await?;
        if seen == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let v1 = b"PROXY ".starts_with(&head[..seen.min(6)]) || head[..seen].starts_with(b"PROXY ");
        let v2 = V2_SIG.starts_with(&head[..seen.min(12)]) || head[..seen].starts_with(V2_SIG);
        if !v1 && !v2 {
            return Ok(None);
        }
        if seen >= 16 || (v1 && head[..seen].contains(&b'\n')) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if head.starts_with(b"PROXY ") {
        // v1: one line of at most 107 bytes.
        let mut line = Vec::with_capacity(108);
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if line.len() >= 107 {
                return Err(invalid("PROXY v1 line too long"));
            }
            stream.read_exact(&mut byte).await?;
            line.push(byte[0]);
        }
        let text = std::str::from_utf8(&line).map_err(|_| invalid("PROXY v1 line not ASCII"))?;
        let parts: Vec<&str> = text.trim_end().split(' ').collect();
        return match parts.as_slice() {
            ["PROXY", "UNKNOWN", ..] => Ok(None),
            ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
                let ip: IpAddr = src.parse().map_err(|_| invalid("PROXY v1 bad address"))?;
                let port: u16 = sport.parse().map_err(|_| invalid("PROXY v1 bad port"))?;
                Ok(Some(SocketAddr::new(ip, port)))
            }
            _ => Err(invalid("malformed PROXY v1 line")),
        };
    }
    if !head.starts_with(V2_SIG) {
        return Err(invalid("malformed PROXY v2 signature"));
    }
    stream.read_exact(&mut head).await?;
    let (ver_cmd, family) = (head[12], head[13]);
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(invalid("PROXY v2 with a wrong version"));
    }
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await?;
    if ver_cmd & 0xF == 0 {
        return Ok(None); // LOCAL: the proxy's own health check
    }
    match family >> 4 {
        1 if rest.len() >= 12 => {
            let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([rest[8], rest[9]]),
            )))
        }
        2 if rest.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&rest[..16]);
            let port = u16::from_be_bytes([rest[32], rest[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(a).into(), port)))
        }
        _ => Ok(None),
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: u32, rate: u32, trusted: &[&str]) -> Arc<Admission> {
        let c = Config {
            max_connections_per_ip: max,
            connect_rate_per_ip: rate,
            trusted_proxies: trusted.iter().map(|t| Cidr::parse(t).unwrap()).collect(),
            ..Config::default()
        };
        Arc::new(Admission::new(&c))
    }

    #[test]
    fn counts_per_address_until_the_slot_drops() {
        let a = admission(2, 0, &[]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = a.admit(ip).unwrap();
        let _s2 = a.admit(ip).unwrap();
        assert_eq!(a.admit(ip).err(), Some(AdmitError::TooMany(2)));
        assert!(a.admit("10.0.0.2".parse().unwrap()).is_ok(), "another address");
        drop(s1);
        assert!(a.admit(ip).is_ok());
        assert!(
            admission(0, 0, &[]).admit(ip).unwrap().is_none(),
            "no limits: untracked"
        );
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let a = admission(0, 0, &["10.0.0.0/8"]);
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = ["1.2.3.4, 5.6.7.8, 10.0.0.9"];
        assert_eq!(a.client_ip(lb, xff.into_iter()).unwrap(), ip("5.6.7.8"));
        let stranger = ip("9.9.9.9");
        assert_eq!(a.client_ip(stranger, xff.into_iter()).unwrap(), stranger);
        assert_eq!(a.client_ip(lb, [].into_iter()).unwrap(), lb);
        // The client's own line comes first; the proxy's line, last, wins.
        let two = ["127.0.0.1", "203.0.113.7"];
        assert_eq!(a.client_ip(lb, two.into_iter()).unwrap(), ip("203.0.113.7"));
        // A hop that does not parse is refused, not skipped to the peer.
        for bad in [
            ["junk"].as_slice(),
            &["unknown"],
            &["1.2.3.4, unknown"],
            &["127.0.0.1", "unknown"],
        ] {
            let e = a.client_ip(lb, bad.iter().copied()).unwrap_err();
            assert!(
                e.to_string().contains("unknown") || e.to_string().contains("junk"),
                "{e}"
            );
        }
        // Left of the client, anything goes: it is the client's own claim.
        assert_eq!(
            a.client_ip(lb, ["junk, 8.8.8.8"].into_iter()).unwrap(),
            ip("8.8.8.8")
        );
        // Every hop trusted: the left-most is the client.
        assert_eq!(
            a.client_ip(lb, ["10.1.1.1, 10.2.2.2"].into_iter()).unwrap(),
            ip("10.1.1.1")
        );
        assert_eq!(
            a.client_ip(lb, ["[2001:db8::1]:443"].into_iter()).unwrap(),
            ip("2001:db8::1")
        );
        assert_eq!(
            a.client_ip(lb, ["::ffff:198.51.100.9"].into_iter()).unwrap(),
            ip("198.51.100.9")
        );
    }
}
