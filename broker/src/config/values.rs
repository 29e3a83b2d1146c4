//! The value types behind settings that are more than a number or a
//! string: an `--exec` route, an address block (`--trusted-proxies`), a
//! history rule (`--history`), a duration.

use std::net::IpAddr;
use std::time::Duration;

/// An `--exec` route: a URL path and the program (argv) it starts. A path
/// the node serves itself is refused when the node starts, by the route
/// table (`net::routes`), not here: the table is what routes requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRoute {
    /// The URL path, e.g. `/count`.
    pub path: String,
    /// Program and arguments.
    pub argv: Vec<String>,
}

impl ExecRoute {
    /// Parses `PATH=PROGRAM ARGS...`.
    pub fn parse(s: &str) -> Result<ExecRoute, String> {
        let (path, cmd) = Self::split(s)?;
        let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        Ok(ExecRoute { path, argv })
    }

    /// Parses `PATH=COMMAND` to run through `/bin/sh -c`.
    pub fn parse_shell(s: &str) -> Result<ExecRoute, String> {
        let (path, cmd) = Self::split(s)?;
        Ok(ExecRoute {
            path,
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.trim().into()],
        })
    }

    fn split(s: &str) -> Result<(String, &str), String> {
        let (path, cmd) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected PATH=PROGRAM, e.g. /count=./count.sh"))?;
        let path = path.trim();
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            return Err(format!(
                "{path:?}: a path starts with / and has no ?, # or spaces"
            ));
        }
        if cmd.trim().is_empty() {
            return Err(format!("{s:?}: no program"));
        }
        Ok((path.to_owned(), cmd))
    }
}

/// A `--history` rule: the topics matching `pattern` keep their last
/// `count` messages and/or those younger than `age`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The topics it covers.
    pub pattern: String,
    /// Most messages kept per topic.
    pub count: Option<u64>,
    /// Oldest message kept.
    pub age: Option<Duration>,
}

impl Retention {
    /// Parses `PATTERN=COUNT`, `PATTERN=AGE` or `PATTERN=COUNT/AGE`, e.g.
    /// `chat:*=1000/10m`, `orders:>=1h`, `todo:count=1`.
    pub fn parse(s: &str) -> Result<Retention, String> {
        let example = "expected PATTERN=COUNT, PATTERN=AGE or PATTERN=COUNT/AGE, e.g. chat:*=1000/10m";
        let (pattern, spec) = s.split_once('=').ok_or_else(|| format!("{s:?}: {example}"))?;
        let pattern = herald_protocol::Pattern::parse(pattern.trim())
            .map_err(|e| format!("{pattern:?}: {e}"))?
            .as_str()
            .to_owned();
        let (mut count, mut age) = (None, None);
        for part in spec.split('/') {
            let part = part.trim();
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                let n: u64 = part
                    .parse()
                    .map_err(|_| format!("{part:?}: count out of range"))?;
                if n == 0 || count.replace(n).is_some() {
                    return Err(format!("{s:?}: one count of at least 1; {example}"));
                }
            } else {
                let d = parse_duration(part).map_err(|e| format!("{s:?}: {e}; {example}"))?;
                if d < Duration::from_secs(1) || age.replace(d).is_some() {
                    return Err(format!("{s:?}: one age of at least 1s; {example}"));
                }
            }
        }
        Ok(Retention { pattern, count, age })
    }

    /// The first rule in `rules` that covers `topic`.
    pub fn find<'a>(rules: &'a [Retention], topic: &str) -> Option<&'a Retention> {
        rules
            .iter()
            .find(|r| herald_protocol::topic::matches(&r.pattern, topic))
    }
}

/// Parses `250ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `ADDR/BITS` or a bare address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (a, bits) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = if bits.is_empty() {
            max
        } else {
            bits.parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?
        };
        Ok(Cidr { addr, bits })
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, width) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = width - self.bits as u32;
        shift >= width || (a >> shift) == (b >> shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_routes() {
        let r = ExecRoute::parse("/count=./count.sh --to 10").unwrap();
        assert_eq!(r.path, "/count");
        assert_eq!(r.argv, ["./count.sh", "--to", "10"]);
        let r = ExecRoute::parse_shell("/t=tail -f log | grep x").unwrap();
        assert_eq!(r.argv, ["/bin/sh", "-c", "tail -f log | grep x"]);
        for bad in ["count=./x", "/x=", "/x", "/a b=./x", "/a?b=./x"] {
            assert!(ExecRoute::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retention_rules() {
        let r = Retention::parse("chat:*=1000/10m").unwrap();
        assert_eq!(
            (r.pattern.as_str(), r.count, r.age),
            ("chat:*", Some(1000), Some(Duration::from_secs(600)))
        );
        let r = Retention::parse("orders:>=1h").unwrap();
        assert_eq!((r.count, r.age), (None, Some(Duration::from_secs(3600))));
        let r = Retention::parse("todo:count=1").unwrap();
        assert_eq!((r.count, r.age), (Some(1), None));
        assert_eq!(Retention::parse("a=10m/5").unwrap().count, Some(5));
        for bad in [
            "chat:*", "chat:*=", "a..b=1", "a=0", "a=1/2", "a=1m/2m", "a=500ms", "a=ten", "a=1/x",
        ] {
            assert!(Retention::parse(bad).is_err(), "{bad}");
        }
        let rules = [
            Retention::parse("chat:*=1").unwrap(),
            Retention::parse(">=2").unwrap(),
        ];
        assert_eq!(Retention::find(&rules, "chat:x").unwrap().count, Some(1));
        assert_eq!(Retention::find(&rules, "a:b:c").unwrap().count, Some(2));
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }
}
