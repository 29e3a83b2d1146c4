//! The `/ws` URL parameters: what a socket asks for before its handshake
//! is answered, validated so a bad request is refused with 400 rather than
//! a socket that closes at once.

use herald_protocol::message::{ErrorCode, ErrorReply};
use herald_protocol::position::Position;
use herald_protocol::{Pattern, Topic};

use crate::history::recovery::Ask;

/// What the URL asked for, validated before the handshake was answered.
#[derive(Debug, Default, Clone)]
pub struct SessionParams {
    /// Subscriptions to hold from the start (`?sub=`).
    pub subs: Vec<String>,
    /// Raw mode's topic (`?topic=..&format=raw`).
    pub raw_topic: Option<String>,
    /// Display name for presence notices (`?name=`).
    pub name: Option<String>,
    /// Connection token (`?token=`); never logged.
    pub token: Option<String>,
    /// What the URL's subscriptions ask of the history: `since=EPOCH:SEQ`
    /// or `last=1`.
    pub ask: Option<Ask>,
}

/// Whether a handshake's `Origin` may open a socket: none (not a browser)
/// always may; otherwise it must be listed in `allowed` (exactly, by a
/// `scheme://*.domain` wildcard, or `*`), or, with an empty list, name the
/// host the request was sent to (`host`, the Host header).
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin.map(str::trim) else {
        return true;
    };
    if allowed.is_empty() {
        let authority = origin.split_once("://").map(|(_, a)| a);
        return match (authority, host) {
            (Some(a), Some(h)) => a.eq_ignore_ascii_case(h.trim()),
            _ => false,
        };
    }
    allowed.iter().map(|a| a.trim()).any(|a| {
        if a == "*" || a.eq_ignore_ascii_case(origin) {
            return true;
        }
        let Some((scheme, domain)) = a.split_once("://*.") else {
            return false;
        };
        let Some((o_scheme, o_host)) = origin.split_once("://") else {
            return false;
        };
        let o_host = o_host.to_ascii_lowercase();
        scheme.eq_ignore_ascii_case(o_scheme)
            && o_host.ends_with(&format!(".{}", domain.to_ascii_lowercase()))
    })
}

/// Decodes `%XX` escapes (browsers escape `>` in URLs) and `+` as space,
/// as `application/x-www-form-urlencoded` (and a browser's
/// `URLSearchParams`) writes them: the one decoder of every query the node
/// reads.
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// The first `name=` parameter of `query`, percent-decoded (see
/// [`percent_decode`]); names are matched as written. `Err` for a bad
/// escape.
pub fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .map(percent_decode)
        .transpose()
}

/// Longest `name` a socket may give for presence notices.
const MAX_NAME_LEN: usize = 64;

/// Parses `/ws` query parameters: `sub` (repeated), `topic` + `format=raw`,
/// `name`, `token`, `since` or `last`. Unknown parameters are ignored (cache busters, tokens for proxies).
pub fn parse(query: &str, max_subs: usize) -> Result<SessionParams, ErrorReply> {
    let mut p = SessionParams::default();
    let mut last = false;
    let mut format = None;
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e))?;
        match k {
            "sub" => {
                Pattern::parse(&v)
                    .map_err(|e| ErrorReply::new(ErrorCode::BadTopic, format!("sub={v:?}: {e}")))?;
                if !p.subs.contains(&v) {
                    p.subs.push(v);
                }
            }
            "topic" => {
                Topic::parse(&v)
                    .map_err(|e| ErrorReply::new(ErrorCode::BadTopic, format!("topic={v:?}: {e}")))?;
                p.raw_topic = Some(v);
            }
            "format" => format = Some(v),
            "since" => {
                let at = Position::parse_url(&v)
                    .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
                p.ask = Ask::from_request(Some(at), false);
            }
            "last" => {
                if !matches!(v.as_str(), "1" | "true") {
                    return Err(ErrorReply::new(ErrorCode::BadRequest, "last takes 1 or true"));
                }
                last = true;
            }
            "token" => p.token = Some(v),
            "name" => {
                if v.is_empty() || v.len() > MAX_NAME_LEN || v.chars().any(char::is_control) {
                    let m = format!("name must be 1 to {MAX_NAME_LEN} bytes without control characters");
                    return Err(ErrorReply::new(ErrorCode::BadRequest, m));
                }
                p.name = Some(v);
            }
            _ => {}
        }
    }
    match format.as_deref() {
        None | Some("json") => {
            if p.raw_topic.is_some() {
                let m = "topic= is for format=raw; JSON clients subscribe with sub=";
                return Err(ErrorReply::new(ErrorCode::BadRequest, m));
            }
        }
        Some("raw") => {
            if p.raw_topic.is_none() {
                return Err(ErrorReply::new(ErrorCode::BadRequest, "format=raw needs topic="));
            }
            if !p.subs.is_empty() {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    "format=raw takes topic=, not sub=",
                ));
            }
        }
        Some(other) => {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("format={other:?}; expected json or raw"),
            ));
        }
    }
    if last {
        if p.ask.is_some() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "since and last do not go together",
            ));
        }
        p.ask = Some(Ask::Last);
    }
    let n = p.subs.len() + usize::from(p.raw_topic.is_some());
    if n > max_subs {
        return Err(ErrorReply::new(
            ErrorCode::SubscriptionLimit,
            format!("at most {max_subs} subscriptions per socket"),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        assert!(
            origin_allowed(None, Some("h:8080"), &none),
            "no Origin: not a browser"
        );
        assert!(
            origin_allowed(Some("http://h:8080"), Some("h:8080"), &none),
            "same host"
        );
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("h:8080"),
            &none
        ));
        assert!(!origin_allowed(Some("null"), Some("h:8080"), &none));
        let list: Vec<String> = ["https://app.example.com", "https://*.example.org", "null"]
            .map(String::from)
            .to_vec();
        assert!(origin_allowed(Some("https://app.example.com"), None, &list));
        assert!(origin_allowed(Some("https://a.b.example.org"), None, &list));
        assert!(!origin_allowed(Some("https://example.org"), None, &list));
        assert!(
            !origin_allowed(Some("http://a.example.org"), None, &list),
            "scheme matters"
        );
        assert!(!origin_allowed(Some("https://evilexample.org"), None, &list));
        assert!(origin_allowed(Some("null"), None, &list));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("evil.example"),
            &list
        ));
        assert!(origin_allowed(Some("https://any.where"), None, &["*".to_owned()]));
    }

    #[test]
    fn url_parameters() {
        let p = parse("sub=todo:*&sub=chat%3Alobby&sub=a:%3E&x=1", 10).unwrap();
        assert_eq!(p.subs, vec!["todo:*", "chat:lobby", "a:>"]);
        let p = parse("topic=chat:lobby&format=raw&name=ann+b", 10).unwrap();
        assert_eq!(p.raw_topic.as_deref(), Some("chat:lobby"));
        assert_eq!(p.name.as_deref(), Some("ann b"));
        let refused = [
            ("sub=a..b", 10, ErrorCode::BadTopic),
            ("format=raw", 10, ErrorCode::BadRequest),
            ("topic=a", 10, ErrorCode::BadRequest),
            ("format=xml", 10, ErrorCode::BadRequest),
            ("sub=%zz", 10, ErrorCode::BadRequest),
            ("sub=a&sub=b", 1, ErrorCode::SubscriptionLimit),
            ("topic=a:*&format=raw", 1, ErrorCode::BadTopic),
        ];
        for (query, max, code) in refused {
            assert_eq!(parse(query, max).unwrap_err().code, code, "{query}");
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        let q = "topic=chat%3Alobby&limit=%35&key=a%2Bb+c&topic=other";
        assert_eq!(query_param(q, "topic").unwrap().as_deref(), Some("chat:lobby"));
        assert_eq!(query_param(q, "limit").unwrap().as_deref(), Some("5"));
        assert_eq!(query_param(q, "key").unwrap().as_deref(), Some("a+b c"));
        assert_eq!(query_param(q, "since").unwrap(), None);
        assert_eq!(query_param("xtopic=a", "topic").unwrap(), None);
        assert!(query_param("topic=a%3", "topic").is_err());
    }
}
