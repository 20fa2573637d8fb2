//! Starting and controlling the local network.
//!
//! The IO service runs on the caller's tokio runtime. Each node (sidecar agent + its runtime
//! simulator) runs on a tokio runtime of its own, so [`Devnet::kill_node`] can stop every task
//! and socket of that node at once — what a crashed pod looks like to the network — without
//! the agent having to cooperate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::known_answer::KnownAnswer;
use resultity_protocol::messages::{
    Environment, JobKind, ModelRef, ModelState, NodePhase, RuntimeKind, Timing,
};
use resultity_protocol::status::ConnectionState;
use resultity_protocol::{NetworkId, NetworkKeypair};
use resultity_runtime_sim::{SimConfig, SimHandle};
use resultity_sidecar::agent::{Agent, Settings as AgentSettings};
use resultity_sidecar::gpu::GpuSettings;
use resultity_sidecar::runtime::probe::ProbeSettings;

/// The one model the devnet approves. A plain name, because Triton model names are path
/// segments (no `/`).
pub const MODEL: &str = "tiny-chat";
const REVISION: &str = "r1";
const NETWORK: &str = "devnet";

/// Which runtime API the nodes drive (and so which entry point jobs use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeChoice {
    Vllm,
    Triton,
}

impl RuntimeChoice {
    pub fn kind(self) -> RuntimeKind {
        match self {
            Self::Vllm => RuntimeKind::Vllm,
            Self::Triton => RuntimeKind::Triton,
        }
    }
}

/// What [`Devnet::start`] builds.
#[derive(Debug, Clone)]
pub struct DevnetConfig {
    pub nodes: usize,
    pub runtime: RuntimeChoice,
    /// Simulated prefill time of every request (with `decode_us_per_token` 0, the default, this
    /// is the runtime's whole latency at low load).
    pub latency_ms: u64,
    /// Jobs one node runs at once (its credits).
    pub node_concurrency: u32,
    /// The IO service's single listener (port 0 picks one).
    pub listen: SocketAddr,
    /// How long a disconnected node's unacknowledged jobs wait for it before reassignment.
    /// Short, so a killed node's jobs move on quickly.
    pub resume_window_ms: u64,
    /// When sidecars fsync their outboxes (see `resultity_sidecar::outbox`).
    pub outbox_sync: resultity_sidecar::agent::SyncPolicy,
    /// Simulated decode time per output token (microseconds): the pace of streamed tokens.
    pub decode_us_per_token: u64,
}

impl Default for DevnetConfig {
    fn default() -> Self {
        Self {
            nodes: 4,
            runtime: RuntimeChoice::Vllm,
            latency_ms: 20,
            node_concurrency: 16,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            resume_window_ms: 1_000,
            outbox_sync: resultity_sidecar::agent::SyncPolicy::Deferred,
            decode_us_per_token: 0,
        }
    }
}

/// Why the network could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum DevnetError {
    #[error("devnet needs at least one node")]
    NoNodes,
    #[error("listen address {0} is not a loopback address; the devnet only binds loopback")]
    NotLoopback(SocketAddr),
    #[error("key generation failed: {0}")]
    Key(String),
    #[error("IO service: {0}")]
    Io(#[from] resultity_io::IoError),
    #[error("runtime simulator: {0}")]
    Sim(#[from] resultity_runtime_sim::SimError),
    #[error("sidecar agent {index}: {source}")]
    Agent {
        index: usize,
        source: resultity_sidecar::agent::AgentError,
    },
    #[error("node runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("no such live node: {0}")]
    NoSuchNode(usize),
    #[error("timed out after {} ms waiting for {}", .0.as_millis(), .1)]
    Timeout(Duration, String),
}

/// One node: a sidecar agent and its runtime simulator, on their own tokio runtime.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    pub agent: Arc<Agent>,
    pub sim: SimHandle,
    rt: Option<tokio::runtime::Runtime>,
}

impl Node {
    /// The node id the network knows it by (`x-resultity-node-id`).
    pub fn node_id(&self) -> String {
        self.agent.node_id().as_str().to_owned()
    }

    pub fn is_alive(&self) -> bool {
        self.rt.is_some()
    }

    /// Ready, connected and serving the model.
    pub fn is_serving(&self) -> bool {
        let s = self.agent.api.status();
        self.is_alive()
            && s.phase == NodePhase::Ready
            && s.connection.state == ConnectionState::Connected
            && s.models.iter().any(|m| m.state == ModelState::Active)
    }

    /// A short state word for tables.
    pub fn state(&self) -> String {
        if !self.is_alive() {
            return "killed".into();
        }
        let s = self.agent.api.status();
        let connection = match s.connection.state {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Backoff => "backoff",
        };
        format!("{}/{connection}", s.phase.as_str())
    }
}

/// A running local network.
#[derive(Debug)]
pub struct Devnet {
    cfg: DevnetConfig,
    io: Option<IoServiceHandle>,
    io_settings: IoSettings,
    pub nodes: Vec<Node>,
    // Keeps the data directories (keys, outboxes, config state) alive as long as the network.
    dir: tempfile::TempDir,
}

/// The devnet's nodes run the simulator, whose deterministic answer is computable: every node
/// checks it before it serves, as a network would check a model's greedy answer.
fn known_answer() -> KnownAnswer {
    const PROMPT: &str = "The capital of France is";
    const MAX_TOKENS: u32 = 8;
    let (text, _) = resultity_runtime_sim::generate(MODEL, PROMPT, MAX_TOKENS);
    KnownAnswer {
        kind: JobKind::Completion,
        request: serde_json::json!({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}),
        expect: serde_json::json!({"choices": [{"text": text}]}),
    }
}

/// Network timing short enough for a devnet: failures are noticed in about a second.
fn payload(runtime: RuntimeKind) -> NetworkConfig {
    NetworkConfig {
        environment: Environment::Testnet,
        models: vec![ApprovedModel {
            model: ModelRef {
                id: MODEL.into(),
                revision: REVISION.into(),
            },
            runtimes: vec![runtime],
            min_gpu_memory_mib: 0,
            subclouds: vec![],
            known_answer: (runtime != RuntimeKind::Triton).then(known_answer),
        }],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing: Timing {
            heartbeat_interval_ms: 300,
            ping_interval_ms: 1_000,
            ack_timeout_ms: 1_000,
            backoff_base_ms: 20,
            backoff_cap_ms: 250,
            resume_window_ms: 1_000,
            http_timeout_ms: 2_000,
        },
        subclouds: vec![],
        network_keys: vec![],
        retiring_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}

impl Devnet {
    /// Starts the IO service and every node; returns once they are started (not yet ready:
    /// see [`Devnet::wait_ready`]).
    pub async fn start(cfg: DevnetConfig) -> Result<Self, DevnetError> {
        if cfg.nodes == 0 {
            return Err(DevnetError::NoNodes);
        }
        if !cfg.listen.ip().is_loopback() {
            return Err(DevnetError::NotLoopback(cfg.listen));
        }
        let dir = tempfile::tempdir()?;
        let key = NetworkKeypair::generate().map_err(|e| DevnetError::Key(e.to_string()))?;
        let network_id = NetworkId::parse(NETWORK).map_err(|e| DevnetError::Key(e.to_string()))?;
        let mut payload = payload(cfg.runtime.kind());
        payload.timing.resume_window_ms = cfg.resume_window_ms;
        let mut s = IoSettings::new(network_id, key, payload);
        s.listen = cfg.listen;
        // Persisted so a restarted IO service continues the config version chain.
        s.config_state = Some(dir.path().join("io-config-state.json"));
        s.scheduler.tick_ms = 20;
        s.scheduler.attempt_timeout_ms = 5_000 + cfg.latency_ms.saturating_mul(20);
        s.scheduler.request_timeout_ms = 30_000 + cfg.latency_ms.saturating_mul(50);
        // Loopback nodes heartbeat fast; the production per-node limits would throttle them.
        s.limits.node_http_burst = 1_000.0;
        // All devnet nodes register (and re-register after a restart) from one address.
        s.limits.challenge_burst_per_ip = 100_000.0;
        s.limits.challenge_rate_per_ip_per_s = 100_000.0;
        s.limits.node_http_rate_per_s = 1_000.0;
        s.limits.ws_msg_rate_per_s = 100_000.0;
        s.limits.ws_msg_burst = 100_000.0;
        s.limits.max_queue = 100_000;
        let io = IoService::start(s.clone()).await?;
        s.listen = io.local_addr();
        let mut net = Self {
            cfg,
            io: Some(io),
            io_settings: s,
            nodes: Vec::new(),
            dir,
        };
        for index in 0..net.cfg.nodes {
            let node = net.start_node(index).await?;
            net.nodes.push(node);
        }
        Ok(net)
    }

    async fn start_node(&self, index: usize) -> Result<Node, DevnetError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("devnet-node-{index}"))
            .enable_all()
            .build()?;
        let sim_cfg = SimConfig {
            models: vec![MODEL.into()],
            prefill_ms: self.cfg.latency_ms,
            decode_us_per_token: self.cfg.decode_us_per_token,
            max_batch: 256,
            ..SimConfig::default()
        };
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let sim = rt
            .spawn(resultity_runtime_sim::start(sim_cfg, loopback))
            .await??;
        let data_dir: PathBuf = self.dir.path().join(format!("node-{index}"));
        let settings = AgentSettings {
            io_url: self.base_url(),
            network_id: self.io_settings.network_id.clone(),
            network_keys: vec![self.io_settings.network_key.id().clone()],
            key_file: data_dir.join("node.key"),
            data_dir,
            runtime_kind: self.cfg.runtime.kind(),
            runtime_url: sim.url(),
            runtime_image: None,
            max_concurrency: Some(self.cfg.node_concurrency),
            runtime_options: Default::default(),
            runtime_probe: ProbeSettings {
                interval: Duration::from_millis(500),
                ..ProbeSettings::default()
            },
            participation: Default::default(),
            subclouds: vec![],
            models: vec![],
            listen: loopback,
            admin_token: String::new(),
            drain_grace: Duration::from_secs(5),
            pod_uid: None,
            // Loopback machines need not have GPUs.
            gpu: GpuSettings::off(),
            enforce_gpu_memory: false,
            outbox_sync: self.cfg.outbox_sync,
        };
        let agent = Agent::new(settings).map_err(|source| DevnetError::Agent { index, source })?;
        let a = agent.clone();
        rt.spawn(async move {
            if let Err(e) = a.run(std::future::pending()).await {
                tracing::error!(node = index, error = %e, "sidecar agent stopped");
            }
        });
        Ok(Node {
            index,
            agent,
            sim,
            rt: Some(rt),
        })
    }

    /// The IO service's single listener, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.io_settings.listen)
    }

    /// The base URL OpenAI clients take (`base_url` of the official SDKs).
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.io_settings.listen
    }

    pub fn config(&self) -> &DevnetConfig {
        &self.cfg
    }

    /// The IO service now running (None while restarting).
    pub fn io(&self) -> Option<&IoServiceHandle> {
        self.io.as_ref()
    }

    /// Live nodes the IO service would route a job to now.
    pub fn eligible_nodes(&self) -> usize {
        self.io.as_ref().map_or(0, |io| {
            let now = io.state().now();
            io.state()
                .core()
                .node_views(now)
                .iter()
                .filter(|v| v.eligible)
                .count()
        })
    }

    /// Waits until every live node serves and the IO service sees all of them eligible.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), DevnetError> {
        let live = self.nodes.iter().filter(|n| n.is_alive()).count();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let serving = self.nodes.iter().filter(|n| n.is_serving()).count();
            let eligible = self.eligible_nodes();
            if serving == live && eligible >= live {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DevnetError::Timeout(
                    within,
                    format!("{live} nodes ready (serving {serving}, eligible {eligible})"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `index` abruptly: its agent, sessions and simulator vanish mid-job, as in a
    /// crashed pod. Its data directory stays (nothing restarts it).
    pub fn kill_node(&mut self, index: usize) -> Result<(), DevnetError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(DevnetError::NoSuchNode(index))?;
        let rt = node.rt.take().ok_or(DevnetError::NoSuchNode(index))?;
        // Not a graceful shutdown: tasks are dropped at their next await point.
        rt.shutdown_background();
        Ok(())
    }

    /// Stops the IO service (all sessions and in-flight caller requests drop) and starts a
    /// new one on the same address, key and persisted config chain. Nodes reconnect on their
    /// own; the new service knows nothing of earlier jobs.
    pub async fn restart_io(&mut self, down_for: Duration) -> Result<(), DevnetError> {
        if let Some(io) = self.io.take() {
            io.shutdown().await;
        }
        tokio::time::sleep(down_for).await;
        // The old socket may linger for a moment; retry the bind briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match IoService::start(self.io_settings.clone()).await {
                Ok(io) => {
                    self.io = Some(io);
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "IO service restart: retrying bind");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Jobs the IO service took back from a node and gave to another attempt.
    pub fn jobs_reassigned(&self) -> u64 {
        self.io
            .as_ref()
            .map_or(0, |io| io.state().metrics.jobs_reassigned.get())
    }

    /// Node messages (HTTP and WebSocket) the IO service refused, all reasons.
    pub fn messages_rejected(&self) -> u64 {
        use resultity_io::metrics::Channel;
        self.io.as_ref().map_or(0, |io| {
            let m = &io.state().metrics;
            resultity_protocol::ErrorCode::ALL
                .iter()
                .map(|c| m.rejections(Channel::Http, *c) + m.rejections(Channel::Ws, *c))
                .sum()
        })
    }

    /// Stops everything, waiting (bounded) for the nodes' tasks to end before their data
    /// directories are removed.
    pub async fn shutdown(mut self) {
        let runtimes: Vec<_> = self.nodes.iter_mut().filter_map(|n| n.rt.take()).collect();
        // Blocking shutdown is not allowed on an async worker; do it on a blocking thread.
        let _ = tokio::task::spawn_blocking(move || {
            for rt in runtimes {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        })
        .await;
        if let Some(io) = self.io.take() {
            io.shutdown().await;
        }
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        // A runtime must not be dropped from async code; hand them off instead.
        for node in &mut self.nodes {
            if let Some(rt) = node.rt.take() {
                rt.shutdown_background();
            }
        }
    }
}
