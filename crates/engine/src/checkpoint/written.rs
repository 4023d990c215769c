//! The checkpoint's `written` record kept current while the pipeline runs: which index(es)
//! each namespace writes. Shared by the source (a namespace's default index, a mapping's index
//! template) and the transform stage's scripts (`_meta_monstache.index`), so drops, renames and
//! the re-snapshot sweep reach every index a namespace wrote.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::checkpoint::Position;
use crate::config::Routing;

/// Where positions are recorded, in order with the writes (the sink's tracker): the checkpoint
/// names the interface it needs and imports no stage.
pub trait Recorder: Send + Sync {
    /// Record `position` after every write numbered so far.
    fn record(&self, position: Position);
}

/// Whether the `written` entry `list` (comma-separated index names) holds `index`.
pub fn lists(list: &str, index: &str) -> bool {
    list.split(',').any(|i| i == index)
}

/// `written`, and where to record its changes.
pub struct IndexBook {
    written: Mutex<BTreeMap<String, String>>,
    shared: Arc<dyn Recorder>,
    routing: Routing,
}

impl IndexBook {
    /// The book as the checkpoint left it.
    pub fn new(written: BTreeMap<String, String>, shared: Arc<dyn Recorder>, routing: Routing) -> Self {
        Self { written: Mutex::new(written), shared, routing }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record that `ns` writes `index`, as a checkpoint position after every write sent so far
    /// (so before the first write to it is acknowledged). Returns the other namespace already
    /// writing it, if one does: a drop of either would delete the other's documents. (A
    /// namespace the pipeline no longer syncs writes nowhere.)
    pub fn note(&self, ns: &str, index: &str) -> Option<String> {
        let mut written = self.lock();
        if written.get(ns).is_some_and(|list| lists(list, index)) {
            return None;
        }
        let shares = |(other, list): (&String, &String)| {
            other != ns && lists(list, index) && other.split_once('.').is_some_and(|(d, c)| self.routing.includes(d, c))
        };
        if let Some((other, _)) = written.iter().find(|e| shares(*e)) {
            return Some(other.clone());
        }
        let list = match written.get(ns) {
            Some(list) => format!("{list},{index}"),
            None => index.to_owned(),
        };
        written.insert(ns.to_owned(), list.clone());
        self.shared.record(Position::Written { ns: ns.to_owned(), index: list });
        None
    }

    /// Every index `db.coll` writes or has written: its default and those its documents chose.
    pub fn indexes_of(&self, db: &str, coll: &str) -> Vec<String> {
        let mut out = vec![self.routing.index_for(db, coll)];
        if let Some(list) = self.lock().get(&format!("{db}.{coll}")) {
            out.extend(list.split(',').map(str::to_owned));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Forget `ns` (its drop was applied); true when it was recorded.
    pub fn forget(&self, ns: &str) -> bool {
        let removed = self.lock().remove(ns).is_some();
        if removed {
            self.shared.record(Position::Forgotten { ns: ns.to_owned() });
        }
        removed
    }

    /// Every namespace recorded.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}
