//! The local API on the sidecar's admin port: `/healthz` and `/readyz` for kubelet probes,
//! `/metrics` for Prometheus, and — behind the bearer token — `/status` (the shared status
//! document the operator pulls) and `POST /drain`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use resultity_protocol::status::NodeStatus;
use serde_json::json;
use tokio::sync::watch;

use crate::readiness::Readiness;

/// Outcome label of the jobs counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// The sidecar's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub jobs: Family<OutcomeLabel, Counter>,
    pub in_flight: Gauge,
    pub outbox: Gauge,
    pub connected: Gauge,
    pub runtime_ready: Gauge,
    pub config_version: Gauge,
    pub reconnects: Counter,
    pub messages_rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("resultity_sidecar");
        let m = Self {
            jobs: Family::default(),
            in_flight: Gauge::default(),
            outbox: Gauge::default(),
            connected: Gauge::default(),
            runtime_ready: Gauge::default(),
            config_version: Gauge::default(),
            reconnects: Counter::default(),
            messages_rejected: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs finished, by outcome", m.jobs.clone());
        registry.register("jobs_in_flight", "Jobs running now", m.in_flight.clone());
        registry.register(
            "outbox_results",
            "Results awaiting confirmation",
            m.outbox.clone(),
        );
        registry.register(
            "connected",
            "1 while the network session is up",
            m.connected.clone(),
        );
        registry.register(
            "runtime_ready",
            "1 while the runtime is ready",
            m.runtime_ready.clone(),
        );
        registry.register(
            "config_version",
            "Applied config version",
            m.config_version.clone(),
        );
        registry.register(
            "reconnects",
            "Network session reconnects",
            m.reconnects.clone(),
        );
        registry.register(
            "messages_rejected",
            "Network messages refused (signature, replay, addressing)",
            m.messages_rejected.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn job(&self, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
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
    admin_token: String,
    /// What `/readyz` and the phase are computed from; logs each change.
    pub readiness: Readiness,
}

impl ApiState {
    pub fn new(status: NodeStatus, admin_token: String) -> Arc<Self> {
        let (drain, _) = watch::channel(false);
        Arc::new(Self {
            status: Mutex::new(status),
            metrics: Metrics::default(),
            drain,
            deregister: std::sync::atomic::AtomicBool::new(false),
            admin_token,
            readiness: Readiness::default(),
        })
    }

    /// Whether a drain request asked to deregister from the network afterwards.
    pub fn deregister_requested(&self) -> bool {
        self.deregister.load(std::sync::atomic::Ordering::SeqCst)
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
        self.readiness.observe(&problems);
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
                    axum::Json(json!({"error": format!("unknown drain parameter {other:?}; use deregister=true|false")})),
                )
                    .into_response();
            }
        }
    }
    if deregister {
        s.deregister
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
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

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
