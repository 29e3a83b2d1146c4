//! The history topics and where their messages are kept: in memory on an
//! embedded node ([`Journal`]), in the JetStream stream in a cluster
//! ([`StreamHistory`]).

use std::sync::Arc;
use std::time::Duration;

use crate::config::values::Retention;
use crate::history::jetstream::StreamHistory;
use crate::history::memory::Journal;
use crate::metrics::Metrics;
use crate::tasks::Tasks;

/// The `--history` settings.
#[derive(Debug, Clone, Default)]
pub struct HistorySettings {
    /// Which topics keep what.
    pub rules: Vec<Retention>,
    /// `--history-bytes`.
    pub bytes: u64,
    /// `--history-replicas`.
    pub replicas: u8,
    /// `--history-tail-bytes`.
    pub tail_bytes: u64,
    /// `--history-stream`.
    pub stream: String,
}

/// The history topics and where their messages are kept.
pub struct History {
    /// Which topics keep what.
    pub rules: Vec<Retention>,
    /// Where.
    pub store: Store,
}

/// Where history topics keep their messages.
#[derive(Clone)]
pub enum Store {
    /// In this process (embedded).
    Memory(Arc<Journal>),
    /// In the cluster's JetStream stream.
    Stream(Arc<StreamHistory>),
}

impl History {
    /// Whether topics under `pattern` can keep history.
    pub fn covers(&self, pattern: &str) -> bool {
        self.rules
            .iter()
            .any(|r| herald_protocol::topic::overlaps(&r.pattern, pattern))
    }

    /// The history's epoch and position now, when it can be read: every
    /// message above it reaches a subscription listed before the call.
    pub fn position(&self) -> Option<(Arc<str>, u64)> {
        match &self.store {
            Store::Memory(j) => Some((j.epoch(), j.position())),
            Store::Stream(s) => Some((s.epoch()?, s.position()?)),
        }
    }

    /// An embedded node's history, in memory, pruned by age every second;
    /// `None` without rules.
    pub fn embedded(settings: &HistorySettings, metrics: &Arc<Metrics>, tasks: &Tasks) -> Option<History> {
        if settings.rules.is_empty() {
            return None;
        }
        let journal = Arc::new(Journal::new(settings.bytes, metrics.clone()));
        let weak = Arc::downgrade(&journal);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(j) = weak.upgrade() else { return };
                j.prune();
            }
        });
        Some(History {
            rules: settings.rules.clone(),
            store: Store::Memory(journal),
        })
    }
}
