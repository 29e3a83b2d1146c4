//! A node's presence snapshot travels in parts (a big room must stay under
//! NATS's payload limit); the receiving node puts each node's parts back
//! together before it applies the whole (see [`crate::presence::roster`]).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::sync::Lock;

/// Largest number of parts one snapshot may have.
const MAX_PARTS: usize = 10_000;

/// One node's snapshot parts so far: its generation and the parts.
type Parts = (u64, Vec<Option<Value>>);

/// Collects a node's snapshot parts until the whole snapshot is there.
#[derive(Default)]
pub struct Assembler {
    pending: Mutex<HashMap<String, Parts>>,
}

impl Assembler {
    /// Takes one part; returns the whole snapshot once its last part came.
    pub fn part(&self, v: Value) -> Option<Value> {
        let node = v["node"].as_str()?.to_owned();
        let (gen, part, parts) = (
            v["gen"].as_u64()?,
            v["part"].as_u64()? as usize,
            v["parts"].as_u64()? as usize,
        );
        if parts == 0 || parts > MAX_PARTS || part >= parts {
            return None;
        }
        let mut p = self.pending.locked();
        let entry = p.entry(node.clone()).or_insert((gen, Vec::new()));
        if entry.0 != gen || entry.1.len() != parts {
            *entry = (gen, vec![None; parts]);
        }
        entry.1[part] = Some(v);
        if entry.1.iter().any(Option::is_none) {
            return None;
        }
        let (_, got) = p.remove(&node)?;
        let mut topics = serde_json::Map::new();
        for v in got.into_iter().flatten() {
            if let Value::Object(t) = &v["topics"] {
                for (name, list) in t {
                    let all = topics
                        .entry(name.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let (Value::Array(all), Value::Array(more)) = (all, list) {
                        all.extend(more.iter().cloned());
                    }
                }
            }
        }
        Some(json!({"node": node, "topics": topics}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::roster::{Member, On, Roster};

    fn m(c: &str) -> Member {
        Member {
            client: c.into(),
            user: None,
            name: None,
            last: None,
        }
    }

    #[test]
    fn snapshots_travel_in_parts_each_within_its_bytes() {
        let a = Roster::default();
        for i in 0..25 {
            a.join(On::Here, "room", m(&format!("c{i}-a")));
        }
        a.join(On::Here, "other", m("c99-a"));
        // Raw-status objects make members big: every part stays within the
        // bound, and one too big for a part alone goes without it.
        a.set_last("c3-a", &format!("{{\"text\":\"{}\"}}", "x".repeat(300)));
        a.set_last("c4-a", &format!("{{\"text\":\"{}\"}}", "y".repeat(5000)));
        let max = 600;
        let parts = a.snapshot_parts("a", 7, max);
        assert!(parts.len() >= 2, "{} parts", parts.len());
        for p in &parts {
            assert!(
                p.to_string().len() <= max,
                "a part of {} bytes",
                p.to_string().len()
            );
        }
        let asm = Assembler::default();
        let b = Roster::default();
        let (last, rest) = parts.split_last().expect("parts");
        for p in rest.iter().rev() {
            assert!(asm.part(p.clone()).is_none());
        }
        let whole = asm.part(last.clone()).expect("complete");
        let changes = b.apply_snapshot(&whole);
        assert_eq!(changes.len(), 26);
        assert_eq!(b.stats("room"), (25, 25));
        let kept = whole["topics"]["room"]
            .as_array()
            .expect("room")
            .iter()
            .filter(|v| v.get("last").is_some())
            .count();
        assert_eq!(kept, 1, "c3's object travels, c4's is too big");
    }
}
