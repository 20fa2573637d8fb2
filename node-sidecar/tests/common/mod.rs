//! Shared fixtures of the sidecar's integration tests.
#![allow(dead_code)]

use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::messages::{Environment, ModelRef, RuntimeKind, Timing};

pub const MODEL: &str = "acme/tiny-chat";

/// A testnet config approving [`MODEL`] on vLLM with no GPU requirement, and `timing`.
pub fn payload(timing: Timing) -> NetworkConfig {
    NetworkConfig {
        environment: Environment::Testnet,
        models: vec![ApprovedModel {
            model: ModelRef {
                id: MODEL.into(),
                revision: "r1".into(),
            },
            runtimes: vec![RuntimeKind::Vllm],
            min_gpu_memory_mib: 0,
            subclouds: vec![],
        }],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing,
        subclouds: vec![],
        network_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}
