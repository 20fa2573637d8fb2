//! ResultityNetwork reconcile: fetch the signed config, verify it against the trusted keys,
//! keep the last good one, and say why an offered one was refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use resultity_protocol::config::{ConfigChain, RetiringKey};
use resultity_protocol::messages::ConfigPointer;
use resultity_protocol::{
    ConfigDigest, ConfigTrust, ConfigVerdict, NetworkId, NetworkKeyId, ProtocolError, SignedConfig,
};

use super::Context;
use crate::conditions::{self, Cond, FALSE, TRUE, UNKNOWN, settle};
use crate::config_source::FetchError;
use crate::crd::{
    ApprovedModelStatus, MANAGER, ResultityNetwork, ResultityNetworkStatus, RetiringKeyStatus,
    RuntimeImageMapping,
};
use crate::error::{Error, Result};

/// Condition types of a ResultityNetwork.
pub mod types {
    pub const CONFIG_FETCHED: &str = "ConfigFetched";
    pub const CONFIG_VERIFIED: &str = "ConfigVerified";
    pub const READY: &str = "Ready";
}

/// An event worth telling a person about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Condition reason for a refused snapshot.
pub fn refusal_reason(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::Rollback { .. } => "Rollback",
        ProtocolError::Expired { .. } => "Expired",
        ProtocolError::NotYetValid { .. } => "NotYetValid",
        ProtocolError::Equivocation { .. } => "Equivocation",
        ProtocolError::ChainMismatch { .. } => "ChainMismatch",
        ProtocolError::RotationConflict { .. } => "RotationConflict",
        ProtocolError::UnknownSigner { .. } | ProtocolError::KeyRetired { .. } => "UnknownSigner",
        ProtocolError::BadSignature { .. } => "BadSignature",
        ProtocolError::WrongAudience { .. } => "WrongNetwork",
        ProtocolError::WeakKey | ProtocolError::Revoked { .. } => "UntrustedKey",
        _ => "Malformed",
    }
}

fn ms_to_time(ms: u64) -> Option<Time> {
    Timestamp::from_millisecond(i64::try_from(ms).ok()?)
        .ok()
        .map(Time)
}

fn time_to_ms(t: &Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

/// The key sets of `trust` as status fields: the active set, and the retiring keys still
/// trusted at `now_ms`.
fn key_status(trust: &ConfigTrust, now_ms: u64) -> (Vec<String>, Vec<RetiringKeyStatus>) {
    let keys = trust.keys.iter().map(|k| k.as_str().to_owned()).collect();
    let retiring = trust
        .retiring
        .iter()
        .filter(|r| now_ms < r.not_after_ms)
        .filter_map(|r| {
            Some(RetiringKeyStatus {
                key: r.key.as_str().to_owned(),
                not_after_time: ms_to_time(r.not_after_ms)?,
            })
        })
        .collect();
    (keys, retiring)
}

/// The trust the operator holds for `net`: pinned spec keys until the network rotated them
/// (with the previous set during an overlap window), and the config in force from status so
/// rollback protection survives restarts.
pub fn trust_for(net: &ResultityNetwork) -> Result<ConfigTrust, String> {
    let prev = net.status.clone().unwrap_or_default();
    let network_id = NetworkId::parse(&net.spec.network_id).map_err(|e| e.to_string())?;
    let key_texts = if prev.trusted_keys.is_empty() {
        &net.spec.public_keys
    } else {
        &prev.trusted_keys
    };
    let keys = key_texts
        .iter()
        .map(|k| NetworkKeyId::parse(k).map_err(|e| format!("key {k}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut trust = ConfigTrust::pinned(network_id, keys);
    trust.retiring = prev
        .retiring_keys
        .iter()
        .map(|r| {
            let key = NetworkKeyId::parse(&r.key).map_err(|e| format!("key {}: {e}", r.key))?;
            Ok(RetiringKey {
                key,
                not_after_ms: time_to_ms(&r.not_after_time),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if let (Some(version), Some(digest)) = (prev.config_version, &prev.config_digest) {
        let digest =
            ConfigDigest::parse(digest).map_err(|e| format!("status.configDigest: {e}"))?;
        trust.current = Some(ConfigPointer { version, digest });
    }
    Ok(trust)
}

/// Computes the next status from a fetch outcome. Pure: `now_ms` is the verification clock.
pub fn compute_network_status(
    net: &ResultityNetwork,
    fetched: &Result<Vec<u8>, FetchError>,
    now_ms: u64,
) -> (ResultityNetworkStatus, Option<Notice>) {
    use types::*;
    let now = ms_to_time(now_ms).unwrap_or(Time(Timestamp::UNIX_EPOCH));
    let prev = net.status.clone().unwrap_or_default();
    let mut next = prev.clone();
    next.observed_generation = net.metadata.generation;
    next.last_fetch_time = Some(now.clone());
    let prev_verified = conditions::find(&prev.conditions, CONFIG_VERIFIED).cloned();
    let mut notice = None;

    // A retiring key leaves the status when its window ends, whatever the fetch brings, so
    // new nodes are no longer pinned with it.
    next.retiring_keys
        .retain(|r| now_ms < time_to_ms(&r.not_after_time));
    let (fetch_cond, verify_cond) = match (trust_for(net), fetched) {
        (Err(e), _) => (
            Cond::new(CONFIG_FETCHED, UNKNOWN, "InvalidSpec", ""),
            Cond::new(CONFIG_VERIFIED, FALSE, "InvalidSpec", e),
        ),
        (Ok(_), Err(e)) => (
            Cond::new(CONFIG_FETCHED, FALSE, "FetchFailed", e.to_string()),
            // Keep the verdict on the config in force; a failed fetch says nothing new about it.
            prev_verified
                .as_ref()
                .map(|c| Cond {
                    type_: CONFIG_VERIFIED,
                    status: if c.status == TRUE { TRUE } else { FALSE },
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                })
                .unwrap_or_else(|| {
                    Cond::new(
                        CONFIG_VERIFIED,
                        UNKNOWN,
                        "NotFetched",
                        "no config fetched yet",
                    )
                }),
        ),
        (Ok(trust), Ok(bytes)) => {
            let fetched_ok = Cond::new(CONFIG_FETCHED, TRUE, "Fetched", "");
            // A catch-up chain since the version in force; a network that predates chains
            // answers with the snapshot itself.
            let verdict = ConfigChain::decode(bytes)
                .or_else(|e| SignedConfig::decode(bytes).map(|s| vec![s]).map_err(|_| e))
                .and_then(|chain| trust.verify_chain(&chain, now_ms));
            let verify = match verdict {
                Ok(ConfigVerdict::Unchanged) => {
                    next.last_verified_time = Some(now.clone());
                    Cond::new(
                        CONFIG_VERIFIED,
                        TRUE,
                        "Verified",
                        format!("version {} in force", prev.config_version.unwrap_or(0)),
                    )
                }
                Ok(ConfigVerdict::New(v))
                    if crate::crd::NetworkEnvironment::from_protocol(
                        v.snapshot.payload.environment,
                    ) != net.spec.environment =>
                {
                    Cond::new(
                        CONFIG_VERIFIED,
                        FALSE,
                        "WrongEnvironment",
                        format!(
                            "config version {} is for {}, spec.environment is {}",
                            v.snapshot.version,
                            crate::crd::NetworkEnvironment::from_protocol(
                                v.snapshot.payload.environment
                            )
                            .as_str(),
                            net.spec.environment.as_str()
                        ),
                    )
                }
                Ok(ConfigVerdict::New(v)) => {
                    let snap = &v.snapshot;
                    let digest = v.digest();
                    next.config_version = Some(snap.version);
                    next.config_digest = Some(digest.to_string());
                    next.config_digest_short = Some(digest.short().to_owned());
                    next.config_expires_time = ms_to_time(snap.expires_at_ms);
                    let mut after = trust.clone();
                    after.apply(&v);
                    (next.trusted_keys, next.retiring_keys) = key_status(&after, now_ms);
                    next.runtime_images = Some(RuntimeImageMapping {
                        vllm: snap.payload.runtime_images.vllm.clone(),
                        triton: snap.payload.runtime_images.triton.clone(),
                    });
                    next.sidecar_image = snap.payload.sidecar_image.clone();
                    next.approved_models = snap
                        .payload
                        .models
                        .iter()
                        .map(|m| ApprovedModelStatus {
                            id: m.model.id.clone(),
                            revision: m.model.revision.clone(),
                            runtimes: m.runtimes.iter().map(|r| r.as_str().to_owned()).collect(),
                            min_gpu_memory_mib: m.min_gpu_memory_mib,
                        })
                        .collect();
                    next.last_verified_time = Some(now.clone());
                    notice = Some(Notice {
                        warning: false,
                        reason: "ConfigUpdated",
                        note: format!("verified config version {} ({digest})", snap.version),
                    });
                    Cond::new(
                        CONFIG_VERIFIED,
                        TRUE,
                        "Verified",
                        format!("version {} in force", snap.version),
                    )
                }
                Err(e) => Cond::new(CONFIG_VERIFIED, FALSE, refusal_reason(&e), e.to_string()),
            };
            (fetched_ok, verify)
        }
    };
    if verify_cond.status == FALSE
        && prev_verified
            .as_ref()
            .is_none_or(|c| c.status != FALSE || c.reason != verify_cond.reason)
    {
        notice = Some(Notice {
            warning: true,
            reason: "ConfigRefused",
            note: match next.config_version {
                Some(v) => format!(
                    "{}: {}; keeping version {v}",
                    verify_cond.reason, verify_cond.message
                ),
                None => format!(
                    "{}: {}; no config is in force yet",
                    verify_cond.reason, verify_cond.message
                ),
            },
        });
    }

    let expires_ms = next
        .config_expires_time
        .as_ref()
        .map(|t| t.0.as_millisecond());
    let ready = match (next.config_version, expires_ms) {
        (None, _) => Cond::new(READY, FALSE, "NoVerifiedConfig", "no config verified yet"),
        (Some(v), Some(exp)) if exp <= i64::try_from(now_ms).unwrap_or(i64::MAX) => Cond::new(
            READY,
            FALSE,
            "ConfigExpired",
            format!("config version {v} expired; waiting for a newer one"),
        ),
        (Some(v), _) => Cond::new(READY, TRUE, "ConfigInForce", format!("version {v}")),
    };
    next.conditions = settle(
        vec![fetch_cond, verify_cond, ready],
        &prev.conditions,
        net.metadata.generation,
        &now,
    );
    (next, notice)
}

/// Status patch body for server-side apply.
pub fn status_patch(status: &ResultityNetworkStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ResultityNetwork::api_version(&()),
        "kind": ResultityNetwork::kind(&()),
        "status": status,
    })
}

/// Reconciles one ResultityNetwork.
pub async fn reconcile(net: Arc<ResultityNetwork>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&net, &ctx).await;
    ctx.metrics.observe("network", started.elapsed());
    result
}

async fn reconcile_inner(net: &ResultityNetwork, ctx: &Context) -> Result<Action> {
    let name = net.name_any();
    let since = net
        .status
        .as_ref()
        .and_then(|s| s.config_version)
        .unwrap_or(0);
    let fetched = ctx.config_source.fetch(&net.spec.io_endpoint, since).await;
    if let Err(e) = &fetched {
        tracing::warn!(network = %name, error = %e, "config fetch failed");
    }
    let now_ms = ctx.clock.now_ms();
    let (status, notice) = compute_network_status(net, &fetched, now_ms);
    let api: Api<ResultityNetwork> = Api::all(ctx.client.clone());
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(status_patch(&status)),
    )
    .await
    .map_err(Error::kube("patch network status"))?;
    if let Some(n) = notice {
        ctx.publish(
            &net.object_ref(&()),
            Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.into(),
                note: Some(n.note),
                action: "VerifyConfig".into(),
                secondary: None,
            },
        )
        .await;
    }
    Ok(Action::requeue(next_poll(net, &status, now_ms)))
}

/// When to look again: the poll interval, or sooner when a retiring key's window ends first,
/// so the status (and the pins of new nodes) drop the key on time.
pub fn next_poll(net: &ResultityNetwork, status: &ResultityNetworkStatus, now_ms: u64) -> Duration {
    let poll = Duration::from_secs(u64::from(net.spec.config_poll_interval_seconds.max(10)));
    status
        .retiring_keys
        .iter()
        .map(|r| time_to_ms(&r.not_after_time).saturating_sub(now_ms))
        .min()
        .map_or(poll, |ms| poll.min(Duration::from_millis(ms.max(1_000))))
}

/// Entry point for a watch that tolerates malformed objects.
pub async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<ResultityNetwork>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    match &obj.0 {
        Ok(net) => reconcile(Arc::new(net.clone()), ctx).await,
        Err(invalid) => {
            Ok(super::report_malformed::<ResultityNetwork>(invalid, &ctx, "network").await)
        }
    }
}

/// [`error_policy`] for [`reconcile_guarded`].
pub fn error_policy_guarded(
    _obj: Arc<DeserializeGuard<ResultityNetwork>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    policy(error, &ctx)
}

/// Backoff after a failed network reconcile (the status patch failed: API trouble).
pub fn error_policy(_net: Arc<ResultityNetwork>, error: &Error, ctx: Arc<Context>) -> Action {
    policy(error, &ctx)
}

fn policy(error: &Error, ctx: &Context) -> Action {
    ctx.metrics.failure("network", error.metric_label());
    tracing::warn!(error = %error, "network reconcile failed");
    Action::requeue(Duration::from_secs(30))
}
