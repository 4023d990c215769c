//! Merge patches (`spec.mergePatches`, Monstache's `enable-patches`): what a change of a
//! patched namespace becomes. Pure: [`Patches::decide`] turns the plain write a change became
//! into an [`Op::Patch`] carrying what the sink needs to add the change to the document's
//! history exactly (`sink::patches` does the read-modify-write):
//! - an insert, a replace or a snapshot read: the whole document;
//! - an update: its update description (as JSON, converted as documents are), applied by the
//!   sink to the previous version, and the looked-up document for a history that is missing;
//! - a delete: the document and its history go.
//!
//! Validation refuses mappings (but a fixed index), scripts, filters and GridFS files on a
//! patched namespace, so its writes are always the plain path's: the document as MongoDB holds
//! it, at its `_id`.

use std::sync::Arc;

use bytes::Bytes;
use monsoon_api::NamespacePattern;

use super::change::Doc;
use super::time_machine::{Logged, TimeMachine};
use crate::convert::{self, ConvertStats};
use crate::sink::patches::{Patch, PatchChange};
use crate::sink::{Op, Write};

/// The compiled `spec.mergePatches`.
#[derive(Debug)]
pub struct Patches {
    namespaces: Vec<NamespacePattern>,
    attribute: Arc<str>,
}

impl Patches {
    /// Compile a validated `spec.mergePatches`.
    ///
    /// # Errors
    /// A namespace that does not parse (validation refuses these first).
    pub fn new(spec: &monsoon_api::MergePatches) -> Result<Self, String> {
        let namespaces = spec.namespaces.iter().map(|n| NamespacePattern::parse(n)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { namespaces, attribute: Arc::from(spec.attribute.as_str()) })
    }

    /// Whether documents of `db.coll` keep a patch history.
    pub fn applies(&self, db: &str, coll: &str) -> bool {
        self.namespaces.iter().any(|p| p.matches(db, coll))
    }

    /// Turn `write`, the plain write `change` became, into its patch. Refusals stay as they
    /// are (dead-lettered in order); an update description that does not convert is refused.
    ///
    /// A change the time machine logs (`log`) carries where its entry goes: the sink writes it
    /// with the change's own version.
    pub fn decide(&self, change: &Doc, write: &mut Write, stats: &mut ConvertStats, log: Option<(&TimeMachine, &Logged)>) {
        let patch = match &write.op {
            Op::Index(source) => match change.update() {
                None => PatchChange::Whole { source: source.clone(), snapshot: change.from_snapshot },
                Some(update) => {
                    let mut description = Vec::with_capacity(update.as_bytes().len() + 16);
                    if let Err(e) = convert::write_document(update, false, &mut description, stats) {
                        write.op = Op::reject("malformed_bson", format!("the update description does not convert: {e}"), Some(source.clone()));
                        return;
                    }
                    PatchChange::Update { description: Bytes::from(description), lookup: Some(source.clone()) }
                }
            },
            Op::Delete => PatchChange::Delete,
            // Refusals; partial updates and creates are not made for these namespaces.
            Op::Update(_) | Op::Create(_) | Op::Reject(_) | Op::Patch(_) => return,
        };
        let mut patch = Patch { attribute: self.attribute.clone(), change: patch, log: None };
        write.op = Op::Patch(Box::new(patch.clone()));
        if let Some((tm, logged)) = log {
            patch.log = tm.patch_log(write, logged);
            write.op = Op::Patch(Box::new(patch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, RawBson, RawDocumentBuf};

    fn patches() -> Patches {
        Patches::new(&serde_json::from_value(serde_json::json!({"namespaces": ["shop.orders"]})).expect("spec")).expect("compiles")
    }

    fn change(update: Option<mongodb::bson::Document>, snapshot: bool) -> Doc {
        Doc {
            db: Arc::from("shop"),
            coll: Arc::from("orders"),
            id: RawBson::Int32(1),
            doc: Some(crate::transform::change::Body::Own(RawDocumentBuf::from_document(&doc! {"_id": 1, "n": 1}).expect("raw"))),
            version: 1,
            from_snapshot: snapshot,
            owned: true,
            extra: crate::transform::change::Extra::boxed(update.map(|u| RawDocumentBuf::from_document(&u).expect("raw")), None, None),
        }
    }

    fn decided(c: &Doc, op: Op) -> Op {
        let mut w = Write::new(Arc::from("shop.orders"), Arc::from("shop.orders"), "1".into(), 1, op);
        patches().decide(c, &mut w, &mut ConvertStats::default(), None);
        w.op
    }

    #[test]
    fn each_kind_of_change_becomes_its_patch() {
        let p = patches();
        assert!(p.applies("shop", "orders") && !p.applies("shop", "users"));
        let source = Bytes::from_static(b"{\"n\":1}");
        let Op::Patch(p) = decided(&change(None, true), Op::Index(source.clone())) else { panic!() };
        assert_eq!(&*p.attribute, "json-merge-patches");
        assert!(matches!(&p.change, PatchChange::Whole { source: s, snapshot: true } if *s == source));
        let oid = mongodb::bson::oid::ObjectId::parse_str("5a84a8b826993bde57c12893").expect("oid");
        let update = doc! {"updatedFields": {"a.1": oid, "b": 2}, "removedFields": ["c"], "truncatedArrays": [{"field": "d", "newSize": 1}]};
        let Op::Patch(p) = decided(&change(Some(update), false), Op::Index(source.clone())) else { panic!() };
        let PatchChange::Update { description, lookup } = &p.change else { panic!("{p:?}") };
        let description: serde_json::Value = serde_json::from_slice(description).expect("json");
        assert_eq!(
            description,
            serde_json::json!({"updatedFields": {"a.1": "5a84a8b826993bde57c12893", "b": 2}, "removedFields": ["c"], "truncatedArrays": [{"field": "d", "newSize": 1}]})
        );
        assert_eq!(lookup.as_ref(), Some(&source));
        assert!(matches!(decided(&change(None, false), Op::Delete), Op::Patch(p) if matches!(p.change, PatchChange::Delete)));
        let refused = Op::reject("invalid_id", String::new(), None);
        assert!(matches!(decided(&change(None, false), refused), Op::Reject(_)));
    }
}
