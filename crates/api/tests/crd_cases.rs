//! The operator's own check refuses every pipeline of `tests/crd-cases.yaml`, naming the field
//! the case names. `tests/check_manifests.py` checks the same cases against the CRD (schema and
//! CEL rules), so the two stay in agreement.

use serde_json::Value;

const CASES: &str = include_str!("../../../tests/crd-cases.yaml");

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let target = target.as_object_mut().expect("object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The fields the operator refuses a manifest for (before it would apply anything).
fn refused_fields(manifest: &Value) -> Vec<String> {
    let text = serde_json::to_string(manifest).expect("json");
    match monsoon_api::parse_manifest(&text) {
        Err(monsoon_api::ManifestError::Shape { field, .. }) => vec![field],
        Err(monsoon_api::ManifestError::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
        Err(e @ monsoon_api::ManifestError::Yaml(_)) => panic!("case is not YAML: {e}"),
        Ok(valid) => {
            let pipeline = monsoon_api::SyncPipeline::new(&valid.name, valid.spec);
            match monsoon_api::validate_for_cluster(&pipeline) {
                Ok(_) => Vec::new(),
                Err(errors) => errors.into_iter().map(|e| e.field).collect(),
            }
        }
    }
}

fn cases(list: &str) -> (Value, Vec<(String, Value, String)>) {
    let doc: Value = serde_saphyr::from_str(CASES).expect("tests/crd-cases.yaml parses");
    let base = doc["base"].clone();
    let cases = doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("`{list}` is a list"))
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("name").to_string();
            let mut manifest = base.clone();
            merge_patch(&mut manifest, &c["patch"]);
            let field = c["field"].as_str().unwrap_or_else(|| panic!("{name}: field")).to_string();
            (name, manifest, field)
        })
        .collect();
    (base, cases)
}

#[test]
fn the_base_pipeline_is_valid_in_a_cluster() {
    let (base, refused) = cases("refused");
    assert_eq!(refused_fields(&base), Vec::<String>::new());
    assert!(refused.len() >= 20, "the refused list lost its cases");
}

#[test]
fn every_refused_case_is_refused_by_the_operator_naming_its_field() {
    for list in ["refused", "operatorOnly"] {
        let (_, cases) = cases(list);
        for (name, manifest, field) in cases {
            let fields = refused_fields(&manifest);
            assert!(
                fields.contains(&field),
                "{list} / {name}: expected a refusal naming `{field}`, got {fields:?}"
            );
        }
    }
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let mut doc = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
    merge_patch(&mut doc, &serde_json::json!({"a": {"b": null, "e": 3}, "d": [2, 3]}));
    assert_eq!(doc, serde_json::json!({"a": {"c": 2, "e": 3}, "d": [2, 3]}));
}
