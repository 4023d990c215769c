//! The checkpoint's `written` record kept current while the pipeline runs: which index(es)
//! each namespace writes (its default index, those a mapping's index template or a script's
//! `_meta_monstache.index` chose), so drops, renames and the re-snapshot sweep reach every
//! index a namespace wrote.
//!
//! The transform stage keeps the book, in the order it hands writes on: each change of the
//! book is a [`Position`] it hands on before the first write the change covers, so a
//! checkpoint past a write always knows its index.
//!
//! A namespace lists at most [`LISTED`] indexes: one whose documents choose more (an index
//! template over many values, a script) ends its list with [`SPREAD`], and its documents in the
//! indexes beyond are found through their location records (which every such document has)
//! when the namespace is dropped or swept. The checkpoint, a worker's ConfigMap of at most
//! 1 MiB, so stays small whatever the documents choose.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::checkpoint::Position;
use crate::config::Routing;

/// Most indexes one namespace lists in `written`.
pub const LISTED: usize = 32;
/// Ends the list of a namespace that wrote more indexes than [`LISTED`] (not an index name:
/// Elasticsearch refuses `*` in one).
pub const SPREAD: &str = "*";

/// Whether the `written` entry `list` (comma-separated index names) holds `index`.
pub fn lists(list: &str, index: &str) -> bool {
    list.split(',').any(|i| i == index)
}

/// `written`, as the pipeline runs.
pub struct IndexBook {
    written: Mutex<Book>,
    routing: Routing,
    /// Indexes several namespaces may write (`spec.sharedIndexes`).
    shared: BTreeSet<String>,
}

struct Book {
    /// As in the checkpoint.
    listed: BTreeMap<String, String>,
    /// Indexes beyond the listed ones seen in this run, by namespace (for the shared-index
    /// check only; not in the checkpoint).
    beyond: BTreeMap<String, BTreeSet<String>>,
}

impl Book {
    fn holds(&self, ns: &str, index: &str) -> bool {
        self.listed.get(ns).is_some_and(|list| lists(list, index)) || self.beyond.get(ns).is_some_and(|b| b.contains(index))
    }
}

impl IndexBook {
    /// The book as the checkpoint left it.
    pub fn new(written: BTreeMap<String, String>, routing: Routing) -> Self {
        Self { written: Mutex::new(Book { listed: written, beyond: BTreeMap::new() }), routing, shared: BTreeSet::new() }
    }

    /// The book, with indexes several namespaces may write.
    pub fn with_shared(self, shared: BTreeSet<String>) -> Self {
        Self { shared, ..self }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Note that `ns` writes `index`: the position to hand on before that write when this is
    /// new, `None` when the book knew it.
    ///
    /// # Errors
    /// The other namespace already writing `index`, if one does: a drop of either would delete
    /// the other's documents. (A namespace the pipeline no longer syncs writes nowhere.)
    pub fn note(&self, ns: &str, index: &str) -> Result<Option<Position>, String> {
        let mut book = self.lock();
        if book.holds(ns, index) {
            return Ok(None);
        }
        let live = |other: &String| other != ns && other.split_once('.').is_some_and(|(d, c)| self.routing.includes(d, c));
        let shared = book.listed.keys().chain(book.beyond.keys()).find(|other| live(other) && book.holds(other, index));
        if let Some(other) = shared.filter(|_| !self.shared.contains(index)) {
            return Err(other.clone());
        }
        let list = match book.listed.get(ns).cloned() {
            None => index.to_owned(),
            Some(list) if list.split(',').count() < LISTED => format!("{list},{index}"),
            Some(list) => {
                book.beyond.entry(ns.to_owned()).or_default().insert(index.to_owned());
                if lists(&list, SPREAD) {
                    return Ok(None);
                }
                format!("{list},{SPREAD}")
            }
        };
        book.listed.insert(ns.to_owned(), list.clone());
        Ok(Some(Position::Written { ns: ns.to_owned(), index: list }))
    }

    /// Whether `ns` wrote more indexes than it lists ([`SPREAD`]).
    pub fn is_spread(&self, ns: &str) -> bool {
        self.lock().listed.get(ns).is_some_and(|list| lists(list, SPREAD))
    }

    /// Every index `db.coll` writes or has written that the book lists: its default and those
    /// its documents chose (see [`IndexBook::is_spread`] for the others).
    pub fn indexes_of(&self, db: &str, coll: &str) -> Vec<String> {
        let mut out = vec![self.routing.index_for(db, coll)];
        if let Some(list) = self.lock().listed.get(&format!("{db}.{coll}")) {
            out.extend(list.split(',').filter(|i| *i != SPREAD).map(str::to_owned));
        }
        out.sort();
        out.dedup();
        out
    }

    /// Forget `ns` (it was dropped): the position to hand on after its drop, when it was in
    /// the book.
    pub fn forget(&self, ns: &str) -> Option<Position> {
        let mut book = self.lock();
        book.beyond.remove(ns);
        book.listed.remove(ns).map(|_| Position::Forgotten { ns: ns.to_owned() })
    }

    /// Every namespace recorded.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().listed.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> Routing {
        Routing { include: vec![crate::config::NamespacePattern::parse("d.*").expect("pattern")], ..Routing::default() }
    }

    /// A namespace whose documents choose many indexes lists the first [`LISTED`] and then
    /// only says it wrote more: the checkpoint stays small however many it writes, the indexes
    /// beyond are still checked against other namespaces in this run, and a drop knows to find
    /// them through the location records.
    #[test]
    fn a_namespace_lists_a_bounded_number_of_indexes() {
        let book = IndexBook::new(BTreeMap::new(), routing());
        let mut last = None;
        let mut notes = 0;
        for i in 0..1000 {
            if let Some(Position::Written { index, .. }) = book.note("d.t", &format!("t-{i}")).expect("not shared") {
                notes += 1;
                last = Some(index);
            }
        }
        let last = last.expect("noted");
        assert_eq!(notes, LISTED + 1, "each listed index once, then the mark once");
        assert_eq!(last.split(',').count(), LISTED + 1);
        assert!(last.ends_with(",*") && last.len() < 400, "{last}");
        assert!(book.is_spread("d.t"));
        assert!(!book.indexes_of("d", "t").iter().any(|i| i == "*"));
        assert_eq!(book.note("d.other", "t-900"), Err("d.t".to_string()), "an index beyond the list is still checked");
        // Across a restart the checkpoint's list is kept as it is.
        let book = IndexBook::new(BTreeMap::from([("d.t".to_string(), last)]), routing());
        assert!(book.is_spread("d.t"));
        assert_eq!(book.note("d.t", "t-5000").expect("not shared"), None, "the mark covers every further index");
        assert!(book.forget("d.t").is_some() && !book.is_spread("d.t"));
    }
}
