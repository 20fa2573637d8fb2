//! The pure middle of the node pipeline, from YAML fixtures: validate, build (Pod, Secret) and
//! compute status across pod states and sidecar reports. Manifests are insta snapshots:
//! review changes with `cargo insta review`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use resultity_operator::build::{build_identity_secret, build_pod};
use resultity_operator::crd::{
    GpuVisibility, NodePhase, ResultityNetwork, ResultityNode, ResultityNodeStatus,
};
use resultity_operator::pod_contract::{pod_spec_hash, runtime_container_name};
use resultity_operator::status::{Observed, SidecarObservation, compute_node_status, types};
use resultity_operator::validate::{Blocker, Defaults, Resolved, validate_node};
use resultity_protocol::NodeKeypair;
use resultity_protocol::status::{ConnectionState, NodeStatus};

use crate::common;
use common::fixture;

fn network() -> ResultityNetwork {
    fixture("network.yaml")
}

fn node_id() -> String {
    NodeKeypair::from_seed(&[7; 32]).id().as_str().to_owned()
}

fn resolved(node: &ResultityNode) -> Resolved {
    validate_node(node, Some(&network()), &Defaults::default()).unwrap()
}

fn now() -> Time {
    Time(Timestamp::from_second(1_795_500_700).unwrap())
}

#[test]
fn pod_for_vllm_node() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    insta::assert_yaml_snapshot!("pod_vllm", pod);
}

#[test]
fn pod_for_triton_mig_node() {
    let node: ResultityNode = fixture("node-triton-mig.yaml");
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    insta::assert_yaml_snapshot!("pod_triton_mig", pod);
}

#[test]
fn pod_for_dra_node() {
    let node: ResultityNode = fixture("node-vllm-dra.yaml");
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    // One pod-level claim from the template, referenced by both containers, and no
    // device-plugin request beside it (that would ask for a second set of GPUs).
    let claims = spec.resource_claims.as_ref().unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        claims[0].resource_claim_template_name.as_deref(),
        Some("single-gpu")
    );
    for c in &spec.containers {
        let res = c.resources.as_ref().unwrap();
        let refs = res.claims.as_ref().unwrap();
        assert_eq!(refs.len(), 1, "{}", c.name);
        assert_eq!(refs[0].name, claims[0].name, "{}", c.name);
        for map in [&res.limits, &res.requests].into_iter().flatten() {
            assert!(!map.contains_key("nvidia.com/gpu"), "{}", c.name);
        }
    }
    assert!(sidecar_args(&pod).contains(&"--gpu-check=nvml".to_owned()));
    assert!(sidecar_env(&pod, "RESULTITY_HOST_IP").is_none());
    insta::assert_yaml_snapshot!("pod_vllm_dra", pod);
}

#[test]
fn pod_for_device_plugin_node_reads_dcgm() {
    let mut node: ResultityNode = fixture("node-vllm.yaml");
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert!(spec.resource_claims.is_none());
    assert!(
        spec.containers
            .iter()
            .all(|c| c.resources.as_ref().is_none_or(|r| r.claims.is_none()))
    );
    let args = sidecar_args(&pod);
    assert!(args.contains(&"--gpu-check=dcgm".to_owned()), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--dcgm-url")),
        "{args:?}"
    );
    for (name, path) in [
        ("RESULTITY_HOST_IP", "status.hostIP"),
        ("RESULTITY_POD_NAME", "metadata.name"),
        ("RESULTITY_POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = sidecar_env(&pod, name).unwrap_or_else(|| panic!("{name} missing"));
        let from = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(from.field_path, path);
    }
    // An explicit exporter URL (a node-local Service) is passed through.
    let url = "http://resultity-dcgm-exporter.gpu-operator.svc:9400/metrics";
    node.spec.gpu.dcgm_url = Some(url.into());
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    assert!(sidecar_args(&pod).contains(&format!("--dcgm-url={url}")));
}

/// Integer quantities (`cpu: 8` unquoted) are read as quantities and reach the pod as the
/// same numbers.
#[test]
fn integer_quantities_reach_the_pod() {
    // As the operator receives it from the API server: JSON, where `8` is a number (YAML
    // would hand a String field the digits).
    let yaml: serde_json::Value = fixture("node-int-quantities.yaml");
    let node: ResultityNode = serde_json::from_value(yaml).unwrap();
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let quantity = |c: usize, which: &str, name: &str| {
        let r = spec.containers[c].resources.as_ref().unwrap();
        let map = if which == "limits" {
            &r.limits
        } else {
            &r.requests
        };
        map.as_ref().unwrap()[name].0.clone()
    };
    assert_eq!(quantity(0, "requests", "cpu"), "8");
    assert_eq!(quantity(0, "requests", "memory"), "68719476736");
    assert_eq!(quantity(0, "limits", "cpu"), "16");
    assert_eq!(quantity(0, "limits", "memory"), "80Gi");
    assert_eq!(quantity(0, "limits", "nvidia.com/gpu"), "1");
    assert_eq!(quantity(1, "requests", "cpu"), "1");
    assert_eq!(quantity(1, "requests", "memory"), "134217728");
    let size_limit = |name: &str| {
        let v = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == name);
        v.and_then(|v| v.empty_dir.as_ref())
            .and_then(|d| d.size_limit.as_ref())
            .map(|q| q.0.clone())
    };
    assert_eq!(size_limit("dshm").as_deref(), Some("17179869184"));
    assert_eq!(size_limit("model-cache").as_deref(), Some("107374182400"));
    // Serialized as the pod API reads them back.
    let json = serde_json::to_value(&pod).unwrap();
    assert_eq!(
        json["spec"]["containers"][0]["resources"]["requests"]["cpu"],
        "8"
    );
}

#[test]
fn pod_for_openai_cpu_node() {
    let node: ResultityNode = fixture("node-openai-cpu.yaml");
    let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let runtime = &spec.containers[0];
    assert_eq!(
        runtime.image.as_deref(),
        Some("ghcr.io/ggml-org/llama.cpp:server")
    );
    assert_eq!(
        runtime.args.as_ref().unwrap(),
        &node.spec.runtime.extra_args
    );
    let limits = runtime.resources.as_ref().and_then(|r| r.limits.as_ref());
    assert!(limits.is_none_or(|l| !l.contains_key("nvidia.com/gpu")));
    let args = sidecar_args(&pod);
    assert!(args.contains(&"--runtime=openai".to_owned()), "{args:?}");
    assert!(args.contains(&"--gpu-check=off".to_owned()), "{args:?}");
    insta::assert_yaml_snapshot!("pod_openai_cpu", pod);
}

/// The preStop hook drains the sidecar on the admin port the operator told it to listen
/// on, and waits long enough for the drain timeout's hand-back, inside the grace period.
#[test]
fn pod_with_a_non_default_sidecar_port_drains_on_that_port() {
    let node: ResultityNode = fixture("node-openai-cpu.yaml");
    let defaults = Defaults {
        sidecar_port: 9191,
        ..Defaults::default()
    };
    let r = validate_node(&node, Some(&network()), &defaults).unwrap();
    let pod = build_pod(&node, &r, &node_id(), &defaults).unwrap();
    let args = sidecar_args(&pod);
    assert!(
        args.contains(&"--listen=0.0.0.0:9191".to_owned()),
        "{args:?}"
    );
    let pre_stop = pre_stop(&pod);
    assert!(
        pre_stop.contains(&"--url=http://127.0.0.1:9191".to_owned()),
        "{pre_stop:?}"
    );
    let ports = sidecar(&pod).ports.clone().unwrap();
    assert_eq!(ports[0].container_port, 9191);
    insta::assert_yaml_snapshot!("pod_openai_cpu_sidecar_port", pod);
}

fn pre_stop(pod: &Pod) -> Vec<String> {
    sidecar(pod)
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .exec
        .unwrap()
        .command
        .unwrap()
}

fn sidecar(pod: &Pod) -> &k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == "sidecar")
        .unwrap()
}

fn sidecar_args(pod: &Pod) -> Vec<String> {
    sidecar(pod).args.clone().unwrap()
}

fn sidecar_env<'a>(pod: &'a Pod, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    sidecar(pod).env.as_ref()?.iter().find(|e| e.name == name)
}

#[test]
fn pod_invariants() {
    for name in [
        "node-vllm.yaml",
        "node-triton-mig.yaml",
        "node-vllm-dra.yaml",
        "node-openai-cpu.yaml",
    ] {
        let node: ResultityNode = fixture(name);
        let pod = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false), "{name}");
        // The kubelet's grace period covers the preStop hook's wait (drain timeout, the
        // sidecar's hand-back bound, margin) and then SIGTERM.
        let grace = spec.termination_grace_period_seconds.unwrap();
        let hook_wait: i64 = pre_stop(&pod)
            .iter()
            .find_map(|a| a.strip_prefix("--timeout-seconds="))
            .unwrap()
            .parse()
            .unwrap();
        let drain = i64::from(node.spec.drain_timeout_seconds);
        assert!(
            hook_wait >= drain + 5,
            "{name}: the hook gives up before the hand-back"
        );
        assert!(
            grace >= hook_wait + 10,
            "{name}: grace period must cover the hook and SIGTERM"
        );
        assert!(
            pre_stop(&pod).contains(&"--url=http://127.0.0.1:9090".to_owned()),
            "{name}"
        );
        assert_eq!(
            sidecar_env(&pod, "RESULTITY_POD_UID")
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.uid"),
            "{name}"
        );
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "ResultityNode");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()["resultity.com/node-id"],
            node_id()
        );
        let sidecar = &spec.containers[1];
        let sc = sidecar.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert!(sidecar.lifecycle.as_ref().unwrap().pre_stop.is_some());
        let runtime = &spec.containers[0];
        assert_eq!(runtime.name, runtime_container_name());
        if node.spec.gpu.visibility == GpuVisibility::DevicePlugin {
            let limits = runtime.resources.as_ref().unwrap().limits.as_ref().unwrap();
            assert_eq!(
                limits[&node.spec.gpu.resource_name].0,
                node.spec.gpu.count.to_string()
            );
        }
        let shm = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "dshm")
            .unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        // The admin token never appears in the pod spec.
        let text = serde_json::to_string(&pod).unwrap();
        assert!(!text.contains("Bearer"));
    }
}

#[test]
fn spec_hash_tracks_the_spec() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let r = resolved(&node);
    let a = build_pod(&node, &r, &node_id(), &Defaults::default()).unwrap();
    let b = build_pod(&node, &r, &node_id(), &Defaults::default()).unwrap();
    assert_eq!(pod_spec_hash(&a), pod_spec_hash(&b));
    let mut changed = node.clone();
    changed
        .spec
        .runtime
        .extra_args
        .push("--enforce-eager".into());
    let c = build_pod(
        &changed,
        &resolved(&changed),
        &node_id(),
        &Defaults::default(),
    )
    .unwrap();
    assert_ne!(pod_spec_hash(&a), pod_spec_hash(&c));
    // A new runtime image from the network config also replaces the pod.
    let mut r2 = r.clone();
    r2.runtime_image = "vllm/vllm-openai:v0.12.0".into();
    let d = build_pod(&node, &r2, &node_id(), &Defaults::default()).unwrap();
    assert_ne!(pod_spec_hash(&a), pod_spec_hash(&d));
}

fn pins(pod: &Pod) -> Vec<String> {
    sidecar_args(pod)
        .iter()
        .filter_map(|a| a.strip_prefix("--network-key="))
        .map(str::to_owned)
        .collect()
}

#[test]
fn new_pods_pin_the_keys_trusted_now_and_a_rotation_replaces_no_pod() {
    use resultity_operator::build::keep_live_pins;
    use resultity_operator::crd::RetiringKeyStatus;
    let node: ResultityNode = fixture("node-vllm.yaml");
    let old_key = network().spec.public_keys[0].clone();
    let live = build_pod(&node, &resolved(&node), &node_id(), &Defaults::default()).unwrap();
    assert_eq!(pins(&live), std::slice::from_ref(&old_key));

    // The network rotated to a new key; the old one retires at the end of the overlap.
    let new_key = resultity_protocol::NetworkKeypair::from_seed(&[9; 32])
        .id()
        .as_str()
        .to_owned();
    let mut net = network();
    let status = net.status.as_mut().unwrap();
    status.trusted_keys = vec![new_key.clone()];
    status.retiring_keys = vec![RetiringKeyStatus {
        key: old_key.clone(),
        not_after_time: now(),
    }];
    let during = validate_node(&node, Some(&net), &Defaults::default()).unwrap();
    assert_eq!(during.network_keys, [new_key.clone(), old_key.clone()]);

    // A pod created now trusts both sets: the network still signs with the old key.
    let fresh = build_pod(&node, &during, &node_id(), &Defaults::default()).unwrap();
    assert_eq!(pins(&fresh), [new_key.clone(), old_key.clone()]);
    assert_ne!(pod_spec_hash(&fresh), pod_spec_hash(&live));

    // The running pod keeps its pins, so its desired hash is unchanged: no drain, no restart.
    let mut kept = during.clone();
    keep_live_pins(&mut kept, Some(&live));
    let desired = build_pod(&node, &kept, &node_id(), &Defaults::default()).unwrap();
    assert_eq!(pod_spec_hash(&desired), pod_spec_hash(&live));

    // A finished pod's state went with it: its replacement is pinned with the keys of now.
    let mut finished = live.clone();
    finished.status = Some(k8s_openapi::api::core::v1::PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Evicted".into()),
        ..Default::default()
    });
    let mut replaced = during.clone();
    keep_live_pins(&mut replaced, Some(&finished));
    assert_eq!(replaced.network_keys, during.network_keys);

    // No pod yet: nothing to keep.
    let mut first = during.clone();
    keep_live_pins(&mut first, None);
    assert_eq!(first.network_keys, during.network_keys);
}

#[test]
fn identity_secret() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let key = NodeKeypair::from_seed(&[7; 32]);
    let secret = build_identity_secret(
        &node,
        &key.to_key_file_text(),
        key.id().as_str(),
        "test-admin-token-0123456789abcdef",
    );
    insta::assert_yaml_snapshot!("identity_secret", secret);
    // No owner reference: the deletion policy, not garbage collection, decides its fate.
    assert!(secret.metadata.owner_references.is_none());
    let back = resultity_operator::controller::node::identity_from_secret(&secret).unwrap();
    assert_eq!(back.node_id, key.id().as_str());
}

#[test]
fn validation_rejects_what_cannot_work() {
    let net = network();
    let base: ResultityNode = fixture("node-vllm.yaml");
    let d = Defaults::default();

    let mut unapproved = base.clone();
    unapproved.spec.models[0].revision = "main".into();
    let mut two_models = base.clone();
    two_models
        .spec
        .models
        .push(fixture::<ResultityNode>("node-triton-mig.yaml").spec.models[0].clone());
    let mut small_gpu = base.clone();
    small_gpu.spec.gpu.min_memory_mib = Some(16_000);
    let mut mainnet_only = base.clone();
    mainnet_only.spec.participation = resultity_operator::crd::Participation::Mainnet;
    let mut wrong_runtime: ResultityNode = fixture("node-triton-mig.yaml");
    wrong_runtime.spec.models = base.spec.models.clone();
    let mut dra_without_template: ResultityNode = fixture("node-vllm-dra.yaml");
    dra_without_template.spec.gpu.resource_claim_template_name = None;
    let mut template_without_dra = base.clone();
    template_without_dra.spec.gpu.resource_claim_template_name = Some("single-gpu".into());
    let mut dcgm_url_with_dra: ResultityNode = fixture("node-vllm-dra.yaml");
    dcgm_url_with_dra.spec.gpu.dcgm_url = Some("http://10.0.0.1:9400/metrics".into());
    let mut dcgm_url_not_http = base.clone();
    dcgm_url_not_http.spec.gpu.dcgm_url = Some("10.0.0.1:9400".into());
    let mut openai_without_image: ResultityNode = fixture("node-openai-cpu.yaml");
    openai_without_image.spec.runtime.image = None;

    let cases = [
        ("unapproved", unapproved),
        ("two_models", two_models),
        ("small_gpu", small_gpu),
        ("mainnet_only", mainnet_only),
        ("wrong_runtime", wrong_runtime),
        ("dra_without_template", dra_without_template),
        ("template_without_dra", template_without_dra),
        ("dcgm_url_with_dra", dcgm_url_with_dra),
        ("dcgm_url_not_http", dcgm_url_not_http),
        ("openai_without_image", openai_without_image),
    ];
    let mut messages = Vec::new();
    for (name, node) in cases {
        match validate_node(&node, Some(&net), &d) {
            Err(Blocker::Invalid(problems)) => messages.push((name, problems)),
            other => panic!("{name}: expected Invalid, got {other:?}"),
        }
    }
    insta::assert_yaml_snapshot!("validation_messages", messages);

    // extraArgs may not override the flags the operator sets (probes and the sidecar rely on
    // them), in either spelling.
    for (arg, flag) in [("--port=9000", "--port"), ("--model", "--model")] {
        let mut n = base.clone();
        n.spec.runtime.extra_args = vec!["--enforce-eager".into(), arg.into()];
        match validate_node(&n, Some(&net), &d) {
            Err(Blocker::Invalid(problems)) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert!(
                    problems[0].contains(flag) && problems[0].contains("extraArgs"),
                    "{problems:?}"
                );
            }
            other => panic!("{arg}: expected Invalid, got {other:?}"),
        }
    }
    let mut fine = base.clone();
    fine.spec.runtime.extra_args = vec!["--enforce-eager".into(), "--portable".into()];
    assert!(validate_node(&fine, Some(&net), &d).is_ok());

    assert_eq!(
        validate_node(&base, None, &d),
        Err(Blocker::NetworkNotFound("testnet".into()))
    );
    let mut no_config = net.clone();
    no_config.status = None;
    assert_eq!(
        validate_node(&base, Some(&no_config), &d),
        Err(Blocker::WaitingForNetworkConfig("testnet".into()))
    );
    // No image mapped for the runtime and no override: a clear message, not a crash.
    let mut no_image = net.clone();
    no_image.status.as_mut().unwrap().runtime_images = None;
    let Err(Blocker::Invalid(p)) = validate_node(&base, Some(&no_image), &d) else {
        panic!("expected Invalid")
    };
    assert!(p[0].contains("set spec.runtime.image"), "{p:?}");
}

fn report() -> NodeStatus {
    fixture("sidecar-ready.json")
}

fn status_for(pod: Option<&Pod>, sidecar: SidecarObservation) -> ResultityNodeStatus {
    status_with(fixture("node-vllm.yaml"), pod, sidecar, None)
}

fn status_with(
    node: ResultityNode,
    pod: Option<&Pod>,
    sidecar: SidecarObservation,
    blocker: Option<&Blocker>,
) -> ResultityNodeStatus {
    let r = validate_node(&node, Some(&network()), &Defaults::default()).ok();
    let id = node_id();
    compute_node_status(&Observed {
        node: &node,
        blocker,
        node_id: Some(&id),
        network_config: r.as_ref().map(|r| &r.network_config),
        pod,
        sidecar: &sidecar,
        drain_started: None,
        now: &now(),
    })
}

fn cond<'a>(s: &'a ResultityNodeStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn status_ready_node() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(report())));
    assert_eq!(s.phase, NodePhase::Ready);
    assert_eq!(cond(&s, types::READY), ("True", "NodeReady"));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
    insta::assert_yaml_snapshot!("status_ready", s);
}

#[test]
fn status_sidecar_unreachable_is_unknown_not_false() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let s = status_for(
        Some(&pod),
        SidecarObservation::Unreachable {
            reason: "SidecarUnreachable".into(),
            message: "sidecar did not answer within 3s".into(),
        },
    );
    for t in [types::REGISTERED, types::CONNECTED, types::CONFIG_IN_SYNC] {
        assert_eq!(cond(&s, t), ("Unknown", "SidecarUnreachable"), "{t}");
    }
    assert_eq!(cond(&s, types::READY).0, "False");
    assert_eq!(s.phase, NodePhase::Degraded);
    insta::assert_yaml_snapshot!("status_sidecar_unreachable", s);
}

#[test]
fn status_unschedulable_pod() {
    let pod: Pod = fixture("pod-unschedulable.yaml");
    let s = status_for(Some(&pod), SidecarObservation::NotRunning);
    assert_eq!(s.phase, NodePhase::Pending);
    assert_eq!(cond(&s, types::POD_SCHEDULED), ("False", "Unschedulable"));
    insta::assert_yaml_snapshot!("status_unschedulable", s);
}

#[test]
fn status_crashlooping_runtime_says_why() {
    let pod: Pod = fixture("pod-runtime-crashloop.yaml");
    let mut r = report();
    r.runtime.ready = false;
    r.runtime.reason = Some("connection refused".into());
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(r)));
    assert_eq!(s.phase, NodePhase::Failed);
    assert_eq!(
        cond(&s, types::RUNTIME_READY),
        ("False", "CrashLoopBackOff")
    );
    insta::assert_yaml_snapshot!("status_crashloop", s);
}

#[test]
fn status_loading_runtime_is_loading() {
    let pod: Pod = fixture("pod-loading.yaml");
    let mut r = report();
    r.runtime.ready = false;
    r.models[0].state = resultity_protocol::messages::ModelState::Pending;
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(r)));
    assert_eq!(s.phase, NodePhase::Loading);
    assert_eq!(cond(&s, types::MODELS_LOADED), ("False", "Loading"));
    assert_eq!(s.models[0].state, "loading");
    assert_eq!(
        cond(&s, types::RUNTIME_READY),
        ("False", "ContainerNotReady")
    );
    assert_eq!(s.models_summary.as_deref(), Some("0/1"));
}

#[test]
fn status_self_test_follows_the_models_known_answers() {
    use resultity_protocol::messages::ModelState;
    use resultity_protocol::messages::common::SelfTest;
    let pod: Pod = fixture("pod-running-ready.yaml");
    let with = |state: ModelState, test: Option<SelfTest>, reason: Option<&str>| {
        let mut r = report();
        r.models[0].state = state;
        r.models[0].self_test = test;
        r.models[0].reason = reason.map(str::to_owned);
        status_for(Some(&pod), SidecarObservation::Report(Box::new(r)))
    };
    let s = with(ModelState::Active, None, None);
    assert_eq!(
        cond(&s, types::SELF_TEST_PASSED),
        ("True", "TestInferencePassed")
    );
    let s = with(ModelState::Active, Some(SelfTest::Passed), None);
    assert_eq!(cond(&s, types::SELF_TEST_PASSED), ("True", "Passed"));
    assert_eq!(s.models[0].self_test.as_deref(), Some("passed"));

    let why = r#"known-answer self-test failed: choices[0].text is " Lyon", expected " Paris""#;
    let s = with(ModelState::Failed, Some(SelfTest::Mismatch), Some(why));
    assert_eq!(
        cond(&s, types::SELF_TEST_PASSED),
        ("False", "KnownAnswerMismatch")
    );
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == types::SELF_TEST_PASSED)
        .unwrap();
    let model = &report().models[0].model;
    assert_eq!(c.message, format!("{}@{}: {why}", model.id, model.revision));
    assert_eq!(s.models[0].self_test.as_deref(), Some("mismatch"));

    let s = with(ModelState::Failed, None, Some("test inference failed: 500"));
    assert_eq!(cond(&s, types::SELF_TEST_PASSED), ("False", "ModelFailed"));
    let s = with(ModelState::Pending, None, None);
    assert_eq!(cond(&s, types::SELF_TEST_PASSED), ("Unknown", "Testing"));
    // A model the node does not serve is no part of its self-test.
    let s = with(ModelState::Inactive, None, Some("no longer wanted"));
    assert_eq!(cond(&s, types::SELF_TEST_PASSED), ("Unknown", "NoModels"));
    let s = status_for(
        Some(&pod),
        SidecarObservation::Unreachable {
            reason: "SidecarUnreachable".into(),
            message: "sidecar did not answer within 3s".into(),
        },
    );
    assert_eq!(
        cond(&s, types::SELF_TEST_PASSED),
        ("Unknown", "SidecarUnreachable")
    );
}

#[test]
fn status_out_of_sync_and_disconnected_is_degraded() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let mut r = report();
    r.applied_config = Some(resultity_protocol::messages::ConfigPointer {
        version: 2,
        digest: resultity_protocol::ConfigDigest::of_body(b"v2"),
    });
    r.connection.state = ConnectionState::Backoff;
    r.connection.last_error = Some("connection reset by peer".into());
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(r)));
    assert_eq!(s.phase, NodePhase::Degraded);
    assert_eq!(cond(&s, types::CONFIG_IN_SYNC), ("False", "OutOfSync"));
    assert_eq!(cond(&s, types::CONNECTED), ("False", "Backoff"));
    insta::assert_yaml_snapshot!("status_out_of_sync", s);
}

#[test]
fn status_config_refused_by_node() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let mut r = report();
    r.applied_config = None;
    r.config_error = Some("snapshot expired".into());
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(r)));
    assert_eq!(cond(&s, types::CONFIG_IN_SYNC), ("False", "ConfigRefused"));
}

#[test]
fn status_draining() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let mut r = report();
    r.draining = true;
    r.phase = resultity_protocol::messages::NodePhase::Draining;
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(r)));
    assert_eq!(s.phase, NodePhase::Draining);
}

#[test]
fn status_invalid_spec() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let blocker = Blocker::Invalid(vec![
        "model x@y is not approved by network resultity-testnet".into(),
    ]);
    let s = status_with(node, None, SidecarObservation::NotRunning, Some(&blocker));
    assert_eq!(s.phase, NodePhase::Invalid);
    assert_eq!(cond(&s, types::READY), ("False", "InvalidSpec"));
    insta::assert_yaml_snapshot!("status_invalid", s);
}

#[test]
fn status_keeps_transition_time_when_unchanged() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let first = status_for(Some(&pod), SidecarObservation::Report(Box::new(report())));
    let mut node: ResultityNode = fixture("node-vllm.yaml");
    let mut earlier = first.clone();
    for c in &mut earlier.conditions {
        c.last_transition_time = Time(Timestamp::from_second(1_700_000_000).unwrap());
    }
    node.status = Some(earlier);
    let again = status_with(
        node,
        Some(&pod),
        SidecarObservation::Report(Box::new(report())),
        None,
    );
    assert!(
        again
            .conditions
            .iter()
            .all(|c| c.last_transition_time.0.as_second() == 1_700_000_000)
    );
}

/// `gpu.visibility: none` turns the sidecar's GPU checks off: nothing is checked, so nothing
/// is unhealthy, and the node is Ready when everything else is.
#[test]
fn status_gpu_checks_off_is_not_unhealthy() {
    let pod: Pod = fixture("pod-running-ready.yaml");
    let mut node: ResultityNode = fixture("node-vllm.yaml");
    node.spec.gpu.visibility = GpuVisibility::None;
    node.spec.gpu.min_memory_mib = None;
    // What the sidecar reports with its checks off.
    let mut off = report();
    off.gpu.present = false;
    off.gpu.devices.clear();
    off.gpu.reason = Some("GPU checks are off (--gpu-check off)".into());
    let s = status_with(
        node.clone(),
        Some(&pod),
        SidecarObservation::Report(Box::new(off)),
        None,
    );
    assert_eq!(cond(&s, types::GPU_HEALTHY), ("True", "ChecksOff"));
    assert_eq!(cond(&s, types::READY), ("True", "NodeReady"));
    assert_eq!(s.phase, NodePhase::Ready);
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == types::GPU_HEALTHY)
        .unwrap()
        .message;
    assert!(msg.contains("visibility is none"), "{msg}");

    // The same report on a node that asks for a GPU is still no GPU.
    let mut absent = report();
    absent.gpu.present = false;
    absent.gpu.devices.clear();
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(absent)));
    assert_eq!(cond(&s, types::GPU_HEALTHY), ("False", "NoGPU"));
    assert_eq!(s.phase, NodePhase::Degraded);
}

#[test]
fn status_gpu_trouble_and_network_verdict() {
    let pod: Pod = fixture("pod-running-ready.yaml");

    let mut xid = report();
    xid.gpu.devices[0].healthy = false;
    xid.gpu.devices[0].last_xid = Some(79);
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(xid)));
    assert_eq!(cond(&s, types::GPU_HEALTHY), ("False", "GPUErrors"));
    assert_eq!(cond(&s, types::READY), ("False", "NotGPUHealthy"));
    assert_eq!(s.phase, NodePhase::Degraded);
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == types::GPU_HEALTHY)
        .unwrap()
        .message;
    // Plain words, no Rust spelling of optional values.
    assert!(msg.contains("XID 79") && !msg.contains("Some("), "{msg}");

    // No GPU visible is never a healthy GPU, whatever the device list says.
    let mut absent = report();
    absent.gpu.present = false;
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(absent)));
    assert_eq!(cond(&s, types::GPU_HEALTHY), ("False", "NoGPU"));
    assert!(!s.gpu.as_ref().unwrap().present);
    assert!(!s.gpu.as_ref().unwrap().healthy);

    // The fixture node asks for 24000 MiB; a 16 GiB card is not enough.
    let mut small = report();
    small.gpu.devices[0].memory_total_mib = 16_384;
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(small)));
    assert_eq!(
        cond(&s, types::GPU_HEALTHY),
        ("False", "InsufficientMemory")
    );

    // A penalized node is Ready (its own health is fine) but not routable, with the reason.
    let mut penalized = report();
    penalized.verdict = Some(resultity_protocol::messages::Verdict {
        eligible: false,
        score: 120,
        penalty: 700,
        reason: Some("3 late results in 10 minutes".into()),
        suspended_until_ms: None,
    });
    let s = status_for(Some(&pod), SidecarObservation::Report(Box::new(penalized)));
    assert_eq!(cond(&s, types::READY).0, "True");
    assert_eq!(cond(&s, types::NETWORK_ROUTABLE), ("False", "NotEligible"));
    let msg = &s
        .conditions
        .iter()
        .find(|c| c.type_ == types::NETWORK_ROUTABLE)
        .unwrap()
        .message;
    assert!(msg.contains("3 late results"), "{msg}");
}
