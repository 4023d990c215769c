//! What [`crate::Scripts::new`] compiles: the `[[script]]`, `[[filter]]` and `[[pipeline]]`
//! sources with their namespaces, and the limits every call runs under.

use std::time::Duration;

use crate::ScriptError;

/// One script: JavaScript source that assigns a function to `module.exports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptSource {
    /// `db.collection` the script applies to; `None` for a global script (every namespace;
    /// global scripts run before the namespace's own).
    pub namespace: Option<String>,
    /// The JavaScript source.
    pub source: String,
    /// Where the source came from (a file path, a ConfigMap key), shown in errors and stack
    /// traces; `None` for inline sources.
    pub origin: Option<String>,
}

impl ScriptSource {
    /// An inline global script.
    pub fn global(source: impl Into<String>) -> Self {
        ScriptSource { namespace: None, source: source.into(), origin: None }
    }

    /// An inline script for one namespace.
    pub fn for_namespace(namespace: impl Into<String>, source: impl Into<String>) -> Self {
        ScriptSource { namespace: Some(namespace.into()), source: source.into(), origin: None }
    }
}

/// Bounds on each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall time one call (all the scripts that apply to one document) may take before it is
    /// interrupted, lookups included. Default 1 s: a typical script takes ~20 µs, so this only
    /// catches loops, and is long enough for a few lookups.
    pub timeout: Duration,
    /// Heap limit of each worker's JavaScript runtime, in bytes. Default 64 MiB: documents are
    /// at most 16 MiB of BSON, and scripts see one at a time.
    pub memory_limit: usize,
    /// Limit of the JavaScript stack, in bytes (deep recursion fails cleanly). Default 1 MiB;
    /// the worker threads get a native stack well above it.
    pub max_stack_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout: Duration::from_secs(1), memory_limit: 64 << 20, max_stack_size: 1 << 20 }
    }
}

/// Everything to compile, and how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `[[script]]`: `module.exports = function(doc, ns, updateDesc)`, `this` is the document.
    pub scripts: Vec<ScriptSource>,
    /// `[[filter]]`: same signature; truthy keeps the change, falsy ignores it.
    pub filters: Vec<ScriptSource>,
    /// `[[pipeline]]`: `module.exports = function(ns, changeStream)` returning stages.
    pub pipelines: Vec<ScriptSource>,
    /// Per-call bounds.
    pub limits: Limits,
    /// Worker threads, each with its own runtime; `0` means one per available core.
    pub workers: usize,
}

impl Config {
    /// True when there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.scripts.is_empty() && self.filters.is_empty() && self.pipelines.is_empty()
    }

    pub(crate) fn validate(&self) -> Result<(), ScriptError> {
        for (kind, list) in [("script", &self.scripts), ("filter", &self.filters), ("pipeline", &self.pipelines)] {
            let mut seen = std::collections::HashSet::new();
            for s in list {
                let ns = s.namespace.as_deref().unwrap_or("");
                if let Some(n) = &s.namespace {
                    if n.is_empty() {
                        return Err(ScriptError::Config(format!("a {kind} has an empty namespace (leave it out for a global {kind})")));
                    }
                }
                if s.source.trim().is_empty() {
                    return Err(ScriptError::Config(format!("the {kind} for {} has no source", describe_ns(ns))));
                }
                if !seen.insert(ns) {
                    return Err(ScriptError::Config(format!(
                        "two {kind}s for {}: Monstache keeps only one per namespace; merge them",
                        describe_ns(ns)
                    )));
                }
            }
        }
        if self.limits.timeout.is_zero() {
            return Err(ScriptError::Config("the script timeout must be above zero".to_owned()));
        }
        if self.limits.memory_limit < (1 << 20) {
            return Err(ScriptError::Config("the script memory limit must be at least 1 MiB".to_owned()));
        }
        Ok(())
    }
}

fn describe_ns(ns: &str) -> String {
    if ns.is_empty() {
        "every namespace (global)".to_owned()
    } else {
        format!("namespace {ns}")
    }
}

/// The name a script goes by in errors: `script for blog.comments`, `global filter`, plus its
/// origin when known.
pub(crate) fn script_name(kind: &str, s: &ScriptSource) -> String {
    let base = match &s.namespace {
        Some(ns) => format!("{kind} for {ns}"),
        None => format!("global {kind}"),
    };
    match &s.origin {
        Some(o) => format!("{base} ({o})"),
        None => base,
    }
}
