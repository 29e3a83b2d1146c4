//! Every task a node starts, owned: one tracker and one stop signal per
//! node, as mini-redis's `Shutdown` is. A task spawned here either ends on
//! its own or when the node stops; [`Tasks::stop`] returns once all have
//! ended, so `run()` never leaves a task of the node behind it.
//!
//! Uses: nothing of the crate.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The node's tasks and the signal that stops them.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// Runs `task` until it ends or the node stops, whichever comes first:
    /// for loops with nothing to finish (tickers, readers, reconnects).
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// Runs `task`, which ends on its own; counted until it has.
    pub(crate) fn spawn_owned<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.tracker.spawn(task)
    }

    /// Signals every task to stop and waits until all have ended.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
