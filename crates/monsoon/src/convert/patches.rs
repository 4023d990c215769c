//! Merge patches (`enable-patches`, `patch-namespaces`, `merge-patch-attribute`):
//! `spec.mergePatches`.
//!
//! Monstache keeps patches for a namespace listed exactly (`db.collection`) when
//! `enable-patches` is on. Its snapshot reads (direct reads) get none; monsoon's start a
//! document's history (version 1 is the document read), so every version rebuilds from `{}`.

use monsoon_api::{MergePatches, SyncPipelineSpec};
use toml::Table;

use super::namespaces::Membership;
use super::{boolean, string, strings, Error, Notes};

const ENABLE: &str = "enable-patches";
const NAMESPACES: &str = "patch-namespaces";
const ATTRIBUTE: &str = "merge-patch-attribute";

/// The merge patch options into `spec`.
pub(super) fn convert(table: &Table, membership: &Membership, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    let enabled = boolean(table, ENABLE)? == Some(true);
    let listed = strings(table, NAMESPACES)?;
    let attribute = string(table, ATTRIBUTE)?.filter(|a| !a.is_empty());
    if !enabled {
        for key in [NAMESPACES, ATTRIBUTE] {
            if table.contains_key(key) {
                notes.add(key, format!("ignored: `{ENABLE}` is not true, so Monstache kept no patches either"));
            }
        }
        return Ok(());
    }
    let mut namespaces = Vec::new();
    for ns in listed {
        if !ns.contains('.') {
            return Err(Error::unusable(NAMESPACES, format!("`{ns}` names no collection: Monstache patches only namespaces listed as `db.collection`, so it never patched anything for it; write `<database>.{ns}` or remove it")));
        }
        if !membership.includes(&ns) {
            notes.add(NAMESPACES, format!("`{ns}` left out: the pipeline does not sync it, so Monstache never patched its documents either"));
            continue;
        }
        if !namespaces.contains(&ns) {
            namespaces.push(ns);
        }
    }
    if namespaces.is_empty() {
        notes.add(ENABLE, format!("ignored: no synced `{NAMESPACES}`"));
        return Ok(());
    }
    let mut mp = MergePatches { namespaces, ..MergePatches::default() };
    if let Some(attribute) = attribute {
        mp.attribute = attribute;
    }
    notes.add(
        NAMESPACES,
        format!(
            "`mergePatches`: each change is applied exactly from its update description (Monstache diffs against a lookup and misses versions of documents changed quickly), entries carry `i` (the change's increment) besides `ts` so a replay adds nothing, and the snapshot's reads start a history (version 1, Monstache: none); the history stays in `{}`, which you may map with `\"index\": false`",
            mp.attribute
        ),
    );
    spec.merge_patches = Some(mp);
    Ok(())
}
