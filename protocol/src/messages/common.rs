//! Types shared by several messages and by the node's `/status` document.

use serde::{Deserialize, Serialize};

use crate::digest::ConfigDigest;

/// The inference runtime a node drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// Triton Inference Server (KServe v2 protocol).
    Triton,
    /// Any other OpenAI-compatible server (llama.cpp's `llama-server`, SGLang,
    /// llama-cpp-python, …).
    Openai,
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

/// Which network environment a snapshot describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Testnet,
    Mainnet,
}

/// Which environments' jobs a node accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum Participation {
    Testnet,
    Mainnet,
    #[default]
    Both,
}

impl Participation {
    pub fn accepts(self, env: Environment) -> bool {
        matches!(
            (self, env),
            (Self::Both, _)
                | (Self::Testnet, Environment::Testnet)
                | (Self::Mainnet, Environment::Mainnet)
        )
    }
}

/// A model and the exact revision of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ModelRef {
    /// Model name as the runtime serves it, e.g. `meta-llama/Llama-3.1-8B-Instruct`.
    pub id: String,
    /// Weights revision (commit or tag); part of every signed result.
    pub revision: String,
}

/// Lifecycle of a model on a node. A model becomes `active` only after a test inference
/// through the runtime succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Pending,
    Active,
    Inactive,
    Failed,
}

impl ModelState {
    /// The wire spelling, for logs, labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Failed => "failed",
        }
    }
}

/// A model's state on a node, with the reason for anything but `active`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ModelStatus {
    pub model: ModelRef,
    pub state: ModelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Outcome of the model's known-answer self-test; absent when the config gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<SelfTest>,
}

/// Outcome of a known-answer self-test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum SelfTest {
    /// The answer contained what the config expects.
    Passed,
    /// The runtime answered, differently (the model's reason says where).
    Mismatch,
    /// The runtime could not answer the test request.
    Error,
    /// A value from a newer peer.
    #[serde(other)]
    #[cfg_attr(test, proptest(skip))]
    Unknown,
}

impl SelfTest {
    /// The wire spelling, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Mismatch => "mismatch",
            Self::Error => "error",
            Self::Unknown => "unknown",
        }
    }
}

/// A pointer to a config snapshot: its version and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConfigPointer {
    pub version: u64,
    pub digest: ConfigDigest,
}

/// Timing the network dictates to nodes (registration answer, heartbeat answer and config), so
/// a fleet can be retuned live. All values are milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Timing {
    pub heartbeat_interval_ms: u64,
    /// WebSocket ping interval; a peer is dead after two intervals without a pong.
    pub ping_interval_ms: u64,
    /// Time a node has to `job.ack` an assignment before it is reassigned.
    pub ack_timeout_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// How long after a disconnect a node's unconfirmed work is kept for it.
    pub resume_window_ms: u64,
    /// Timeout for each HTTP request a node makes.
    pub http_timeout_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 10_000,
            ping_interval_ms: 20_000,
            ack_timeout_ms: 5_000,
            backoff_base_ms: 500,
            backoff_cap_ms: 30_000,
            resume_window_ms: 60_000,
            http_timeout_ms: 10_000,
        }
    }
}

/// Software a node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Software {
    pub sidecar_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_image: Option<String>,
}

/// One MIG instance of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MigDevice {
    pub uuid: String,
    pub memory_total_mib: u64,
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Volatile uncorrected ECC errors; non-zero means results from this GPU are suspect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    /// Most recent XID error code seen since the probe started, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xid: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig_devices: Vec<MigDevice>,
    /// False when ECC or XID errors say the device must stop taking work.
    pub healthy: bool,
}

/// What a node knows of its GPUs. `present: false` with a `reason` is a normal report (no
/// driver, no device), never a failure of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuReport {
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<GpuDevice>,
}

impl GpuReport {
    /// Total memory of all devices (MIG instances counted through their parent).
    pub fn memory_total_mib(&self) -> u64 {
        self.devices.iter().map(|d| d.memory_total_mib).sum()
    }
    /// True when no device reports ECC/XID trouble.
    pub fn healthy(&self) -> bool {
        self.devices.iter().all(|d| d.healthy)
    }
}

/// Runtime health and load, as the sidecar reads it from the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RuntimeReport {
    pub kind: RuntimeKind,
    /// Health endpoint answers and the engine is making progress.
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<u32>,
    /// KV-cache use in per mille (vLLM `gpu_cache_usage_perc` × 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage_permille: Option<u32>,
    /// Cumulative generated tokens; a stall is waiting > 0 while this does not advance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens_total: Option<u64>,
}

impl RuntimeReport {
    /// A runtime not (yet) known to be ready, with no load figures.
    pub fn not_ready(kind: RuntimeKind, reason: Option<String>) -> Self {
        Self {
            kind,
            ready: false,
            reason,
            running: None,
            waiting: None,
            kv_cache_usage_permille: None,
            generation_tokens_total: None,
        }
    }
}

/// Coarse lifecycle phase of a node, shared by heartbeats, `/status` and the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub enum NodePhase {
    #[default]
    Starting,
    Registering,
    Syncing,
    Ready,
    Degraded,
    Draining,
    Drained,
    Failed,
    /// A phase this build does not know (a newer sidecar's).
    #[serde(other)]
    Unknown,
}

impl NodePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "Starting",
            Self::Registering => "Registering",
            Self::Syncing => "Syncing",
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Draining => "Draining",
            Self::Drained => "Drained",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
        }
    }
}

/// The network's verdict on a node, returned with every heartbeat so operators see why a node
/// gets no jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Verdict {
    /// The scheduler would route jobs to this node now.
    pub eligible: bool,
    /// Scheduling score, 0–1000 (higher is preferred).
    pub score: u32,
    /// Current decaying penalty, 0–1000.
    pub penalty: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While set and in the future, the node is excluded from scheduling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_until_ms: Option<u64>,
}

/// Kind of job, which decides the runtime call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// OpenAI `POST /v1/chat/completions` request body.
    ChatCompletion,
    /// OpenAI `POST /v1/completions` request body.
    Completion,
    /// KServe v2 inference request body (`POST /v2/models/{model}/infer`).
    Infer,
}

/// Token counts for a completed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Why a node gives a job back or could not complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum FailCode {
    /// The model is not active on this node.
    ModelInactive,
    /// The assignment failed validation (signature, limits, deadline already passed).
    InvalidJob,
    /// More jobs than advertised credits arrived.
    OverCapacity,
    /// The runtime refused the request (4xx): retrying elsewhere will not help.
    RuntimeRejected,
    /// The runtime failed (5xx, connection error): retriable elsewhere.
    RuntimeError,
    /// The job's deadline passed while running.
    DeadlineExceeded,
    /// The node is draining or its runtime went down; the job was not run to completion.
    HandedBack,
    /// The output exceeded `max_output_bytes`.
    OutputTooLarge,
    /// The runtime could not be reached or died mid-request (connection refused or reset):
    /// the node's fault is not the job's, so it is handed back without penalty.
    RuntimeUnavailable,
    /// The assignment names a config digest the node does not run under (it is syncing).
    ConfigMismatch,
    /// The node could not persist the result (outbox full or read-only); it stops taking jobs
    /// until it can write again.
    OutboxUnavailable,
    /// A code this build does not know (a newer node's): retriable, no penalty.
    #[serde(other)]
    Unknown,
}

impl FailCode {
    /// Whether another node may succeed with the same job.
    pub fn retriable(self) -> bool {
        !matches!(self, Self::RuntimeRejected | Self::OutputTooLarge)
    }

    /// Whether the node said with this failure that it cannot take the job's slot back now (it
    /// is not ready, full or handing work back): the network frees no slot for it and waits
    /// for the node's next `credits`, which the node sends after such a failure. Returning
    /// the slot at once would send the node another job to bounce, one per round trip.
    pub fn withholds_slot(self) -> bool {
        matches!(
            self,
            Self::HandedBack
                | Self::RuntimeUnavailable
                | Self::OutboxUnavailable
                | Self::OverCapacity
        )
    }

    /// Whether the failure says something about the node's health (and so may be penalized).
    /// Hand-backs, capacity races, syncing and unknown codes never are.
    pub fn node_fault(self) -> bool {
        matches!(
            self,
            Self::RuntimeError
                | Self::DeadlineExceeded
                | Self::InvalidJob
                | Self::OutboxUnavailable
        )
    }

    /// The stable snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModelInactive => "model_inactive",
            Self::InvalidJob => "invalid_job",
            Self::OverCapacity => "over_capacity",
            Self::RuntimeRejected => "runtime_rejected",
            Self::RuntimeError => "runtime_error",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::HandedBack => "handed_back",
            Self::OutputTooLarge => "output_too_large",
            Self::RuntimeUnavailable => "runtime_unavailable",
            Self::ConfigMismatch => "config_mismatch",
            Self::OutboxUnavailable => "outbox_unavailable",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for FailCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
