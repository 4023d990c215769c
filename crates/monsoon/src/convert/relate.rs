//! `[[relate]]` (`namespace`, `with-namespace`, `src-field`, `match-field`, `match-field-type`,
//! `keep-src`, `max-depth`, `dot-notation`): `spec.relate`; and the indexes several mappings
//! name (as view replication maps a collection and its view to one index): `spec.sharedIndexes`.

use std::collections::BTreeMap;

use monsoon_api::{MatchFieldType, Relate, SyncPipelineSpec};
use toml::Table;

use super::namespaces::Membership;
use super::{boolean, integer, string, tables, Error, Notes};

const OPTION: &str = "[[relate]]";

/// The relations into `spec.relate`.
pub(super) fn convert(table: &Table, membership: &Membership, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    for r in tables(table, "relate")? {
        let (Some(ns), Some(with)) = (string(r, "namespace")?, string(r, "with-namespace")?) else {
            return Err(Error::unusable(OPTION, "each entry needs `namespace` and `with-namespace` (Monstache refuses to start without them)"));
        };
        for (key, value) in [("namespace", &ns), ("with-namespace", &with)] {
            if !value.contains('.') {
                return Err(Error::unusable(format!("{OPTION}.{key}"), format!("`{value}` names no collection; write `<database>.{value}`")));
            }
        }
        if !membership.includes(&ns) {
            notes.add(OPTION, format!("`{ns}` -> `{with}` left out: the configuration does not follow `{ns}`, so Monstache never related its changes either"));
            continue;
        }
        let match_field_type = string(r, "match-field-type")?.map(|t| match_type(&t)).transpose()?;
        let max_depth = match integer(r, "max-depth")? {
            None => 0,
            Some(d) => u32::try_from(d).ok().filter(|d| *d <= 100).ok_or_else(|| Error::unusable(format!("{OPTION}.max-depth"), format!("`{d}` must be between 0 (no limit) and 100")))?,
        };
        spec.relate.push(Relate {
            namespace: ns,
            with_namespace: with,
            src_field: string(r, "src-field")?.filter(|f| !f.is_empty()).unwrap_or_else(|| "_id".into()),
            match_field: string(r, "match-field")?.filter(|f| !f.is_empty()).unwrap_or_else(|| "_id".into()),
            match_field_type,
            keep_src: boolean(r, "keep-src")? == Some(true),
            max_depth,
            dot_notation: boolean(r, "dot-notation")? == Some(true),
        });
    }
    Ok(())
}

fn match_type(text: &str) -> Result<MatchFieldType, Error> {
    Ok(match text {
        "objectId" => MatchFieldType::ObjectId,
        "string" => MatchFieldType::String,
        "int" => MatchFieldType::Int,
        "long" => MatchFieldType::Long,
        "decimal" => MatchFieldType::Decimal,
        other => return Err(Error::unusable(format!("{OPTION}.match-field-type"), format!("`{other}` is not a type Monstache converts to; write `objectId`, `string`, `int`, `long` or `decimal`"))),
    })
}

/// Indexes that several namespaces' mappings name: Monstache writes them together, and so
/// does monsoon once they are listed in `spec.sharedIndexes` (a drop of one namespace then
/// deletes only its own documents there).
pub(super) fn share_indexes(spec: &mut SyncPipelineSpec, notes: &mut Notes) {
    let mut writers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let fixed = spec.mappings.iter().filter_map(|m| m.index.clone().map(|i| (m.namespace.clone(), i)));
    for (ns, index) in spec.indexes.clone().into_iter().chain(fixed) {
        writers.entry(index).or_default().push(ns);
    }
    for (index, namespaces) in writers.into_iter().filter(|(_, n)| n.len() > 1) {
        notes.add(
            "[[mapping]].index",
            format!("`{}` all write index `{index}`: listed in `sharedIndexes`, so a drop of one deletes only its own documents there (each keeps a location record)", namespaces.join("`, `")),
        );
        if !spec.shared_indexes.contains(&index) {
            spec.shared_indexes.push(index);
        }
    }
}
