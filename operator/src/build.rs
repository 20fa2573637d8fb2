//! Build step: the desired identity Secret and Pod for a ResultityNode. Pure functions of their
//! inputs, so every manifest the operator applies is reviewed as a snapshot.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodResourceClaim,
    PodSpec, Probe, ResourceClaim, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::crd::{
    ANNOTATION_SPEC_HASH, GpuVisibility, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_NODE,
    LABEL_NODE_ID, MANAGER, ResultityNode, RuntimeKind,
};
use crate::error::{Error, Result};
use crate::pod_contract::{
    GPU_CLAIM, IDENTITY_DIR, RUNTIME, SECRET_ADMIN_TOKEN, SECRET_KEY_FILE, SIDECAR,
    SIDECAR_STATE_DIR, SIDECAR_UID, finished_reason,
};
use crate::validate::{Defaults, Resolved};

/// Extra time beyond the drain timeout for the sidecar to flush and exit.
const GRACE_MARGIN_SECONDS: i64 = 30;
/// How long the preStop hook waits beyond the drain timeout: the sidecar hands its running
/// jobs back at the timeout and reports drained a few seconds later (its bound for the last
/// confirmations is 3 s).
const PRE_STOP_MARGIN_SECONDS: i64 = 10;
// The kubelet's grace period covers the preStop hook and then SIGTERM: the hook must end
// well inside it, or the sidecar is killed before it says it drained.
const _: () = assert!(PRE_STOP_MARGIN_SECONDS + 10 <= GRACE_MARGIN_SECONDS);

fn gpu_claim_ref() -> ResourceClaim {
    ResourceClaim {
        name: GPU_CLAIM.into(),
        ..ResourceClaim::default()
    }
}

fn labels(node: &ResultityNode, node_id: Option<&str>) -> BTreeMap<String, String> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut l = BTreeMap::from([
        (LABEL_NAME.to_owned(), "resultity-node".to_owned()),
        (LABEL_INSTANCE.to_owned(), name.clone()),
        (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_NODE.to_owned(), name),
    ]);
    if let Some(id) = node_id {
        l.insert(LABEL_NODE_ID.to_owned(), id.to_owned());
    }
    l
}

/// The identity Secret for a fresh key. Deliberately without an owner reference: whether it
/// outlives the ResultityNode is `spec.identity.deletionPolicy`'s decision, carried out by
/// the finalizer.
pub fn build_identity_secret(
    node: &ResultityNode,
    key_file_text: &str,
    node_id: &str,
    admin_token: &str,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(node.identity_secret_name()),
            namespace: node.metadata.namespace.clone(),
            labels: Some(labels(node, Some(node_id))),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([
            (
                SECRET_KEY_FILE.to_owned(),
                ByteString(key_file_text.as_bytes().to_vec()),
            ),
            (
                SECRET_ADMIN_TOKEN.to_owned(),
                ByteString(admin_token.as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The runtime's liveness (and startup) probe: HTTP where the runtime has a liveness path,
/// else a TCP connect to its port.
fn live_probe(path: Option<&str>, period: i32, failures: i32) -> Probe {
    match path {
        Some(path) => http_probe(path, "runtime", period, failures),
        None => Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("runtime".into()),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(period),
            timeout_seconds: Some(3),
            failure_threshold: Some(failures),
            ..Probe::default()
        },
    }
}

fn runtime_container(node: &ResultityNode, resolved: &Resolved, defaults: &Defaults) -> Container {
    let spec = &node.spec.runtime;
    let port = defaults.runtime_port.to_string();
    let (command, mut args, ready_path, live_path) = match spec.kind {
        RuntimeKind::Vllm => {
            let mut args = vec!["--port".to_owned(), port.clone()];
            if let Some(m) = node.spec.models.first() {
                args.extend([
                    "--model".to_owned(),
                    m.id.clone(),
                    "--revision".to_owned(),
                    m.revision.clone(),
                ]);
            }
            (None, args, "/health", Some("/health"))
        }
        RuntimeKind::Triton => (
            Some(vec!["tritonserver".to_owned()]),
            vec![
                format!("--http-port={port}"),
                "--model-control-mode=explicit".to_owned(),
                "--model-repository=/models".to_owned(),
            ],
            "/v2/health/ready",
            Some("/v2/health/live"),
        ),
        // The image's own entrypoint; its flags (port included) come from extraArgs. Every
        // OpenAI-compatible server answers `GET /v1/models`, not all of them `/health`.
        // Liveness is a TCP connect: some servers (llama.cpp) answer no HTTP request while
        // every slot is busy, and a busy runtime must not be restarted.
        RuntimeKind::Openai => (None, Vec::new(), "/v1/models", None),
    };
    args.extend(spec.extra_args.iter().cloned());
    let cache = node.spec.model_cache.as_ref();
    // The operator's cache variables first: validation refuses user entries of the same name.
    let mut env = crate::model_cache::cache_env(spec.kind, cache);
    env.extend(spec.env.iter().cloned());
    let mut mounts = vec![VolumeMount {
        name: "dshm".into(),
        mount_path: "/dev/shm".into(),
        ..VolumeMount::default()
    }];
    mounts.extend(cache.map(crate::model_cache::cache_mount));
    mounts.extend(spec.volume_mounts.iter().cloned());
    let (startup_period, startup_failures) =
        crate::model_cache::startup_probe_timing(crate::model_cache::startup_budget_seconds(
            resolved.model_memory_mib,
            spec.startup_timeout_seconds,
        ));

    let mut resources = spec.resources.clone().unwrap_or_default();
    let gpu = &node.spec.gpu;
    match gpu.visibility {
        GpuVisibility::DevicePlugin => {
            let gpus = Quantity(gpu.count.to_string());
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(gpu.resource_name.clone(), gpus.clone());
            // Extended resources must have request == limit; set both so a user request cannot
            // differ.
            if let Some(req) = resources.requests.as_mut() {
                req.insert(gpu.resource_name.clone(), gpus);
            }
        }
        GpuVisibility::Dra => resources.claims = Some(vec![gpu_claim_ref()]),
        GpuVisibility::None => {}
    }

    Container {
        name: RUNTIME.into(),
        image: Some(resolved.runtime_image.clone()),
        command,
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("runtime".into()),
            container_port: i32::from(defaults.runtime_port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources),
        // Model loading can take many minutes: the startup probe holds liveness off until
        // the engine first answers, instead of killing a pod that is still loading weights.
        // Its budget follows the models' size (see `model_cache::startup_budget_seconds`).
        startup_probe: Some(live_probe(live_path, startup_period, startup_failures)),
        liveness_probe: Some(live_probe(live_path, 15, 4)),
        readiness_probe: Some(http_probe(ready_path, "runtime", 5, 3)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn sidecar_container(node: &ResultityNode, resolved: &Resolved, defaults: &Defaults) -> Container {
    let spec = &node.spec;
    let token_file = format!("{IDENTITY_DIR}/{SECRET_ADMIN_TOKEN}");
    let mut args = vec![
        "run".to_owned(),
        format!("--network-id={}", resolved.network_id),
        format!("--io-endpoint={}", resolved.io_endpoint),
        format!("--runtime={}", spec.runtime.kind.as_str()),
        format!("--runtime-url=http://127.0.0.1:{}", defaults.runtime_port),
        format!("--identity-file={IDENTITY_DIR}/{SECRET_KEY_FILE}"),
        format!("--admin-token-file={token_file}"),
        format!("--listen=0.0.0.0:{}", defaults.sidecar_port),
        format!("--state-dir={SIDECAR_STATE_DIR}"),
        format!("--participation={}", spec.participation.as_str()),
        format!("--drain-timeout-seconds={}", spec.drain_timeout_seconds),
    ];
    for key in &resolved.network_keys {
        args.push(format!("{NETWORK_KEY_FLAG}{key}"));
    }
    for m in &spec.models {
        args.push(format!("--model={}@{}", m.id, m.revision));
    }
    if let Some(sub) = &spec.subcloud {
        args.push(format!("--subcloud={sub}"));
    }
    // The sidecar must see the runtime's GPUs or say it cannot; which source depends on how
    // the pod got them. dcgm rather than auto in device-plugin mode: a sidecar without a GPU
    // request may still see every GPU of the node through NVML on a misconfigured runtime.
    let gpu_check = match spec.gpu.visibility {
        GpuVisibility::DevicePlugin => "dcgm",
        GpuVisibility::Dra => "nvml",
        GpuVisibility::None => "off",
    };
    args.push(format!("--gpu-check={gpu_check}"));
    if let (GpuVisibility::DevicePlugin, Some(url)) = (spec.gpu.visibility, &spec.gpu.dcgm_url) {
        args.push(format!("--dcgm-url={url}"));
    }
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    // Pod identity picks this pod's series from the exporter; the node's IP locates it.
    // The pod's UID tells the sidecar a restart of its container (stay drained) from a new pod.
    let mut env = vec![
        field("RESULTITY_POD_NAME", "metadata.name"),
        field("RESULTITY_POD_NAMESPACE", "metadata.namespace"),
        field("RESULTITY_POD_UID", "metadata.uid"),
    ];
    if spec.gpu.visibility == GpuVisibility::DevicePlugin {
        env.push(field("RESULTITY_HOST_IP", "status.hostIP"));
    }
    let overrides = spec.sidecar.clone().unwrap_or_default();
    let mut mounts = vec![
        VolumeMount {
            name: "identity".into(),
            mount_path: IDENTITY_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "state".into(),
            mount_path: SIDECAR_STATE_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
    ];
    mounts.extend(overrides.volume_mounts);
    // A user's resources replace the defaults whole; the GPU claim is the operator's.
    let mut resources = overrides.resources.unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".into())),
            ("memory".to_owned(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("512Mi".into()),
        )])),
        claims: None,
    });
    // A shared claim gives the sidecar's NVML the runtime's GPUs, and only those.
    resources.claims = (spec.gpu.visibility == GpuVisibility::Dra).then(|| vec![gpu_claim_ref()]);
    Container {
        name: SIDECAR.into(),
        image: Some(resolved.sidecar_image.clone()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: i32::from(defaults.sidecar_port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resources),
        liveness_probe: Some(http_probe("/healthz", "admin", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", "admin", 5, 3)),
        // Drain before the kubelet sends SIGTERM: the network stops dispatching and in-flight
        // jobs finish or are handed back, then the node leaves the network. Exec (not httpGet)
        // so the admin token never appears in the pod spec; the URL carries the admin port the
        // sidecar listens on.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/resultity-sidecar".to_owned(),
                        "drain".to_owned(),
                        "--wait".to_owned(),
                        "--deregister".to_owned(),
                        format!("--url=http://127.0.0.1:{}", defaults.sidecar_port),
                        format!("--admin-token-file={token_file}"),
                        format!(
                            "--timeout-seconds={}",
                            i64::from(spec.drain_timeout_seconds) + PRE_STOP_MARGIN_SECONDS
                        ),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The desired Pod, with the [`ANNOTATION_SPEC_HASH`] annotation over everything else.
pub fn build_pod(
    node: &ResultityNode,
    resolved: &Resolved,
    node_id: &str,
    defaults: &Defaults,
) -> Result<Pod> {
    let owner = node
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("ResultityNode metadata.uid"))?;
    let scheduling = node.spec.scheduling.clone().unwrap_or_default();
    let overrides = node.spec.pod.clone().unwrap_or_default();
    // The operator's labels last: validation refuses user keys that collide with them.
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(node, Some(node_id)));
    let mut volumes = vec![
        Volume {
            name: "dshm".into(),
            // vLLM/NCCL need a large shared memory segment; the container default is 64 MiB.
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: overrides.shm_size.clone(),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "identity".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(node.identity_secret_name()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "state".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if let Some(cache) = &node.spec.model_cache {
        volumes.push(crate::model_cache::cache_volume(node, cache));
    }
    volumes.extend(overrides.volumes.iter().cloned());
    let grace = i64::from(node.spec.drain_timeout_seconds) + GRACE_MARGIN_SECONDS;
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(node.pod_name()),
            namespace: node.metadata.namespace.clone(),
            labels: Some(pod_labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // The GPU pod holds no Kubernetes credentials.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(grace),
            node_selector: (!scheduling.node_selector.is_empty())
                .then_some(scheduling.node_selector),
            tolerations: (!scheduling.tolerations.is_empty()).then_some(scheduling.tolerations),
            affinity: scheduling.affinity,
            priority_class_name: scheduling.priority_class_name,
            runtime_class_name: overrides.runtime_class_name.clone(),
            image_pull_secrets: (!overrides.image_pull_secrets.is_empty())
                .then(|| overrides.image_pull_secrets.clone()),
            resource_claims: match (
                node.spec.gpu.visibility,
                &node.spec.gpu.resource_claim_template_name,
            ) {
                (GpuVisibility::Dra, Some(template)) => Some(vec![PodResourceClaim {
                    name: GPU_CLAIM.into(),
                    resource_claim_template_name: Some(template.clone()),
                    ..PodResourceClaim::default()
                }]),
                _ => None,
            },
            security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
                fs_group: Some(SIDECAR_UID),
                ..Default::default()
            }),
            containers: vec![
                runtime_container(node, resolved, defaults),
                sidecar_container(node, resolved, defaults),
            ],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    // User annotations are part of the hash (a pod is never patched in place), applied
    // before the hash is added.
    let mut annotations = overrides.annotations;
    if !annotations.is_empty() {
        pod.metadata.annotations = Some(annotations.clone());
    }
    let hash = spec_hash(&pod)?;
    annotations.insert(ANNOTATION_SPEC_HASH.to_owned(), hash);
    pod.metadata.annotations = Some(annotations);
    Ok(pod)
}

/// Hash of a desired pod's labels and spec: pods are mostly immutable, so a different hash
/// means drain and replace rather than patch.
pub fn spec_hash(pod: &Pod) -> Result<String> {
    let annotations = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != ANNOTATION_SPEC_HASH)
        .collect::<BTreeMap<_, _>>();
    // Without user annotations the input is what it always was, so an operator upgrade does
    // not roll pods whose spec did not change.
    let bytes = if annotations.is_empty() {
        serde_json::to_vec(&(&pod.metadata.labels, &pod.spec))
    } else {
        serde_json::to_vec(&(&pod.metadata.labels, &pod.spec, &annotations))
    }
    .map_err(|source| Error::Serialize {
        what: "pod spec",
        source,
    })?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

const NETWORK_KEY_FLAG: &str = "--network-key=";

/// The network keys a live pod's sidecar was pinned with, in order; `None` for a pod without
/// our sidecar or without pins.
pub fn pinned_network_keys(pod: &Pod) -> Option<Vec<String>> {
    let sidecar = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == SIDECAR)?;
    let keys: Vec<String> = sidecar
        .args
        .iter()
        .flatten()
        .filter_map(|a| a.strip_prefix(NETWORK_KEY_FLAG))
        .map(str::to_owned)
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// The pins a pod for `resolved` gets: a running pod keeps the keys it was started with,
/// since its sidecar follows rotations itself (from its persisted trust and the catch-up
/// chain) and the pins only root a sidecar that starts with empty state; a rotation must not
/// drain and replace the fleet. A new pod, or one replacing a finished pod (its state is
/// gone with it), gets the keys trusted now.
pub fn keep_live_pins(resolved: &mut Resolved, live: Option<&Pod>) {
    let running = live.filter(|p| finished_reason(p).is_none());
    if let Some(keys) = running.and_then(pinned_network_keys) {
        resolved.network_keys = keys;
    }
}
