//! Message bodies for both channels and both directions (spec §5–§7).
//!
//! Receivers ignore unknown body fields so optional fields can be added within protocol v1;
//! everything in a body is covered by the envelope signature either way.

pub mod common;
pub mod http;
pub mod ws;

pub use common::*;

#[cfg(test)]
pub(crate) mod arb {
    use proptest::prelude::*;
    use serde_json::Value;

    /// Arbitrary JSON values without floats (which do not round-trip through every JSON
    /// implementation bit-exactly), nested a few levels deep.
    pub fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A refusal's `code` as a node can send it: any JSON but `null`, which the wire reads
    /// back as an absent code.
    pub fn refusal_code() -> impl Strategy<Value = Value> {
        json_value().prop_filter("null is an absent code on the wire", |v| !v.is_null())
    }
}
