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
    /// Assigns queued jobs to eligible nodes with free credits, drawn by score.
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
            // Drawn before the job is borrowed; one draw per job considered.
            let u = self.rng.unit();
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            if !matches!(job.state, JobState::Queued) {
                continue;
            }
            let decision = self.choose_node(job, now, u);
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

    /// An eligible node with free credits that has not held this job before, drawn with
    /// weight `exp((score − best) / choice_temperature)`; `u` is a uniform draw in [0, 1).
    ///
    /// Always taking the best score starves every node but one: the node that served last
    /// keeps the best latency figure, so equal nodes must share by chance, with the score
    /// only tilting the odds (an e-fold per `choice_temperature` points).
    fn choose_node(&self, job: &Job, now: u64, u: f64) -> Choice {
        let tried = |id: &NodeId| job.leases.iter().any(|(n, _)| n == id);
        let mut untried_candidates = 0usize;
        let prior = self.latency_prior();
        let mut candidates: Vec<(u32, u32, &NodeId)> = Vec::new();
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
            candidates.push((self.score_with(rec, now, prior), free, &rec.id));
        }
        match pick(&mut candidates, self.sched.choice_temperature, u) {
            Some(id) => Choice::Node(id.clone()),
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
        if let Some(why) = rec.reported_not_ready() {
            return Err(why);
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
        self.score_with(rec, now, self.latency_prior())
    }

    /// The latency figure assumed for a node that has none yet: the median of the nodes'
    /// EWMAs. A new or recovered node then starts level with the fleet rather than below the
    /// node that has been serving (and so always holds the freshest figure).
    pub(super) fn latency_prior(&self) -> Option<f64> {
        let mut known: Vec<f64> = self
            .nodes
            .values()
            .filter_map(|n| n.latency_ewma_ms)
            .collect();
        if known.is_empty() {
            return None;
        }
        known.sort_by(f64::total_cmp);
        let mid = known.len() / 2;
        Some(if known.len().is_multiple_of(2) {
            (known[mid - 1] + known[mid]) / 2.0
        } else {
            known[mid]
        })
    }

    /// [`Self::score`] with the no-history latency given (computed once per choice).
    fn score_with(&self, rec: &NodeRecord, now: u64, prior: Option<f64>) -> u32 {
        let free = if rec.max_concurrency == 0 {
            0.0
        } else {
            f64::from(rec.free_slots()) / f64::from(rec.max_concurrency)
        };
        let r = self.sched.latency_ref_ms.max(1.0);
        // With no figure anywhere, the reference latency (half marks) for everyone.
        let latency = rec
            .latency_ewma_ms
            .or(prior)
            .map_or(0.5, |l| r / (r + l.max(0.0)));
        let penalty = rec.penalty.at(now, self.sched.penalty_half_life_ms) / PENALTY_MAX;
        let s = 400.0 * free + 300.0 * latency + 300.0 * (1.0 - penalty);
        s.round().clamp(0.0, 1000.0) as u32
    }
}

/// Draws one of `candidates` (score, free slots, id) with weight
/// `exp((score − best) / temperature)` using the uniform draw `u` in [0, 1). A temperature
/// of 0 (or anything not positive and finite) takes the best score, ties broken by free
/// slots then node id.
fn pick<'a>(
    candidates: &mut [(u32, u32, &'a NodeId)],
    temperature: f64,
    u: f64,
) -> Option<&'a NodeId> {
    // Node ids order the draw: the registry's hash map iterates in a per-process order,
    // which would make a seeded draw land on a different node each run.
    candidates.sort_by(|a, b| a.2.cmp(b.2));
    let best = candidates.iter().max_by(|a, b| {
        (a.0, a.1, std::cmp::Reverse(a.2)).cmp(&(b.0, b.1, std::cmp::Reverse(b.2)))
    })?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Some(best.2);
    }
    let top = f64::from(best.0);
    let weight = |score: u32| ((f64::from(score) - top) / temperature).exp();
    let total: f64 = candidates.iter().map(|c| weight(c.0)).sum();
    let mut target = u.clamp(0.0, 1.0) * total;
    for c in candidates.iter() {
        let w = weight(c.0);
        if target < w {
            return Some(c.2);
        }
        target -= w;
    }
    // Rounding left the target past the last weight: the last candidate.
    candidates.last().map(|c| c.2)
}

/// SplitMix64: small, seedable, and good enough to spread jobs (no security role: a node
/// gains nothing by predicting who gets the next job, every assignment is still bound to
/// its lease and checked).
#[derive(Debug, Clone)]
pub(super) struct ChoiceRng(u64);

impl ChoiceRng {
    pub(super) fn new(seed: Option<u64>) -> Self {
        Self(seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        }))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Choice {
    Node(NodeId),
    AllTried,
    Wait,
}

#[cfg(test)]
mod tests {
    //! Scheduling and reassignment under a manual clock: state is built with explicit times,
    //! events are fed with explicit times, and the assertions read the core's state and what
    //! it queued for each node's session.

    use resultity_protocol::ErrorCode;
    use resultity_protocol::messages::ws::NetworkMessage;

    use super::super::testkit::{
        T0, TestNode, cancels, model, other_model, report, result_for, submit,
    };
    use super::super::{JobOutcome, testkit};
    use super::*;
    use crate::settings::SchedulerSettings;

    fn ack_timeout(core: &Core) -> u64 {
        core.config.timing.ack_timeout_ms
    }

    /// With the seeded draw, the best node by far (a penalized node sits 120 points lower, a
    /// busy one 300: weights of e^-6 and e^-15) takes the job.
    #[test]
    fn a_job_goes_to_the_eligible_node_with_the_best_score() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut penalized = TestNode::join(&mut core, 1, 4, T0);
        let mut best = TestNode::join(&mut core, 2, 4, T0);
        let mut busy = TestNode::join(&mut core, 3, 4, T0);
        core.penalize(
            &penalized.id,
            PENALTY_TIMEOUT,
            "stall",
            Some(FailureCause::AckTimeout),
            T0,
        );
        // One free slot of four: a lower free-credit share.
        busy.connect(&mut core, 1, 4, T0);
        let score = |core: &Core, n: &TestNode| core.score(&core.nodes[&n.id], T0);
        assert!(score(&core, &best) > score(&core, &penalized));
        assert!(score(&core, &best) > score(&core, &busy));

        let (job, _rx) = submit(&mut core, "job-1", model(), T0);

        let got = best.assignments();
        assert_eq!(got.len(), 1);
        assert_eq!((&got[0].job_id, got[0].lease_epoch), (&job, 1));
        assert!(penalized.assignments().is_empty());
        assert!(busy.assignments().is_empty());
        let view = core.job_view(&job).expect("job is known");
        assert_eq!(view.node_id.as_ref(), Some(&best.id));
        assert_eq!(view.state, "assigned");
    }

    #[test]
    fn nodes_without_the_model_credits_or_standing_are_skipped() {
        let mut core = testkit::core(SchedulerSettings::default());
        // The only node that may take the job, and the worst by score.
        let mut ok = TestNode::join(&mut core, 1, 4, T0);
        core.penalize(
            &ok.id,
            PENALTY_TIMEOUT,
            "stall",
            Some(FailureCause::AckTimeout),
            T0,
        );
        let mut no_model = TestNode::join(&mut core, 2, 4, T0);
        let mut elsewhere = report(4);
        elsewhere.models[0].model = other_model();
        core.heartbeat(&no_model.id, elsewhere, T0)
            .expect("heartbeat");
        let mut no_credits = TestNode::join(&mut core, 3, 4, T0);
        no_credits.connect(&mut core, 0, 4, T0);
        let mut draining = TestNode::join(&mut core, 4, 4, T0);
        core.on_draining(&draining.id);
        let mut excluded = TestNode::join(&mut core, 5, 4, T0);
        let policy = core.penalty_policy();
        for i in 0..u64::from(policy.exclude_after_failures) {
            // One incident per window: the last one excludes the node.
            let t = T0 - policy.incident_window_ms * (10 - i);
            core.penalize(&excluded.id, 0.0, "stall", Some(FailureCause::Gone), t);
        }
        let why = |core: &Core, n: &TestNode| {
            core.eligible_for(&core.nodes[&n.id], &model(), T0)
                .err()
                .unwrap_or_default()
        };
        assert!(why(&core, &no_model).contains("not active"));
        assert!(why(&core, &draining).contains("draining"));
        assert!(why(&core, &excluded).starts_with("suspended until"));
        assert_eq!(why(&core, &no_credits), "", "eligible, but full");
        for n in [&mut no_model, &mut no_credits, &mut draining, &mut excluded] {
            n.sent();
        }

        let (job, _rx) = submit(&mut core, "job-1", model(), T0);

        assert_eq!(ok.assignments().len(), 1, "the eligible node takes it");
        for n in [&mut no_model, &mut no_credits, &mut draining, &mut excluded] {
            assert!(n.assignments().is_empty(), "{} was not eligible", n.id);
        }
        assert_eq!(
            core.job_view(&job).and_then(|v| v.node_id),
            Some(ok.id.clone())
        );
    }

    #[test]
    fn the_queue_waits_for_credits_and_dispatches_when_they_arrive() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut node = TestNode::join(&mut core, 1, 2, T0);
        node.connect(&mut core, 0, 2, T0);

        // Eligible but full: accepted and queued, not sent.
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        assert_eq!(core.stats().queued, 1);
        core.tick(T0 + 1_000);
        assert!(node.assignments().is_empty());
        assert_eq!(core.job_view(&job).map(|v| v.state), Some("queued"));

        // One slot free, nothing running.
        core.on_credits(&node.id, 1, 0, T0 + 2_000);

        let got = node.assignments();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].job_id, job);
        let stats = core.stats();
        assert_eq!((stats.queued, stats.in_flight), (0, 1));
        // That credit is now used: the next job waits again.
        let (second, _rx2) = submit(&mut core, "job-2", model(), T0 + 2_000);
        assert!(node.assignments().is_empty());
        assert_eq!(core.job_view(&second).map(|v| v.state), Some("queued"));
    }

    /// Two nodes with every slot free: `first` wins the tie on free slots. The choice takes
    /// the best score here (temperature 0), so these tests are about timing, not the draw.
    fn two_nodes(sched: SchedulerSettings) -> (Core, TestNode, TestNode) {
        let mut core = testkit::core(SchedulerSettings {
            choice_temperature: 0.0,
            ..sched
        });
        let first = TestNode::join(&mut core, 1, 4, T0);
        let second = TestNode::join(&mut core, 2, 2, T0);
        (core, first, second)
    }

    #[test]
    fn an_unacked_assignment_is_reassigned_at_exactly_the_ack_timeout() {
        let (mut core, mut a, mut b) = two_nodes(SchedulerSettings::default());
        let (job, mut rx) = submit(&mut core, "job-1", model(), T0);
        let first = a.assignments();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].lease_epoch, 1);
        let timeout = ack_timeout(&core);

        core.tick(T0 + timeout - 1);
        assert!(a.sent().is_empty(), "no cancel before the timeout");
        assert!(b.assignments().is_empty());

        core.tick(T0 + timeout);
        assert_eq!(cancels(&a.sent()), vec![(job.clone(), 1)]);
        let second = b.assignments();
        assert_eq!(second.len(), 1);
        assert_eq!((&second[0].job_id, second[0].lease_epoch), (&job, 2));
        let view = core.job_view(&job).expect("job is known");
        assert_eq!(view.node_id.as_ref(), Some(&b.id));
        assert_eq!(view.nodes_tried, vec![a.id.clone(), b.id.clone()]);
        assert_eq!(core.metrics.jobs_reassigned.get(), 1);
        let verdict = core.verdict(&a.id, T0 + timeout);
        assert!(verdict.penalty > 0);
        assert_eq!(verdict.reason.as_deref(), Some("ack timeout"));

        // The old holder's late ack and result are fenced by their epoch.
        let late = T0 + timeout + 10;
        let ack = core.on_ack(&a.id, &job, 1);
        assert_eq!(ack.map_err(|e| e.0), Err(ErrorCode::StaleLease));
        let stale = core.on_result(&a.id, result_for(&first[0], "late"), late);
        assert_eq!(stale.map_err(|e| e.0), Err(ErrorCode::StaleLease));
        assert_eq!(core.metrics.stale_results.get(), 1);
        let told = a.sent();
        assert!(
            told.iter()
                .any(|m| matches!(m, NetworkMessage::ResultConfirm { lease_epoch: 1, .. }))
        );
        assert_eq!(cancels(&told), vec![(job.clone(), 1)]);
        assert!(rx.try_recv().is_err(), "the caller is still waiting");

        core.on_ack(&b.id, &job, 2).expect("current holder acks");
        core.on_result(&b.id, result_for(&second[0], "done"), late)
            .expect("current holder's result");
        match rx.try_recv() {
            Ok(JobOutcome::Completed(done)) => {
                assert_eq!(
                    (done.node_id, done.lease_epoch, done.attempts),
                    (b.id, 2, 2)
                );
                assert_eq!(done.output, "done");
            }
            other => panic!("expected a completed job, got {other:?}"),
        }
    }

    #[test]
    fn an_acked_job_is_reassigned_at_its_execution_deadline() {
        let sched = SchedulerSettings {
            attempt_timeout_ms: 10_000,
            ..SchedulerSettings::default()
        };
        let (mut core, mut a, mut b) = two_nodes(sched);
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        assert_eq!(a.assignments()[0].deadline_ms, T0 + 10_000);
        core.on_ack(&a.id, &job, 1).expect("ack");

        // Acked, so the ack timeout does not apply; the execution deadline does.
        core.tick(T0 + 10_000 - 1);
        assert!(a.sent().is_empty());
        assert_eq!(core.job_view(&job).map(|v| v.state), Some("running"));

        core.tick(T0 + 10_000);
        assert_eq!(cancels(&a.sent()), vec![(job.clone(), 1)]);
        let got = b.assignments();
        assert_eq!((got.len(), got[0].lease_epoch), (1, 2));
        assert_eq!(
            core.verdict(&a.id, T0 + 10_000).reason.as_deref(),
            Some("execution deadline passed")
        );
    }

    #[test]
    fn a_caller_deadline_fails_the_job_and_cancels_it() {
        let sched = SchedulerSettings {
            request_timeout_ms: 20_000,
            ..SchedulerSettings::default()
        };
        let (mut core, mut a, _b) = two_nodes(sched);
        let (job, mut rx) = submit(&mut core, "job-1", model(), T0);
        core.on_ack(&a.id, &job, 1).expect("ack");
        a.sent();

        core.tick(T0 + 20_000 - 1);
        assert!(rx.try_recv().is_err());
        core.tick(T0 + 20_000);

        assert_eq!(cancels(&a.sent()), vec![(job.clone(), 1)]);
        match rx.try_recv() {
            Ok(JobOutcome::Failed { code, .. }) => assert_eq!(code, ErrorCode::Timeout),
            other => panic!("expected a timeout, got {other:?}"),
        }
        // The caller's deadline is not the node's fault.
        assert_eq!(core.verdict(&a.id, T0 + 20_000).penalty, 0);
    }

    #[test]
    fn a_node_gone_past_its_resume_window_has_its_jobs_handed_back() {
        let (mut core, mut a, mut b) = two_nodes(SchedulerSettings::default());
        let window = core.config.timing.resume_window_ms;
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        core.on_ack(&a.id, &job, 1).expect("ack");
        a.assignments();
        let gone = T0 + 1_000;
        a.disconnect(&mut core, gone);

        // Within the window the lease waits for the node to come back.
        let before = gone + window - 1;
        core.heartbeat(&b.id, report(2), before).expect("heartbeat");
        core.tick(before);
        assert!(b.assignments().is_empty());
        assert_eq!(
            core.job_view(&job).and_then(|v| v.node_id),
            Some(a.id.clone())
        );

        let after = gone + window;
        core.heartbeat(&b.id, report(2), after).expect("heartbeat");
        core.tick(after);
        let got = b.assignments();
        assert_eq!(got.len(), 1);
        assert_eq!((&got[0].job_id, got[0].lease_epoch), (&job, 2));
        assert_eq!(core.nodes[&a.id].failed, 1);
        assert_eq!(
            core.nodes[&a.id].penalty.reason(),
            Some("node gone past the resume window")
        );
        assert!(core.nodes[&a.id].outstanding.is_empty());
    }

    #[test]
    fn a_node_back_within_its_resume_window_keeps_its_lease() {
        let (mut core, mut a, mut b) = two_nodes(SchedulerSettings::default());
        let window = core.config.timing.resume_window_ms;
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        a.assignments();
        a.disconnect(&mut core, T0 + 1_000);
        // Unacked, but the ack timeout waits while the node is away.
        core.tick(T0 + 1_000 + ack_timeout(&core));
        assert!(b.assignments().is_empty());

        let back = T0 + window;
        let resent = a.connect(&mut core, 4, 4, back);

        assert_eq!(resent, 1);
        let again = a.assignments();
        assert_eq!((&again[0].job_id, again[0].lease_epoch), (&job, 1));
        // A fresh ack window from the reconnect.
        core.tick(back + ack_timeout(&core) - 1);
        assert!(cancels(&a.sent()).is_empty());
        assert_eq!(
            core.job_view(&job).and_then(|v| v.node_id),
            Some(a.id.clone())
        );
        assert_eq!(core.verdict(&a.id, back).penalty, 0);
    }
    /// One caller sending jobs one after another: the job goes out, the node that got it
    /// acks, and its result arrives `latency(node)` ms later, when the next job is sent.
    /// Every node heartbeats at each step so none goes stale over a long run. Returns the
    /// index of the node that served and the time its result arrived.
    fn serve_next(
        core: &mut Core,
        nodes: &mut [TestNode],
        job: &str,
        now: u64,
        latency: &dyn Fn(usize) -> u64,
    ) -> (usize, u64) {
        for n in nodes.iter() {
            core.heartbeat(&n.id, report(4), now).expect("heartbeat");
        }
        let (job_id, _rx) = submit(core, job, model(), now);
        let mut holder = None;
        for (i, n) in nodes.iter_mut().enumerate() {
            for a in n.assignments() {
                assert!(holder.is_none(), "one job, one assignment");
                holder = Some((i, a));
            }
        }
        let (i, a) = holder.expect("an eligible node takes the job");
        core.on_ack(&nodes[i].id, &job_id, a.lease_epoch)
            .expect("ack");
        let done = now + latency(i);
        core.on_result(&nodes[i].id, result_for(&a, "ok"), done)
            .expect("result");
        (i, done)
    }

    fn seeded(seed: u64) -> Core {
        testkit::core(SchedulerSettings {
            choice_seed: Some(seed),
            ..SchedulerSettings::default()
        })
    }

    #[test]
    fn equal_nodes_share_sequential_jobs() {
        for seed in 1..=5 {
            let mut core = seeded(seed);
            let mut nodes: Vec<TestNode> = (1..=4)
                .map(|i| TestNode::join(&mut core, i, 4, T0))
                .collect();
            let mut served = [0u32; 4];
            let mut now = T0;
            for k in 0..400u64 {
                // Latency varies from job to job, not from node to node.
                let lat = 45 + (k * 7) % 11;
                let (i, done) =
                    serve_next(&mut core, &mut nodes, &format!("job-{k}"), now, &|_| lat);
                served[i] += 1;
                now = done;
            }
            // A fair share is 100 of 400 (standard deviation 8.7): ±28 is over 3 deviations.
            for (i, n) in served.iter().enumerate() {
                assert!(
                    (72..=128).contains(n),
                    "seed {seed}: node {i} served {n} of 400: {served:?}"
                );
            }
        }
    }

    #[test]
    fn a_node_that_joins_mid_run_gets_a_job_soon() {
        for seed in 1..=10 {
            let mut core = seeded(seed);
            let mut nodes: Vec<TestNode> = (1..=3)
                .map(|i| TestNode::join(&mut core, i, 4, T0))
                .collect();
            let mut now = T0;
            for k in 0..100 {
                now = serve_next(&mut core, &mut nodes, &format!("job-{k}"), now, &|_| 100).1;
            }
            nodes.push(TestNode::join(&mut core, 4, 4, now));
            let score = |core: &Core, n: &TestNode| core.score(&core.nodes[&n.id], now);
            // No latency figure yet: it starts level with the fleet's median, not below it.
            assert_eq!(
                score(&core, &nodes[3]),
                score(&core, &nodes[0]),
                "seed {seed}"
            );
            // At one chance in four per job, 20 jobs without one happen 0.3 % of the time;
            // at 100 ms a job that is 2 s.
            let first = (100..120).find(|k| {
                let (i, done) =
                    serve_next(&mut core, &mut nodes, &format!("job-{k}"), now, &|_| 100);
                now = done;
                i == 3
            });
            assert!(
                first.is_some(),
                "seed {seed}: the new node got none of 20 jobs"
            );
        }
    }

    #[test]
    fn a_node_five_times_slower_gets_fewer_jobs() {
        for seed in 1..=5 {
            let mut core = seeded(seed);
            let mut nodes: Vec<TestNode> = (1..=4)
                .map(|i| TestNode::join(&mut core, i, 4, T0))
                .collect();
            let latency = |i: usize| if i == 0 { 500 } else { 100 };
            let mut served = [0u32; 4];
            let mut now = T0;
            for k in 0..400 {
                let (i, done) =
                    serve_next(&mut core, &mut nodes, &format!("job-{k}"), now, &latency);
                served[i] += 1;
                now = done;
            }
            let fewest_fast = served[1..].iter().copied().min().unwrap_or(0);
            assert!(
                served[0] < fewest_fast,
                "seed {seed}: slow node served {} ({served:?})",
                served[0]
            );
            // It still gets some work, so its figure can recover.
            assert!(served[0] > 0, "seed {seed}: {served:?}");
        }
    }

    #[test]
    fn a_penalized_node_is_drawn_less() {
        let mut core = seeded(3);
        let mut nodes: Vec<TestNode> = (1..=3)
            .map(|i| TestNode::join(&mut core, i, 4, T0))
            .collect();
        core.penalize(
            &nodes[0].id,
            PENALTY_TIMEOUT,
            "stall",
            Some(FailureCause::AckTimeout),
            T0,
        );
        let mut served = [0u32; 3];
        let mut now = T0;
        // 300 jobs at 50 ms: 15 s, a quarter of the penalty's half-life.
        for k in 0..300 {
            let (i, done) = serve_next(&mut core, &mut nodes, &format!("job-{k}"), now, &|_| 50);
            served[i] += 1;
            now = done;
        }
        assert!(served[0] * 10 < served[1].min(served[2]), "{served:?}");
    }

    #[test]
    fn credits_are_never_exceeded() {
        for seed in 1..=10u64 {
            let mut core = seeded(seed);
            let sizes = [1u32, 2, 3, 4];
            let mut nodes: Vec<TestNode> = sizes
                .iter()
                .zip(1u8..)
                .map(|(&max, i)| TestNode::join(&mut core, i, max, T0))
                .collect();
            let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
            let check = |core: &Core, what: &str| {
                for (id, max) in ids.iter().zip(sizes) {
                    let held = core.nodes[id].outstanding.len();
                    assert!(
                        held <= max as usize,
                        "seed {seed}, {what}: {held} on a node of {max}"
                    );
                }
            };
            let mut open = Vec::new();
            let mut rxs = Vec::new();
            for k in 0..30 {
                let (_, rx) = submit(&mut core, &format!("job-{k}"), model(), T0);
                rxs.push(rx);
                check(&core, "submitting");
            }
            let mut now = T0;
            let mut x = seed;
            loop {
                for n in nodes.iter_mut() {
                    open.extend(n.assignments().into_iter().map(|a| (n.id.clone(), a)));
                }
                let stats = core.stats();
                assert_eq!(stats.in_flight, open.len(), "seed {seed}");
                if open.is_empty() {
                    break;
                }
                // Every credit is in use while jobs wait.
                if stats.queued > 0 {
                    assert_eq!(open.len(), 10, "seed {seed}");
                }
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let (node, a) = open.swap_remove((x >> 33) as usize % open.len());
                now += 7;
                core.on_ack(&node, &a.job_id, a.lease_epoch).expect("ack");
                core.on_result(&node, result_for(&a, "ok"), now)
                    .expect("result");
                check(&core, "completing");
            }
            assert_eq!(core.stats().queued, 0, "seed {seed}");
        }
    }

    #[test]
    fn the_draw_weights_nodes_by_their_score_gap() {
        let ids: Vec<NodeId> = (1..=2u8)
            .map(|i| {
                resultity_protocol::NodeKeypair::from_seed(&[i; 32])
                    .id()
                    .clone()
            })
            .collect();
        let draws = 10_000;
        let share_of_second = |temperature: f64, scores: [u32; 2]| {
            let hits = (0..draws)
                .filter(|k| {
                    let u = (f64::from(*k) + 0.5) / f64::from(draws);
                    let mut c = [(scores[0], 4, &ids[0]), (scores[1], 4, &ids[1])];
                    pick(&mut c, temperature, u) == Some(&ids[1])
                })
                .count();
            hits as f64 / f64::from(draws)
        };
        // One temperature below: weight e^-1 against 1.
        let want = (-1f64).exp() / (1.0 + (-1f64).exp());
        assert!((share_of_second(20.0, [1000, 980]) - want).abs() < 1e-3);
        assert!((share_of_second(20.0, [980, 1000]) - (1.0 - want)).abs() < 1e-3);
        assert_eq!(share_of_second(20.0, [900, 900]), 0.5);
        // Temperature 0: always the best; on a tie, the lower node id.
        assert_eq!(share_of_second(0.0, [1000, 980]), 0.0);
        assert_eq!(share_of_second(0.0, [980, 1000]), 1.0);
        let lower = if ids[0] < ids[1] { 0.0 } else { 1.0 };
        assert_eq!(share_of_second(0.0, [900, 900]), lower);
        assert_eq!(pick(&mut [], 20.0, 0.5), None);
    }
}
