//! A GridFS file's content on its document's write (`spec.files`, Monstache's `index-files`).
//!
//! The source reads the file's chunks with its document of the files collection
//! ([`super::change::FileBody`]); the transform adds the content to the document's write only
//! once that write is decided: after the namespace's mapping, and after its filter and map
//! script on the script threads ([`super::script::Call`]). So a script sees the files
//! collection's document (name, length, `metadata`, ...) but never the content:
//! - up to `files.maxFileSize` (100 MiB) of base64 never enters a script's heap (64 MiB by
//!   default) nor is copied into JavaScript and back;
//! - a file the filter or script drops is never encoded.
//!
//! Monstache adds the content before its map script (`addFileContent` in the file downloader
//! goroutines, ahead of `doIndex` → `mapData`), so its scripts see (and pay for) `file`.
//!
//! # Where the content goes
//! Only a write that indexes the document (`Index`, `Update`) gets it: a removal, a skip or a
//! dead letter does not. The write keeps the place its mapping and scripts chose (`_id`,
//! index, routing); its ingest pipeline is the one a mapping or script chose
//! (`ingestPipeline`, `_meta_monstache.pipeline`), which then receives `file` and must extract
//! the text itself, or else the files' pipeline (`files.pipeline`).

use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntCounter;

use super::change::FileBody;
use crate::sink::{Op, Write};

/// A file's content, to add to its document's write once that write is decided.
pub struct Attachment {
    /// The content as the source read it.
    body: FileBody,
    /// The files' ingest pipeline (`spec.files.pipeline`).
    pipeline: Option<Arc<str>>,
    /// `monsoon_files_too_large_total`.
    too_large: IntCounter,
}

impl Attachment {
    /// `body`, for a write whose pipeline defaults to `pipeline`; a file over the size limit
    /// counts in `too_large`.
    pub fn new(body: FileBody, pipeline: Option<Arc<str>>, too_large: IntCounter) -> Self {
        Self { body, pipeline, too_large }
    }

    /// Add the content to `write` when it indexes the document: base64 in a `file` field,
    /// through the files' pipeline unless the write already names one. A file over the size
    /// limit is indexed without its content (and its pipeline), and counted.
    pub fn attach(&self, write: &mut Write) {
        let (Op::Index(source) | Op::Update(source)) = &mut write.op else { return };
        match &self.body {
            FileBody::Content(content) => {
                *source = with_file(source, content);
                if write.pipeline.is_none() {
                    write.pipeline = self.pipeline.clone();
                }
            }
            FileBody::TooLarge(n) => {
                tracing::warn!(namespace = %write.ns, id = %write.id_json, bytes = n, "GridFS file over files.maxFileSize: indexed without its content");
                self.too_large.inc();
            }
        }
    }
}

/// The JSON object `source` with a last field `"file"`: `content` in base64.
fn with_file(source: &[u8], content: &[u8]) -> Bytes {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(content);
    let mut out = Vec::with_capacity(source.len() + encoded.len() + 12);
    out.extend_from_slice(&source[..source.len().saturating_sub(1)]);
    if source.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"file\":\"");
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(b"\"}");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(body: FileBody) -> Attachment {
        Attachment::new(body, Some(Arc::from("attachment")), IntCounter::new("t", "t").expect("counter"))
    }

    fn index_write(source: &str) -> Write {
        Write::new(Arc::from("docs.fs.files"), Arc::from("docs.fs.files"), "\"1\"".into(), 1, Op::Index(Bytes::from(source.to_string())))
    }

    fn source(w: &Write) -> serde_json::Value {
        let (Op::Index(s) | Op::Update(s)) = &w.op else { panic!("not an index write") };
        serde_json::from_slice(s).expect("json")
    }

    #[test]
    fn content_is_added_as_base64_through_the_files_pipeline() {
        let mut w = index_write(r#"{"filename":"a.txt"}"#);
        attachment(FileBody::Content(b"hello".to_vec())).attach(&mut w);
        assert_eq!(source(&w), serde_json::json!({"filename": "a.txt", "file": "aGVsbG8="}));
        assert_eq!(w.pipeline.as_deref(), Some("attachment"));
        let mut empty = index_write("{}");
        attachment(FileBody::Content(Vec::new())).attach(&mut empty);
        assert_eq!(source(&empty), serde_json::json!({"file": ""}));
    }

    #[test]
    fn a_pipeline_the_script_or_mapping_chose_is_kept() {
        let mut w = index_write(r#"{"a":1}"#);
        w.pipeline = Some(Arc::from("mine"));
        attachment(FileBody::Content(b"x".to_vec())).attach(&mut w);
        assert_eq!(w.pipeline.as_deref(), Some("mine"));
        assert_eq!(source(&w)["file"], "eA==");
    }

    #[test]
    fn a_removal_or_dead_letter_gets_no_content_and_counts_nothing() {
        let file = attachment(FileBody::TooLarge(5000));
        for op in [Op::Delete, Op::reject("script_threw", String::new(), None)] {
            let mut w = index_write("{}");
            w.op = op;
            file.attach(&mut w);
            assert!(matches!(w.op, Op::Delete | Op::Reject(_)) && w.pipeline.is_none());
        }
        assert_eq!(file.too_large.get(), 0);
    }

    #[test]
    fn a_file_over_the_limit_is_indexed_without_content_and_counted() {
        let file = attachment(FileBody::TooLarge(5000));
        let mut w = index_write(r#"{"length":5000}"#);
        file.attach(&mut w);
        assert_eq!(source(&w), serde_json::json!({"length": 5000}));
        assert!(w.pipeline.is_none());
        assert_eq!(file.too_large.get(), 1);
    }
}
