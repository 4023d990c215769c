//! `spec.mergePatches` (Monstache's `enable-patches`, `patch-namespaces`,
//! `merge-patch-attribute`): the field type and its validation, kept apart from the rest of
//! the spec so the format of one feature reads in one place.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::SyncPipelineSpec;
use crate::validate::{FieldError, NamespacePattern};

/// Merge patches: every version of some namespaces' documents, kept in the indexed document.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MergePatches {
    /// Namespaces whose documents keep their patch history (`db.collection` or `db.*`, each
    /// synced by the pipeline; Monstache's `patch-namespaces`).
    #[schemars(length(min = 1, max = 1000), inner(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#)))]
    pub namespaces: Vec<String>,
    /// The field of the indexed document holding the history (Monstache's
    /// `merge-patch-attribute`): an array of `{"p": <RFC 7396 merge patch, as a JSON string>,
    /// "ts": <seconds of the change's cluster time>, "i": <its increment>, "v": <version, from
    /// 1>}`. Applying the patches in order to `{}` rebuilds each version. A top-level field name:
    /// no `.`, not starting with `_`.
    #[serde(default = "default_attribute")]
    #[schemars(regex(pattern = r"^[^._][^.]{0,254}$"))]
    pub attribute: String,
}

/// Monstache's default `merge-patch-attribute`.
pub const DEFAULT_ATTRIBUTE: &str = "json-merge-patches";

fn default_attribute() -> String {
    DEFAULT_ATTRIBUTE.to_string()
}

impl Default for MergePatches {
    fn default() -> Self {
        Self { namespaces: Vec::new(), attribute: default_attribute() }
    }
}

/// Whether two namespace patterns can name one collection.
fn overlaps(a: &NamespacePattern, b: &NamespacePattern) -> bool {
    a.database == b.database && (a.collection.is_none() || b.collection.is_none() || a.collection == b.collection)
}

/// `spec.mergePatches`: namespaces the pipeline syncs, an attribute Elasticsearch takes as a
/// top-level field, and nothing else changing what a patched namespace's documents become (the
/// history is the documents as MongoDB holds them, so a mapping, script, filter or files
/// option on the same namespace is refused rather than half applied).
pub(crate) fn validate(spec: &SyncPipelineSpec, synced: impl Fn(&NamespacePattern) -> bool, errs: &mut Vec<FieldError>) {
    let Some(mp) = &spec.merge_patches else { return };
    let mut push = |field: String, message: String| errs.push(FieldError { field, message });
    if mp.namespaces.is_empty() {
        push("spec.mergePatches.namespaces".into(), "must list at least one namespace (`db.collection` or `db.*`) whose documents keep a patch history".into());
    }
    let attr = &mp.attribute;
    if attr.is_empty() || attr.starts_with('_') || attr.contains('.') || attr.len() > 255 {
        push(
            "spec.mergePatches.attribute".into(),
            format!("`{attr}` cannot hold the history: use a top-level field name of 1-255 bytes, without `.`, not starting with `_` (Monstache's default is `{DEFAULT_ATTRIBUTE}`)"),
        );
    }
    let parse_all = |list: &mut dyn Iterator<Item = &str>| list.filter_map(|n| NamespacePattern::parse(n).ok().map(|p| (n.to_string(), p))).collect::<Vec<_>>();
    let mappings = parse_all(&mut spec.mappings.iter().filter(|m| !plain_mapping(m)).map(|m| m.namespace.as_str()));
    let scripted: Vec<(String, Option<NamespacePattern>)> = spec
        .scripts
        .iter()
        .chain(&spec.filters)
        .map(|s| (s.namespace.clone().unwrap_or_else(|| "every namespace".into()), s.namespace.as_deref().and_then(|n| NamespacePattern::parse(n).ok())))
        .collect();
    let files = spec.files.as_ref().map(|f| parse_all(&mut f.namespaces.iter().map(String::as_str))).unwrap_or_default();
    for (i, ns) in mp.namespaces.iter().enumerate() {
        let field = format!("spec.mergePatches.namespaces[{i}]");
        let p = match NamespacePattern::parse(ns) {
            Ok(p) => p,
            Err(m) => {
                push(field, m);
                continue;
            }
        };
        if !synced(&p) {
            push(field, format!("`{ns}` is not synced by this pipeline; add it to `spec.namespaces` or remove it here"));
            continue;
        }
        if let Some((m, _)) = mappings.iter().find(|(_, q)| overlaps(&p, q)) {
            push(
                field.clone(),
                format!("`{ns}` also has mapping `{m}`, which changes its documents (only a fixed `index` may be set): the history holds documents as MongoDB has them; remove the mapping's other settings, or the namespace here"),
            );
        }
        if let Some((s, _)) = scripted.iter().find(|(_, q)| q.as_ref().is_none_or(|q| overlaps(&p, q))) {
            push(field.clone(), format!("`{ns}` also has a script or filter (for {s}): a history of documents a script rewrites is not supported yet; remove one of them"));
        }
        if let Some((f, _)) = files.iter().find(|(_, q)| overlaps(&p, q)) {
            push(field.clone(), format!("`{ns}` is also a GridFS files collection (`spec.files`: {f}): patch histories of files are not supported; remove one of them"));
        }
        let index = p.collection.as_ref().map(|c| spec.indexes.get(&format!("{}.{c}", p.database)).cloned().unwrap_or_else(|| format!("{}.{c}", p.database).to_lowercase()));
        if let Some(index) = index.filter(|i| spec.shared_indexes.contains(i)) {
            push(field, format!("`{ns}` writes index `{index}`, listed in `spec.sharedIndexes`: documents with a patch history need an index of their own; remove it from one of them"));
        } else if p.collection.is_none() && !spec.shared_indexes.is_empty() {
            push(field, format!("`{ns}` names every collection of a database while `spec.sharedIndexes` is set: documents with a patch history need an index of their own; name the collections instead"));
        }
    }
}

/// A mapping that leaves the documents as they are: at most a fixed index.
fn plain_mapping(m: &crate::spec::Mapping) -> bool {
    let fixed_index = m.index.as_deref().is_none_or(|i| !i.contains('{'));
    fixed_index
        && m.id.is_none()
        && m.routing.is_none()
        && m.ingest_pipeline.is_none()
        && m.include.is_empty()
        && m.exclude.is_empty()
        && m.rename.is_empty()
        && m.keep.is_none()
        && m.delete_when.is_none()
        && m.write_mode == crate::spec::WriteMode::default()
        && m.oplog_time.is_none()
        && m.aggregation.is_none()
}

#[cfg(test)]
mod tests {
    use crate::validate::ManifestError;

    const PIPELINE: &str = r#"
apiVersion: monsoon.dev/v1alpha1
kind: SyncPipeline
metadata:
  name: shop
spec:
  mongodb:
    uri: "mongodb://127.0.0.1:27017/?directConnection=true"
  elasticsearch:
    urls: ["http://127.0.0.1:9200"]
  namespaces: [shop.orders, shop.users, logs.*]
"#;

    /// The driver's parser lives in the engine; these rules do not depend on its answer.
    fn any_uri(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn fields_refused(extra: &str) -> Vec<(String, String)> {
        match crate::parse_manifest(&format!("{PIPELINE}{extra}"), any_uri) {
            Err(ManifestError::Invalid(e)) => e.into_iter().map(|e| (e.field, e.message)).collect(),
            Ok(_) => Vec::new(),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn merge_patches_with_defaults_are_valid() {
        let p = crate::parse_manifest(&format!("{PIPELINE}  mergePatches: {{namespaces: [shop.orders, logs.*]}}\n  mappings: [{{namespace: shop.orders, index: orders}}]\n"), any_uri).expect("valid");
        let mp = p.spec.merge_patches.expect("merge patches");
        assert_eq!(mp.attribute, "json-merge-patches");
        assert_eq!(mp.namespaces, ["shop.orders", "logs.*"]);
    }

    #[test]
    fn what_would_change_a_patched_document_is_refused_naming_the_field() {
        let refused = fields_refused(
            "  mergePatches: {namespaces: [shop.orders, shop.gone, logs.*], attribute: _p}\n  mappings: [{namespace: logs.*, exclude: [secret]}]\n  scripts: [{namespace: shop.orders, script: 'module.exports = function(d) { return d; }'}]\n",
        );
        let fields: Vec<&str> = refused.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            ["spec.mergePatches.attribute", "spec.mergePatches.namespaces[0]", "spec.mergePatches.namespaces[1]", "spec.mergePatches.namespaces[2]"],
            "{refused:#?}"
        );
        assert!(refused[1].1.contains("script"), "{refused:#?}");
        assert!(refused[2].1.contains("not synced"), "{refused:#?}");
        assert!(refused[3].1.contains("mapping `logs.*`"), "{refused:#?}");
        let empty = fields_refused("  mergePatches: {namespaces: []}\n");
        assert_eq!(empty[0].0, "spec.mergePatches.namespaces");
        let shared = fields_refused("  mergePatches: {namespaces: [shop.orders]}\n  sharedIndexes: [shop.orders]\n  indexes: {shop.users: shop.orders}\n");
        assert!(shared.iter().any(|(f, m)| f == "spec.mergePatches.namespaces[0]" && m.contains("sharedIndexes")), "{shared:#?}");
    }
}
