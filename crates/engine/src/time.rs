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

/// A Unix time in seconds as `YYYY-MM-DDTHH:MM:SSZ` (the form Kubernetes uses for times).
pub fn rfc3339(unix_seconds: i64) -> String {
    match crate::convert::iso_datetime(unix_seconds.saturating_mul(1000), 0..=9999) {
        Some(text) => String::from_utf8_lossy(&text).replace(".000Z", "Z"),
        None => unix_seconds.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kubernetes_time_format() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
