//! The local API on the sidecar's admin port: `/healthz` and `/readyz` for kubelet probes,
//! `/metrics` for Prometheus, and — behind the bearer token — `/status` (the shared status
//! document the operator pulls) and `POST /drain`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use resultity_protocol::clock::{Clock, SystemClock};
use resultity_protocol::messages::ws::NodeMessage;
use resultity_protocol::messages::{FailCode, ModelState};
use resultity_protocol::status::NodeStatus;
use serde_json::json;
use tokio::sync::watch;

use crate::readiness::Readiness;

/// Outcome label of the jobs counter and the latency histogram: `completed`, `failed`,
/// `handed_back` or `rejected`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// A model's state (`pending`, `active`, `inactive`, `failed`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
    pub revision: String,
    pub state: String,
}

/// Count of models per state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// One GPU, by index and UUID (the UUID joins with dcgm-exporter's series).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabel {
    pub gpu: String,
    pub uuid: String,
}

/// The node's lifecycle phase.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Job latency buckets, seconds: 50 ms .. ~13 min, doubling (LLM jobs range from a short
/// completion to a long generation).
fn job_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 15))
}

/// The sidecar's Prometheus metrics. Counters and the latency histogram are updated by the
/// agent as jobs run; the figures that live in the status document (network verdict, config,
/// models, GPU, runtime load) are copied from it on every scrape by [`Metrics::refresh`], so
/// `/metrics` and `/status` can never disagree.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub jobs: Family<OutcomeLabel, Counter>,
    pub job_duration: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
    pub in_flight: Gauge,
    pub credits: Gauge,
    pub outbox: Gauge,
    pub connected: Gauge,
    pub runtime_ready: Gauge,
    pub config_version: Gauge,
    pub reconnects: Counter,
    pub messages_rejected: Counter,
    // Copied from the status document at scrape time.
    network_config_version: Gauge,
    config_in_sync: Gauge,
    registered: Gauge,
    draining: Gauge,
    phase: Family<PhaseLabel, Gauge>,
    network_eligible: Gauge,
    network_score: Gauge,
    network_penalty: Gauge,
    network_suspended: Gauge,
    network_verdict_known: Gauge,
    models: Family<StateLabel, Gauge>,
    model_state: Family<ModelLabel, Gauge>,
    gpu_present: Gauge,
    gpu_required: Gauge,
    gpu_healthy: Family<GpuLabel, Gauge>,
    gpu_memory_used: Family<GpuLabel, Gauge>,
    gpu_memory_total: Family<GpuLabel, Gauge>,
    gpu_utilization: Family<GpuLabel, FloatGauge>,
    gpu_temperature: Family<GpuLabel, Gauge>,
    gpu_ecc_uncorrected: Family<GpuLabel, Gauge>,
    runtime_running: Gauge,
    runtime_waiting: Gauge,
    runtime_kv_cache_usage: FloatGauge,
    runtime_generation_tokens: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("resultity_sidecar");
        let m = Self {
            registry: Registry::default(),
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(job_latency_histogram),
            in_flight: Gauge::default(),
            credits: Gauge::default(),
            outbox: Gauge::default(),
            connected: Gauge::default(),
            runtime_ready: Gauge::default(),
            config_version: Gauge::default(),
            reconnects: Counter::default(),
            messages_rejected: Counter::default(),
            network_config_version: Gauge::default(),
            config_in_sync: Gauge::default(),
            registered: Gauge::default(),
            draining: Gauge::default(),
            phase: Family::default(),
            network_eligible: Gauge::default(),
            network_score: Gauge::default(),
            network_penalty: Gauge::default(),
            network_suspended: Gauge::default(),
            network_verdict_known: Gauge::default(),
            models: Family::default(),
            model_state: Family::default(),
            gpu_present: Gauge::default(),
            gpu_required: Gauge::default(),
            gpu_healthy: Family::default(),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_utilization: Family::default(),
            gpu_temperature: Family::default(),
            gpu_ecc_uncorrected: Family::default(),
            runtime_running: Gauge::default(),
            runtime_waiting: Gauge::default(),
            runtime_kv_cache_usage: FloatGauge::default(),
            runtime_generation_tokens: Gauge::default(),
        };
        let r = &mut registry;
        r.register("jobs", "Jobs finished, by outcome", m.jobs.clone());
        r.register_with_unit(
            "job_duration",
            "Time from accepting a job to its result or failure, by outcome",
            Unit::Seconds,
            m.job_duration.clone(),
        );
        r.register("jobs_in_flight", "Jobs running now", m.in_flight.clone());
        r.register(
            "credits",
            "Free job slots the node last advertised to the network",
            m.credits.clone(),
        );
        r.register(
            "outbox_results",
            "Results awaiting confirmation",
            m.outbox.clone(),
        );
        r.register(
            "connected",
            "1 while the network session is up",
            m.connected.clone(),
        );
        r.register(
            "runtime_ready",
            "1 while the runtime is ready",
            m.runtime_ready.clone(),
        );
        r.register(
            "config_version",
            "Applied config version",
            m.config_version.clone(),
        );
        r.register(
            "network_config_version",
            "Config version the network announced last (0: none yet)",
            m.network_config_version.clone(),
        );
        r.register(
            "config_in_sync",
            "1 while the applied config is the network's latest",
            m.config_in_sync.clone(),
        );
        r.register(
            "registered",
            "1 once registration with the network succeeded",
            m.registered.clone(),
        );
        r.register("draining", "1 while draining", m.draining.clone());
        r.register(
            "phase",
            "1 for the node's current lifecycle phase",
            m.phase.clone(),
        );
        r.register(
            "reconnects",
            "Network session reconnects",
            m.reconnects.clone(),
        );
        r.register(
            "messages_rejected",
            "Network messages refused (signature, replay, addressing)",
            m.messages_rejected.clone(),
        );
        r.register(
            "network_verdict_known",
            "1 once a heartbeat answer carried the network's verdict",
            m.network_verdict_known.clone(),
        );
        r.register(
            "network_eligible",
            "1 while the network would route jobs to this node",
            m.network_eligible.clone(),
        );
        r.register(
            "network_score",
            "Scheduling score from the network's verdict, 0-1000",
            m.network_score.clone(),
        );
        r.register(
            "network_penalty",
            "Current penalty from the network's verdict, 0-1000",
            m.network_penalty.clone(),
        );
        r.register(
            "network_suspended",
            "1 while the network has suspended this node",
            m.network_suspended.clone(),
        );
        r.register("models", "Models by state", m.models.clone());
        r.register(
            "model_state",
            "1 for each model's current state",
            m.model_state.clone(),
        );
        r.register(
            "gpu_present",
            "1 when the sidecar sees at least one GPU (NVML or dcgm-exporter); exported without a GPU too",
            m.gpu_present.clone(),
        );
        // Tells a CPU node (GPU checks off) from a GPU node that lost its GPU, so an alert on
        // gpu_present == 0 needs no list of which nodes should have one.
        r.register(
            "gpu_required",
            "1 when the node needs a visible GPU to be ready (GPU checks on)",
            m.gpu_required.clone(),
        );
        r.register(
            "gpu_healthy",
            "1 while the GPU is healthy (no uncorrected ECC or XID errors)",
            m.gpu_healthy.clone(),
        );
        r.register_with_unit(
            "gpu_memory_used",
            "GPU memory in use",
            Unit::Bytes,
            m.gpu_memory_used.clone(),
        );
        r.register_with_unit(
            "gpu_memory_total",
            "GPU memory installed",
            Unit::Bytes,
            m.gpu_memory_total.clone(),
        );
        r.register(
            "gpu_utilization_ratio",
            "GPU utilization, 0-1",
            m.gpu_utilization.clone(),
        );
        r.register_with_unit(
            "gpu_temperature",
            "GPU temperature",
            Unit::Celsius,
            m.gpu_temperature.clone(),
        );
        r.register(
            "gpu_ecc_uncorrected_errors",
            "Volatile uncorrected ECC errors",
            m.gpu_ecc_uncorrected.clone(),
        );
        r.register(
            "runtime_running_requests",
            "Requests the runtime is processing now",
            m.runtime_running.clone(),
        );
        r.register(
            "runtime_waiting_requests",
            "Requests queued in the runtime",
            m.runtime_waiting.clone(),
        );
        r.register(
            "runtime_kv_cache_usage_ratio",
            "Runtime KV-cache usage, 0-1",
            m.runtime_kv_cache_usage.clone(),
        );
        r.register(
            "runtime_generation_tokens",
            "Tokens the runtime generated since it started (a counter in the runtime)",
            m.runtime_generation_tokens.clone(),
        );
        Self { registry, ..m }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn job(&self, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records how long a job took, labelled by the outcome its report message carries.
    pub fn job_latency(&self, report: &NodeMessage, elapsed: Duration) {
        let outcome = match report {
            NodeMessage::JobResult(_) => "completed",
            // Both go back to the network unpenalized: the job itself did not fail.
            NodeMessage::JobFail {
                code: FailCode::HandedBack | FailCode::RuntimeUnavailable,
                ..
            } => "handed_back",
            _ => "failed",
        };
        self.job_duration
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Copies the status document's figures into the gauges. Label sets are rebuilt, so a
    /// model or GPU that went away stops being exported. `gpu_required`: GPU checks are on.
    pub fn refresh(&self, s: &NodeStatus, gpu_required: bool, now_ms: u64) {
        self.gpu_required.set(i64::from(gpu_required));
        self.network_config_version
            .set(to_i64(s.network_config.as_ref().map_or(0, |p| p.version)));
        self.config_in_sync.set(i64::from(s.config_in_sync()));
        self.registered.set(i64::from(s.registered));
        self.draining.set(i64::from(s.draining));
        self.phase.clear();
        self.phase
            .get_or_create(&PhaseLabel {
                phase: s.phase.as_str().to_owned(),
            })
            .set(1);

        let v = s.verdict.as_ref();
        self.network_verdict_known.set(i64::from(v.is_some()));
        self.network_eligible
            .set(i64::from(v.is_some_and(|v| v.eligible)));
        self.network_score.set(i64::from(v.map_or(0, |v| v.score)));
        self.network_penalty
            .set(i64::from(v.map_or(0, |v| v.penalty)));
        self.network_suspended.set(i64::from(
            v.and_then(|v| v.suspended_until_ms)
                .is_some_and(|until| until > now_ms),
        ));

        self.models.clear();
        self.model_state.clear();
        for state in [
            ModelState::Pending,
            ModelState::Active,
            ModelState::Inactive,
            ModelState::Failed,
        ] {
            let n = s.models.iter().filter(|m| m.state == state).count();
            self.models
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for m in &s.models {
            self.model_state
                .get_or_create(&ModelLabel {
                    model: m.model.id.clone(),
                    revision: m.model.revision.clone(),
                    state: m.state.as_str().to_owned(),
                })
                .set(1);
        }

        self.gpu_present.set(i64::from(s.gpu.present));
        for f in [
            &self.gpu_healthy,
            &self.gpu_memory_used,
            &self.gpu_memory_total,
            &self.gpu_temperature,
            &self.gpu_ecc_uncorrected,
        ] {
            f.clear();
        }
        self.gpu_utilization.clear();
        const MIB: u64 = 1024 * 1024;
        for d in &s.gpu.devices {
            let l = GpuLabel {
                gpu: d.index.to_string(),
                uuid: d.uuid.clone(),
            };
            self.gpu_healthy.get_or_create(&l).set(i64::from(d.healthy));
            self.gpu_memory_used
                .get_or_create(&l)
                .set(to_i64(d.memory_used_mib.saturating_mul(MIB)));
            self.gpu_memory_total
                .get_or_create(&l)
                .set(to_i64(d.memory_total_mib.saturating_mul(MIB)));
            if let Some(u) = d.utilization_pct {
                self.gpu_utilization
                    .get_or_create(&l)
                    .set(f64::from(u) / 100.0);
            }
            if let Some(t) = d.temperature_c {
                self.gpu_temperature.get_or_create(&l).set(i64::from(t));
            }
            if let Some(e) = d.ecc_uncorrected {
                self.gpu_ecc_uncorrected.get_or_create(&l).set(to_i64(e));
            }
        }

        let rt = &s.runtime;
        self.runtime_running.set(i64::from(rt.running.unwrap_or(0)));
        self.runtime_waiting.set(i64::from(rt.waiting.unwrap_or(0)));
        self.runtime_kv_cache_usage
            .set(f64::from(rt.kv_cache_usage_permille.unwrap_or(0)) / 1000.0);
        self.runtime_generation_tokens
            .set(to_i64(rt.generation_tokens_total.unwrap_or(0)));
    }
}

/// State shared by the agent and the local API.
#[derive(Debug)]
pub struct ApiState {
    pub status: Mutex<NodeStatus>,
    pub metrics: Metrics,
    pub drain: watch::Sender<bool>,
    /// `POST /drain?deregister=true`: leave the network once drained.
    deregister: std::sync::atomic::AtomicBool,
    /// A `POST /drain` came (the operator or the preStop hook), not only a signal: the
    /// drained state is then kept across a restart of the container.
    requested: std::sync::atomic::AtomicBool,
    admin_token: String,
    /// What `/readyz` and the phase are computed from; logs each change.
    pub readiness: Readiness,
    /// Signalled on every change of the readiness verdict, so the heartbeat carries it to the
    /// network at once instead of at the next interval.
    pub readiness_changed: tokio::sync::Notify,
}

impl ApiState {
    pub fn new(status: NodeStatus, admin_token: String) -> Arc<Self> {
        let (drain, _) = watch::channel(false);
        Arc::new(Self {
            status: Mutex::new(status),
            metrics: Metrics::default(),
            drain,
            deregister: std::sync::atomic::AtomicBool::new(false),
            requested: std::sync::atomic::AtomicBool::new(false),
            admin_token,
            readiness: Readiness::default(),
            readiness_changed: tokio::sync::Notify::new(),
        })
    }

    /// Whether a drain request asked to deregister from the network afterwards.
    pub fn deregister_requested(&self) -> bool {
        self.deregister.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the drain was asked for through `POST /drain` (rather than by a signal alone).
    pub fn drain_requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A copy of the status document (a poisoned lock still holds the last written state).
    pub fn status(&self) -> NodeStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Applies `f` to the status document, and logs a readiness change it caused.
    pub fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        let problems = {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
            self.readiness.problems(&s)
        };
        if self.readiness.observe(&problems) {
            self.readiness_changed.notify_one();
        }
    }

    /// Why the node is not ready, empty when it is.
    pub fn readiness_problems(&self) -> Vec<String> {
        self.readiness.problems(&self.status())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        !self.admin_token.is_empty()
            && constant_time_eq(given.as_bytes(), self.admin_token.as_bytes())
    }
}

/// Compares without an early exit, so response time does not reveal how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/drain", post(drain))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    let problems = s.readiness_problems();
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"ready": problems.is_empty(), "problems": problems})),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    s.metrics.refresh(
        &s.status(),
        s.readiness.gpu_required(),
        SystemClock.now_ms(),
    );
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &s.metrics.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({"error": "missing or wrong bearer token"})),
    )
        .into_response()
}

async fn status(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !s.authorized(&headers) {
        return unauthorized();
    }
    axum::Json(s.status()).into_response()
}

/// `POST /drain[?deregister=true|false]`: idempotent; a later request may add deregistration.
async fn drain(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    if !s.authorized(&headers) {
        return unauthorized();
    }
    let mut deregister = false;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair {
            "deregister=true" | "deregister" => deregister = true,
            "deregister=false" => {}
            other => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({"error": format!("unknown drain parameter '{other}'; use deregister=true|false")})),
                )
                    .into_response();
            }
        }
    }
    if deregister {
        s.deregister
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    s.requested.store(true, std::sync::atomic::Ordering::SeqCst);
    s.drain.send_replace(true);
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"draining": true, "deregister": s.deregister_requested()})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(models: serde_json::Value, suspended_until_ms: u64) -> NodeStatus {
        let node = resultity_protocol::NodeKeypair::from_seed(&[3; 32]);
        serde_json::from_value(json!({
            "format": resultity_protocol::status::STATUS_FORMAT,
            "node_id": node.id().as_str(), "network_id": "testnet", "phase": "Ready",
            "registered": true, "connection": {"state": "Connected", "reconnects": 0},
            "applied_config": {"version": 2, "digest": format!("sha256:{}", "a".repeat(64))},
            "network_config": {"version": 2, "digest": format!("sha256:{}", "a".repeat(64))},
            "models": models,
            "gpu": {"present": true, "devices": [{"index": 0, "uuid": "GPU-9", "name": "L4",
                "memory_total_mib": 2, "memory_used_mib": 1, "utilization_pct": 40,
                "healthy": false}]},
            "runtime": {"kind": "vllm", "ready": true, "waiting": 7, "kv_cache_usage_permille": 500},
            "jobs": {"completed": 0, "failed": 0, "rejected": 0, "handed_back": 0,
                "in_flight": 0, "outbox": 0},
            "verdict": {"eligible": false, "score": 120, "penalty": 300,
                "suspended_until_ms": suspended_until_ms},
            "draining": false, "drained": false, "software": {"sidecar_version": "t"}
        }))
        .unwrap_or_else(|e| panic!("status fixture: {e}"))
    }

    fn scrape(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry)
            .unwrap_or_else(|e| panic!("encode: {e}"));
        out
    }

    #[test]
    fn scrape_mirrors_the_status_document_and_forgets_what_went_away() {
        let m = Metrics::default();
        let two = json!([
            {"model": {"id": "a", "revision": "1"}, "state": "active"},
            {"model": {"id": "b", "revision": "1"}, "state": "failed", "reason": "oom"}
        ]);
        m.refresh(&status(two, 2_000), true, 1_000);
        let text = scrape(&m);
        for line in [
            "resultity_sidecar_network_suspended 1",
            "resultity_sidecar_network_eligible 0",
            "resultity_sidecar_network_score 120",
            "resultity_sidecar_network_penalty 300",
            "resultity_sidecar_config_in_sync 1",
            "resultity_sidecar_models{state=\"failed\"} 1",
            "resultity_sidecar_model_state{model=\"b\",revision=\"1\",state=\"failed\"} 1",
            "resultity_sidecar_gpu_healthy{gpu=\"0\",uuid=\"GPU-9\"} 0",
            "resultity_sidecar_gpu_memory_used_bytes{gpu=\"0\",uuid=\"GPU-9\"} 1048576",
            "resultity_sidecar_gpu_utilization_ratio{gpu=\"0\",uuid=\"GPU-9\"} 0.4",
            "resultity_sidecar_runtime_waiting_requests 7",
            "resultity_sidecar_runtime_kv_cache_usage_ratio 0.5",
            "resultity_sidecar_phase{phase=\"Ready\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        // The suspension ended and model b was removed: both disappear from the next scrape.
        let one = json!([{"model": {"id": "a", "revision": "1"}, "state": "active"}]);
        m.refresh(&status(one, 2_000), true, 3_000);
        let text = scrape(&m);
        assert!(
            text.contains("resultity_sidecar_network_suspended 0"),
            "{text}"
        );
        assert!(!text.contains("model=\"b\""), "{text}");
        assert!(
            text.contains("resultity_sidecar_models{state=\"failed\"} 0"),
            "{text}"
        );
    }

    /// Without a GPU there are no per-GPU series, so the "no GPU visible" alert needs gauges
    /// that exist anyway: whether a GPU is seen, and whether the node needs one.
    #[test]
    fn gpu_visibility_is_exported_without_a_gpu() {
        let m = Metrics::default();
        let mut s = status(json!([]), 0);
        s.gpu = resultity_protocol::messages::GpuReport {
            present: false,
            reason: Some("NVML not found".into()),
            ..Default::default()
        };
        m.refresh(&s, true, 1_000);
        let text = scrape(&m);
        assert!(text.contains("resultity_sidecar_gpu_present 0"), "{text}");
        assert!(text.contains("resultity_sidecar_gpu_required 1"), "{text}");
        assert!(!text.contains("resultity_sidecar_gpu_healthy{"), "{text}");
        // A CPU node (GPU checks off) says so, and an alert can leave it alone.
        m.refresh(&s, false, 2_000);
        let text = scrape(&m);
        assert!(text.contains("resultity_sidecar_gpu_required 0"), "{text}");
    }

    #[test]
    fn job_latency_is_labelled_by_the_reported_outcome() {
        let m = Metrics::default();
        let fail = |code| NodeMessage::JobFail {
            job_id: resultity_protocol::JobId::parse("j-1").unwrap_or_else(|e| panic!("{e}")),
            lease_epoch: 1,
            code,
            reason: "x".into(),
            refusal: None,
        };
        m.job_latency(&fail(FailCode::HandedBack), Duration::from_millis(30));
        m.job_latency(&fail(FailCode::RuntimeError), Duration::from_secs(2));
        let text = scrape(&m);
        assert!(
            text.contains(
                "resultity_sidecar_job_duration_seconds_count{outcome=\"handed_back\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("resultity_sidecar_job_duration_seconds_count{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(!text.contains("outcome=\"completed\""), "{text}");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
