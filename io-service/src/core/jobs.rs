//! Jobs: the job table's entries and their life — submission, acks, results (checked against
//! the lease that dictated them), failures, streamed chunks, a caller going away, a lease taken
//! back (and queued again or failed) and a job finished.

use resultity_protocol::config::ConfigDigest;
use resultity_protocol::messages::ws::{JobAssignment, JobResult, NetworkMessage, RuntimeRefusal};
use resultity_protocol::messages::{FailCode, JobKind, ModelRef, Usage};
use resultity_protocol::{ErrorCode, JobId, NodeId};
use tokio::sync::oneshot;

use super::penalties::{FailureCause, PENALTY_INVALID_RESULT, PENALTY_RUNTIME_ERROR};
use super::{Core, Refusal, clip, ms_to_s, not_assigned};
use crate::stream::{StreamSink, StreamState};

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

/// One assignment of a job to a node.
#[derive(Debug, Clone)]
pub(super) struct Lease {
    pub(super) node: NodeId,
    /// Config the node must run this lease under (sent in `job.assign`, checked on the result).
    pub(super) config_digest: ConfigDigest,
    pub(super) assigned_ms: u64,
    pub(super) acked: bool,
    pub(super) ack_deadline_ms: u64,
    pub(super) exec_deadline_ms: u64,
}

/// Where a job is in its life.
#[derive(Debug, Clone)]
pub(super) enum JobState {
    Queued,
    Assigned(Lease),
    Completed { node: NodeId, epoch: u64 },
    Failed { code: ErrorCode, reason: String },
}

/// A job and everything its caller and the scheduler need to know of it.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) id: JobId,
    pub(super) spec: JobSpec,
    pub(super) created_ms: u64,
    pub(super) deadline_ms: u64,
    pub(super) state: JobState,
    pub(super) lease_epoch: u64,
    pub(super) attempts: u32,
    /// Every (node, epoch) this job was leased to: tells stale leases from foreign jobs.
    pub(super) leases: Vec<(NodeId, u64)>,
    pub(super) waiter: Option<oneshot::Sender<JobOutcome>>,
    pub(super) finished_ms: Option<u64>,
    pub(super) last_error: Option<String>,
    /// A streamed job's chunk state (dropped when the job finishes, which ends the stream).
    pub(super) stream: Option<StreamState>,
    /// The runtime's refusal that failed the job, for the caller.
    pub(super) refusal: Option<RuntimeRefusal>,
}

impl Core {
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

    pub fn on_ack(&mut self, node: &NodeId, job_id: &JobId, epoch: u64) -> Result<(), Refusal> {
        let job = self.jobs.get(job_id).ok_or_else(|| not_assigned(job_id))?;
        self.lease_check(job, node, epoch).map_err(|f| f.refusal)?;
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
        if let Err(fault) = self.lease_check(job, node, result.lease_epoch) {
            // Fenced, never issued or foreign: never acceptable, so confirmed ("needed no
            // more") to clear the node's outbox, and refused with the reason.
            self.confirm(node, &result);
            let LeaseFault { refusal, fenced } = fault;
            if fenced {
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
            rec.penalty.record_success();
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
        if let Err(LeaseFault { refusal, fenced }) = self.lease_check(job, node, epoch) {
            if fenced && let Some(rec) = self.nodes.get_mut(node) {
                // The node gave up a job we had already taken back: its slot is free, unless
                // the node said it cannot take work.
                if code.withholds_slot() {
                    rec.job_given_up(job_id);
                } else {
                    rec.job_finished(job_id);
                }
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
        // The node no longer runs it: its credit is free again (no zombie) — unless the node
        // gave it back because it cannot take work, when its next `credits` decides.
        if let Some(rec) = self.nodes.get_mut(node) {
            if code.withholds_slot() {
                rec.job_given_up(job_id);
            } else {
                rec.job_finished(job_id);
            }
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
        if let Err(LeaseFault { refusal, fenced }) = self.lease_check(job, node, epoch) {
            if fenced {
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

    fn confirm(&self, node: &NodeId, result: &JobResult) {
        self.send(
            node,
            NetworkMessage::ResultConfirm {
                job_id: result.job_id.clone(),
                lease_epoch: result.lease_epoch,
            },
        );
    }

    /// Checks that `node` holds the current lease of `job` at `epoch` (spec §7.5): a job
    /// never leased to `node` is `not_assigned`; any other epoch of a job it holds or held is
    /// `stale_lease` — fenced when the network issued that lease and took it back, else an
    /// epoch it never issued to the node, which frees and cancels nothing.
    fn lease_check(&self, job: &Job, node: &NodeId, epoch: u64) -> Result<(), LeaseFault> {
        let holds = matches!(&job.state, JobState::Assigned(lease) if &lease.node == node);
        if holds && job.lease_epoch == epoch {
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
            return Err(LeaseFault {
                refusal: (
                    ErrorCode::StaleLease,
                    format!(
                        "lease {epoch} of job {} is no longer current: {now_state}",
                        job.id
                    ),
                ),
                fenced: true,
            });
        }
        if holds || job.leases.iter().any(|(n, _)| n == node) {
            return Err(LeaseFault {
                refusal: (
                    ErrorCode::StaleLease,
                    format!(
                        "lease {epoch} of job {} was never issued to this node; its lease is {}",
                        job.id, job.lease_epoch
                    ),
                ),
                fenced: false,
            });
        }
        Err(LeaseFault {
            refusal: (
                ErrorCode::NotAssigned,
                format!("job {} is not assigned to this node", job.id),
            ),
            fenced: false,
        })
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

    pub(super) fn holder(&self, job_id: &JobId) -> Option<NodeId> {
        match self.jobs.get(job_id).map(|j| &j.state) {
            Some(JobState::Assigned(l)) => Some(l.node.clone()),
            _ => None,
        }
    }

    pub(super) fn cancel_on(&mut self, node: &NodeId, job_id: &JobId, why: &str) {
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
    pub(super) fn take_back(&mut self, job_id: &JobId, node: Option<&NodeId>, why: &str, now: u64) {
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

    pub(super) fn finish_failed(
        &mut self,
        job_id: &JobId,
        code: ErrorCode,
        reason: String,
        now: u64,
    ) {
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
}

pub(super) fn assignment(
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
pub(super) fn check_result_binding(
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

/// Why a message about a lease is refused; `fenced`: the network issued that lease to the
/// node and took it back, so the node's slot and the lease's run are to be released.
struct LeaseFault {
    refusal: Refusal,
    fenced: bool,
}

#[cfg(test)]
mod tests {
    use resultity_protocol::messages::FailCode;

    use super::super::testkit::{self, T0, TestNode, cancels, model, submit};
    use super::*;
    use crate::settings::SchedulerSettings;

    /// The best score always wins (no draw): these tests are about leases, not the choice.
    fn argmax() -> Core {
        testkit::core(SchedulerSettings {
            choice_temperature: 0.0,
            ..SchedulerSettings::default()
        })
    }

    /// A job leased to `a` (the preferred node) with `b` standing by.
    fn leased() -> (Core, TestNode, TestNode, JobId) {
        let mut core = argmax();
        let mut a = TestNode::join(&mut core, 1, 4, T0);
        let b = TestNode::join(&mut core, 2, 2, T0);
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        assert_eq!(a.assignments().len(), 1);
        core.on_ack(&a.id, &job, 1).expect("ack");
        (core, a, b, job)
    }

    #[test]
    fn a_node_claiming_u32_max_slots_finishes_a_job() {
        let mut core = testkit::core(SchedulerSettings::default());
        let mut a = TestNode::join(&mut core, 1, u32::MAX, T0);
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        let got = a.assignments();
        assert_eq!(got.len(), 1);
        core.on_ack(&a.id, &job, 1).expect("ack");
        core.on_result(&a.id, testkit::result_for(&got[0], "done"), T0 + 10)
            .expect("the holder's result is taken");
        assert_eq!(core.nodes[&a.id].free_slots(), u32::MAX);
    }

    #[test]
    fn a_hand_back_is_reassigned_without_penalty() {
        for code in [FailCode::RuntimeUnavailable, FailCode::HandedBack] {
            let (mut core, a, mut b, job) = leased();
            let t = T0 + 500;

            core.on_fail(&a.id, &job, 1, code, "connection refused", None, t)
                .expect("holder fails its lease");

            let got = b.assignments();
            assert_eq!((got.len(), got[0].lease_epoch), (1, 2), "{code}");
            let rec = &core.nodes[&a.id];
            assert_eq!((rec.failed, rec.penalty.at(t, 1)), (0, 0.0), "{code}");
            assert_eq!(rec.penalty.reason(), None, "{code}");
            assert!(rec.outstanding.is_empty() && rec.cancelled.is_empty());
            // The node cannot take work now: the slot comes back with its next `credits`.
            assert_eq!(
                rec.free_slots(),
                3,
                "{code}: slot freed before the node said so"
            );
            core.on_credits(&a.id, 4, 0, t + 10);
            assert_eq!(core.nodes[&a.id].free_slots(), 4, "{code}");
        }
    }

    #[test]
    fn a_runtime_error_is_reassigned_and_penalized() {
        let (mut core, a, mut b, job) = leased();
        let t = T0 + 500;

        core.on_fail(&a.id, &job, 1, FailCode::RuntimeError, "HTTP 500", None, t)
            .expect("holder fails its lease");

        assert_eq!(b.assignments()[0].lease_epoch, 2);
        let rec = &core.nodes[&a.id];
        assert_eq!(rec.failed, 1);
        assert_eq!(rec.penalty.at(t, 1), PENALTY_RUNTIME_ERROR);
        assert_eq!(
            rec.penalty.reason(),
            Some("node failed the job (runtime_error): HTTP 500")
        );
    }

    #[test]
    fn a_result_for_an_epoch_never_issued_is_a_stale_lease_and_keeps_the_lease() {
        let mut core = argmax();
        let mut a = TestNode::join(&mut core, 1, 4, T0);
        let other = TestNode::join(&mut core, 2, 1, T0);
        let (job, _rx) = submit(&mut core, "job-1", model(), T0);
        let got = a.assignments();
        core.on_ack(&a.id, &job, 1).expect("ack");
        let mut forged = testkit::result_for(&got[0], "done");
        forged.lease_epoch = 7;
        let refused = core.on_result(&a.id, forged, T0 + 10);
        assert_eq!(refused.map_err(|e| e.0), Err(ErrorCode::StaleLease));
        assert!(cancels(&a.sent()).is_empty(), "the current lease runs on");
        assert_eq!(core.nodes[&a.id].free_slots(), 3, "its slot stays taken");
        // A node that never held the job is not_assigned, whatever the epoch.
        let foreign = core.on_result(&other.id, testkit::result_for(&got[0], "x"), T0 + 10);
        assert_eq!(foreign.map_err(|e| e.0), Err(ErrorCode::NotAssigned));
        // The holder's real result is still taken.
        core.on_result(&a.id, testkit::result_for(&got[0], "done"), T0 + 20)
            .expect("the holder's result");
    }

    #[test]
    fn a_late_fail_from_a_reassigned_lease_is_refused_and_frees_the_slot() {
        let (mut core, mut a, mut b, job) = leased();
        let ack = core.config.timing.ack_timeout_ms;
        let exec = core.sched.attempt_timeout_ms;
        core.heartbeat(&b.id, testkit::report(2), T0 + exec)
            .expect("heartbeat");
        core.tick(T0 + exec);
        assert_eq!(cancels(&a.sent()), vec![(job.clone(), 1)]);
        assert_eq!(b.assignments()[0].lease_epoch, 2);
        // The cancelled lease keeps a credit until the node says it stopped.
        assert_eq!(core.nodes[&a.id].free_slots(), 3);

        let late = core.on_fail(
            &a.id,
            &job,
            1,
            FailCode::RuntimeError,
            "too late",
            None,
            T0 + exec + ack,
        );

        assert_eq!(late.map_err(|e| e.0), Err(ErrorCode::StaleLease));
        let rec = &core.nodes[&a.id];
        assert_eq!(rec.free_slots(), 4);
        assert_eq!(rec.failed, 1, "only the deadline was charged");
    }
}
