//! The tracker shared by the sink (which numbers writes, records positions among them and
//! acknowledges them) and the committer (which stores what is committable).

use std::sync::{Mutex, MutexGuard};

use super::tracker::{Seq, Tracker};
use super::Position;

/// The pipeline's [`Tracker`] of positions, behind a lock.
#[derive(Default)]
pub struct Acks {
    tracker: Mutex<Tracker<Position>>,
}

impl Acks {
    /// The tracker, locked. A panic while holding the lock cannot leave it half-updated in a
    /// way that loses data (each method is a few integer updates), so poisoning is ignored.
    pub fn tracker(&self) -> MutexGuard<'_, Tracker<Position>> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Positions now safe to checkpoint, oldest first.
    pub fn take_committable(&self) -> Vec<Position> {
        self.tracker().take_committable()
    }

    /// Record a position after every write numbered so far.
    pub fn record(&self, position: Position) {
        self.tracker().record(position);
    }

    /// Acknowledge writes; returns how many are still in flight.
    pub fn ack(&self, seqs: &[Seq]) -> u64 {
        let mut t = self.tracker();
        for s in seqs {
            t.ack(*s);
        }
        t.in_flight()
    }
}
