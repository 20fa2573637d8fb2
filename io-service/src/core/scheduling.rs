//! Scheduling: which node may serve which job (eligibility), which is best (score), handing
//! queued jobs out within each node's credits (dispatch, assign), and the clock (tick): ack
//! timeouts, execution and caller deadlines, resume windows, and the reassignments they cause.

use std::collections::VecDeque;

use resultity_protocol::config::ConfigDigest;
use resultity_protocol::messages::{JobKind, ModelRef, ModelState, RuntimeKind};
use resultity_protocol::{ErrorCode, JobId, NodeId};

use super::jobs::{Job, JobState, Lease, assignment};
use super::penalties::{FailureCause, PENALTY_MAX, PENALTY_TIMEOUT};
use super::registry::NodeRecord;
use super::{Core, Outbound, ms_to_s};

impl Core {
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
        self.end_suspensions(now);
        self.dispatch(now);
        self.refresh_gauges(now);
        self.refresh_eligible_gauge(now);
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

    /// Model-independent conditions, with the first failing one as the reason.
    pub(super) fn node_ready(&self, rec: &NodeRecord, now: u64) -> Result<(), String> {
        let timing = &self.config.timing;
        if self.is_revoked(&rec.id) {
            return Err("node key revoked".into());
        }
        if let Some(until) = rec.penalty.suspended_until(now) {
            return Err(format!(
                "suspended until {until}: {}",
                rec.penalty.reason().unwrap_or("repeated failures")
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
    pub(super) fn eligible_for(
        &self,
        rec: &NodeRecord,
        model: &ModelRef,
        now: u64,
    ) -> Result<(), String> {
        self.node_ready(rec, now)?;
        self.model_ok(rec, model)
    }

    pub(super) fn model_ok(&self, rec: &NodeRecord, model: &ModelRef) -> Result<(), String> {
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

    pub(super) fn active_models(&self, rec: &NodeRecord) -> Vec<ModelRef> {
        self.config
            .models
            .iter()
            .filter(|m| self.model_ok(rec, &m.model).is_ok())
            .map(|m| m.model.clone())
            .collect()
    }

    /// 0–1000: 400 for the share of free credits, 300 for latency, 300 for a clean record.
    pub(super) fn score(&self, rec: &NodeRecord, now: u64) -> u32 {
        let free = if rec.max_concurrency == 0 {
            0.0
        } else {
            f64::from(rec.free_slots()) / f64::from(rec.max_concurrency)
        };
        let r = self.sched.latency_ref_ms.max(1.0);
        let latency = rec.latency_ewma_ms.map_or(0.5, |l| r / (r + l.max(0.0)));
        let penalty = rec.penalty.at(now, self.sched.penalty_half_life_ms) / PENALTY_MAX;
        let s = 400.0 * free + 300.0 * latency + 300.0 * (1.0 - penalty);
        s.round().clamp(0.0, 1000.0) as u32
    }
}

enum Choice {
    Node(NodeId),
    AllTried,
    Wait,
}
