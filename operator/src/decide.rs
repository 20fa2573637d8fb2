//! Decide step: what to do with a ResultityNode's pod, as one pure function of what was
//! observed. The reconciler only carries the answer out, so every combination of pod state,
//! desired spec, drain progress and sidecar answer is a table-driven test.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::build::pod_spec_hash;
use crate::status::SidecarObservation;

/// Whether a pod whose spec is out of date may be replaced now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplacementGate {
    /// A standalone node replaces its pod as soon as its spec changes.
    Free,
    /// A fleet member whose fleet granted it a rollout slot (step draining or replacing).
    Granted,
    /// A fleet member waiting for its turn: the old pod keeps serving.
    Held,
}

/// Drain progress and limits of the node.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainState<'a> {
    /// When the drain the operator asked for began (`status.drainStartedTime`).
    pub started: Option<&'a Time>,
    /// `spec.drainTimeoutSeconds`.
    pub timeout: Duration,
    pub gate: ReplacementGate,
}

/// Why a pod is kept as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepReason {
    /// The pod runs the desired spec.
    Current,
    /// Nothing can be built now (spec invalid, network not ready, paused): leave the pod alone.
    NotBuildable,
    /// The old pod is terminating; the new one is created once it is gone.
    Terminating,
    /// Out of date, but the fleet has not granted this node its rollout slot yet.
    AwaitingRollout,
}

/// Why an out-of-date pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// The sidecar reported `drained`.
    Drained,
    /// The drain timeout passed first.
    DrainTimedOut,
    /// No sidecar to drain (not running, no IP): nothing in flight can be handed back.
    SidecarNotRunning,
}

/// What the reconciler does with the pod this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum PodAction {
    /// No pod: apply the desired one.
    Create,
    /// Leave the pod as it is.
    Keep(KeepReason),
    /// Out of date: ask the sidecar to drain (idempotent) and wait; `started` is recorded.
    Drain { started: Time },
    /// Out of date and drained (or the drain cannot or did not finish): delete; the
    /// replacement is created on the next pass.
    Delete(DeleteReason),
    /// The pod finished (evicted, node shutdown) and never runs again: delete it and create a
    /// new one. `reason` is the pod's own (`Evicted`, …).
    Recreate { reason: String },
}

impl PodAction {
    /// The drain start to record after this action.
    pub fn drain_started<'a>(&'a self, previous: Option<&'a Time>) -> Option<&'a Time> {
        match self {
            Self::Drain { started } => Some(started),
            Self::Keep(KeepReason::Terminating | KeepReason::NotBuildable) => previous,
            _ => None,
        }
    }

    /// How soon to look again.
    pub fn requeue(&self) -> Duration {
        match self {
            Self::Delete(_) | Self::Recreate { .. } => Duration::from_secs(2),
            Self::Drain { .. } | Self::Keep(KeepReason::Terminating) => Duration::from_secs(5),
            _ => Duration::from_secs(10),
        }
    }
}

/// A pod in phase Failed or Succeeded never runs again (eviction, node shutdown).
pub(crate) fn finished_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    matches!(status.phase.as_deref(), Some("Failed" | "Succeeded"))
        .then(|| status.reason.clone().unwrap_or_else(|| "Failed".into()))
}

fn elapsed_since(since: &Time, now: &Time) -> Duration {
    let ms = now
        .0
        .as_millisecond()
        .saturating_sub(since.0.as_millisecond());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Decides the pod's fate. `desired_hash` is `None` when nothing can be built (the validate
/// step blocked, or the node is paused); `observation` is this pass's sidecar answer.
pub fn decide_pod_action(
    pod: Option<&Pod>,
    desired_hash: Option<&str>,
    drain: &DrainState<'_>,
    observation: &SidecarObservation,
    now: &Time,
) -> PodAction {
    let Some(pod) = pod else {
        return match desired_hash {
            Some(_) => PodAction::Create,
            None => PodAction::Keep(KeepReason::NotBuildable),
        };
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return PodAction::Keep(KeepReason::Terminating);
    }
    let Some(desired) = desired_hash else {
        return PodAction::Keep(KeepReason::NotBuildable);
    };
    // A finished pod serves nothing: replacing it costs no availability, so no gate applies.
    if let Some(reason) = finished_reason(pod) {
        return PodAction::Recreate { reason };
    }
    if pod_spec_hash(pod) == Some(desired) {
        return PodAction::Keep(KeepReason::Current);
    }
    if drain.gate == ReplacementGate::Held {
        return PodAction::Keep(KeepReason::AwaitingRollout);
    }
    match observation {
        SidecarObservation::Report(r) if r.drained => PodAction::Delete(DeleteReason::Drained),
        SidecarObservation::NotRunning => PodAction::Delete(DeleteReason::SidecarNotRunning),
        _ => match drain.started {
            Some(started) if elapsed_since(started, now) >= drain.timeout => {
                PodAction::Delete(DeleteReason::DrainTimedOut)
            }
            Some(started) => PodAction::Drain {
                started: started.clone(),
            },
            None => PodAction::Drain {
                started: now.clone(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::jiff::Timestamp;
    use resultity_protocol::status::NodeStatus;

    use super::*;
    use crate::crd::ANNOTATION_SPEC_HASH;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + s).unwrap())
    }

    fn pod(hash: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_SPEC_HASH.to_owned(),
            hash.to_owned(),
        )]));
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        });
        p
    }
    fn terminating(hash: &str) -> Pod {
        let mut p = pod(hash);
        p.metadata.deletion_timestamp = Some(at(-5));
        p
    }
    fn evicted(hash: &str) -> Pod {
        let mut p = pod(hash);
        p.status = Some(PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            ..PodStatus::default()
        });
        p
    }

    fn report(draining: bool, drained: bool) -> SidecarObservation {
        let mut r: NodeStatus =
            serde_json::from_str(include_str!("../tests/fixtures/sidecar-ready.json")).unwrap();
        r.draining = draining;
        r.drained = drained;
        SidecarObservation::Report(Box::new(r))
    }
    fn unreachable() -> SidecarObservation {
        SidecarObservation::Unreachable {
            reason: "Timeout".into(),
            message: "no answer".into(),
        }
    }

    struct Row {
        name: &'static str,
        pod: Option<Pod>,
        desired: Option<&'static str>,
        started: Option<Time>,
        gate: ReplacementGate,
        obs: SidecarObservation,
        want: PodAction,
    }

    fn row(name: &'static str, pod: Option<Pod>, desired: Option<&'static str>) -> Row {
        Row {
            name,
            pod,
            desired,
            started: None,
            gate: ReplacementGate::Free,
            obs: report(false, false),
            want: PodAction::Create,
        }
    }
    impl Row {
        fn started(mut self, s: i64) -> Self {
            self.started = Some(at(s));
            self
        }
        fn gate(mut self, g: ReplacementGate) -> Self {
            self.gate = g;
            self
        }
        fn obs(mut self, o: SidecarObservation) -> Self {
            self.obs = o;
            self
        }
        fn want(mut self, w: PodAction) -> Self {
            self.want = w;
            self
        }
    }

    #[test]
    fn decisions() {
        use DeleteReason::*;
        use KeepReason::*;
        use PodAction::*;
        use ReplacementGate::*;
        let now = at(0);
        let rows = [
            row("no pod, buildable", None, Some("new")).want(Create),
            row(
                "no pod, fleet hold does not stop a create",
                None,
                Some("new"),
            )
            .gate(Held)
            .want(Create),
            row("no pod, blocked", None, None).want(Keep(NotBuildable)),
            row("current pod", Some(pod("new")), Some("new")).want(Keep(Current)),
            row(
                "current pod clears a stale drain",
                Some(pod("new")),
                Some("new"),
            )
            .started(-30)
            .want(Keep(Current)),
            row("blocked: old pod keeps running", Some(pod("old")), None).want(Keep(NotBuildable)),
            row("terminating", Some(terminating("old")), Some("new")).want(Keep(Terminating)),
            row("evicted", Some(evicted("new")), Some("new")).want(Recreate {
                reason: "Evicted".into(),
            }),
            row("evicted while held", Some(evicted("old")), Some("new"))
                .gate(Held)
                .want(Recreate {
                    reason: "Evicted".into(),
                }),
            row("evicted but blocked", Some(evicted("old")), None).want(Keep(NotBuildable)),
            row("changed: drain starts now", Some(pod("old")), Some("new"))
                .want(Drain { started: at(0) }),
            row("changed, fleet holds", Some(pod("old")), Some("new"))
                .gate(Held)
                .want(Keep(AwaitingRollout)),
            row("changed, fleet granted", Some(pod("old")), Some("new"))
                .gate(Granted)
                .want(Drain { started: at(0) }),
            row("draining keeps its start", Some(pod("old")), Some("new"))
                .started(-10)
                .obs(report(true, false))
                .want(Drain { started: at(-10) }),
            row(
                "sidecar unreachable: keep waiting",
                Some(pod("old")),
                Some("new"),
            )
            .started(-10)
            .obs(unreachable())
            .want(Drain { started: at(-10) }),
            row("drained", Some(pod("old")), Some("new"))
                .started(-10)
                .obs(report(true, true))
                .want(Delete(Drained)),
            row("drain timed out", Some(pod("old")), Some("new"))
                .started(-300)
                .obs(report(true, false))
                .want(Delete(DrainTimedOut)),
            row(
                "unreachable past the timeout",
                Some(pod("old")),
                Some("new"),
            )
            .started(-301)
            .obs(unreachable())
            .want(Delete(DrainTimedOut)),
            row("no sidecar to drain", Some(pod("old")), Some("new"))
                .obs(SidecarObservation::NotRunning)
                .want(Delete(SidecarNotRunning)),
            row(
                "pod without a hash is out of date",
                Some(Pod::default()),
                Some("new"),
            )
            .obs(SidecarObservation::NotRunning)
            .want(Delete(SidecarNotRunning)),
        ];
        for r in rows {
            let drain = DrainState {
                started: r.started.as_ref(),
                timeout: Duration::from_secs(300),
                gate: r.gate,
            };
            let got = decide_pod_action(r.pod.as_ref(), r.desired, &drain, &r.obs, &now);
            assert_eq!(got, r.want, "{}", r.name);
        }
    }

    #[test]
    fn drain_start_is_recorded_only_while_draining_or_waiting() {
        let prev = at(-10);
        let started = at(-3);
        assert_eq!(
            PodAction::Drain {
                started: started.clone()
            }
            .drain_started(Some(&prev)),
            Some(&started)
        );
        assert_eq!(
            PodAction::Keep(KeepReason::Terminating).drain_started(Some(&prev)),
            Some(&prev)
        );
        assert_eq!(
            PodAction::Keep(KeepReason::Current).drain_started(Some(&prev)),
            None
        );
        assert_eq!(
            PodAction::Delete(DeleteReason::Drained).drain_started(Some(&prev)),
            None
        );
    }
}
