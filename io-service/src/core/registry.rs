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
use super::{Core, Outbound, RateLimiter, Refusal, SessionLink, clip, not_registered};
use crate::settings::Limits;

/// Most of a node's own not-ready reasons quoted in its verdict (the report is peer input).
const MAX_REASONS_QUOTED: usize = 4;

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

    /// A job the node held ended: its slot is free again.
    pub(super) fn job_finished(&mut self, job: &JobId) {
        if self.job_given_up(job) {
            // A node may claim u32::MAX slots; the count saturates at its cap.
            self.reported_credits = self
                .reported_credits
                .saturating_add(1)
                .min(self.max_concurrency);
        }
    }

    /// A job the node gave back because it cannot take it (not ready, full, handing work
    /// back): the node no longer holds it, but its slot stays taken until the node's next
    /// `credits` says otherwise. Freeing it here would undo the 0 credits a node that is not
    /// ready advertised, and every hand-back would fetch the next job to bounce. Returns
    /// whether the node held the job.
    pub(super) fn job_given_up(&mut self, job: &JobId) -> bool {
        let held = self.outstanding.remove(job) || self.cancelled.remove(job);
        if held {
            // `free_slots` takes jobs beyond the reported in-flight count off the reported
            // credits; keep that difference so the slot stays taken: one fewer counted job,
            // or, with none counted, one fewer credit.
            if self.reported_in_flight > 0 {
                self.reported_in_flight -= 1;
            } else {
                self.reported_credits = self.reported_credits.saturating_sub(1);
            }
        }
        held
    }

    /// Why the node says it cannot serve jobs (from its last heartbeat), if it says so.
    pub(super) fn reported_not_ready(&self) -> Option<String> {
        let reasons = &self.report.as_ref()?.not_ready;
        if reasons.is_empty() {
            return None;
        }
        let mut quoted: Vec<String> = reasons
            .iter()
            .take(MAX_REASONS_QUOTED)
            .map(|r| clip(r))
            .collect();
        if reasons.len() > MAX_REASONS_QUOTED {
            quoted.push(format!("and {} more", reasons.len() - MAX_REASONS_QUOTED));
        }
        Some(format!("node not ready: {}", quoted.join("; ")))
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
            penalty: self.penalty_u32(&rec.penalty, now),
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

#[cfg(test)]
mod tests {
    use resultity_protocol::messages::FailCode;

    use super::super::testkit::{self, T0, TestNode, model, report, submit};
    use crate::settings::SchedulerSettings;

    /// A node that advertised 0 credits (not ready) while running jobs, with more queued: the
    /// jobs it fails or hands back return no slot, so nothing new reaches it until it
    /// advertises credits again.
    #[test]
    fn a_hand_back_does_not_restore_a_credit_the_node_took_away() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut a = TestNode::join(&mut core, 1, 2, T0);
        let (j1, _r1) = submit(&mut core, "job-1", model(), T0);
        let (j2, _r2) = submit(&mut core, "job-2", model(), T0);
        assert_eq!(a.assignments().len(), 2);
        core.on_ack(&a.id, &j1, 1).expect("ack");
        core.on_ack(&a.id, &j2, 1).expect("ack");
        let mut t = T0 + 100;
        // The outbox became unwritable: 0 credits, both jobs still running.
        core.on_credits(&a.id, 0, 2, t);
        let queued: Vec<_> = (3..8)
            .map(|i| submit(&mut core, &format!("job-{i}"), model(), t))
            .collect();
        assert!(a.assignments().is_empty(), "no credits, no assignment");

        t += 100;
        core.on_fail(
            &a.id,
            &j1,
            1,
            FailCode::OutboxUnavailable,
            "disk full",
            None,
            t,
        )
        .expect("holder fails its lease");
        assert!(
            a.assignments().is_empty(),
            "the failed job's slot came back although the node advertised 0 credits"
        );
        t += 100;
        core.on_fail(
            &a.id,
            &j2,
            1,
            FailCode::HandedBack,
            "outbox cannot be written",
            None,
            t,
        )
        .expect("holder hands its lease back");
        assert!(
            a.assignments().is_empty(),
            "the hand-back restored a credit"
        );
        core.tick(t + 10);
        assert!(a.assignments().is_empty());
        assert_eq!(core.nodes[&a.id].free_slots(), 0);
        assert_eq!(core.stats().queued, queued.len() + 2);

        // Writable again: the node says so, and work flows.
        t += 100;
        core.on_credits(&a.id, 2, 0, t);
        assert_eq!(a.assignments().len(), 2);
    }

    /// A job assigned after the node's last advertisement and handed back keeps its slot
    /// taken as well (the arithmetic differs: it was never in the reported in-flight count).
    #[test]
    fn a_hand_back_of_a_job_assigned_since_the_last_advertisement_frees_no_slot() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut a = TestNode::join(&mut core, 1, 2, T0);
        let (j1, _r1) = submit(&mut core, "job-1", model(), T0);
        assert_eq!(a.assignments().len(), 1);
        assert_eq!(core.nodes[&a.id].free_slots(), 1);
        core.on_fail(
            &a.id,
            &j1,
            1,
            FailCode::HandedBack,
            "runtime down",
            None,
            T0 + 10,
        )
        .expect("holder hands its lease back");
        assert_eq!(core.nodes[&a.id].free_slots(), 1, "slot stays taken");
        core.on_credits(&a.id, 2, 0, T0 + 20);
        assert_eq!(core.nodes[&a.id].free_slots(), 2);
    }

    /// The node's own not-ready reasons make it ineligible, with them as the reason, from the
    /// heartbeat that carries them until the one that clears them.
    #[test]
    fn a_node_reporting_not_ready_is_not_eligible_and_says_why() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut a = TestNode::join(&mut core, 1, 4, T0);
        let t = T0 + 100;
        let mut sick = report(4);
        sick.not_ready = vec![
            "results cannot be stored: No space left on device".into(),
            "no GPU visible to the sidecar: no device found".into(),
        ];
        let verdict = core.heartbeat(&a.id, sick, t).expect("heartbeat");
        assert!(!verdict.eligible);
        let reason = verdict.reason.expect("a reason");
        assert_eq!(
            reason,
            "node not ready: results cannot be stored: No space left on device; \
             no GPU visible to the sidecar: no device found"
        );
        let view = core.node_views(t).remove(0);
        assert!(!view.eligible);
        assert_eq!(view.reason.as_deref(), Some(reason.as_str()));
        // Its free credits do not make it a candidate: a job finds no eligible node.
        assert_eq!(core.nodes[&a.id].free_slots(), 4);
        let refused = core.submit(
            resultity_protocol::JobId::parse("job-1").expect("job id"),
            testkit::chat_spec(model()),
            t,
        );
        assert_eq!(
            refused.err().map(|e| e.0),
            Some(resultity_protocol::ErrorCode::NoEligibleNode)
        );
        assert!(a.assignments().is_empty());

        let verdict = core
            .heartbeat(&a.id, report(4), t + 100)
            .expect("heartbeat");
        assert!(verdict.eligible, "{:?}", verdict.reason);
        let (_job, _rx) = submit(&mut core, "job-2", model(), t + 100);
        assert_eq!(a.assignments().len(), 1, "routed again once it is ready");
    }

    /// Peer-supplied reasons are bounded in the verdict.
    #[test]
    fn a_node_s_not_ready_reasons_are_bounded_in_its_verdict() {
        let mut core = testkit::core(SchedulerSettings::default());
        let a = TestNode::join(&mut core, 1, 4, T0);
        let mut sick = report(4);
        sick.not_ready = vec!["x".repeat(10_000); 1_000];
        let reason = core
            .heartbeat(&a.id, sick, T0 + 1)
            .expect("heartbeat")
            .reason
            .expect("a reason");
        assert!(reason.len() < 1_000, "{} bytes", reason.len());
        assert!(reason.ends_with("; and 996 more"), "{reason}");
    }
}
