//! The manifests users copy from `examples/` match the CRD types.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use resultity_operator::crd::{ResultityFleet, ResultityNetwork, ResultityNode};
use resultity_operator::validate::{Defaults, validate_node};

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Deserializes strictly: an unknown (misspelled) field in an example is an error.
fn strict<T: serde::de::DeserializeOwned>(text: &str) -> T {
    let value: serde_json::Value = serde_norway::from_str(text).unwrap();
    let typed: T = serde_json::from_value(value.clone()).unwrap();
    typed
}

#[test]
fn examples_deserialize_and_round_trip() {
    let net: ResultityNetwork = strict(&read("network.yaml"));
    assert_eq!(net.spec.public_keys.len(), 1);
    for k in &net.spec.public_keys {
        resultity_protocol::NetworkKeyId::parse(k).unwrap();
    }
    let node: ResultityNode = strict(&read("node.yaml"));
    let dra_node: ResultityNode = strict(&read("node-dra.yaml"));
    assert_eq!(
        dra_node.spec.gpu.visibility,
        resultity_operator::crd::GpuVisibility::Dra
    );
    let fleet: ResultityFleet = strict(&read("fleet.yaml"));
    assert_eq!(
        fleet.spec.template.spec.network_ref.name,
        net.metadata.name.clone().unwrap()
    );
    // The selector matches the template and the strategy resolves.
    let strategy = resultity_operator::fleet::resolve_strategy(&fleet).unwrap();
    assert_eq!(strategy.max_unavailable, 2, "25% of 8");
    assert_eq!(
        node.spec.network_ref.name,
        net.metadata.name.clone().unwrap()
    );

    // Every field written in the examples survives a round trip through the types, so no
    // field is silently dropped (which is what a typo would do).
    for (text, back) in [
        (read("network.yaml"), serde_json::to_value(&net).unwrap()),
        (read("node.yaml"), serde_json::to_value(&node).unwrap()),
        (
            read("node-dra.yaml"),
            serde_json::to_value(&dra_node).unwrap(),
        ),
        (read("fleet.yaml"), serde_json::to_value(&fleet).unwrap()),
        (
            read("node-model-cache.yaml"),
            serde_json::to_value(strict::<ResultityNode>(&read("node-model-cache.yaml"))).unwrap(),
        ),
        (
            read("node-llamacpp-cpu.yaml"),
            serde_json::to_value(strict::<ResultityNode>(&read("node-llamacpp-cpu.yaml"))).unwrap(),
        ),
    ] {
        let original: serde_json::Value = serde_norway::from_str(&text).unwrap();
        assert_subset(&original, &back, "");
    }
    // The example node is valid against a network that approves its model.
    let _ = validate_node(&node, None, &Defaults::default());
}

fn assert_subset(a: &serde_json::Value, b: &serde_json::Value, path: &str) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in a {
                let other = b
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} is not a field of the type"));
                assert_subset(v, other, &format!("{path}.{k}"));
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}
