//! The `SyncPipeline` CustomResourceDefinition as `monsoon crd` prints it and `crds/` holds it:
//! kube's generated CRD, with what the API server would otherwise warn about fixed, and a
//! revision annotation the operator compares with the CRD installed in the cluster.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

use crate::SyncPipeline;

/// Name of the CRD in the cluster.
pub const CRD_NAME: &str = "syncpipelines.monsoon.dev";
/// Annotation of the CRD carrying its [`CRD_REVISION`].
pub const ANNOTATION_CRD_REVISION: &str = "monsoon.dev/crd-revision";
/// Revision of the CRD's schema: raised whenever a field is added, so that an operator meeting
/// an older CRD in the cluster (Helm never upgrades CRDs) says so instead of running while the
/// API server prunes the fields it does not know.
///
/// 2: `spec.workerTemplate`, `status.shards[].checkpointTime`, CEL rules for `uri`.
pub const CRD_REVISION: u32 = 2;

/// Failure to build the CRD.
#[derive(Debug, thiserror::Error)]
#[error("failed to build the SyncPipeline CRD")]
pub struct Error(#[source] serde_json::Error);

/// The CRD, ready to apply.
///
/// schemars writes `format: uint32` / `uint64` for unsigned integers, formats Kubernetes does
/// not know (every apply of the CRD drew a warning for each); they become `int32` / `int64`
/// with `minimum: 0`, which says the same in Kubernetes' terms.
///
/// # Errors
/// [`Error`] if the generated CRD does not round-trip through JSON (a bug).
pub fn crd() -> Result<CustomResourceDefinition, Error> {
    let mut value = serde_json::to_value(SyncPipeline::crd()).map_err(Error)?;
    known_formats(&mut value);
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(ANNOTATION_CRD_REVISION.into(), Value::String(CRD_REVISION.to_string()));
        }
    }
    serde_json::from_value(value).map_err(Error)
}

/// The revision of an installed CRD, from its annotation (`None`: older than revision 2, which
/// introduced the annotation, or not monsoon's).
pub fn installed_revision(crd: &CustomResourceDefinition) -> Option<u32> {
    crd.metadata.annotations.as_ref()?.get(ANNOTATION_CRD_REVISION)?.parse().ok()
}

/// Rewrite unsigned formats into the signed ones Kubernetes knows, keeping the lower bound.
fn known_formats(node: &mut Value) {
    match node {
        Value::Object(map) => {
            let signed = match map.get("format").and_then(Value::as_str) {
                Some("uint32" | "uint16" | "uint8") => Some("int32"),
                Some("uint64" | "uint") => Some("int64"),
                _ => None,
            };
            if let Some(format) = signed {
                map.insert("format".into(), Value::String(format.into()));
                map.entry("minimum").or_insert(Value::from(0));
            }
            for child in map.values_mut() {
                known_formats(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(known_formats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_uses_only_formats_kubernetes_knows() {
        let text = serde_json::to_string(&crd().expect("crd")).expect("json");
        for unknown in ["uint8", "uint16", "uint32", "uint64", "\"uint\""] {
            assert!(!text.contains(unknown), "the CRD still has format {unknown}");
        }
        let value: Value = serde_json::from_str(&text).expect("json");
        let workers = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["workers"];
        assert_eq!(workers["format"], "int32");
        assert_eq!(workers["minimum"].as_f64(), Some(1.0), "an existing lower bound is kept");
    }

    #[test]
    fn the_crd_carries_its_revision() {
        let crd = crd().expect("crd");
        assert_eq!(installed_revision(&crd), Some(CRD_REVISION));
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
    }

    /// The password rule must not let a password through, nor refuse what the operator's own
    /// validation accepts (user names without passwords, hosts with ports).
    #[test]
    fn the_uri_rules_are_cel_rules_without_a_pattern() {
        let value = serde_json::to_value(crd().expect("crd")).expect("json");
        let mongodb = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["mongodb"];
        assert!(mongodb["properties"]["uri"].get("pattern").is_none(), "a pattern echoes the value in the API server's refusal");
        let rules = mongodb["x-kubernetes-validations"].as_array().expect("rules");
        let password = rules.iter().find(|r| r["message"].as_str().is_some_and(|m| m.contains("password"))).expect("password rule");
        let rule = password["rule"].as_str().expect("rule");
        let (_, re) = rule.split_once("matches('").expect("a matches() rule");
        let re = re.trim_end_matches("')").replace("\\\\", "\\");
        let re = regex::Regex::new(&re).expect("RE2 syntax");
        for (uri, has_password) in [
            ("mongodb://db-0.db:27017,db-1.db:27017/?replicaSet=rs0", false),
            ("mongodb://syncer@db:27017/?authMechanism=MONGODB-X509", false),
            ("mongodb+srv://cluster0.example.net/", false),
            ("mongodb://syncer:secret@db-0.db:27017/", true),
            ("mongodb+srv://u:p%40ss@cluster0.example.net/?x=a:b", true),
            ("mongodb://u:p@ss@db/", true),
        ] {
            assert_eq!(re.is_match(uri), has_password, "{uri}");
        }
    }
}
