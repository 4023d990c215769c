//! The `SyncPipeline` resource: the one definition of the pipeline format.
//!
//! The operator reads it from the Kubernetes API, `monsoon run -f` reads it from a YAML file,
//! and `monsoon crd` prints the CustomResourceDefinition generated from these types. Field doc
//! comments are user documentation: `kubectl explain syncpipeline.spec` shows them.
//!
//! Flow: YAML / API object → [`SyncPipeline`] → [`validate`] → [`ValidatedPipeline`], which the
//! binary turns into the engine's own configuration.

pub mod crd;
pub mod patches;
pub mod shape;
mod spec;
mod validate;

pub use patches::MergePatches;
pub use spec::*;
pub use validate::{
    check_index_name, namespace_regex, parse_manifest, validate, validate_for_cluster, value_sources, ConnectionStringCheck, FieldError, ManifestError,
    NamespacePattern, ValidatedPipeline,
};

/// API group of every monsoon resource.
pub const GROUP: &str = "monsoon.dev";
/// Served (and stored) version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` a manifest must carry.
pub const API_VERSION: &str = "monsoon.dev/v1alpha1";
/// `kind` of the pipeline resource.
pub const KIND: &str = "SyncPipeline";
