//! Prometheus metrics and the shared health state of one pipeline.
//!
//! Every stage updates these; the HTTP server renders them (`/metrics`, `/stats`, `/healthz`,
//! `/readyz`). Metric names are stable API for dashboards and alerts.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Pipeline metrics. Cloning is cheap (handles to the same series).
#[derive(Clone)]
pub struct Metrics {
    /// Registry holding every series below.
    pub registry: Registry,
    /// Change events read from the change stream, by operation type.
    pub events: IntCounterVec,
    /// Documents read by the snapshot.
    pub snapshot_docs: IntCounter,
    /// Bulk items by outcome (`indexed`, `deleted`, `stale`, `already_gone`, `dead_lettered`).
    pub items: IntCounterVec,
    /// Bulk requests by outcome (`ok`, `retry`, `split`, `error`).
    pub bulk_requests: IntCounterVec,
    /// Items sent again after a retriable failure.
    pub retried_items: IntCounter,
    /// Writes held back because their document was in a bulk request in flight.
    pub held_writes: IntCounter,
    /// Documents sent to the dead-letter index, by Elasticsearch error type.
    pub dead_letters: IntCounterVec,
    /// Dead-letter records Elasticsearch refused too (logged at ERROR with the document id).
    pub dead_letter_failures: IntCounter,
    /// Bulk request latency.
    pub bulk_seconds: Histogram,
    /// Writes read from MongoDB but not yet acknowledged by Elasticsearch.
    pub in_flight: IntGauge,
    /// Unix time of the last committed checkpoint.
    pub checkpoint_time: IntGauge,
    /// Checkpoint writes.
    pub checkpoints: IntCounter,
    /// Unix time of the cluster time of the last change in the committed checkpoint.
    pub checkpoint_event_time: IntGauge,
    /// Documents this worker's snapshot expects to read (estimated from collection sizes).
    pub snapshot_estimate: IntGauge,
    /// Seconds between a change's cluster time and its acknowledgement (last batch).
    pub lag_seconds: IntGauge,
    /// Double NaN/±Infinity values written as null (Elasticsearch rejects them).
    pub non_finite_nulled: IntCounter,
    /// GridFS files indexed without their content: larger than `files.maxFileSize`.
    pub files_too_large: IntCounter,
    /// Share of the last 1000 answered writes that came back stale (409).
    pub stale_share: Gauge,
    /// Change stream re-opened after an error.
    pub stream_reopens: IntCounter,
    /// Resume point lost from the oplog (ChangeStreamHistoryLost).
    pub history_lost: IntCounter,
    /// Indexes deleted because their collection was dropped.
    pub indexes_dropped: IntCounter,
    /// Series of `items` and `events` resolved once: the per-document paths increment these
    /// without a label lookup.
    pub hot: HotCounters,
}

/// Label values of the per-document counters, resolved once.
#[derive(Clone)]
pub struct HotCounters {
    /// `bulk_items_total{outcome="indexed"}`.
    pub indexed: IntCounter,
    /// `bulk_items_total{outcome="deleted"}`.
    pub deleted: IntCounter,
    /// `bulk_items_total{outcome="stale"}`.
    pub stale: IntCounter,
    /// `bulk_items_total{outcome="already_gone"}`.
    pub already_gone: IntCounter,
    /// `bulk_items_total{outcome="dead_lettered"}`.
    pub dead_lettered: IntCounter,
    /// `change_events_total{op="upsert"}`.
    pub upserts: IntCounter,
    /// `change_events_total{op="delete"}`.
    pub deletes: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    /// Fresh metrics in their own registry, labelled with the pipeline name.
    #[allow(clippy::expect_used)] // names and labels are constants: a failure is a bug caught by every test
    pub fn new(pipeline: &str) -> Self {
        let registry = Registry::new_custom(
            Some("monsoon".into()),
            Some([("pipeline".to_string(), pipeline.to_string())].into()),
        )
        .expect("valid registry");
        let bulk_seconds = Histogram::with_opts(
            HistogramOpts::new("bulk_request_seconds", "Bulk request latency")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(bulk_seconds.clone()))
            .expect("unique metric");
        let events = counter_vec(&registry, "change_events_total", "Change events read, by operation type", "op");
        let items = counter_vec(&registry, "bulk_items_total", "Bulk items by final outcome", "outcome");
        let hot = HotCounters {
            indexed: items.with_label_values(&["indexed"]),
            deleted: items.with_label_values(&["deleted"]),
            stale: items.with_label_values(&["stale"]),
            already_gone: items.with_label_values(&["already_gone"]),
            dead_lettered: items.with_label_values(&["dead_lettered"]),
            upserts: events.with_label_values(&["upsert"]),
            deletes: events.with_label_values(&["delete"]),
        };
        Self {
            hot,
            events,
            snapshot_docs: counter(&registry, "snapshot_documents_total", "Documents read by the snapshot"),
            items,
            bulk_requests: counter_vec(&registry, "bulk_requests_total", "Bulk requests by outcome", "outcome"),
            retried_items: counter(&registry, "bulk_items_retried_total", "Items sent again after a retriable failure"),
            held_writes: counter(&registry, "writes_held_total", "Writes held back because their document was in a bulk request in flight"),
            dead_letters: counter_vec(&registry, "dead_letter_total", "Documents dead-lettered, by Elasticsearch error type", "error_type"),
            dead_letter_failures: counter(&registry, "dead_letter_failures_total", "Dead-letter records Elasticsearch refused"),
            bulk_seconds,
            in_flight: gauge(&registry, "writes_in_flight", "Writes read but not yet acknowledged"),
            checkpoint_time: gauge(&registry, "checkpoint_timestamp_seconds", "Unix time of the last committed checkpoint"),
            checkpoints: counter(&registry, "checkpoints_total", "Checkpoint writes"),
            checkpoint_event_time: gauge(&registry, "checkpoint_event_timestamp_seconds", "Cluster time (Unix seconds) of the last change in the committed checkpoint"),
            snapshot_estimate: gauge(&registry, "snapshot_documents_estimated", "Documents the snapshot expects to read (from collection size estimates)"),
            lag_seconds: gauge(&registry, "lag_seconds", "Seconds from a change's cluster time to its acknowledgement"),
            non_finite_nulled: counter(&registry, "non_finite_values_nulled_total", "NaN/Infinity values written as null"),
            files_too_large: counter(&registry, "files_too_large_total", "GridFS files indexed without their content (larger than files.maxFileSize)"),
            stale_share: {
                let g = Gauge::new("stale_write_share", "Share of the last 1000 answered writes that came back stale (409); lasting near 1, another writer versions the documents higher").expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            stream_reopens: counter(&registry, "change_stream_reopens_total", "Change stream re-opened after an error"),
            history_lost: counter(&registry, "history_lost_total", "Resume point lost from the oplog"),
            indexes_dropped: counter(&registry, "indexes_dropped_total", "Indexes deleted after their collection was dropped"),
            registry,
        }
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "failed to encode metrics");
        }
        out
    }
}

/// Pipeline phase, as shown by `/stats` and the operator's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and loading the checkpoint.
    Starting = 0,
    /// Reading existing documents.
    Snapshotting = 1,
    /// Following the change stream.
    Streaming = 2,
    /// Stopped with an error.
    Failed = 3,
    /// Shut down cleanly.
    Stopped = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Snapshotting,
            2 => Self::Streaming,
            3 => Self::Failed,
            4 => Self::Stopped,
            _ => Self::Starting,
        }
    }

    /// Name as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "Starting",
            Self::Snapshotting => "Snapshotting",
            Self::Streaming => "Streaming",
            Self::Failed => "Failed",
            Self::Stopped => "Stopped",
        }
    }
}

/// Shared health of the pipeline's stages.
pub struct Health {
    started: Instant,
    phase: AtomicU8,
    source_ok: AtomicBool,
    sink_ok: AtomicBool,
    /// Millis since `started` of the last sign of life of each loop (source, sink).
    source_beat: AtomicU64,
    sink_beat: AtomicU64,
    /// Millis since `started` of the last acknowledgement, and whether work is waiting.
    last_progress: AtomicU64,
    failure: Mutex<Option<String>>,
    /// The last change-stream read found nothing new.
    caught_up: AtomicBool,
    /// When (millis since `started`, plus one) the transform stage began waiting on a script
    /// decision; 0 while it waits on none.
    transform_wait: AtomicU64,
    /// How long a loop may go without a heartbeat before `/healthz` fails.
    stuck_after: Duration,
}

impl Health {
    /// Health of a pipeline that is starting.
    pub fn new(stuck_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Starting as u8),
            source_ok: AtomicBool::new(false),
            sink_ok: AtomicBool::new(false),
            source_beat: AtomicU64::new(0),
            sink_beat: AtomicU64::new(0),
            last_progress: AtomicU64::new(0),
            failure: Mutex::new(None),
            caught_up: AtomicBool::new(false),
            transform_wait: AtomicU64::new(0),
            stuck_after,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Set the phase.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// The source loop is alive; `ok` says whether MongoDB answers.
    pub fn source_beat(&self, ok: bool) {
        self.source_ok.store(ok, Ordering::Relaxed);
        self.source_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The sink loop is alive; `ok` says whether Elasticsearch accepts writes.
    pub fn sink_beat(&self, ok: bool) {
        self.sink_ok.store(ok, Ordering::Relaxed);
        self.sink_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The sink loop is alive (whether Elasticsearch accepts writes is left as it was).
    pub fn sink_alive(&self) {
        self.sink_beat.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether the last change-stream read found nothing new (the source is caught up).
    pub fn set_caught_up(&self, caught_up: bool) {
        self.caught_up.store(caught_up, Ordering::Relaxed);
    }

    /// See [`Health::set_caught_up`].
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Whether MongoDB answered the source's last request.
    pub fn source_ok(&self) -> bool {
        self.source_ok.load(Ordering::Relaxed)
    }

    /// Whether Elasticsearch accepted the sink's last request.
    pub fn sink_ok(&self) -> bool {
        self.sink_ok.load(Ordering::Relaxed)
    }

    /// Writes were acknowledged.
    pub fn progressed(&self) {
        self.last_progress.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The pipeline stopped with an error.
    pub fn fail(&self, reason: String) {
        self.set_phase(Phase::Failed);
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(reason);
        }
    }

    /// The error the pipeline stopped with.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// The transform stage starts (`true`) or stops (`false`) waiting on script decisions or a
    /// related document; `true` again while it waits restarts the count (a decision came in).
    pub fn transform_waiting(&self, waiting: bool) {
        let value = if waiting { self.now_ms() + 1 } else { 0 };
        self.transform_wait.store(value, Ordering::Relaxed);
    }

    /// Seconds the transform stage has been waiting without progress on script decisions or a
    /// related document, if it is.
    pub fn transform_waiting_seconds(&self) -> Option<u64> {
        self.transform_waiting_ms().map(|ms| ms / 1000)
    }

    fn transform_waiting_ms(&self) -> Option<u64> {
        let since = self.transform_wait.load(Ordering::Relaxed);
        (since > 0).then(|| self.now_ms().saturating_sub(since - 1))
    }

    /// Liveness: `Err(reason)` when the pipeline failed, a loop stopped beating, or the
    /// transform stage has waited on script decisions, none coming in, or on a related document,
    /// for longer than a loop may be silent
    /// (a script worker that died, or a MongoDB outage its lookups are waiting out).
    pub fn live(&self) -> Result<(), String> {
        if let Some(f) = self.failure() {
            return Err(format!("pipeline failed: {f}"));
        }
        let now = self.now_ms();
        let limit = self.stuck_after.as_millis() as u64;
        if let Some(waited) = self.transform_waiting_ms() {
            if waited > limit {
                return Err(format!("transform stage has waited {}s for script decisions (none came in) or a related document (script workers stopped, or lookups wait on MongoDB)", waited / 1000));
            }
        }
        if self.phase() != Phase::Starting && now > limit {
            for (name, beat) in [("source", &self.source_beat), ("sink", &self.sink_beat)] {
                let last = beat.load(Ordering::Relaxed);
                if now.saturating_sub(last) > limit {
                    return Err(format!("{name} loop has not made progress for {}s", (now - last) / 1000));
                }
            }
        }
        Ok(())
    }

    /// Readiness: `Err(reason)` unless both ends answer and the pipeline runs.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        match self.phase() {
            Phase::Snapshotting | Phase::Streaming => {}
            // Start-up marks Elasticsearch unreachable while it waits for it.
            Phase::Starting if !self.sink_ok() && self.sink_beat.load(Ordering::Relaxed) > 0 => {
                return Err("phase is Starting: waiting for Elasticsearch, which is unreachable".into());
            }
            p => return Err(format!("phase is {}", p.as_str())),
        }
        if !self.source_ok.load(Ordering::Relaxed) {
            return Err("MongoDB is unreachable or the change stream is backing off".into());
        }
        if !self.sink_ok.load(Ordering::Relaxed) {
            return Err("Elasticsearch is unreachable or refusing writes (backing off)".into());
        }
        Ok(())
    }

    /// Seconds since the last acknowledgement.
    pub fn seconds_since_progress(&self) -> u64 {
        (self.now_ms().saturating_sub(self.last_progress.load(Ordering::Relaxed))) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_both_ends_and_failure_breaks_liveness() {
        let h = Health::new(Duration::from_secs(60));
        assert!(h.ready().is_err(), "starting is not ready");
        h.set_phase(Phase::Streaming);
        h.source_beat(true);
        h.sink_beat(false);
        assert!(h.ready().is_err_and(|e| e.contains("Elasticsearch")));
        h.sink_beat(true);
        assert!(h.ready().is_ok());
        assert!(h.live().is_ok());
        h.fail("history lost".into());
        assert!(h.live().is_err_and(|e| e.contains("history lost")));
    }

    #[test]
    fn a_script_decision_that_never_comes_fails_liveness() {
        let h = Health::new(Duration::from_millis(50));
        h.set_phase(Phase::Streaming);
        h.transform_waiting(true);
        std::thread::sleep(Duration::from_millis(80));
        // The loops beat (the source waits on the sink, beating), yet the pipeline is stuck.
        h.source_beat(true);
        h.sink_beat(true);
        assert!(h.live().is_err_and(|e| e.contains("transform stage")), "{:?}", h.live());
        h.transform_waiting(false);
        assert!(h.live().is_ok());
    }

    #[test]
    fn metrics_render_with_pipeline_label() {
        let m = Metrics::new("shop");
        m.items.with_label_values(&["indexed"]).inc_by(3);
        let text = m.render();
        assert!(text.contains("monsoon_bulk_items_total{outcome=\"indexed\",pipeline=\"shop\"} 3"), "{text}");
    }
}
