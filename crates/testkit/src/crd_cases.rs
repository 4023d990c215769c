//! `tests/crd-cases.yaml`: the pipelines a cluster must refuse, each the `base` manifest with a
//! JSON merge patch applied. Read by the operator's own check (`crates/operator/tests/crd_cases.rs`)
//! and by the real API server's (`crates/operator/tests/control_plane.rs`); the file's header
//! says what each field means.

use serde_json::Value;

const CASES: &str = include_str!("../../../tests/crd-cases.yaml");

/// One case of a list.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it is.
    pub name: String,
    /// `base` with the case's patch applied.
    pub manifest: Value,
    /// Fragment of the message the CRD refuses it with (`refused` cases).
    pub crd: Option<String>,
    /// Field the operator's check must name.
    pub field: Option<String>,
}

/// RFC 7386 JSON merge patch: maps merge, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// The `base` manifest.
pub fn base() -> Value {
    let doc: Value = serde_saphyr::from_str(CASES).expect("tests/crd-cases.yaml parses");
    doc["base"].clone()
}

/// Every case of `list` (`refused` or `operatorOnly`).
pub fn cases(list: &str) -> Vec<Case> {
    let doc: Value = serde_saphyr::from_str(CASES).expect("tests/crd-cases.yaml parses");
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("`{list}` is a list"))
        .iter()
        .map(|c| {
            let mut manifest = doc["base"].clone();
            merge_patch(&mut manifest, &c["patch"]);
            let text = |k: &str| c[k].as_str().map(str::to_string);
            Case { name: text("name").expect("name"), manifest, crd: text("crd"), field: text("field") }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut doc, &serde_json::json!({"a": {"b": null, "e": 3}, "d": [2, 3]}));
        assert_eq!(doc, serde_json::json!({"a": {"c": 2, "e": 3}, "d": [2, 3]}));
    }
}
