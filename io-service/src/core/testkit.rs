//! Fixture for the core's synchronous tests: a core whose clock is a plain `u64` the test
//! passes as `now`; nothing sleeps and no runtime runs.

use std::sync::Arc;

use resultity_protocol::config::{ConfigDigest, NetworkConfig};
use resultity_protocol::messages::RuntimeKind;
use resultity_protocol::messages::http::Capabilities;
use resultity_protocol::{NodeId, NodeKeypair};

use super::Core;
use super::registry::NodeRecord;
use crate::metrics::Metrics;
use crate::settings::{Limits, SchedulerSettings};

pub(super) fn config() -> NetworkConfig {
    NetworkConfig {
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
    }
}

pub(super) fn core(sched: SchedulerSettings) -> Core {
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

/// A core with one bare registered node (no report, no session), for penalty arithmetic.
pub(super) fn core_with_node(sched: SchedulerSettings) -> (Core, NodeId) {
    let mut core = core(sched);
    let id = registered(&mut core, 7, 8, 0);
    (core, id)
}
