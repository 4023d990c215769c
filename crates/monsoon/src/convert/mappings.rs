//! `[[mapping]]` (index and ingest pipeline per namespace), `index-as-update` and
//! `index-oplog-time`: `spec.indexes` and `spec.mappings`.

use std::collections::BTreeMap;

use monsoon_api::{Mapping, OplogTime, SyncPipelineSpec, WriteMode};
use toml::Table;

use super::connection::placeholder;
use super::namespaces::Membership;
use super::{boolean, string, tables, Error, Notes};

/// A `namespace` of `[[mapping]]`, `[[script]]`, `[[filter]]` or `[[pipeline]]` must name one
/// collection: Monstache compares it with each operation's `database.collection` exactly, so
/// anything else never applied to anything. Refused, since the user surely meant something.
pub(super) fn check_namespace(key: &str, ns: &str) -> Result<(), Error> {
    let option = format!("[[{key}]].namespace");
    match ns.split_once('.') {
        None => Err(Error::unusable(option, format!("`{ns}` has no database: Monstache compares it with `database.collection` and never applied it; write the database too (`mydb.{ns}`), or remove the entry"))),
        Some((db, coll)) if db.is_empty() || coll.is_empty() || coll.contains('*') || db.contains('*') => Err(Error::unusable(
            option,
            format!("`{ns}` is not one collection: Monstache compares namespaces exactly, so it never applied; write one entry per `database.collection`, or remove it"),
        )),
        Some(_) => Ok(()),
    }
}

/// A `[[mapping]]` index name as Elasticsearch takes it: lower-cased (noted), valid.
fn index_name(ns: &str, index: &str, notes: &mut Notes) -> Result<String, Error> {
    const OPTION: &str = "[[mapping]].index";
    if let Some(p) = placeholder(index) {
        return Err(Error::unusable(OPTION, format!("`{ns}`: `{p}` is a placeholder; write the index name")));
    }
    let lower = index.to_lowercase();
    if lower != index {
        notes.add(OPTION, format!("`{ns}`: `{index}` is lower-cased to `{lower}` (Elasticsearch index names are lower-case; Monstache's requests were refused)"));
    }
    monsoon_api::check_index_name(&lower).map_err(|m| Error::unusable(OPTION, format!("`{ns}`: index `{lower}` {m}; pick a valid Elasticsearch index name")))?;
    Ok(lower)
}

/// The mapping options into `spec` (namespaces already decided).
pub(super) fn convert(table: &Table, membership: &Membership, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    let mut mappings: BTreeMap<String, Mapping> = spec.mappings.drain(..).map(|m| (m.namespace.clone(), m)).collect();
    for m in tables(table, "mapping")? {
        let Some(ns) = string(m, "namespace")? else {
            notes.add("[[mapping]]", "an entry without `namespace` is ignored");
            continue;
        };
        check_namespace("mapping", &ns)?;
        if m.contains_key("type") {
            notes.add("[[mapping]].type", format!("`{ns}`: Elasticsearch 7+ has no mapping types; documents go to `_doc`"));
        }
        if !membership.includes(&ns) {
            notes.add("[[mapping]]", format!("`{ns}` is not synced by this configuration; its mapping is left out"));
            continue;
        }
        if let Some(index) = string(m, "index")? {
            let index = index_name(&ns, &index, notes)?;
            // A listed namespace's index is an override; one an expression selects needs a
            // mapping (`spec.indexes` names listed namespaces only).
            if membership.listed(&ns) {
                spec.indexes.insert(ns.clone(), index);
            } else {
                mappings.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() }).index = Some(index);
            }
        }
        if let Some(pipeline) = string(m, "pipeline")? {
            if let Some(p) = placeholder(&pipeline) {
                return Err(Error::unusable("[[mapping]].pipeline", format!("`{ns}`: `{p}` is a placeholder; write the ingest pipeline's name")));
            }
            mappings.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() }).ingest_pipeline = Some(pipeline);
        }
    }

    // Options of every document: `index-as-update`, `index-oplog-time`.
    let as_update = boolean(table, "index-as-update")? == Some(true);
    let oplog_time = oplog_time(table, notes)?;
    if as_update || oplog_time.is_some() {
        if membership.by_regex {
            notes.add(
                if as_update { "index-as-update" } else { "index-oplog-time" },
                "applies to the listed and mapped namespaces only: monsoon's mappings name namespaces, not the ones `namespace-regex` selects; add a mapping per database (`db.*`) for those",
            );
        }
        for ns in &spec.namespaces {
            mappings.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() });
        }
        for m in mappings.values_mut() {
            if as_update {
                if m.ingest_pipeline.is_some() {
                    notes.add("index-as-update", format!("`{}` has an ingest pipeline, which partial updates do not run: its documents are indexed whole (as Monstache does)", m.namespace));
                } else {
                    m.write_mode = WriteMode::Update;
                }
            }
            m.oplog_time = oplog_time.clone();
        }
    }
    spec.mappings = mappings.into_values().collect();
    Ok(())
}

fn oplog_time(table: &Table, notes: &mut Notes) -> Result<Option<OplogTime>, Error> {
    if boolean(table, "index-oplog-time")? != Some(true) {
        for key in ["oplog-ts-field-name", "oplog-date-field-name", "oplog-date-field-format"] {
            if table.contains_key(key) {
                notes.add(key, "ignored: `index-oplog-time` is not on");
            }
        }
        return Ok(None);
    }
    let mut t = OplogTime::default();
    if let Some(f) = string(table, "oplog-ts-field-name")? {
        t.ts_field = f;
    }
    if let Some(f) = string(table, "oplog-date-field-name")? {
        t.date_field = f;
    }
    if let Some(format) = string(table, "oplog-date-field-format")? {
        if format != "2006/01/02 15:04:05" {
            notes.add(
                "oplog-date-field-format",
                format!("`{format}` is not carried: monsoon writes the date as `yyyy/MM/dd HH:mm:ss` (Monstache's default); map `{}` as a date with that format, or use the `T` seconds of `{}`", t.date_field, t.ts_field),
            );
        }
    }
    Ok(Some(t))
}
