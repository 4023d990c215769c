//! What a worker reports about itself, stored under the `status` key of its checkpoint
//! ConfigMap on every lease renewal. The operator folds these into the pipeline's status; the
//! worker needs no access to the `SyncPipeline` itself.

use serde::{Deserialize, Serialize};

/// One worker's progress report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// Engine phase: `Starting`, `Snapshotting`, `Streaming`, `Failed` or `Stopped`.
    pub phase: String,
    /// Why the engine stopped, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// MongoDB answered the last request.
    pub source_ok: bool,
    /// Elasticsearch accepted the last request.
    pub sink_ok: bool,
    /// Documents indexed or deleted since the worker started.
    pub documents_synced: u64,
    /// Share of this shard's snapshot read, 0–100, while snapshotting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_percent: Option<u32>,
    /// Seconds from the last acknowledged change to now (0 when caught up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Cluster time (Unix seconds) of the last acknowledged change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_unix: Option<i64>,
    /// Unix time of the last checkpoint write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_unix: Option<i64>,
    /// Unix time of this report.
    pub reported_unix: i64,
}

impl WorkerReport {
    /// Whether the failure is a lost change-stream history (error 286).
    pub fn history_lost(&self) -> bool {
        self.failure
            .as_deref()
            .is_some_and(|f| f.contains("ChangeStreamHistoryLost") || f.contains("history lost"))
    }
}

impl WorkerReport {
    /// A report of the engine's state right now.
    pub fn from_engine(metrics: &monsoon_engine::metrics::Metrics, health: &monsoon_engine::metrics::Health, now_unix: i64) -> Self {
        use monsoon_engine::metrics::Phase;
        let phase = health.phase();
        let positive = |v: i64| (v > 0).then_some(v);
        let last_event_unix = positive(metrics.checkpoint_event_time.get());
        let estimate = metrics.snapshot_estimate.get();
        let snapshot_percent = (phase == Phase::Snapshotting).then(|| {
            let read = i64::try_from(metrics.snapshot_docs.get()).unwrap_or(i64::MAX);
            // An estimate, capped below 100 until the snapshot is really done.
            if estimate > 0 { u32::try_from((read.saturating_mul(100) / estimate).min(99)).unwrap_or(99) } else { 0 }
        });
        let idle = health.caught_up() && metrics.in_flight.get() == 0;
        let lag_seconds = match (phase, last_event_unix) {
            (Phase::Streaming, _) if idle => Some(0.0),
            (Phase::Streaming | Phase::Snapshotting, Some(t)) => Some((now_unix - t).max(0) as f64),
            _ => None,
        };
        Self {
            phase: phase.as_str().to_string(),
            failure: health.failure(),
            source_ok: health.source_ok(),
            sink_ok: health.sink_ok(),
            documents_synced: metrics.hot.indexed.get() + metrics.hot.deleted.get(),
            snapshot_percent,
            lag_seconds,
            last_event_unix,
            checkpoint_unix: positive(metrics.checkpoint_time.get()),
            reported_unix: now_unix,
        }
    }
}
