//! What the service is started with. Timing that nodes must follow (heartbeat interval, ack
//! timeout, resume window) lives in the signed network config, so it can be retuned live; the
//! numbers here are the service's own limits and scheduler tuning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use resultity_protocol::clock::{Clock, SystemClock};
use resultity_protocol::config::NetworkConfig;
use resultity_protocol::{NetworkId, NetworkKeypair, limits};

/// Resource bounds: every queue, buffer and table the service keeps has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Largest WebSocket message accepted from a node.
    pub max_frame_bytes: usize,
    /// Open TCP connections; further clients wait in the kernel backlog.
    pub max_connections: usize,
    /// Concurrent HTTP requests (WebSocket upgrades included) before 503.
    pub max_http_concurrency: usize,
    /// Open node sessions before new ones are refused.
    pub max_sessions: usize,
    /// Jobs waiting for a node before callers get 429.
    pub max_queue: usize,
    /// Outstanding registration challenges.
    pub max_challenges: usize,
    /// Signed HTTP requests per second per node (token bucket refill).
    pub node_http_rate_per_s: f64,
    pub node_http_burst: f64,
    /// Registration challenges per second per client IP (unauthenticated endpoint: without
    /// this a flood from one address fills the bounded challenge store). Generous, because a
    /// fleet behind one NAT re-registers through one address after an outage.
    pub challenge_rate_per_ip_per_s: f64,
    pub challenge_burst_per_ip: f64,
    /// Client IPs whose challenge buckets are tracked at once.
    pub max_tracked_ips: usize,
    /// WebSocket messages per second per session.
    pub ws_msg_rate_per_s: f64,
    pub ws_msg_burst: f64,
    /// Per-connection WebSocket read buffer: tungstenite's default of 128 KiB per socket
    /// would make ten thousand idle sessions cost 1.3 GB.
    pub ws_read_buffer_bytes: usize,
    /// Messages queued towards one session before sends are dropped (jobs then time out).
    pub session_outbound: usize,
    /// Handshake: `auth` must arrive within this after `hello`.
    pub auth_timeout_ms: u64,
    /// A request's headers must be complete within this after its first byte (slow-loris).
    pub header_timeout_ms: u64,
    /// A request's body must be complete within this after its headers.
    pub body_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: limits::MAX_ENVELOPE_BYTES,
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            max_connections: 20_000,
            max_http_concurrency: 4096,
            max_sessions: 10_000,
            max_queue: 1024,
            max_challenges: 10_000,
            node_http_rate_per_s: 5.0,
            node_http_burst: 20.0,
            challenge_rate_per_ip_per_s: 20.0,
            challenge_burst_per_ip: 100.0,
            max_tracked_ips: 100_000,
            ws_msg_rate_per_s: 500.0,
            ws_msg_burst: 1000.0,
            ws_read_buffer_bytes: 4096,
            session_outbound: 256,
            auth_timeout_ms: limits::AUTH_TIMEOUT_MS,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
        }
    }
}

/// Scheduler tuning.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// How often timeouts are checked and queued jobs retried.
    pub tick_ms: u64,
    /// Execution deadline of one attempt, from assignment.
    pub attempt_timeout_ms: u64,
    /// How long a caller waits for its job in total before `timeout`.
    pub request_timeout_ms: u64,
    /// Attempts (assignments) per job before it fails for good.
    pub max_attempts: u32,
    /// A node is excluded when its last heartbeat is older than this many intervals.
    pub heartbeat_miss_factor: u64,
    /// Penalties halve every this many ms.
    pub penalty_half_life_ms: u64,
    /// Consecutive failed incidents (timeouts, invalid results) before temporary exclusion.
    pub exclude_after_failures: u32,
    /// How long an exclusion lasts.
    pub exclusion_cooldown_ms: u64,
    /// Failures of one cause within this window of the first are one incident.
    pub incident_window_ms: u64,
    /// Invalid signatures within one session before it is closed.
    pub max_invalid_signatures: u32,
    /// Latency at which the latency part of the score is halved.
    pub latency_ref_ms: f64,
    /// Finished jobs kept for `GET /v1/jobs/{id}`.
    pub finished_history: usize,
    /// Largest output a node may return.
    pub max_output_bytes: u32,
    /// How sharply the choice among eligible nodes follows the score: a node's chance is
    /// weighted by `exp((score − best score) / choice_temperature)`, so every this many points
    /// below the best divide its weight by e. 0 always picks the best score.
    pub choice_temperature: f64,
    /// Seed of the node choice's random draws; `None` seeds from the process's entropy.
    /// Tests set it so that a run is reproducible.
    pub choice_seed: Option<u64>,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            attempt_timeout_ms: 120_000,
            request_timeout_ms: 300_000,
            max_attempts: 3,
            heartbeat_miss_factor: 3,
            penalty_half_life_ms: 60_000,
            exclude_after_failures: 3,
            exclusion_cooldown_ms: 60_000,
            incident_window_ms: 5_000,
            max_invalid_signatures: 5,
            latency_ref_ms: 1_000.0,
            finished_history: 10_000,
            max_output_bytes: u32::try_from(limits::MAX_ENVELOPE_BYTES / 2).unwrap_or(u32::MAX),
            choice_temperature: 20.0,
            choice_seed: None,
        }
    }
}

/// Everything [`crate::IoService::start`] needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub network_id: NetworkId,
    pub network_key: NetworkKeypair,
    /// The key to rotate to: at start the service publishes a rotation (signed by
    /// `network_key`) naming it active and `network_key` retiring for `key_overlap_ms`.
    pub next_network_key: Option<NetworkKeypair>,
    /// How long a retiring key stays trusted, so nodes that have not fetched the rotation
    /// keep working; the service signs with the old key until it ends.
    pub key_overlap_ms: u64,
    /// Payload of the first published snapshot.
    pub network_config: NetworkConfig,
    /// File the payload was read from; `reload` re-reads it.
    pub config_source: Option<PathBuf>,
    /// Where the published snapshot is persisted, so a restart continues its version chain
    /// instead of re-issuing version 1 (which nodes refuse as a rollback).
    pub config_state: Option<PathBuf>,
    /// Bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<String>,
    /// Lifetime of a signed snapshot; it is re-signed (next version) at half-life.
    pub config_ttl_ms: u64,
    pub limits: Limits,
    pub scheduler: SchedulerSettings,
    pub clock: Arc<dyn Clock>,
}

impl Settings {
    /// The private keys the service holds, the one it started with first.
    pub fn held_keys(&self) -> Vec<&NetworkKeypair> {
        std::iter::once(&self.network_key)
            .chain(self.next_network_key.as_ref())
            .collect()
    }

    /// Defaults around the three things that have none.
    pub fn new(
        network_id: NetworkId,
        network_key: NetworkKeypair,
        network_config: NetworkConfig,
    ) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            network_id,
            network_key,
            next_network_key: None,
            key_overlap_ms: 24 * 3600 * 1000,
            network_config,
            config_source: None,
            config_state: None,
            admin_token: None,
            config_ttl_ms: 7 * 24 * 3600 * 1000,
            limits: Limits::default(),
            scheduler: SchedulerSettings::default(),
            clock: Arc::new(SystemClock),
        }
    }
}
