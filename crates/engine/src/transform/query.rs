//! Evaluate a `keep` / `deleteWhen` query ([`monsoon_api::shape::Query`]) against a raw
//! document, with MongoDB's semantics for the operators it reads:
//!
//! - a path reaches into arrays of documents (`items.sku` matches when any item's `sku` does);
//! - an array field equals a value when one of its elements does (or the array itself);
//! - a missing field equals `null`; `$ne`/`$nin` match it;
//! - `$gt`/`$gte`/`$lt`/`$lte` compare within one type class (numbers with numbers, strings
//!   with strings, dates with dates, ...): a string is never greater than a number.

use std::cmp::Ordering;

use monsoon_api::shape::{Cond, Query};
use mongodb::bson::{Bson, RawBsonRef, RawDocument};

/// Whether `doc` matches `query`.
pub fn matches(query: &Query, doc: &RawDocument) -> bool {
    match query {
        Query::And(qs) => qs.iter().all(|q| matches(q, doc)),
        Query::Or(qs) => qs.iter().any(|q| matches(q, doc)),
        Query::Nor(qs) => !qs.iter().any(|q| matches(q, doc)),
        Query::Field(path, cond) => {
            let mut values = Vec::new();
            values_at(doc, path.segments(), &mut values);
            holds(cond, &values)
        }
    }
}

/// Every value at `path`, following arrays of documents.
fn values_at<'a>(doc: &'a RawDocument, path: &[String], out: &mut Vec<RawBsonRef<'a>>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(value) = doc.get(first).ok().flatten() else {
        return;
    };
    if rest.is_empty() {
        out.push(value);
        return;
    }
    match value {
        RawBsonRef::Document(d) => values_at(d, rest, out),
        RawBsonRef::Array(items) => {
            for item in items.into_iter().flatten() {
                if let RawBsonRef::Document(d) = item {
                    values_at(d, rest, out);
                }
            }
        }
        _ => {}
    }
}

fn holds(cond: &Cond, values: &[RawBsonRef<'_>]) -> bool {
    match cond {
        Cond::Eq(x) => equals(values, x),
        Cond::Ne(x) => !equals(values, x),
        Cond::In(xs) => xs.iter().any(|x| equals(values, x)),
        Cond::Nin(xs) => !xs.iter().any(|x| equals(values, x)),
        Cond::Exists(b) => values.is_empty() != *b,
        Cond::Not(c) => !holds(c, values),
        Cond::All(cs) => cs.iter().all(|c| holds(c, values)),
        Cond::Gt(x) => compares(values, x, |o| o == Ordering::Greater),
        Cond::Gte(x) => compares(values, x, |o| o != Ordering::Less),
        Cond::Lt(x) => compares(values, x, |o| o == Ordering::Less),
        Cond::Lte(x) => compares(values, x, |o| o != Ordering::Greater),
    }
}

fn equals(values: &[RawBsonRef<'_>], x: &Bson) -> bool {
    if values.is_empty() {
        return matches!(x, Bson::Null);
    }
    values.iter().any(|v| {
        compare(*v, x) == Some(Ordering::Equal)
            || match v {
                RawBsonRef::Array(items) => items.into_iter().flatten().any(|e| compare(e, x) == Some(Ordering::Equal)),
                _ => false,
            }
    })
}

fn compares(values: &[RawBsonRef<'_>], x: &Bson, accept: impl Fn(Ordering) -> bool) -> bool {
    values.iter().any(|v| match v {
        RawBsonRef::Array(items) => items.into_iter().flatten().any(|e| compare(e, x).is_some_and(&accept)),
        v => compare(*v, x).is_some_and(&accept),
    })
}

enum Num {
    Int(i64),
    Float(f64),
}

fn raw_num(v: RawBsonRef<'_>) -> Option<Num> {
    match v {
        RawBsonRef::Int32(i) => Some(Num::Int(i.into())),
        RawBsonRef::Int64(i) => Some(Num::Int(i)),
        RawBsonRef::Double(f) => Some(Num::Float(f)),
        _ => None,
    }
}

fn bson_num(v: &Bson) -> Option<Num> {
    match v {
        Bson::Int32(i) => Some(Num::Int((*i).into())),
        Bson::Int64(i) => Some(Num::Int(*i)),
        Bson::Double(f) => Some(Num::Float(*f)),
        _ => None,
    }
}

fn compare_nums(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
        (Num::Int(a), Num::Float(b)) => (a as f64).partial_cmp(&b),
        (Num::Float(a), Num::Int(b)) => a.partial_cmp(&(b as f64)),
        (Num::Float(a), Num::Float(b)) => a.partial_cmp(&b),
    }
}

/// Order of `v` against `x` when they are of one type class; `None` otherwise.
fn compare(v: RawBsonRef<'_>, x: &Bson) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (raw_num(v), bson_num(x)) {
        return compare_nums(a, b);
    }
    match (v, x) {
        (RawBsonRef::String(a), Bson::String(b)) => Some(a.cmp(b.as_str())),
        (RawBsonRef::Boolean(a), Bson::Boolean(b)) => Some(a.cmp(b)),
        (RawBsonRef::DateTime(a), Bson::DateTime(b)) => Some(a.timestamp_millis().cmp(&b.timestamp_millis())),
        (RawBsonRef::ObjectId(a), Bson::ObjectId(b)) => Some(a.bytes().cmp(&b.bytes())),
        (RawBsonRef::Timestamp(a), Bson::Timestamp(b)) => Some((a.time, a.increment).cmp(&(b.time, b.increment))),
        (RawBsonRef::Null | RawBsonRef::Undefined, Bson::Null) => Some(Ordering::Equal),
        (RawBsonRef::Document(_) | RawBsonRef::Array(_), Bson::Document(_) | Bson::Array(_)) => {
            let owned = Bson::try_from(v.to_raw_bson()).ok()?;
            (owned == *x).then_some(Ordering::Equal)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, DateTime, RawDocumentBuf};
    use serde_json::json;

    fn check(q: serde_json::Value, d: mongodb::bson::Document) -> bool {
        let q = Query::parse(&q).expect("query");
        matches(&q, &RawDocumentBuf::from_document(&d).expect("raw"))
    }

    #[test]
    fn equality_existence_and_missing_fields() {
        let d = doc! {"status": "published", "n": 5, "deletedAt": Bson::Null, "tags": ["a", "b"]};
        assert!(check(json!({"status": "published"}), d.clone()));
        assert!(!check(json!({"status": "draft"}), d.clone()));
        assert!(check(json!({"n": 5.0}), d.clone()), "numbers compare across types");
        assert!(check(json!({"tags": "b"}), d.clone()), "an array equals one of its elements");
        assert!(check(json!({"tags": ["a", "b"]}), d.clone()), "or itself");
        assert!(check(json!({"deletedAt": {"$exists": true}}), d.clone()));
        assert!(!check(json!({"gone": {"$exists": true}}), d.clone()));
        assert!(check(json!({"gone": null}), d.clone()), "a missing field equals null");
        assert!(check(json!({"gone": {"$ne": 1}}), d.clone()));
        assert!(check(json!({"status": {"$in": ["x", "published"]}}), d.clone()));
        assert!(check(json!({"status": {"$nin": ["x"]}}), d));
    }

    #[test]
    fn ranges_stay_within_a_type_class() {
        let d = doc! {"n": 5, "s": "m", "at": DateTime::from_millis(1_700_000_000_000)};
        assert!(check(json!({"n": {"$gt": 4, "$lte": 5}}), d.clone()));
        assert!(!check(json!({"n": {"$gt": "4"}}), d.clone()), "a number is not greater than a string");
        assert!(check(json!({"s": {"$gte": "a", "$lt": "z"}}), d.clone()));
        assert!(check(json!({"at": {"$gt": {"$date": "2023-01-01T00:00:00Z"}}}), d.clone()));
        assert!(check(json!({"n": {"$not": {"$gt": 10}}}), d));
    }

    #[test]
    fn paths_reach_into_sub_documents_and_arrays_of_documents() {
        let d = doc! {"user": {"role": "admin"}, "items": [{"sku": "a"}, {"sku": "b", "qty": 3}]};
        assert!(check(json!({"user.role": "admin"}), d.clone()));
        assert!(check(json!({"items.sku": "b"}), d.clone()));
        assert!(check(json!({"items.qty": {"$gte": 3}}), d.clone()));
        assert!(!check(json!({"items.sku": "c"}), d.clone()));
        assert!(check(json!({"$or": [{"items.sku": "c"}, {"user.role": "admin"}]}), d.clone()));
        assert!(!check(json!({"$nor": [{"user.role": "admin"}]}), d.clone()));
        assert!(check(json!({"user": {"role": "admin"}}), d));
    }
}
