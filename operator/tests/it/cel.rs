//! The CRDs' CEL rules (`x-kubernetes-validations`) evaluated client-side, as the API server
//! would at `kubectl apply` time: bad specs are rejected with the rule's message, good ones pass.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use kube::core::cel::Validator;
use resultity_operator::crd::{ResultityNode, all_crds};
use resultity_operator::validate::spec_problems;
use serde_json::{Value, json};

fn schema(name: &str) -> Value {
    let crd = all_crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn example(name: &str) -> Value {
    let text =
        std::fs::read_to_string(format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// Whether `value` matches the OpenAPI `pattern` (RE2 syntax, as the API server's Go regexp
/// and CEL's `matches` both read it).
fn matches_pattern(pattern: &str, value: &str) -> bool {
    let escaped = pattern.replace('\\', "\\\\").replace('\'', "\\'");
    let check = json!({
        "type": "string",
        "x-kubernetes-validations": [{"rule": format!("self.matches('{escaped}')")}],
    });
    Validator::new()
        .validate(&check, &json!(value), None)
        .is_ok()
}

/// The OpenAPI `pattern`s `object` breaks, as the API server checks them: on strings only,
/// so an integer where a quantity is expected is never matched against the pattern.
fn pattern_failures(schema: &Value, object: &Value, path: &str, out: &mut Vec<String>) {
    match object {
        Value::String(s) => {
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && !matches_pattern(p, s)
            {
                out.push(format!("{path}: {s} does not match {p}"));
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let child = schema
                    .get("properties")
                    .and_then(|p| p.get(k))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                if let Some(child) = child {
                    pattern_failures(child, v, &format!("{path}.{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    pattern_failures(item, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// What the API server refuses: the CEL messages of the failed rules, then each broken
/// `pattern` by path (empty when the object passes).
fn failures(crd: &str, object: &Value) -> Vec<String> {
    let schema = schema(crd);
    let mut out = match Validator::new().validate(&schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    };
    pattern_failures(&schema, object, "", &mut out);
    out
}

const NODES: &str = "resultitynodes.resultity.com";
const NETWORKS: &str = "resultitynetworks.resultity.com";

#[test]
fn examples_pass_every_rule() {
    assert_eq!(failures(NODES, &example("node.yaml")), Vec::<String>::new());
    assert_eq!(
        failures(NODES, &example("node-dra.yaml")),
        Vec::<String>::new()
    );
    assert_eq!(
        failures(NETWORKS, &example("network.yaml")),
        Vec::<String>::new()
    );
    for name in ["node-model-cache.yaml", "node-llamacpp-cpu.yaml"] {
        assert_eq!(
            failures(NODES, &example(name)),
            Vec::<String>::new(),
            "{name}"
        );
    }
    let fleet = example("fleet.yaml");
    assert_eq!(
        failures("resultityfleets.resultity.com", &fleet),
        Vec::<String>::new()
    );
}

#[test]
fn vllm_takes_exactly_one_model() {
    let mut node = example("node.yaml");
    node["spec"]["models"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "other", "revision": "1"}));
    let f = failures(NODES, &node);
    assert!(f.iter().any(|m| m.contains("exactly one model")), "{f:?}");
    // The same list is fine for Triton (which reads its repository from a cache).
    node["spec"]["runtime"]["kind"] = json!("triton");
    node["spec"]["modelCache"] = json!({"existingClaim": "triton-repository"});
    assert_eq!(failures(NODES, &node), Vec::<String>::new());
}

#[test]
fn repeated_models_are_rejected() {
    let mut node = example("node.yaml");
    node["spec"]["runtime"]["kind"] = json!("triton");
    let m = node["spec"]["models"][0].clone();
    node["spec"]["models"].as_array_mut().unwrap().push(m);
    let f = failures(NODES, &node);
    assert!(f.iter().any(|m| m.contains("must not repeat")), "{f:?}");
}

#[test]
fn gpu_resource_name_must_be_qualified() {
    for (name, ok) in [
        ("nvidia.com/gpu", true),
        ("nvidia.com/mig-1g.10gb", true),
        ("amd.com/gpu", true),
        ("gpu", false),
        ("nvidia.com/", false),
        ("nvidia.com/gpu with spaces", false),
    ] {
        let mut node = example("node.yaml");
        node["spec"]["gpu"]["resourceName"] = json!(name);
        let f = failures(NODES, &node);
        assert_eq!(f.is_empty(), ok, "{name}: {f:?}");
    }
}

#[test]
fn io_endpoint_must_be_http() {
    let mut net = example("network.yaml");
    net["spec"]["ioEndpoint"] = json!("ftp://io.example.com");
    let f = failures(NETWORKS, &net);
    assert!(f.iter().any(|m| m.contains("http(s) URL")), "{f:?}");
}

const FLEETS: &str = "resultityfleets.resultity.com";

#[test]
fn fleet_max_unavailable_is_a_count_or_a_percentage() {
    let fleet = example("fleet.yaml");
    assert_eq!(failures(FLEETS, &fleet), Vec::<String>::new());
    for (value, ok) in [
        (json!(3), true),
        (json!(0), true),
        (json!("10%"), true),
        (json!("100%"), true),
        (json!(-1), false),
        (json!("ten"), false),
        (json!("150%"), false),
    ] {
        let mut f = fleet.clone();
        f["spec"]["strategy"]["maxUnavailable"] = value.clone();
        let got = failures(FLEETS, &f);
        assert_eq!(got.is_empty(), ok, "{value}: {got:?}");
    }
}

#[test]
fn pod_fields_are_validated_as_the_pod_api_does() {
    let node = example("node.yaml");
    let rejected = |path: &[&str], value: serde_json::Value, needle: &str| {
        let mut n = node.clone();
        let mut at = &mut n;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = value.clone();
        let f = failures(NODES, &n);
        assert!(
            f.iter().any(|m| m.contains(needle)),
            "{path:?} = {value}: {f:?}"
        );
    };
    rejected(
        &["spec", "scheduling", "nodeSelector"],
        json!({"bad key!": "x"}),
        "nodeSelector",
    );
    rejected(
        &["spec", "scheduling", "nodeSelector"],
        json!({"pool": "v".repeat(64)}),
        "nodeSelector",
    );
    rejected(
        &["spec", "scheduling", "tolerations"],
        json!([{"key": "k", "operator": "Foo"}]),
        "tolerations",
    );
    rejected(
        &["spec", "runtime", "resources"],
        json!({"limits": {"memory": "abc"}}),
        ".spec.runtime.resources.limits.memory: abc does not match",
    );
    // What the pod API accepts passes.
    let mut fine = node.clone();
    fine["spec"]["scheduling"]["nodeSelector"] =
        json!({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "a"});
    fine["spec"]["runtime"]["resources"] =
        json!({"limits": {"memory": "64Gi", "cpu": "500m"}, "requests": {"cpu": "8"}});
    assert_eq!(failures(NODES, &fine), Vec::<String>::new());
}

#[test]
fn names_must_fit_label_values() {
    let mut node = example("node.yaml");
    node["metadata"]["name"] = json!("n".repeat(64));
    let f = failures(NODES, &node);
    assert!(f.iter().any(|m| m.contains("63 characters")), "{f:?}");
    let mut fleet = example("fleet.yaml");
    fleet["metadata"]["name"] = json!("f".repeat(59));
    let f = failures(FLEETS, &fleet);
    assert!(f.iter().any(|m| m.contains("58 characters")), "{f:?}");
}

#[test]
fn gpu_visibility_fields_go_together() {
    let with_gpu = |gpu: Value| {
        let mut node = example("node.yaml");
        node["spec"]["gpu"] = gpu;
        failures(NODES, &node)
    };
    assert_eq!(
        with_gpu(json!({"visibility": "dra", "resourceClaimTemplateName": "single-gpu"})),
        Vec::<String>::new()
    );
    let f = with_gpu(json!({"visibility": "dra"}));
    assert!(
        f.iter()
            .any(|m| m.contains("needs gpu.resourceClaimTemplateName")),
        "{f:?}"
    );
    let f = with_gpu(json!({"resourceClaimTemplateName": "single-gpu"}));
    assert!(
        f.iter().any(|m| m.contains("only with gpu.visibility dra")),
        "{f:?}"
    );
    let f = with_gpu(json!({"visibility": "none", "dcgmUrl": "http://10.0.0.1:9400/metrics"}));
    assert!(
        f.iter().any(|m| m.contains("dcgmUrl is used only")),
        "{f:?}"
    );
    assert_eq!(
        with_gpu(json!({"dcgmUrl": "http://10.0.0.1:9400/metrics"})),
        Vec::<String>::new()
    );
}

#[test]
fn openai_runtime_needs_an_image() {
    let mut node = example("node.yaml");
    node["spec"]["runtime"]["kind"] = json!("openai");
    let f = failures(NODES, &node);
    assert!(
        f.iter().any(|m| m.contains("runtime openai needs")),
        "{f:?}"
    );
    node["spec"]["runtime"]["image"] = json!("ghcr.io/ggml-org/llama.cpp:server");
    assert_eq!(failures(NODES, &node), Vec::<String>::new());
}

fn node_with(path: &[&str], value: Value) -> Vec<String> {
    let mut node = example("node.yaml");
    let mut at = &mut node["spec"];
    for p in path {
        at = &mut at[*p];
    }
    *at = value;
    failures(NODES, &node)
}

#[test]
fn model_cache_has_exactly_one_source_with_quantities() {
    for ok in [
        json!({"volumeClaimTemplate": {"size": "200Gi"}}),
        json!({"volumeClaimTemplate": {"size": "1.5Ti", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]}}),
        json!({"existingClaim": "weights"}),
        json!({"hostPath": {"path": "/var/lib/models", "type": "Directory"}}),
        json!({"emptyDir": {"sizeLimit": "100Gi"}, "readOnly": false}),
    ] {
        assert_eq!(
            node_with(&["modelCache"], ok.clone()),
            Vec::<String>::new(),
            "{ok}"
        );
    }
    let f = node_with(&["modelCache"], json!({}));
    assert!(
        f.iter()
            .any(|m| m.contains("exactly one of volumeClaimTemplate")),
        "{f:?}"
    );
    let f = node_with(
        &["modelCache"],
        json!({"existingClaim": "weights", "emptyDir": {"sizeLimit": "1Gi"}}),
    );
    assert!(
        f.iter()
            .any(|m| m.contains("exactly one of volumeClaimTemplate")),
        "{f:?}"
    );
    // Not a quantity: the schema's pattern refuses it.
    for bad in ["ten", "10GB", "1 Gi"] {
        let f = node_with(
            &["modelCache"],
            json!({"volumeClaimTemplate": {"size": bad}}),
        );
        assert!(
            f.iter()
                .any(|m| m.starts_with(".spec.modelCache.volumeClaimTemplate.size:")),
            "{bad}: {f:?}"
        );
        let f = node_with(&["modelCache"], json!({"emptyDir": {"sizeLimit": bad}}));
        assert!(
            f.iter()
                .any(|m| m.starts_with(".spec.modelCache.emptyDir.sizeLimit:")),
            "{bad}: {f:?}"
        );
    }
    // A quantity, but not above zero: admitted by the schema (a `> 0` in CEL would need
    // `quantity()` on an int-or-string, sized by the server as a whole request), refused by
    // the operator's validate step, which turns the node Invalid naming the field.
    for (zero, cache) in [
        ("0", json!({"volumeClaimTemplate": {"size": "0"}})),
        ("-5Gi", json!({"emptyDir": {"sizeLimit": "-5Gi"}})),
        ("0 as an integer", json!({"emptyDir": {"sizeLimit": 0}})),
    ] {
        let mut node = example("node.yaml");
        node["spec"]["modelCache"] = cache;
        assert_eq!(failures(NODES, &node), Vec::<String>::new(), "{zero}");
        let node: ResultityNode = serde_json::from_value(node).unwrap();
        let problems = spec_problems(&node);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("is not a positive quantity")),
            "{zero}: {problems:?}"
        );
    }
    for fine in [json!(200), json!("1.5Ti"), json!("+8Gi"), json!("1e3")] {
        let f = node_with(
            &["modelCache"],
            json!({"volumeClaimTemplate": {"size": fine}}),
        );
        assert_eq!(f, Vec::<String>::new(), "{fine}");
    }
    let f = node_with(
        &["modelCache"],
        json!({"hostPath": {"path": "/var/../etc"}}),
    );
    assert!(
        f.iter().any(|m| m.contains("must not contain '..'")),
        "{f:?}"
    );
}

#[test]
fn triton_needs_a_model_cache() {
    let mut node = example("node.yaml");
    node["spec"]["runtime"]["kind"] = json!("triton");
    let f = failures(NODES, &node);
    assert!(
        f.iter()
            .any(|m| m.contains("runtime triton needs spec.modelCache")),
        "{f:?}"
    );
}

#[test]
fn pod_overrides_are_checked_where_cel_is_cheap() {
    // Operator-owned labels, annotations, volume names and env names are refused by the
    // validate step (tests/models.rs): CEL over unbounded keys would blow the API server's
    // cost budget.
    let f = node_with(&["pod", "shmSize"], json!("lots"));
    assert!(
        f.iter().any(|m| m.starts_with(".spec.pod.shmSize: lots")),
        "{f:?}"
    );
    let f = node_with(
        &["runtime", "envFrom"],
        json!([{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]),
    );
    assert!(
        f.iter()
            .any(|m| m.contains("exactly one of secretRef or configMapRef")),
        "{f:?}"
    );
    let f = node_with(
        &["sidecar", "resources"],
        json!({"limits": {"memory": "lots"}}),
    );
    assert!(f.iter().any(|m| m.contains("sidecar.resources")), "{f:?}");
    assert_eq!(
        node_with(
            &["pod"],
            json!({"labels": {"team": "inference"}, "annotations": {"example.com/a": "b"},
                   "shmSize": "16Gi", "runtimeClassName": "nvidia",
                   "imagePullSecrets": [{"name": "regcred"}],
                   "volumes": [{"name": "extra", "configMap": {"name": "cfg"}}]})
        ),
        Vec::<String>::new()
    );
}

/// Quantities as a pod accepts them: integers unquoted, strings in the quantity syntax, in
/// every quantity field; the same pattern the API server enforces.
#[test]
fn integer_and_string_quantities_are_accepted_where_a_pod_accepts_them() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/node-int-quantities.yaml"
    ))
    .unwrap();
    let node: Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(failures(NODES, &node), Vec::<String>::new());
    // The same spec in a fleet's template.
    let mut fleet = example("fleet.yaml");
    fleet["spec"]["template"]["spec"] = node["spec"].clone();
    assert_eq!(failures(FLEETS, &fleet), Vec::<String>::new());

    for (value, ok) in [
        (json!(8), true),
        (json!("8"), true),
        (json!("500m"), true),
        (json!("64Gi"), true),
        (json!("1.5"), true),
        (json!(".5"), true),
        (json!("1e3"), true),
        (json!("1E-3"), true),
        (json!("+2"), true),
        (json!("8 Gi"), false),
        (json!("64GB"), false),
        (json!("Gi"), false),
        (json!("ten"), false),
        (json!(""), false),
    ] {
        for field in ["runtime", "sidecar"] {
            let f = node_with(
                &[field, "resources"],
                json!({"limits": {"cpu": value.clone()}, "requests": {"nvidia.com/gpu": value.clone()}}),
            );
            assert_eq!(f.is_empty(), ok, "{field} {value}: {f:?}");
        }
        let f = node_with(&["pod", "shmSize"], value.clone());
        assert_eq!(f.is_empty(), ok, "shmSize {value}: {f:?}");
    }
    // The pattern the schema carries is controller-gen's for resource.Quantity.
    let limits = &schema(NODES)["properties"]["spec"]["properties"]["runtime"]["properties"]["resources"]
        ["properties"]["limits"]["additionalProperties"];
    assert_eq!(
        limits["pattern"],
        r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
    );
    assert_eq!(limits["x-kubernetes-int-or-string"], true);
}
