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
