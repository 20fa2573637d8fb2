//! ResultityNode reconcile: validate → build → server-side apply → read back → compute status
//! → apply status, behind a finalizer that drains the node before it goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
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
use crate::build::{
    SECRET_ADMIN_TOKEN, SECRET_KEY_FILE, build_identity_secret, build_pod, pod_spec_hash,
    sidecar_container_name,
};
use crate::crd::{
    DeletionPolicy, LABEL_MANAGED_BY, MANAGER, NodePhase, ResultityNetwork, ResultityNode,
    ResultityNodeStatus,
};
use crate::error::{Error, Result};
use crate::sidecar::SidecarTarget;
use crate::status::{Observed, SidecarObservation, compute_node_status};
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
            .ok_or_else(|| format!("secret has no {key:?} entry"))
            .and_then(|v| {
                String::from_utf8(v.0.clone()).map_err(|_| format!("{key:?} is not UTF-8"))
            })
    };
    let key = NodeKeypair::from_key_file_text(field(SECRET_KEY_FILE)?.trim())
        .map_err(|e| format!("{SECRET_KEY_FILE:?}: {e}"))?;
    let admin_token = field(SECRET_ADMIN_TOKEN)?.trim().to_owned();
    if admin_token.len() < 16 {
        return Err(format!(
            "{SECRET_ADMIN_TOKEN:?} is shorter than 16 characters"
        ));
    }
    Ok(Identity {
        node_id: key.id().as_str().to_owned(),
        admin_token,
    })
}

/// Gets the identity Secret, creating it with a fresh key when absent.
async fn ensure_identity(
    node: &ResultityNode,
    secrets: &Api<Secret>,
) -> Result<Result<Identity, String>> {
    let name = node.identity_secret_name();
    if let Some(s) = secrets
        .get_opt(&name)
        .await
        .map_err(Error::kube("get identity secret"))?
    {
        return Ok(identity_from_secret(&s).map_err(|e| format!("identity secret {name}: {e}")));
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
            let s = secrets
                .get(&name)
                .await
                .map_err(Error::kube("get identity secret"))?;
            Ok(identity_from_secret(&s).map_err(|e| format!("identity secret {name}: {e}")))
        }
        Err(e) => Err(Error::kube("create identity secret")(e)),
    }
}

/// A pod in phase Failed or Succeeded never runs again (eviction, node shutdown).
fn pod_finished(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Failed" || p == "Succeeded")
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

fn drained(obs: &SidecarObservation) -> bool {
    matches!(obs, SidecarObservation::Report(r) if r.drained)
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

async fn apply(node: &ResultityNode, ctx: &Context) -> Result<Action> {
    let ns = node
        .namespace()
        .ok_or(Error::MissingField("ResultityNode metadata.namespace"))?;
    let now_ms = ctx.clock.now_ms();
    let now = now_time(now_ms);
    let networks: Api<ResultityNetwork> = Api::all(ctx.client.clone());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = node.status.clone().unwrap_or_default();

    // validate
    let network = networks
        .get_opt(&node.spec.network_ref.name)
        .await
        .map_err(Error::kube("get network"))?;
    let mut resolved = validate_node(node, network.as_ref(), &ctx.defaults);
    let identity = match ensure_identity(node, &secrets).await? {
        Ok(i) => Some(i),
        Err(msg) => {
            resolved = Err(Blocker::Invalid(vec![msg]));
            None
        }
    };
    let network_config = network
        .as_ref()
        .and_then(|n| n.status.as_ref())
        .and_then(|s| {
            Some(crate::crd::ConfigRef {
                version: s.config_version?,
                digest: s.config_digest.clone()?,
            })
        });

    let pod_name = node.pod_name();
    let mut pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(Error::kube("get pod"))?;
    let token = identity
        .as_ref()
        .map(|i| i.admin_token.as_str())
        .unwrap_or("");
    let mut target = pod
        .as_ref()
        .and_then(|p| sidecar_target(p, token, ctx.defaults.sidecar_port));
    let mut drain_started = prev.drain_started_time.clone();
    let mut sidecar = None;
    let mut requeue = Duration::from_secs(10);

    if let (Ok(resolved), Some(identity), false) = (&resolved, &identity, node.spec.paused) {
        // build
        let desired = build_pod(node, resolved, &identity.node_id, &ctx.defaults)?;
        let desired_hash = pod_spec_hash(&desired).map(str::to_owned);
        match &pod {
            None => {
                // apply
                let applied = pods
                    .patch(
                        &pod_name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&desired),
                    )
                    .await
                    .map_err(Error::kube("apply pod"))?;
                ctx.publish(
                    &node.object_ref(&()),
                    Event {
                        type_: EventType::Normal,
                        reason: "PodCreated".into(),
                        note: Some(format!("created pod {pod_name}")),
                        action: "CreatePod".into(),
                        secondary: None,
                    },
                )
                .await;
                pod = Some(applied);
                drain_started = None;
                target = None;
            }
            Some(p) if pod_finished(p) => {
                // Evicted or otherwise finished: it will never run again and holds the name.
                pods.delete(&pod_name, &DeleteParams::default())
                    .await
                    .map_err(Error::kube("delete pod"))?;
                let reason = p
                    .status
                    .as_ref()
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_else(|| "Failed".into());
                ctx.publish(
                    &node.object_ref(&()),
                    Event {
                        type_: EventType::Warning,
                        reason: "PodReplaced".into(),
                        note: Some(format!("pod {pod_name} finished ({reason}); replacing it")),
                        action: "ReplacePod".into(),
                        secondary: None,
                    },
                )
                .await;
                pod = None;
                drain_started = None;
                target = None;
                requeue = Duration::from_secs(2);
            }
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                // The old pod is still terminating; create the new one once it is gone.
                requeue = Duration::from_secs(5);
            }
            Some(p) if pod_spec_hash(p) != desired_hash.as_deref() => {
                // Spec changed: drain first so in-flight jobs finish, then replace.
                let started = drain_started.get_or_insert_with(|| now.clone()).clone();
                if let Some(t) = &target
                    && let Err(e) = ctx.sidecar.drain(t, false).await
                {
                    tracing::warn!(pod = %pod_name, error = %e, "drain request failed");
                }
                let obs = observe_sidecar(ctx, target.as_ref()).await;
                let timed_out = elapsed_since(&started, now_ms)
                    >= Duration::from_secs(u64::from(node.spec.drain_timeout_seconds));
                if drained(&obs) || target.is_none() || timed_out {
                    pods.delete(&pod_name, &DeleteParams::default())
                        .await
                        .map_err(Error::kube("delete pod"))?;
                    ctx.publish(
                        &node.object_ref(&()),
                        Event {
                            type_: if timed_out {
                                EventType::Warning
                            } else {
                                EventType::Normal
                            },
                            reason: "PodReplaced".into(),
                            note: Some(if timed_out {
                                format!("spec changed; drain timed out, deleted pod {pod_name}")
                            } else {
                                format!("spec changed; drained and deleted pod {pod_name}")
                            }),
                            action: "ReplacePod".into(),
                            secondary: None,
                        },
                    )
                    .await;
                    drain_started = None;
                    requeue = Duration::from_secs(2);
                } else {
                    requeue = Duration::from_secs(5);
                }
                sidecar = Some(obs);
            }
            Some(_) => {
                drain_started = None;
            }
        }
    }

    // read back + compute
    let sidecar = match sidecar {
        Some(s) => s,
        None => observe_sidecar(ctx, target.as_ref()).await,
    };
    let blocker = resolved.as_ref().err();
    let status = compute_node_status(&Observed {
        node,
        blocker,
        node_id: identity.as_ref().map(|i| i.node_id.as_str()),
        network_config: network_config.as_ref(),
        pod: pod.as_ref(),
        sidecar: &sidecar,
        drain_started: drain_started.as_ref(),
        now: &now,
    });
    let api: Api<ResultityNode> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &node.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(status_patch(&status)),
    )
    .await
    .map_err(Error::kube("patch node status"))?;
    if status.phase != prev.phase {
        let warning = matches!(status.phase, NodePhase::Failed | NodePhase::Invalid);
        let why = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        ctx.publish(
            &node.object_ref(&()),
            Event {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: status.phase.as_str().into(),
                note: Some(format!(
                    "{} -> {}: {why}",
                    prev.phase.as_str(),
                    status.phase.as_str()
                )),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(match (&status.phase, &sidecar) {
        (NodePhase::Invalid, _) => Action::requeue(Duration::from_secs(300)),
        (_, SidecarObservation::Unreachable { .. }) => Action::requeue(Duration::from_secs(15)),
        (NodePhase::Ready, _) => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(requeue),
    })
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
