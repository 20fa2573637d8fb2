//! Shared fixtures of the sidecar's integration tests.
#![allow(dead_code)]

pub mod canned_http;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::messages::{
    Environment, ModelRef, ModelState, NodePhase, RuntimeKind, Timing,
};
use resultity_protocol::status::{ConnectionState, NodeStatus};
use resultity_protocol::{NetworkId, NetworkKeyId, NetworkKeypair};
use resultity_runtime_sim::{SimConfig, SimHandle};
use resultity_sidecar::agent::{Agent, Exit, Settings, SyncPolicy};
use resultity_sidecar::gpu::GpuSettings;
use resultity_sidecar::runtime::probe::ProbeSettings;
use serde_json::Value;
use tokio::task::JoinHandle;

pub const MODEL: &str = "acme/tiny-chat";

/// Timing for tests on loopback: heartbeats every 150 ms, fast backoff, short HTTP timeouts.
pub fn quick_timing() -> Timing {
    Timing {
        heartbeat_interval_ms: 150,
        ping_interval_ms: 1_000,
        ack_timeout_ms: 1_000,
        backoff_base_ms: 20,
        backoff_cap_ms: 200,
        resume_window_ms: 5_000,
        http_timeout_ms: 2_000,
    }
}

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

pub fn net_id() -> NetworkId {
    NetworkId::parse("testnet").unwrap()
}

/// IO service settings of a test network publishing `payload`: the scheduler ticks every
/// 20 ms and node HTTP is not rate limited.
pub fn io_settings(key: &NetworkKeypair, payload: NetworkConfig) -> IoSettings {
    let mut s = IoSettings::new(net_id(), key.clone(), payload);
    s.scheduler.tick_ms = 20;
    s.limits.node_http_burst = 1000.0;
    s.limits.node_http_rate_per_s = 1000.0;
    s
}

/// A simulator that answers at once (tests about control flow, not latency).
pub fn instant_runtime() -> SimConfig {
    SimConfig {
        prefill_ms: 0,
        decode_us_per_token: 0,
        ..SimConfig::default()
    }
}

/// A runtime simulator on loopback serving [`MODEL`] with `cfg`'s latency and faults.
pub async fn start_sim(cfg: SimConfig) -> SimHandle {
    resultity_runtime_sim::start(
        SimConfig {
            models: vec![MODEL.into()],
            ..cfg
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
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
    let mut s = io_settings(&key, payload);
    s.scheduler.attempt_timeout_ms = attempt_timeout_ms;
    s.scheduler.request_timeout_ms = request_timeout_ms;
    let io = IoService::start(s).await.unwrap();
    let sim = start_sim(sim_cfg).await;
    Net {
        io,
        sim,
        key,
        dir: tempfile::tempdir().unwrap(),
    }
}

/// Settings of a vLLM node on `io_url` trusting `network_key`, with its key and state under
/// `dir`, its local API on a free loopback port and no GPU. Probes suit a loaded test machine:
/// a few per heartbeat-miss window, patient, and a few failures in a row.
pub fn node_settings(
    io_url: String,
    network_key: NetworkKeyId,
    runtime_url: String,
    dir: &Path,
) -> Settings {
    Settings {
        io_url,
        network_id: net_id(),
        network_keys: vec![network_key],
        key_file: dir.join("node.key"),
        data_dir: dir.to_owned(),
        runtime_kind: RuntimeKind::Vllm,
        runtime_url,
        runtime_image: None,
        max_concurrency: Some(8),
        runtime_options: Default::default(),
        runtime_probe: ProbeSettings {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            failure_threshold: 2,
        },
        participation: Default::default(),
        subclouds: vec![],
        models: vec![],
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: "token".into(),
        drain_grace: Duration::from_secs(10),
        pod_uid: None,
        gpu: GpuSettings::off(),
        enforce_gpu_memory: false,
        outbox_sync: SyncPolicy::Deferred,
    }
}

/// [`node_settings`] for a node named `name` on `net`.
pub fn settings(net: &Net, name: &str) -> Settings {
    node_settings(
        net.io.base_url(),
        net.key.id().clone(),
        net.sim.url(),
        &net.dir.path().join(name),
    )
}

/// A running node: the agent and the task that runs it until it exits.
pub struct Node {
    pub agent: Arc<Agent>,
    pub run: JoinHandle<Exit>,
}

impl Node {
    /// Asks the node to drain and exit, and waits up to `within` for its run to end.
    pub async fn drain_to_exit(&mut self, within: Duration) -> Exit {
        self.agent.drain_and_exit();
        tokio::time::timeout(within, &mut self.run)
            .await
            .unwrap()
            .unwrap()
    }
}

/// Starts a node with `settings` on the current runtime.
pub fn spawn(settings: Settings) -> Node {
    let agent = Agent::new(settings).unwrap();
    let a = agent.clone();
    let run = tokio::spawn(async move { a.run(std::future::pending()).await.unwrap() });
    Node { agent, run }
}

/// Ready, connected and serving at least one model.
pub fn serving(s: &NodeStatus) -> bool {
    s.phase == NodePhase::Ready
        && s.connection.state == ConnectionState::Connected
        && s.models.iter().any(|m| m.state == ModelState::Active)
}

/// Polls `cond` every 20 ms for up to `within`.
pub async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client for the polling helpers: building a TLS-capable client parses the root store,
/// which on a loaded machine blocks the single-threaded test runtime (and with it the node's
/// heartbeats) for long enough to make the node look stale.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

/// Whether the IO service at `io_url` lists a model, i.e. has an eligible node.
pub async fn eligible(io_url: &str) -> bool {
    let v: Value = http()
        .get(format!("{io_url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().is_some_and(|d| !d.is_empty())
}

/// Waits up to `within` until [`eligible`] is `want`.
pub async fn wait_eligible(io_url: &str, want: bool, within: Duration) {
    let what = if want {
        "a node eligible"
    } else {
        "no node eligible"
    };
    wait_until(
        what,
        within,
        || async move { eligible(io_url).await == want },
    )
    .await;
}

/// The IO service's view of its only node (`GET /v1/nodes`).
pub async fn only_node_view(io_url: &str) -> Value {
    let v: Value = http()
        .get(format!("{io_url}/v1/nodes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    nodes[0].clone()
}
