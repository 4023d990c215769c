//! Change events, read straight from raw BSON into what the pipeline does with them.
//!
//! Pure: no I/O. Each event becomes one [`Action`]; the stream loop carries it out.

use mongodb::bson::{RawBsonRef, RawDocument, Timestamp};

/// What one change event asks of the pipeline.
#[derive(Debug, PartialEq)]
pub enum Action<'a> {
    /// Index the full document (insert, replace, update with its looked-up document).
    Upsert {
        /// Database.
        db: &'a str,
        /// Collection.
        coll: &'a str,
        /// The document's `_id`.
        id: RawBsonRef<'a>,
        /// The full document.
        doc: &'a RawDocument,
        /// Cluster time of the change.
        time: Timestamp,
        /// The update's `updateDescription` (updated and removed fields), when the stream
        /// keeps it (for scripts).
        update: Option<&'a RawDocument>,
        /// The document before the change (`fullDocumentBeforeChange`), when the stream asks
        /// for pre-images and the collection keeps them.
        before: Option<&'a RawDocument>,
    },
    /// Delete the document (delete, or update whose lookup found nothing: the document was
    /// deleted since, and that delete follows in the stream).
    Delete {
        /// Database.
        db: &'a str,
        /// Collection.
        coll: &'a str,
        /// The document's `_id`.
        id: RawBsonRef<'a>,
        /// Cluster time of the change.
        time: Timestamp,
        /// The deleted document (`fullDocumentBeforeChange`), when the stream asks for
        /// pre-images and the collection keeps them.
        before: Option<&'a RawDocument>,
    },
    /// The change carries no document (the stream runs without `updateLookup` after an
    /// event too large for MongoDB's 16 MB limit): read the document by `_id` now.
    Lookup {
        /// Database.
        db: &'a str,
        /// Collection.
        coll: &'a str,
        /// The document's `_id`.
        id: RawBsonRef<'a>,
        /// Cluster time of the change.
        time: Timestamp,
    },
    /// The collection was dropped.
    Drop {
        /// Database.
        db: &'a str,
        /// Collection.
        coll: &'a str,
        /// Cluster time of the drop.
        time: Option<Timestamp>,
    },
    /// The collection was renamed to `to_db.to_coll`.
    Rename {
        /// Database.
        db: &'a str,
        /// Old collection name.
        coll: &'a str,
        /// New database.
        to_db: &'a str,
        /// New collection name.
        to_coll: &'a str,
        /// Cluster time of the rename.
        time: Timestamp,
    },
    /// The database was dropped (its collections' drop events came first).
    DropDatabase {
        /// Database.
        db: &'a str,
    },
    /// The stream ended (database dropped under a database-level stream); re-open after it.
    Invalidate,
    /// An event monsoon does not act on (create, createIndexes, modify, ...).
    Ignore {
        /// The operation type.
        op: &'a str,
    },
}

/// Why an event could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("change event has no valid `{field}`")]
pub struct Malformed {
    /// The missing or mistyped field.
    pub field: &'static str,
}

fn field<'a>(doc: &'a RawDocument, name: &'static str) -> Result<RawBsonRef<'a>, Malformed> {
    doc.get(name)
        .ok()
        .flatten()
        .ok_or(Malformed { field: name })
}

fn str_field<'a>(doc: &'a RawDocument, name: &'static str) -> Result<&'a str, Malformed> {
    match field(doc, name)? {
        RawBsonRef::String(s) => Ok(s),
        _ => Err(Malformed { field: name }),
    }
}

impl Action<'_> {
    /// Cluster time of the change, when the event carries one.
    pub fn time(&self) -> Option<Timestamp> {
        match self {
            Action::Upsert { time, .. }
            | Action::Delete { time, .. }
            | Action::Lookup { time, .. }
            | Action::Rename { time, .. } => Some(*time),
            Action::Drop { time, .. } => *time,
            _ => None,
        }
    }
}

/// Read one change event.
///
/// # Errors
/// [`Malformed`] naming the field that is missing or of the wrong type.
pub fn parse(event: &RawDocument) -> Result<Action<'_>, Malformed> {
    // One pass over the event's top-level fields (looking each up by name would rescan the
    // event, and re-validate its keys, once per field).
    let mut op = None;
    let mut ns = None;
    let mut key = None;
    let mut time = None;
    let mut to = None;
    let mut full: Option<RawBsonRef<'_>> = None;
    let mut update = None;
    let mut before = None;
    for element in event.iter_elements() {
        let element = element.map_err(|_| Malformed { field: "event" })?;
        let slot = match element.key() {
            "operationType" => 0,
            "ns" => 1,
            "documentKey" => 2,
            "clusterTime" => 3,
            "to" => 4,
            "fullDocument" => 5,
            "updateDescription" => 6,
            "fullDocumentBeforeChange" => 7,
            _ => continue,
        };
        let value = element.value().map_err(|_| Malformed { field: "event" })?;
        match (slot, value) {
            (0, RawBsonRef::String(s)) => op = Some(s),
            (1, RawBsonRef::Document(d)) => ns = Some(d),
            (2, RawBsonRef::Document(d)) => key = Some(d),
            (3, RawBsonRef::Timestamp(t)) => time = Some(t),
            (4, RawBsonRef::Document(d)) => to = Some(d),
            (5, v) => full = Some(v),
            (6, RawBsonRef::Document(d)) => update = Some(d),
            (6, _) => {}
            (7, RawBsonRef::Document(d)) => before = Some(d),
            // `null`: no pre-image (not kept, or expired).
            (7, _) => {}
            (0, _) => return Err(Malformed { field: "operationType" }),
            (1, _) => return Err(Malformed { field: "ns" }),
            (2, _) => return Err(Malformed { field: "documentKey" }),
            (3, _) => return Err(Malformed { field: "clusterTime" }),
            _ => return Err(Malformed { field: "to" }),
        }
    }
    let op = op.ok_or(Malformed { field: "operationType" })?;
    let ns = || ns.ok_or(Malformed { field: "ns" });
    let time = || time.ok_or(Malformed { field: "clusterTime" });
    match op {
        "insert" | "update" | "replace" | "delete" => {
            let ns = ns()?;
            let db = str_field(ns, "db")?;
            let coll = str_field(ns, "coll")?;
            let key = key.ok_or(Malformed { field: "documentKey" })?;
            let id = field(key, "_id")?;
            let time = time()?;
            match (op, full) {
                ("delete", _) | (_, Some(RawBsonRef::Null)) => Ok(Action::Delete { db, coll, id, time, before }),
                (_, None) => Ok(Action::Lookup { db, coll, id, time }),
                (_, Some(RawBsonRef::Document(doc))) => Ok(Action::Upsert { db, coll, id, doc, time, update, before }),
                _ => Err(Malformed {
                    field: "fullDocument",
                }),
            }
        }
        "drop" => {
            let ns = ns()?;
            Ok(Action::Drop {
                db: str_field(ns, "db")?,
                coll: str_field(ns, "coll")?,
                time: time().ok(),
            })
        }
        "rename" => {
            let ns = ns()?;
            let to = to.ok_or(Malformed { field: "to" })?;
            Ok(Action::Rename {
                db: str_field(ns, "db")?,
                coll: str_field(ns, "coll")?,
                to_db: str_field(to, "db")?,
                to_coll: str_field(to, "coll")?,
                time: time()?,
            })
        }
        "dropDatabase" => Ok(Action::DropDatabase {
            db: str_field(ns()?, "db")?,
        }),
        "invalidate" => Ok(Action::Invalidate),
        other => Ok(Action::Ignore { op: other }),
    }
}

/// What can still be read from an event [`parse`] refused: enough to dead-letter it beside
/// its document, when the event names one.
#[derive(Debug, Default, PartialEq)]
pub struct Salvaged<'a> {
    /// `ns.db`, when readable.
    pub db: Option<&'a str>,
    /// `ns.coll`, when readable.
    pub coll: Option<&'a str>,
    /// `documentKey._id`, when readable.
    pub id: Option<RawBsonRef<'a>>,
    /// `clusterTime`, when readable.
    pub time: Option<Timestamp>,
}

/// Read what is readable of an event, field by field, ignoring what is not.
pub fn salvage(event: &RawDocument) -> Salvaged<'_> {
    fn text<'a>(d: Option<&'a RawDocument>, name: &str) -> Option<&'a str> {
        match d.map(|d| d.get(name)) {
            Some(Ok(Some(RawBsonRef::String(s)))) => Some(s),
            _ => None,
        }
    }
    let sub = |name| match event.get(name) {
        Ok(Some(RawBsonRef::Document(d))) => Some(d),
        _ => None,
    };
    let ns = sub("ns");
    Salvaged {
        db: text(ns, "db"),
        coll: text(ns, "coll"),
        id: sub("documentKey").and_then(|k| k.get("_id").ok().flatten()),
        time: match event.get("clusterTime") {
            Ok(Some(RawBsonRef::Timestamp(t))) => Some(t),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, Bson, RawDocumentBuf};

    fn raw(d: mongodb::bson::Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).expect("raw")
    }

    const T: Timestamp = Timestamp { time: 1_700_000_000, increment: 3 };

    #[test]
    fn insert_update_replace_become_upserts_with_the_event_time() {
        for op in ["insert", "update", "replace"] {
            let e = raw(doc! {"_id": {"_data": "82"}, "operationType": op, "clusterTime": T,
                "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 7}, "fullDocument": {"_id": 7, "a": 1}});
            match parse(&e).expect("parse") {
                Action::Upsert { db, coll, id, doc, time, .. } => {
                    assert_eq!((db, coll, time), ("shop", "orders", T));
                    assert_eq!(id, RawBsonRef::Int32(7));
                    assert_eq!(doc.get_i32("a").expect("a"), 1);
                }
                other => panic!("{op}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_unreadable_event_keeps_what_can_be_read() {
        // `fullDocument` of the wrong type: `parse` refuses it, the rest is still readable.
        let e = raw(doc! {"operationType": "insert", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 5}, "fullDocument": "not a document"});
        assert_eq!(parse(&e), Err(Malformed { field: "fullDocument" }));
        assert_eq!(
            salvage(&e),
            Salvaged { db: Some("d"), coll: Some("c"), id: Some(RawBsonRef::Int32(5)), time: Some(T) }
        );
        let e = raw(doc! {"operationType": 3, "ns": "d.c"});
        assert!(parse(&e).is_err());
        assert_eq!(salvage(&e), Salvaged::default());
    }

    #[test]
    fn update_whose_lookup_found_nothing_is_a_delete() {
        let e = raw(doc! {"operationType": "update", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": "x"}, "fullDocument": Bson::Null});
        assert_eq!(
            parse(&e).expect("parse"),
            Action::Delete { db: "d", coll: "c", id: RawBsonRef::String("x"), time: T, before: None }
        );
    }

    #[test]
    fn pre_images_are_read_when_the_event_has_one() {
        let e = raw(doc! {"operationType": "delete", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 1}, "fullDocumentBeforeChange": {"_id": 1, "state": "a"}});
        let Ok(Action::Delete { before: Some(before), .. }) = parse(&e) else { panic!("{:?}", parse(&e)) };
        assert_eq!(before.get_str("state").expect("state"), "a");
        let e = raw(doc! {"operationType": "update", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "state": "b"}, "fullDocumentBeforeChange": {"_id": 1, "state": "a"}});
        let Ok(Action::Upsert { before: Some(before), doc, .. }) = parse(&e) else { panic!("{:?}", parse(&e)) };
        assert_eq!((before.get_str("state").expect("a"), doc.get_str("state").expect("b")), ("a", "b"));
        // `null`: the collection keeps no pre-images.
        let e = raw(doc! {"operationType": "delete", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 1}, "fullDocumentBeforeChange": Bson::Null});
        assert!(matches!(parse(&e), Ok(Action::Delete { before: None, .. })));
    }

    #[test]
    fn change_without_a_full_document_asks_for_a_lookup() {
        let e = raw(doc! {"operationType": "update", "clusterTime": T, "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": "x"}});
        assert_eq!(
            parse(&e).expect("parse"),
            Action::Lookup { db: "d", coll: "c", id: RawBsonRef::String("x"), time: T }
        );
    }

    #[test]
    fn delete_drop_rename_invalidate_and_unknown() {
        let e = raw(doc! {"operationType": "delete", "clusterTime": T, "ns": {"db": "d", "coll": "c"}, "documentKey": {"_id": 1}});
        assert!(matches!(parse(&e), Ok(Action::Delete { .. })));
        let e = raw(doc! {"operationType": "drop", "clusterTime": T, "ns": {"db": "d", "coll": "c"}});
        assert!(matches!(parse(&e), Ok(Action::Drop { db: "d", coll: "c", .. })));
        let e = raw(doc! {"operationType": "rename", "clusterTime": T, "ns": {"db": "d", "coll": "a"}, "to": {"db": "d", "coll": "b"}});
        assert_eq!(
            parse(&e),
            Ok(Action::Rename { db: "d", coll: "a", to_db: "d", to_coll: "b", time: T })
        );
        let e = raw(doc! {"operationType": "invalidate", "clusterTime": T});
        assert_eq!(parse(&e), Ok(Action::Invalidate));
        let e = raw(doc! {"operationType": "createIndexes", "clusterTime": T});
        assert_eq!(parse(&e), Ok(Action::Ignore { op: "createIndexes" }));
    }

    #[test]
    fn missing_fields_are_named() {
        let e = raw(doc! {"operationType": "insert", "clusterTime": T, "ns": {"db": "d", "coll": "c"}});
        assert_eq!(parse(&e), Err(Malformed { field: "documentKey" }));
        let e = raw(doc! {"clusterTime": T});
        assert_eq!(parse(&e), Err(Malformed { field: "operationType" }));
    }
}
