//! Where a new pipeline's stream starts (`resume-from-timestamp`, `replay`:
//! `spec.streamStart`) and one-shot runs (`exit-after-direct-reads`: `monsoon run --once`).

use monsoon_api::{SnapshotSplit, StreamStart, SyncPipelineSpec};
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
    split(table, spec, notes)?;
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

/// `direct-read-split-max` (how many times Monstache may split a collection for parallel direct
/// reads): `spec.snapshotSplit` with that many ranges (2 to 64). Monstache splits by default;
/// monsoon reads one pass unless told, so only a value written in the configuration carries.
fn split(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    let Some(max) = integer(table, "direct-read-split-max")? else { return Ok(()) };
    if max < 2 || !spec.snapshot {
        notes.add("direct-read-split-max", "not carried: each collection is read in one `_id`-ordered pass");
        return Ok(());
    }
    let ranges = u32::try_from(max.min(64)).unwrap_or(64);
    spec.snapshot_split = Some(SnapshotSplit { ranges, min_documents: 100_000 });
    notes.add("direct-read-split-max", format!("`snapshotSplit: {{ranges: {ranges}, minDocuments: 100000}}`: collections of 100,000 documents or more are read in {ranges} `_id` ranges at once, each resumable on its own"));
    Ok(())
}
