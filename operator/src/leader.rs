//! Optional leader election through a `coordination.k8s.io/v1` Lease, so only one replica
//! writes. Optimistic concurrency (resourceVersion on replace) decides races; a leader that
//! cannot renew within its renew deadline (shorter than the lease) stops, and the process exits
//! rather than write without the claim. Another holder's lease counts as expired when its
//! record has not changed for the lease duration by *our* monotonic clock (as client-go does):
//! its renewTime comes from another machine's clock and is never compared with ours. On
//! shutdown the leader releases the lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use crate::error::{Error, Result};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// A leader that could not renew for this long stops (client-go: 10 s of 15 s).
    pub renew_deadline: Duration,
    pub renew_every: Duration,
}

/// The longest lease a `Lease` object can record (`leaseDurationSeconds` is an `i32`).
const MAX_LEASE: Duration = Duration::from_secs(i32::MAX as u64);

impl LeaseConfig {
    /// client-go's proportions: renew deadline two thirds of the lease, retry every third of
    /// the deadline.
    /// A duration beyond what a Lease records (`i32` seconds) is cut to that, so the lease
    /// others read says what this replica acts on, and `--lease-seconds` of `u64::MAX` does
    /// not overflow.
    pub fn new(name: String, identity: String, duration: Duration) -> Self {
        let duration = duration.min(MAX_LEASE);
        let renew_deadline = duration / 3 * 2;
        Self {
            name,
            identity,
            duration,
            renew_deadline,
            renew_every: renew_deadline / 3,
        }
    }
}

/// How long another holder's lease record has been unchanged, by our own clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(String, tokio::time::Instant)>,
}

impl Observer {
    /// Records `lease` as seen now and says for how long it has looked exactly like this.
    pub fn unchanged_for(&mut self, lease: Option<&Lease>) -> Duration {
        let now = tokio::time::Instant::now();
        let record = lease.map_or_else(String::new, |l| {
            let spec = l.spec.as_ref();
            format!(
                "{}|{}|{}",
                l.metadata.resource_version.as_deref().unwrap_or(""),
                spec.and_then(|s| s.holder_identity.as_deref())
                    .unwrap_or(""),
                spec.and_then(|s| s.renew_time.as_ref())
                    .map(|t| t.0.to_string())
                    .unwrap_or_default()
            )
        });
        match &self.last {
            Some((seen, since)) if *seen == record => now.duration_since(*since),
            _ => {
                self.last = Some((record, now));
                Duration::ZERO
            }
        }
    }
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

/// Pure decision over the lease as read, given how long its record has been unchanged by our
/// own clock.
pub fn decide(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> Decision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    if holder.is_empty() || unchanged_for >= duration {
        Decision::Acquire
    } else {
        Decision::Wait { holder }
    }
}

fn claimed(mut lease: Lease, cfg: &LeaseConfig, now: Timestamp, fresh: bool) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if fresh {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.holder_identity = Some(cfg.identity.clone());
    spec.lease_duration_seconds = Some(i32::try_from(cfg.duration.as_secs()).unwrap_or(15));
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// One round: reads the lease and takes or renews it. `Ok(true)` when held afterwards.
pub async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig, seen: &mut Observer) -> Result<bool> {
    let now = Timestamp::now();
    let current = api
        .get_opt(&cfg.name)
        .await
        .map_err(Error::kube("get lease"))?;
    let unchanged_for = seen.unchanged_for(current.as_ref());
    let decision = decide(current.as_ref(), &cfg.identity, unchanged_for);
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
    let mut seen = Observer::default();
    loop {
        let attempt = tokio::time::timeout(cfg.renew_deadline, try_hold(api, cfg, &mut seen));
        match attempt.await.unwrap_or(Ok(false)) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease acquire attempt failed"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews until the claim is lost or cannot be renewed within the renew deadline (shorter
/// than the lease, so we stop before anyone may take over); returns then, and the caller
/// must stop writing.
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Error {
    let mut last_ok = tokio::time::Instant::now();
    let mut seen = Observer::default();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        let left = cfg.renew_deadline.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(left, try_hold(api, cfg, &mut seen)).await {
            Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
            Ok(Ok(false)) => return Error::LeaseLost,
            Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
            Err(_) => tracing::warn!("lease renewal timed out"),
        }
        if last_ok.elapsed() >= cfg.renew_deadline {
            return Error::LeaseLost;
        }
    }
}

/// Gives the lease up if we hold it (holder cleared, as client-go's ReleaseOnCancel does), so
/// a standby need not wait out the lease. `Ok(true)` when released.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool> {
    let Some(mut lease) = api
        .get_opt(&cfg.name)
        .await
        .map_err(Error::kube("get lease"))?
    else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(false);
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else wrote it meanwhile: it is not ours to release any more.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(Error::kube("release lease")(e)),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

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
        let fresh = Duration::ZERO;
        assert_eq!(decide(None, "a", fresh), Decision::Acquire);
        assert_eq!(
            decide(Some(&lease("a", now, 15)), "a", fresh),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&lease("b", now, 15)), "a", fresh),
            Decision::Wait { holder: "b".into() }
        );
        // A renewTime far in the past by our clock means nothing by itself (clocks differ);
        // only a record unchanged for the lease duration is expired.
        let stale = now - SignedDuration::from_secs(3600);
        assert_eq!(
            decide(Some(&lease("b", stale, 15)), "a", Duration::from_secs(14)),
            Decision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&lease("b", now, 15)), "a", Duration::from_secs(15)),
            Decision::Acquire
        );
        // Released.
        assert_eq!(
            decide(Some(&lease("", now, 15)), "a", fresh),
            Decision::Acquire
        );
    }

    #[test]
    fn renew_deadline_is_shorter_than_the_lease() {
        let c = LeaseConfig::new("l".into(), "a".into(), Duration::from_secs(15));
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
        assert!(c.renew_every < c.renew_deadline);
    }

    #[test]
    fn a_lease_too_long_for_the_record_is_cut_to_fit() {
        let c = LeaseConfig::new("l".into(), "a".into(), Duration::from_secs(u64::MAX));
        assert_eq!(c.duration, Duration::from_secs(2_147_483_647));
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let written = claimed(Lease::default(), &c, now, true);
        let spec = written.spec.expect("claimed writes a spec");
        assert_eq!(spec.lease_duration_seconds, Some(i32::MAX));
    }

    #[test]
    fn a_taken_lease_counts_transitions_without_overflow() {
        let c = LeaseConfig::new("l".into(), "a".into(), Duration::from_secs(15));
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let mut worn = lease("b", now, 15);
        if let Some(spec) = worn.spec.as_mut() {
            spec.lease_transitions = Some(i32::MAX);
        }
        let taken = claimed(worn, &c, now, true);
        let spec = taken.spec.expect("claimed writes a spec");
        assert_eq!(spec.lease_transitions, Some(i32::MAX));
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn observer_measures_by_our_clock() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let mut seen = Observer::default();
        let l = lease("b", now, 15);
        assert_eq!(seen.unchanged_for(Some(&l)), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(seen.unchanged_for(Some(&l)), Duration::from_secs(9));
        // Renewed: the clock starts again.
        let renewed = lease("b", now + SignedDuration::from_secs(5), 15);
        assert_eq!(seen.unchanged_for(Some(&renewed)), Duration::ZERO);
    }
}
