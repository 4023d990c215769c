//! `monsoon convert`: a Monstache TOML configuration turned into a `SyncPipeline`.
//!
//! [`convert`] is pure (it reads only the script files a configuration names): it returns
//! the pipeline and one [`Note`] per option it could not carry over as it is (obsolete,
//! replaced by what, or not supported yet), so a Monstache user sees exactly what changes.
//! Every configuration either converts into a pipeline that `monsoon validate` accepts, or is
//! refused with one [`Error`] naming the option and the fix: never an invalid pipeline.
//! Credentials are never copied into the output: they become environment variable references,
//! and a note says which variable to set.
//!
//! Each part decides one thing, in this order (later parts read what earlier ones decided):
//! - [`connection`]: MongoDB and Elasticsearch addresses, credentials and placeholders,
//!   AWS request signing (`[aws-connect]`), batching;
//! - [`namespaces`]: what is synced and what is snapshotted, and the one membership rule
//!   ([`namespaces::Membership`], the engine's own `Routing`) every later part asks;
//! - [`start`]: where a new pipeline's stream starts, and one-shot runs;
//! - [`mappings`]: `[[mapping]]`, `index-as-update`, `index-oplog-time`;
//! - [`scripts`]: `[[script]]`, `[[filter]]`, `[[pipeline]]`;
//! - [`time_machine`]: `time-machine-*`, `spec.timeMachine`;
//! - [`notes`]: every option left, with why it is not needed or not supported yet.

mod connection;
mod files;
mod mappings;
mod namespaces;
mod notes;
mod patches;
mod relate;
mod scripts;
mod start;
mod time_machine;
#[cfg(test)]
mod tests;

use monsoon_api::{SyncPipeline, SyncPipelineSpec};
use toml::{Table, Value};

/// Why a Monstache configuration cannot be converted. Each message is one line naming the
/// option and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not TOML.
    #[error("failed to parse the Monstache configuration as TOML: {0}")]
    Toml(String),
    /// An option has a value of the wrong type.
    #[error("`{option}` must be {expected}")]
    Type {
        /// The option.
        option: String,
        /// What it must be.
        expected: &'static str,
    },
    /// An option's value cannot be carried into a valid pipeline.
    #[error("`{option}`: {message}")]
    Unusable {
        /// The option (`mongo-url`, `[[mapping]].index`, ...).
        option: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A script file named by `path` cannot be read.
    #[error("`{option}`: failed to read script file `{path}` (read from the directory `monsoon convert` runs in, as Monstache did); fix the path or inline the script with `script`")]
    ScriptFile {
        /// `[[script]].path`, `[[filter]].path` or `[[pipeline]].path`.
        option: String,
        /// The path as written.
        path: String,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// A rule of the pipeline format the parts above did not foresee: named by the Monstache
    /// option it most likely comes from.
    #[error("`{option}`: the converted pipeline would be invalid ({field}: {message})")]
    Invalid {
        /// The Monstache option behind the field.
        option: String,
        /// The pipeline field.
        field: String,
        /// What `monsoon validate` says.
        message: String,
    },
}

impl Error {
    fn unusable(option: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Unusable { option: option.into(), message: message.into() }
    }
}

/// An option not carried over as it is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The Monstache option (`[[mapping]].type`, `resume`, ...).
    pub option: String,
    /// What happens instead, or why it is left out.
    pub reason: String,
}

/// Notes collected while converting.
#[derive(Debug, Default)]
pub(crate) struct Notes(Vec<Note>);

impl Notes {
    fn add(&mut self, option: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Note { option: option.into(), reason: reason.into() });
    }
}

/// The result of a conversion.
#[derive(Debug)]
pub struct Conversion {
    /// The pipeline.
    pub pipeline: SyncPipeline,
    /// What was not carried over as it is.
    pub notes: Vec<Note>,
    /// Run it with `monsoon run --once` (Monstache's `exit-after-direct-reads`).
    pub once: bool,
}

fn string(table: &Table, key: &str) -> Result<Option<String>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::Type { option: key.into(), expected: "a string" }),
    }
}

fn strings(table: &Table, key: &str) -> Result<Vec<String>, Error> {
    match table.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or(Error::Type { option: key.into(), expected: "a list of strings" }))
            .collect(),
        Some(_) => Err(Error::Type { option: key.into(), expected: "a list of strings" }),
    }
}

fn integer(table: &Table, key: &str) -> Result<Option<i64>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Integer(i)) => Ok(Some(*i)),
        Some(_) => Err(Error::Type { option: key.into(), expected: "an integer" }),
    }
}

fn boolean(table: &Table, key: &str) -> Result<Option<bool>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::Type { option: key.into(), expected: "true or false" }),
    }
}

/// The entries of an array of tables (`[[mapping]]`), or none.
fn tables<'t>(table: &'t Table, key: &str) -> Result<Vec<&'t Table>, Error> {
    match table.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().filter_map(Value::as_table).collect()),
        Some(_) => Err(Error::Type { option: key.into(), expected: "an array of tables ([[...]])" }),
    }
}

/// A DNS-label pipeline name from `hint` (a file name): lower-case letters, digits and `-`.
pub fn pipeline_name(hint: &str) -> String {
    let mut name: String = hint
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    name.truncate(63);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "monstache".into()
    } else {
        name
    }
}

/// Convert a Monstache TOML configuration into a pipeline named `name`.
///
/// # Errors
/// [`Error`] when the text is not TOML, an option has the wrong type, or an option's value
/// cannot be carried into a pipeline that `monsoon validate` accepts.
pub fn convert(text: &str, name: &str) -> Result<Conversion, Error> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| Error::Toml(e.message().to_string()))?;
    let mut notes = Notes::default();
    // Every field at the format's own defaults (serde's, which `Default` does not share).
    let mut spec: SyncPipelineSpec =
        serde_json::from_value(serde_json::json!({"mongodb": {}, "elasticsearch": {"urls": []}, "namespaces": []}))
            .map_err(|e| Error::Toml(e.to_string()))?;

    connection::convert(&table, &mut spec, &mut notes)?;
    let membership = namespaces::convert(&table, &mut spec, &mut notes)?;
    let once = start::convert(&table, &mut spec, &mut notes)?;
    files::convert(&table, &mut spec, &mut notes)?;
    mappings::convert(&table, &membership, &mut spec, &mut notes)?;
    scripts::convert(&table, &membership, &mut spec, &mut notes)?;
    files::note_scripts(&spec, &mut notes);
    time_machine::convert(&table, &membership, &mut spec, &mut notes)?;
    patches::convert(&table, &membership, &mut spec, &mut notes)?;
    relate::convert(&table, &membership, &mut spec, &mut notes)?;
    relate::share_indexes(&mut spec, &mut notes);
    notes::left_out(&table, &mut notes);

    let pipeline = SyncPipeline::new(name, spec);
    check(&pipeline)?;
    Ok(Conversion { pipeline, notes: notes.0, once })
}

/// The last safeguard of "never an invalid pipeline": what `monsoon validate` would refuse is
/// refused here, named by the Monstache option the field comes from.
fn check(pipeline: &SyncPipeline) -> Result<(), Error> {
    let Err(errors) = monsoon_api::validate(pipeline, monsoon_engine::check_connection_string) else { return Ok(()) };
    let Some(first) = errors.into_iter().next() else { return Ok(()) };
    Err(Error::Invalid { option: option_of(&first.field).into(), field: first.field, message: first.message })
}

/// The Monstache option a pipeline field is converted from.
fn option_of(field: &str) -> &'static str {
    const BY_PREFIX: &[(&str, &str)] = &[
        ("spec.mongodb.caFrom", "mongo-pem-file"),
        ("spec.mongodb", "mongo-url"),
        ("spec.elasticsearch.urls", "elasticsearch-urls"),
        ("spec.elasticsearch.caFrom", "elasticsearch-pem-file"),
        ("spec.elasticsearch.aws", "[aws-connect]"),
        ("spec.elasticsearch", "elasticsearch-user"),
        ("spec.namespaceRegex", "namespace-regex"),
        ("spec.excludeNamespaceRegex", "namespace-exclude-regex"),
        ("spec.snapshotNamespaces", "direct-read-namespaces"),
        ("spec.namespaces", "change-stream-namespaces"),
        ("spec.indexes", "[[mapping]].index"),
        ("spec.mappings", "[[mapping]]"),
        ("spec.scripts", "[[script]]"),
        ("spec.filters", "[[filter]]"),
        ("spec.streamStart", "resume-from-timestamp"),
        ("spec.timeMachine.indexPrefix", "time-machine-index-prefix"),
        ("spec.timeMachine.indexSuffix", "time-machine-index-suffix"),
        ("spec.timeMachine.snapshot", "time-machine-direct-reads"),
        ("spec.timeMachine", "time-machine-namespaces"),
        ("spec.batch", "elasticsearch-max-docs"),
        ("spec.files", "file-namespaces"),
        ("spec.mergePatches.attribute", "merge-patch-attribute"),
        ("spec.mergePatches", "patch-namespaces"),
        ("spec.relate", "[[relate]]"),
        ("spec.sharedIndexes", "[[mapping]].index"),
    ];
    BY_PREFIX.iter().find(|(prefix, _)| field.starts_with(prefix)).map_or("the configuration", |(_, option)| option)
}
