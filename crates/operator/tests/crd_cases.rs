//! The operator's own check (`monsoon_api`'s rules with the engine's connection-string check,
//! as `reconcile` runs them) refuses every pipeline of `tests/crd-cases.yaml`, naming the field
//! the case names. `tests/check_manifests.py` checks the same cases against the CRD (schema and
//! CEL rules), so the two stay in agreement.

use serde_json::Value;

use monsoon_testkit::crd_cases::{base, cases};

/// The fields the operator refuses a manifest for (before it would apply anything).
fn refused_fields(manifest: &Value) -> Vec<String> {
    let text = serde_json::to_string(manifest).expect("json");
    match monsoon_api::parse_manifest(&text, monsoon_engine::check_connection_string) {
        Err(monsoon_api::ManifestError::Shape { field, .. }) => vec![field],
        Err(monsoon_api::ManifestError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
        Err(e @ monsoon_api::ManifestError::Yaml(_)) => panic!("case is not YAML: {e}"),
        Ok(valid) => {
            let pipeline = monsoon_api::SyncPipeline::new(&valid.name, valid.spec);
            match monsoon_api::validate_for_cluster(&pipeline, monsoon_engine::check_connection_string) {
                Ok(_) => Vec::new(),
                Err(errors) => errors.into_iter().map(|e| e.field).collect(),
            }
        }
    }
}

#[test]
fn the_base_pipeline_is_valid_in_a_cluster() {
    assert_eq!(refused_fields(&base()), Vec::<String>::new());
    assert!(cases("refused").len() >= 20, "the refused list lost its cases");
}

#[test]
fn every_refused_case_is_refused_by_the_operator_naming_its_field() {
    for list in ["refused", "operatorOnly"] {
        for case in cases(list) {
            let (name, field) = (&case.name, case.field.as_deref().unwrap_or_else(|| panic!("{}: field", case.name)));
            let fields = refused_fields(&case.manifest);
            assert!(
                fields.iter().any(|f| f == field),
                "{list} / {name}: expected a refusal naming `{field}`, got {fields:?}"
            );
        }
    }
}
