//! ResultityNode reconcile: validate → build → server-side apply → read back → compute status
//! → apply status, behind a finalizer that drains the node before it goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use resultity_protocol::NodeKeypair;
use resultity_protocol::crypto::{b64, random_bytes};
use resultity_protocol::status::NodeStatus;

use super::Context;
use crate::build::{build_identity_secret, build_pod, keep_live_pins};
use crate::crd::{
    DeletionPolicy, GpuVisibility, LABEL_FLEET, LABEL_MANAGED_BY, LABEL_ROLLOUT_STEP, MANAGER,
    NodePhase, ResultityNetwork, ResultityNode, ResultityNodeStatus, RolloutStep,
};
use crate::decide::{
    DeleteReason, DrainState, PodAction, ReplacementGate, decide_pod_action, requeue_after,
};
use crate::error::{ApplyError, DereferenceError, Error, Rejection, Result};
use crate::pod_contract::{
    SECRET_ADMIN_TOKEN, SECRET_KEY_FILE, pod_spec_hash, sidecar_container_name,
};
use crate::sidecar::SidecarTarget;
use crate::status::{Observed, SidecarObservation, compute_node_status, status_needs_write};
use crate::validate::{Blocker, validate_node};

/// Finalizer that holds a ResultityNode until its sidecar drained and deregistered.
pub const FINALIZER: &str = "resultity.com/drain";

/// The node's identity as read from (or written to) its Secret.
#[derive(Clone)]
pub struct Identity {
    pub node_id: String,
    pub admin_token: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Reads the identity from an existing Secret; `Err` is a message for an `Invalid` status
/// (the operator never overwrites a Secret it cannot use).
pub fn identity_from_secret(secret: &Secret) -> Result<Identity, String> {
    let data = secret.data.as_ref();
    let field = |key: &str| {
        data.and_then(|d| d.get(key))
            .ok_or_else(|| format!("secret has no {key} entry"))
            .and_then(|v| String::from_utf8(v.0.clone()).map_err(|_| format!("{key} is not UTF-8")))
    };
    let key = NodeKeypair::from_key_file_text(field(SECRET_KEY_FILE)?.trim())
        .map_err(|e| format!("{SECRET_KEY_FILE}: {e}"))?;
    let admin_token = field(SECRET_ADMIN_TOKEN)?.trim().to_owned();
    if admin_token.len() < 16 {
        return Err(format!(
            "{SECRET_ADMIN_TOKEN} is shorter than 16 characters"
        ));
    }
    Ok(Identity {
        node_id: key.id().as_str().to_owned(),
        admin_token,
    })
}

/// Gets the identity Secret, creating it with a fresh key when absent. `Ok(Err(..))`: the
/// Secret exists but cannot be used (never overwritten), or the API server refused ours.
async fn ensure_identity(
    node: &ResultityNode,
    secrets: &Api<Secret>,
) -> Result<Result<Identity, Blocker>, DereferenceError> {
    let name = node.identity_secret_name();
    let read = |source| DereferenceError::Read {
        kind: "Secret",
        name: name.clone(),
        source,
    };
    let unusable = |e: String| Blocker::Invalid(vec![format!("identity Secret {name}: {e}")]);
    if let Some(s) = secrets.get_opt(&name).await.map_err(read)? {
        return Ok(identity_from_secret(&s).map_err(unusable));
    }
    let key = NodeKeypair::generate()?;
    let token = b64(&random_bytes::<32>()?);
    let secret = build_identity_secret(node, &key.to_key_file_text(), key.id().as_str(), &token);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Ok(Identity {
            node_id: key.id().as_str().to_owned(),
            admin_token: token,
        })),
        // Created concurrently (or by a person) since the read: use that one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = secrets.get(&name).await.map_err(read)?;
            Ok(identity_from_secret(&s).map_err(unusable))
        }
        Err(e) => match Rejection::from_kube("Secret", &name, &e) {
            Some(r) => Ok(Err(Blocker::Rejected(r))),
            None => Err(DereferenceError::CreateIdentity { name, source: e }),
        },
    }
}

/// Apply step for the model cache: creates the node's claim when its `volumeClaimTemplate`
/// asks for one and it is absent. An existing claim is left as it is (a claim's class and
/// access modes are immutable, and it may hold hundreds of GiB of weights); one that another
/// owner holds is refused rather than adopted. `Ok(Err(..))`: a blocker for the status.
async fn ensure_cache_claim(
    node: &ResultityNode,
    ctx: &Context,
    ns: &str,
) -> Result<Result<(), Blocker>, ApplyError> {
    let Some(desired) = crate::model_cache::build_cache_claim(node) else {
        return Ok(Ok(()));
    };
    let name = crate::model_cache::cache_claim_name(node);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let write = |action: &'static str| {
        let name = name.clone();
        move |source| ApplyError::Write {
            action,
            kind: "PersistentVolumeClaim",
            name,
            source,
        }
    };
    if let Some(existing) = claims.get_opt(&name).await.map_err(write("read"))? {
        let ours = existing
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == node.metadata.uid.as_ref());
        return Ok(if ours {
            Ok(())
        } else {
            Err(Blocker::Invalid(vec![format!(
                "PersistentVolumeClaim {name} exists and does not belong to this node; delete it, or name it in spec.modelCache.existingClaim"
            )]))
        });
    }
    match claims
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
    {
        Ok(_) => {
            ctx.publish(
                &node.object_ref(&()),
                event(
                    EventType::Normal,
                    "CacheClaimCreated",
                    "CreateCacheClaim",
                    format!("created model cache claim {name}"),
                ),
            )
            .await;
            Ok(Ok(()))
        }
        Err(e) => match Rejection::from_kube("PersistentVolumeClaim", &name, &e) {
            Some(r) => Ok(Err(Blocker::Rejected(r))),
            None => Err(write("apply")(e)),
        },
    }
}

/// API group of DRA's ResourceClaimTemplates and claims.
const DRA_GROUP: &str = "resource.k8s.io";

/// Dereference step for a `gpu.visibility: dra` node: whether the API server serves
/// `resource.k8s.io` in any version. One that does not (Kubernetes 1.32 by default) accepts
/// the pod's `resourceClaims` and silently drops them, so the pod would run without its GPU
/// claim; such a node is refused with a reason instead. `Ok(Err(..))`: a blocker.
async fn check_dra_served(
    node: &ResultityNode,
    ctx: &Context,
) -> Result<Result<(), Blocker>, DereferenceError> {
    use std::sync::atomic::Ordering;
    if node.spec.gpu.visibility != GpuVisibility::Dra || ctx.dra_served.load(Ordering::Relaxed) {
        return Ok(Ok(()));
    }
    let groups = ctx
        .client
        .list_api_groups()
        .await
        .map_err(|source| DereferenceError::Read {
            kind: "APIGroupList",
            name: "/apis".into(),
            source,
        })?;
    let served = groups
        .groups
        .iter()
        .any(|g| g.name == DRA_GROUP && !g.versions.is_empty());
    if served {
        ctx.dra_served.store(true, Ordering::Relaxed);
        return Ok(Ok(()));
    }
    Ok(Err(Blocker::Unsupported(format!(
        "spec.gpu.visibility dra needs Dynamic Resource Allocation, but this API server serves no {DRA_GROUP} version; it would accept the pod and drop its GPU claim. Enable DRA in the cluster (on Kubernetes 1.32 the DynamicResourceAllocation feature gate and {DRA_GROUP}/v1beta1), or use visibility devicePlugin"
    ))))
}

/// Where to reach the pod's sidecar, if it is running.
fn sidecar_target(pod: &Pod, token: &str, port: u16) -> Option<SidecarTarget> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let running = status.container_statuses.as_ref()?.iter().any(|c| {
        c.name == sidecar_container_name() && c.state.as_ref().is_some_and(|s| s.running.is_some())
    });
    let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
    running.then(|| SidecarTarget {
        pod_ip: ip,
        port,
        token: token.to_owned(),
    })
}

async fn observe_sidecar(ctx: &Context, target: Option<&SidecarTarget>) -> SidecarObservation {
    let Some(t) = target else {
        return SidecarObservation::NotRunning;
    };
    match ctx.sidecar.status(t).await {
        Ok(s) => SidecarObservation::Report(Box::new(s)),
        Err(e) => {
            tracing::debug!(pod_ip = %t.pod_ip, error = %e, "sidecar status pull failed");
            SidecarObservation::Unreachable {
                reason: e.reason().into(),
                message: e.to_string(),
            }
        }
    }
}

fn elapsed_since(since: &Time, now_ms: u64) -> Duration {
    let start = u64::try_from(since.0.as_millisecond()).unwrap_or(0);
    Duration::from_millis(now_ms.saturating_sub(start))
}

fn now_time(ms: u64) -> Time {
    Time(
        i64::try_from(ms)
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// Status patch body for server-side apply.
pub fn status_patch(status: &ResultityNodeStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ResultityNode::api_version(&()),
        "kind": ResultityNode::kind(&()),
        "status": status,
    })
}

/// Reconciles one ResultityNode (entry point for the Controller).
pub async fn reconcile(node: Arc<ResultityNode>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let ns = node
        .namespace()
        .ok_or(Error::MissingField("ResultityNode metadata.namespace"))?;
    let api: Api<ResultityNode> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, node, |event| async {
        match event {
            Finalizer::Apply(n) => apply(&n, &ctx).await,
            Finalizer::Cleanup(n) => cleanup(&n, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics.observe("node", started.elapsed());
    result
}

/// Entry point for a watch that tolerates malformed objects.
pub async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<ResultityNode>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    match &obj.0 {
        Ok(node) => reconcile(Arc::new(node.clone()), ctx).await,
        Err(invalid) => Ok(super::report_malformed::<ResultityNode>(invalid, &ctx, "node").await),
    }
}

/// [`error_policy`] for [`reconcile_guarded`].
pub fn error_policy_guarded(
    _obj: Arc<DeserializeGuard<ResultityNode>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    policy(error, &ctx)
}

/// What to do after an error: back off without hammering the API server.
pub fn error_policy(_node: Arc<ResultityNode>, error: &Error, ctx: Arc<Context>) -> Action {
    policy(error, &ctx)
}

fn policy(error: &Error, ctx: &Context) -> Action {
    match error {
        // Waiting for a drain is progress, not failure.
        Error::Draining => Action::requeue(Duration::from_secs(5)),
        e => {
            ctx.metrics.failure("node", e.metric_label());
            tracing::warn!(error = %e, "node reconcile failed");
            Action::requeue(Duration::from_secs(30))
        }
    }
}

/// What the dereference step read: the objects the node names.
struct Dereferenced {
    network: Option<ResultityNetwork>,
    /// The identity, or why it cannot be used.
    identity: Result<Identity, Blocker>,
    pod: Option<Pod>,
}

/// Dereference step: the network, the identity Secret (created when absent) and the pod.
async fn dereference(
    node: &ResultityNode,
    ctx: &Context,
    ns: &str,
) -> Result<Dereferenced, DereferenceError> {
    let networks: Api<ResultityNetwork> = Api::all(ctx.client.clone());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let net_name = &node.spec.network_ref.name;
    let network = networks
        .get_opt(net_name)
        .await
        .map_err(|source| DereferenceError::Read {
            kind: "ResultityNetwork",
            name: net_name.clone(),
            source,
        })?;
    let identity = ensure_identity(node, &secrets).await?;
    let pod_name = node.pod_name();
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|source| DereferenceError::Read {
            kind: "Pod",
            name: pod_name,
            source,
        })?;
    Ok(Dereferenced {
        network,
        identity,
        pod,
    })
}

/// Whether the node's fleet lets it replace its pod now (standalone nodes always may).
pub fn replacement_gate(node: &ResultityNode) -> ReplacementGate {
    let labels = node.labels();
    if !labels.contains_key(LABEL_FLEET) {
        return ReplacementGate::Free;
    }
    match labels
        .get(LABEL_ROLLOUT_STEP)
        .and_then(|s| RolloutStep::parse(s))
    {
        Some(step) if step.grants_replacement() => ReplacementGate::Granted,
        _ => ReplacementGate::Held,
    }
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}

/// What the apply step left behind.
struct Applied {
    pod: Option<Pod>,
    /// The API server refused the pod; reported as the node's Ready condition.
    rejected: Option<Rejection>,
}

/// Apply step: carries out the decision.
async fn carry_out(
    node: &ResultityNode,
    ctx: &Context,
    action: &PodAction,
    desired: Option<&Pod>,
    pod: Option<Pod>,
    target: Option<&SidecarTarget>,
) -> Result<Applied, ApplyError> {
    let ns = node.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = node.pod_name();
    let reference = node.object_ref(&());
    let write = |action: &'static str| {
        let name = pod_name.clone();
        move |source| ApplyError::Write {
            action,
            kind: "Pod",
            name,
            source,
        }
    };
    let delete = || async {
        match pods.delete(&pod_name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            // Already gone: the goal of the delete is met.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(write("delete")(e)),
        }
    };
    match action {
        PodAction::Create => {
            let Some(desired) = desired else {
                return Ok(Applied {
                    pod,
                    rejected: None,
                });
            };
            match pods
                .patch(
                    &pod_name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(desired),
                )
                .await
            {
                Ok(applied) => {
                    ctx.publish(
                        &reference,
                        event(
                            EventType::Normal,
                            "PodCreated",
                            "CreatePod",
                            format!("created pod {pod_name}"),
                        ),
                    )
                    .await;
                    Ok(Applied {
                        pod: Some(applied),
                        rejected: None,
                    })
                }
                Err(e) => match Rejection::from_kube("Pod", &pod_name, &e) {
                    Some(r) => {
                        ctx.publish(
                            &reference,
                            event(
                                EventType::Warning,
                                "PodRejected",
                                "CreatePod",
                                r.to_string(),
                            ),
                        )
                        .await;
                        Ok(Applied {
                            pod: None,
                            rejected: Some(r),
                        })
                    }
                    None => Err(write("apply")(e)),
                },
            }
        }
        PodAction::Recreate { reason } => {
            delete().await?;
            ctx.publish(
                &reference,
                event(
                    EventType::Warning,
                    "PodReplaced",
                    "ReplacePod",
                    format!("pod {pod_name} finished ({reason}); replacing it"),
                ),
            )
            .await;
            Ok(Applied {
                pod: None,
                rejected: None,
            })
        }
        PodAction::Drain { started } => {
            if let Some(t) = target
                && let Err(e) = ctx.sidecar.drain(t, false).await
            {
                tracing::warn!(pod = %pod_name, error = %e, "drain request failed");
            }
            if node
                .status
                .as_ref()
                .and_then(|s| s.drain_started_time.as_ref())
                != Some(started)
            {
                ctx.publish(
                    &reference,
                    event(
                        EventType::Normal,
                        "Draining",
                        "Drain",
                        format!(
                            "pod {pod_name} is out of date; draining it before replacement \
                             (at most {}s)",
                            node.spec.drain_timeout_seconds
                        ),
                    ),
                )
                .await;
            }
            Ok(Applied {
                pod,
                rejected: None,
            })
        }
        PodAction::Delete(why) => {
            delete().await?;
            let (type_, note) = match why {
                DeleteReason::Drained => (
                    EventType::Normal,
                    format!("drained and deleted out-of-date pod {pod_name}"),
                ),
                DeleteReason::SidecarNotRunning => (
                    EventType::Normal,
                    format!("deleted out-of-date pod {pod_name} (its sidecar was not running)"),
                ),
                DeleteReason::DrainTimedOut => (
                    EventType::Warning,
                    format!(
                        "drain did not finish within {}s; deleted out-of-date pod {pod_name}",
                        node.spec.drain_timeout_seconds
                    ),
                ),
            };
            ctx.publish(&reference, event(type_, "PodReplaced", "ReplacePod", note))
                .await;
            Ok(Applied {
                pod,
                rejected: None,
            })
        }
        PodAction::Keep(_) => Ok(Applied {
            pod,
            rejected: None,
        }),
    }
}

/// The node pipeline: dereference → validate → build → decide → apply → status.
async fn apply(node: &ResultityNode, ctx: &Context) -> Result<Action> {
    let ns = node
        .namespace()
        .ok_or(Error::MissingField("ResultityNode metadata.namespace"))?;
    let now = now_time(ctx.clock.now_ms());
    let prev = node.status.clone().unwrap_or_default();

    let refs = dereference(node, ctx, &ns).await?;

    // validate (pure)
    let resolved = refs
        .identity
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|_| validate_node(node, refs.network.as_ref(), &ctx.defaults));
    // The cache claim before the pod that mounts it; a claim that cannot be made blocks the
    // pod as an invalid spec does.
    let resolved = match resolved {
        Ok(r) => check_dra_served(node, ctx).await?.map(|()| r),
        Err(b) => Err(b),
    };
    let resolved = match resolved {
        Ok(r) => ensure_cache_claim(node, ctx, &ns).await?.map(|()| r),
        Err(b) => Err(b),
    };
    let resolved = resolved.map(|mut r| {
        keep_live_pins(&mut r, refs.pod.as_ref());
        r
    });
    let network_config = refs
        .network
        .as_ref()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| {
            Some(crate::crd::ConfigRef {
                version: s.config_version?,
                digest: s.config_digest.clone()?,
            })
        });

    // build (pure)
    let desired = match (&resolved, &refs.identity) {
        (Ok(r), Ok(identity)) => Some(build_pod(node, r, &identity.node_id, &ctx.defaults)?),
        _ => None,
    };
    let desired_hash = desired.as_ref().and_then(pod_spec_hash).map(str::to_owned);

    // observe and decide (pure)
    let token = refs
        .identity
        .as_ref()
        .map(|i| i.admin_token.as_str())
        .unwrap_or("");
    let target = refs
        .pod
        .as_ref()
        .and_then(|p| sidecar_target(p, token, ctx.defaults.sidecar_port));
    let observation = observe_sidecar(ctx, target.as_ref()).await;
    let drain = DrainState {
        started: prev.drain_started_time.as_ref(),
        timeout: Duration::from_secs(u64::from(node.spec.drain_timeout_seconds)),
        gate: replacement_gate(node),
    };
    let buildable = desired_hash.as_deref().filter(|_| !node.spec.paused);
    let action = decide_pod_action(refs.pod.as_ref(), buildable, &drain, &observation, &now);

    // apply
    let applied = carry_out(
        node,
        ctx,
        &action,
        desired.as_ref(),
        refs.pod,
        target.as_ref(),
    )
    .await?;
    let observation = match action {
        // A new pod has no sidecar to ask yet.
        PodAction::Create | PodAction::Recreate { .. } => SidecarObservation::NotRunning,
        _ => observation,
    };
    let pod = match action {
        PodAction::Recreate { .. } => None,
        _ => applied.pod,
    };

    // status (pure compute, then write)
    let blocker = match (&resolved, applied.rejected) {
        (Err(b), _) => Some(b.clone()),
        (Ok(_), Some(r)) => Some(Blocker::Rejected(r)),
        (Ok(_), None) => None,
    };
    let mut status = compute_node_status(&Observed {
        node,
        blocker: blocker.as_ref(),
        node_id: refs.identity.as_ref().ok().map(|i| i.node_id.as_str()),
        network_config: network_config.as_ref(),
        pod: pod.as_ref(),
        sidecar: &observation,
        drain_started: action.drain_started(prev.drain_started_time.as_ref()),
        now: &now,
    });
    status.desired_spec_hash = desired_hash.clone();
    status.pod_spec_hash = match action {
        // Deleted: the old pod no longer counts as present for the fleet's rollout.
        PodAction::Delete(_) => None,
        _ => pod.as_ref().and_then(pod_spec_hash).map(str::to_owned),
    };
    status.rollout_step = node
        .labels()
        .get(LABEL_ROLLOUT_STEP)
        .and_then(|s| RolloutStep::parse(s));
    // An unchanged status is not written again: at thousands of nodes those writes would be
    // most of what the operator asks of the API server.
    if status_needs_write(node.status.as_ref(), &status) {
        write_status(node, ctx, &ns, &status).await?;
    }
    announce_phase(node, ctx, &prev, &status).await;

    let unreachable = matches!(observation, SidecarObservation::Unreachable { .. });
    Ok(Action::requeue(requeue_after(
        &status,
        &action,
        unreachable,
        &now,
    )))
}

/// Status step: server-side apply of the computed status.
async fn write_status(
    node: &ResultityNode,
    ctx: &Context,
    ns: &str,
    status: &ResultityNodeStatus,
) -> Result<()> {
    let api: Api<ResultityNode> = Api::namespaced(ctx.client.clone(), ns);
    api.patch_status(
        &node.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(status_patch(status)),
    )
    .await
    .map_err(|source| Error::Status {
        object: format!("ResultityNode {ns}/{}", node.name_any()),
        source,
    })?;
    Ok(())
}

/// One Event per phase change. Draining has its own event from the drain itself.
async fn announce_phase(
    node: &ResultityNode,
    ctx: &Context,
    prev: &ResultityNodeStatus,
    status: &ResultityNodeStatus,
) {
    if status.phase == prev.phase || status.phase == NodePhase::Draining {
        return;
    }
    let warning = matches!(
        status.phase,
        NodePhase::Failed | NodePhase::Invalid | NodePhase::Degraded
    );
    let why = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.as_str())
        .filter(|m| !m.is_empty());
    let note = match why {
        Some(why) => format!(
            "{} to {}: {why}",
            prev.phase.as_str(),
            status.phase.as_str()
        ),
        None => format!("{} to {}", prev.phase.as_str(), status.phase.as_str()),
    };
    ctx.publish(
        &node.object_ref(&()),
        event(
            if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            status.phase.as_str(),
            "Reconcile",
            note,
        ),
    )
    .await;
}

/// While the finalizer waits for the drain, the status says so (`Draining=True`, reason
/// `Deleting`, phase Draining). Written once per deletion, not at every requeue.
async fn report_deletion_drain(
    node: &ResultityNode,
    ctx: &Context,
    ns: &str,
    since: &Time,
    now_ms: u64,
) -> Result<()> {
    use crate::conditions::{Cond, TRUE, find, settle};
    use crate::status::types::DRAINING;
    let mut status = node.status.clone().unwrap_or_default();
    if find(&status.conditions, DRAINING)
        .is_some_and(|c| c.status == TRUE && c.reason == "Deleting")
    {
        return Ok(());
    }
    let cond = settle(
        vec![Cond::new(
            DRAINING,
            TRUE,
            "Deleting",
            format!(
                "the node is being deleted; draining and deregistering it (at most {}s)",
                node.spec.drain_timeout_seconds
            ),
        )],
        &status.conditions,
        node.metadata.generation,
        &now_time(now_ms),
    );
    status.conditions.retain(|c| c.type_ != DRAINING);
    status.conditions.extend(cond);
    status.phase = NodePhase::Draining;
    status.drain_started_time = Some(since.clone());
    write_status(node, ctx, ns, &status).await
}

/// Finalizer cleanup: drain and deregister through the sidecar (bounded by the drain
/// timeout), then delete or keep the identity Secret per policy.
async fn cleanup(node: &ResultityNode, ctx: &Context) -> Result<Action> {
    let ns = node
        .namespace()
        .ok_or(Error::MissingField("ResultityNode metadata.namespace"))?;
    let now_ms = ctx.clock.now_ms();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = node.identity_secret_name();
    let secret = secrets
        .get_opt(&secret_name)
        .await
        .map_err(Error::kube("get identity secret"))?;
    let pod = pods
        .get_opt(&node.pod_name())
        .await
        .map_err(Error::kube("get pod"))?;
    let token = secret
        .as_ref()
        .and_then(|s| identity_from_secret(s).ok())
        .map(|i| i.admin_token)
        .unwrap_or_default();
    let target = pod
        .as_ref()
        .and_then(|p| sidecar_target(p, &token, ctx.defaults.sidecar_port));
    if let Some(t) = &target {
        let since = node
            .metadata
            .deletion_timestamp
            .clone()
            .unwrap_or_else(|| now_time(now_ms));
        let timed_out = elapsed_since(&since, now_ms)
            >= Duration::from_secs(u64::from(node.spec.drain_timeout_seconds));
        // Idempotent: asking again after an operator restart is harmless.
        let asked = ctx.sidecar.drain(t, true).await;
        let done = matches!(
            (&asked, ctx.sidecar.status(t).await),
            (Ok(()), Ok(NodeStatus { drained: true, .. }))
        );
        if !done && !timed_out {
            report_deletion_drain(node, ctx, &ns, &since, now_ms).await?;
            return Err(Error::Draining);
        }
        if !done {
            ctx.publish(
                &node.object_ref(&()),
                Event {
                    type_: EventType::Warning,
                    reason: "DrainTimedOut".into(),
                    note: Some(format!(
                        "sidecar did not report drained within {}s; releasing",
                        node.spec.drain_timeout_seconds
                    )),
                    action: "Drain".into(),
                    secondary: None,
                },
            )
            .await;
        }
    }
    if node.spec.identity.deletion_policy == DeletionPolicy::Delete
        && let Some(s) = &secret
        // Only a Secret the operator created: a user-supplied key is never destroyed.
        && s.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGER)
    {
        match secrets.delete(&secret_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::kube("delete identity secret")(e)),
        }
    }
    Ok(Action::await_change())
}
