//! The last few minutes of the node's figures, one sample a second, and the
//! latest sample of every other node in the cluster, for the status page.
//! Samples are JSON objects made by [`crate::status`]; this only keeps them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sync::Lock;

/// Samples kept: five minutes at one a second.
pub const SAMPLES: usize = 300;

/// A node silent this long is dropped from the cluster view.
pub const PEER_TTL: Duration = Duration::from_secs(15);

/// This node's samples and its peers' latest ones.
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Value>>,
    peers: Mutex<HashMap<String, (Instant, Value)>>,
}

impl History {
    /// Adds this node's newest sample, dropping the oldest past [`SAMPLES`].
    pub fn push(&self, sample: Value) {
        let mut s = self.samples.locked();
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back(sample);
    }

    /// This node's samples, oldest first.
    pub fn samples(&self) -> Vec<Value> {
        let s = self.samples.locked();
        s.iter().cloned().collect()
    }

    /// Records a peer's latest sample.
    pub fn peer(&self, node: String, sample: Value) {
        let mut p = self.peers.locked();
        p.insert(node, (Instant::now(), sample));
    }

    /// Peers heard from within [`PEER_TTL`], with how long ago, by name.
    pub fn peers(&self) -> Vec<(String, Duration, Value)> {
        let mut p = self.peers.locked();
        p.retain(|_, (at, _)| at.elapsed() < PEER_TTL);
        let mut out: Vec<_> = p
            .iter()
            .map(|(n, (at, v))| (n.clone(), at.elapsed(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
