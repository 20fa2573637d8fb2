//! Fixture for the core's synchronous tests: a config that approves one model, and nodes that
//! are registered, report, and hold a session whose outbound channel the test drains to see
//! what the network sent. The clock is a plain `u64` the test advances and passes as `now`;
//! nothing sleeps and no runtime runs.

use std::sync::Arc;

use resultity_protocol::config::{ApprovedModel, ConfigDigest, NetworkConfig};
use resultity_protocol::messages::http::Capabilities;
use resultity_protocol::messages::ws::{JobAssignment, JobResult, NetworkMessage};
use resultity_protocol::messages::{JobKind, ModelRef, RuntimeKind, Usage};
use resultity_protocol::{JobId, NodeId, NodeKeypair};
use tokio::sync::{mpsc, oneshot};

use super::registry::NodeRecord;
use super::{Core, JobOutcome, JobSpec, Outbound, SessionLink};
use crate::metrics::Metrics;
use crate::settings::{Limits, SchedulerSettings};

#[path = "../../tests/it/common/fixture.rs"]
mod fixture;
pub(super) use fixture::{model, report};

/// A start time far from zero, so "before the start" is representable.
pub(super) const T0: u64 = 1_000_000;

/// A model the network approves but no fixture node serves.
pub(super) fn other_model() -> ModelRef {
    ModelRef {
        id: "acme/other".into(),
        revision: "r1".into(),
    }
}

pub(super) fn config() -> NetworkConfig {
    let approve = |model: ModelRef| ApprovedModel {
        model,
        runtimes: vec![RuntimeKind::Vllm],
        min_gpu_memory_mib: 0,
        subclouds: vec![],
        known_answer: None,
    };
    NetworkConfig {
        environment: resultity_protocol::messages::Environment::Testnet,
        models: vec![approve(model()), approve(other_model())],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing: Default::default(),
        subclouds: vec![],
        network_keys: vec![],
        retiring_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}

/// A core whose node choice draws from a fixed seed unless the test picks one.
pub(super) fn core(sched: SchedulerSettings) -> Core {
    let sched = SchedulerSettings {
        choice_seed: sched.choice_seed.or(Some(7)),
        ..sched
    };
    Core::new(
        sched,
        Limits::default(),
        Metrics::new(),
        Arc::new(config()),
        ConfigDigest::of_body(b"config"),
    )
}

fn capabilities(max_concurrency: u32) -> Capabilities {
    Capabilities {
        runtime: RuntimeKind::Vllm,
        max_concurrency,
        participation: Default::default(),
        subclouds: vec![],
        gpu: Default::default(),
        models_installed: vec![],
    }
}

/// A node registered with the core but not (yet) reporting or connected.
pub(super) fn registered(core: &mut Core, seed: u8, max_concurrency: u32, now: u64) -> NodeId {
    let key = NodeKeypair::from_seed(&[seed; 32]);
    let id = key.id().clone();
    let rec = NodeRecord::new(
        &id,
        key.verifying_key(),
        &capabilities(max_concurrency),
        1,
        &core.limits,
        now,
    );
    core.nodes.insert(id.clone(), rec);
    id
}

/// The test's end of one node's session.
pub(super) struct TestNode {
    pub(super) id: NodeId,
    rx: mpsc::Receiver<Outbound>,
    session: u32,
}

impl TestNode {
    /// Registers, heartbeats and connects a node with `credits` free of `max_concurrency`.
    pub(super) fn join(core: &mut Core, seed: u8, max_concurrency: u32, now: u64) -> Self {
        let id = registered(core, seed, max_concurrency, now);
        core.heartbeat(&id, report(max_concurrency), now)
            .expect("registered node heartbeats");
        let mut node = Self {
            id,
            rx: mpsc::channel(1).1,
            session: 0,
        };
        node.connect(core, max_concurrency, max_concurrency, now);
        node
    }

    /// Opens a new session (superseding any older one); returns how many leases were resent.
    pub(super) fn connect(
        &mut self,
        core: &mut Core,
        credits: u32,
        max_concurrency: u32,
        now: u64,
    ) -> u32 {
        let (tx, rx) = mpsc::channel(256);
        self.session += 1;
        self.rx = rx;
        let link = SessionLink {
            session_id: format!("{}-{}", self.id, self.session),
            tx,
        };
        core.attach_session(&self.id, link, credits, max_concurrency, false, now)
            .expect("registered node connects")
    }

    /// Ends the current session.
    pub(super) fn disconnect(&mut self, core: &mut Core, now: u64) {
        let session_id = format!("{}-{}", self.id, self.session);
        core.detach_session(&self.id, &session_id, now);
    }

    /// Everything sent to this node since the last call.
    pub(super) fn sent(&mut self) -> Vec<NetworkMessage> {
        let mut out = Vec::new();
        while let Ok(o) = self.rx.try_recv() {
            if let Outbound::Msg(m) = o {
                out.push(m);
            }
        }
        out
    }

    /// The assignments among what was sent since the last call (the rest is dropped).
    pub(super) fn assignments(&mut self) -> Vec<JobAssignment> {
        self.sent()
            .into_iter()
            .filter_map(|m| match m {
                NetworkMessage::JobAssign(a) => Some(a),
                _ => None,
            })
            .collect()
    }
}

/// The `job.cancel`s in `sent`, as (job, epoch).
pub(super) fn cancels(sent: &[NetworkMessage]) -> Vec<(JobId, u64)> {
    sent.iter()
        .filter_map(|m| match m {
            NetworkMessage::JobCancel {
                job_id,
                lease_epoch,
                ..
            } => Some((job_id.clone(), *lease_epoch)),
            _ => None,
        })
        .collect()
}

/// Submits a chat job for `model`.
pub(super) fn submit(
    core: &mut Core,
    id: &str,
    model: ModelRef,
    now: u64,
) -> (JobId, oneshot::Receiver<JobOutcome>) {
    let job_id = JobId::parse(id).expect("test job id");
    let rx = core
        .submit(job_id.clone(), chat_spec(model), now)
        .expect("an eligible node serves the model");
    (job_id, rx)
}

/// A chat job for `model`.
pub(super) fn chat_spec(model: ModelRef) -> JobSpec {
    JobSpec {
        model,
        kind: JobKind::ChatCompletion,
        request: serde_json::json!({"messages": []}),
        stream: None,
    }
}

/// A result bound exactly as `a` dictates.
pub(super) fn result_for(a: &JobAssignment, output: &str) -> JobResult {
    JobResult {
        job_id: a.job_id.clone(),
        lease_epoch: a.lease_epoch,
        config_digest: Some(a.config_digest.clone()),
        model: a.model.clone(),
        output_digest: JobResult::digest_output(output),
        output: output.into(),
        usage: Usage::default(),
        runtime_ms: 1,
        completed_at_ms: 0,
        stream: None,
    }
}

/// A core with one bare registered node (no report, no session), for penalty arithmetic.
pub(super) fn core_with_node(sched: SchedulerSettings) -> (Core, NodeId) {
    let mut core = core(sched);
    let id = registered(&mut core, 7, 8, 0);
    (core, id)
}
