//! GridFS files indexed with their content (`index-files`, `file-namespaces`, `max-file-size`:
//! `spec.files`).

use monsoon_api::{FilesSpec, SyncPipelineSpec};
use toml::Table;

use super::{boolean, integer, strings, Error, Notes};

/// The files options into `spec`.
pub(super) fn convert(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    let namespaces = strings(table, "file-namespaces")?;
    if boolean(table, "index-files")? != Some(true) {
        if !namespaces.is_empty() {
            notes.add("file-namespaces", "not carried: `index-files` is not true, so Monstache indexes no content either");
        }
        return Ok(());
    }
    if namespaces.is_empty() {
        notes.add("index-files", "not carried: no `file-namespaces` name the files collections");
        return Ok(());
    }
    let max_file_size = match integer(table, "max-file-size")? {
        Some(n) if n > 0 => u64::try_from(n).unwrap_or(u64::MAX).min(100 << 20),
        _ => {
            notes.add("max-file-size", "files over 16 MiB are indexed without their content (monsoon's default `files.maxFileSize`; Monstache sets no limit, but one file must fit in one bulk request)");
            16 << 20
        }
    };
    notes.add("index-files", "`files`: each file's document gets its content, base64, in `file`, through ingest pipeline `attachment`, which monsoon creates at start (it needs Elasticsearch 8.4+ or the ingest-attachment plugin)");
    spec.files = Some(FilesSpec { namespaces, max_file_size, pipeline: "attachment".into(), create_pipeline: true });
    Ok(())
}
