//! The committed `crds/` output is what the code generates, and the schemas are ones the API
//! server accepts as structural.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use resultity_operator::crd::{all_crds, crds_yaml};
use serde_json::Value;

#[test]
fn committed_crds_match_generated() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/resultity.yaml"
    ))
    .unwrap();
    assert!(
        committed == crds_yaml().unwrap(),
        "crds/resultity.yaml is stale: run `cargo run -p resultity-operator -- crd > crds/resultity.yaml`"
    );
}

/// Every schema node must say its type (or opt out explicitly), and no references or
/// unions with typed branches may remain: the rules for a structural schema.
fn check_structural(path: &str, s: &Value, problems: &mut Vec<String>) {
    let Some(obj) = s.as_object() else {
        problems.push(format!("{path}: schema is not an object"));
        return;
    };
    for forbidden in ["$ref", "definitions", "$defs", "$schema"] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: contains {forbidden}"));
        }
    }
    let typed = obj.contains_key("type")
        || obj.contains_key("x-kubernetes-int-or-string")
        || obj.contains_key("x-kubernetes-preserve-unknown-fields");
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    if obj.get("type").is_some_and(|t| !t.is_string()) {
        problems.push(format!("{path}: type must be a single string"));
    }
    for union in ["anyOf", "oneOf", "allOf"] {
        if let Some(branches) = obj.get(union).and_then(Value::as_array) {
            for (i, b) in branches.iter().enumerate() {
                for key in ["type", "description", "default", "nullable"] {
                    if b.get(key).is_some() {
                        problems.push(format!("{path}.{union}[{i}]: sets {key}"));
                    }
                }
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(&format!("{path}.{k}"), v, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(&format!("{path}[]"), items, problems);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(&format!("{path}{{}}"), ap, problems);
    }
}

fn schema_of(crd_name: &str) -> Value {
    let crd = all_crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(crd_name))
        .unwrap();
    let v = serde_json::to_value(&crd).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn schemas_are_structural() {
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
    ] {
        let mut problems = Vec::new();
        check_structural(name, &schema_of(name), &mut problems);
        assert!(problems.is_empty(), "{name}: {problems:#?}");
    }
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
    ] {
        let conds = &schema_of(name)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(
            conds["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{name}"
        );
        let required = conds["items"]["required"].as_array().unwrap();
        assert!(
            required.contains(&"type".into()),
            "{name}: list-map key must be required"
        );
    }
}

#[test]
fn short_names_status_subresource_and_cel_rules() {
    let crds = all_crds();
    let short: Vec<_> = crds
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        short,
        vec![
            vec!["rnet".to_owned()],
            vec!["rnode".to_owned()],
            vec!["rfleet".to_owned()]
        ]
    );
    for c in &crds {
        let v = &c.spec.versions[0];
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert!(!v.additional_printer_columns.as_ref().unwrap().is_empty());
    }
    let yaml = crds_yaml().unwrap();
    assert!(yaml.contains("x-kubernetes-validations"));
    assert_eq!(crds[0].spec.scope, "Cluster");
    assert_eq!(crds[1].spec.scope, "Namespaced");
    assert_eq!(crds[2].spec.scope, "Namespaced");
    // `kubectl scale rfleet` works through the scale subresource.
    let scale = crds[2].spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .as_ref()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
}

/// Collection a rule walks (`self.all(…)`, `self.limits.all(…)`, …) at `node`, by the field
/// path after `self`; `None` for `self` itself.
fn walked_collections(rule: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for macro_ in [".all(", ".exists(", ".exists_one(", ".map(", ".filter("] {
        let mut rest = rule;
        while let Some(i) = rest.find(macro_) {
            let before = &rest[..i];
            let start = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
                .map_or(0, |p| p + 1);
            let receiver = &before[start..];
            if receiver == "self" {
                out.push(None);
            } else if let Some(field) = receiver.strip_prefix("self.") {
                out.push(Some(field.to_owned()));
            }
            rest = &rest[i + macro_.len()..];
        }
    }
    out
}

fn check_bounded(path: &str, s: &Value, problems: &mut Vec<String>) {
    let bounded =
        |node: &Value| node.get("maxItems").is_some() || node.get("maxProperties").is_some();
    for rule in s
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v["rule"].as_str())
    {
        for walked in walked_collections(rule) {
            let (what, node) = match &walked {
                None => (path.to_owned(), s),
                Some(field) => (
                    format!("{path}.{field}"),
                    field.split('.').fold(s, |n, f| &n["properties"][f]),
                ),
            };
            if !bounded(node) {
                problems.push(format!(
                    "{what}: walked by `{rule}` without maxItems/maxProperties"
                ));
            }
        }
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_bounded(&format!("{path}.{k}"), v, problems);
        }
    }
    if let Some(items) = s.get("items") {
        check_bounded(&format!("{path}[]"), items, problems);
    }
    if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
        check_bounded(&format!("{path}{{}}"), ap, problems);
    }
}

/// The API server estimates a rule's cost from the sizes the schema allows and refuses the
/// CRD when the estimate is over budget; an unbounded list or map a rule iterates is sized as
/// big as a request, so every collection a rule walks must carry its bound.
#[test]
fn every_collection_a_rule_walks_is_bounded() {
    assert_eq!(
        walked_collections(
            "(!has(self.limits) || self.limits.all(k, true)) && self.all(m, self.exists_one(n, n == m))"
        ),
        vec![Some("limits".to_owned()), None, None]
    );
    let mut problems = Vec::new();
    for name in [
        "resultitynetworks.resultity.com",
        "resultitynodes.resultity.com",
        "resultityfleets.resultity.com",
    ] {
        check_bounded(name, &schema_of(name), &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
