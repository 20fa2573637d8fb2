//! Prometheus metrics (prometheus-client). Rejection counters are pre-registered for every
//! error code so dashboards see zeros rather than missing series.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use resultity_protocol::ErrorCode;

/// Where a rejection happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Http,
    Ws,
    Api,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Ws => "ws",
            Self::Api => "api",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RejectLabels {
    channel: &'static str,
    reason: &'static str,
}

/// Every metric the service exports; cheap to clone (all handles are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub nodes_registered: Gauge,
    pub nodes_connected: Gauge,
    pub nodes_eligible: Gauge,
    pub jobs_queued: Gauge,
    pub jobs_in_flight: Gauge,
    pub jobs_submitted: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Counter,
    pub jobs_reassigned: Counter,
    pub stale_results: Counter,
    pub duplicate_results: Counter,
    pub stream_chunks: Counter,
    pub configs_published: Counter,
    rejections: Family<RejectLabels, Counter>,
    /// Submission to first assignment, seconds.
    pub dispatch_latency: Histogram,
    /// Submission to verified result, seconds.
    pub end_to_end_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("resultity_io");
        let m = Self {
            registry: Arc::new(Registry::default()),
            nodes_registered: Gauge::default(),
            nodes_connected: Gauge::default(),
            nodes_eligible: Gauge::default(),
            jobs_queued: Gauge::default(),
            jobs_in_flight: Gauge::default(),
            jobs_submitted: Counter::default(),
            jobs_completed: Counter::default(),
            jobs_failed: Counter::default(),
            jobs_reassigned: Counter::default(),
            stale_results: Counter::default(),
            duplicate_results: Counter::default(),
            stream_chunks: Counter::default(),
            configs_published: Counter::default(),
            rejections: Family::default(),
            dispatch_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            end_to_end_latency: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
        };
        r.register(
            "nodes_registered",
            "Registered nodes",
            m.nodes_registered.clone(),
        );
        r.register(
            "nodes_connected",
            "Nodes with an open WebSocket session",
            m.nodes_connected.clone(),
        );
        r.register(
            "nodes_eligible",
            "Nodes the scheduler would route jobs to now",
            m.nodes_eligible.clone(),
        );
        r.register(
            "jobs_queued",
            "Jobs waiting for a node",
            m.jobs_queued.clone(),
        );
        r.register(
            "jobs_in_flight",
            "Jobs assigned to a node and not finished",
            m.jobs_in_flight.clone(),
        );
        r.register(
            "jobs_submitted",
            "Jobs accepted from callers",
            m.jobs_submitted.clone(),
        );
        r.register(
            "jobs_completed",
            "Jobs finished with a verified result",
            m.jobs_completed.clone(),
        );
        r.register(
            "jobs_failed",
            "Jobs that failed for good",
            m.jobs_failed.clone(),
        );
        r.register(
            "jobs_reassigned",
            "Assignments taken back and given to another attempt",
            m.jobs_reassigned.clone(),
        );
        r.register(
            "stale_results",
            "Results refused because their lease_epoch was superseded",
            m.stale_results.clone(),
        );
        r.register(
            "duplicate_results",
            "Results received again after confirmation (confirmed again)",
            m.duplicate_results.clone(),
        );
        r.register(
            "stream_chunks",
            "Stream chunks accepted from nodes and forwarded to callers",
            m.stream_chunks.clone(),
        );
        r.register(
            "configs_published",
            "Config snapshots signed and published",
            m.configs_published.clone(),
        );
        r.register(
            "rejections",
            "Refused requests and messages by channel and reason",
            m.rejections.clone(),
        );
        r.register(
            "dispatch_latency_seconds",
            "Submission to first assignment",
            m.dispatch_latency.clone(),
        );
        r.register(
            "end_to_end_latency_seconds",
            "Submission to verified result",
            m.end_to_end_latency.clone(),
        );
        for ch in [Channel::Http, Channel::Ws, Channel::Api] {
            for code in ErrorCode::ALL {
                let _ = m.rejections.get_or_create(&RejectLabels {
                    channel: ch.as_str(),
                    reason: code.as_str(),
                });
            }
        }
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Counts one rejection.
    pub fn reject(&self, channel: Channel, code: ErrorCode) {
        self.rejections
            .get_or_create(&RejectLabels {
                channel: channel.as_str(),
                reason: code.as_str(),
            })
            .inc();
    }

    /// Rejections counted so far for one channel and reason (tests, `/v1/nodes` summaries).
    pub fn rejections(&self, channel: Channel, code: ErrorCode) -> u64 {
        self.rejections
            .get_or_create(&RejectLabels {
                channel: channel.as_str(),
                reason: code.as_str(),
            })
            .get()
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String only fails if a metric's encoder fails, which ours do not.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
