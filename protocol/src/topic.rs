//! Topic names and subscription patterns.
//!
//! A topic is one or more segments joined by `:` (`todo:count`, `park:staff:7`).
//! A segment is 1 or more of `A-Z a-z 0-9 _ - @ ~`. A subscription pattern may
//! also use `*` as a whole segment (exactly one segment) and `>` as the last
//! segment (one or more remaining segments). Publish topics never contain
//! wildcards. Every topic maps one-to-one to a NATS subject under a prefix
//! (`todo:count` -> `herald.todo.count`), which is why `.` is not allowed in a
//! segment.

use std::fmt;

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;
/// Most segments in a topic or pattern.
pub const MAX_SEGMENTS: usize = 16;

/// Why a topic or pattern was refused. The text is sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic is the empty string.
    #[error("topic is empty")]
    Empty,
    /// The topic is longer than [`MAX_TOPIC_LEN`].
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    /// The topic has more than [`MAX_SEGMENTS`] segments.
    #[error("topic has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    /// Two `:` in a row, or a leading or trailing `:`.
    #[error("topic has an empty segment")]
    EmptySegment,
    /// A character outside the segment alphabet.
    #[error("topic contains {0:?}; segments use A-Z a-z 0-9 _ - @ ~")]
    BadChar(char),
    /// A wildcard where only a concrete topic is allowed (publishing).
    #[error("wildcards (* and >) are allowed in subscriptions only")]
    WildcardInTopic,
    /// `*` or `>` mixed with other characters in one segment.
    #[error("a wildcard must be a whole segment")]
    PartialWildcard,
    /// `>` somewhere other than the last segment.
    #[error("'>' may only be the last segment")]
    TailNotLast,
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@' | b'~')
}

fn check(s: &str, allow_wildcards: bool) -> Result<bool, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    let mut wild = false;
    let mut count = 0;
    let mut segments = s.split(':').peekable();
    while let Some(seg) = segments.next() {
        count += 1;
        if count > MAX_SEGMENTS {
            return Err(TopicError::TooManySegments);
        }
        if seg.is_empty() {
            return Err(TopicError::EmptySegment);
        }
        if seg == "*" || seg == ">" {
            if !allow_wildcards {
                return Err(TopicError::WildcardInTopic);
            }
            if seg == ">" && segments.peek().is_some() {
                return Err(TopicError::TailNotLast);
            }
            wild = true;
            continue;
        }
        if let Some(bad) = seg.bytes().find(|b| !is_segment_byte(*b)) {
            if bad == b'*' || bad == b'>' {
                return Err(if allow_wildcards {
                    TopicError::PartialWildcard
                } else {
                    TopicError::WildcardInTopic
                });
            }
            let c = seg[seg.bytes().position(|b| b == bad).unwrap_or(0)..]
                .chars()
                .next()
                .unwrap_or('?');
            return Err(TopicError::BadChar(c));
        }
    }
    Ok(wild)
}

/// A validated concrete topic: what messages are published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topic<'a>(&'a str);

impl<'a> Topic<'a> {
    /// Validates `s` as a publish topic (no wildcards).
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        check(s, false).map(|_| Topic(s))
    }

    /// The topic text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A validated subscription pattern: a topic, possibly with `*` and `>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pattern<'a> {
    text: &'a str,
    wildcard: bool,
}

impl<'a> Pattern<'a> {
    /// Validates `s` as a subscription pattern.
    pub fn parse(s: &'a str) -> Result<Self, TopicError> {
        check(s, true).map(|wildcard| Pattern { text: s, wildcard })
    }

    /// The pattern text.
    pub fn as_str(&self) -> &'a str {
        self.text
    }

    /// True when the pattern has a `*` or `>` segment; false for a plain topic.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// Whether `topic` (a valid concrete topic) falls under this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        matches(self.text, topic)
    }
}

impl fmt::Display for Pattern<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)
    }
}

/// Whether concrete `topic` falls under `pattern`. Both are assumed valid;
/// no allocation, one pass over each.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split(':');
    let mut t = topic.split(':');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(ps), Some(ts)) if ps == ts => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `pattern` can match is also matched by `grant`
/// (both valid patterns): `orders:eu:*` covers `orders:eu:7` and
/// `orders:eu:*`, but not `orders:>`, `orders:*:7` or `>`.
pub fn covers(grant: &str, pattern: &str) -> bool {
    let mut g = grant.split(':');
    let mut p = pattern.split(':');
    loop {
        match (g.next(), p.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(gs), Some(ps)) if gs == ps && ps != "*" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic could match both patterns (both valid):
/// `chat:lobby` and `chat:*` do, `chat:*` and `chat:a:b` do not.
pub fn overlaps(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split(':'), b.split(':'));
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if p == "*" || q == "*" || p == q => {}
            _ => return false,
        }
    }
}

/// The NATS subject for a topic or pattern under `prefix`: `:` becomes `.`;
/// `*` and `>` are NATS wildcards already.
pub fn to_subject(prefix: &str, topic: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + topic.len());
    if !prefix.is_empty() {
        s.push_str(prefix);
        s.push('.');
    }
    s.extend(topic.chars().map(|c| if c == ':' { '.' } else { c }));
    s
}

/// The topic for a NATS subject under `prefix`, or `None` when the subject is
/// outside the prefix or is not a valid topic.
pub fn from_subject(prefix: &str, subject: &str) -> Option<String> {
    from_subject_in(prefix, subject, &mut [0; MAX_TOPIC_LEN]).map(str::to_owned)
}

/// [`from_subject`] without allocating: the topic is written into `buf`
/// (no topic is longer), for a reader that converts every message's subject.
pub fn from_subject_in<'b>(prefix: &str, subject: &str, buf: &'b mut [u8; MAX_TOPIC_LEN]) -> Option<&'b str> {
    let rest = if prefix.is_empty() {
        subject
    } else {
        subject.strip_prefix(prefix)?.strip_prefix('.')?
    };
    let out = buf.get_mut(..rest.len())?;
    for (o, b) in out.iter_mut().zip(rest.bytes()) {
        *o = if b == b'.' { b':' } else { b };
    }
    // `.` and `:` are ASCII: the text stays UTF-8.
    let topic = std::str::from_utf8(out).ok()?;
    Topic::parse(topic).ok()?;
    Some(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_patterns() {
        assert!(overlaps("chat:*", "chat:>"));
        assert!(overlaps("chat:lobby", "chat:*"));
        assert!(overlaps(">", "a:b"));
        assert!(!overlaps("chat:*", "orders:*"));
        assert!(!overlaps("chat:*", "chat:a:b"));
        assert!(!overlaps("a", "a:b"));
    }

    #[test]
    fn grants_cover_only_what_they_match() {
        let allowed = [
            ("orders:eu:*", "orders:eu:7"),
            ("orders:eu:*", "orders:eu:*"),
            ("orders:>", "orders:eu:*"),
            ("orders:>", "orders:>"),
            ("orders:>", "orders:*:7"),
            (">", ">"),
            (">", "*"),
            ("*", "a"),
            ("a:*:c", "a:*:c"),
            ("user:42:>", "user:42:inbox:>"),
        ];
        for (g, p) in allowed {
            assert!(covers(g, p), "{g} should cover {p}");
        }
        let refused = [
            ("orders:eu:*", "orders:>"),
            ("orders:eu:*", "orders:*:7"),
            ("orders:eu:*", "*:eu:7"),
            ("orders:eu:*", ">"),
            ("orders:eu:*", "orders:eu"),
            ("orders:eu:*", "orders:eu:7:8"),
            ("orders:>", "orders"),
            ("orders:>", ">"),
            ("*", ">"),
            ("*", "a:b"),
            ("a", "*"),
            ("user:42:>", "user:*:inbox"),
        ];
        for (g, p) in refused {
            assert!(!covers(g, p), "{g} must not cover {p}");
        }
    }

    #[test]
    fn accepts_component_code_topics() {
        for t in ["todo:count", "chat:lobby", "park:staff:7", "a", "A-b_c@d~e"] {
            assert_eq!(Topic::parse(t).unwrap().as_str(), t);
        }
    }

    #[test]
    fn refuses_bad_topics_with_reason() {
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse("a::b"), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse(":a"), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse("a:"), Err(TopicError::EmptySegment));
        assert_eq!(Topic::parse("a.b"), Err(TopicError::BadChar('.')));
        assert_eq!(Topic::parse("a b"), Err(TopicError::BadChar(' ')));
        assert_eq!(Topic::parse("caf\u{e9}"), Err(TopicError::BadChar('\u{e9}')));
        assert_eq!(Topic::parse("a:*"), Err(TopicError::WildcardInTopic));
        assert_eq!(Topic::parse("a:>"), Err(TopicError::WildcardInTopic));
        assert_eq!(Topic::parse("a*"), Err(TopicError::WildcardInTopic));
        assert_eq!(Topic::parse(&"a".repeat(256)), Err(TopicError::TooLong));
        assert_eq!(
            Topic::parse(&["a"; 17].join(":")),
            Err(TopicError::TooManySegments)
        );
        assert_eq!(Pattern::parse("a*:b"), Err(TopicError::PartialWildcard));
        assert_eq!(Pattern::parse(">:a"), Err(TopicError::TailNotLast));
    }

    #[test]
    fn wildcards_match_as_documented() {
        let p = Pattern::parse("todo:*").unwrap();
        assert!(p.is_wildcard());
        assert!(p.matches("todo:count"));
        assert!(!p.matches("todo"));
        assert!(!p.matches("todo:count:x"));
        let p = Pattern::parse("chat:>").unwrap();
        assert!(p.matches("chat:lobby"));
        assert!(p.matches("chat:lobby:x:y"));
        assert!(!p.matches("chat"));
        let p = Pattern::parse("*:count").unwrap();
        assert!(p.matches("todo:count"));
        assert!(!p.matches("todo:other"));
        assert!(matches(">", "a:b:c"));
        let p = Pattern::parse("a:b").unwrap();
        assert!(!p.is_wildcard());
        assert!(p.matches("a:b"));
        assert!(!p.matches("a:b:c"));
        assert!(!p.matches("a"));
    }

    #[test]
    fn subjects_round_trip() {
        assert_eq!(to_subject("herald", "todo:count"), "herald.todo.count");
        assert_eq!(to_subject("herald", "chat:>"), "herald.chat.>");
        assert_eq!(to_subject("", "a:b"), "a.b");
        assert_eq!(
            from_subject("herald", "herald.todo.count").as_deref(),
            Some("todo:count")
        );
        assert_eq!(from_subject("herald", "other.todo"), None);
        assert_eq!(from_subject("herald", "herald.a..b"), None);
        let mut buf = [0; MAX_TOPIC_LEN];
        assert_eq!(
            from_subject_in("herald", "herald.todo.count", &mut buf),
            Some("todo:count")
        );
        assert_eq!(from_subject_in("", "a.b", &mut buf), Some("a:b"));
        let longest = format!("herald.{}", "x".repeat(MAX_TOPIC_LEN));
        assert_eq!(from_subject_in("herald", &longest, &mut buf), Some(&longest[7..]));
        let over = format!("herald.{}", "x".repeat(MAX_TOPIC_LEN + 1));
        assert_eq!(from_subject_in("herald", &over, &mut buf), None);
        assert_eq!(from_subject("herald", &over), None);
    }
}
