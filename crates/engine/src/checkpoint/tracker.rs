//! Ordered acknowledgement: which position may be checkpointed.
//!
//! Every write that enters the pipeline gets a sequence number, in source order. Writes are
//! acknowledged out of order (several bulk requests in flight). A *position* (resume
//! token, snapshot `_id`) is recorded after the writes it covers; it becomes committable only
//! when every write registered before it has been acknowledged.
//!
//! # Invariants
//! - The committed position never passes an unacknowledged write.
//! - Positions come out in the order they were recorded, each once.
//! - Memory is proportional to writes in flight, which the bounded queues limit.

use std::collections::VecDeque;

/// Sequence number of one write.
pub type Seq = u64;

/// Tracks acknowledgements and hands out positions that are safe to commit.
#[derive(Debug)]
pub struct Tracker<P> {
    /// Next sequence number to hand out.
    next: Seq,
    /// Every write with a sequence number below this is acknowledged.
    acked_below: Seq,
    /// Acknowledgement flags of the writes from `acked_below` on (acknowledged out of
    /// order): index 0 is `acked_below`. A flat ring, not a tree: bulk requests in flight
    /// acknowledge out of order, so nearly every acknowledgement lands here first.
    acked_ahead: VecDeque<bool>,
    /// Number of `true` flags in `acked_ahead`.
    ahead_count: u64,
    /// Recorded positions, each covering every write with a smaller sequence number.
    positions: VecDeque<(Seq, P)>,
}

impl<P> Default for Tracker<P> {
    fn default() -> Self {
        Self {
            next: 0,
            acked_below: 0,
            acked_ahead: VecDeque::new(),
            ahead_count: 0,
            positions: VecDeque::new(),
        }
    }
}

impl<P> Tracker<P> {
    /// A tracker with no writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a new write; returns its sequence number.
    pub fn register(&mut self) -> Seq {
        let seq = self.next;
        self.next += 1;
        seq
    }

    /// Record a position covering every write registered so far.
    pub fn record(&mut self, position: P) {
        self.positions.push_back((self.next, position));
    }

    /// Acknowledge one write (it has a final outcome in the sink). Acknowledging a sequence
    /// number twice, or one never registered, is ignored.
    pub fn ack(&mut self, seq: Seq) {
        if seq < self.acked_below || seq >= self.next {
            return;
        }
        let idx = (seq - self.acked_below) as usize;
        if idx >= self.acked_ahead.len() {
            self.acked_ahead.resize(idx + 1, false);
        }
        if self.acked_ahead[idx] {
            return;
        }
        self.acked_ahead[idx] = true;
        self.ahead_count += 1;
        while self.acked_ahead.front() == Some(&true) {
            self.acked_ahead.pop_front();
            self.ahead_count -= 1;
            self.acked_below += 1;
        }
    }

    /// Take every recorded position that is now safe to commit, oldest first.
    pub fn take_committable(&mut self) -> Vec<P> {
        let mut out = Vec::new();
        while let Some((covers, _)) = self.positions.front() {
            if *covers > self.acked_below {
                break;
            }
            if let Some((_, p)) = self.positions.pop_front() {
                out.push(p);
            }
        }
        out
    }

    /// Writes registered but not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.next - self.acked_below - self.ahead_count
    }

    /// Whether every registered write is acknowledged.
    pub fn is_drained(&self) -> bool {
        self.acked_below == self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn position_waits_for_every_earlier_write() {
        let mut t = Tracker::new();
        let a = t.register();
        let b = t.register();
        t.record("after-b");
        let c = t.register();
        t.record("after-c");
        t.ack(b);
        t.ack(c);
        assert!(t.take_committable().is_empty(), "a is not acknowledged yet");
        t.ack(a);
        assert_eq!(t.take_committable(), vec!["after-b", "after-c"]);
        assert!(t.is_drained());
    }

    #[test]
    fn position_with_no_writes_is_committable_at_once() {
        let mut t: Tracker<&str> = Tracker::new();
        t.record("idle token");
        assert_eq!(t.take_committable(), vec!["idle token"]);
    }

    #[test]
    fn duplicate_and_unknown_acks_are_ignored() {
        let mut t = Tracker::new();
        let a = t.register();
        t.ack(a);
        t.ack(a);
        t.ack(99);
        let b = t.register();
        t.record("after-b");
        assert_eq!(t.in_flight(), 1);
        assert!(t.take_committable().is_empty());
        t.ack(b);
        assert_eq!(t.take_committable(), vec!["after-b"]);
    }

    proptest! {
        /// Whatever order acknowledgements arrive in, a committed position never covers an
        /// unacknowledged write, and every position is committed once all writes are acked.
        #[test]
        fn checkpoint_never_passes_unacked_event(
            ops in proptest::collection::vec(any::<bool>(), 1..200),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..200),
        ) {
            let mut t = Tracker::new();
            let mut seqs = Vec::new();
            let mut positions = 0u64;
            // A position's payload is the number of writes it covers.
            for is_write in &ops {
                if *is_write { seqs.push(t.register()); } else { t.record(seqs.len() as u64); positions += 1; }
            }
            let mut acked = vec![false; seqs.len()];
            let mut pending: Vec<Seq> = seqs.clone();
            let mut committed = Vec::new();
            for idx in order {
                if pending.is_empty() { break; }
                let seq = pending.remove(idx.index(pending.len()));
                t.ack(seq);
                acked[seq as usize] = true;
                for covers in t.take_committable() {
                    prop_assert!(acked[..covers as usize].iter().all(|a| *a), "position covering {} committed with an unacked write", covers);
                    committed.push(covers);
                }
            }
            for seq in pending { t.ack(seq); }
            committed.extend(t.take_committable());
            prop_assert_eq!(committed.len() as u64, positions);
            prop_assert!(committed.windows(2).all(|w| w[0] <= w[1]));
            prop_assert!(t.is_drained());
        }
    }
}
