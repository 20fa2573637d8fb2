//! `ResultityNode` (namespaced): one GPU node serving models for a network. Owns its Pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The inference runtime a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Vllm,
    Triton,
    /// Any OpenAI-compatible server (llama.cpp's `llama-server`, SGLang, …); its image and
    /// flags come from the node spec.
    Openai,
}

impl From<RuntimeKind> for resultity_protocol::messages::common::RuntimeKind {
    fn from(k: RuntimeKind) -> Self {
        match k {
            RuntimeKind::Vllm => Self::Vllm,
            RuntimeKind::Triton => Self::Triton,
            RuntimeKind::Openai => Self::Openai,
        }
    }
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Triton => "triton",
            Self::Openai => "openai",
        }
    }
}

/// Which environments' jobs the node accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Participation {
    Testnet,
    Mainnet,
    #[default]
    Both,
}

impl Participation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Testnet => "testnet",
            Self::Mainnet => "mainnet",
            Self::Both => "both",
        }
    }
}

/// What happens to the identity Secret when the ResultityNode is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the key: re-creating the node later keeps its id and reputation.
    #[default]
    Retain,
    /// Delete the Secret (only one the operator created).
    Delete,
}

/// Reference to a cluster-scoped ResultityNetwork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The runtime container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.kind != 'openai' || has(self.image)",
    "message": "runtime openai needs runtime.image: the network config maps no image to it"
}]))]
pub struct RuntimeSpec {
    pub kind: RuntimeKind,
    /// Overrides the image the network's config maps to this runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// Environment of the runtime container. Names the operator sets (the model cache's
    /// `HF_HOME`, …) are refused; take secrets (a model hub token) from a Secret with
    /// `valueFrom.secretKeyRef` or `envFrom`, never as a literal value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// Whole Secrets or ConfigMaps as environment of the runtime container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(e, has(e.secretRef) != has(e.configMapRef))",
        "message": "envFrom: each entry names exactly one of secretRef or configMapRef"
    }]))]
    pub env_from: Vec<EnvFromSource>,
    /// Extra mounts of `spec.pod.volumes` into the runtime container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub volume_mounts: Vec<VolumeMount>,
    /// CPU and memory; GPU limits come from `spec.gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::schema::resources")]
    pub resources: Option<ResourceRequirements>,
    /// How long the runtime may take to first answer (download and load its weights) before
    /// the kubelet restarts it. Defaults to a budget that follows the models' size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub startup_timeout_seconds: Option<u32>,
}

/// Access modes a model cache claim may ask for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum CacheAccessMode {
    ReadWriteOnce,
    ReadWriteOncePod,
    ReadWriteMany,
    ReadOnlyMany,
}

impl CacheAccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadWriteOnce => "ReadWriteOnce",
            Self::ReadWriteOncePod => "ReadWriteOncePod",
            Self::ReadWriteMany => "ReadWriteMany",
            Self::ReadOnlyMany => "ReadOnlyMany",
        }
    }
}

fn default_access_modes() -> Vec<CacheAccessMode> {
    vec![CacheAccessMode::ReadWriteOnce]
}

/// A PersistentVolumeClaim the operator creates for the node and deletes with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheClaimTemplate {
    /// Storage class of the claim; the cluster's default class when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub storage_class_name: Option<String>,
    /// Requested capacity, a quantity such as `200Gi`. Positive: the validate step refuses
    /// zero or less (the node turns `Invalid`).
    #[schemars(schema_with = "crate::crd::schema::quantity")]
    pub size: Quantity,
    #[serde(default = "default_access_modes")]
    #[schemars(length(min = 1, max = 4))]
    pub access_modes: Vec<CacheAccessMode>,
}

/// What a hostPath cache expects at its path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CacheHostPathType {
    /// Created (mode 0755, owned by the kubelet) when absent.
    #[default]
    DirectoryOrCreate,
    /// Must already exist.
    Directory,
}

impl CacheHostPathType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DirectoryOrCreate => "DirectoryOrCreate",
            Self::Directory => "Directory",
        }
    }
}

/// A directory on the Kubernetes node: kept across pods and nodes' replacements alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheHostPath {
    /// Absolute path on the Kubernetes node.
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/"))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.split('/').exists(p, p == '..')",
        "message": "modelCache.hostPath.path must not contain '..'"
    }]))]
    pub path: String,
    #[serde(default, rename = "type")]
    pub type_: CacheHostPathType,
}

/// A scratch volume that lives as long as the pod: weights are downloaded again on every
/// pod replacement, but never fill the node's disk past `sizeLimit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheEmptyDir {
    /// A positive quantity such as `100Gi`.
    #[schemars(schema_with = "crate::crd::schema::quantity")]
    pub size_limit: Quantity,
}

/// Where the runtime keeps model weights; exactly one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.volumeClaimTemplate) ? 1 : 0) + (has(self.existingClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) == 1",
    "message": "modelCache needs exactly one of volumeClaimTemplate, existingClaim, hostPath or emptyDir"
}]))]
pub struct ModelCacheSpec {
    /// A claim per node, `<node>-model-cache`, created by the operator and deleted with the
    /// ResultityNode (it survives pod replacement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_claim_template: Option<CacheClaimTemplate>,
    /// A PersistentVolumeClaim in the node's namespace that someone else manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub existing_claim: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<CacheHostPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<CacheEmptyDir>,
    /// Mount the cache read-only (a repository filled by someone else; vLLM then needs
    /// `HF_HUB_OFFLINE=1`).
    #[serde(default)]
    pub read_only: bool,
}

/// The sidecar container's settings a user may change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Replaces the default (100m CPU and 128Mi requested, 512Mi memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::schema::resources")]
    pub resources: Option<ResourceRequirements>,
    /// Extra mounts of `spec.pod.volumes` into the sidecar container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub volume_mounts: Vec<VolumeMount>,
}

/// Pod-level settings beyond what the operator derives. Keys and names the operator owns are
/// refused by the validate step (the node turns `Invalid` with the field named), not by CEL:
/// rules that compare every key or name of an unbounded string would exceed the API server's
/// estimated CEL cost budget and make the CRD itself uninstallable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels; keys the operator sets (`app.kubernetes.io/name`, `…/instance`,
    /// `…/managed-by` and every `resultity.com/` key) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations; `resultity.com/` keys are the operator's and refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub annotations: BTreeMap<String, String>,
    /// RuntimeClass for the pod (for example `nvidia` where the NVIDIA container runtime is
    /// not the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub runtime_class_name: Option<String>,
    /// Secrets to pull the runtime's (and sidecar's) images from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Size of `/dev/shm` (a memory-backed volume that counts against the pod's memory);
    /// unbounded up to the memory limit when absent. NCCL and vLLM's tensor parallelism need
    /// more than the container runtime's 64 MiB default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::schema::quantity")]
    pub shm_size: Option<Quantity>,
    /// Extra volumes for `runtime.volumeMounts` and `sidecar.volumeMounts`. The operator's
    /// own volume names (`dshm`, `identity`, `state`, `tmp`, `model-cache`) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::schema::volumes")]
    pub volumes: Vec<Volume>,
}

/// A model and the exact weights revision to serve.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    #[schemars(length(min = 1, max = 256))]
    pub id: String,
    #[schemars(length(min = 1, max = 128))]
    pub revision: String,
}

fn default_gpu_count() -> u32 {
    1
}
fn default_gpu_resource() -> String {
    "nvidia.com/gpu".into()
}

/// How the pod gets its GPUs, and so how the sidecar sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GpuVisibility {
    /// The runtime requests `resourceName` from the device plugin; the sidecar, which holds
    /// no GPU, reads the pod's GPUs from the node's dcgm-exporter.
    #[default]
    DevicePlugin,
    /// A pod-level ResourceClaim from `resourceClaimTemplateName`, shared by the runtime and
    /// the sidecar, so the sidecar reads the GPUs through NVML.
    Dra,
    /// No GPU: nothing is requested and the sidecar's GPU checks are off (CPU runtimes).
    None,
}

impl GpuVisibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DevicePlugin => "devicePlugin",
            Self::Dra => "dra",
            Self::None => "none",
        }
    }
}

/// GPU needs of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.visibility) || self.visibility != 'dra' || has(self.resourceClaimTemplateName)",
    "message": "gpu.visibility dra needs gpu.resourceClaimTemplateName"
}, {
    "rule": "!has(self.resourceClaimTemplateName) || (has(self.visibility) && self.visibility == 'dra')",
    "message": "gpu.resourceClaimTemplateName is used only with gpu.visibility dra"
}, {
    "rule": "!has(self.dcgmUrl) || !has(self.visibility) || self.visibility == 'devicePlugin'",
    "message": "gpu.dcgmUrl is used only with gpu.visibility devicePlugin"
}]))]
pub struct GpuSpec {
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1, max = 16))]
    pub count: u32,
    /// Extended resource to request: `nvidia.com/gpu`, or a MIG profile such as
    /// `nvidia.com/mig-1g.10gb`.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 3, max = 317))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$')",
        "message": "resourceName must be a qualified extended resource name such as nvidia.com/gpu"
    }]))]
    pub resource_name: String,
    /// Minimum total GPU memory the node must report before it is considered healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<u64>,
    /// How the pod gets its GPUs: `devicePlugin` (default), `dra` or `none`.
    #[serde(default)]
    pub visibility: GpuVisibility,
    /// ResourceClaimTemplate (in the node's namespace) each pod's claim is made from; `dra` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub resource_claim_template_name: Option<String>,
    /// dcgm-exporter metrics URL; defaults to port 9400 on the pod's node (`devicePlugin` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub dcgm_url: Option<String>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            count: default_gpu_count(),
            resource_name: default_gpu_resource(),
            min_memory_mib: None,
            visibility: GpuVisibility::default(),
            resource_claim_template_name: None,
            dcgm_url: None,
        }
    }
}

/// Where the pod may run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Label keys (`[prefix/]name`) and values, as the pod API validates them. Bounded so the
    /// API server's CEL cost estimate stays small.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::schema::node_selector")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(t, (!has(t.operator) || t.operator in ['Exists', 'Equal']) && (!has(t.effect) || t.effect in ['', 'NoSchedule', 'PreferNoSchedule', 'NoExecute']) && (!has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == ''))",
        "message": "tolerations: operator must be Exists or Equal (Exists takes no value), effect NoSchedule, PreferNoSchedule or NoExecute"
    }]))]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub priority_class_name: Option<String>,
}

/// The node's ed25519 identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// Secret holding `node.key` (and `admin-token`); created with a fresh key if absent.
    /// Defaults to `<name>-identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_drain_timeout() -> u32 {
    300
}

/// A GPU node serving approved models for a Resultity network.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "resultity.com",
    version = "v1alpha1",
    kind = "ResultityNode",
    plural = "resultitynodes",
    shortname = "rnode",
    category = "resultity",
    namespaced,
    status = "ResultityNodeStatus",
    doc = "A Resultity GPU node: runtime and sidecar in one pod, with a persistent identity",
    // The name is a label value on the pod and its Secret.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 63").message("metadata.name must be at most 63 characters (it is a label value on the node's pod)"),
    printcolumn = r#"{"name":"Node ID","type":"string","jsonPath":".status.nodeId"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"In Sync","type":"string","jsonPath":".status.conditions[?(@.type==\"ConfigInSync\")].status"}"#,
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".status.modelsSummary"}"#,
    printcolumn = r#"{"name":"Jobs","type":"integer","jsonPath":".status.jobs.completed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.runtime.kind != 'vllm' || size(self.models) == 1",
    "message": "runtime vllm serves exactly one model per pod"
}, {
    "rule": "self.runtime.kind != 'triton' || has(self.modelCache)",
    "message": "runtime triton needs spec.modelCache: its model repository is read from the cache volume"
}]))]
pub struct ResultityNodeSpec {
    pub network_ref: NetworkRef,
    pub runtime: RuntimeSpec,
    /// Models to serve; each must be approved by the network for this runtime.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(m, self.exists_one(n, n.id == m.id && n.revision == m.revision))",
        "message": "models must not repeat"
    }]))]
    pub models: Vec<ModelSpec>,
    #[serde(default)]
    pub gpu: GpuSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
    /// Where model weights are kept; required for Triton (its model repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_cache: Option<ModelCacheSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverrides>,
    #[serde(default)]
    pub identity: IdentitySpec,
    /// How long a drain may take before the pod is replaced or deleted anyway.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0, max = 86400))]
    pub drain_timeout_seconds: u32,
    #[serde(default)]
    pub participation: Participation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub subcloud: Option<String>,
    /// Stop creating or replacing the pod; status keeps being reported.
    #[serde(default)]
    pub paused: bool,
}

/// Coarse phase for `kubectl get`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NodePhase {
    /// Waiting for the network config, the identity or the pod to be scheduled.
    #[default]
    Pending,
    /// Pod running, runtime or sidecar not ready yet.
    Starting,
    /// The runtime is running and loading its models (see the ModelsLoaded condition).
    Loading,
    Ready,
    /// Running but something is wrong (not connected, config out of sync, GPU unhealthy).
    Degraded,
    /// Draining before the pod is replaced or deleted.
    Draining,
    /// A container is failing; see the RuntimeReady condition.
    Failed,
    /// The spec cannot be applied; see the Ready condition.
    Invalid,
    Paused,
}

impl NodePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Starting => "Starting",
            Self::Loading => "Loading",
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Draining => "Draining",
            Self::Failed => "Failed",
            Self::Invalid => "Invalid",
            Self::Paused => "Paused",
        }
    }
}

/// A config version and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigRef {
    pub version: u64,
    pub digest: String,
}

/// A model's state on the node as the sidecar reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStateStatus {
    pub id: String,
    pub revision: String,
    /// `pending`, `loading` (the runtime is running and the model not yet servable),
    /// `active`, `inactive` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Known-answer self-test: `passed`, `mismatch` or `error`; absent when the network's
    /// config gives the model none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<String>,
}

/// GPUs as the sidecar's NVML probe sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    pub present: bool,
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    pub memory_total_mib: u64,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Job counters since the sidecar started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobsStatus {
    pub completed: u64,
    pub failed: u64,
    pub in_flight: u32,
}

/// Observed state of a ResultityNode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultityNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: NodePhase,
    /// The node's public identity (`rn1…`), also the pod's `resultity.com/node-id` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Config the node applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config: Option<ConfigRef>,
    /// Config the operator verified for the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<ConfigRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelStateStatus>,
    /// `active/total`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsStatus>,
    /// Hash of the pod spec the node wants now (network images and node spec included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_spec_hash: Option<String>,
    /// Hash of the pod that runs; differs from `desiredSpecHash` while out of date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_spec_hash: Option<String>,
    /// The node's step in its fleet's rollout (fleet members only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_step: Option<super::RolloutStep>,
    /// When the current drain began; bounds the wait by `drainTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_started_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::schema::conditions")]
    pub conditions: Vec<Condition>,
}

impl ResultityNode {
    /// Name of the identity Secret.
    pub fn identity_secret_name(&self) -> String {
        self.spec
            .identity
            .secret_ref
            .clone()
            .unwrap_or_else(|| format!("{}-identity", self.metadata.name.as_deref().unwrap_or("")))
    }
    /// Name of the node's pod.
    pub fn pod_name(&self) -> String {
        format!("{}-node", self.metadata.name.as_deref().unwrap_or(""))
    }
}
