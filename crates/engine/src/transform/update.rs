//! A change's own version of a document: its pre-image (`fullDocumentBeforeChange`) with the
//! change's update description applied, as MongoDB applied it.
//!
//! Pure. An update event's `fullDocument` is a lookup made when the stream reads the event, so
//! a document changed again before then shows the later version; the pre-image and the
//! description give the version this change made. Used where each change's version matters
//! (time machines).

use mongodb::bson::{Bson, Document, RawDocument, RawDocumentBuf};

/// The document `before` became through the update described by `description`
/// (`removedFields`, then `truncatedArrays`, then `updatedFields`, each a dotted path whose
/// numeric parts index arrays; setting past an array's end pads it with `null`, as MongoDB
/// does).
///
/// # Errors
/// A description or document that does not read as one, or a path through a value that is
/// neither a document nor an array.
pub fn apply(before: &RawDocument, description: &RawDocument) -> Result<RawDocumentBuf, String> {
    let mut doc: Document = before.try_into().map_err(|e| format!("pre-image: {e}"))?;
    let description: Document = description.try_into().map_err(|e| format!("update description: {e}"))?;
    for removed in array(&description, "removedFields")? {
        let path = removed.as_str().ok_or_else(|| format!("`removedFields` holds {removed}, not a path"))?;
        remove(&mut doc, path)?;
    }
    for truncated in array(&description, "truncatedArrays")? {
        let t = truncated.as_document().ok_or_else(|| format!("`truncatedArrays` holds {truncated}"))?;
        let (Ok(field), Some(size)) = (t.get_str("field"), t.get("newSize").and_then(Bson::as_i64).or_else(|| t.get_i32("newSize").ok().map(i64::from))) else {
            return Err(format!("`truncatedArrays` holds {t}, not a field and a newSize"));
        };
        if let Some(Bson::Array(a)) = get_mut(&mut doc, field)? {
            a.truncate(usize::try_from(size).unwrap_or(0));
        }
    }
    match description.get("updatedFields") {
        None | Some(Bson::Null) => {}
        Some(Bson::Document(set)) => {
            for (path, value) in set {
                set_path(&mut doc, path, value.clone())?;
            }
        }
        Some(other) => return Err(format!("`updatedFields` is not a document: {other}")),
    }
    RawDocumentBuf::from_document(&doc).map_err(|e| format!("version: {e}"))
}

fn array<'a>(description: &'a Document, name: &str) -> Result<&'a [Bson], String> {
    match description.get(name) {
        None | Some(Bson::Null) => Ok(&[]),
        Some(Bson::Array(a)) => Ok(a),
        Some(other) => Err(format!("`{name}` is not an array: {other}")),
    }
}

/// The member `key` of a document, or element `key` of an array.
fn child<'a>(value: &'a mut Bson, key: &str) -> Option<&'a mut Bson> {
    match value {
        Bson::Document(d) => d.get_mut(key),
        Bson::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    }
}

/// The value at `path`, when there is one.
fn get_mut<'a>(doc: &'a mut Document, path: &str) -> Result<Option<&'a mut Bson>, String> {
    let mut parts = path.split('.');
    let first = parts.next().ok_or_else(|| "an empty path".to_string())?;
    let mut at = match doc.get_mut(first) {
        Some(v) => v,
        None => return Ok(None),
    };
    for part in parts {
        at = match child(at, part) {
            Some(v) => v,
            None => return Ok(None),
        };
    }
    Ok(Some(at))
}

/// `$unset` of `path`: a member goes, an array element becomes `null`.
fn remove(doc: &mut Document, path: &str) -> Result<(), String> {
    let Some((parent, last)) = path.rsplit_once('.') else {
        doc.remove(path);
        return Ok(());
    };
    match get_mut(doc, parent)? {
        Some(Bson::Document(d)) => {
            d.remove(last);
        }
        Some(Bson::Array(a)) => {
            if let Some(slot) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *slot = Bson::Null;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `$set` of `path`, creating the documents on the way.
fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    let (last, parents) = parts.split_last().ok_or_else(|| "an empty path".to_string())?;
    let Some((first, rest)) = parents.split_first() else {
        doc.insert(*last, value);
        return Ok(());
    };
    let mut at = doc.entry((*first).to_string()).or_insert_with(|| Bson::Document(Document::new()));
    for part in rest {
        at = step_into(at, part, path)?;
    }
    match at {
        Bson::Document(d) => {
            d.insert(*last, value);
        }
        Bson::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("`{path}`: `{last}` is not an index of the array there"))?;
            if a.len() <= i {
                a.resize(i + 1, Bson::Null);
            }
            a[i] = value;
        }
        _ => return Err(format!("`{path}` goes through a value that is not a document or array")),
    }
    Ok(())
}

/// One step down `path` for a `$set`: a missing member becomes a document.
fn step_into<'a>(at: &'a mut Bson, part: &str, path: &str) -> Result<&'a mut Bson, String> {
    match at {
        Bson::Document(d) => Ok(d.entry(part.to_string()).or_insert_with(|| Bson::Document(Document::new()))),
        Bson::Array(a) => {
            let i: usize = part.parse().map_err(|_| format!("`{path}`: `{part}` is not an index of the array there"))?;
            if a.len() <= i {
                a.resize(i + 1, Bson::Null);
            }
            if a[i] == Bson::Null {
                a[i] = Bson::Document(Document::new());
            }
            Ok(&mut a[i])
        }
        _ => Err(format!("`{path}` goes through a value that is not a document or array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn raw(d: Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).expect("raw")
    }

    fn applied(before: Document, description: Document) -> Document {
        let out = apply(&raw(before), &raw(description)).expect("applies");
        out.to_document().expect("document")
    }

    #[test]
    fn sets_unsets_and_truncates_as_mongodb_does() {
        let before = doc! {"_id": 1, "n": 1, "a": {"b": 1, "c": 2}, "list": [1, 2, 3, 4], "gone": true};
        let description = doc! {
            "updatedFields": {"n": 2, "a.b": 5, "new.deep": "x", "list.1": 20, "list.6": 7},
            "removedFields": ["gone", "a.c"],
            "truncatedArrays": [{"field": "list", "newSize": 3}],
        };
        assert_eq!(
            applied(before, description),
            doc! {"_id": 1, "n": 2, "a": {"b": 5}, "list": [1, 20, 3, Bson::Null, Bson::Null, Bson::Null, 7], "new": {"deep": "x"}}
        );
    }

    #[test]
    fn an_unset_array_element_becomes_null_and_a_path_through_a_scalar_is_refused() {
        assert_eq!(applied(doc! {"l": [1, 2]}, doc! {"removedFields": ["l.0"]}), doc! {"l": [Bson::Null, 2]});
        assert!(apply(&raw(doc! {"n": 1}), &raw(doc! {"updatedFields": {"n.x": 1}})).is_err());
    }
}
