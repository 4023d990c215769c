//! The one error type of this crate. Every per-document failure is a [`ScriptError`] whose
//! message says what happened and in which script; the engine dead-letters the document with it
//! (or retries, when [`ScriptError::is_retriable`] says so).

use std::time::Duration;

/// Why compiling or running a script failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// The configuration itself is wrong (two scripts for one namespace, an empty source, ...).
    #[error("invalid script configuration: {0}")]
    Config(String),
    /// A script does not compile, throws while loading, or does not export a function.
    #[error("failed to compile {script}: {message}")]
    Compile { script: String, message: String },
    /// The script threw (or QuickJS raised an error such as a stack overflow).
    #[error("{script} threw: {message}{}", location(.stack))]
    Threw { script: String, message: String, stack: Option<String> },
    /// The call ran past its deadline and was interrupted.
    #[error("{script} was interrupted after running longer than {timeout:?}")]
    Timeout { script: String, timeout: Duration },
    /// The worker's JavaScript heap reached its limit during the call.
    #[error("{script} ran out of memory (limit {limit} bytes per worker)")]
    OutOfMemory { script: String, limit: usize },
    /// A mapping script returned something that is neither a document nor a boolean-like value,
    /// or a pipeline script returned something other than an array of stage objects.
    #[error("{script} returned {got}; {expected}")]
    BadReturn { script: String, got: String, expected: &'static str },
    /// `_meta_monstache` on the returned document is invalid or asks for something unsupported.
    #[error("{script} set an invalid _meta_monstache: {reason}")]
    Meta { script: String, reason: String },
    /// A lookup (`findId`, `findOne`, `find`, `pipe`) failed and the script did not catch it.
    #[error("{script}: lookup failed: {message}")]
    Lookup { script: String, message: String },
    /// The document or update description handed in is not valid JSON.
    #[error("failed to read the input for {script}: {message}")]
    Input { script: String, message: String },
    /// The worker pool is gone (the [`crate::Scripts`] was dropped or a worker died).
    #[error("script workers stopped")]
    Stopped,
    /// An unexpected failure inside the bindings (a bug in this crate).
    #[error("internal script error: {0}")]
    Internal(String),
}

impl ScriptError {
    /// True when the same call may succeed later, so the caller should retry rather than
    /// dead-letter: a lookup that failed (MongoDB unreachable), or a pool that is shutting down.
    pub fn is_retriable(&self) -> bool {
        matches!(self, ScriptError::Lookup { .. } | ScriptError::Stopped)
    }

    /// A short, stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ScriptError::Config(_) => "config",
            ScriptError::Compile { .. } => "compile",
            ScriptError::Threw { .. } => "threw",
            ScriptError::Timeout { .. } => "timeout",
            ScriptError::OutOfMemory { .. } => "out_of_memory",
            ScriptError::BadReturn { .. } => "bad_return",
            ScriptError::Meta { .. } => "meta",
            ScriptError::Lookup { .. } => "lookup",
            ScriptError::Input { .. } => "input",
            ScriptError::Stopped => "stopped",
            ScriptError::Internal(_) => "internal",
        }
    }
}

fn location(stack: &Option<String>) -> String {
    match stack.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => format!(" (stack: {})", s.lines().map(str::trim).collect::<Vec<_>>().join(" <- ")),
        _ => String::new(),
    }
}
