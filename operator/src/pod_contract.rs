//! The pod contract: the names, paths and annotations that the build step writes into a pod and
//! that the validate, decide and status steps read back from one. Kept apart so each step
//! depends on the contract, not on one another.

use k8s_openapi::api::core::v1::Pod;

use crate::crd::ANNOTATION_SPEC_HASH;

/// Key of the node's ed25519 key file in the identity Secret.
pub const SECRET_KEY_FILE: &str = "node.key";
/// Key of the bearer token that guards the sidecar's admin API.
pub const SECRET_ADMIN_TOKEN: &str = "admin-token";
/// Where the sidecar finds its identity.
pub const IDENTITY_DIR: &str = "/var/run/resultity/identity";

pub const RUNTIME: &str = "runtime";
pub const SIDECAR: &str = "sidecar";

/// The sidecar's durable state (outbox, applied config).
pub const SIDECAR_STATE_DIR: &str = "/var/lib/resultity";
/// Mount paths the operator gives each container; user mounts may not reuse them.
pub const RUNTIME_MOUNT_PATHS: &[&str] = &["/dev/shm", crate::model_cache::CACHE_DIR];
pub const SIDECAR_MOUNT_PATHS: &[&str] = &[IDENTITY_DIR, SIDECAR_STATE_DIR, "/tmp"];
/// Volume names the operator uses in the pod.
pub const OPERATOR_VOLUMES: &[&str] = &[
    "dshm",
    "identity",
    "state",
    "tmp",
    crate::model_cache::CACHE_VOLUME,
];

/// Non-root uid of the distroless sidecar image.
pub const SIDECAR_UID: i64 = 65532;

/// Name of the pod-level ResourceClaim the runtime and the sidecar share in DRA mode.
pub const GPU_CLAIM: &str = "gpu";

/// Name of the runtime container (status reads its container status).
pub fn runtime_container_name() -> &'static str {
    RUNTIME
}
/// Name of the sidecar container.
pub fn sidecar_container_name() -> &'static str {
    SIDECAR
}

/// The spec hash a live pod was created with.
pub fn pod_spec_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SPEC_HASH))
        .map(String::as_str)
}

/// A pod in phase Failed or Succeeded never runs again (eviction, node shutdown).
pub fn finished_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    matches!(status.phase.as_deref(), Some("Failed" | "Succeeded"))
        .then(|| status.reason.clone().unwrap_or_else(|| "Failed".into()))
}
