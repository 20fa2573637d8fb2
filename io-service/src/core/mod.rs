//! The network's state machine: node registry, job table and scheduler, behind one lock.
//!
//! Every method is synchronous and short; sends towards sessions are `try_send` on bounded
//! channels, so the lock is never held across an await. A node that cannot take a message
//! (channel full or closed) simply does not ack, and the ack timeout reassigns the job.
//! Time is an argument (`now`, in ms) of every method that depends on it, so the whole state
//! machine runs under a manual clock in tests.
//!
//! One [`Core`], in parts with one job each:
//! * `admission` — registration challenges, replay of signed HTTP requests, revoked keys,
//!   per-node HTTP rate limits;
//! * `registry` — registered nodes, their reports, sessions, credits and drain;
//! * `jobs` — the job table: submission, acks, results bound to their lease, failures,
//!   streamed chunks, leases taken back, jobs finished;
//! * `scheduling` — eligibility, score, dispatch within credits, and the clock: ack
//!   timeouts, deadlines, resume windows, reassignment;
//! * `penalties` — failure causes, incidents, the decaying penalty and exclusions;
//! * `views` — node and job views, counts and gauges.
//!
//! Scheduling rules:
//! * eligibility — connected, fresh heartbeat, not draining, not suspended or revoked,
//!   participation accepts the environment, runtime ready and GPUs healthy, and for the job's
//!   model: approved, active on the node, runtime allowed, enough GPU memory, subcloud admitted;
//! * never more outstanding (unacked or running) jobs on a node than its credits;
//! * score = free-credit share + latency EWMA (the fleet's median for a node with none yet) +
//!   decaying penalty, 0–1000; among the eligible nodes with free credits one is drawn with
//!   weight `exp((score − best) / choice_temperature)`, so equal nodes share the load and a
//!   slow or penalized node gets less;
//! * ack timeout / execution deadline / invalid result → the lease is taken back, the node is
//!   penalized, the job is reassigned with `lease_epoch + 1` up to `max_attempts`; repeated
//!   failures suspend the node for a cooldown.

mod admission;
mod jobs;
mod penalties;
mod registry;
mod scheduling;
#[cfg(test)]
mod testkit;
mod views;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use resultity_protocol::config::{ConfigDigest, NetworkConfig};
use resultity_protocol::messages::ConfigPointer;
use resultity_protocol::messages::ws::NetworkMessage;
use resultity_protocol::{ErrorCode, JobId, NodeId};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::settings::{Limits, SchedulerSettings};

use admission::Admission;
use jobs::Job;
pub use jobs::{CompletedJob, JobOutcome, JobSpec};
pub use penalties::{FailureCause, PenaltyPolicy};
use registry::NodeRecord;
pub use views::{CoreStats, JobView, NodeView};

/// A message the core wants a session task to seal and send, or a request to close it.
#[derive(Debug, Clone)]
pub enum Outbound {
    Msg(NetworkMessage),
    Close(u16, String),
}

/// The open session of a node.
#[derive(Debug, Clone)]
pub struct SessionLink {
    pub session_id: String,
    pub tx: mpsc::Sender<Outbound>,
}

/// A rejection the session answers with an `error` message.
pub type Refusal = (ErrorCode, String);

/// Token bucket (per node for HTTP, per session for WebSocket).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    tokens: f64,
    last_ms: u64,
    rate_per_ms: f64,
    burst: f64,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: f64, now_ms: u64) -> Self {
        Self {
            tokens: burst,
            last_ms: now_ms,
            rate_per_ms: rate_per_s / 1000.0,
            burst,
        }
    }

    /// Tokens the bucket would hold at `now`, without taking one.
    pub fn refilled_by(&mut self, now_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        (self.tokens + elapsed * self.rate_per_ms).min(self.burst)
    }

    /// Gives back the token of a message that turned out to be bounded otherwise.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Takes one token; false when the bucket is empty.
    pub fn allow(&mut self, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed * self.rate_per_ms).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Registry, jobs, scheduler and replay state. State that one part alone uses lives in that
/// part's own type (admission's replay state, each node's penalty state); what several parts
/// share — the config, nodes, jobs and the queue — lives here.
#[derive(Debug)]
pub struct Core {
    sched: SchedulerSettings,
    limits: Limits,
    metrics: Metrics,
    config: Arc<NetworkConfig>,
    /// Digest of the published snapshot, and of the one it replaced: a node that has not
    /// applied the newest yet is still assigned work under the previous one.
    config_digest: ConfigDigest,
    previous_digest: Option<ConfigDigest>,
    admission: Admission,
    nodes: HashMap<NodeId, NodeRecord>,
    jobs: HashMap<JobId, Job>,
    /// Jobs waiting for a node, retries first.
    queue: VecDeque<JobId>,
    /// Finished jobs, oldest first, kept for `job_view` up to `finished_history`.
    finished: VecDeque<JobId>,
    /// Draws for the weighted node choice; seeded from the settings in tests.
    rng: scheduling::ChoiceRng,
}

impl Core {
    pub fn new(
        sched: SchedulerSettings,
        limits: Limits,
        metrics: Metrics,
        config: Arc<NetworkConfig>,
        config_digest: ConfigDigest,
    ) -> Self {
        let rng = scheduling::ChoiceRng::new(sched.choice_seed);
        Self {
            sched,
            limits,
            metrics,
            admission: Admission::new(&config),
            config,
            config_digest,
            previous_digest: None,
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            finished: VecDeque::new(),
            rng,
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Installs a newly published payload: revoked nodes are disconnected, every connected
    /// node is told that a new snapshot is available.
    pub fn set_config(&mut self, config: Arc<NetworkConfig>, pointer: &ConfigPointer, now: u64) {
        self.admission.set_revoked(&config);
        self.config = config;
        if self.config_digest != pointer.digest {
            let old = std::mem::replace(&mut self.config_digest, pointer.digest.clone());
            self.previous_digest = Some(old);
        }
        let revoked: Vec<NodeId> = self
            .nodes
            .keys()
            .filter(|id| self.is_revoked(id))
            .cloned()
            .collect();
        for id in revoked {
            self.remove_node(
                &id,
                resultity_protocol::codes::close::AUTH_FAILED,
                "node key revoked",
                now,
            );
        }
        for node in self.nodes.values() {
            if let Some(link) = &node.session {
                let _ = link
                    .tx
                    .try_send(Outbound::Msg(NetworkMessage::ConfigAvailable(
                        pointer.clone(),
                    )));
            }
        }
        self.dispatch(now);
    }

    /// Queues a message for the node's session, if it has one (dropped when the channel is
    /// full: the ack timeout or the node's resend covers it).
    pub(super) fn send(&self, node: &NodeId, msg: NetworkMessage) {
        if let Some(link) = self.nodes.get(node).and_then(|r| r.session.as_ref()) {
            let _ = link.tx.try_send(Outbound::Msg(msg));
        }
    }
}

fn not_registered(node: &NodeId) -> Refusal {
    (
        ErrorCode::NotRegistered,
        format!("node {node} is not registered"),
    )
}

fn not_assigned(job: &JobId) -> Refusal {
    (
        ErrorCode::NotAssigned,
        format!("job {job} is not assigned to this node"),
    )
}

fn ms_to_s(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Bounds peer-provided text before it is logged or stored.
pub fn clip(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_a_burst_then_refills() {
        let mut r = RateLimiter::new(10.0, 3.0, 1_000);
        assert!((0..3).all(|_| r.allow(1_000)));
        assert!(!r.allow(1_000));
        assert!(!r.allow(1_050), "half a token after 50 ms");
        assert!(r.allow(1_100));
        // Refill is capped at the burst.
        assert!((0..3).all(|_| r.allow(100_000)));
        assert!(!r.allow(100_000));
        // A clock going backwards neither panics nor mints tokens.
        assert!(!r.allow(0));
    }

    #[test]
    fn clip_bounds_peer_text_on_char_boundaries() {
        let s = "é".repeat(300);
        let c = clip(&s);
        assert!(c.len() <= 200);
        assert!(s.starts_with(&c));
    }
}
