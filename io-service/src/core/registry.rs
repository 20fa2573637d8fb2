//! The node registry: what the network knows of each registered node (capabilities, last
//! report, session, credits, outstanding work) and the events that change it — registration,
//! heartbeats, deregistration, sessions opening and closing, credit and drain reports.

use std::collections::HashSet;

use ed25519_dalek::VerifyingKey;
use resultity_protocol::messages::Verdict;
use resultity_protocol::messages::http::{Capabilities, NodeReport, RegisterRequest};
use resultity_protocol::messages::ws::NetworkMessage;
use resultity_protocol::{JobId, NodeId};

use super::jobs::{JobState, assignment};
use super::penalties::PenaltyState;
use super::views::gauge;
use super::{Core, Outbound, RateLimiter, Refusal, SessionLink, not_registered};
use crate::settings::Limits;

/// What the network knows of one registered node.
#[derive(Debug)]
pub(super) struct NodeRecord {
    pub(super) id: NodeId,
    pub(super) key: VerifyingKey,
    pub(super) capabilities: Capabilities,
    pub(super) protocol_version: u32,
    pub(super) report: Option<NodeReport>,
    pub(super) last_heartbeat_ms: Option<u64>,
    pub(super) session: Option<SessionLink>,
    pub(super) disconnected_at_ms: Option<u64>,
    pub(super) max_concurrency: u32,
    /// Free slots and in-flight jobs as last reported (auth, `credits`), adjusted by the
    /// results received since, so a node that reports rarely is neither over- nor under-fed.
    pub(super) reported_credits: u32,
    pub(super) reported_in_flight: u32,
    pub(super) draining: bool,
    pub(super) drained: bool,
    /// Jobs assigned to this node and not finished (unacked or running).
    pub(super) outstanding: HashSet<JobId>,
    /// Jobs taken back from this node that it may still be running: they keep occupying a
    /// credit until the node says otherwise (a `credits` report, a new session, or a late
    /// result/fail for them), so a reassignment never pushes a node past its credits.
    pub(super) cancelled: HashSet<JobId>,
    pub(super) max_outstanding_seen: u32,
    pub(super) latency_ewma_ms: Option<f64>,
    /// Decaying penalty, failed incidents and suspension (owned by the penalties part).
    pub(super) penalty: PenaltyState,
    pub(super) invalid_signatures: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    pub(super) http_rate: RateLimiter,
}

impl NodeRecord {
    pub(super) fn new(
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
            penalty: PenaltyState::new(now),
            invalid_signatures: 0,
            completed: 0,
            failed: 0,
            http_rate: RateLimiter::new(limits.node_http_rate_per_s, limits.node_http_burst, now),
        }
    }

    /// Slots the scheduler may still fill: bounded by the node's concurrency and by its
    /// reported credits minus what was assigned since that report.
    pub(super) fn free_slots(&self) -> u32 {
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

    pub(super) fn job_finished(&mut self, job: &JobId) {
        if self.outstanding.remove(job) || self.cancelled.remove(job) {
            self.reported_in_flight = self.reported_in_flight.saturating_sub(1);
            // A node may claim u32::MAX slots; the count saturates at its cap.
            self.reported_credits = self
                .reported_credits
                .saturating_add(1)
                .min(self.max_concurrency);
        }
    }
}

impl Core {
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
        let rec = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| not_registered(node))?;
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
            (Ok(()), true) => rec.penalty.reason().map(str::to_owned),
        };
        Verdict {
            eligible,
            score: self.score(rec, now),
            penalty: self.penalty_u32(rec, now),
            reason,
            suspended_until_ms: rec.penalty.suspended_until(now),
        }
    }

    /// Deregistration: the node's open jobs go back to the queue without penalty.
    pub fn deregister(&mut self, node: &NodeId, now: u64) -> Result<(), Refusal> {
        if !self.nodes.contains_key(node) {
            return Err(not_registered(node));
        }
        self.remove_node(
            node,
            resultity_protocol::codes::close::EXCLUDED,
            "deregistered",
            now,
        );
        Ok(())
    }

    pub(super) fn remove_node(&mut self, node: &NodeId, close_code: u16, why: &str, now: u64) {
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
        let rec = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| not_registered(node))?;
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
}
