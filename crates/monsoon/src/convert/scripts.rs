//! `[[script]]` and `[[filter]]` (carried as they are: `spec.scripts`, `spec.filters`) and
//! `[[pipeline]]` (run now; their stages declared as `mappings[].aggregation`).

use std::collections::BTreeMap;

use monsoon_api::{Aggregation, Mapping, ScriptSpec, SyncPipelineSpec, ValueFrom};
use toml::Table;

use super::mappings::check_namespace;
use super::namespaces::Membership;
use super::{string, tables, Error, Notes};

/// The script options into `spec` (namespaces and mappings already decided).
pub(super) fn convert(table: &Table, membership: &Membership, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<(), Error> {
    spec.scripts = read(table, "script", membership, notes)?.into_iter().map(|(s, _)| s).collect();
    spec.filters = read(table, "filter", membership, notes)?.into_iter().map(|(s, _)| s).collect();
    let pipelines = read(table, "pipeline", membership, notes)?;
    if !pipelines.is_empty() {
        let mut mappings: BTreeMap<String, Mapping> = spec.mappings.drain(..).map(|m| (m.namespace.clone(), m)).collect();
        declare_pipelines(&pipelines, &spec.namespaces, membership.by_regex, &mut mappings, notes);
        spec.mappings = mappings.into_values().collect();
    }
    Ok(())
}

/// The entries of `[[key]]` for synced namespaces, each with its source text.
fn read(table: &Table, key: &str, membership: &Membership, notes: &mut Notes) -> Result<Vec<(ScriptSpec, String)>, Error> {
    let mut out = Vec::new();
    for e in tables(table, key)? {
        let namespace = string(e, "namespace")?;
        if let Some(ns) = &namespace {
            check_namespace(key, ns)?;
            if !membership.includes(ns) {
                notes.add(format!("[[{key}]]"), format!("`{ns}` is not synced by this configuration; left out"));
                continue;
            }
        }
        if e.contains_key("routing") {
            notes.add(format!("[[{key}]].routing"), "not needed: monsoon records where every scripted document goes, so deletes and moves reach it");
        }
        let (spec, source) = match (string(e, "script")?, string(e, "path")?) {
            (Some(text), _) => (ScriptSpec { namespace, script: Some(text.clone()), script_from: None }, text),
            (None, Some(path)) => {
                let option = format!("[[{key}]].path");
                let text = std::fs::read_to_string(&path).map_err(|source| Error::ScriptFile { option: option.clone(), path: path.clone(), source })?;
                notes.add(
                    option,
                    format!("`{path}` is read by `monsoon run` from where it runs, as Monstache did; in a cluster put it in a ConfigMap (`kubectl create configmap NAME --from-file={path}`) and use `scriptFrom.configMapKeyRef`"),
                );
                (ScriptSpec { namespace, script: None, script_from: Some(ValueFrom { file: Some(path), ..ValueFrom::default() }) }, text)
            }
            (None, None) => {
                notes.add(format!("[[{key}]]"), "an entry with neither `script` nor `path` is left out");
                continue;
            }
        };
        out.push((spec, source));
    }
    Ok(out)
}

/// Monstache's `[[pipeline]]` scripts, run now for each namespace they apply to: their stages
/// become `mappings[].aggregation` (snapshot and change stream), which MongoDB then runs.
fn declare_pipelines(pipelines: &[(ScriptSpec, String)], namespaces: &[String], by_regex: bool, mappings: &mut BTreeMap<String, Mapping>, notes: &mut Notes) {
    let config = monsoon_script::Config {
        pipelines: pipelines.iter().map(|(s, source)| monsoon_script::ScriptSource { namespace: s.namespace.clone(), source: source.clone(), origin: None }).collect(),
        workers: 1,
        ..monsoon_script::Config::default()
    };
    let scripts = match monsoon_script::Scripts::new(config) {
        Ok(s) => s,
        Err(e) => {
            notes.add("[[pipeline]]", format!("not carried: {e}"));
            return;
        }
    };
    let global = pipelines.iter().any(|(s, _)| s.namespace.is_none());
    if global && by_regex {
        notes.add("[[pipeline]]", "the global pipeline is declared for the listed namespaces only: monsoon's stages name collections, so those `namespace-regex` selects need a `[[pipeline]]` each");
    }
    let mut targets: Vec<String> = pipelines.iter().filter_map(|(s, _)| s.namespace.clone()).collect();
    if global {
        for ns in namespaces {
            if ns.ends_with(".*") {
                notes.add("[[pipeline]]", format!("the global pipeline is not declared for `{ns}`: monsoon's stages name collections; add a mapping per collection"));
            } else {
                targets.push(ns.clone());
            }
        }
    }
    targets.sort();
    targets.dedup();
    for ns in targets {
        let mut aggregation = Aggregation::default();
        for (change_stream, slot, allowed) in [(false, &mut aggregation.snapshot, monsoon_api::shape::SNAPSHOT_STAGES), (true, &mut aggregation.change_stream, &["$match"][..])] {
            match scripts.pipeline(&ns, change_stream) {
                Ok(stages) => match monsoon_api::shape::stages(&stages, allowed, "monsoon cannot run there") {
                    Ok(_) => *slot = stages,
                    Err(why) => notes.add("[[pipeline]]", format!("`{ns}` {}: {why}; left out", if change_stream { "change stream" } else { "direct reads" })),
                },
                Err(e) => notes.add("[[pipeline]]", format!("`{ns}`: {e}; left out")),
            }
        }
        if !aggregation.snapshot.is_empty() || !aggregation.change_stream.is_empty() {
            mappings.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() }).aggregation = Some(aggregation);
        }
    }
}
