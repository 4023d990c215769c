//! Bulk responses, read item by item, and the outcome of every write.
//!
//! HTTP 200 does not mean success: each item carries its own status. Items are classified as
//! done (indexed, deleted, already newer, already gone), retriable (429, 5xx, blocks that an
//! operator clears) or rejected (mapping errors, oversize documents: dead-lettered).

use serde::Deserialize;

/// Final or temporary outcome of one bulk item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Written (200/201) or deleted.
    Done,
    /// 409: the index holds a newer or equal version; this write is stale, which is success.
    Stale,
    /// 404 on delete: the document is already gone, which is success.
    AlreadyGone,
    /// Try this item again later.
    Retry {
        /// HTTP status of the item.
        status: u16,
        /// Error type and reason.
        reason: String,
    },
    /// Elasticsearch refuses this document for good; dead-letter it.
    Reject {
        /// HTTP status of the item.
        status: u16,
        /// Elasticsearch's error type, e.g. `mapper_parsing_exception`.
        error_type: String,
        /// Elasticsearch's reason.
        reason: String,
    },
}

impl ItemOutcome {
    /// Whether the item has a final outcome without a dead-letter record.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Done | Self::Stale | Self::AlreadyGone)
    }
}

/// Classify one item from its status and error.
pub fn classify_item(is_delete: bool, status: u16, error: Option<&ItemError>) -> ItemOutcome {
    let error_type = error.map(|e| e.error_type.as_str()).unwrap_or("");
    let reason = || match error {
        Some(e) => format!("{}: {}", e.error_type, e.reason.as_deref().unwrap_or("")),
        None => format!("status {status}"),
    };
    match status {
        200..=299 => ItemOutcome::Done,
        409 => ItemOutcome::Stale,
        404 if is_delete && error.is_none() => ItemOutcome::AlreadyGone,
        404 if is_delete && error_type == "index_not_found_exception" => ItemOutcome::AlreadyGone,
        // 429: back-pressure. 5xx: the node or shard failed. 403 in a bulk item is a cluster
        // block (read-only index after the flood-stage disk watermark), which an operator or
        // ES itself clears: retrying loses nothing, dead-lettering would.
        429 | 403 | 500..=599 => ItemOutcome::Retry {
            status,
            reason: reason(),
        },
        _ => ItemOutcome::Reject {
            status,
            error_type: if error_type.is_empty() {
                format!("http_{status}")
            } else {
                error_type.to_string()
            },
            reason: error
                .and_then(|e| e.reason.clone())
                .unwrap_or_else(reason),
        },
    }
}

/// The parts of a bulk response monsoon reads.
#[derive(Debug, Deserialize)]
pub struct BulkResponse {
    /// Whether any item failed.
    #[serde(default)]
    pub errors: bool,
    /// One entry per action, in request order.
    #[serde(default)]
    pub items: Vec<BulkItem>,
}

/// One response item: `{"index": {...}}` or `{"delete": {...}}`.
#[derive(Debug, Deserialize)]
pub struct BulkItem {
    /// The action's result, whichever action it was.
    #[serde(alias = "index", alias = "delete", alias = "create", alias = "update")]
    pub result: ItemResult,
}

/// Status and error of one item.
#[derive(Debug, Deserialize)]
pub struct ItemResult {
    /// HTTP status of the item.
    pub status: u16,
    /// Error, when the item failed.
    #[serde(default)]
    pub error: Option<ItemError>,
}

/// Elasticsearch's error object (only the fields monsoon uses).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ItemError {
    /// e.g. `mapper_parsing_exception`.
    #[serde(rename = "type", default)]
    pub error_type: String,
    /// Human-readable reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Why a bulk response cannot be used item by item.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not the JSON of a bulk response.
    #[error("failed to parse bulk response")]
    Json(#[from] serde_json::Error),
    /// Items missing or extra: the response cannot be matched to the request.
    #[error("bulk response has {got} items for {sent} actions")]
    ItemCount {
        /// Items in the response.
        got: usize,
        /// Actions sent.
        sent: usize,
    },
}

/// Parse a 200 bulk response and classify each item; `is_delete[i]` says whether action `i`
/// was a delete.
///
/// # Errors
/// [`ParseError`] when the body is not a bulk response for exactly these actions; the caller
/// retries the whole request (every write is idempotent).
pub fn classify_response(body: &[u8], is_delete: &[bool]) -> Result<Vec<ItemOutcome>, ParseError> {
    let response: BulkResponse = serde_json::from_slice(body)?;
    if response.items.len() != is_delete.len() {
        return Err(ParseError::ItemCount {
            got: response.items.len(),
            sent: is_delete.len(),
        });
    }
    Ok(response
        .items
        .iter()
        .zip(is_delete)
        .map(|(item, del)| classify_item(*del, item.result.status, item.result.error.as_ref()))
        .collect())
}

/// What a bulk request's answer says of its items: the one reading of a bulk answer, for the
/// sink's writes, its merge-patch rounds and its dead-letter records alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// One outcome per item, in order (a 2xx answer).
    Items(Vec<ItemOutcome>),
    /// Send every item again after a back-off: no answer came, the answer was 401/403 (data is
    /// never dropped for an authentication problem: credentials may be rotating), 408, 429 or
    /// 5xx, or it could not be read (every write is idempotent). Why, for the log.
    Again(String),
    /// Refused whole (413 or another 4xx): split the request to isolate what is refused; a
    /// request of one item is refused with this status and reason.
    Refused {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        reason: String,
    },
}

/// Read the answer (`status`, `body`) to a bulk request whose action `i` was a delete when
/// `is_delete[i]`.
pub fn answer(status: u16, body: &[u8], is_delete: &[bool]) -> Answer {
    let start = |n: usize| String::from_utf8_lossy(&body[..body.len().min(n)]).into_owned();
    match status {
        200..=299 => match classify_response(body, is_delete) {
            Ok(items) => Answer::Items(items),
            Err(e) => Answer::Again(format!("unreadable bulk response: {}", crate::error_chain(&e))),
        },
        401 | 403 | 408 | 429 | 500..=599 => Answer::Again(format!("status {status}: {}", start(300))),
        _ => Answer::Refused { status, reason: start(1000) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_classified() {
        let body = br#"{"took":3,"errors":true,"items":[
            {"index":{"_index":"a","_id":"1","status":201}},
            {"index":{"_index":"a","_id":"2","status":409,"error":{"type":"version_conflict_engine_exception","reason":"current version [9] is higher"}}},
            {"delete":{"_index":"a","_id":"3","status":404,"result":"not_found"}},
            {"index":{"_index":"a","_id":"4","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n] of type [long]"}}},
            {"index":{"_index":"a","_id":"5","status":429,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}},
            {"index":{"_index":"a","_id":"6","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary shard is not active"}}},
            {"delete":{"_index":"a","_id":"7","status":200}}
        ]}"#;
        let out = classify_response(body, &[false, false, true, false, false, false, true]).expect("parse");
        assert_eq!(out[0], ItemOutcome::Done);
        assert_eq!(out[1], ItemOutcome::Stale);
        assert_eq!(out[2], ItemOutcome::AlreadyGone);
        assert_eq!(
            out[3],
            ItemOutcome::Reject {
                status: 400,
                error_type: "mapper_parsing_exception".into(),
                reason: "failed to parse field [n] of type [long]".into()
            }
        );
        assert!(matches!(out[4], ItemOutcome::Retry { status: 429, .. }));
        assert!(matches!(out[5], ItemOutcome::Retry { status: 503, .. }));
        assert_eq!(out[6], ItemOutcome::Done);
    }

    #[test]
    fn index_404_is_rejected_but_delete_404_is_success() {
        let missing = ItemError {
            error_type: "index_not_found_exception".into(),
            reason: Some("no such index".into()),
        };
        assert_eq!(classify_item(true, 404, Some(&missing)), ItemOutcome::AlreadyGone);
        assert!(matches!(classify_item(false, 404, Some(&missing)), ItemOutcome::Reject { .. }));
    }

    #[test]
    fn mismatched_item_count_is_an_error_not_a_guess() {
        let body = br#"{"errors":false,"items":[{"index":{"status":201}}]}"#;
        assert!(matches!(
            classify_response(body, &[false, false]),
            Err(ParseError::ItemCount { got: 1, sent: 2 })
        ));
        assert!(classify_response(b"<html>proxy error</html>", &[false]).is_err());
    }

    #[test]
    fn a_whole_answer_is_read_by_its_status() {
        let ok = br#"{"items":[{"index":{"_index":"a","_id":"1","status":201}}]}"#;
        assert_eq!(answer(200, ok, &[false]), Answer::Items(vec![ItemOutcome::Done]));
        for status in [401, 403, 408, 429, 502, 503] {
            assert!(matches!(answer(status, b"busy", &[false]), Answer::Again(why) if why == format!("status {status}: busy")), "{status}");
        }
        for status in [400, 413] {
            assert_eq!(answer(status, b"too large", &[false]), Answer::Refused { status, reason: "too large".into() }, "{status}");
        }
        // A 200 that is not a bulk response for these actions is sent again, never dropped.
        assert!(matches!(answer(200, b"<html>proxy error</html>", &[false]), Answer::Again(why) if why.starts_with("unreadable bulk response")));
        assert!(matches!(answer(200, ok, &[false, true]), Answer::Again(_)));
    }
}
