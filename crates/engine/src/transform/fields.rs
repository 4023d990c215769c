//! Include, exclude and rename fields while converting BSON to JSON: one walk over the raw
//! document, no second pass and no intermediate tree.
//!
//! A [`FieldPlan`] is a tree of the paths the mapping names. The walker consults it at each
//! key of the objects it names and writes everything else exactly as [`convert`] does.
//!
//! - `exclude: [a.b]`: `a.b` and everything under it is left out.
//! - `include: [a.b, c]`: only `a.b` (whole) and `c` (whole) are written; an object on the way
//!   (`a`) keeps only the included children.
//! - `rename: {a.b: x.y}`: the value of `a.b` is written as `y` inside `x` (created when the
//!   document has no `x`), replacing any `x.y` there; `a.b` itself is left out. Renamed
//!   values are written even when `include` does not name them.
//! - Paths stop at arrays: `a.b` where `a` is an array names nothing.

use mongodb::bson::{RawBsonRef, RawDocument};

use crate::convert::{self, bad_document, bad_element, document_body, element_header, read_element, too_deep, write_element, write_key, ConvertStats, Element, Error, MAX_DEPTH};

/// Which fields are written, and under which names.
#[derive(Debug, Default, Clone)]
pub struct FieldPlan {
    root: Node,
}

#[derive(Debug, Default, Clone)]
struct Node {
    children: Vec<(Box<[u8]>, Node)>,
    /// Left out (excluded, or moved by a rename).
    drop: bool,
    /// Written whole (an included path).
    whole: bool,
    /// Only named children are written (an `include` list applies here).
    filter: bool,
    /// On the way to an included path.
    included: bool,
    /// Values written at the end of this object: (key, source path from the root).
    incoming: Vec<(Box<[u8]>, Vec<String>)>,
    /// This node or a descendant receives renamed values: when the document lacks the object,
    /// it is created.
    receives: bool,
}

impl Node {
    fn child(&self, key: &[u8]) -> Option<(usize, &Node)> {
        self.children.iter().enumerate().find(|(_, (k, _))| &**k == key).map(|(i, (_, n))| (i, n))
    }

    fn child_mut(&mut self, key: &str) -> &mut Node {
        let at = match self.children.iter().position(|(k, _)| &**k == key.as_bytes()) {
            Some(i) => i,
            None => {
                let filter = self.filter;
                self.children.push((key.as_bytes().into(), Node { filter, ..Node::default() }));
                self.children.len() - 1
            }
        };
        &mut self.children[at].1
    }

    fn at(&mut self, path: &[String]) -> &mut Node {
        path.iter().fold(self, |node, seg| node.child_mut(seg))
    }
}

impl FieldPlan {
    /// A plan from a mapping's lists (paths already validated: non-empty dotted segments).
    pub fn new(include: &[Vec<String>], exclude: &[Vec<String>], rename: &[(Vec<String>, Vec<String>)]) -> Self {
        let mut root = Node::default();
        if !include.is_empty() {
            root.filter = true;
            for path in include {
                let mut node = &mut root;
                for seg in path {
                    node.filter = true;
                    node = node.child_mut(seg);
                    node.included = true;
                }
                node.whole = true;
            }
            // Everything under an included path is written, whatever else names it.
            fn unfilter(node: &mut Node, inside: bool) {
                let inside = inside || node.whole;
                if inside {
                    node.filter = false;
                }
                for (_, c) in &mut node.children {
                    unfilter(c, inside);
                }
            }
            unfilter(&mut root, false);
        }
        for path in exclude {
            root.at(path).drop = true;
        }
        for (from, to) in rename {
            root.at(from).drop = true;
            let (key, parent) = to.split_last().expect("validated: a non-empty path");
            let mut node = &mut root;
            node.receives = true;
            for seg in parent {
                node = node.child_mut(seg);
                node.receives = true;
                node.drop = false;
            }
            node.incoming.push((key.as_bytes().into(), from.clone()));
        }
        Self { root }
    }

    /// Whether the plan changes nothing (write the document as is).
    pub fn is_identity(&self) -> bool {
        self.root.children.is_empty() && self.root.incoming.is_empty() && !self.root.filter
    }

    /// Write `doc` as a JSON object without its top-level `_id`, following the plan, then the
    /// pre-rendered `extra` members (`"key":value`, keys in `extra_keys`, which replace fields
    /// of the same name).
    ///
    /// On error, `out` and `stats` are restored to their state before the call.
    ///
    /// # Errors
    /// The document's bytes are not valid BSON (as [`convert::write_document`]).
    pub fn write(&self, doc: &RawDocument, extra_keys: &[&str], extra: &[u8], out: &mut Vec<u8>, stats: &mut ConvertStats) -> Result<(), Error> {
        let start = out.len();
        let saved = *stats;
        out.reserve(doc.as_bytes().len() + extra.len());
        let mut walk = Walk { root: doc, extra_keys, stats };
        let result = walk.write_object(doc.as_bytes(), &self.root, 0, out, extra);
        if result.is_err() {
            out.truncate(start);
            *stats = saved;
        }
        result
    }
}

struct Walk<'a, 's> {
    root: &'a RawDocument,
    extra_keys: &'a [&'a str],
    stats: &'s mut ConvertStats,
}

impl Walk<'_, '_> {
    /// Write the object `doc` (whole document bytes) under `node`; `extra` goes at the end
    /// (the root object's only).
    fn write_object(&mut self, doc: &[u8], node: &Node, depth: usize, out: &mut Vec<u8>, extra: &[u8]) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        let body = document_body(doc).map_err(bad_document)?;
        out.push(b'{');
        let mut first = true;
        let mut seen = vec![false; if node.receives { node.children.len() } else { 0 }];
        let mut pos = 0;
        while pos < body.len() {
            let h = element_header(body, pos)?;
            let (value, next) = read_element(h.tag, body, h.value_at).map_err(|e| bad_element(h.key, e))?;
            pos = next;
            if depth == 0 && (h.key == b"_id" || self.extra_keys.iter().any(|k| k.as_bytes() == h.key)) {
                continue;
            }
            if node.incoming.iter().any(|(k, _)| &**k == h.key) {
                // Replaced by a renamed value, written below.
                continue;
            }
            let child = node.child(h.key);
            if let Some((i, _)) = child {
                if let Some(s) = seen.get_mut(i) {
                    *s = true;
                }
            }
            match child {
                Some((_, c)) if c.drop => continue,
                // Named only by an exclude or a rename source, outside the included paths.
                Some((_, c)) if node.filter && !(c.whole || c.included || c.receives) => continue,
                Some((_, c)) if c.whole && c.children.is_empty() => self.member(&mut first, h.key, h.short_key, value, depth, out)?,
                Some((_, c)) => match value {
                    Element::Document(d) => {
                        comma(&mut first, out);
                        write_key(h.key, h.short_key, out)?;
                        self.write_object(d, c, depth + 1, out, &[])?;
                    }
                    // A path into a value that is not an object: an include names nothing here,
                    // an exclude or rename below it leaves the value as it is.
                    _ if c.filter => continue,
                    _ => self.member(&mut first, h.key, h.short_key, value, depth, out)?,
                },
                None if node.filter => continue,
                None => self.member(&mut first, h.key, h.short_key, value, depth, out)?,
            }
        }
        self.incoming(node, &mut first, out)?;
        // Objects that receive renamed values but are not in the document: create them.
        for (i, (key, c)) in node.children.iter().enumerate() {
            if c.receives && !seen.get(i).copied().unwrap_or(true) {
                let mut probe = Vec::new();
                let mut inner_first = true;
                self.created(c, &mut inner_first, &mut probe, depth + 1)?;
                if !inner_first {
                    comma(&mut first, out);
                    write_key(key, None, out)?;
                    out.push(b'{');
                    out.extend_from_slice(&probe);
                    out.push(b'}');
                }
            }
        }
        if !extra.is_empty() {
            comma(&mut first, out);
            out.extend_from_slice(extra);
        }
        out.push(b'}');
        Ok(())
    }

    /// The members of an object the document does not have: only renamed values.
    fn created(&mut self, node: &Node, first: &mut bool, out: &mut Vec<u8>, depth: usize) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        self.incoming(node, first, out)?;
        for (key, c) in &node.children {
            if c.receives {
                let mut probe = Vec::new();
                let mut inner_first = true;
                self.created(c, &mut inner_first, &mut probe, depth + 1)?;
                if !inner_first {
                    comma(first, out);
                    write_key(key, None, out)?;
                    out.push(b'{');
                    out.extend_from_slice(&probe);
                    out.push(b'}');
                }
            }
        }
        Ok(())
    }

    fn incoming(&mut self, node: &Node, first: &mut bool, out: &mut Vec<u8>) -> Result<(), Error> {
        for (key, from) in &node.incoming {
            if let Some(value) = lookup(self.root, from) {
                comma(first, out);
                write_key(key, None, out)?;
                convert::write_value(value, out, self.stats)?;
            }
        }
        Ok(())
    }

    fn member(&mut self, first: &mut bool, key: &[u8], short_key: Option<u64>, value: Element<'_>, depth: usize, out: &mut Vec<u8>) -> Result<(), Error> {
        comma(first, out);
        write_key(key, short_key, out)?;
        write_element(value, depth, out, self.stats)
    }
}

fn comma(first: &mut bool, out: &mut Vec<u8>) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

/// The value at a dotted path (objects only; arrays end the path).
pub fn lookup<'a>(doc: &'a RawDocument, path: &[String]) -> Option<RawBsonRef<'a>> {
    let (last, parents) = path.split_last()?;
    let mut at = doc;
    for seg in parents {
        match at.get(seg).ok().flatten()? {
            RawBsonRef::Document(d) => at = d,
            _ => return None,
        }
    }
    at.get(last).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, RawDocumentBuf};

    fn paths(list: &[&str]) -> Vec<Vec<String>> {
        list.iter().map(|p| p.split('.').map(str::to_owned).collect()).collect()
    }

    fn shaped(d: mongodb::bson::Document, include: &[&str], exclude: &[&str], rename: &[(&str, &str)]) -> serde_json::Value {
        let renames: Vec<_> = rename.iter().map(|(a, b)| (paths(&[a]).remove(0), paths(&[b]).remove(0))).collect();
        let plan = FieldPlan::new(&paths(include), &paths(exclude), &renames);
        let raw = RawDocumentBuf::from_document(&d).expect("raw");
        let mut out = Vec::new();
        plan.write(&raw, &[], &[], &mut out, &mut ConvertStats::default()).expect("write");
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn exclude_leaves_out_paths_and_keeps_the_rest() {
        let d = doc! {"_id": 1, "a": 1, "password": "x", "user": {"name": "n", "secret": "s"}, "arr": [{"secret": 1}]};
        assert_eq!(
            shaped(d, &[], &["password", "user.secret", "arr.secret", "missing.x"], &[]),
            serde_json::json!({"a": 1, "user": {"name": "n"}, "arr": [{"secret": 1}]})
        );
    }

    #[test]
    fn include_keeps_only_named_paths_whole() {
        let d = doc! {"_id": 1, "a": 1, "b": {"c": 1, "d": {"e": 2}}, "f": 3, "g": 4};
        assert_eq!(shaped(d.clone(), &["b.d", "f"], &[], &[]), serde_json::json!({"b": {"d": {"e": 2}}, "f": 3}));
        // A path into a scalar names nothing; exclude beats include below it.
        assert_eq!(shaped(d, &["a.x", "b"], &["b.c"], &[]), serde_json::json!({"b": {"d": {"e": 2}}}));
    }

    #[test]
    fn rename_moves_values_creating_objects_and_replacing_fields() {
        let d = doc! {"_id": 7, "user": {"mail": "m@x", "name": "n"}, "email": "old", "t": 1};
        assert_eq!(
            shaped(d.clone(), &[], &[], &[("user.mail", "email"), ("t", "meta.time.t"), ("_id", "mongoId")]),
            serde_json::json!({"user": {"name": "n"}, "email": "m@x", "mongoId": 7, "meta": {"time": {"t": 1}}})
        );
        // A renamed value is kept even when `include` does not name it; a missing source is nothing.
        assert_eq!(
            shaped(d, &["t"], &[], &[("user.name", "who"), ("nope", "x.y")]),
            serde_json::json!({"t": 1, "who": "n"})
        );
    }

    #[test]
    fn extra_members_replace_fields_of_the_same_name() {
        let raw = RawDocumentBuf::from_document(&doc! {"_id": 1, "a": 1, "oplog_ts": "user's"}).expect("raw");
        let mut out = Vec::new();
        FieldPlan::default()
            .write(&raw, &["oplog_ts"], b"\"oplog_ts\":{\"T\":5,\"I\":1}", &mut out, &mut ConvertStats::default())
            .expect("write");
        assert_eq!(String::from_utf8(out).expect("utf8"), r#"{"a":1,"oplog_ts":{"T":5,"I":1}}"#);
    }

    #[test]
    fn an_identity_plan_writes_what_the_plain_converter_writes() {
        let raw = RawDocumentBuf::from_document(&doc! {"_id": 1, "a": [1, {"b": 2.5}], "c": {"d": null}}).expect("raw");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        FieldPlan::default().write(&raw, &[], &[], &mut a, &mut ConvertStats::default()).expect("plan");
        convert::write_document(&raw, true, &mut b, &mut ConvertStats::default()).expect("plain");
        assert_eq!(a, b);
        assert!(FieldPlan::default().is_identity());
    }
}
