//! Bulk request bodies: NDJSON action/source pairs written straight into one buffer.
//!
//! Every write carries the change's cluster time as an external version with
//! `version_type=external_gte`: a replayed or reordered older write loses with 409 instead of
//! regressing the document, and writes sharing one cluster time (a transaction) apply in
//! stream order, the last one winning.

use bytes::Bytes;

use crate::sink::{Op, Write};

/// Append the bulk lines of one write to `body`.
pub fn encode(write: &Write, body: &mut Vec<u8>) {
    let verb = match write.op {
        Op::Index(_) => "index",
        Op::Update(_) => "update",
        Op::Create(_) => "create",
        Op::Delete => "delete",
        // Never sent: the sink dead-letters these before building a body, and carries
        // patches out as read-modify-writes (`sink::patches`).
        Op::Reject(_) | Op::Patch(_) => return,
    };
    open_action(verb, &write.index, &write.id_json, write.routing.as_deref(), body);
    match &write.op {
        Op::Update(source) => {
            // Partial updates cannot carry external versions; the sink's per-document order
            // is what keeps them in sequence. A concurrent writer's conflict is retried.
            body.extend_from_slice(b",\"retry_on_conflict\":3}}\n{\"doc\":");
            body.extend_from_slice(source);
            body.extend_from_slice(b",\"doc_as_upsert\":true}\n");
        }
        Op::Index(source) => {
            add_pipeline(write.pipeline.as_deref(), body);
            close_versioned(write.version, body);
            push_source(source, body);
        }
        Op::Create(source) => {
            // Elasticsearch versions `create` internally only: a replayed entry finds its
            // `_id` taken and answers 409, which keeps the first copy.
            add_pipeline(write.pipeline.as_deref(), body);
            body.extend_from_slice(b"}}\n");
            push_source(source, body);
        }
        _ => close_versioned(write.version, body),
    }
}

/// Open a bulk action line: `{"<verb>":{"_index":…,"_id":…` and the routing; the caller adds
/// what its action needs and closes it.
pub fn open_action(verb: &str, index: &str, id_json: &str, routing: Option<&str>, body: &mut Vec<u8>) {
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(verb.as_bytes());
    body.extend_from_slice(b"\":{\"_index\":");
    write_json_str(index, body);
    body.extend_from_slice(b",\"_id\":");
    body.extend_from_slice(id_json.as_bytes());
    if let Some(routing) = routing {
        body.extend_from_slice(b",\"routing\":");
        write_json_str(routing, body);
    }
}

/// Add the ingest pipeline to an open action line.
pub fn add_pipeline(pipeline: Option<&str>, body: &mut Vec<u8>) {
    if let Some(pipeline) = pipeline {
        body.extend_from_slice(b",\"pipeline\":");
        write_json_str(pipeline, body);
    }
}

/// Close an action line with its external version (`external_gte`: see the module docs).
pub fn close_versioned(version: u64, body: &mut Vec<u8>) {
    body.extend_from_slice(b",\"version\":");
    body.extend_from_slice(itoa::Buffer::new().format(version).as_bytes());
    body.extend_from_slice(b",\"version_type\":\"external_gte\"}}\n");
}

/// The document line after an action line.
pub fn push_source(source: &[u8], body: &mut Vec<u8>) {
    body.extend_from_slice(source);
    body.push(b'\n');
}

/// Size of the bulk lines of one write, without building them (for byte limits).
pub fn encoded_len(write: &Write) -> usize {
    // Action line overhead: at most 93 bytes of keys and punctuation with a 20-digit version (a
    // cluster-time version has 19), plus the index and the `_id` literal.
    let fixed = 93 + write.index.len() + write.id_json.len();
    // `,"routing":` / `,"pipeline":` and a string that may need escaping (at most 6 bytes per
    // byte, for control characters).
    let fixed = fixed + write.routing.as_ref().map_or(0, |r| 13 + 6 * r.len()) + write.pipeline.as_ref().map_or(0, |p| 14 + 6 * p.len());
    match &write.op {
        Op::Index(source) | Op::Create(source) => fixed + source.len() + 1,
        Op::Update(source) => fixed + source.len() + 28,
        Op::Delete => fixed,
        // The document with its history is rebuilt in the sink; count what the change holds.
        Op::Patch(p) => fixed + p.change.len(),
        Op::Reject(r) => fixed + r.reason.len() + r.document.as_ref().map_or(0, Bytes::len),
    }
}

/// Build one bulk body for `writes`.
pub fn body_for<'a>(writes: impl IntoIterator<Item = &'a Write>, size_hint: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size_hint);
    for w in writes {
        encode(w, &mut body);
    }
    body
}

/// Action lines, location records and ids use the converter's JSON string writer.
pub use crate::convert::write_json_str;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn write(op: Op) -> Write {
        Write::new(
            Arc::from("shop.orders"),
            Arc::from("shop.orders"),
            "\"a\\\"b\"".into(),
            42,
            op,
        )
    }

    #[test]
    fn index_and_delete_lines_carry_external_gte_versions() {
        let body = body_for(
            &[write(Op::Index(Bytes::from_static(b"{\"x\":1}"))), write(Op::Delete)],
            0,
        );
        let text = String::from_utf8(body).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let action: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(action["index"]["_index"], "shop.orders");
        assert_eq!(action["index"]["_id"], "a\"b");
        assert_eq!(action["index"]["version"], 42);
        assert_eq!(action["index"]["version_type"], "external_gte");
        assert_eq!(lines[1], "{\"x\":1}");
        let del: serde_json::Value = serde_json::from_str(lines[2]).expect("json");
        assert_eq!(del["delete"]["_id"], "a\"b");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn routing_pipeline_and_partial_updates() {
        let mut indexed = write(Op::Index(Bytes::from_static(b"{\"x\":1}")));
        indexed.routing = Some("post\"1".into());
        indexed.pipeline = Some(Arc::from("enrich"));
        let mut updated = write(Op::Update(Bytes::from_static(b"{\"x\":2}")));
        updated.routing = Some("r".into());
        let mut deleted = write(Op::Delete);
        deleted.routing = Some("r".into());
        let text = String::from_utf8(body_for(&[indexed, updated, deleted], 0)).expect("utf8");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines[0]["index"]["routing"], "post\"1");
        assert_eq!(lines[0]["index"]["pipeline"], "enrich");
        assert_eq!(lines[0]["index"]["version_type"], "external_gte");
        assert_eq!(lines[2]["update"]["routing"], "r");
        assert_eq!(lines[2]["update"]["retry_on_conflict"], 3);
        assert!(lines[2]["update"].get("version").is_none(), "updates cannot carry external versions");
        assert_eq!(lines[3], serde_json::json!({"doc": {"x": 2}, "doc_as_upsert": true}));
        assert_eq!(lines[4]["delete"]["routing"], "r");
        assert_eq!(lines.len(), 5);
    }

    /// A time machine entry is created, unversioned (Elasticsearch refuses external versions on
    /// `create`), so a replay answers 409 and the first copy stays.
    #[test]
    fn entries_are_created_without_versions() {
        let mut w = write(Op::Create(Bytes::from_static(b"{\"x\":1}")));
        w.routing = Some("a1".into());
        let text = String::from_utf8(body_for(&[w], 0)).expect("utf8");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines[0], serde_json::json!({"create": {"_index": "shop.orders", "_id": "a\"b", "routing": "a1"}}));
        assert_eq!(lines[1], serde_json::json!({"x": 1}));
        assert_eq!(lines.len(), 2);
    }

    /// A body built with `encoded_len` as its capacity never grows (a realloc doubles a
    /// large buffer and copies it).
    #[test]
    fn encoded_len_is_an_upper_bound() {
        // A 2026 cluster time as a version (seconds << 32 | increment) has 19 digits.
        for version in [0, 42, (1_795_000_000u64 << 32) | 7, u64::MAX] {
            for op in [Op::Index(Bytes::from_static(b"{}")), Op::Update(Bytes::from_static(b"{}")), Op::Create(Bytes::from_static(b"{}")), Op::Delete] {
                let mut w = write(op);
                w.version = version;
                w.routing = Some("\u{1}\"".into());
                w.pipeline = Some(Arc::from("p\n"));
                let mut body = Vec::new();
                encode(&w, &mut body);
                assert!(body.len() <= encoded_len(&w), "version {version}: {} > {}", body.len(), encoded_len(&w));
            }
        }
    }

    #[test]
    fn json_strings_escape_controls_quotes_and_backslashes() {
        let mut out = Vec::new();
        write_json_str("a\"\\\n\u{1}é", &mut out);
        let back: String = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(back, "a\"\\\n\u{1}é");
    }
}
