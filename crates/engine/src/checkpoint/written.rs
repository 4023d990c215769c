//! The checkpoint's `written` record kept current while the pipeline runs: which index(es)
//! each namespace writes (its default index, those a mapping's index template or a script's
//! `_meta_monstache.index` chose), so drops, renames and the re-snapshot sweep reach every
//! index a namespace wrote.
//!
//! The transform stage keeps the book, in the order it hands writes on: each change of the
//! book is a [`Position`] it hands on before the first write the change covers, so a
//! checkpoint past a write always knows its index.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::checkpoint::Position;
use crate::config::Routing;

/// Whether the `written` entry `list` (comma-separated index names) holds `index`.
pub fn lists(list: &str, index: &str) -> bool {
    list.split(',').any(|i| i == index)
}

/// `written`, as the pipeline runs.
pub struct IndexBook {
    written: Mutex<BTreeMap<String, String>>,
    routing: Routing,
}

impl IndexBook {
    /// The book as the checkpoint left it.
    pub fn new(written: BTreeMap<String, String>, routing: Routing) -> Self {
        Self { written: Mutex::new(written), routing }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note that `ns` writes `index`: the position to hand on before that write when this is
    /// new, `None` when the book knew it.
    ///
    /// # Errors
    /// The other namespace already writing `index`, if one does: a drop of either would delete
    /// the other's documents. (A namespace the pipeline no longer syncs writes nowhere.)
    pub fn note(&self, ns: &str, index: &str) -> Result<Option<Position>, String> {
        let mut written = self.lock();
        if written.get(ns).is_some_and(|list| lists(list, index)) {
            return Ok(None);
        }
        let shares = |(other, list): (&String, &String)| {
            other != ns && lists(list, index) && other.split_once('.').is_some_and(|(d, c)| self.routing.includes(d, c))
        };
        if let Some((other, _)) = written.iter().find(|e| shares(*e)) {
            return Err(other.clone());
        }
        let list = match written.get(ns) {
            Some(list) => format!("{list},{index}"),
            None => index.to_owned(),
        };
        written.insert(ns.to_owned(), list.clone());
        Ok(Some(Position::Written { ns: ns.to_owned(), index: list }))
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

    /// Forget `ns` (it was dropped): the position to hand on after its drop, when it was in
    /// the book.
    pub fn forget(&self, ns: &str) -> Option<Position> {
        self.lock().remove(ns).map(|_| Position::Forgotten { ns: ns.to_owned() })
    }

    /// Every namespace recorded.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}
