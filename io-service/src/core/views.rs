//! Views: what people, dashboards and tests see of the state — node and job views, counts,
//! and the gauges kept current as the state changes.

use resultity_protocol::messages::ConfigPointer;
use resultity_protocol::messages::{JobKind, ModelRef};
use resultity_protocol::{ErrorCode, JobId, NodeId};
use serde::Serialize;

use super::Core;
use super::jobs::JobState;

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

impl Core {
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
                    penalty_reason: rec.penalty.reason().map(str::to_owned),
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

    /// Cheap gauges, refreshed on every change.
    pub(super) fn refresh_gauges(&self, _now: u64) {
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
    pub(super) fn refresh_eligible_gauge(&self, now: u64) {
        let eligible = self
            .nodes
            .values()
            .filter(|n| self.node_ready(n, now).is_ok() && !self.active_models(n).is_empty())
            .count();
        self.metrics.nodes_eligible.set(gauge(eligible));
    }
}

pub(super) fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
