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

/// The OpenAPI `pattern` controller-gen emits for `resource.Quantity`: the API server checks it
/// on strings only, so an integer (`cpu: 8`) passes as it does in a pod.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// A `resource.Quantity` as controller-gen renders it: an integer or a string of the quantity
/// pattern. Checked by the schema, not by CEL: the API server types an int-or-string as `dyn`
/// sized like a whole request, so even one `isQuantity` per map entry blows its cost budget,
/// and `isQuantity` has no overload for an integer.
pub fn quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
    })
}

/// A container names a handful of resources; the bound keeps the maps' size known to the API
/// server (and to anything that walks them).
const MAX_RESOURCE_NAMES: u64 = 16;

/// `ResourceRequirements` in the pod API's shape, without its (long, repeated) descriptions,
/// with bounded `limits`/`requests` whose values are quantities (strings or integers).
pub fn resources(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<k8s_openapi::api::core::v1::ResourceRequirements>();
    let mut value = serde_json::Value::from(item);
    strip_descriptions(&mut value);
    let mut map = match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let quantity = serde_json::Value::from(quantity(generator));
    if let Some(serde_json::Value::Object(props)) = map.get_mut("properties") {
        for key in ["limits", "requests"] {
            if let Some(serde_json::Value::Object(m)) = props.get_mut(key) {
                m.insert("maxProperties".into(), MAX_RESOURCE_NAMES.into());
                m.insert("additionalProperties".into(), quantity.clone());
            }
        }
    }
    map.insert("type".into(), "object".into());
    // The field is optional; `resources: null` stays accepted as before.
    map.insert("nullable".into(), true.into());
    Schema::from(map)
}

/// A label map (`nodeSelector`): values bounded as label values are, so a CEL rule over it
/// has a small cost estimate.
pub fn node_selector(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "Label keys (`[prefix/]name`) and values, as the pod API validates them.",
        "maxProperties": 64,
        "additionalProperties": {"type": "string", "maxLength": 63},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$') && (!k.contains('/') || k.split('/')[0].size() <= 253) && self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))",
            "message": "nodeSelector keys must be label keys ([prefix/]name, name at most 63 characters) and values label values (at most 63 characters)"
        }],
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
