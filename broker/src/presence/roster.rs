//! Who is on each presence topic, cluster-wide, without a central store.
//!
//! Each node is the authority for its own sockets ([`Roster::join`],
//! [`Roster::leave`] with node `""`). Other nodes' members arrive as their
//! join and leave notices, and as a full snapshot each node publishes a few
//! times per `--presence-ttl`; a snapshot replaces what is known of that
//! node (so a node that comes back re-announces without duplicates). A
//! node not heard from for the TTL is dropped with all its members: the
//! survivors each tell their own sockets (no ghosts, no double notices).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::rate::Quiet;
use crate::sync::Lock;

/// One socket on a presence topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// The socket's client id (unique in the cluster).
    pub client: String,
    /// The token's `sub`, when the socket has one.
    pub user: Option<String>,
    /// The socket's `?name=`.
    pub name: Option<String>,
    /// `--raw-status`: the last object the socket published (status 1), for
    /// the other nodes to publish with status 0 should its node die.
    pub last: Option<String>,
}

impl Member {
    /// The member as the protocol shows it.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"client": self.client});
        if let Some(u) = &self.user {
            v["user"] = json!(u);
        }
        if let Some(n) = &self.name {
            v["name"] = json!(n);
        }
        v
    }

    /// The member as snapshots carry it (with its last raw-status object).
    pub fn to_wire(&self) -> Value {
        let mut v = self.to_json();
        if let Some(l) = &self.last {
            v["last"] = json!(l);
        }
        v
    }

    fn from_json(v: &Value) -> Option<Member> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        Some(Member {
            client: s("client")?,
            user: s("user"),
            name: s("name"),
            last: s("last"),
        })
    }
}

/// One node's members of one topic, with a count per user so a join or a
/// "first socket of this user?" costs O(1), whatever the room's size.
#[derive(Default, Clone)]
struct Room {
    members: BTreeMap<String, Member>,
    users: HashMap<String, usize>,
}

impl Room {
    fn insert(&mut self, m: Member) {
        let user = m.user.clone();
        if self.members.insert(m.client.clone(), m).is_none() {
            if let Some(u) = user {
                *self.users.entry(u).or_default() += 1;
            }
        }
    }

    fn remove(&mut self, client: &str) {
        if let Some(m) = self.members.remove(client) {
            if let Some(u) = m.user {
                if let Some(n) = self.users.get_mut(&u) {
                    *n -= 1;
                    if *n == 0 {
                        self.users.remove(&u);
                    }
                }
            }
        }
    }
}

/// Members of one node: topic → room.
type Topics = HashMap<String, Room>;

struct Remote {
    seen: Instant,
    topics: Topics,
}

/// A member arriving on a presence topic, or leaving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Arrived.
    Join,
    /// Left.
    Leave,
}

impl Event {
    /// The word clients and other nodes see.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Leave => "leave",
        }
    }

    /// The event `word` names, if any.
    pub fn parse(word: &str) -> Option<Event> {
        match word {
            "join" => Some(Event::Join),
            "leave" => Some(Event::Leave),
            _ => None,
        }
    }
}

/// Which node a member is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On<'a> {
    /// This node.
    Here,
    /// Another node, by its tag.
    Node(&'a str),
}

/// A change to tell local sockets about.
#[derive(Debug, Clone)]
pub struct Change {
    /// The presence topic.
    pub topic: String,
    /// Joined or left.
    pub event: Event,
    /// Who.
    pub member: Member,
}

/// The cluster's members on presence topics.
#[derive(Default)]
pub struct Roster {
    local: Mutex<Topics>,
    /// `--raw-status`: this node's sockets' last objects, by client id (kept
    /// apart from `local` so a message takes a shard lock, not the roster's).
    lasts: dashmap::DashMap<String, String>,
    remote: Mutex<HashMap<String, Remote>>,
}

impl Roster {
    /// Records a member joining `topic` on node `on`.
    pub fn join(&self, on: On<'_>, topic: &str, m: Member) {
        let On::Node(node) = on else {
            let mut l = self.local.locked();
            l.entry(topic.to_owned()).or_default().insert(m);
            return;
        };
        let mut r = self.remote.locked();
        let n = r.entry(node.to_owned()).or_insert_with(|| Remote {
            seen: Instant::now(),
            topics: Topics::new(),
        });
        n.seen = Instant::now();
        n.topics.entry(topic.to_owned()).or_default().insert(m);
    }

    /// Replaces this node's socket `client`'s last raw-status object.
    pub fn set_last(&self, client: &str, text: &str) {
        match self.lasts.get_mut(client) {
            Some(mut t) => {
                t.clear();
                t.push_str(text);
            }
            None => {
                self.lasts.insert(client.to_owned(), text.to_owned());
            }
        }
    }

    /// Forgets socket `client`'s last object (it is gone).
    pub fn clear_last(&self, client: &str) {
        self.lasts.remove(client);
    }

    /// Records `client` leaving `topic` on node `on`.
    pub fn leave(&self, on: On<'_>, topic: &str, client: &str) {
        let remove = |t: &mut Topics| {
            if let Some(room) = t.get_mut(topic) {
                room.remove(client);
                if room.members.is_empty() {
                    t.remove(topic);
                }
            }
        };
        match on {
            On::Here => remove(&mut self.local.locked()),
            On::Node(node) => {
                if let Some(n) = self.remote.locked().get_mut(node) {
                    n.seen = Instant::now();
                    remove(&mut n.topics);
                }
            }
        }
    }

    /// Members of `topic` in the cluster, sorted by client id, at most
    /// `max`; and whether the list was cut there.
    pub fn members(&self, topic: &str, max: usize) -> (Vec<Member>, bool) {
        let mut out: Vec<Member> = Vec::new();
        let mut truncated = false;
        let mut take = |room: &Room| {
            for m in room.members.values() {
                if out.len() == max {
                    truncated = true;
                    return;
                }
                out.push(m.clone());
            }
        };
        if let Some(r) = self.local.locked().get(topic) {
            take(r);
        }
        for n in self.remote.locked().values() {
            if let Some(r) = n.topics.get(topic) {
                take(r);
            }
        }
        out.sort();
        (out, truncated)
    }

    /// Sockets and distinct users on `topic` (a socket without a user
    /// counts as its own user), from the per-room counts: no member list.
    pub fn stats(&self, topic: &str) -> (usize, usize) {
        let mut clients = 0;
        let mut anonymous = 0;
        let mut users: HashSet<String> = HashSet::new();
        let mut count = |r: &Room| {
            clients += r.members.len();
            anonymous += r.members.len() - r.users.values().sum::<usize>();
            users.extend(r.users.keys().cloned());
        };
        if let Some(r) = self.local.locked().get(topic) {
            count(r);
        }
        for n in self.remote.locked().values() {
            if let Some(r) = n.topics.get(topic) {
                count(r);
            }
        }
        (clients, users.len() + anonymous)
    }

    /// Sockets of `user` on `topic`, cluster-wide: O(nodes).
    pub fn sockets_of(&self, topic: &str, user: &str) -> usize {
        let of = |r: Option<&Room>| r.and_then(|r| r.users.get(user)).copied().unwrap_or(0);
        let local = of(self.local.locked().get(topic));
        let remote: usize = self
            .remote
            .locked()
            .values()
            .map(|n| of(n.topics.get(topic)))
            .sum();
        local + remote
    }

    /// This node's members, as the snapshot it publishes.
    pub fn snapshot(&self, node: &str) -> Value {
        let l = self.local.locked();
        let topics: serde_json::Map<String, Value> = l
            .iter()
            .map(|(t, r)| {
                (
                    t.clone(),
                    Value::Array(r.members.values().map(Member::to_json).collect()),
                )
            })
            .collect();
        json!({"node": node, "topics": topics})
    }

    /// This node's members in parts, each of at most `max_bytes` of JSON
    /// (the link's server cuts a connection that sends a message over its
    /// `max_payload`, so a snapshot must fit however big its rooms and the
    /// members' `--raw-status` objects). A member too big for a part alone
    /// goes without its `last` (a warning says so); it is still a member.
    pub fn snapshot_parts(&self, node: &str, gen: u64, max_bytes: usize) -> Vec<Value> {
        // Room for the envelope (`{"node":..,"gen":..,"part":..,"parts":..,"topics":{}}`).
        let budget = max_bytes.saturating_sub(node.len() + 96).max(256);
        let l = self.local.locked();
        let mut parts: Vec<serde_json::Map<String, Value>> = vec![Default::default()];
        let mut size = 0;
        for (t, r) in l.iter() {
            for m in r.members.values() {
                let mut v = m.to_wire();
                if let Some(last) = self.lasts.get(&m.client) {
                    v["last"] = json!(*last);
                }
                let mut cost = v.to_string().len() + 1;
                if cost + t.len() + 8 > budget {
                    // Every snapshot would say it again: once a window.
                    static QUIET: std::sync::LazyLock<Quiet> = std::sync::LazyLock::new(Quiet::default);
                    if let Some(held) = QUIET.allow("snapshot_member_too_big") {
                        tracing::warn!(client = %m.client, topic = %t, bytes = cost, budget, suppressed = held, "presence snapshot: a member's raw-status object is too big for a snapshot part; sent without it");
                    }
                    v = m.to_wire();
                    cost = v.to_string().len() + 1;
                }
                // A topic's key costs once per part it appears in.
                let mut key = if parts.last().is_some_and(|p| p.contains_key(t)) {
                    0
                } else {
                    t.len() + 8
                };
                if size > 0 && size + cost + key > budget {
                    parts.push(Default::default());
                    (size, key) = (0, t.len() + 8);
                }
                let part = parts.last_mut().expect("a part");
                if let Value::Array(a) = part.entry(t.clone()).or_insert_with(|| Value::Array(Vec::new())) {
                    a.push(v);
                }
                size += cost + key;
            }
        }
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, topics)| json!({"node": node, "gen": gen, "part": i, "parts": n, "topics": topics}))
            .collect()
    }

    /// Notes that `node` is alive (a snapshot part arrived) without
    /// changing its members.
    pub fn touch(&self, node: &str) {
        if let Some(n) = self.remote.locked().get_mut(node) {
            n.seen = Instant::now();
        }
    }

    /// Replaces what is known of the node a snapshot came from; returns the
    /// joins and leaves that makes (nothing, when notices kept up).
    pub fn apply_snapshot(&self, v: &Value) -> Vec<Change> {
        let Some(node) = v["node"].as_str().filter(|n| !n.is_empty()) else {
            return Vec::new();
        };
        let mut fresh = Topics::new();
        if let Some(topics) = v["topics"].as_object() {
            for (t, list) in topics {
                let mut room = Room::default();
                for m in list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Member::from_json)
                {
                    room.insert(m);
                }
                if !room.members.is_empty() {
                    fresh.insert(t.clone(), room);
                }
            }
        }
        let mut r = self.remote.locked();
        let old = r
            .insert(
                node.to_owned(),
                Remote {
                    seen: Instant::now(),
                    topics: fresh.clone(),
                },
            )
            .map(|n| n.topics)
            .unwrap_or_default();
        diff(&old, &fresh)
    }

    /// Drops nodes not heard from for `ttl`; returns their members as leaves.
    pub fn expire(&self, ttl: Duration) -> Vec<Change> {
        let mut r = self.remote.locked();
        let gone: Vec<String> = r
            .iter()
            .filter(|(_, n)| n.seen.elapsed() >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for node in gone {
            if let Some(n) = r.remove(&node) {
                tracing::warn!(node = %node, "presence: node silent past the TTL; its members leave");
                out.extend(diff(&n.topics, &Topics::new()));
            }
        }
        out
    }

    /// Whether `me` is the first, by id, of the live nodes it knows: the one
    /// that publishes a dead node's `--raw-status` leave messages.
    pub fn first_of_nodes(&self, me: &str) -> bool {
        let r = self.remote.locked();
        r.keys().all(|k| me < k.as_str())
    }

    /// Nodes other than this one currently known.
    pub fn nodes(&self) -> usize {
        self.remote.locked().len()
    }
}

/// The joins and leaves that turn `old` into `new`.
fn diff(old: &Topics, new: &Topics) -> Vec<Change> {
    let mut out = Vec::new();
    for (t, room) in old {
        for (c, m) in &room.members {
            if !new.get(t).is_some_and(|n| n.members.contains_key(c)) {
                out.push(Change {
                    topic: t.clone(),
                    event: Event::Leave,
                    member: m.clone(),
                });
            }
        }
    }
    for (t, room) in new {
        for (c, m) in &room.members {
            if !old.get(t).is_some_and(|o| o.members.contains_key(c)) {
                out.push(Change {
                    topic: t.clone(),
                    event: Event::Join,
                    member: m.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(c: &str, u: Option<&str>) -> Member {
        Member {
            client: c.into(),
            user: u.map(String::from),
            name: None,
            last: None,
        }
    }

    #[test]
    fn local_remote_snapshots_and_expiry() {
        let r = Roster::default();
        r.join(On::Here, "room", m("c1-a", Some("42")));
        r.join(On::Node("b"), "room", m("c1-b", Some("42")));
        r.join(On::Node("b"), "room", m("c2-b", None));
        assert_eq!(r.members("room", 100).0.len(), 3);
        assert_eq!(r.members("room", 2), (r.members("room", 2).0, true), "capped");
        assert_eq!(r.members("room", 2).0.len(), 2);
        assert_eq!(r.stats("room"), (3, 2));
        assert_eq!(r.sockets_of("room", "42"), 2);
        // A snapshot from b without c2-b: one leave; again: nothing.
        let snap = json!({"node": "b", "topics": {"room": [{"client": "c1-b", "user": "42"}]}});
        let changes = r.apply_snapshot(&snap);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].event, Event::Leave);
        assert!(r.apply_snapshot(&snap).is_empty(), "no duplicates");
        assert!(r.expire(Duration::from_secs(60)).is_empty());
        let gone = r.expire(Duration::ZERO);
        assert_eq!(gone.len(), 1);
        assert_eq!(r.members("room", 100).0, vec![m("c1-a", Some("42"))]);
        r.leave(On::Here, "room", "c1-a");
        assert!(r.members("room", 100).0.is_empty());
        assert_eq!(r.snapshot("a")["topics"], json!({}));
    }
}
