//! Pure parts of the fleet reconcile: the desired ResultityNodes of a fleet, what the planner
//! learns from each node, and the fleet's status. The controller only reads and writes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Resource, ResourceExt};

use crate::conditions::{Cond, FALSE, TRUE, find, settle};
use crate::crd::{
    ConfigMode, DigestCount, LABEL_FLEET, LABEL_MANAGED_BY, LABEL_ROLLOUT_STEP, MANAGER, NodePhase,
    ResultityFleet, ResultityFleetStatus, ResultityNetwork, ResultityNode, RolloutStep,
    RolloutStepRecord,
};
use crate::rollout::{Halt, NodeFacts, Plan, Strategy, resolve_max_unavailable};
use crate::status::REASON_KNOWN_ANSWER_MISMATCH;
use crate::status::types::SELF_TEST_PASSED;

/// When the node entered its rollout step (RFC 3339), written with the step label.
pub const ANNOTATION_STEP_SINCE: &str = "resultity.com/rollout-step-since";
/// How many rollout transitions the fleet's status keeps.
pub const LAST_STEPS_KEPT: usize = 20;

/// Condition types of a ResultityFleet.
pub mod types {
    pub const PROGRESSING: &str = "Progressing";
    pub const AVAILABLE: &str = "Available";
    pub const PAUSED: &str = "Paused";
}

/// Why a fleet cannot be reconciled as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetSpecError {
    #[error("spec.strategy.maxUnavailable: {0}")]
    MaxUnavailable(String),
    #[error("spec.selector must match spec.template.labels ({key}={value} is not in the template)")]
    Selector { key: String, value: String },
    #[error("spec.configPolicy.mode pin needs spec.configPolicy.version")]
    PinWithoutVersion,
}

/// Checks the fleet's spec and resolves its strategy.
pub fn resolve_strategy(fleet: &ResultityFleet) -> Result<Strategy, FleetSpecError> {
    let spec = &fleet.spec;
    for (key, value) in &spec.selector {
        if spec.template.labels.get(key) != Some(value) {
            return Err(FleetSpecError::Selector {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    if spec.config_policy.mode == ConfigMode::Pin && spec.config_policy.version.is_none() {
        return Err(FleetSpecError::PinWithoutVersion);
    }
    let max_unavailable = resolve_max_unavailable(&spec.strategy.max_unavailable, spec.replicas)
        .map_err(FleetSpecError::MaxUnavailable)?;
    let retry_failed =
        fleet.metadata.generation != fleet.status.as_ref().and_then(|s| s.observed_generation);
    Ok(Strategy {
        max_unavailable,
        partition: spec.strategy.partition,
        paused: spec.strategy.paused,
        progress_deadline: Duration::from_secs(u64::from(spec.strategy.progress_deadline_seconds)),
        retry_failed,
    })
}

/// A pinned fleet whose network moved past the pin: nothing new starts.
pub fn pinned_past(fleet: &ResultityFleet, network: Option<&ResultityNetwork>) -> Option<u64> {
    let policy = &fleet.spec.config_policy;
    let pin = policy.version.filter(|_| policy.mode == ConfigMode::Pin)?;
    let current = network?.status.as_ref()?.config_version?;
    (current > pin).then_some(current)
}

/// The ResultityNode with `ordinal`, carrying `step` (and when it began) as label and
/// annotation. Applied with server-side apply, so fields others own (finalizers) stay.
pub fn build_fleet_node(
    fleet: &ResultityFleet,
    ordinal: u32,
    step: Option<(RolloutStep, &Time)>,
) -> Option<ResultityNode> {
    let owner = fleet.controller_owner_ref(&())?;
    let mut labels: BTreeMap<String, String> = fleet.spec.template.labels.clone();
    labels.insert(LABEL_FLEET.into(), fleet.name_any());
    labels.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    let mut annotations = BTreeMap::new();
    if let Some((step, since)) = step {
        labels.insert(LABEL_ROLLOUT_STEP.into(), step.as_str().into());
        annotations.insert(ANNOTATION_STEP_SINCE.into(), since.0.to_string());
    }
    let mut node = ResultityNode::new(&fleet.node_name(ordinal), fleet.spec.template.spec.clone());
    node.metadata = ObjectMeta {
        name: Some(fleet.node_name(ordinal)),
        namespace: fleet.metadata.namespace.clone(),
        labels: Some(labels),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    Some(node)
}

/// The node's rollout step as its label says.
pub fn step_of(node: &ResultityNode) -> Option<RolloutStep> {
    node.labels()
        .get(LABEL_ROLLOUT_STEP)
        .and_then(|s| RolloutStep::parse(s))
}

fn cond_true(node: &ResultityNode, type_: &str) -> bool {
    node.status
        .as_ref()
        .and_then(|s| find(&s.conditions, type_))
        .is_some_and(|c| c.status == TRUE)
}

/// What the planner learns from one node.
pub fn node_facts(fleet: &ResultityFleet, node: &ResultityNode, now: &Time) -> Option<NodeFacts> {
    let ordinal = fleet.ordinal_of(&node.name_any())?;
    let status = node.status.clone().unwrap_or_default();
    // A status older than the spec says nothing about the new spec yet.
    let current = status.observed_generation == node.metadata.generation;
    let since = node
        .annotations()
        .get(ANNOTATION_STEP_SINCE)
        .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok());
    let in_step_for = since.map_or(Duration::ZERO, |t| {
        Duration::from_millis(
            u64::try_from(now.0.as_millisecond() - t.as_millisecond()).unwrap_or(0),
        )
    });
    Some(NodeFacts {
        name: node.name_any(),
        ordinal,
        step: step_of(node),
        in_step_for,
        pod_present: status.pod_spec_hash.is_some(),
        updated: current
            && status.desired_spec_hash.is_some()
            && status.pod_spec_hash == status.desired_spec_hash,
        ready: cond_true(node, "Ready"),
        routable: cond_true(node, "NetworkRoutable"),
        failing: matches!(status.phase, NodePhase::Failed | NodePhase::Invalid),
        self_tested: cond_true(node, SELF_TEST_PASSED),
        answer_mismatch: status
            .conditions
            .iter()
            .find(|c| {
                c.type_ == SELF_TEST_PASSED
                    && c.status == "False"
                    && c.reason == REASON_KNOWN_ANSWER_MISMATCH
            })
            .map(|c| c.message.clone()),
    })
}

/// Everything the fleet's status is computed from.
#[derive(Debug)]
pub struct FleetObserved<'a> {
    pub fleet: &'a ResultityFleet,
    /// The fleet's nodes (within the desired replicas) as read.
    pub nodes: &'a [ResultityNode],
    pub facts: &'a [NodeFacts],
    /// `None` when the spec could not be resolved (with why).
    pub plan: Result<&'a Plan, &'a FleetSpecError>,
    pub network: Option<&'a ResultityNetwork>,
    /// The network's config version when a pin holds the rollout.
    pub pinned_past: Option<u64>,
    pub now: &'a Time,
}

/// Computes the fleet's status.
pub fn compute_fleet_status(o: &FleetObserved<'_>) -> ResultityFleetStatus {
    let previous = o.fleet.status.clone().unwrap_or_default();
    let generation = o.fleet.metadata.generation;
    let count = |f: &dyn Fn(&NodeFacts) -> bool| {
        u32::try_from(o.facts.iter().filter(|n| f(n)).count()).unwrap_or(u32::MAX)
    };
    let replicas = u32::try_from(o.nodes.len()).unwrap_or(u32::MAX);
    let ready = count(&|n| n.ready);
    let routable = count(&|n| n.routable);
    let updated = count(&|n| n.updated);
    let unavailable_listed = match o.plan {
        Ok(p) => p.unavailable_after,
        Err(_) => count(&|n| !n.available()),
    };
    // Members not created yet (a scale-up this round) serve nothing either.
    let unavailable = unavailable_listed + o.fleet.spec.replicas.saturating_sub(replicas);
    let mut digests: BTreeMap<String, u32> = BTreeMap::new();
    for n in o.nodes {
        if let Some(a) = n.status.as_ref().and_then(|s| s.applied_config.as_ref()) {
            *digests.entry(a.digest.clone()).or_default() += 1;
        }
    }
    let network_status = o.network.and_then(|n| n.status.as_ref());
    let desired = o.fleet.spec.replicas;
    let max_unavailable = resolve_max_unavailable(
        &o.fleet.spec.strategy.max_unavailable,
        o.fleet.spec.replicas,
    )
    .unwrap_or(1);

    let progressing = match o.plan {
        Err(e) => Cond::new(types::PROGRESSING, FALSE, "InvalidSpec", e.to_string()),
        Ok(p) => match (&p.halted, o.pinned_past) {
            (Some(Halt::Failed { node }), _) => Cond::new(
                types::PROGRESSING,
                FALSE,
                "RolloutFailed",
                format!(
                    "node {node} failed validation; the rollout stopped (change the fleet to retry)"
                ),
            ),
            (_, Some(v)) => Cond::new(
                types::PROGRESSING,
                FALSE,
                "PinnedVersion",
                format!(
                    "the network is at config version {v}, past the pinned version {}",
                    o.fleet.spec.config_policy.version.unwrap_or_default()
                ),
            ),
            (Some(Halt::Paused), _) if !p.complete => Cond::new(
                types::PROGRESSING,
                FALSE,
                "RolloutPaused",
                format!("{updated} of {desired} nodes updated"),
            ),
            _ if p.complete && replicas == desired => Cond::new(
                types::PROGRESSING,
                TRUE,
                "RolloutComplete",
                format!("all {desired} nodes run the desired spec"),
            ),
            _ => Cond::new(
                types::PROGRESSING,
                TRUE,
                "RollingOut",
                format!("{updated} of {desired} nodes updated, {unavailable} unavailable"),
            ),
        },
    };
    let available_nodes = replicas.saturating_sub(unavailable_listed);
    let available = if desired.saturating_sub(available_nodes) <= max_unavailable {
        Cond::new(
            types::AVAILABLE,
            TRUE,
            "MinimumNodesAvailable",
            format!("{available_nodes} of {desired} nodes serve jobs"),
        )
    } else {
        Cond::new(
            types::AVAILABLE,
            FALSE,
            "TooFewNodesAvailable",
            format!(
                "{available_nodes} of {desired} nodes serve jobs; at most {max_unavailable} may be unavailable"
            ),
        )
    };
    let paused = if o.fleet.spec.strategy.paused {
        Cond::new(
            types::PAUSED,
            TRUE,
            "Paused",
            "spec.strategy.paused is true",
        )
    } else {
        Cond::new(types::PAUSED, FALSE, "NotPaused", "")
    };

    let mut last_steps = previous.last_steps.clone();
    if let Ok(p) = o.plan {
        last_steps.extend(p.transitions.iter().map(|t| RolloutStepRecord {
            node: t.node.clone(),
            step: t.to,
            time: o.now.clone(),
            message: t.message.clone(),
        }));
    }
    let excess = last_steps.len().saturating_sub(LAST_STEPS_KEPT);
    last_steps.drain(..excess);

    ResultityFleetStatus {
        observed_generation: generation,
        replicas,
        ready,
        routable,
        updated,
        unavailable,
        target_config_digest: network_status.and_then(|s| s.config_digest.clone()),
        target_config_version: network_status.and_then(|s| s.config_version),
        applied_digests: digests
            .into_iter()
            .map(|(digest, nodes)| DigestCount { digest, nodes })
            .collect(),
        last_steps,
        conditions: settle(
            vec![progressing, available, paused],
            &previous.conditions,
            generation,
            o.now,
        ),
    }
}
