//! Shared fixtures of the sidecar's integration tests.
#![allow(dead_code)]

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::messages::{Environment, ModelRef, RuntimeKind, Timing};
use resultity_protocol::{NetworkId, NetworkKeypair};
use resultity_runtime_sim::{SimConfig, SimHandle};

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
            known_answer: None,
        }],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing,
        subclouds: vec![],
        network_keys: vec![],
        retiring_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}

/// A reference IO service publishing `payload` and a runtime simulator serving [`MODEL`], on
/// loopback, with a state directory for the nodes.
pub struct Net {
    pub io: IoServiceHandle,
    pub sim: SimHandle,
    pub key: NetworkKeypair,
    pub dir: tempfile::TempDir,
}

/// Starts a [`Net`]; the scheduler ticks every 20 ms and node HTTP is not rate limited.
pub async fn network(
    payload: NetworkConfig,
    sim_cfg: SimConfig,
    attempt_timeout_ms: u64,
    request_timeout_ms: u64,
) -> Net {
    let key = NetworkKeypair::generate().unwrap();
    let mut s = IoSettings::new(NetworkId::parse("testnet").unwrap(), key.clone(), payload);
    s.scheduler.tick_ms = 20;
    s.scheduler.attempt_timeout_ms = attempt_timeout_ms;
    s.scheduler.request_timeout_ms = request_timeout_ms;
    s.limits.node_http_burst = 1000.0;
    s.limits.node_http_rate_per_s = 1000.0;
    let io = IoService::start(s).await.unwrap();
    let sim = resultity_runtime_sim::start(
        SimConfig {
            models: vec![MODEL.into()],
            ..sim_cfg
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    Net {
        io,
        sim,
        key,
        dir: tempfile::tempdir().unwrap(),
    }
}
