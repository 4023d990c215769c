//! Wall-clock time as text, for dead-letter records and logs (never for versions: those
//! come from MongoDB's cluster time).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn now_rfc3339() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    match crate::convert::iso_datetime(ms, 0..=9999) {
        Some(text) => String::from_utf8_lossy(&text).into_owned(),
        None => ms.to_string(),
    }
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
