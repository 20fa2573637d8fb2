//! Optional leader election through a `coordination.k8s.io/v1` Lease, so only one replica
//! writes. Optimistic concurrency (resourceVersion on replace) decides races; a leader that
//! cannot renew in time stops, and the process exits rather than write without the claim.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::error::{Error, Result};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// What to do with the lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (absent, expired, or released): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it until then.
    Wait { holder: String },
}

/// Pure decision over the lease as read at `now`.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    let expires = spec.renew_time.as_ref().map(|t| {
        t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)))
    });
    match expires {
        Some(exp) if exp > now && !holder.is_empty() => Decision::Wait { holder },
        _ => Decision::Acquire,
    }
}

fn claimed(mut lease: Lease, cfg: &LeaseConfig, now: Timestamp, fresh: bool) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if fresh {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(i32::try_from(cfg.duration.as_secs()).unwrap_or(15));
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// One round: reads the lease and takes or renews it. `Ok(true)` when held afterwards.
pub async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool> {
    let now = Timestamp::now();
    let current = api
        .get_opt(&cfg.name)
        .await
        .map_err(Error::kube("get lease"))?;
    let decision = decide(current.as_ref(), &cfg.identity, now);
    let lease = match (decision, current) {
        (Decision::Wait { .. }, _) => return Ok(false),
        (d, Some(l)) => claimed(l, cfg, now, d == Decision::Acquire),
        (_, None) => {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: None,
            };
            let lease = claimed(fresh, cfg, now, true);
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(Error::kube("create lease")(e)),
            };
        }
    };
    // replace carries resourceVersion: a concurrent writer makes this fail with 409.
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(Error::kube("replace lease")(e)),
    }
}

/// Waits until the lease is held.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<()> {
    loop {
        match try_hold(api, cfg).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease acquire attempt failed"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews until the claim is lost or cannot be renewed within the lease duration; returns
/// then, and the caller must stop writing.
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Error {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_hold(api, cfg).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => return Error::LeaseLost,
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                if last_ok.elapsed() >= cfg.duration {
                    return Error::LeaseLost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: Timestamp, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(secs),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(
            decide(Some(&lease("a", now, 15)), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease("b", now, 15)), "a", now),
            Decision::Wait { holder: "b".into() }
        );
        let stale = now - SignedDuration::from_secs(16);
        assert_eq!(
            decide(Some(&lease("b", stale, 15)), "a", now),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&lease("", now, 15)), "a", now),
            Decision::Acquire
        );
    }
}
