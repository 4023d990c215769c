//! The committer: folds what is committable into the checkpoint and stores it, every
//! interval and once more at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::acks::Acks;
use super::{Checkpoint, CheckpointStore, Error};
use crate::metrics::Metrics;

/// The checkpointer's side of the checkpoint: the latest state with every committable
/// position folded in, and whether the store is behind it.
///
/// # Invariants
/// A failed write leaves `unsaved` set, so the next tick writes again even when no new
/// position arrived; "final checkpoint written" is reported only after a write succeeded.
pub struct Committer<S> {
    cp: Checkpoint,
    store: S,
    acks: Arc<Acks>,
    metrics: Metrics,
    unsaved: bool,
}

impl<S: CheckpointStore> Committer<S> {
    pub fn new(cp: Checkpoint, store: S, acks: Arc<Acks>, metrics: Metrics) -> Self {
        Self { cp, store, acks, metrics, unsaved: false }
    }

    /// Fold committable positions in and, when the stored copy is behind, store it.
    ///
    /// # Errors
    /// The store's error; `unsaved` stays set so the next call writes again.
    pub async fn commit(&mut self) -> Result<(), Error> {
        let positions = self.acks.take_committable();
        for p in &positions {
            self.cp.apply(p);
        }
        self.unsaved |= !positions.is_empty();
        if !self.unsaved {
            return Ok(());
        }
        self.store.save(&self.cp).await?;
        self.unsaved = false;
        let m = &self.metrics;
        m.checkpoints.inc();
        m.checkpoint_time.set(crate::time::unix_seconds());
        if let Some(t) = self.cp.stream_time {
            m.checkpoint_event_time.set(i64::from(t.t));
        }
        Ok(())
    }

    /// Commit every `interval` until `stop`, then write the final checkpoint, retrying a failed
    /// write for up to `final_limit`. A fenced store (another worker holds the lease) calls
    /// `fence` at once and never writes again.
    ///
    /// # Errors
    /// Fenced, or the final checkpoint could not be stored within `final_limit` (the next
    /// start then resumes from the last one stored, replaying what came after it).
    pub async fn run(
        mut self,
        interval: Duration,
        stop: CancellationToken,
        final_limit: Duration,
        fence: impl FnOnce(),
    ) -> Result<(), Error> {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => break,
            }
            match self.commit().await {
                Ok(()) => {}
                Err(e @ Error::Fenced { .. }) => {
                    error!(error = %crate::error_chain(&e), "checkpoint lease lost; stopping at once");
                    fence();
                    return Err(e);
                }
                Err(e) => error!(error = %crate::error_chain(&e), "failed to store checkpoint; retrying at the next tick"),
            }
        }
        // Final checkpoint: everything acknowledged before shutdown, retried (backing off to at
        // most 2 s) until it is stored, fenced, or the next wait would end past `final_limit`.
        let pace = crate::retry::Pace::unbounded().capped(Duration::from_secs(2)).deadline(tokio::time::Instant::now() + final_limit);
        // `commit` borrows the committer mutably, which a future returned by the retried closure
        // cannot (async closures can, but their futures are not `Send` for a spawned task yet):
        // the attempts, one at a time, take it from a lock instead.
        let this = tokio::sync::Mutex::new(&mut self);
        let this = &this;
        crate::retry::retry(pace, move || async move { this.lock().await.commit().await }, |e| {
            if matches!(e, Error::Fenced { .. }) {
                return false;
            }
            warn!(error = %crate::error_chain(e), "failed to store the final checkpoint; retrying");
            true
        })
        .await
        .map_err(crate::retry::Stopped::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Position;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose first `fail` writes fail, then succeed; counts successful writes.
    #[derive(Default)]
    struct Flaky {
        fail: AtomicUsize,
        saved: std::sync::Mutex<Vec<Checkpoint>>,
    }

    impl CheckpointStore for Arc<Flaky> {
        fn location(&self) -> String {
            "flaky".into()
        }
        async fn load(&self) -> Result<Option<Checkpoint>, Error> {
            Ok(None)
        }
        async fn save(&self, cp: &Checkpoint) -> Result<(), Error> {
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::Io {
                    op: "write",
                    location: "flaky".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.saved.lock().unwrap_or_else(|p| p.into_inner()).push(cp.clone());
            Ok(())
        }
    }

    fn acks() -> Arc<Acks> {
        Arc::new(Acks::default())
    }

    #[tokio::test]
    async fn a_failed_checkpoint_write_is_retried_without_new_positions() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(1), ..Flaky::default() });
        let acks = acks();
        let mut committer = Committer::new(Checkpoint::new("p"), store.clone(), acks.clone(), Metrics::new("p"));
        acks.record(Position::SnapshotDone);
        assert!(committer.commit().await.is_err(), "the first write fails");
        // No new position arrives; the next tick must still store the snapshot's end.
        committer.commit().await.expect("second write");
        let saved = store.saved.lock().expect("lock").clone();
        assert_eq!(saved.len(), 1, "the failed write is retried");
        assert!(saved[0].snapshot.done);
        // Nothing new and nothing unsaved: no needless write.
        committer.commit().await.expect("idle");
        assert_eq!(store.saved.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn the_final_checkpoint_is_reported_failed_when_it_cannot_be_stored() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(usize::MAX), ..Flaky::default() });
        let acks = acks();
        acks.record(Position::SnapshotDone);
        let committer = Committer::new(Checkpoint::new("p"), store.clone(), acks, Metrics::new("p"));
        let stop = CancellationToken::new();
        stop.cancel();
        let result = committer.run(Duration::from_secs(60), stop, Duration::from_millis(500), || {}).await;
        assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
        assert!(store.saved.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn the_final_checkpoint_write_is_retried_within_the_grace_period() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(2), ..Flaky::default() });
        let acks = acks();
        acks.record(Position::SnapshotDone);
        let committer = Committer::new(Checkpoint::new("p"), store.clone(), acks, Metrics::new("p"));
        let stop = CancellationToken::new();
        stop.cancel();
        committer.run(Duration::from_secs(60), stop, Duration::from_secs(10), || {}).await.expect("stored after retries");
        assert!(store.saved.lock().expect("lock")[0].snapshot.done);
    }
}
