//! Dead-letter records: what Elasticsearch refused (or what could not be converted), stored in
//! the pipeline's dead-letter index so nothing is dropped silently.
//!
//! The record builder is pure; [`Deliverer::dead_letter`](super) sends the records.
//!
//! # Invariants
//! - A record is always storable: the refused document is embedded only up to
//!   [`DOCUMENT_LIMIT`] bytes, with its full size and SHA-256 beside it (the whole document is
//!   still in MongoDB). A document refused for its size (413) would otherwise make its own
//!   record too large to store.
//! - A record Elasticsearch refuses for good (any status but 429, 5xx, 401/403/408 and
//!   connection failures) is sent once more without the document; if that is refused too, the
//!   record is logged at ERROR with its document's id and counted
//!   (`monsoon_dead_letter_failures_total`), and the pipeline goes on. Only failures that a
//!   healthy cluster clears (the same ones every write waits out) hold the checkpoint.

use serde_json::{json, Value};
use sha2::Digest;

use super::elasticsearch::request::write_json_str;
use super::{Op, Write};

/// Most bytes of a refused document embedded in its record. Far below every server's request
/// limit (`http.max_content_length` defaults to 100 MiB; Amazon OpenSearch allows 10 MiB on small
/// instances), and enough to show the shape of the document; the rest is in MongoDB.
pub const DOCUMENT_LIMIT: usize = 32 * 1024;
/// Most bytes of the reason (a server's error body can be long).
pub const REASON_LIMIT: usize = 4 * 1024;

/// Why and where a write is dead-lettered.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// HTTP status of the refusal (0: refused before sending).
    pub status: u16,
    /// Elasticsearch's error type, `http_<status>`, or monsoon's own (`invalid_id`, ...).
    pub error_type: String,
    /// Human-readable reason.
    pub reason: String,
}

/// What to embed of the refused document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embed {
    /// Up to [`DOCUMENT_LIMIT`] bytes of it.
    Prefix,
    /// None of it (size and hash only): the record itself was refused with the prefix.
    Nothing,
}

/// The source bytes of the refused document, if the write carried one.
fn document_of(w: &Write) -> Option<&[u8]> {
    match &w.op {
        Op::Index(src) | Op::Update(src) | Op::Create(src) => Some(src),
        Op::Reject(r) => r.document.as_deref(),
        Op::Patch(p) => match &p.change {
            crate::sink::patches::PatchChange::Whole { source, .. } => Some(source),
            crate::sink::patches::PatchChange::Update { description, .. } => Some(description),
            crate::sink::patches::PatchChange::Delete => None,
        },
        Op::Delete => None,
    }
}

/// `text` cut to at most `limit` bytes on a character boundary.
pub fn truncated(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The bulk lines (action and record) dead-lettering `w` into `index`.
pub fn record_lines(index: &str, pipeline: &str, w: &Write, why: &Refusal, failed_at: &str, embed: Embed) -> Vec<u8> {
    let mut record = json!({
        "pipeline": pipeline,
        "namespace": &*w.ns,
        "index": &*w.index,
        "id": serde_json::from_str::<Value>(&w.id_json).unwrap_or(Value::Null),
        "version": w.version,
        "routing": w.routing.as_deref(),
        "op": match w.op { Op::Delete => "delete", Op::Index(_) => "index", Op::Update(_) => "update", Op::Create(_) => "create", Op::Patch(_) => "patch", Op::Reject(_) => "unconvertible" },
        "status": why.status,
        "errorType": why.error_type,
        "reason": truncated(&why.reason, REASON_LIMIT),
        "failedAt": failed_at,
        "document": Value::Null,
    });
    if let Some(src) = document_of(w) {
        let text = String::from_utf8_lossy(src);
        let kept = match embed {
            Embed::Prefix => truncated(&text, DOCUMENT_LIMIT),
            Embed::Nothing => "",
        };
        record["document"] = Value::String(kept.to_string());
        record["documentBytes"] = json!(src.len());
        record["documentTruncated"] = json!(kept.len() < text.len());
        record["documentSha256"] = json!(hex(&sha2::Sha256::digest(src)));
    }
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"index\":{\"_index\":");
    write_json_str(index, &mut line);
    line.extend_from_slice(b"}}\n");
    // A `Value` of strings and numbers always serializes.
    let _ = serde_json::to_writer(&mut line, &record);
    line.push(b'\n');
    line
}

/// Mapping of the dead-letter index: records are kept whole but only the routing fields are
/// indexed, so no refused document can make its own record fail on a mapping conflict.
pub fn index_body() -> Value {
    json!({
        "settings": {"index": {"number_of_shards": 1}},
        "mappings": {
            "dynamic": false,
            "properties": {
                "pipeline": {"type": "keyword"},
                "namespace": {"type": "keyword"},
                "index": {"type": "keyword"},
                "id": {"type": "keyword"},
                "op": {"type": "keyword"},
                "status": {"type": "integer"},
                "errorType": {"type": "keyword"},
                "reason": {"type": "text"},
                "failedAt": {"type": "date"},
                "document": {"type": "text", "index": false},
                "documentBytes": {"type": "long"},
                "documentTruncated": {"type": "boolean"},
                "documentSha256": {"type": "keyword"}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn write(doc: &str) -> Write {
        Write::new(Arc::from("shop.orders"), Arc::from("shop.orders"), "\"a1\"".into(), 7, Op::Index(Bytes::from(doc.to_string())))
    }

    fn record(line: &[u8]) -> Value {
        let text = std::str::from_utf8(line).expect("utf8");
        let mut lines = text.lines();
        let action: Value = serde_json::from_str(lines.next().expect("action")).expect("json");
        assert_eq!(action["index"]["_index"], "dl");
        serde_json::from_str(lines.next().expect("record")).expect("json")
    }

    fn refusal() -> Refusal {
        Refusal { status: 413, error_type: "http_413".into(), reason: "x".repeat(10_000) }
    }

    #[test]
    fn an_oversize_document_is_embedded_truncated_with_its_size_and_hash() {
        // Multi-byte characters around the cut: the prefix must stay valid UTF-8.
        let doc = format!("{{\"big\":\"{}\"}}", "é".repeat(3 * 1024 * 1024 / 2));
        let line = record_lines("dl", "p", &write(&doc), &refusal(), "2026-01-01T00:00:00Z", Embed::Prefix);
        assert!(line.len() < DOCUMENT_LIMIT + REASON_LIMIT + 1024, "record of {} bytes", line.len());
        let r = record(&line);
        let kept = r["document"].as_str().expect("document");
        assert!(kept.len() <= DOCUMENT_LIMIT && kept.len() > DOCUMENT_LIMIT - 4);
        assert!(doc.starts_with(kept));
        assert_eq!(r["documentBytes"], doc.len());
        assert_eq!(r["documentTruncated"], true);
        assert_eq!(r["documentSha256"], hex(&sha2::Sha256::digest(doc.as_bytes())));
        assert_eq!(r["reason"].as_str().expect("reason").len(), REASON_LIMIT);
        assert_eq!(r["id"], "a1");
        assert_eq!(r["status"], 413);
    }

    #[test]
    fn a_small_document_is_embedded_whole() {
        let r = record(&record_lines("dl", "p", &write("{\"n\":1}"), &refusal(), "t", Embed::Prefix));
        assert_eq!(r["document"], "{\"n\":1}");
        assert_eq!(r["documentTruncated"], false);
        assert_eq!(r["documentBytes"], 7);
    }

    #[test]
    fn a_record_refused_with_its_prefix_is_resent_without_the_document() {
        let r = record(&record_lines("dl", "p", &write("{\"n\":1}"), &refusal(), "t", Embed::Nothing));
        assert_eq!(r["document"], "");
        assert_eq!(r["documentTruncated"], true);
        assert_eq!(r["documentBytes"], 7);
    }

    #[test]
    fn a_delete_has_no_document_fields() {
        let w = Write::new(Arc::from("a.b"), Arc::from("a.b"), "\"x\"".into(), 1, Op::Delete);
        let r = record(&record_lines("dl", "p", &w, &refusal(), "t", Embed::Prefix));
        assert_eq!(r["op"], "delete");
        assert!(r["document"].is_null() && r.get("documentBytes").is_none());
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
