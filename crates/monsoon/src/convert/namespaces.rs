//! What is synced and what is snapshotted, as Monstache decides them:
//! - changes are followed for `change-stream-namespaces` (a bare database: all its
//!   collections; unset or `""`: the whole deployment), unless `disable-change-events` or
//!   `exit-after-direct-reads` mean none are;
//! - the snapshot reads `direct-read-namespaces` only (`""`: every collection);
//! - `namespace-regex` and `namespace-exclude-regex` filter both (an operation is synced only
//!   when the first matches and the second does not), as do Monstache's own rules (no system
//!   collections, no GridFS chunks, not its own database `monstache`).
//!
//! The result is `namespaces`, `namespaceRegex`, `excludeNamespaces`,
//! `excludeNamespaceRegex`, `snapshot` and `snapshotNamespaces`, and the one membership rule
//! the later parts ask ([`Membership`]).

use monsoon_api::{DropPolicy, SyncPipelineSpec};
use monsoon_engine::config::{NamespacePattern, Routing};
use toml::Table;

use super::{boolean, string, strings, Error, Notes};

/// Whether the converted pipeline syncs a namespace: the engine's own rule ([`Routing`]), built
/// from the converted spec exactly as `monsoon run` builds it, so convert and the engine never
/// disagree about what a mapping or script applies to.
pub(super) struct Membership {
    routing: Routing,
    /// Namespaces are selected by an expression, not only listed.
    pub by_regex: bool,
}

impl Membership {
    fn of(spec: &SyncPipelineSpec) -> Self {
        let patterns = |list: &[String]| list.iter().filter_map(|n| NamespacePattern::parse(n)).collect();
        let regex = |r: &Option<String>| r.as_deref().and_then(|r| monsoon_api::namespace_regex(r).ok());
        Self {
            routing: Routing {
                include: patterns(&spec.namespaces),
                exclude: patterns(&spec.exclude_namespaces),
                include_regex: regex(&spec.namespace_regex),
                exclude_regex: regex(&spec.exclude_namespace_regex),
                ..Routing::default()
            },
            by_regex: spec.namespace_regex.is_some(),
        }
    }

    /// Whether `db.coll` is synced.
    pub fn includes(&self, ns: &str) -> bool {
        ns.split_once('.').is_some_and(|(db, coll)| self.routing.includes(db, coll))
    }

    /// Whether a pattern of `spec.namespaces` names `db.coll` (a listed namespace, not one only
    /// the expression selects).
    pub fn listed(&self, ns: &str) -> bool {
        ns.split_once('.').is_some_and(|(db, coll)| self.routing.include.iter().any(|p| p.matches(db, coll)))
    }
}

/// Monstache's database for its own state (`config-database-name`), never synced by it.
const MONSTACHE_DATABASE: &str = "monstache";

/// A Monstache namespace as a monsoon pattern: `db.coll` stays, a bare database (allowed in
/// `change-stream-namespaces`) becomes `db.*`.
fn pattern(ns: &str) -> String {
    if ns.contains('.') {
        ns.to_string()
    } else {
        format!("{ns}.*")
    }
}

/// A listed namespace monsoon cannot sync at all (a system database, `$` in a name).
fn check_pattern(option: &str, ns: &str) -> Result<(), Error> {
    monsoon_api::NamespacePattern::parse(ns).map(|_| ()).map_err(|m| Error::unusable(option, format!("{m}; remove it")))
}

/// The namespace options into `spec`; the membership rule of the result.
pub(super) fn convert(table: &Table, spec: &mut SyncPipelineSpec, notes: &mut Notes) -> Result<Membership, Error> {
    const DIRECT: &str = "direct-read-namespaces";
    const STREAM: &str = "change-stream-namespaces";
    let direct = strings(table, DIRECT)?;
    let stream = strings(table, STREAM)?;
    let regex = string(table, "namespace-regex")?;
    let exclude_regex = string(table, "namespace-exclude-regex")?;
    for (option, r) in [("namespace-regex", &regex), ("namespace-exclude-regex", &exclude_regex)] {
        if let Some(Err(e)) = r.as_deref().map(monsoon_api::namespace_regex) {
            // The parser's message spans lines (the pattern, a caret, the error): keep its last.
            let text = e.to_string();
            let why = text.lines().last().unwrap_or_default().trim().trim_start_matches("error: ").to_string();
            return Err(Error::unusable(option, format!("is not a regular expression monsoon reads (RE2 syntax, as Go's): {why}; rewrite it without that construct")));
        }
    }
    let no_changes = boolean(table, "disable-change-events")? == Some(true) || (boolean(table, "exit-after-direct-reads")? == Some(true) && !direct.is_empty());
    let snapshot_all = direct.iter().any(String::is_empty);
    let direct: Vec<&String> = direct.iter().filter(|n| !n.is_empty()).collect();
    for ns in &direct {
        if !ns.contains('.') || ns.ends_with(".*") {
            return Err(Error::unusable(DIRECT, format!("`{ns}` names no collection: Monstache reads collections directly; write `database.collection`, or `\"\"` for every collection")));
        }
        check_pattern(DIRECT, ns)?;
    }
    // Changes of everything: Monstache's default without change-stream-namespaces.
    let follow_all = !no_changes && (stream.is_empty() || stream.iter().any(String::is_empty));
    let config_db = string(table, "config-database-name")?.unwrap_or_else(|| MONSTACHE_DATABASE.into());

    // The filter both reads go through, applied statically to listed namespaces.
    let filter = Membership::of(&SyncPipelineSpec {
        namespace_regex: Some(regex.clone().unwrap_or_else(|| ".*".into())),
        exclude_namespace_regex: exclude_regex.clone(),
        exclude_namespaces: vec![format!("{config_db}.*")],
        ..SyncPipelineSpec::default()
    });

    let mut namespaces = Vec::new();
    if no_changes && stream.iter().any(|n| !n.is_empty()) {
        notes.add(STREAM, "not carried: with `disable-change-events` or `exit-after-direct-reads` Monstache syncs the direct-read namespaces only, and so does this pipeline");
    }
    if !follow_all && !no_changes {
        for ns in stream.iter().filter(|n| !n.is_empty()) {
            let p = pattern(ns);
            check_pattern(STREAM, &p)?;
            if regex.is_some() {
                if p.ends_with(".*") {
                    return Err(Error::unusable(
                        STREAM,
                        format!("lists the database `{ns}` while `namespace-regex` is set: Monstache syncs only what both select, which monsoon cannot express for a whole database; list its collections (`{ns}.orders`), or leave `{ns}` out and let the expression choose (e.g. `^{ns}\\.(orders|users)$`)"),
                    ));
                }
                if !filter.includes(&p) {
                    notes.add(STREAM, format!("`{ns}` is left out: `namespace-regex` does not select it (or `namespace-exclude-regex` does), so Monstache never synced it"));
                    continue;
                }
            }
            namespaces.push(p);
        }
    }
    let mut snapshot_namespaces = Vec::new();
    for ns in direct {
        if !filter.includes(ns) {
            notes.add(DIRECT, format!("`{ns}` is left out: `namespace-regex` does not select it (or `namespace-exclude-regex` does), so Monstache never synced it"));
            continue;
        }
        let followed = follow_all || namespaces.iter().any(|p: &String| NamespacePattern::parse(p).is_some_and(|p| ns.split_once('.').is_some_and(|(d, c)| p.matches(d, c))));
        if !followed {
            if !no_changes {
                notes.add(DIRECT, format!("`{ns}` is not in change-stream-namespaces; Monstache only snapshots it, monsoon snapshots and follows it"));
            }
            namespaces.push(ns.clone());
        }
        snapshot_namespaces.push(ns.clone());
    }

    // An expression selects what is synced when changes of every namespace are followed, or
    // every collection is snapshotted (monsoon follows what it snapshots).
    let by_regex = follow_all || snapshot_all;
    if by_regex {
        spec.namespace_regex = Some(regex.clone().unwrap_or_else(|| ".*".into()));
        if regex.is_none() {
            let why = if follow_all { "`change-stream-namespaces` is not set (or holds `\"\"`): Monstache follows every database, and so does this pipeline" } else { "`direct-read-namespaces` holds `\"\"`: Monstache snapshots every collection, and monsoon follows what it snapshots" };
            notes.add(STREAM, format!("{why} (`namespaceRegex: \".*\"`: every database but admin, local and config)"));
        }
        if spec.namespace_regex.as_deref().and_then(|r| monsoon_api::namespace_regex(r).ok()).is_some_and(|r| r.is_match(&format!("{config_db}.monstache"))) {
            spec.exclude_namespaces = vec![format!("{config_db}.*")];
            notes.add("config-database-name", format!("Monstache's own database `{config_db}` is left out (`excludeNamespaces`), as Monstache leaves it out"));
        }
    } else if regex.is_some() {
        notes.add("namespace-regex", "applied to the listed namespaces now: the pipeline syncs those it selects (Monstache syncs what both the lists and the expression select)");
    }
    spec.exclude_namespace_regex = exclude_regex;
    namespaces.sort();
    namespaces.dedup();
    if namespaces.is_empty() && spec.namespace_regex.is_none() {
        return Err(if no_changes && snapshot_namespaces.is_empty() && !snapshot_all {
            Error::unusable(DIRECT, "is empty while no changes are followed (`disable-change-events`): nothing would be synced; list the collections to read")
        } else {
            Error::unusable("namespace-regex", "selects none of the listed namespaces, so nothing would be synced; fix the expression or the lists")
        });
    }
    spec.namespaces = namespaces;
    if boolean(table, "dropped-collections")? == Some(false) {
        spec.on_drop = DropPolicy::Keep;
    }

    spec.snapshot = snapshot_all || !snapshot_namespaces.is_empty();
    if !spec.snapshot {
        notes.add(DIRECT, "not set: the pipeline follows changes only (`snapshot: false`)");
    }
    // Snapshot exactly what Monstache reads directly; when that is everything synced, say nothing.
    let everything = spec.namespace_regex.is_none() && spec.namespaces.iter().all(|p| snapshot_namespaces.contains(p));
    if !snapshot_all && !everything {
        snapshot_namespaces.sort();
        snapshot_namespaces.dedup();
        spec.snapshot_namespaces = snapshot_namespaces;
    }
    Ok(Membership::of(spec))
}
