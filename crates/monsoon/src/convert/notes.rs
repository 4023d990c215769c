//! Every option the other parts did not take: not needed (with why), not supported yet, or
//! unknown. Each becomes a note, so nothing is dropped silently.

use toml::Table;

use super::Notes;

/// Options monsoon has no use for, with the reason shown to the user.
const NOT_NEEDED: &[(&str, &str)] = &[
    ("resume", "monsoon always resumes from its own checkpoint (a file with `monsoon run`, a ConfigMap in a cluster)"),
    ("resume-name", "each pipeline has its own checkpoint, named after the pipeline"),
    ("resume-strategy", "monsoon resumes from change stream resume tokens only"),
    ("resume-write-unsafe", "checkpoints are written only after Elasticsearch acknowledged everything before them"),
    ("cluster-name", "in Kubernetes each shard's worker holds a lease; standalone, run one process per pipeline"),
    ("workers", "in Kubernetes, `spec.workers` splits a pipeline into shards by `_id`"),
    ("verbose", "set RUST_LOG (e.g. RUST_LOG=debug)"),
    ("stats", "/stats and /metrics (Prometheus) are always served on --http-addr"),
    ("index-stats", "/stats and /metrics (Prometheus) are always served on --http-addr"),
    ("stats-duration", "/stats and /metrics are served live"),
    ("enable-http-server", "/healthz, /readyz, /metrics and /stats are always served on --http-addr"),
    ("http-server-addr", "use `monsoon run --http-addr`"),
    ("pprof", "not available"),
    ("file-highlighting", "highlighting is a search option: ask for `highlight` on `attachment.content` in the query"),
    ("fail-fast", "monsoon retries what can be retried and dead-letters what cannot; it stops only on errors a person must fix"),
    ("direct-read-concur", "the snapshot reads collections one after another; bulk requests run `batch.concurrency` at once"),
    ("direct-read-no-timeout", "snapshot reads time out only when MongoDB stops answering, and then resume after the last `_id`"),
    ("elasticsearch-retry", "monsoon always retries retriable failures"),
    ("elasticsearch-client-timeout", "bulk requests time out after 60 s and are retried"),
    ("elasticsearch-healthcheck-timeout", "not needed"),
    ("elasticsearch-healthcheck-timeout-startup", "not needed"),
    ("elasticsearch-version", "the version is read from the server"),
    ("mongo-dial-settings", "set timeouts in the connection string"),
    ("mongo-session-settings", "set timeouts in the connection string"),
    ("gtm-settings", "batching is `spec.batch`"),
    ("env-delimiter", "monsoon reads each secret from its own variable"),
    ("config-database-name", "monsoon keeps no state in MongoDB"),
    ("enable-oplog", "monsoon reads change streams only (MongoDB 4.0+)"),
    ("disable-change-events", "the pipeline syncs the direct-read namespaces; `monsoon run --once` snapshots them and exits, a plain `monsoon run` then follows their changes"),
    ("graylog-addr", "logs go to stderr (text or JSON with --log-format)"),
    ("logs", "logs go to stderr (text or JSON with --log-format)"),
    ("dropped-databases", "a dropped database drops each of its synced collections, per `onDrop`"),
    ("routing-namespaces", "a namespace is routed when its mapping sets `routing` (or an index or `_id` from a field); monsoon then records where each document went"),
    ("delete-strategy", "deletes of routed or re-indexed documents go where monsoon recorded them (index `monsoon-locations`): precise, with no search per delete and no state in MongoDB"),
    ("relate-threads", "relations are followed in the transform stage, many changes at once, each in order"),
    ("relate-buffer", "related changes wait in the transform stage's bounded window; none is skipped when it is full (Monstache skips them)"),
    ("delete-index-pattern", "deletes go where monsoon recorded each routed document; no index pattern is searched"),
];

/// Options monsoon does not support yet.
const NOT_YET: &[&str] = &[
    "namespace-drop-exclude-regex",
    "mapper-plugin-path",
    "post-processors",
    "prune-invalid-json",
    "pipe-allow-disk",
    "disable-file-pipeline-put",
];

/// Options the other parts read.
const HANDLED: &[&str] = &[
    "mongo-url", "mongo-pem-file", "mongo-validate-pem-file", "elasticsearch-urls", "elasticsearch-user",
    "elasticsearch-password", "elasticsearch-pem-file", "elasticsearch-validate-pem-file", "gzip",
    "elasticsearch-max-docs", "elasticsearch-max-bytes", "elasticsearch-max-seconds", "elasticsearch-max-conns",
    "direct-read-namespaces", "change-stream-namespaces", "dropped-collections", "mapping",
    "namespace-regex", "namespace-exclude-regex", "index-as-update", "index-oplog-time", "oplog-ts-field-name",
    "oplog-date-field-name", "oplog-date-field-format", "script", "filter", "pipeline",
    "resume-from-timestamp", "replay", "exit-after-direct-reads", "aws-connect", "direct-read-split-max", "index-files", "file-namespaces", "max-file-size", "time-machine-namespaces",
    "time-machine-index-prefix", "time-machine-index-suffix", "time-machine-direct-reads", "enable-patches", "patch-namespaces",
    "merge-patch-attribute", "relate",
];

/// A note for every option no other part took.
pub(super) fn left_out(table: &Table, notes: &mut Notes) {
    for key in table.keys().filter(|k| !HANDLED.contains(&k.as_str())) {
        let reason = if let Some((_, why)) = NOT_NEEDED.iter().find(|(k, _)| k == key) {
            format!("not needed: {why}")
        } else if NOT_YET.contains(&key.as_str()) {
            "not supported yet".to_string()
        } else {
            "not a Monstache option monsoon knows; ignored".to_string()
        };
        notes.add(key.clone(), reason);
    }
}
