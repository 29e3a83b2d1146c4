//! The node's set of live sessions: accepting a handshake into a session,
//! the live-socket snapshot the heartbeat and shutdown walk, and the
//! deadlines of connection tokens.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use herald_protocol::ws::{self, OpCode};
use herald_protocol::Disconnect;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, Identity};
use crate::cluster::subjects::Barrier;
use crate::config::Config;
use crate::metrics::{ConnectionSlot, Metrics};
use crate::router::{Pending, Router};
use crate::session::deadlines::Due;
use crate::session::params::SessionParams;
use crate::session::read::{Session, Shared};
use crate::socket::subscriber::Subscriber;
use crate::socket::writer::Writers;

/// The node's live sessions and everything they share. Built once by the
/// node.
pub struct Sessions {
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(config: Arc<Config>, router: Router, metrics: Arc<Metrics>, auth: Option<Arc<Auth>>) -> Self {
        let tracker = TaskTracker::new();
        let writers = Arc::new(Writers {
            tracker: tracker.clone(),
            write_timeout: config.write_timeout,
            close_timeout: config.close_timeout,
            metrics: metrics.clone(),
        });
        let anonymous = auth
            .as_ref()
            .map(|a| Arc::new(Identity::anonymous(a.anonymous.clone())));
        Sessions {
            shared: Arc::new(Shared {
                writers,
                tracker,
                heartbeat_reply: ws::encode_frame(OpCode::Text, config.heartbeat_word.as_bytes()),
                config,
                router,
                metrics,
                auth,
                anonymous,
                live: DashMap::new(),
                deadlines: Default::default(),
            }),
            next_id: AtomicU64::new(1),
        }
    }

    /// Token checks, when the node has access control.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.shared.auth.as_ref()
    }

    /// What a socket without a token may do (`None`: no access control).
    pub fn anonymous(&self) -> Option<&Arc<Identity>> {
        self.shared.anonymous.as_ref()
    }

    /// Reserves a connection slot; `None` when the node is full.
    pub fn reserve(&self) -> Option<ConnectionSlot> {
        self.shared
            .metrics
            .reserve_connection(self.shared.config.max_connections)
    }

    /// Spawns a task that shutdown waits for (a handshake in progress).
    pub fn track(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.shared.tracker.spawn(task);
    }

    /// Registers a session for a handshake about to be answered with 101,
    /// holding `slot` until its socket is gone, with `access` (checked
    /// against its URL subscriptions already). Subscribed before the 101
    /// goes out: once the client sees its socket open, its URL
    /// subscriptions are in effect; frames delivered meanwhile wait in the
    /// outbox.
    pub fn accept(
        &self,
        params: SessionParams,
        slot: ConnectionSlot,
        access: Option<Arc<Identity>>,
    ) -> Accepted {
        let shared = &self.shared;
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Subscriber::new(
            id,
            params.raw_topic.is_some(),
            shared.config.max_queue_bytes,
            crate::clock::now_ms(),
            shared.writers.clone(),
            Some(slot),
        ));
        shared.live.insert(id, conn.clone());
        shared.metrics.connections_total.fetch_add(1, Relaxed);
        match &access {
            Some(a) if a.has_token() => {
                shared
                    .deadlines
                    .set(id, a.expires.saturating_mul(1000), Due::TokenExpired);
            }
            // Access control on, no token, and nothing granted without one:
            // an `auth` frame must come within the handshake timeout.
            Some(a) if a.grants.is_empty() => {
                let at = crate::clock::unix_ms() + shared.config.handshake_timeout.as_millis() as u64;
                shared.deadlines.set(id, at, Due::NoToken);
            }
            _ => {}
        }
        let session = Session::new(shared.clone(), conn, params.name, access);
        let (mut waits, mut replays) = (Vec::new(), Vec::new());
        for p in params.subs.iter().chain(params.raw_topic.iter()) {
            // Validated and counted against the limit with the URL.
            let ask = params.ask.as_ref();
            // A recovery's live deliveries wait in its hold, so nothing is
            // lost; its replay starts with the session, after the 101.
            match shared
                .router
                .subscribe(session.conn(), p, session.who(), None, ask)
            {
                Ok(Some(Pending::Live(live))) => waits.push(live),
                Ok(Some(Pending::Recovery(work))) => replays.push(work),
                _ => {}
            }
        }
        Accepted {
            session,
            waits,
            replays,
        }
    }

    /// Closes the sockets whose token expired (4003) or that sent none in
    /// time (4501); returns how many.
    pub fn expire(&self) -> usize {
        let due = self.shared.deadlines.take_due(crate::clock::unix_ms());
        for (id, why) in &due {
            let Some(conn) = self.shared.live.get(id).map(|c| c.clone()) else {
                continue;
            };
            conn.close(match why {
                Due::TokenExpired => Disconnect::TokenExpired,
                Due::NoToken => Disconnect::Unauthorized("no token within the handshake timeout".into()),
            });
        }
        due.len()
    }

    /// Every live socket, snapshotted so no map shard stays locked while
    /// the caller walks them.
    pub fn snapshot(&self) -> Vec<Arc<Subscriber>> {
        self.slice(1, 0)
    }

    /// The live sockets whose id is `k` modulo `of`, snapshotted likewise:
    /// a walk over one slice clones only that slice's handles.
    pub fn slice(&self, of: u64, k: u64) -> Vec<Arc<Subscriber>> {
        let live = self.shared.live.iter().filter(|e| e.key() % of == k);
        live.map(|e| e.value().clone()).collect()
    }

    /// Waits, however long it takes, until every session and writer task
    /// has ended.
    pub async fn finish(&self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }

    /// Waits (up to `grace`) for every session task to end; returns false
    /// if some were still running.
    pub async fn wait(&self, grace: Duration) -> bool {
        self.shared.tracker.close();
        tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok()
    }
}

/// A session accepted but not yet upgraded (see [`Sessions::accept`]).
pub struct Accepted {
    session: Session,
    /// URL subscriptions the cluster link has yet to confirm.
    waits: Vec<Barrier>,
    /// URL subscriptions that recover (`since`, `last`): replayed once the
    /// socket is open.
    replays: Vec<Barrier>,
}

impl Accepted {
    /// Resolves once every URL subscription is in effect cluster-wide:
    /// answer the handshake only then.
    pub async fn ready(&mut self) {
        for live in self.waits.drain(..) {
            live.await;
        }
    }

    /// Starts the session on the upgraded TCP stream (see
    /// [`Session::start`]), with its URL subscriptions' recoveries.
    pub fn start(mut self, stream: TcpStream, early: &[u8]) {
        for work in self.replays {
            self.session.recover(work);
        }
        self.session.start(stream, early);
    }

    /// The upgrade failed: leave every topic and release the slot.
    pub fn abandon(self) {
        self.session.end();
    }
}
