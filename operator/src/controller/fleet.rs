//! ResultityFleet reconcile: read the fleet's nodes → plan (pure) → apply the nodes with their
//! rollout steps → delete the highest ordinals beyond `replicas` → write status and events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;
use crate::crd::{
    LABEL_FLEET, MANAGER, ResultityFleet, ResultityNetwork, ResultityNode, RolloutStep,
};
use crate::error::{ApplyError, DereferenceError, Error, Result};
use crate::fleet::{
    FleetObserved, build_fleet_node, compute_fleet_status, node_facts, pinned_past,
    resolve_strategy, step_of,
};
use crate::rollout::{Halt, nodes_to_remove, plan_rollout};

fn now_time(ms: u64) -> Time {
    Time(
        i64::try_from(ms)
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// Reconciles one fleet (entry point for the Controller).
pub async fn reconcile(fleet: Arc<ResultityFleet>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = apply(&fleet, &ctx).await;
    ctx.metrics.observe("fleet", started.elapsed());
    result
}

/// Entry point for a watch that tolerates malformed objects.
pub async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<ResultityFleet>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    match &obj.0 {
        Ok(f) => reconcile(Arc::new(f.clone()), ctx).await,
        Err(invalid) => Ok(super::report_malformed::<ResultityFleet>(invalid, &ctx, "fleet").await),
    }
}

/// Backoff after a failed fleet reconcile.
pub fn error_policy_guarded(
    _obj: Arc<DeserializeGuard<ResultityFleet>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failure("fleet", error.metric_label());
    tracing::warn!(error = %error, "fleet reconcile failed");
    Action::requeue(Duration::from_secs(30))
}

/// The desired node differs from the live one in what the fleet owns.
fn differs(live: &ResultityNode, desired: &ResultityNode) -> bool {
    let labels_match = desired
        .labels()
        .iter()
        .all(|(k, v)| live.labels().get(k) == Some(v));
    let annotations_match = desired
        .annotations()
        .iter()
        .all(|(k, v)| live.annotations().get(k) == Some(v));
    !(labels_match
        && annotations_match
        && live.spec == desired.spec
        && live.owner_references() == desired.owner_references())
}

async fn apply(fleet: &ResultityFleet, ctx: &Context) -> Result<Action> {
    let ns = fleet
        .namespace()
        .ok_or(Error::MissingField("ResultityFleet metadata.namespace"))?;
    let name = fleet.name_any();
    let now = now_time(ctx.clock.now_ms());
    let nodes_api: Api<ResultityNode> = Api::namespaced(ctx.client.clone(), &ns);
    let networks: Api<ResultityNetwork> = Api::all(ctx.client.clone());
    let reference = fleet.object_ref(&());

    // dereference
    let listed = nodes_api
        .list(&ListParams::default().labels(&format!("{LABEL_FLEET}={name}")))
        .await
        .map_err(|source| DereferenceError::Read {
            kind: "ResultityNode list of fleet",
            name: name.clone(),
            source,
        })?;
    let net_name = &fleet.spec.template.spec.network_ref.name;
    let network = networks
        .get_opt(net_name)
        .await
        .map_err(|source| DereferenceError::Read {
            kind: "ResultityNetwork",
            name: net_name.clone(),
            source,
        })?;
    let mut by_ordinal: BTreeMap<u32, ResultityNode> = listed
        .items
        .into_iter()
        .filter_map(|n| fleet.ordinal_of(&n.name_any()).map(|o| (o, n)))
        .collect();

    // scale down: the highest ordinals go first; their finalizers drain them
    let ordinals: Vec<u32> = by_ordinal.keys().copied().collect();
    for ordinal in nodes_to_remove(&ordinals, fleet.spec.replicas) {
        let Some(node) = by_ordinal.remove(&ordinal) else {
            continue;
        };
        if node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match nodes_api
            .delete(&node.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(ApplyError::Write {
                    action: "delete",
                    kind: "ResultityNode",
                    name: node.name_any(),
                    source,
                }
                .into());
            }
        }
        ctx.publish(
            &reference,
            Event {
                type_: EventType::Normal,
                reason: "ScaledDown".into(),
                note: Some(format!(
                    "deleting node {} (highest ordinal); it drains before it goes",
                    node.name_any()
                )),
                action: "Scale".into(),
                secondary: None,
            },
        )
        .await;
    }

    // validate and plan (pure)
    let pinned = pinned_past(fleet, network.as_ref());
    let strategy = resolve_strategy(fleet).map(|mut s| {
        s.paused |= pinned.is_some();
        s
    });
    let nodes: Vec<ResultityNode> = by_ordinal.values().cloned().collect();
    let facts: Vec<_> = nodes
        .iter()
        .filter_map(|n| node_facts(fleet, n, &now))
        .collect();
    let plan = strategy.as_ref().map(|s| plan_rollout(&facts, s));

    // apply: every desired node, with its (possibly new) step
    let mut steps: BTreeMap<&str, RolloutStep> = BTreeMap::new();
    if let Ok(p) = &plan {
        for t in &p.transitions {
            steps.insert(t.node.as_str(), t.to);
        }
    }
    let mut created = Vec::new();
    for ordinal in 0..fleet.spec.replicas {
        let node_name = fleet.node_name(ordinal);
        let live = by_ordinal.get(&ordinal);
        let (step, since) = match (steps.get(node_name.as_str()), live) {
            (Some(s), _) => (Some(*s), now.clone()),
            (None, Some(l)) => (
                step_of(l),
                l.annotations()
                    .get(crate::fleet::ANNOTATION_STEP_SINCE)
                    .and_then(|s| s.parse::<Timestamp>().ok())
                    .map_or_else(|| now.clone(), Time),
            ),
            (None, None) => (None, now.clone()),
        };
        let Some(desired) = build_fleet_node(fleet, ordinal, step.map(|s| (s, &since))) else {
            return Err(Error::MissingField("ResultityFleet metadata.uid"));
        };
        if live.is_some_and(|l| !differs(l, &desired)) {
            continue;
        }
        nodes_api
            .patch(
                &node_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(|source| ApplyError::Write {
                action: "apply",
                kind: "ResultityNode",
                name: node_name.clone(),
                source,
            })?;
        if live.is_none() {
            created.push(node_name);
        }
    }
    if !created.is_empty() {
        ctx.publish(
            &reference,
            Event {
                type_: EventType::Normal,
                reason: "ScaledUp".into(),
                note: Some(format!("created nodes {}", created.join(", "))),
                action: "Scale".into(),
                secondary: None,
            },
        )
        .await;
    }

    // status (pure compute, then write) and one event per batch
    let status = compute_fleet_status(&FleetObserved {
        fleet,
        nodes: &nodes,
        facts: &facts,
        plan: plan.as_ref().map_err(|e| *e),
        network: network.as_ref(),
        pinned_past: pinned,
        now: &now,
    });
    let api: Api<ResultityFleet> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": ResultityFleet::api_version(&()),
            "kind": ResultityFleet::kind(&()),
            "status": status,
        })),
    )
    .await
    .map_err(|source| Error::Status {
        object: format!("ResultityFleet {ns}/{name}"),
        source,
    })?;

    let Ok(plan) = plan else {
        if let Err(e) = &strategy {
            ctx.publish(
                &reference,
                Event {
                    type_: EventType::Warning,
                    reason: "InvalidSpec".into(),
                    note: Some(e.to_string()),
                    action: "Reconcile".into(),
                    secondary: None,
                },
            )
            .await;
        }
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    let granted: Vec<&str> = plan
        .transitions
        .iter()
        .filter(|t| t.to == RolloutStep::Draining)
        .map(|t| t.node.as_str())
        .collect();
    if !granted.is_empty() {
        ctx.publish(
            &reference,
            Event {
                type_: EventType::Normal,
                reason: "RolloutBatch".into(),
                note: Some(format!(
                    "draining {} before replacing their pods ({} of {} updated)",
                    granted.join(", "),
                    status.updated,
                    fleet.spec.replicas
                )),
                action: "Rollout".into(),
                secondary: None,
            },
        )
        .await;
    }
    if let Some(t) = plan
        .transitions
        .iter()
        .find(|t| t.to == RolloutStep::Failed)
    {
        ctx.publish(
            &reference,
            Event {
                type_: EventType::Warning,
                reason: "RolloutFailed".into(),
                note: Some(format!(
                    "node {}: {}; the rollout stopped",
                    t.node, t.message
                )),
                action: "Rollout".into(),
                secondary: None,
            },
        )
        .await;
    }
    let busy = plan.transitions.iter().any(|t| t.to.in_progress())
        || facts
            .iter()
            .any(|f| f.step.is_some_and(RolloutStep::in_progress));
    Ok(match plan.halted {
        Some(Halt::Failed { .. }) => Action::requeue(Duration::from_secs(300)),
        _ if busy => Action::requeue(Duration::from_secs(10)),
        _ => Action::requeue(Duration::from_secs(60)),
    })
}
