//! Query filters for resuming a snapshot after a given `_id`, and for the `_id` ranges of a
//! split snapshot.
//!
//! MongoDB compares values of different BSON types by a fixed type order, but `$gt` only
//! matches values of the same type bracket. A collection whose `_id`s mix types (numbers and
//! strings, say) would lose every document of a later type if the snapshot resumed with
//! `{_id: {$gt: last}}` alone, so the filter also takes every type that sorts after it.

use mongodb::bson::{doc, Bson, Document};

/// MongoDB's sort order of BSON types, as `$type` aliases, in brackets of equal rank.
const TYPE_ORDER: &[&[&str]] = &[
    &["minKey"],
    &["null", "undefined"],
    &["int", "long", "double", "decimal"],
    &["string", "symbol"],
    &["object"],
    &["array"],
    &["binData"],
    &["objectId"],
    &["bool"],
    &["date"],
    &["timestamp"],
    &["regex"],
    &["maxKey"],
];

fn bracket(value: &Bson) -> usize {
    let alias = match value {
        Bson::MinKey => "minKey",
        Bson::Null | Bson::Undefined => "null",
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => "int",
        Bson::String(_) | Bson::Symbol(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Timestamp(_) => "timestamp",
        Bson::RegularExpression(_) => "regex",
        Bson::MaxKey => "maxKey",
        // JavaScript code and DB pointers cannot be `_id`s in practice; sort them last.
        _ => "maxKey",
    };
    TYPE_ORDER
        .iter()
        .position(|b| b.contains(&alias))
        .unwrap_or(TYPE_ORDER.len() - 1)
}

/// Filter for every document whose `_id` sorts after `last`.
pub fn after_id(last: &Bson) -> Document {
    let later: Vec<&str> = TYPE_ORDER[bracket(last) + 1..]
        .iter()
        .flat_map(|b| b.iter().copied())
        .collect();
    if later.is_empty() {
        return doc! {"_id": {"$gt": last.clone()}};
    }
    doc! {"$or": [
        {"_id": {"$gt": last.clone()}},
        {"_id": {"$type": later}},
    ]}
}

/// Filter for every document whose `_id` sorts at or before `last`.
pub fn up_to_id(last: &Bson) -> Document {
    let earlier: Vec<&str> = TYPE_ORDER[..bracket(last)].iter().flat_map(|b| b.iter().copied()).collect();
    if earlier.is_empty() {
        return doc! {"_id": {"$lte": last.clone()}};
    }
    doc! {"$or": [
        {"_id": {"$lte": last.clone()}},
        {"_id": {"$type": earlier}},
    ]}
}

/// Filter for the documents whose `_id` sorts after `after` (from the first when `None`) and
/// at or before `up_to` (to the last when `None`).
pub fn between(after: Option<&Bson>, up_to: Option<&Bson>) -> Document {
    match (after.map(after_id), up_to.map(up_to_id)) {
        (None, None) => Document::new(),
        (Some(f), None) | (None, Some(f)) => f,
        (Some(a), Some(b)) => doc! {"$and": [a, b]},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    #[test]
    fn numbers_resume_into_strings_objectids_and_later_types() {
        let f = after_id(&Bson::Int32(5));
        let types = f.get_array("$or").expect("or")[1]
            .as_document()
            .and_then(|d| d.get_document("_id").ok())
            .and_then(|d| d.get_array("$type").ok())
            .expect("types")
            .clone();
        let types: Vec<&str> = types.iter().filter_map(|t| t.as_str()).collect();
        assert!(types.contains(&"string"));
        assert!(types.contains(&"objectId"));
        assert!(!types.contains(&"int") && !types.contains(&"double"));
    }

    #[test]
    fn objectids_resume_into_later_brackets_only() {
        let f = after_id(&Bson::ObjectId(ObjectId::new()));
        let text = f.to_string();
        assert!(text.contains("bool") && text.contains("date"));
        assert!(!text.contains("\"string\""));
    }

    #[test]
    fn max_key_has_nothing_after() {
        assert_eq!(after_id(&Bson::MaxKey), doc! {"_id": {"$gt": Bson::MaxKey}});
    }

    #[test]
    fn a_range_takes_earlier_type_brackets_below_its_end_only() {
        let f = up_to_id(&Bson::String("m".into()));
        let text = f.to_string();
        assert!(text.contains("\"int\"") && text.contains("null") && !text.contains("objectId"), "{text}");
        assert_eq!(up_to_id(&Bson::MinKey), doc! {"_id": {"$lte": Bson::MinKey}});
        assert_eq!(between(None, None), Document::new());
        assert!(between(Some(&Bson::Int32(1)), Some(&Bson::Int32(9))).contains_key("$and"));
    }
}
