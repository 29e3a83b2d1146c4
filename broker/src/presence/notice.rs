//! A presence notice between nodes: one join or leave, as an empty NATS
//! message whose headers say who and what. Built and read here only, so
//! the wire format has one owner.

use crate::presence::roster::{Event, Member};

/// The event (`join` or `leave`).
const EVENT: &str = "Herald-Event";
/// The client that joined or left.
const CLIENT: &str = "Herald-Client";
/// Its display name.
const NAME: &str = "Herald-Name";
/// The joining socket's user id (its token's `sub`).
const USER: &str = "Herald-User";
/// Present on a notice that updates rosters only (no notice to sockets).
const QUIET: &str = "Herald-Quiet";

/// One join or leave, as a notice carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice<'a> {
    /// Joined or left.
    pub event: Event,
    /// The socket's client id (`c7-3f9a2c`: it ends in its node's tag).
    pub client: &'a str,
    /// Its token's user id, if any.
    pub user: Option<&'a str>,
    /// Its display name, if any.
    pub name: Option<&'a str>,
    /// Rosters only: no notice to sockets (`--presence-by user`, a user's
    /// socket that is neither its first nor its last).
    pub quiet: bool,
}

impl<'a> Notice<'a> {
    /// The notice's headers, names and values as NATS carries them (values
    /// hold no line breaks: client ids, user ids and names are checked
    /// where they enter).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            (EVENT, self.event.as_str().to_owned()),
            (CLIENT, self.client.to_owned()),
        ];
        if let Some(n) = self.name {
            h.push((NAME, n.to_owned()));
        }
        if let Some(u) = self.user {
            h.push((USER, u.to_owned()));
        }
        if self.quiet {
            h.push((QUIET, "1".to_owned()));
        }
        h
    }

    /// The notice a message's headers carry (`header` looks one up by
    /// name): `None` when they are not a notice, an error (the word) when
    /// a notice names an unknown event or no client.
    pub fn parse(header: impl Fn(&str) -> Option<&'a str>) -> Option<Result<Notice<'a>, &'a str>> {
        let word = header(EVENT)?;
        let (Some(event), Some(client)) = (Event::parse(word), header(CLIENT)) else {
            return Some(Err(word));
        };
        Some(Ok(Notice {
            event,
            client,
            user: header(USER),
            name: header(NAME),
            quiet: header(QUIET).is_some(),
        }))
    }

    /// The tag of the node the client is on (the end of its id).
    pub fn node(&self) -> &'a str {
        self.client.rsplit_once('-').map_or("?", |(_, n)| n)
    }

    /// The member a join adds.
    pub fn member(&self) -> Member {
        Member {
            client: self.client.to_owned(),
            user: self.user.map(str::to_owned),
            name: self.name.map(str::to_owned),
            last: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_reads_back_as_it_was_written() {
        for n in [
            Notice {
                event: Event::Join,
                client: "c7-3f9a2c",
                user: Some("42"),
                name: Some("Ada"),
                quiet: false,
            },
            Notice {
                event: Event::Leave,
                client: "c1-ab",
                user: None,
                name: None,
                quiet: true,
            },
        ] {
            let h = n.headers();
            let got = Notice::parse(|k| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str()));
            assert_eq!(got, Some(Ok(n)));
        }
        assert_eq!(Notice::parse(|_| None), None, "not a notice");
        let odd = [(EVENT, "wave"), (CLIENT, "c1-ab")];
        let got = Notice::parse(|k| odd.iter().find(|(n, _)| *n == k).map(|(_, v)| *v));
        assert_eq!(got, Some(Err("wave")), "an unknown event is no leave");
        let n = Notice::parse(|k| {
            [(EVENT, "join"), (CLIENT, "c1-ab")]
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
        });
        assert_eq!(n.and_then(Result::ok).map(|n| n.node()), Some("ab"));
    }
}
