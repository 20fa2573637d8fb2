//! Schema pieces schemars cannot derive in the shape the API server wants.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator, json_schema};

/// `metav1.Condition` list as a list-map keyed by `type`, so server-side apply merges
/// conditions per type instead of replacing the whole list (and two writers can own
/// different conditions).
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// `maxUnavailable`: a non-negative integer or a percentage string, in the structural shape
/// the API server wants for int-or-string fields.
pub fn int_or_percent(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "x-kubernetes-validations": [{
            "rule": "string(self).matches('^([0-9]+|(100|[1-9]?[0-9])%)$')",
            "message": "must be a non-negative integer or a percentage such as 10%"
        }],
    })
}

/// Pod volumes, in the pod API's own shape but without its field descriptions: the full
/// `Volume` schema would more than double the CRDs (past what `kubectl apply` can store in its
/// last-applied annotation), and the pod API documents those fields already.
pub fn volumes(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<k8s_openapi::api::core::v1::Volume>();
    let mut value = serde_json::Value::from(item);
    strip_descriptions(&mut value);
    json_schema!({
        "type": "array",
        "maxItems": 32,
        "items": value,
    })
}

fn strip_descriptions(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("description");
            for (key, child) in map.iter_mut() {
                // A property may itself be called `description`; only schema keywords go.
                if key == "properties" {
                    if let serde_json::Value::Object(props) = child {
                        for prop in props.values_mut() {
                            strip_descriptions(prop);
                        }
                    }
                } else {
                    strip_descriptions(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}
