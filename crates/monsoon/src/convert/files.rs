//! GridFS files indexed with their content (`index-files`, `file-namespaces`, `max-file-size`:
//! `spec.files`), and what changes for a `[[script]]` on a files collection.

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

/// Note each `[[script]]` that runs on a files collection (carried as it is): it sees the
/// file's document without the content, which Monstache's scripts see in `file`.
pub(super) fn note_scripts(spec: &SyncPipelineSpec, notes: &mut Notes) {
    let Some(files) = &spec.files else { return };
    for ns in &files.namespaces {
        let db_wide = ns.split_once('.').map(|(db, _)| format!("{db}.*"));
        let runs_here = |n: &Option<String>| n.as_ref().is_none_or(|n| n == ns || Some(n) == db_wide.as_ref());
        if spec.scripts.iter().any(|s| runs_here(&s.namespace)) {
            notes.add(
                "[[script]]",
                format!("runs on files collection `{ns}` with the file's document (name, length, metadata) but without its content: monsoon adds `file` after the script (Monstache, before it), so content never fills the script's heap; a script that read or removed `doc.file` needs changing. The file's document goes where the script puts it (`_meta_monstache`), through its `pipeline` if it names one (which then gets `file`), else through `attachment`"),
            );
        }
    }
}
