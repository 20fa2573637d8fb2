//! The agent: identity, registration, config sync, heartbeats, the job session and drain, tied
//! together around one shared state that the local API reports.
//!
//! Lifecycle: load identity, config state and outbox → serve the local API → register (with the
//! network's challenge) → sync config and activate models → heartbeat loop + WebSocket session
//! loop (reconnecting with full-jitter backoff) → on drain: tell the network, finish or hand
//! back in-flight jobs within the grace period, flush the outbox, report drained, exit.

mod monitor;
mod net;
mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use resultity_protocol::clock::{Clock, SystemClock};
use resultity_protocol::config::{ConfigTrust, SignedConfig};
use resultity_protocol::messages::http::{
    Capabilities, DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse,
    NodeReport, RegisterRequest, RegisterResponse, paths,
};
use resultity_protocol::messages::ws::{JobResult, NodeMessage};
use resultity_protocol::messages::{
    ConfigPointer, NodePhase, Participation, RuntimeKind, RuntimeReport, Software, Timing,
};
use resultity_protocol::status::{
    ConnectionState, ConnectionStatus, JobCounters, NodeStatus, STATUS_FORMAT,
};
use resultity_protocol::{ErrorCode, JobId, NetworkId, NetworkKeyId, NodeKeypair, limits};
use tokio::sync::{Notify, mpsc};

use crate::api::{self, ApiState};
use crate::backoff::Backoff;
use crate::config_store::{ConfigStore, ConfigStoreError, OfferError};
use crate::gpu::{GpuProbe, GpuSettings};
use crate::identity::{self, IdentityError};
use crate::models::{KnownAnswers, Models, desired_models};
pub use crate::outbox::SyncPolicy;
use crate::outbox::{Outbox, OutboxError};
use crate::runtime::probe::ProbeSettings;
use crate::runtime::{AnyRuntime, RuntimeError, RuntimeOptions};

pub use net::{NetClient, NetError};

/// Everything the sidecar is configured with (the binary maps flags and env onto this).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL of the network's IO service.
    pub io_url: String,
    pub network_id: NetworkId,
    /// Pinned network public keys: the root of trust for configs and network messages.
    pub network_keys: Vec<NetworkKeyId>,
    pub key_file: PathBuf,
    /// Holds the outbox and the applied config.
    pub data_dir: PathBuf,
    pub runtime_kind: RuntimeKind,
    pub runtime_url: String,
    /// Runtime image running now (the operator passes it), to spot image changes in configs.
    pub runtime_image: Option<String>,
    /// Jobs run at once (the credits). `None`: the runtime's own parallelism where it reports
    /// it (llama.cpp's slots), else [`default_max_concurrency`] for the runtime kind.
    pub max_concurrency: Option<u32>,
    /// Health path and other runtime particulars.
    pub runtime_options: RuntimeOptions,
    /// How often and how patiently the runtime is probed.
    pub runtime_probe: ProbeSettings,
    pub participation: Participation,
    pub subclouds: Vec<String>,
    /// Models to serve; empty = every model the network approves for this node.
    pub models: Vec<String>,
    /// Local API listen address.
    pub listen: SocketAddr,
    /// Bearer token for `/status` and `/drain` (empty disables them).
    pub admin_token: String,
    /// How long a drain may take: at its end the jobs still running are handed back.
    pub drain_grace: Duration,
    /// The pod this container runs in (its UID, from the Downward API): tells a restart of
    /// the same container, which stays drained, from a new pod, which starts fresh.
    pub pod_uid: Option<String>,
    /// Where GPU status comes from (NVML, dcgm-exporter, or off on CPU-only rigs).
    pub gpu: GpuSettings,
    /// Refuse models whose GPU memory requirement the node's GPUs do not meet.
    pub enforce_gpu_memory: bool,
    /// When results reach stable storage (see [`crate::outbox`]).
    pub outbox_sync: SyncPolicy,
}

/// Failures that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] ConfigStoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("cannot serve the local API on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained: nothing in flight, outbox empty, network told.
    Drained,
    /// Drain grace ran out with results still unconfirmed (they stay in the outbox).
    DrainIncomplete,
    /// Stopped by the caller without draining.
    Stopped,
}

/// How long a drain that reached its deadline waits for the network to confirm the last
/// results after handing the running jobs back; the drain ends within its timeout plus this.
pub const DRAIN_HAND_BACK_BOUND: Duration = Duration::from_secs(3);

/// How often an unwritable outbox is probed for recovery.
const OUTBOX_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between a heartbeat and one sent early for a readiness change.
const PROMPT_HEARTBEAT_GAP: Duration = Duration::from_secs(1);

/// The running agent's shared state.
#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    key: NodeKeypair,
    net: NetClient,
    runtime: AnyRuntime,
    /// The same runtime on a separate client, for health probes only.
    probe_runtime: AnyRuntime,
    pub api: Arc<ApiState>,
    config: tokio::sync::Mutex<ConfigStore>,
    outbox: Arc<Mutex<Outbox>>,
    /// Model states. Read by every job assignment, so never held across an await: reconciles
    /// work on a copy (serialized by `reconcile_lock`) and swap it in.
    models: std::sync::RwLock<Models>,
    reconcile_lock: tokio::sync::Mutex<()>,
    gpu: GpuProbe,
    clock: Arc<dyn Clock>,
    timing: Mutex<Timing>,
    in_flight: AtomicU32,
    /// Jobs run at once: configured, or learnt from the runtime.
    max_concurrency: AtomicU32,
    /// False while a GPU reports a fault: intake stops.
    gpu_healthy: AtomicBool,
    /// False from a failed outbox write until a write succeeds again: intake stops, since a
    /// result that cannot be stored cannot be delivered safely.
    outbox_writable: AtomicBool,
    /// Mirrors `status.runtime.ready` so the per-job credit count needs no status copy.
    runtime_ready: AtomicBool,
    draining: AtomicBool,
    /// When the drain must be over: set once, when draining starts, so every path (session
    /// up, reconnecting, a signal after a preStop drain) works to the same deadline.
    drain_deadline: std::sync::OnceLock<tokio::time::Instant>,
    registered: AtomicBool,
    /// This node deregistered (now or, per the drained marker, before a restart).
    left_network: AtomicBool,
    config_changed: Notify,
    /// The last refused snapshot: not fetched again before its backoff ends.
    config_refusal: Mutex<crate::config_refusal::ConfigRefusal>,
    /// Running jobs by (job, epoch), so cancels can abort them and duplicates are spotted.
    jobs: Mutex<HashMap<(JobId, u64), tokio::task::AbortHandle>>,
    /// The current session's outgoing queue, if a session is up.
    sender: Mutex<Option<mpsc::Sender<NodeMessage>>>,
    /// Failures not yet delivered (a session was down); resent on the next session.
    pending_fails: Mutex<Vec<NodeMessage>>,
    /// Wakes the drain loop when a job ends or a result is confirmed.
    progress: Notify,
    /// Where the local API listens once `run` bound it.
    api_addr: std::sync::OnceLock<SocketAddr>,
    /// Exit once drained (SIGTERM). An operator drain (`POST /drain`) instead keeps the process
    /// up reporting `drained`, so a container restart cannot rejoin the network before the
    /// operator deletes the pod.
    exit_when_drained: AtomicBool,
    exit_requested: Notify,
}

/// `wait` from now. A wait too long to represent (a grace or timeout flag of `u64::MAX`
/// seconds) is a wait of a century, never an overflow panic.
pub fn deadline_after(wait: Duration) -> tokio::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = tokio::time::Instant::now();
    now.checked_add(wait.min(CENTURY))
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (single assignments).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Loads identity, config state and outbox; does no network I/O.
    pub fn new(settings: Settings) -> Result<Arc<Self>, AgentError> {
        Self::with_clock(settings, Arc::new(SystemClock))
    }

    pub fn with_clock(settings: Settings, clock: Arc<dyn Clock>) -> Result<Arc<Self>, AgentError> {
        if settings.max_concurrency == Some(0) {
            return Err(AgentError::Settings(
                "max concurrency must be at least 1".into(),
            ));
        }
        settings
            .runtime_probe
            .validate()
            .and_then(|()| settings.runtime_options.validate())
            .map_err(AgentError::Settings)?;
        if settings.network_keys.is_empty() {
            return Err(AgentError::Settings(
                "at least one pinned network key is required".into(),
            ));
        }
        let key = identity::load_or_create(&settings.key_file)?;
        let pinned =
            ConfigTrust::pinned(settings.network_id.clone(), settings.network_keys.clone());
        let store = ConfigStore::open(&settings.data_dir.join("config"), pinned)?;
        let outbox =
            Outbox::open(settings.data_dir.join("outbox"))?.with_policy(settings.outbox_sync);
        let timing = store
            .snapshot()
            .map(|s| s.payload.timing.clone())
            .unwrap_or_default();
        let net = NetClient::new(
            &settings.io_url,
            settings.network_id.clone(),
            key.clone(),
            store.trust().clone(),
            clock.clone(),
            Duration::from_millis(timing.http_timeout_ms),
        )?;
        let runtime = AnyRuntime::with_options(
            settings.runtime_kind,
            &settings.runtime_url,
            Duration::from_secs(5),
            &settings.runtime_options,
        )?;
        let probe_runtime = AnyRuntime::for_probes(
            settings.runtime_kind,
            &settings.runtime_url,
            settings.runtime_probe.timeout,
            &settings.runtime_options,
        )?;
        let gpu = GpuProbe::new(&settings.gpu);
        let kept_drained =
            crate::drain_state::load(&settings.data_dir, settings.pod_uid.as_deref());
        let status = NodeStatus {
            format: STATUS_FORMAT,
            node_id: key.id().clone(),
            network_id: settings.network_id.clone(),
            phase: NodePhase::Starting,
            registered: false,
            connection: ConnectionStatus::default(),
            applied_config: store.current().map(|c| c.pointer()),
            network_config: None,
            config_error: None,
            desired_runtime_image: None,
            outbox_error: None,
            models: vec![],
            gpu: resultity_protocol::messages::GpuReport {
                present: false,
                reason: Some("GPU not probed yet".into()),
                ..Default::default()
            },
            runtime: RuntimeReport::not_ready(settings.runtime_kind, Some("not probed yet".into())),
            jobs: JobCounters {
                outbox: u32::try_from(outbox.len()).unwrap_or(u32::MAX),
                ..JobCounters::default()
            },
            last_heartbeat_ms: None,
            verdict: None,
            draining: false,
            drained: false,
            software: software(&settings),
        };
        let mut status = status;
        if let Some(m) = &kept_drained {
            tracing::info!(
                deregistered = m.deregistered,
                "this pod drained before the container restarted: staying drained, not rejoining the network"
            );
            status.phase = NodePhase::Drained;
            status.draining = true;
            status.drained = true;
        }
        let api = ApiState::new(status, settings.admin_token.clone());
        api.readiness.set_gpu_required(gpu.required());
        let max_concurrency = settings
            .max_concurrency
            .unwrap_or_else(|| default_max_concurrency(settings.runtime_kind));
        Ok(Arc::new(Self {
            key,
            net,
            runtime,
            probe_runtime,
            api,
            config: tokio::sync::Mutex::new(store),
            outbox: Arc::new(Mutex::new(outbox)),
            models: std::sync::RwLock::new(Models::default()),
            reconcile_lock: tokio::sync::Mutex::new(()),
            gpu,
            clock,
            timing: Mutex::new(timing),
            in_flight: AtomicU32::new(0),
            max_concurrency: AtomicU32::new(max_concurrency),
            gpu_healthy: AtomicBool::new(true),
            outbox_writable: AtomicBool::new(true),
            runtime_ready: AtomicBool::new(false),
            draining: AtomicBool::new(kept_drained.is_some()),
            drain_deadline: std::sync::OnceLock::new(),
            registered: AtomicBool::new(false),
            left_network: AtomicBool::new(kept_drained.as_ref().is_some_and(|m| m.deregistered)),
            config_changed: Notify::new(),
            config_refusal: Mutex::new(Default::default()),
            jobs: Mutex::new(HashMap::new()),
            sender: Mutex::new(None),
            pending_fails: Mutex::new(Vec::new()),
            progress: Notify::new(),
            api_addr: std::sync::OnceLock::new(),
            exit_when_drained: AtomicBool::new(false),
            exit_requested: Notify::new(),
            settings,
        }))
    }

    pub fn node_id(&self) -> &resultity_protocol::NodeId {
        self.key.id()
    }

    /// The local API's address, once [`Agent::run`] has bound it.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr.get().copied()
    }

    /// Results waiting for the network's confirmation.
    pub fn outbox_pending(&self) -> usize {
        lock(&self.outbox).len()
    }

    fn timing(&self) -> Timing {
        lock(&self.timing).clone()
    }

    fn set_timing(&self, t: &Timing) {
        *lock(&self.timing) = t.clone();
        self.net
            .set_timeout(Duration::from_millis(t.http_timeout_ms));
    }

    /// A network message signed by a key this node does not trust means the network rotated
    /// its keys past this node's config: sync (the catch-up chain repairs it). A refused
    /// chain backs off like any refused snapshot.
    pub(crate) fn catch_up_if_untrusted(&self, e: &resultity_protocol::ProtocolError) {
        if matches!(
            e,
            resultity_protocol::ProtocolError::UnknownSigner { .. }
                | resultity_protocol::ProtocolError::KeyRetired { .. }
        ) && !lock(&self.config_refusal).backing_off(self.clock.now_ms())
        {
            tracing::info!(error = %e, "network signed with a key this node does not trust; syncing the config chain");
            self.config_changed.notify_one();
        }
    }

    /// False while `digest` is a refused snapshot still in its retry backoff.
    fn should_fetch_config(&self, digest: &resultity_protocol::config::ConfigDigest) -> bool {
        lock(&self.config_refusal).should_fetch(digest, self.clock.now_ms())
    }

    fn applied_pointer(&self) -> Option<ConfigPointer> {
        self.api.status().applied_config
    }

    fn models_snapshot(&self) -> Models {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn model_statuses(&self) -> Vec<resultity_protocol::messages::ModelStatus> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .statuses()
    }

    /// Jobs the node runs at once.
    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency.load(Ordering::SeqCst)
    }

    /// Free slots the node advertises: none while draining, the runtime is down, a GPU is
    /// faulty or the outbox cannot be written.
    fn credits(&self) -> u32 {
        let credits = if self.draining.load(Ordering::SeqCst)
            || !self.runtime_ready.load(Ordering::SeqCst)
            || !self.outbox_writable.load(Ordering::SeqCst)
            || !self.gpu_healthy.load(Ordering::SeqCst)
        {
            0
        } else {
            self.max_concurrency()
                .saturating_sub(self.in_flight.load(Ordering::SeqCst))
        };
        // Every advertisement goes through here, so the gauge is what the network was told.
        self.api.metrics.credits.set(i64::from(credits));
        credits
    }

    /// Tells the network the current free slots (they change with readiness, drain and jobs).
    fn advertise_credits(&self) {
        self.send(resultity_protocol::messages::ws::NodeMessage::Credits {
            credits: self.credits(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
        });
    }

    fn outbox_len(&self) -> u32 {
        u32::try_from(lock(&self.outbox).len()).unwrap_or(u32::MAX)
    }

    fn set_phase(&self) {
        let draining = self.draining.load(Ordering::SeqCst);
        let readiness = &self.api.readiness;
        self.api.update(|s| {
            s.draining = draining;
            s.phase = if s.drained {
                NodePhase::Drained
            } else if draining {
                NodePhase::Draining
            } else if !s.registered {
                NodePhase::Registering
            } else if s.applied_config.is_none() {
                NodePhase::Syncing
            } else if readiness.cannot_serve(s) {
                NodePhase::Degraded
            } else {
                NodePhase::Ready
            };
        });
    }

    /// Registers with the network (challenge → signed registration). Updates timing.
    pub async fn register(&self) -> Result<RegisterResponse, NetError> {
        let challenge = self.net.challenge().await?;
        let models = self.model_statuses();
        let req = RegisterRequest {
            hdr: self.net.header(self.clock.as_ref())?,
            challenge: challenge.challenge,
            protocol_versions: limits::PROTOCOL_VERSIONS.to_vec(),
            software: software(&self.settings),
            capabilities: Capabilities {
                runtime: self.settings.runtime_kind,
                max_concurrency: self.max_concurrency(),
                participation: self.settings.participation,
                subclouds: self.settings.subclouds.clone(),
                gpu: self.api.status().gpu,
                models_installed: models.into_iter().map(|m| m.model).collect(),
            },
        };
        let ans: RegisterResponse = self.net.signed(paths::REGISTER, &req).await?;
        self.set_timing(&ans.timing);
        self.registered.store(true, Ordering::SeqCst);
        self.api.update(|s| {
            s.registered = true;
            s.network_config = ans.config.clone();
        });
        self.set_phase();
        tracing::info!(node_id = %self.key.id(), protocol = ans.protocol_version, "registered with the network");
        Ok(ans)
    }

    /// Fetches, verifies and applies the network's config if it is newer; then brings the
    /// models in line. A refused config leaves the last good one in force.
    pub async fn sync_config(&self) -> Result<(), NetError> {
        let since = self
            .config
            .lock()
            .await
            .current()
            .map_or(0, |c| c.snapshot.version);
        let chain: Vec<SignedConfig> = match self.net.fetch_config(since).await {
            Ok(chain) => chain,
            // The network answered with something no snapshot can be read from (a link of
            // another purpose or over 4 MiB, a chain over 16 links): a refused config like
            // any other, so it is reported and backed off instead of fetched at every
            // heartbeat.
            Err(e @ (NetError::BadAnswer { .. } | NetError::TooLarge { .. })) => {
                self.refuse_config_answer(&e);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(signed) = chain.last().cloned() else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        let mut store = self.config.lock().await;
        match store.offer_chain(&chain, now) {
            Ok(Some(applied)) => {
                lock(&self.config_refusal).clear();
                let pointer = applied.pointer();
                let timing = applied.snapshot.payload.timing.clone();
                let image = applied
                    .snapshot
                    .payload
                    .runtime_images
                    .for_kind(self.settings.runtime_kind)
                    .map(str::to_owned);
                self.net.set_trust(store.trust());
                drop(store);
                self.set_timing(&timing);
                let desired_image =
                    image.filter(|i| Some(i) != self.settings.runtime_image.as_ref());
                self.api.update(|s| {
                    s.applied_config = Some(pointer.clone());
                    s.config_error = None;
                    s.desired_runtime_image = desired_image;
                });
                self.api
                    .metrics
                    .config_version
                    .set(i64::try_from(pointer.version).unwrap_or(i64::MAX));
                tracing::info!(version = pointer.version, digest = %pointer.digest, "applied network config");
            }
            Ok(None) => {
                // Already in force: whatever was refused before is not the current state.
                drop(store);
                lock(&self.config_refusal).clear();
                self.api.update(|s| s.config_error = None);
            }
            Err(e) => {
                drop(store);
                let retry_at = lock(&self.config_refusal).record(signed.digest(), now);
                let reason = match &e {
                    OfferError::Refused(p) => format!("refused config {}: {p}", signed.digest()),
                    OfferError::Store(s) => {
                        format!("could not persist config {}: {s}", signed.digest())
                    }
                };
                tracing::warn!(%reason, retry_at_ms = retry_at, "config not applied; the last good config stays in force");
                self.api.update(|s| s.config_error = Some(reason));
            }
        }
        self.reconcile_models().await;
        self.set_phase();
        Ok(())
    }

    /// Records a config answer that could not be read as refused: under the digest the
    /// network announces (so the heartbeat does not fetch it again before the backoff), or,
    /// when none was announced yet, under the digest of the refusal itself (which still
    /// holds back catch-up syncs).
    fn refuse_config_answer(&self, e: &NetError) {
        let now = self.clock.now_ms();
        let reason = format!("refused config answer: {e}");
        let key = self
            .api
            .status()
            .network_config
            .map(|p| p.digest)
            .unwrap_or_else(|| {
                resultity_protocol::config::ConfigDigest::of_body(reason.as_bytes())
            });
        let retry_at = lock(&self.config_refusal).record(&key, now);
        tracing::warn!(%reason, retry_at_ms = retry_at, "config not applied; the last good config stays in force");
        self.api.update(|s| s.config_error = Some(reason));
    }

    /// Activates the models the applied config allows, deactivates the rest.
    async fn reconcile_models(&self) {
        let Some(payload) = self
            .config
            .lock()
            .await
            .snapshot()
            .map(|s| s.payload.clone())
        else {
            return;
        };
        let gpu = self.api.status().gpu;
        let (want, refused) = desired_models(
            &self.settings.models,
            &payload,
            self.settings.runtime_kind,
            gpu.memory_total_mib(),
            self.settings.enforce_gpu_memory,
            &self.settings.subclouds,
        );
        let answers = KnownAnswers::from_config(&payload);
        let _serial = self.reconcile_lock.lock().await;
        let mut models = self.models_snapshot();
        models
            .reconcile(&want, &refused, &answers, &self.runtime)
            .await;
        let statuses = models.statuses();
        *self.models.write().unwrap_or_else(|p| p.into_inner()) = models;
        self.api.update(|s| s.models = statuses);
    }

    fn node_report(&self, runtime: RuntimeReport) -> NodeReport {
        let st = self.api.status();
        let not_ready = self.api.readiness.serve_problems(&st);
        NodeReport {
            phase: st.phase,
            config: st.applied_config,
            draining: self.draining.load(Ordering::SeqCst),
            max_concurrency: self.max_concurrency(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            credits: self.credits(),
            outbox_len: self.outbox_len(),
            participation: self.settings.participation,
            subclouds: self.settings.subclouds.clone(),
            models: st.models,
            gpu: st.gpu,
            runtime,
            not_ready,
            software: st.software,
        }
    }

    /// One heartbeat: report the last probe results, take the verdict and the network's config
    /// pointer. It never waits for a probe (they run in their own tasks).
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse, NetError> {
        let runtime = self.api.status().runtime;
        let req = HeartbeatRequest {
            hdr: self.net.header(self.clock.as_ref())?,
            report: self.node_report(runtime),
        };
        let ans: HeartbeatResponse = match self.net.signed(paths::HEARTBEAT, &req).await {
            Ok(a) => a,
            Err(e) => {
                if let NetError::BadAnswer { source, .. } = &e {
                    self.catch_up_if_untrusted(source);
                }
                if e.code() == Some(ErrorCode::NotRegistered) {
                    self.registered.store(false, Ordering::SeqCst);
                    self.api.update(|s| s.registered = false);
                    self.set_phase();
                }
                return Err(e);
            }
        };
        self.set_timing(&ans.timing);
        let stale = match (&ans.config, self.applied_pointer()) {
            (Some(net), Some(applied)) => {
                net.digest != applied.digest && self.should_fetch_config(&net.digest)
            }
            (Some(net), None) => self.should_fetch_config(&net.digest),
            _ => false,
        };
        self.api.update(|s| {
            s.last_heartbeat_ms = Some(ans.server_time_ms);
            s.verdict = Some(ans.verdict.clone());
            s.network_config = ans.config.clone();
        });
        if stale {
            self.config_changed.notify_one();
        }
        Ok(ans)
    }

    /// Leaves the network (operator deletion with `deregister`).
    pub async fn deregister(&self, reason: &str) -> Result<(), NetError> {
        let req = DeregisterRequest {
            hdr: self.net.header(self.clock.as_ref())?,
            reason: reason.to_owned(),
        };
        let _: DeregisterResponse = self.net.signed(paths::DEREGISTER, &req).await?;
        Ok(())
    }

    /// Sends `msg` on the current session, or keeps failures for the next one. Results need
    /// no keeping: they are in the outbox.
    fn send(&self, msg: NodeMessage) {
        let tx = lock(&self.sender).clone();
        let delivered = tx.is_some_and(|tx| tx.try_send(msg.clone()).is_ok());
        if !delivered && matches!(msg, NodeMessage::JobFail { .. }) {
            lock(&self.pending_fails).push(msg);
        }
    }

    /// Sends `msg` on the current session, waiting while its queue is full (stream chunks:
    /// backpressure reaches the runtime instead of growing a buffer). `false` when there is no
    /// session or it ended: the chunk cannot be delivered in order any more.
    async fn send_wait(&self, msg: NodeMessage) -> bool {
        let tx = lock(&self.sender).clone();
        match tx {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        }
    }

    /// Writes a result durably (off the async threads: fsync blocks). A failed write stops
    /// intake until [`Agent::outbox_watch`] sees a write succeed.
    async fn persist_result(&self, result: JobResult) -> Result<(), OutboxError> {
        let outbox = self.outbox.clone();
        let r = tokio::task::spawn_blocking(move || lock(&outbox).put(&result))
            .await
            .unwrap_or_else(|e| {
                Err(OutboxError::Io {
                    path: PathBuf::from("outbox"),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let len = self.outbox_len();
        self.api.update(|s| s.jobs.outbox = len);
        self.api.metrics.outbox.set(i64::from(len));
        if let Err(e) = &r {
            self.set_outbox_writable(Err(e.to_string()));
        }
        r
    }

    /// Records whether the outbox takes writes; a change updates status, phase and the
    /// credits the network was told.
    fn set_outbox_writable(&self, state: Result<(), String>) {
        let writable = state.is_ok();
        let was = self.outbox_writable.swap(writable, Ordering::SeqCst);
        self.api.update(|s| s.outbox_error = state.err());
        if was == writable {
            return;
        }
        if writable {
            tracing::info!("outbox is writable again; taking jobs");
        } else {
            tracing::error!("outbox cannot be written; taking no jobs until a write succeeds");
        }
        self.set_phase();
        self.advertise_credits();
    }

    /// The switch that makes outbox writes fail, for tests of the unwritable-disk path (a
    /// test running as root cannot make a directory unwritable).
    #[doc(hidden)]
    pub fn outbox_write_fault(&self) -> crate::outbox::WriteFault {
        lock(&self.outbox).write_fault()
    }

    /// While the outbox is unwritable, tries a probe write every second and resumes intake
    /// once one succeeds.
    async fn outbox_watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(OUTBOX_PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.outbox_writable.load(Ordering::SeqCst) {
                continue;
            }
            let outbox = self.outbox.clone();
            let r = tokio::task::spawn_blocking(move || lock(&outbox).probe_writable())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            self.set_outbox_writable(r);
        }
    }

    /// Starts draining: no new jobs, network told by the session. The drain's deadline starts
    /// now.
    pub fn start_drain(&self) {
        self.drain_deadline
            .get_or_init(|| deadline_after(self.settings.drain_grace));
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: no new jobs; finishing in-flight work");
            self.api.drain.send_replace(true);
            self.set_phase();
            self.progress.notify_one();
        }
    }

    /// Drain and exit once drained (what SIGTERM does).
    pub fn drain_and_exit(&self) {
        self.exit_when_drained.store(true, Ordering::SeqCst);
        self.exit_requested.notify_one();
        self.start_drain();
    }

    /// When the drain must end (`None` until draining starts).
    fn drain_deadline(&self) -> Option<tokio::time::Instant> {
        self.drain_deadline.get().copied()
    }

    fn drained(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && lock(&self.outbox).is_empty()
    }

    /// Runs the agent until it drains or `stop` resolves.
    pub async fn run(
        self: Arc<Self>,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<Exit, AgentError> {
        let listener = tokio::net::TcpListener::bind(self.settings.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: self.settings.listen,
                source,
            })?;
        if let Ok(addr) = listener.local_addr() {
            let _ = self.api_addr.set(addr);
        }
        let monitors = [
            tokio::spawn(self.clone().runtime_monitor()),
            tokio::spawn(self.clone().gpu_monitor()),
        ];
        let app = api::router(self.api.clone());
        let api_task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "local API stopped");
            }
        });
        let mut drain_rx = self.api.drain.subscribe();
        let agent = self.clone();
        let drain_watch = tokio::spawn(async move {
            while drain_rx.changed().await.is_ok() {
                if *drain_rx.borrow() {
                    agent.start_drain();
                    break;
                }
            }
        });
        let work = {
            let agent = self.clone();
            async move { agent.main_loop().await }
        };
        tokio::pin!(stop);
        let mut exit = tokio::select! {
            e = work => e,
            _ = &mut stop => Exit::Stopped,
        };
        // Drained and staying up: a later `POST /drain?deregister=true` (the preStop hook after
        // an operator drain) still takes the node out of the network.
        let mut drain_requests = self.api.drain.subscribe();
        while exit == Exit::Drained && !self.exit_when_drained.load(Ordering::SeqCst) {
            tokio::select! {
                _ = &mut stop => exit = Exit::Stopped,
                _ = self.exit_requested.notified() => {}
                Ok(()) = drain_requests.changed() => {
                    if self.api.deregister_requested() {
                        self.leave_network().await;
                    }
                }
            }
        }
        drain_watch.abort();
        api_task.abort();
        for m in monitors {
            m.abort();
        }
        Ok(exit)
    }

    async fn main_loop(self: Arc<Self>) -> Exit {
        if self.api.status().drained {
            // Drained before this container restarted: stay out of the network; `run` keeps
            // reporting it until the pod is deleted.
            return Exit::Drained;
        }
        let t = self.timing();
        let mut backoff = Backoff::random(t.backoff_base_ms, t.backoff_cap_ms);
        // Register (retrying) — unless drained meanwhile.
        while !self.registered.load(Ordering::SeqCst) {
            if self.draining.load(Ordering::SeqCst) && self.drained() {
                return self.finish_drain().await;
            }
            match self.register().await {
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    // The config loop does not run yet: catch up here, so the retry trusts
                    // the network's rotated keys.
                    if e.is_untrusted_signer()
                        && let Err(e) = self.sync_config().await
                    {
                        tracing::warn!(error = %e, "config sync failed");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if let Err(e) = self.sync_config().await {
            tracing::warn!(error = %e, "initial config sync failed; will retry");
        }
        let hb = tokio::spawn(self.clone().heartbeat_loop());
        let flush = tokio::spawn(self.clone().outbox_flusher());
        let outbox_watch = tokio::spawn(self.clone().outbox_watch());
        let cfg = tokio::spawn(self.clone().config_loop());
        let exit = self.clone().session_loop().await;
        hb.abort();
        cfg.abort();
        flush.abort();
        outbox_watch.abort();
        self.sync_outbox().await;
        exit
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            // A draining node that lost its registration (it deregistered) does not rejoin.
            if !self.registered.load(Ordering::SeqCst)
                && !self.draining.load(Ordering::SeqCst)
                && let Err(e) = self.register().await
            {
                tracing::warn!(error = %e, "re-registration failed");
            }
            let sent = tokio::time::Instant::now();
            if let Err(e) = self.heartbeat().await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
            let interval = Duration::from_millis(self.timing().heartbeat_interval_ms.max(100));
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                // A readiness change goes out at once, so the network stops (or resumes)
                // routing within one heartbeat of it; at most one such early heartbeat per
                // gap, so a flapping condition cannot flood the network.
                () = self.api.readiness_changed.notified() => {
                    tokio::time::sleep_until(sent + interval.min(PROMPT_HEARTBEAT_GAP)).await;
                }
            }
        }
    }

    /// Group commit for the deferred outbox: one batch of fsyncs per interval, however many
    /// results completed in it.
    async fn outbox_flusher(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sync_outbox().await;
        }
    }

    async fn sync_outbox(&self) {
        if !lock(&self.outbox).needs_sync() {
            return;
        }
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || lock(&outbox).sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "outbox sync failed"),
            Err(e) => tracing::error!(error = %e, "outbox sync task failed"),
        }
    }

    async fn config_loop(self: Arc<Self>) {
        loop {
            self.config_changed.notified().await;
            if let Err(e) = self.sync_config().await {
                tracing::warn!(error = %e, "config sync failed");
            }
        }
    }

    /// Deregisters once; status and gauges then say not registered.
    async fn leave_network(&self) {
        if self.left_network.load(Ordering::SeqCst) {
            return;
        }
        match self.deregister("the node drained and is leaving").await {
            Ok(()) => {
                tracing::info!("deregistered from the network");
                self.left_network.store(true, Ordering::SeqCst);
                self.registered.store(false, Ordering::SeqCst);
                self.api.update(|s| s.registered = false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "deregistration failed; the network will expire the node")
            }
        }
    }

    async fn finish_drain(&self) -> Exit {
        self.api.update(|s| s.drained = true);
        self.set_phase();
        tracing::info!("drained");
        // A pod being deleted (SIGTERM) or removed by the operator leaves the network now,
        // rather than when the network stops hearing heartbeats.
        if self.api.deregister_requested() || self.exit_when_drained.load(Ordering::SeqCst) {
            self.leave_network().await;
        }
        let deregistered = self.left_network.load(Ordering::SeqCst);
        // Drained for the operator or the preStop hook: a restart of this container before the
        // pod is gone must not rejoin.
        if self.api.drain_requested()
            && let Some(pod_uid) = self.settings.pod_uid.clone()
        {
            let marker = crate::drain_state::DrainedMarker {
                pod_uid,
                deregistered,
                drained_at_ms: self.clock.now_ms(),
            };
            if let Err(e) = crate::drain_state::store(&self.settings.data_dir, &marker) {
                tracing::warn!(error = %e, "a restart of this container would rejoin the network");
            }
        }
        self.set_phase();
        Exit::Drained
    }
}

/// Credits when neither the flag nor the runtime says: vLLM and Triton batch many sequences
/// (set the flag to vLLM's `--max-num-seqs`); an OpenAI-compatible server that does not report
/// its slots gets a few, so requests do not queue invisibly inside it.
pub fn default_max_concurrency(kind: RuntimeKind) -> u32 {
    match kind {
        RuntimeKind::Vllm | RuntimeKind::Triton => 64,
        RuntimeKind::Openai => 4,
    }
}

fn software(s: &Settings) -> Software {
    Software {
        sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        runtime_version: None,
        runtime_image: s.runtime_image.clone(),
    }
}

/// Updates connection state in the status document.
fn set_connection(api: &ApiState, state: ConnectionState, now_ms: u64, error: Option<String>) {
    api.update(|s| {
        if s.connection.state != state {
            s.connection.since_ms = Some(now_ms);
        }
        s.connection.state = state;
        if error.is_some() {
            s.connection.last_error = error;
        }
    });
    api.metrics
        .connected
        .set(i64::from(state == ConnectionState::Connected));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_too_far_to_represent_is_a_century_away() {
        let far = deadline_after(Duration::from_secs(u64::MAX));
        let fifty_years = Duration::from_secs(50 * 365 * 24 * 3600);
        assert!(far > tokio::time::Instant::now() + fifty_years);
        let near = deadline_after(Duration::from_secs(5));
        assert!(near <= tokio::time::Instant::now() + Duration::from_secs(5));
        assert!(near > tokio::time::Instant::now() + Duration::from_secs(4));
    }
}
