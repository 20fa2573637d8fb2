//! The network's state machine: node registry, job table and scheduler, behind one lock.
//!
//! Every method is synchronous and short; sends towards sessions are `try_send` on bounded
//! channels, so the lock is never held across an await. A node that cannot take a message
//! (channel full or closed) simply does not ack, and the ack timeout reassigns the job.
//!
//! Scheduling rules:
//! * eligibility — connected, fresh heartbeat, not draining, not suspended or revoked,
//!   participation accepts the environment, runtime ready and GPUs healthy, and for the job's
//!   model: approved, active on the node, runtime allowed, enough GPU memory, subcloud admitted;
//! * never more outstanding (unacked or running) jobs on a node than its credits;
//! * score = free-credit share + latency EWMA + decaying penalty, 0–1000;
//! * ack timeout / execution deadline / invalid result → the lease is taken back, the node is
//!   penalized, the job is reassigned with `lease_epoch + 1` up to `max_attempts`; repeated
//!   failures suspend the node for a cooldown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use resultity_protocol::config::{ConfigDigest, NetworkConfig};
use resultity_protocol::messages::http::NodeReport;
use resultity_protocol::messages::http::{Capabilities, RegisterRequest};
use resultity_protocol::messages::ws::{JobAssignment, JobResult, NetworkMessage, RuntimeRefusal};
use resultity_protocol::messages::{
    ConfigPointer, FailCode, JobKind, ModelRef, ModelState, RuntimeKind, Usage, Verdict,
};
use resultity_protocol::replay::NonceStore;
use resultity_protocol::{ErrorCode, JobId, NodeId, ProtocolError};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::settings::{Limits, SchedulerSettings};
use crate::stream::{StreamSink, StreamState};

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

    /// Takes one token; false when the bucket is empty.
    /// Gives back the token of a message that turned out to be bounded otherwise.
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

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

/// What the network knows of one registered node.
#[derive(Debug)]
pub struct NodeRecord {
    pub id: NodeId,
    pub key: VerifyingKey,
    pub registered_at_ms: u64,
    pub capabilities: Capabilities,
    pub protocol_version: u32,
    pub report: Option<NodeReport>,
    pub last_heartbeat_ms: Option<u64>,
    pub session: Option<SessionLink>,
    pub disconnected_at_ms: Option<u64>,
    pub max_concurrency: u32,
    /// Free slots and in-flight jobs as last reported (auth, `credits`), adjusted by the
    /// results received since, so a node that reports rarely is neither over- nor under-fed.
    pub reported_credits: u32,
    pub reported_in_flight: u32,
    pub draining: bool,
    pub drained: bool,
    /// Jobs assigned to this node and not finished (unacked or running).
    pub outstanding: HashSet<JobId>,
    /// Jobs taken back from this node that it may still be running: they keep occupying a
    /// credit until the node says otherwise (a `credits` report, a new session, or a late
    /// result/fail for them), so a reassignment never pushes a node past its credits.
    pub cancelled: HashSet<JobId>,
    pub max_outstanding_seen: u32,
    pub latency_ewma_ms: Option<f64>,
    penalty: f64,
    penalty_at_ms: u64,
    pub penalty_reason: Option<String>,
    /// Failed incidents in a row (reset by a completed job or a suspension).
    pub consecutive_failures: u32,
    /// Open incidents: cause → when it was first charged.
    incidents: HashMap<FailureCause, u64>,
    pub suspended_until_ms: Option<u64>,
    pub invalid_signatures: u64,
    pub completed: u64,
    pub failed: u64,
    pub http_rate: RateLimiter,
}

impl NodeRecord {
    fn new(
        node: &NodeId,
        key: VerifyingKey,
        capabilities: &Capabilities,
        version: u32,
        limits: &Limits,
        now: u64,
    ) -> Self {
        NodeRecord {
            id: node.clone(),
            key,
            registered_at_ms: now,
            capabilities: capabilities.clone(),
            protocol_version: version,
            report: None,
            last_heartbeat_ms: None,
            session: None,
            disconnected_at_ms: None,
            max_concurrency: capabilities.max_concurrency,
            reported_credits: 0,
            reported_in_flight: 0,
            draining: false,
            drained: false,
            outstanding: HashSet::new(),
            cancelled: HashSet::new(),
            max_outstanding_seen: 0,
            latency_ewma_ms: None,
            penalty: 0.0,
            penalty_at_ms: now,
            penalty_reason: None,
            consecutive_failures: 0,
            incidents: HashMap::new(),
            suspended_until_ms: None,
            invalid_signatures: 0,
            completed: 0,
            failed: 0,
            http_rate: RateLimiter::new(limits.node_http_rate_per_s, limits.node_http_burst, now),
        }
    }

    /// Penalty after decay, 0–1000.
    pub fn penalty_at(&self, now_ms: u64, half_life_ms: u64) -> f64 {
        if self.penalty <= 0.0 {
            return 0.0;
        }
        let age = now_ms.saturating_sub(self.penalty_at_ms) as f64;
        self.penalty * 0.5f64.powf(age / half_life_ms.max(1) as f64)
    }

    /// Slots the scheduler may still fill: bounded by the node's concurrency and by its
    /// reported credits minus what was assigned since that report.
    pub fn free_slots(&self) -> u32 {
        if self.session.is_none() || self.draining {
            return 0;
        }
        let busy = self.outstanding.len() + self.cancelled.len();
        let outstanding = u32::try_from(busy).unwrap_or(u32::MAX);
        let by_cap = self.max_concurrency.saturating_sub(outstanding);
        let uncounted = outstanding.saturating_sub(self.reported_in_flight);
        let by_credits = self.reported_credits.saturating_sub(uncounted);
        by_cap.min(by_credits)
    }

    fn job_finished(&mut self, job: &JobId) {
        if self.outstanding.remove(job) || self.cancelled.remove(job) {
            self.reported_in_flight = self.reported_in_flight.saturating_sub(1);
            self.reported_credits = (self.reported_credits + 1).min(self.max_concurrency);
        }
    }
}

/// What a caller asked for.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub model: ModelRef,
    pub kind: JobKind,
    pub request: serde_json::Value,
    /// Where a streamed job's events go as they arrive (`None`: answered once).
    pub stream: Option<StreamSink>,
}

/// What the caller gets back.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Completed(CompletedJob),
    Failed {
        code: ErrorCode,
        reason: String,
        /// The runtime's own refusal, answered to the caller as is.
        refusal: Option<RuntimeRefusal>,
    },
}

/// A verified result.
#[derive(Debug, Clone)]
pub struct CompletedJob {
    pub job_id: JobId,
    pub node_id: NodeId,
    pub lease_epoch: u64,
    pub attempts: u32,
    pub output: String,
    pub usage: Usage,
    /// The result's signature verified against the session's node key (results that do not
    /// verify are never accepted, so this is always true; it is reported for callers).
    pub verified: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Lease {
    node: NodeId,
    /// Config the node must run this lease under (sent in `job.assign`, checked on the result).
    config_digest: ConfigDigest,
    assigned_ms: u64,
    acked: bool,
    ack_deadline_ms: u64,
    exec_deadline_ms: u64,
}

#[derive(Debug, Clone)]
enum JobState {
    Queued,
    Assigned(Lease),
    Completed { node: NodeId, epoch: u64 },
    Failed { code: ErrorCode, reason: String },
}

#[derive(Debug)]
struct Job {
    id: JobId,
    spec: JobSpec,
    created_ms: u64,
    deadline_ms: u64,
    state: JobState,
    lease_epoch: u64,
    attempts: u32,
    /// Every (node, epoch) this job was leased to: tells stale leases from foreign jobs.
    leases: Vec<(NodeId, u64)>,
    waiter: Option<oneshot::Sender<JobOutcome>>,
    finished_ms: Option<u64>,
    last_error: Option<String>,
    /// A streamed job's chunk state (dropped when the job finishes, which ends the stream).
    stream: Option<StreamState>,
    /// The runtime's refusal that failed the job, for the caller.
    refusal: Option<RuntimeRefusal>,
}

/// `GET /v1/nodes` entry.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node_id: NodeId,
    pub connected: bool,
    pub eligible: bool,
    pub reason: Option<String>,
    pub score: u32,
    pub penalty: u32,
    pub penalty_reason: Option<String>,
    pub suspended_until_ms: Option<u64>,
    pub max_concurrency: u32,
    pub free_slots: u32,
    pub outstanding: u32,
    pub max_outstanding_seen: u32,
    pub latency_ewma_ms: Option<f64>,
    pub completed: u64,
    pub failed: u64,
    pub invalid_signatures: u64,
    pub last_heartbeat_ms: Option<u64>,
    pub draining: bool,
    pub config: Option<ConfigPointer>,
    pub active_models: Vec<ModelRef>,
}

/// `GET /v1/jobs/{id}` body.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub job_id: JobId,
    pub model: ModelRef,
    pub kind: JobKind,
    pub state: &'static str,
    pub lease_epoch: u64,
    pub attempts: u32,
    pub node_id: Option<NodeId>,
    pub nodes_tried: Vec<NodeId>,
    pub error: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub verified: bool,
}

/// Counts for tests and dashboards.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CoreStats {
    pub nodes: usize,
    pub connected: usize,
    pub queued: usize,
    pub in_flight: usize,
    pub jobs: usize,
}

/// What a failure is blamed on; failures of one cause within the incident window are one
/// incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    AckTimeout,
    ExecutionDeadline,
    /// The node stayed away past the resume window with work in hand.
    Gone,
    InvalidResult,
    InvalidSignature,
    /// A `job.fail` whose code is the node's fault.
    Reported(FailCode),
}

/// Effective exclusion policy: the network config's, where it sets one, else the service's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyPolicy {
    pub exclude_after_failures: u32,
    pub exclusion_cooldown_ms: u64,
    pub incident_window_ms: u64,
}

const PENALTY_TIMEOUT: f64 = 400.0;
const PENALTY_INVALID_RESULT: f64 = 500.0;
const PENALTY_RUNTIME_ERROR: f64 = 200.0;
const PENALTY_INVALID_SIGNATURE: f64 = 300.0;
const PENALTY_MAX: f64 = 1000.0;

/// Registry, jobs, scheduler and replay state.
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
    revoked: HashSet<NodeId>,
    nodes: HashMap<NodeId, NodeRecord>,
    jobs: HashMap<JobId, Job>,
    queue: VecDeque<JobId>,
    finished: VecDeque<JobId>,
    nonces: NonceStore,
    /// challenge → (node it was issued to, expiry).
    challenges: HashMap<String, (NodeId, u64)>,
    /// Challenge rate limit per client IP.
    challenge_ips: HashMap<std::net::IpAddr, RateLimiter>,
}

impl Core {
    pub fn new(
        sched: SchedulerSettings,
        limits: Limits,
        metrics: Metrics,
        config: Arc<NetworkConfig>,
        config_digest: ConfigDigest,
    ) -> Self {
        let revoked = config.revoked_node_keys.iter().cloned().collect();
        Self {
            sched,
            limits,
            metrics,
            config,
            config_digest,
            previous_digest: None,
            revoked,
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            finished: VecDeque::new(),
            nonces: NonceStore::default(),
            challenges: HashMap::new(),
            challenge_ips: HashMap::new(),
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The exclusion thresholds in force: the network config's `penalties`, field by field,
    /// over the service's own settings.
    pub fn penalty_policy(&self) -> PenaltyPolicy {
        let p = self.config.penalties.as_ref();
        PenaltyPolicy {
            exclude_after_failures: p
                .and_then(|p| p.exclude_after_failures)
                .unwrap_or(self.sched.exclude_after_failures)
                .max(1),
            exclusion_cooldown_ms: p
                .and_then(|p| p.exclusion_cooldown_ms)
                .unwrap_or(self.sched.exclusion_cooldown_ms),
            incident_window_ms: p
                .and_then(|p| p.incident_window_ms)
                .unwrap_or(self.sched.incident_window_ms),
        }
    }

    /// The config digest a new lease on `node` runs under: the node's applied one while the
    /// network still accepts it (the newest, or the one it just replaced, so a publication
    /// does not fail the fleet's in-flight work), else the newest.
    fn assignment_digest(&self, node: &NodeId) -> ConfigDigest {
        let reported = self
            .nodes
            .get(node)
            .and_then(|r| r.report.as_ref())
            .and_then(|r| r.config.as_ref())
            .map(|p| &p.digest);
        match reported {
            Some(d) if self.previous_digest.as_ref() == Some(d) => d.clone(),
            _ => self.config_digest.clone(),
        }
    }

    /// Installs a newly published payload: revoked nodes are disconnected, every connected
    /// node is told that a new snapshot is available.
    pub fn set_config(&mut self, config: Arc<NetworkConfig>, pointer: &ConfigPointer, now: u64) {
        self.revoked = config.revoked_node_keys.iter().cloned().collect();
        self.config = config;
        if self.config_digest != pointer.digest {
            let old = std::mem::replace(&mut self.config_digest, pointer.digest.clone());
            self.previous_digest = Some(old);
        }
        let revoked: Vec<NodeId> = self
            .nodes
            .keys()
            .filter(|id| self.revoked.contains(*id))
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

    // ---- registration and HTTP ----

    /// Issues a single-use registration challenge bound to `node`.
    /// One challenge request from `ip`; false when its bucket is empty. Memory is bounded:
    /// when the table is full, buckets that refilled (idle addresses) are dropped, and if that
    /// frees nothing the table starts over.
    pub fn allow_challenge(&mut self, ip: std::net::IpAddr, now: u64) -> bool {
        let (rate, burst) = (
            self.limits.challenge_rate_per_ip_per_s,
            self.limits.challenge_burst_per_ip,
        );
        if !self.challenge_ips.contains_key(&ip)
            && self.challenge_ips.len() >= self.limits.max_tracked_ips
        {
            self.challenge_ips
                .retain(|_, b| b.clone().refilled_by(now) < burst);
            if self.challenge_ips.len() >= self.limits.max_tracked_ips {
                self.challenge_ips.clear();
            }
        }
        self.challenge_ips
            .entry(ip)
            .or_insert_with(|| RateLimiter::new(rate, burst, now))
            .allow(now)
    }

    pub fn issue_challenge(
        &mut self,
        node: &NodeId,
        challenge: String,
        ttl_ms: u64,
        now: u64,
    ) -> Result<u64, Refusal> {
        if self.challenges.len() >= self.limits.max_challenges {
            self.challenges.retain(|_, (_, exp)| *exp > now);
        }
        if self.challenges.len() >= self.limits.max_challenges {
            return Err((
                ErrorCode::RateLimited,
                "too many outstanding challenges".into(),
            ));
        }
        let expires = now.saturating_add(ttl_ms);
        self.challenges.insert(challenge, (node.clone(), expires));
        Ok(expires)
    }

    /// Consumes a challenge; true only if it was issued to `node` and has not expired.
    pub fn take_challenge(&mut self, challenge: &str, node: &NodeId, now: u64) -> bool {
        match self.challenges.remove(challenge) {
            Some((owner, exp)) => &owner == node && exp > now,
            None => false,
        }
    }

    /// Replay check of a signed HTTP request (after its signature verified).
    pub fn check_nonce(
        &mut self,
        node: &NodeId,
        ts_ms: u64,
        nonce: &str,
        now: u64,
    ) -> Result<(), ProtocolError> {
        self.nonces.check(node.as_str(), ts_ms, nonce, now)
    }

    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.revoked.contains(node)
    }

    /// Per-node HTTP rate limit; `NotRegistered` for unknown nodes.
    pub fn http_admit(&mut self, node: &NodeId, now: u64) -> Result<(), Refusal> {
        let rec = self.nodes.get_mut(node).ok_or((
            ErrorCode::NotRegistered,
            format!("node {node} is not registered"),
        ))?;
        if !rec.http_rate.allow(now) {
            return Err((
                ErrorCode::RateLimited,
                "too many requests from this node".into(),
            ));
        }
        Ok(())
    }

    pub fn register(
        &mut self,
        node: &NodeId,
        key: VerifyingKey,
        req: &RegisterRequest,
        version: u32,
        now: u64,
    ) {
        let limits = &self.limits;
        let rec = self
            .nodes
            .entry(node.clone())
            .or_insert_with(|| NodeRecord::new(node, key, &req.capabilities, version, limits, now));
        // Re-registration refreshes what the node offers but keeps its history (penalties
        // must not be shed by registering again).
        rec.capabilities = req.capabilities.clone();
        rec.max_concurrency = req.capabilities.max_concurrency;
        rec.protocol_version = version;
        self.metrics.nodes_registered.set(gauge(self.nodes.len()));
    }

    /// Stores a heartbeat report and returns the node's verdict.
    pub fn heartbeat(
        &mut self,
        node: &NodeId,
        report: NodeReport,
        now: u64,
    ) -> Result<Verdict, Refusal> {
        let rec = self.nodes.get_mut(node).ok_or((
            ErrorCode::NotRegistered,
            format!("node {node} is not registered"),
        ))?;
        rec.last_heartbeat_ms = Some(now);
        rec.max_concurrency = report.max_concurrency;
        rec.draining = report.draining;
        rec.report = Some(report);
        let verdict = self.verdict(node, now);
        self.dispatch(now);
        self.refresh_eligible_gauge(now);
        Ok(verdict)
    }

    pub fn verdict(&self, node: &NodeId, now: u64) -> Verdict {
        let Some(rec) = self.nodes.get(node) else {
            return Verdict::default();
        };
        let ready = self.node_ready(rec, now);
        let eligible = ready.is_ok() && !self.active_models(rec).is_empty();
        let reason = match (&ready, eligible) {
            (Err(r), _) => Some(r.clone()),
            (Ok(()), false) => {
                // Say why the first approved model is out, so operators can act on it.
                let why = self
                    .config
                    .models
                    .iter()
                    .find_map(|m| self.model_ok(rec, &m.model).err())
                    .unwrap_or_else(|| "the network approves no model".to_owned());
                Some(format!("no approved model is servable here: {why}"))
            }
            (Ok(()), true) => rec.penalty_reason.clone(),
        };
        Verdict {
            eligible,
            score: self.score(rec, now),
            penalty: self.penalty_u32(rec, now),
            reason,
            suspended_until_ms: rec.suspended_until_ms.filter(|t| *t > now),
        }
    }

    /// Deregistration: the node's open jobs go back to the queue without penalty.
    pub fn deregister(&mut self, node: &NodeId, now: u64) -> Result<(), Refusal> {
        if !self.nodes.contains_key(node) {
            return Err((
                ErrorCode::NotRegistered,
                format!("node {node} is not registered"),
            ));
        }
        self.remove_node(
            node,
            resultity_protocol::codes::close::EXCLUDED,
            "deregistered",
            now,
        );
        Ok(())
    }

    fn remove_node(&mut self, node: &NodeId, close_code: u16, why: &str, now: u64) {
        let Some(rec) = self.nodes.remove(node) else {
            return;
        };
        if let Some(link) = &rec.session {
            let _ = link
                .tx
                .try_send(Outbound::Close(close_code, why.to_owned()));
        }
        for job in rec.outstanding {
            self.take_back(&job, None, why, now);
        }
        self.metrics.nodes_registered.set(gauge(self.nodes.len()));
        self.dispatch(now);
    }

    // ---- sessions ----

    pub fn node_key(&self, node: &NodeId) -> Option<VerifyingKey> {
        self.nodes.get(node).map(|r| r.key)
    }

    /// Binds a new session to the node (superseding an older one) and queues the resend of
    /// every assignment the node has not acknowledged. Returns how many were resent.
    pub fn attach_session(
        &mut self,
        node: &NodeId,
        link: SessionLink,
        credits: u32,
        max_concurrency: u32,
        draining: bool,
        now: u64,
    ) -> Result<u32, Refusal> {
        let ack_timeout = self.config.timing.ack_timeout_ms;
        let rec = self.nodes.get_mut(node).ok_or((
            ErrorCode::NotRegistered,
            format!("node {node} is not registered"),
        ))?;
        if let Some(old) = rec.session.take() {
            let _ = old.tx.try_send(Outbound::Close(
                resultity_protocol::codes::close::SUPERSEDED,
                "a newer session replaced this one".into(),
            ));
        }
        rec.max_concurrency = max_concurrency;
        rec.reported_credits = credits.min(max_concurrency);
        // The node counts the jobs it still runs in its credits; unacked ones it never saw.
        rec.reported_in_flight = max_concurrency.saturating_sub(credits);
        rec.draining = draining;
        rec.disconnected_at_ms = None;
        // The node's auth counts what it still runs; cancelled jobs are in there.
        rec.cancelled.clear();
        let mut resent = 0;
        let max_out = self.sched.max_output_bytes;
        for job_id in &rec.outstanding {
            let Some(job) = self.jobs.get_mut(job_id) else {
                continue;
            };
            // Every lease the node still holds is resent, acked or not (spec §7.6): a node that
            // restarted lost what it was running and reruns it at once; one that kept running
            // deduplicates by (job, epoch) and acks again or resends its result.
            let (exec_deadline, digest) = match &mut job.state {
                JobState::Assigned(lease) => {
                    if !lease.acked {
                        lease.ack_deadline_ms = now.saturating_add(ack_timeout);
                    }
                    (lease.exec_deadline_ms, lease.config_digest.clone())
                }
                _ => continue,
            };
            let msg = assignment(job, exec_deadline, max_out, digest);
            let _ = link.tx.try_send(Outbound::Msg(msg));
            resent += 1;
        }
        rec.session = Some(link);
        self.refresh_gauges(now);
        self.refresh_eligible_gauge(now);
        self.dispatch(now);
        Ok(resent)
    }

    /// The session ended; its work is kept for the resume window.
    pub fn detach_session(&mut self, node: &NodeId, session_id: &str, now: u64) {
        if let Some(rec) = self.nodes.get_mut(node)
            && rec
                .session
                .as_ref()
                .is_some_and(|s| s.session_id == session_id)
        {
            rec.session = None;
            rec.disconnected_at_ms = Some(now);
            // Chunks sent while the session is down are lost, so a streamed lease cannot
            // resume: it restarts elsewhere, or fails if the caller already has a part.
            let streamed: Vec<JobId> = rec
                .outstanding
                .iter()
                .filter(|j| self.jobs.get(*j).is_some_and(|j| j.stream.is_some()))
                .cloned()
                .collect();
            for job_id in streamed {
                self.take_back(&job_id, Some(node), "node session ended mid-stream", now);
            }
            self.dispatch(now);
        }
        self.refresh_gauges(now);
        self.refresh_eligible_gauge(now);
    }

    /// A chunk of a streamed job arrived on the node's session. Returns the caller's sink and
    /// the events to forward (the session sends them outside the lock, waiting for room).
    /// A chunk that breaks the stream (order, limits) takes the lease back.
    pub fn on_chunk(
        &mut self,
        node: &NodeId,
        job_id: &JobId,
        epoch: u64,
        index: u32,
        events: Vec<String>,
        now: u64,
    ) -> Result<(StreamSink, Vec<String>), Refusal> {
        let job = self.jobs.get(job_id).ok_or_else(|| not_assigned(job_id))?;
        if let Err(refusal) = self.lease_check(job, node, epoch) {
            if refusal.0 == ErrorCode::StaleLease {
                // Still streaming a lease that was taken back (e.g. across a reconnect, when
                // the first cancel had no session to go to): stop it.
                self.send(
                    node,
                    NetworkMessage::JobCancel {
                        job_id: job_id.clone(),
                        lease_epoch: epoch,
                        reason: "stale lease: the stream was taken back".into(),
                    },
                );
            }
            return Err(refusal);
        }
        let max_out = self.sched.max_output_bytes;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return Err(not_assigned(job_id));
        };
        let Some(stream) = job.stream.as_mut() else {
            return Err((
                ErrorCode::Malformed,
                format!("job {job_id} was not assigned as a stream"),
            ));
        };
        if let Err((code, why)) = stream.accept(job_id, index, &events, max_out) {
            if let Some(rec) = self.nodes.get_mut(node) {
                rec.job_finished(job_id);
            }
            self.penalize(
                node,
                PENALTY_INVALID_RESULT,
                &why,
                Some(FailureCause::InvalidResult),
                now,
            );
            self.take_back(job_id, Some(node), &why, now);
            self.dispatch(now);
            return Err((code, why));
        }
        stream.delivered = true;
        Ok((stream.sink.clone(), events))
    }

    /// The caller of a streamed job stopped reading (disconnected or too slow): the job is
    /// failed and cancelled on its node.
    pub fn caller_gone(&mut self, job_id: &JobId, why: &str, now: u64) {
        if let Some(node) = self.holder(job_id) {
            self.cancel_on(&node, job_id, why);
        }
        self.finish_failed(job_id, ErrorCode::Unavailable, why.to_owned(), now);
    }

    fn send(&self, node: &NodeId, msg: NetworkMessage) {
        if let Some(link) = self.nodes.get(node).and_then(|r| r.session.as_ref()) {
            let _ = link.tx.try_send(Outbound::Msg(msg));
        }
    }

    fn confirm(&self, node: &NodeId, result: &JobResult) {
        self.send(
            node,
            NetworkMessage::ResultConfirm {
                job_id: result.job_id.clone(),
                lease_epoch: result.lease_epoch,
            },
        );
    }

    /// Checks that `node` holds the current lease of `job` at `epoch`.
    fn lease_check(&self, job: &Job, node: &NodeId, epoch: u64) -> Result<(), Refusal> {
        if let JobState::Assigned(lease) = &job.state
            && &lease.node == node
            && job.lease_epoch == epoch
        {
            return Ok(());
        }
        if job.leases.iter().any(|(n, e)| n == node && *e == epoch) {
            let now_state = match &job.state {
                JobState::Assigned(_) => {
                    format!("it is leased again under epoch {}", job.lease_epoch)
                }
                JobState::Queued => "it was taken back and waits for reassignment".to_owned(),
                JobState::Completed { .. } => "it was completed elsewhere".to_owned(),
                JobState::Failed { .. } => "it has failed".to_owned(),
            };
            return Err((
                ErrorCode::StaleLease,
                format!(
                    "lease {epoch} of job {} is no longer current: {now_state}",
                    job.id
                ),
            ));
        }
        Err((
            ErrorCode::NotAssigned,
            format!("job {} is not assigned to this node", job.id),
        ))
    }

    pub fn on_ack(&mut self, node: &NodeId, job_id: &JobId, epoch: u64) -> Result<(), Refusal> {
        let job = self.jobs.get(job_id).ok_or_else(|| not_assigned(job_id))?;
        self.lease_check(job, node, epoch)?;
        if let Some(job) = self.jobs.get_mut(job_id)
            && let JobState::Assigned(lease) = &mut job.state
        {
            lease.acked = true;
        }
        Ok(())
    }

    /// A signed result arrived on the node's session (signature already verified).
    pub fn on_result(&mut self, node: &NodeId, result: JobResult, now: u64) -> Result<(), Refusal> {
        let Some(job) = self.jobs.get(&result.job_id) else {
            // Unknown here (e.g. the service restarted and lost it): this network will never
            // accept it, so let the node drop it from its outbox (spec §7.5).
            self.confirm(node, &result);
            return Err(not_assigned(&result.job_id));
        };
        if let JobState::Completed {
            node: done_by,
            epoch,
        } = &job.state
            && done_by == node
            && *epoch == result.lease_epoch
        {
            // At-least-once delivery: confirm again so the node can clear its outbox.
            self.metrics.duplicate_results.inc();
            self.send(
                node,
                NetworkMessage::ResultConfirm {
                    job_id: result.job_id,
                    lease_epoch: result.lease_epoch,
                },
            );
            return Ok(());
        }
        if let Err(refusal) = self.lease_check(job, node, result.lease_epoch) {
            // Fenced or foreign: never acceptable, so confirmed ("needed no more") to clear the
            // node's outbox, and refused with the reason.
            self.confirm(node, &result);
            if refusal.0 == ErrorCode::StaleLease {
                self.metrics.stale_results.inc();
                if let Some(rec) = self.nodes.get_mut(node) {
                    rec.job_finished(&result.job_id);
                }
                // Stop it if it still runs on the node.
                self.send(
                    node,
                    NetworkMessage::JobCancel {
                        job_id: result.job_id.clone(),
                        lease_epoch: result.lease_epoch,
                        reason: "stale lease: the job was reassigned".into(),
                    },
                );
            }
            return Err(refusal);
        }
        let invalid = match &job.state {
            JobState::Assigned(lease) => {
                check_result_binding(lease, &job.spec.model, &result, self.sched.max_output_bytes)
                    .and_then(|()| {
                        let received = job.stream.as_ref().map(StreamState::summary);
                        result
                            .check_stream(received.as_ref())
                            .map_err(|e| (ErrorCode::ResultMismatch, e.to_string()))
                    })
                    .err()
            }
            _ => Some(not_assigned(&result.job_id)),
        };
        if let Some((code, why)) = invalid {
            if let Some(rec) = self.nodes.get_mut(node) {
                rec.job_finished(&result.job_id);
            }
            self.penalize(
                node,
                PENALTY_INVALID_RESULT,
                &why,
                Some(FailureCause::InvalidResult),
                now,
            );
            self.take_back(&result.job_id, Some(node), &why, now);
            self.dispatch(now);
            return Err((code, why));
        }
        let Some(job) = self.jobs.get_mut(&result.job_id) else {
            return Err(not_assigned(&result.job_id));
        };
        let assigned_ms = match &job.state {
            JobState::Assigned(l) => l.assigned_ms,
            _ => now,
        };
        job.state = JobState::Completed {
            node: node.clone(),
            epoch: result.lease_epoch,
        };
        job.finished_ms = Some(now);
        job.stream = None;
        let outcome = CompletedJob {
            job_id: job.id.clone(),
            node_id: node.clone(),
            lease_epoch: result.lease_epoch,
            attempts: job.attempts,
            output: result.output,
            usage: result.usage,
            verified: true,
        };
        if let Some(w) = job.waiter.take() {
            let _ = w.send(JobOutcome::Completed(outcome));
        }
        self.metrics
            .end_to_end_latency
            .observe(ms_to_s(now.saturating_sub(job.created_ms)));
        self.metrics.jobs_completed.inc();
        let job_id = job.id.clone();
        self.remember_finished(job_id.clone());
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.job_finished(&job_id);
            rec.completed += 1;
            rec.consecutive_failures = 0;
            let sample = now.saturating_sub(assigned_ms) as f64;
            rec.latency_ewma_ms = Some(match rec.latency_ewma_ms {
                Some(e) => 0.8 * e + 0.2 * sample,
                None => sample,
            });
        }
        self.send(
            node,
            NetworkMessage::ResultConfirm {
                job_id,
                lease_epoch: result.lease_epoch,
            },
        );
        self.refresh_gauges(now);
        self.dispatch(now);
        Ok(())
    }

    // The fields of one `job.fail` message, as the session unpacked them.
    #[allow(clippy::too_many_arguments)]
    pub fn on_fail(
        &mut self,
        node: &NodeId,
        job_id: &JobId,
        epoch: u64,
        code: FailCode,
        reason: &str,
        refusal: Option<RuntimeRefusal>,
        now: u64,
    ) -> Result<(), Refusal> {
        let job = self.jobs.get(job_id).ok_or_else(|| not_assigned(job_id))?;
        if let Err(refusal) = self.lease_check(job, node, epoch) {
            if refusal.0 == ErrorCode::StaleLease
                && let Some(rec) = self.nodes.get_mut(node)
            {
                // The node gave up a job we had already taken back: its slot is free.
                rec.job_finished(job_id);
                self.dispatch(now);
            }
            return Err(refusal);
        }
        let why = format!("node failed the job ({code}): {}", clip(reason));
        match code {
            c if c.node_fault() => {
                self.penalize(
                    node,
                    PENALTY_RUNTIME_ERROR,
                    &why,
                    Some(FailureCause::Reported(code)),
                    now,
                );
            }
            // Hand-backs (drain, unreachable runtime), capacity races, config sync and codes
            // from newer nodes are not the node's fault.
            _ => {}
        }
        // The node no longer runs it: its credit is free again (no zombie).
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.job_finished(job_id);
        }
        if code.retriable() {
            self.take_back(job_id, Some(node), &why, now);
        } else {
            let wire = if code == FailCode::OutputTooLarge {
                ErrorCode::TooLarge
            } else {
                ErrorCode::Malformed
            };
            if let Some(job) = self.jobs.get_mut(job_id) {
                job.refusal = refusal;
            }
            self.finish_failed(job_id, wire, why, now);
        }
        self.dispatch(now);
        Ok(())
    }

    pub fn on_credits(&mut self, node: &NodeId, credits: u32, in_flight: u32, now: u64) {
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.reported_credits = credits.min(rec.max_concurrency);
            rec.reported_in_flight = in_flight;
            rec.cancelled.clear();
        }
        self.dispatch(now);
    }

    pub fn on_draining(&mut self, node: &NodeId) {
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.draining = true;
        }
        self.send(node, NetworkMessage::DrainAck {});
    }

    pub fn on_drained(&mut self, node: &NodeId) {
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.drained = true;
            rec.draining = true;
        }
    }

    /// An invalid signature (or a frame signed by another key) on the node's session.
    pub fn on_invalid_signature(&mut self, node: &NodeId, now: u64) {
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.invalid_signatures += 1;
        }
        self.penalize(
            node,
            PENALTY_INVALID_SIGNATURE,
            "invalid signature on session",
            Some(FailureCause::InvalidSignature),
            now,
        );
    }

    // ---- jobs ----

    /// Accepts a job: bounded queue, approved model, a node that could serve it.
    pub fn submit(
        &mut self,
        id: JobId,
        spec: JobSpec,
        now: u64,
    ) -> Result<oneshot::Receiver<JobOutcome>, (ErrorCode, String, Option<u64>)> {
        if self.queue.len() >= self.limits.max_queue {
            // A rough hint: one tick per queued job would be far too optimistic; one second is
            // what a caller should wait before it tries again.
            return Err((
                ErrorCode::QueueFull,
                format!("queue is full ({} jobs)", self.queue.len()),
                Some(1000),
            ));
        }
        if self.config.approved(&spec.model).is_none() {
            return Err((
                ErrorCode::NotFound,
                format!("model {} is not approved on this network", spec.model.id),
                None,
            ));
        }
        if !self
            .nodes
            .values()
            .any(|n| self.eligible_for(n, &spec.model, now).is_ok())
        {
            return Err((
                ErrorCode::NoEligibleNode,
                format!("no eligible node serves {} now", spec.model.id),
                Some(1000),
            ));
        }
        let (tx, rx) = oneshot::channel();
        let mut spec = spec;
        let stream = spec.stream.take().map(StreamState::new);
        let job = Job {
            id: id.clone(),
            spec,
            created_ms: now,
            deadline_ms: now.saturating_add(self.sched.request_timeout_ms),
            state: JobState::Queued,
            lease_epoch: 0,
            attempts: 0,
            leases: Vec::new(),
            waiter: Some(tx),
            finished_ms: None,
            last_error: None,
            stream,
            refusal: None,
        };
        self.jobs.insert(id.clone(), job);
        self.queue.push_back(id);
        self.metrics.jobs_submitted.inc();
        self.dispatch(now);
        self.refresh_gauges(now);
        Ok(rx)
    }

    /// Resolves an approved model by `id` or `id@revision`.
    pub fn resolve_model(&self, name: &str) -> Option<ModelRef> {
        let (id, rev) = match name.split_once('@') {
            Some((i, r)) => (i, Some(r)),
            None => (name, None),
        };
        self.config
            .models
            .iter()
            .find(|m| m.model.id == id && rev.is_none_or(|r| m.model.revision == r))
            .map(|m| m.model.clone())
    }

    /// Approved models active on at least one eligible node.
    pub fn available_models(&self, now: u64) -> Vec<ModelRef> {
        self.config
            .models
            .iter()
            .filter(|m| {
                self.nodes
                    .values()
                    .any(|n| self.eligible_for(n, &m.model, now).is_ok())
            })
            .map(|m| m.model.clone())
            .collect()
    }

    /// Runtime kinds of the eligible nodes serving `model` now (each kind once): what decides
    /// which APIs the network can answer for it (KServe v2 only on Triton, OpenAI on the rest).
    pub fn runtimes_serving(&self, model: &ModelRef, now: u64) -> Vec<RuntimeKind> {
        let mut kinds: Vec<RuntimeKind> = Vec::new();
        for n in self.nodes.values() {
            if self.eligible_for(n, model, now).is_ok() && !kinds.contains(&n.capabilities.runtime)
            {
                kinds.push(n.capabilities.runtime);
            }
        }
        kinds
    }

    /// Timeouts, resume-window expiry, caller deadlines, exclusion ends; then dispatch.
    pub fn tick(&mut self, now: u64) {
        let resume_window = self.config.timing.resume_window_ms;
        let mut expired: Vec<(JobId, Option<NodeId>, String, Option<FailureCause>)> = Vec::new();
        for job in self.jobs.values() {
            match &job.state {
                JobState::Queued | JobState::Assigned(_) if now >= job.deadline_ms => {
                    expired.push((job.id.clone(), None, "request timed out".into(), None));
                }
                JobState::Assigned(lease) => {
                    let connected = self
                        .nodes
                        .get(&lease.node)
                        .is_some_and(|n| n.session.is_some());
                    // While the node is away its unacked work waits for the resume window.
                    if !lease.acked && connected && now >= lease.ack_deadline_ms {
                        expired.push((
                            job.id.clone(),
                            Some(lease.node.clone()),
                            "ack timeout".into(),
                            Some(FailureCause::AckTimeout),
                        ));
                    } else if now >= lease.exec_deadline_ms {
                        expired.push((
                            job.id.clone(),
                            Some(lease.node.clone()),
                            "execution deadline passed".into(),
                            Some(FailureCause::ExecutionDeadline),
                        ));
                    }
                }
                _ => {}
            }
        }
        for rec in self.nodes.values() {
            if let Some(at) = rec.disconnected_at_ms
                && now.saturating_sub(at) >= resume_window
            {
                for job in &rec.outstanding {
                    expired.push((
                        job.clone(),
                        Some(rec.id.clone()),
                        "node gone past the resume window".into(),
                        Some(FailureCause::Gone),
                    ));
                }
            }
        }
        for (job_id, node, why, cause) in expired {
            match node {
                None => {
                    let holder = self.holder(&job_id);
                    if let Some(n) = &holder {
                        self.cancel_on(n, &job_id, &why);
                    }
                    self.finish_failed(&job_id, ErrorCode::Timeout, why, now);
                }
                Some(node) => {
                    if cause.is_some() {
                        self.penalize(&node, PENALTY_TIMEOUT, &why, cause, now);
                    }
                    self.take_back(&job_id, Some(&node), &why, now);
                }
            }
        }
        for rec in self.nodes.values_mut() {
            if rec.suspended_until_ms.is_some_and(|t| t <= now) {
                rec.suspended_until_ms = None;
            }
        }
        self.dispatch(now);
        self.refresh_gauges(now);
        self.refresh_eligible_gauge(now);
    }

    /// Fails every unfinished job (service shutting down) so waiting callers are answered.
    pub fn fail_all(&mut self, why: &str, now: u64) {
        let open: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Queued | JobState::Assigned(_)))
            .map(|j| j.id.clone())
            .collect();
        for id in open {
            if let Some(node) = self.holder(&id) {
                self.cancel_on(&node, &id, why);
            }
            self.finish_failed(&id, ErrorCode::Unavailable, why.to_owned(), now);
        }
    }

    fn holder(&self, job_id: &JobId) -> Option<NodeId> {
        match self.jobs.get(job_id).map(|j| &j.state) {
            Some(JobState::Assigned(l)) => Some(l.node.clone()),
            _ => None,
        }
    }

    fn cancel_on(&mut self, node: &NodeId, job_id: &JobId, why: &str) {
        let epoch = self.jobs.get(job_id).map(|j| j.lease_epoch).unwrap_or(0);
        if let Some(rec) = self.nodes.get_mut(node)
            && rec.outstanding.remove(job_id)
        {
            rec.cancelled.insert(job_id.clone());
        }
        self.send(
            node,
            NetworkMessage::JobCancel {
                job_id: job_id.clone(),
                lease_epoch: epoch,
                reason: why.to_owned(),
            },
        );
    }

    /// Takes the current lease back (cancelling it on its node) and queues the job again,
    /// or fails it when its attempts are used up.
    fn take_back(&mut self, job_id: &JobId, node: Option<&NodeId>, why: &str, now: u64) {
        let holder = self.holder(job_id);
        let Some(holder) = holder else {
            return;
        };
        if node.is_some_and(|n| n != &holder) {
            return;
        }
        self.cancel_on(&holder, job_id, why);
        let max_attempts = self.sched.max_attempts;
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.last_error = Some(why.to_owned());
        if job.stream.as_ref().is_some_and(|s| s.delivered) {
            // Part of the answer reached the caller: a rerun would repeat it.
            let reason = format!("the stream broke after part of the answer was sent: {why}");
            self.finish_failed(job_id, ErrorCode::Unavailable, reason, now);
            return;
        }
        if job.attempts >= max_attempts {
            let reason = format!("gave up after {} attempts; last: {why}", job.attempts);
            self.finish_failed(job_id, ErrorCode::Timeout, reason, now);
            return;
        }
        job.state = JobState::Queued;
        // Retries go first: their callers have waited longest.
        self.queue.push_front(job_id.clone());
        self.metrics.jobs_reassigned.inc();
        tracing::info!(job = %job_id, node = %holder, reason = why, "assignment taken back");
    }

    fn finish_failed(&mut self, job_id: &JobId, code: ErrorCode, reason: String, now: u64) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if matches!(
            job.state,
            JobState::Completed { .. } | JobState::Failed { .. }
        ) {
            return;
        }
        tracing::warn!(job = %job_id, %code, reason = %reason, "job failed");
        job.state = JobState::Failed {
            code,
            reason: reason.clone(),
        };
        job.finished_ms = Some(now);
        job.stream = None;
        let refusal = job.refusal.take();
        if let Some(w) = job.waiter.take() {
            let _ = w.send(JobOutcome::Failed {
                code,
                reason,
                refusal,
            });
        }
        self.queue.retain(|j| j != job_id);
        self.metrics.jobs_failed.inc();
        self.remember_finished(job_id.clone());
    }

    fn remember_finished(&mut self, job_id: JobId) {
        self.finished.push_back(job_id);
        while self.finished.len() > self.sched.finished_history {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// Charges a node for a failure. Failures are counted per incident, not per job: one
    /// runtime crash or stall fails every job in flight at once, and charging each would take
    /// a node that recovered in seconds out for a whole cooldown. So a failure whose cause
    /// already opened an incident within the incident window adds neither penalty nor a
    /// consecutive failure (it is still counted in `failed`).
    fn penalize(
        &mut self,
        node: &NodeId,
        amount: f64,
        why: &str,
        cause: Option<FailureCause>,
        now: u64,
    ) {
        let half_life = self.sched.penalty_half_life_ms;
        let policy = self.penalty_policy();
        let (limit, cooldown, window) = (
            policy.exclude_after_failures,
            policy.exclusion_cooldown_ms,
            policy.incident_window_ms,
        );
        let Some(rec) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some(cause) = cause {
            rec.failed += 1;
            match rec.incidents.get(&cause) {
                Some(&opened) if now < opened.saturating_add(window) => {
                    tracing::debug!(node = %node, reason = why, "failure belongs to an open incident");
                    return;
                }
                _ => {
                    // Bounded: one entry per cause, and causes are a closed set.
                    rec.incidents
                        .retain(|_, opened| now < opened.saturating_add(window));
                    rec.incidents.insert(cause, now);
                }
            }
        }
        rec.penalty = (rec.penalty_at(now, half_life) + amount).min(PENALTY_MAX);
        rec.penalty_at_ms = now;
        rec.penalty_reason = Some(why.to_owned());
        if cause.is_some() {
            rec.consecutive_failures += 1;
            if rec.consecutive_failures >= limit {
                rec.consecutive_failures = 0;
                rec.suspended_until_ms = Some(now.saturating_add(cooldown));
                rec.penalty_reason = Some(format!(
                    "suspended after {limit} consecutive failed incidents; last: {why}"
                ));
                tracing::warn!(node = %node, until = now + cooldown, "node suspended");
            }
        }
    }

    /// Assigns queued jobs to the best eligible nodes with free credits.
    pub fn dispatch(&mut self, now: u64) {
        if self.queue.is_empty() {
            return;
        }
        let mut still_queued = VecDeque::with_capacity(self.queue.len());
        let queue = std::mem::take(&mut self.queue);
        let mut any_free = self.nodes.values().any(|n| n.free_slots() > 0);
        for job_id in queue {
            if !any_free {
                still_queued.push_back(job_id);
                continue;
            }
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            if !matches!(job.state, JobState::Queued) {
                continue;
            }
            let decision = self.choose_node(job, now);
            match decision {
                Choice::Node(node) => self.assign(&job_id, &node, now),
                Choice::AllTried => {
                    let last = job.last_error.clone().unwrap_or_default();
                    self.finish_failed(
                        &job_id,
                        ErrorCode::NoEligibleNode,
                        format!("every eligible node failed this job; last: {last}"),
                        now,
                    );
                }
                Choice::Wait => still_queued.push_back(job_id),
            }
            any_free = self.nodes.values().any(|n| n.free_slots() > 0);
        }
        // Jobs queued during this pass (none: we hold the lock) would be lost otherwise.
        still_queued.extend(std::mem::take(&mut self.queue));
        self.queue = still_queued;
        self.refresh_gauges(now);
    }

    /// The best eligible node with free credits that has not held this job before.
    fn choose_node(&self, job: &Job, now: u64) -> Choice {
        let tried = |id: &NodeId| job.leases.iter().any(|(n, _)| n == id);
        let mut untried_candidates = 0usize;
        let mut best: Option<(u32, u32, &NodeId)> = None;
        // Triton answers KServe v2 only: OpenAI jobs (and so every stream) go to the other
        // nodes of a mixed network.
        let openai_job = matches!(job.spec.kind, JobKind::ChatCompletion | JobKind::Completion);
        for rec in self.nodes.values() {
            if self.eligible_for(rec, &job.spec.model, now).is_err() {
                continue;
            }
            if openai_job && rec.capabilities.runtime == RuntimeKind::Triton {
                continue;
            }
            if tried(&rec.id) {
                continue;
            }
            untried_candidates += 1;
            let free = rec.free_slots();
            if free == 0 {
                continue;
            }
            let score = self.score(rec, now);
            let better = match best {
                None => true,
                // Deterministic tie-break (score, free slots, then node id) keeps tests and
                // operators' expectations reproducible.
                Some((s, f, id)) => {
                    (score, free, std::cmp::Reverse(&rec.id)) > (s, f, std::cmp::Reverse(id))
                }
            };
            if better {
                best = Some((score, free, &rec.id));
            }
        }
        match best {
            Some((_, _, id)) => Choice::Node(id.clone()),
            // A retry with no untried eligible node fails now, with the last reason, rather
            // than leaving its caller waiting; a first attempt waits for a node until its
            // deadline.
            None if untried_candidates == 0 && !job.leases.is_empty() => Choice::AllTried,
            None => Choice::Wait,
        }
    }

    fn assign(&mut self, job_id: &JobId, node: &NodeId, now: u64) {
        let ack_timeout = self.config.timing.ack_timeout_ms;
        let max_out = self.sched.max_output_bytes;
        let attempt_timeout = self.sched.attempt_timeout_ms;
        let config_digest = self.assignment_digest(node);
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        job.lease_epoch += 1;
        job.attempts += 1;
        job.leases.push((node.clone(), job.lease_epoch));
        if let Some(stream) = &mut job.stream {
            stream.new_lease();
        }
        if job.attempts == 1 {
            self.metrics
                .dispatch_latency
                .observe(ms_to_s(now.saturating_sub(job.created_ms)));
        }
        let exec_deadline = now.saturating_add(attempt_timeout).min(job.deadline_ms);
        job.state = JobState::Assigned(Lease {
            node: node.clone(),
            config_digest: config_digest.clone(),
            assigned_ms: now,
            acked: false,
            ack_deadline_ms: now.saturating_add(ack_timeout),
            exec_deadline_ms: exec_deadline,
        });
        let msg = assignment(job, exec_deadline, max_out, config_digest);
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.outstanding.insert(job_id.clone());
            let n = u32::try_from(rec.outstanding.len()).unwrap_or(u32::MAX);
            rec.max_outstanding_seen = rec.max_outstanding_seen.max(n);
            if let Some(link) = &rec.session
                && link.tx.try_send(Outbound::Msg(msg)).is_err()
            {
                tracing::debug!(node = %node, job = %job_id, "session queue full; the ack timeout will reassign");
            }
        }
    }

    // ---- eligibility and scoring ----

    /// Model-independent conditions, with the first failing one as the reason.
    fn node_ready(&self, rec: &NodeRecord, now: u64) -> Result<(), String> {
        let timing = &self.config.timing;
        if self.revoked.contains(&rec.id) {
            return Err("node key revoked".into());
        }
        if let Some(until) = rec.suspended_until_ms.filter(|t| *t > now) {
            return Err(format!(
                "suspended until {until}: {}",
                rec.penalty_reason.as_deref().unwrap_or("repeated failures")
            ));
        }
        let fresh = timing
            .heartbeat_interval_ms
            .saturating_mul(self.sched.heartbeat_miss_factor);
        match rec.last_heartbeat_ms {
            None => return Err("no heartbeat yet".into()),
            Some(t) if now.saturating_sub(t) > fresh => {
                return Err("heartbeat missed; excluded until the next one".into());
            }
            Some(_) => {}
        }
        if rec.session.is_none() {
            return Err("no WebSocket session".into());
        }
        if rec.draining {
            return Err("draining".into());
        }
        let Some(report) = &rec.report else {
            return Err("no heartbeat yet".into());
        };
        if !report.participation.accepts(self.config.environment) {
            return Err("participation excludes this network's environment".into());
        }
        if !report.runtime.ready {
            return Err("runtime not ready".into());
        }
        if !report.gpu.healthy() {
            return Err("GPU reports ECC/XID errors".into());
        }
        Ok(())
    }

    /// Whether `rec` may serve `model` now.
    pub fn eligible_for(&self, rec: &NodeRecord, model: &ModelRef, now: u64) -> Result<(), String> {
        self.node_ready(rec, now)?;
        self.model_ok(rec, model)
    }

    fn model_ok(&self, rec: &NodeRecord, model: &ModelRef) -> Result<(), String> {
        let Some(report) = &rec.report else {
            return Err("no heartbeat yet".into());
        };
        let approved = self
            .config
            .approved(model)
            .ok_or_else(|| format!("model {} is not approved", model.id))?;
        let active = report
            .models
            .iter()
            .any(|m| &m.model == model && m.state == ModelState::Active);
        if !active {
            return Err(format!("model {} is not active on the node", model.id));
        }
        if !approved.runtimes.contains(&report.runtime.kind) {
            return Err(format!(
                "runtime {} may not serve {}",
                report.runtime.kind.as_str(),
                model.id
            ));
        }
        if report.gpu.memory_total_mib() < approved.min_gpu_memory_mib {
            return Err(format!(
                "{} MiB of GPU memory, {} needs {}",
                report.gpu.memory_total_mib(),
                model.id,
                approved.min_gpu_memory_mib
            ));
        }
        if !approved.subclouds.is_empty() {
            let admitted = approved.subclouds.iter().any(|name| {
                report.subclouds.contains(name)
                    && self.config.subclouds.iter().any(|p| {
                        &p.name == name
                            && p.members.as_ref().is_none_or(|m| m.contains(&rec.id))
                            && report.gpu.memory_total_mib() >= p.min_gpu_memory_mib
                    })
            });
            if !admitted {
                return Err(format!(
                    "node is not admitted to a subcloud serving {}",
                    model.id
                ));
            }
        }
        Ok(())
    }

    fn active_models(&self, rec: &NodeRecord) -> Vec<ModelRef> {
        self.config
            .models
            .iter()
            .filter(|m| self.model_ok(rec, &m.model).is_ok())
            .map(|m| m.model.clone())
            .collect()
    }

    fn penalty_u32(&self, rec: &NodeRecord, now: u64) -> u32 {
        rec.penalty_at(now, self.sched.penalty_half_life_ms)
            .round()
            .clamp(0.0, PENALTY_MAX) as u32
    }

    /// 0–1000: 400 for the share of free credits, 300 for latency, 300 for a clean record.
    pub fn score(&self, rec: &NodeRecord, now: u64) -> u32 {
        let free = if rec.max_concurrency == 0 {
            0.0
        } else {
            f64::from(rec.free_slots()) / f64::from(rec.max_concurrency)
        };
        let r = self.sched.latency_ref_ms.max(1.0);
        let latency = rec.latency_ewma_ms.map_or(0.5, |l| r / (r + l.max(0.0)));
        let penalty = rec.penalty_at(now, self.sched.penalty_half_life_ms) / PENALTY_MAX;
        let s = 400.0 * free + 300.0 * latency + 300.0 * (1.0 - penalty);
        s.round().clamp(0.0, 1000.0) as u32
    }

    /// Cheap gauges, refreshed on every change.
    fn refresh_gauges(&self, _now: u64) {
        let connected = self.nodes.values().filter(|n| n.session.is_some()).count();
        let in_flight = self
            .nodes
            .values()
            .map(|n| n.outstanding.len())
            .sum::<usize>();
        self.metrics.nodes_connected.set(gauge(connected));
        self.metrics.jobs_queued.set(gauge(self.queue.len()));
        self.metrics.jobs_in_flight.set(gauge(in_flight));
    }

    /// Eligibility of every node: O(nodes × models), so only on ticks and on the rare events
    /// that change it (heartbeat, session open/close), never per job.
    fn refresh_eligible_gauge(&self, now: u64) {
        let eligible = self
            .nodes
            .values()
            .filter(|n| self.node_ready(n, now).is_ok() && !self.active_models(n).is_empty())
            .count();
        self.metrics.nodes_eligible.set(gauge(eligible));
    }

    // ---- views ----

    pub fn stats(&self) -> CoreStats {
        CoreStats {
            nodes: self.nodes.len(),
            connected: self.nodes.values().filter(|n| n.session.is_some()).count(),
            queued: self.queue.len(),
            in_flight: self.nodes.values().map(|n| n.outstanding.len()).sum(),
            jobs: self.jobs.len(),
        }
    }

    pub fn node_views(&self, now: u64) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = self
            .nodes
            .values()
            .map(|rec| {
                let verdict = self.verdict(&rec.id, now);
                NodeView {
                    node_id: rec.id.clone(),
                    connected: rec.session.is_some(),
                    eligible: verdict.eligible,
                    reason: verdict.reason,
                    score: verdict.score,
                    penalty: verdict.penalty,
                    penalty_reason: rec.penalty_reason.clone(),
                    suspended_until_ms: verdict.suspended_until_ms,
                    max_concurrency: rec.max_concurrency,
                    free_slots: rec.free_slots(),
                    outstanding: u32::try_from(rec.outstanding.len()).unwrap_or(u32::MAX),
                    max_outstanding_seen: rec.max_outstanding_seen,
                    latency_ewma_ms: rec.latency_ewma_ms,
                    completed: rec.completed,
                    failed: rec.failed,
                    invalid_signatures: rec.invalid_signatures,
                    last_heartbeat_ms: rec.last_heartbeat_ms,
                    draining: rec.draining,
                    config: rec.report.as_ref().and_then(|r| r.config.clone()),
                    active_models: self.active_models(rec),
                }
            })
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn job_view(&self, id: &JobId) -> Option<JobView> {
        let job = self.jobs.get(id)?;
        let (state, node, error, error_code) = match &job.state {
            JobState::Queued => ("queued", None, job.last_error.clone(), None),
            JobState::Assigned(l) => (
                if l.acked { "running" } else { "assigned" },
                Some(l.node.clone()),
                job.last_error.clone(),
                None,
            ),
            JobState::Completed { node, .. } => ("completed", Some(node.clone()), None, None),
            JobState::Failed { code, reason } => {
                ("failed", None, Some(reason.clone()), Some(*code))
            }
        };
        Some(JobView {
            job_id: job.id.clone(),
            model: job.spec.model.clone(),
            kind: job.spec.kind,
            state,
            lease_epoch: job.lease_epoch,
            attempts: job.attempts,
            node_id: node,
            nodes_tried: job.leases.iter().map(|(n, _)| n.clone()).collect(),
            error,
            error_code,
            created_ms: job.created_ms,
            finished_ms: job.finished_ms,
            verified: state == "completed",
        })
    }
}

enum Choice {
    Node(NodeId),
    AllTried,
    Wait,
}

fn assignment(
    job: &Job,
    deadline_ms: u64,
    max_output_bytes: u32,
    config_digest: ConfigDigest,
) -> NetworkMessage {
    NetworkMessage::JobAssign(JobAssignment {
        job_id: job.id.clone(),
        lease_epoch: job.lease_epoch,
        model: job.spec.model.clone(),
        config_digest,
        kind: job.spec.kind,
        request: job.spec.request.clone(),
        deadline_ms,
        max_output_bytes,
        stream: job.stream.is_some(),
    })
}

/// The result-binding rule (spec §7.5): a result is accepted for a lease only if its signed
/// body names exactly what the assignment dictated — the config digest and the model (id and
/// revision) — and its `output_digest` is the digest of its `output`. Lease and epoch are
/// checked before this by [`Core::lease_check`]; the signature before that by the session.
/// Every mismatch is `result_mismatch`; an oversize output is `too_large`.
pub(crate) fn check_result_binding(
    lease: &Lease,
    model: &ModelRef,
    result: &JobResult,
    max_output_bytes: u32,
) -> Result<(), Refusal> {
    result
        .check_binding(&lease.config_digest, model)
        .map_err(|e| (ErrorCode::ResultMismatch, e.to_string()))?;
    if result.output.len() > max_output_bytes as usize {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "output of {} bytes exceeds max_output_bytes {max_output_bytes}",
                result.output.len()
            ),
        ));
    }
    Ok(())
}

fn not_assigned(job: &JobId) -> Refusal {
    (
        ErrorCode::NotAssigned,
        format!("job {job} is not assigned to this node"),
    )
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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

    fn core_with_node(sched: SchedulerSettings) -> (Core, NodeId) {
        let config = NetworkConfig {
            environment: resultity_protocol::messages::Environment::Testnet,
            models: vec![],
            runtime_images: Default::default(),
            sidecar_image: None,
            timing: Default::default(),
            subclouds: vec![],
            network_keys: vec![],
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        };
        let limits = Limits::default();
        let mut core = Core::new(
            sched,
            limits.clone(),
            Metrics::new(),
            Arc::new(config),
            ConfigDigest::of_body(b"config"),
        );
        let key = resultity_protocol::NodeKeypair::from_seed(&[7; 32]);
        let caps = Capabilities {
            runtime: resultity_protocol::messages::RuntimeKind::Vllm,
            max_concurrency: 8,
            participation: Default::default(),
            subclouds: vec![],
            gpu: Default::default(),
            models_installed: vec![],
        };
        let id = key.id().clone();
        let rec = NodeRecord::new(&id, key.verifying_key(), &caps, 1, &limits, 0);
        core.nodes.insert(id.clone(), rec);
        (core, id)
    }

    const CAUSES: [FailureCause; 6] = [
        FailureCause::AckTimeout,
        FailureCause::ExecutionDeadline,
        FailureCause::InvalidResult,
        FailureCause::Reported(FailCode::RuntimeError),
        FailureCause::Reported(FailCode::DeadlineExceeded),
        FailureCause::Reported(FailCode::OutboxUnavailable),
    ];

    proptest::proptest! {
        /// A runtime crash fails every job in flight within moments: k failures of one cause
        /// inside the incident window are one penalty and one failed incident, never an
        /// exclusion.
        #[test]
        fn a_burst_from_one_incident_is_one_penalty(
            k in 1usize..64,
            offsets in proptest::collection::vec(0u64..5_000, 64),
            cause in 0usize..CAUSES.len(),
        ) {
            let sched = SchedulerSettings::default();
            let (half_life, window) = (sched.penalty_half_life_ms, sched.incident_window_ms);
            proptest::prop_assume!(offsets.iter().all(|o| *o < window));
            let (mut core, node) = core_with_node(sched);
            let t0 = 1_000_000;
            let mut times: Vec<u64> = offsets[..k].iter().map(|o| t0 + o).collect();
            times.sort_unstable();
            times[0] = t0;
            for t in &times {
                core.penalize(&node, PENALTY_TIMEOUT, "stall", Some(CAUSES[cause]), *t);
            }
            let last = times[k - 1];
            let rec = &core.nodes[&node];
            proptest::prop_assert_eq!(rec.consecutive_failures, 1);
            proptest::prop_assert_eq!(rec.failed, k as u64);
            proptest::prop_assert!(rec.suspended_until_ms.is_none());
            let one = PENALTY_TIMEOUT * 0.5f64.powf((last - t0) as f64 / half_life as f64);
            proptest::prop_assert!((rec.penalty_at(last, half_life) - one).abs() < 1e-6);
        }

        /// Failures a window apart are separate incidents: the node is suspended after the
        /// configured number of them, as before.
        #[test]
        fn separate_incidents_each_count(cause in 0usize..CAUSES.len()) {
            let sched = SchedulerSettings::default();
            let (limit, window) = (sched.exclude_after_failures, sched.incident_window_ms);
            let (mut core, node) = core_with_node(sched);
            for i in 0..u64::from(limit) {
                let t = 1_000_000 + i * window;
                core.penalize(&node, PENALTY_TIMEOUT, "stall", Some(CAUSES[cause]), t);
            }
            proptest::prop_assert!(core.nodes[&node].suspended_until_ms.is_some());
        }
    }

    #[test]
    fn the_network_config_overrides_the_service_penalty_settings() {
        let (mut core, _) = core_with_node(SchedulerSettings::default());
        let defaults = core.penalty_policy();
        assert_eq!(defaults.incident_window_ms, 5_000);
        let mut config = core.config().clone();
        config.penalties = Some(resultity_protocol::config::PenaltySettings {
            exclude_after_failures: Some(7),
            exclusion_cooldown_ms: None,
            incident_window_ms: Some(250),
        });
        let pointer = ConfigPointer {
            version: 2,
            digest: ConfigDigest::of_body(b"config 2"),
        };
        core.set_config(Arc::new(config), &pointer, 0);
        let p = core.penalty_policy();
        assert_eq!(p.exclude_after_failures, 7);
        assert_eq!(p.incident_window_ms, 250);
        assert_eq!(p.exclusion_cooldown_ms, defaults.exclusion_cooldown_ms);
    }

    #[test]
    fn hand_backs_and_unknown_codes_are_not_the_nodes_fault() {
        for code in [
            FailCode::HandedBack,
            FailCode::RuntimeUnavailable,
            FailCode::ConfigMismatch,
            FailCode::OverCapacity,
            FailCode::ModelInactive,
            FailCode::Unknown,
        ] {
            assert!(!code.node_fault(), "{code}");
            assert!(code.retriable(), "{code}");
        }
    }
}
