//! `ws://` URLs, as the command-line client and the load generator take
//! them: an authority to connect to, and the request target to ask for.

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `ws://...` (`wss://` needs TLS, which these clients do not speak).
    #[error("{0:?}: only ws:// URLs are supported")]
    Scheme(String),
    /// No host after the scheme.
    #[error("{0:?}: no host")]
    NoHost(String),
    /// A port that is not a number from 1 to 65535.
    #[error("{0:?}: bad port")]
    Port(String),
}

/// A parsed `ws://host[:port][/path][?query]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `host:port` as written (the `Host` header).
    pub authority: String,
    /// The host alone, without brackets around an IPv6 address.
    pub host: String,
    /// The port (80 when the URL gives none).
    pub port: u16,
    /// The request target: path and query, `/` when the URL has none.
    pub target: String,
}

impl WsUrl {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<WsUrl, UrlError> {
        let rest = s
            .strip_prefix("ws://")
            .ok_or_else(|| UrlError::Scheme(s.into()))?;
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port = p.parse::<u16>().ok().filter(|&p| p > 0);
                (h, port.ok_or_else(|| UrlError::Port(s.into()))?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(UrlError::NoHost(s.into()));
        }
        Ok(WsUrl {
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// The request target with `query` (`a=1&b=2`) appended to any query
    /// the URL already has.
    pub fn target_with(&self, query: &str) -> String {
        if query.is_empty() {
            self.target.clone()
        } else if self.target.contains('?') {
            format!("{}&{query}", self.target)
        } else {
            format!("{}?{query}", self.target)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_clients_use() {
        let u = WsUrl::parse("ws://127.0.0.1:8080/ws?sub=a").unwrap();
        assert_eq!((u.authority.as_str(), u.port), ("127.0.0.1:8080", 8080));
        assert_eq!(u.target, "/ws?sub=a");
        assert_eq!(u.target_with("sub=b"), "/ws?sub=a&sub=b");
        let u = WsUrl::parse("ws://localhost").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("localhost", 80, "/")
        );
        assert_eq!(u.target_with("x=1"), "/?x=1");
        let u = WsUrl::parse("ws://[::1]:9000?sub=a").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 9000, "/?sub=a")
        );
        assert!(matches!(WsUrl::parse("wss://h/"), Err(UrlError::Scheme(_))));
        assert!(matches!(WsUrl::parse("ws:///ws"), Err(UrlError::NoHost(_))));
        assert!(matches!(WsUrl::parse("ws://h:0/"), Err(UrlError::Port(_))));
        assert!(matches!(WsUrl::parse("ws://h:x/"), Err(UrlError::Port(_))));
    }
}
