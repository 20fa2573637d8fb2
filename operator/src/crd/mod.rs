//! Custom resource types (`resultity.com/v1alpha1`) and their generated CRDs.
//!
//! The Rust types are the source of truth: `resultity-operator crd` renders them, `crds/` holds
//! that output, and a test keeps the two identical.

mod fleet;
mod network;
mod node;
pub mod schema;

pub use fleet::*;
pub use network::*;
pub use node::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every Resultity kind.
pub const GROUP: &str = "resultity.com";
/// Label and annotation prefix owned by the operator.
pub const LABEL_NODE: &str = "resultity.com/node";
pub const LABEL_NODE_ID: &str = "resultity.com/node-id";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const MANAGER: &str = "resultity-operator";
/// On a ResultityNode: the fleet that owns it (its rollouts are gated by that fleet).
pub const LABEL_FLEET: &str = "resultity.com/fleet";
/// On a ResultityNode: its current rollout step (`pending`, `draining`, …), written by the fleet.
pub const LABEL_ROLLOUT_STEP: &str = "resultity.com/rollout-step";
/// Hash of the desired pod spec; a different hash means the pod must be replaced.
pub const ANNOTATION_SPEC_HASH: &str = "resultity.com/spec-hash";

/// Every CRD the operator serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        ResultityNetwork::crd(),
        ResultityNode::crd(),
        ResultityFleet::crd(),
    ];
    for version in crds.iter_mut().flat_map(|c| c.spec.versions.iter_mut()) {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            && let Ok(mut value) = serde_json::to_value(&*schema)
        {
            type_int_or_string(&mut value);
            if let Ok(typed) = serde_json::from_value(value) {
                *schema = typed;
            }
        }
    }
    crds
}

/// kube's schema rewriting strips the types from `anyOf` branches, leaving an int-or-string
/// that admits any value (a boolean `cpu: true` would pass the API server and then fail to
/// deserialize in the operator). Restore controller-gen's `anyOf: [integer, string]`.
fn type_int_or_string(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(obj) => {
            if obj.get("x-kubernetes-int-or-string") == Some(&serde_json::Value::Bool(true))
                && obj.get("anyOf") == Some(&serde_json::json!([{}, {}]))
            {
                obj.insert(
                    "anyOf".into(),
                    serde_json::json!([{"type": "integer"}, {"type": "string"}]),
                );
            }
            obj.values_mut().for_each(type_int_or_string);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(type_int_or_string),
        _ => {}
    }
}

/// All CRDs as multi-document YAML, exactly as `crds/resultity.yaml` holds them.
pub fn crds_yaml() -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd)?);
    }
    Ok(out)
}
