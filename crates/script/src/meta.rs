//! `_meta_monstache`: the indexing metadata a mapping script may put on the document it returns.
//! Parsed here (pure), after the driver has stripped it from the document.
//!
//! Values are read as Monstache reads them: `index`, `id`, `routing`, `pipeline` and
//! `versionType` take a string or a number (a number becomes its decimal text); `version` and
//! `retryOnConflict` take an integer or a string holding one. Differences from Monstache, on
//! purpose:
//! - `skip` follows its truth value (`skip: false` does not skip); Monstache skips whenever the
//!   key is present.
//! - `type` and `parent` are refused: Elasticsearch 7+ has no mapping types, and parent/child is
//!   a `join` field whose children are indexed with `routing` set to the parent's id.
//! - an unknown key, or a value of the wrong shape, is an error rather than a log line, so the
//!   document is dead-lettered with the reason instead of being indexed where it was not meant to go.
//! - `null` for any key means "not set".

use serde_json::{Map, Value};

/// Indexing metadata for one document, from `_meta_monstache`. `None` means "the pipeline's
/// default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Target index instead of the namespace's.
    pub index: Option<String>,
    /// Elasticsearch `_id` instead of the document's `_id`.
    pub id: Option<String>,
    /// Shard routing value.
    pub routing: Option<String>,
    /// Ingest pipeline name.
    pub pipeline: Option<String>,
    /// Explicit version (with `version_type`).
    pub version: Option<i64>,
    /// Version type (`external`, `external_gte`, `internal`, ...), passed through as written.
    pub version_type: Option<String>,
    /// `retry_on_conflict` for update-mode writes.
    pub retry_on_conflict: Option<u32>,
    /// Do not write this document at all (no index, no delete).
    pub skip: bool,
}

impl Meta {
    /// True when no key was set: the document goes where it would have gone without a script.
    pub fn is_empty(&self) -> bool {
        *self == Meta::default()
    }

    /// Parses the JSON text of a `_meta_monstache` value.
    ///
    /// # Errors
    /// A message saying which key is wrong and what to use instead.
    pub fn from_json(text: &str) -> Result<Meta, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match value {
            Value::Null => Ok(Meta::default()),
            Value::Object(map) => Meta::from_map(&map),
            other => Err(format!("expected an object, got {}", kind_of(&other))),
        }
    }

    /// Reads the keys of a `_meta_monstache` object.
    ///
    /// # Errors
    /// As [`Meta::from_json`].
    pub fn from_map(map: &Map<String, Value>) -> Result<Meta, String> {
        let mut meta = Meta::default();
        for (key, value) in map {
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "index" => meta.index = Some(text(key, value)?),
                "id" => meta.id = Some(text(key, value)?),
                "routing" => meta.routing = Some(text(key, value)?),
                "pipeline" => meta.pipeline = Some(text(key, value)?),
                "versionType" => meta.version_type = Some(text(key, value)?),
                "version" => meta.version = Some(integer(key, value)?),
                "retryOnConflict" => {
                    let n = integer(key, value)?;
                    meta.retry_on_conflict = Some(
                        u32::try_from(n).map_err(|_| format!("`retryOnConflict` must be a small non-negative integer, got {n}"))?,
                    );
                }
                "skip" => meta.skip = truthy(value),
                "type" => {
                    return Err("`type` is not supported: Elasticsearch 7 and later have no mapping types; \
                                remove it (use `index` to send the document to another index)"
                        .to_owned())
                }
                "parent" => {
                    return Err("`parent` is not supported: Elasticsearch 7 and later model parent/child with a \
                                `join` field; set `routing` to the parent's id instead (and the join field in the document)"
                        .to_owned())
                }
                other => {
                    return Err(format!(
                        "unknown key `{other}` (known: index, id, routing, pipeline, version, versionType, retryOnConflict, skip)"
                    ))
                }
            }
        }
        if let Some(id) = &meta.id {
            if id.is_empty() {
                return Err("`id` must not be empty".to_owned());
            }
        }
        Ok(meta)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn text(key: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("`{key}` must be a string or a number, got {}", kind_of(other))),
    }
}

fn integer(key: &str, v: &Value) -> Result<i64, String> {
    let parsed = match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| format!("`{key}` must be an integer, got {v}"))
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_key_is_read() {
        let m = Meta::from_json(
            r#"{"index":"blog.comments.highscore","id":"c1","routing":"123","pipeline":"p",
                "version":42,"versionType":"external_gte","retryOnConflict":3,"skip":true}"#,
        )
        .expect("valid");
        assert_eq!(
            m,
            Meta {
                index: Some("blog.comments.highscore".into()),
                id: Some("c1".into()),
                routing: Some("123".into()),
                pipeline: Some("p".into()),
                version: Some(42),
                version_type: Some("external_gte".into()),
                retry_on_conflict: Some(3),
                skip: true,
            }
        );
    }

    #[test]
    fn numbers_become_text_as_monstache_formats_them() {
        let m = Meta::from_json(r#"{"routing":123,"id":7,"version":"99","retryOnConflict":"2"}"#).expect("valid");
        assert_eq!(m.routing.as_deref(), Some("123"));
        assert_eq!(m.id.as_deref(), Some("7"));
        assert_eq!(m.version, Some(99));
        assert_eq!(m.retry_on_conflict, Some(2));
    }

    #[test]
    fn null_and_empty_mean_not_set() {
        assert!(Meta::from_json("null").expect("valid").is_empty());
        assert!(Meta::from_json("{}").expect("valid").is_empty());
        assert!(Meta::from_json(r#"{"routing":null}"#).expect("valid").is_empty());
    }

    #[test]
    fn skip_follows_its_truth_value() {
        assert!(!Meta::from_json(r#"{"skip":false}"#).expect("valid").skip);
        assert!(Meta::from_json(r#"{"skip":1}"#).expect("valid").skip);
    }

    #[test]
    fn type_and_parent_are_refused_with_what_to_use_instead() {
        let e = Meta::from_json(r#"{"type":"employee","routing":"x"}"#).expect_err("type refused");
        assert!(e.contains("no mapping types") && e.contains("index"), "{e}");
        let e = Meta::from_json(r#"{"parent":"london"}"#).expect_err("parent refused");
        assert!(e.contains("join") && e.contains("routing"), "{e}");
    }

    #[test]
    fn wrong_shapes_are_errors_that_name_the_key() {
        let e = Meta::from_json(r#"{"routing":{"a":1}}"#).expect_err("object routing");
        assert!(e.contains("`routing`"), "{e}");
        let e = Meta::from_json(r#"{"version":"soon"}"#).expect_err("bad version");
        assert!(e.contains("`version`"), "{e}");
        let e = Meta::from_json(r#"{"retryOnConflict":-1}"#).expect_err("negative");
        assert!(e.contains("retryOnConflict"), "{e}");
        let e = Meta::from_json(r#""blog""#).expect_err("not an object");
        assert!(e.contains("expected an object"), "{e}");
        let e = Meta::from_json(r#"{"rounting":"x"}"#).expect_err("typo");
        assert!(e.contains("unknown key `rounting`"), "{e}");
    }
}
