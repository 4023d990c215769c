//! Where a new pipeline's stream starts (`resume-from-timestamp`, `replay`:
//! `spec.streamStart`) and one-shot runs (`exit-after-direct-reads`: `monsoon run --once`).

use monsoon_api::{StreamStart, SyncPipelineSpec};
use toml::Table;

use super::{boolean, integer, Error, Notes};

/// The start options into `spec`; whether the pipeline is meant to run once.
pub(super) fn convert(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<bool, Error> {
    let replay = boolean(table, "replay")? == Some(true);
    let timestamp = integer(table, "resume-from-timestamp")?.filter(|t| *t > 0);
    if replay {
        spec.stream_start = Some(StreamStart { timestamp: None, oldest: true });
        notes.add("replay", "`streamStart: {oldest: true}`: a new pipeline's stream starts at the oldest entry the oplog holds (Monstache starts 10 s after it); once the pipeline has a checkpoint it resumes from there");
        if timestamp.is_some() {
            notes.add("resume-from-timestamp", "ignored: `replay` wins, as in Monstache");
        }
    } else if let Some(t) = timestamp {
        // Monstache reads values past 2^31 as a whole oplog timestamp (seconds << 32 | increment).
        let seconds = if t > i64::from(i32::MAX) { t >> 32 } else { t };
        let seconds = u32::try_from(seconds).map_err(|_| Error::unusable("resume-from-timestamp", "is not a time MongoDB can hold; write seconds since the Unix epoch"))?;
        if seconds == 0 {
            return Err(Error::unusable("resume-from-timestamp", "is not a time MongoDB can hold; write seconds since the Unix epoch"));
        }
        spec.stream_start = Some(StreamStart { timestamp: Some(seconds), oldest: false });
        notes.add("resume-from-timestamp", format!("`streamStart: {{timestamp: {seconds}}}`: used when the pipeline has no checkpoint yet (Monstache starts there at every start); afterwards it resumes from its checkpoint"));
    }
    let once = boolean(table, "exit-after-direct-reads")? == Some(true);
    if once {
        if spec.snapshot {
            notes.add("exit-after-direct-reads", "run the pipeline with `monsoon run --once`: it snapshots, waits until Elasticsearch acknowledged every write and the checkpoint is stored, then exits 0");
        } else {
            notes.add("exit-after-direct-reads", "ignored: there are no `direct-read-namespaces`, so Monstache never exits either");
        }
    }
    Ok(once && spec.snapshot)
}
