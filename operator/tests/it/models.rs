//! Model storage and the pod escape hatches, as built pods, claims, validation refusals and
//! status: every cache source, every hatch, the start-up budget and the loading phase.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use resultity_operator::build::build_pod;
use resultity_operator::crd::{ModelCacheSpec, NodePhase, ResultityNetwork, ResultityNode};
use resultity_operator::model_cache::{build_cache_claim, cache_claim_name};
use resultity_operator::pod_contract::pod_spec_hash;
use resultity_operator::status::{Observed, SidecarObservation, compute_node_status, types};
use resultity_operator::validate::{Blocker, Defaults, validate_node};
use resultity_protocol::NodeKeypair;
use resultity_protocol::messages::ModelState;
use resultity_protocol::status::NodeStatus;
use serde_json::json;

use crate::common;
use common::fixture;

fn example(name: &str) -> ResultityNode {
    let text =
        std::fs::read_to_string(format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let mut node: ResultityNode = serde_norway::from_str(&text).unwrap();
    // What the API server would have set.
    node.metadata.uid = Some("5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d".into());
    node.metadata.namespace = Some("fleet".into());
    node
}

fn network() -> ResultityNetwork {
    fixture("network.yaml")
}

fn build(node: &ResultityNode) -> Pod {
    let resolved = validate_node(node, Some(&network()), &Defaults::default()).unwrap();
    let id = NodeKeypair::from_seed(&[7; 32]).id().as_str().to_owned();
    build_pod(node, &resolved, &id, &Defaults::default()).unwrap()
}

fn problems(node: &ResultityNode) -> Vec<String> {
    match validate_node(node, Some(&network()), &Defaults::default()) {
        Err(Blocker::Invalid(p)) => p,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap()
}

fn volume<'a>(pod: &'a Pod, name: &str) -> Option<&'a Volume> {
    pod.spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == name)
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn with_cache(cache: serde_json::Value) -> ResultityNode {
    let mut node: ResultityNode = fixture("node-vllm.yaml");
    node.spec.model_cache = Some(serde_json::from_value::<ModelCacheSpec>(cache).unwrap());
    node
}

#[test]
fn every_cache_source_is_mounted_where_vllm_reads_weights() {
    let sources = [
        (
            "volumeClaimTemplate",
            json!({"volumeClaimTemplate": {"size": "200Gi", "storageClassName": "fast-ssd"}}),
        ),
        (
            "existingClaim",
            json!({"existingClaim": "shared-weights", "readOnly": true}),
        ),
        (
            "hostPath",
            json!({"hostPath": {"path": "/var/lib/resultity/models"}}),
        ),
        ("emptyDir", json!({"emptyDir": {"sizeLimit": "100Gi"}})),
    ];
    let mut built = Vec::new();
    for (name, cache) in sources {
        let node = with_cache(cache);
        let pod = build(&node);
        let runtime = container(&pod, "runtime");
        assert_eq!(
            env_value(runtime, "HF_HOME").as_deref(),
            Some("/models/huggingface"),
            "{name}"
        );
        assert_eq!(
            env_value(runtime, "HF_HUB_CACHE").as_deref(),
            Some("/models/huggingface/hub"),
            "{name}"
        );
        // vLLM reads no LLAMA_CACHE; only the user's variables follow the operator's.
        assert_eq!(env_value(runtime, "LLAMA_CACHE"), None, "{name}");
        let mount = runtime
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "model-cache")
            .unwrap();
        assert_eq!(mount.mount_path, "/models", "{name}");
        // The sidecar never sees the weights.
        assert!(
            container(&pod, "sidecar")
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .all(|m| m.name != "model-cache")
        );
        built.push((
            name,
            volume(&pod, "model-cache").unwrap().clone(),
            mount.clone(),
        ));
    }
    insta::assert_yaml_snapshot!("model_cache_sources", built);

    // The claim a template asks for: named per node, owned by it (garbage-collected with the
    // ResultityNode, kept across pod replacements).
    let node = with_cache(
        json!({"volumeClaimTemplate": {"size": "200Gi", "storageClassName": "fast-ssd"}}),
    );
    let claim = build_cache_claim(&node).unwrap();
    assert_eq!(claim.metadata.name.as_deref(), Some("gpu-a-model-cache"));
    assert_eq!(cache_claim_name(&node), "gpu-a-model-cache");
    let owner = &claim.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ResultityNode", Some(true))
    );
    assert_eq!(Some(&owner.uid), node.metadata.uid.as_ref());
    insta::assert_yaml_snapshot!("model_cache_claim", claim);
    // Other sources create no claim.
    for cache in [
        json!({"existingClaim": "w"}),
        json!({"emptyDir": {"sizeLimit": "1Gi"}}),
    ] {
        assert!(build_cache_claim(&with_cache(cache)).is_none());
    }
    assert!(build_cache_claim(&fixture("node-vllm.yaml")).is_none());
}

#[test]
fn triton_reads_its_repository_from_the_cache() {
    let node: ResultityNode = fixture("node-triton-mig.yaml");
    let pod = build(&node);
    let runtime = container(&pod, "runtime");
    assert!(
        runtime
            .args
            .as_ref()
            .unwrap()
            .contains(&"--model-repository=/models".to_owned())
    );
    let mount = runtime
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/models")
        .expect("the repository path is mounted");
    assert_eq!(mount.name, "model-cache");
    assert_eq!(mount.read_only, Some(true));
    let claim = volume(&pod, "model-cache")
        .unwrap()
        .persistent_volume_claim
        .as_ref()
        .unwrap();
    assert_eq!(claim.claim_name, "triton-repository");
    // Triton takes the repository as a flag, no cache variables.
    assert_eq!(env_value(runtime, "HF_HOME"), None);

    let mut without: ResultityNode = fixture("node-triton-mig.yaml");
    without.spec.model_cache = None;
    let p = problems(&without);
    assert_eq!(
        p,
        [
            "runtime triton needs spec.modelCache: its model repository is read from the cache volume"
        ]
    );
}

#[test]
fn openai_runtime_caches_llama_cpp_downloads_too() {
    let node = example("node-llamacpp-cpu.yaml");
    let pod = build(&node);
    let runtime = container(&pod, "runtime");
    assert_eq!(
        env_value(runtime, "LLAMA_CACHE").as_deref(),
        Some("/models/llama.cpp")
    );
    assert_eq!(
        env_value(runtime, "HF_HOME").as_deref(),
        Some("/models/huggingface")
    );
    let host = volume(&pod, "model-cache")
        .unwrap()
        .host_path
        .as_ref()
        .unwrap();
    assert_eq!(host.path, "/var/lib/resultity/models");
    assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
    // An explicit start-up timeout wins over the size-derived budget.
    let probe = runtime.startup_probe.as_ref().unwrap();
    assert_eq!(
        (probe.period_seconds, probe.failure_threshold),
        (Some(10), Some(30))
    );
    insta::assert_yaml_snapshot!("pod_llamacpp_cpu_example", pod);
}

#[test]
fn startup_budget_follows_the_models_size() {
    let threshold = |node: &ResultityNode| {
        let pod = build(node);
        let p = container(&pod, "runtime").startup_probe.clone().unwrap();
        (p.period_seconds.unwrap(), p.failure_threshold.unwrap())
    };
    // Llama 3.1 8B needs 20000 MiB (20 GiB rounded up): 300 s + 20 × 30 s = 900 s.
    let vllm: ResultityNode = fixture("node-vllm.yaml");
    assert_eq!(threshold(&vllm), (10, 90));
    // Two Triton models of 4000 MiB each: 8 GiB, under the 600 s floor.
    let triton: ResultityNode = fixture("node-triton-mig.yaml");
    assert_eq!(threshold(&triton), (10, 60));
    // A bigger model in the network's config gets a longer budget.
    let mut net = network();
    net.status.as_mut().unwrap().approved_models[0].min_gpu_memory_mib = 160 * 1024;
    let mut vllm = vllm;
    vllm.spec.gpu.min_memory_mib = None;
    let resolved = validate_node(&vllm, Some(&net), &Defaults::default()).unwrap();
    assert_eq!(resolved.model_memory_mib, 160 * 1024);
    let pod = build_pod(&vllm, &resolved, "rn1x", &Defaults::default()).unwrap();
    let p = container(&pod, "runtime").startup_probe.clone().unwrap();
    assert_eq!(
        p.failure_threshold,
        Some(510),
        "300 s + 160 × 30 s = 5100 s"
    );
    // Liveness is untouched by the budget.
    let live = container(&pod, "runtime").liveness_probe.clone().unwrap();
    assert_eq!(live.failure_threshold, Some(4));
}

#[test]
fn escape_hatches_reach_the_pod() {
    let mut node = example("node-model-cache.yaml");
    let pod_spec = node.spec.pod.as_mut().unwrap();
    pod_spec.image_pull_secrets = vec![k8s_openapi::api::core::v1::LocalObjectReference {
        name: "regcred".into(),
    }];
    pod_spec.volumes = vec![
        serde_json::from_value(
            json!({"name": "chat-templates", "configMap": {"name": "chat-templates"}}),
        )
        .unwrap(),
    ];
    node.spec.runtime.volume_mounts =
        vec![serde_json::from_value(
        json!({"name": "chat-templates", "mountPath": "/etc/chat-templates", "readOnly": true}),
    )
    .unwrap()];
    node.spec.runtime.env_from =
        vec![serde_json::from_value(json!({"configMapRef": {"name": "vllm-tuning"}})).unwrap()];
    let pod = build(&node);
    let spec = pod.spec.as_ref().unwrap();
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "inference");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "resultity-operator");
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(annotations["example.com/cost-center"], "gpu-pool-a");
    assert!(pod_spec_hash(&pod).is_some());
    assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(spec.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
    let shm = volume(&pod, "dshm").unwrap().empty_dir.clone().unwrap();
    assert_eq!(
        (shm.medium.as_deref(), shm.size_limit.map(|q| q.0)),
        (Some("Memory"), Some("16Gi".to_owned()))
    );
    assert!(volume(&pod, "chat-templates").is_some());
    let runtime = container(&pod, "runtime");
    assert!(
        runtime
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == "/etc/chat-templates")
    );
    // The token comes from the Secret by reference; no literal value anywhere in the pod.
    let token = runtime
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .unwrap();
    assert!(token.value.is_none());
    assert_eq!(
        token
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "hf-token"
    );
    assert_eq!(
        runtime.env_from.as_ref().unwrap()[0]
            .config_map_ref
            .as_ref()
            .unwrap()
            .name,
        "vllm-tuning"
    );
    let sidecar = container(&pod, "sidecar");
    let res = sidecar.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "256Mi");
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "200m");
    insta::assert_yaml_snapshot!("pod_model_cache_example", pod);

    // Annotations are part of the spec hash: the pod is replaced, not patched, when they
    // change.
    let mut changed = node.clone();
    changed
        .spec
        .pod
        .as_mut()
        .unwrap()
        .annotations
        .insert("example.com/cost-center".into(), "gpu-pool-b".into());
    assert_ne!(
        pod_spec_hash(&build(&changed)),
        pod_spec_hash(&pod),
        "an annotation change rolls the pod"
    );
}

#[test]
fn a_dra_sidecar_keeps_its_gpu_claim_with_custom_resources() {
    let mut node: ResultityNode = fixture("node-vllm-dra.yaml");
    node.spec.sidecar =
        Some(serde_json::from_value(json!({"resources": {"limits": {"memory": "1Gi"}}})).unwrap());
    let pod = build(&node);
    let res = container(&pod, "sidecar").resources.clone().unwrap();
    assert_eq!(res.limits.unwrap()["memory"].0, "1Gi");
    assert_eq!(res.claims.unwrap()[0].name, "gpu");
}

#[test]
fn escape_hatches_refuse_what_would_break_the_node() {
    let base = example("node-model-cache.yaml");
    let mut cases: Vec<(&str, ResultityNode)> = Vec::new();
    let mut n = base.clone();
    n.spec
        .runtime
        .env
        .push(serde_json::from_value(json!({"name": "HF_HOME", "value": "/root/.cache"})).unwrap());
    cases.push(("cache_env_override", n));
    let mut n = base.clone();
    n.spec.runtime.env.push(
        serde_json::from_value(json!({"name": "HUGGING_FACE_HUB_TOKEN", "value": "hf_abc"}))
            .unwrap(),
    );
    cases.push(("literal_token", n));
    let mut n = base.clone();
    n.spec
        .runtime
        .env_from
        .push(serde_json::from_value(json!({})).unwrap());
    cases.push(("env_from_without_source", n));
    let mut n = base.clone();
    let p = n.spec.pod.as_mut().unwrap();
    p.labels
        .insert("app.kubernetes.io/managed-by".into(), "helm".into());
    p.labels.insert("resultity.com/node".into(), "other".into());
    p.annotations
        .insert("resultity.com/spec-hash".into(), "0".into());
    p.shm_size = Some(Quantity("lots".into()));
    cases.push(("operator_labels_and_bad_shm", n));
    let mut n = base.clone();
    n.spec.pod.as_mut().unwrap().volumes = vec![
        serde_json::from_value(json!({"name": "tmp", "emptyDir": {}})).unwrap(),
        serde_json::from_value(json!({"name": "extra", "emptyDir": {}})).unwrap(),
        serde_json::from_value(json!({"name": "extra", "emptyDir": {}})).unwrap(),
    ];
    n.spec.runtime.volume_mounts = vec![
        serde_json::from_value(json!({"name": "extra", "mountPath": "/models"})).unwrap(),
        serde_json::from_value(json!({"name": "missing", "mountPath": "/data"})).unwrap(),
        serde_json::from_value(json!({"name": "extra", "mountPath": "relative"})).unwrap(),
    ];
    n.spec.sidecar.as_mut().unwrap().volume_mounts = vec![
        serde_json::from_value(json!({"name": "extra", "mountPath": "/var/lib/resultity/"}))
            .unwrap(),
    ];
    cases.push(("volumes_and_mounts", n));
    let mut n = base.clone();
    n.spec.model_cache = Some(
        serde_json::from_value(json!({"existingClaim": "a", "emptyDir": {"sizeLimit": "0"}}))
            .unwrap(),
    );
    cases.push(("two_cache_sources", n));
    let mut n = base.clone();
    n.spec.model_cache = Some(
        serde_json::from_value(json!({"volumeClaimTemplate": {"size": "10GB", "accessModes": []}}))
            .unwrap(),
    );
    cases.push(("bad_claim_template", n));
    let mut n = base.clone();
    n.spec.model_cache =
        Some(serde_json::from_value(json!({"hostPath": {"path": "models/../x"}})).unwrap());
    cases.push(("relative_host_path", n));

    let mut messages = Vec::new();
    for (name, node) in cases {
        let p = problems(&node);
        for m in &p {
            // User-facing text: no Rust Debug spelling.
            assert!(
                !m.contains("Some(") && !m.contains("None") && !m.contains('{'),
                "{name}: {m}"
            );
        }
        messages.push((name, p));
    }
    insta::assert_yaml_snapshot!("escape_hatch_refusals", messages);

    // What is fine: secrets by reference, a non-secret literal, a user HF_HOME without cache.
    let mut fine = base.clone();
    fine.spec.runtime.env.push(
        serde_json::from_value(json!({"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"})).unwrap(),
    );
    fine.spec.runtime.env.push(
        serde_json::from_value(json!({"name": "MAX_NUM_BATCHED_TOKENS", "value": "8192"})).unwrap(),
    );
    fine.spec
        .runtime
        .env_from
        .push(serde_json::from_value(json!({"secretRef": {"name": "hub"}})).unwrap());
    assert!(validate_node(&fine, Some(&network()), &Defaults::default()).is_ok());
    let mut own_home = base.clone();
    own_home.spec.model_cache = None;
    own_home
        .spec
        .runtime
        .env
        .push(serde_json::from_value(json!({"name": "HF_HOME", "value": "/data/hf"})).unwrap());
    assert!(validate_node(&own_home, Some(&network()), &Defaults::default()).is_ok());
}

// ---------- loading as a phase ----------

fn now() -> Time {
    Time(Timestamp::from_second(1_795_500_700).unwrap())
}

/// A built pod whose runtime has run for `secs` without being ready.
fn loading_pod(node: &ResultityNode, secs: i64) -> Pod {
    let mut pod = build(node);
    let mut status: Pod = fixture("pod-loading.yaml");
    let started = Timestamp::from_second(1_795_500_700 - secs).unwrap();
    for cs in status
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()
    {
        cs.state
            .as_mut()
            .unwrap()
            .running
            .as_mut()
            .unwrap()
            .started_at = Some(Time(started));
    }
    pod.status = status.status;
    pod
}

fn status(
    node: &ResultityNode,
    pod: &Pod,
    sidecar: &SidecarObservation,
) -> resultity_operator::crd::ResultityNodeStatus {
    compute_node_status(&Observed {
        node,
        blocker: None,
        node_id: Some("rn1x"),
        network_config: None,
        pod: Some(pod),
        sidecar,
        drain_started: None,
        now: &now(),
    })
}

fn cond(s: &resultity_operator::crd::ResultityNodeStatus, t: &str) -> (String, String, String) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[test]
fn loading_is_a_phase_with_progress() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let pod = loading_pod(&node, 250);
    // Sidecar not asked yet: the runtime's clock against its start-up budget (900 s).
    let s = status(&node, &pod, &SidecarObservation::NotRunning);
    assert_eq!(s.phase, NodePhase::Loading);
    assert_eq!(
        cond(&s, types::MODELS_LOADED),
        (
            "False".into(),
            "Loading".into(),
            "0/1 models loaded, the runtime is loading weights; runtime up 4m10s of a 15m start-up budget".into()
        )
    );
    // The sidecar reports the model pending while the runtime loads: `loading` in status.
    let mut r: NodeStatus = fixture("sidecar-ready.json");
    r.runtime.ready = false;
    r.models[0].state = ModelState::Pending;
    let s = status(
        &node,
        &pod,
        &SidecarObservation::Report(Box::new(r.clone())),
    );
    assert_eq!(s.phase, NodePhase::Loading);
    assert_eq!(s.models[0].state, "loading");
    let (st, reason, msg) = cond(&s, types::MODELS_LOADED);
    assert_eq!((st.as_str(), reason.as_str()), ("False", "Loading"));
    assert!(
        msg.starts_with("0/1 models loaded, loading meta-llama/Llama-3.1-8B-Instruct@"),
        "{msg}"
    );
    assert!(
        msg.ends_with("runtime up 4m10s of a 15m start-up budget"),
        "{msg}"
    );

    // A failed model is not loading: no Loading phase, the reason is the sidecar's.
    r.models[0].state = ModelState::Failed;
    r.models[0].reason = Some("test inference failed: HTTP 500".into());
    let s = status(
        &node,
        &pod,
        &SidecarObservation::Report(Box::new(r.clone())),
    );
    assert_ne!(s.phase, NodePhase::Loading);
    let (st, reason, msg) = cond(&s, types::MODELS_LOADED);
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "ModelsUnavailable")
    );
    assert!(
        msg.ends_with("failed: test inference failed: HTTP 500"),
        "{msg}"
    );

    // All active: loaded.
    let ready: NodeStatus = fixture("sidecar-ready.json");
    let s = status(&node, &pod, &SidecarObservation::Report(Box::new(ready)));
    assert_eq!(
        cond(&s, types::MODELS_LOADED),
        ("True".into(), "Loaded".into(), "1/1 models active".into())
    );
}
