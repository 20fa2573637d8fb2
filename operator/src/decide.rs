//! Decide step: what to do with a ResultityNode's pod, as one pure function of what was
//! observed. The reconciler only carries the answer out, so every combination of pod state,
//! desired spec, drain progress and sidecar answer is a table-driven test.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::conditions::find;
use crate::crd::{NodePhase, ResultityNodeStatus, RolloutStep};
use crate::pod_contract::{finished_reason, pod_spec_hash};
use crate::status::SidecarObservation;
use crate::status::types::{NETWORK_ROUTABLE, SELF_TEST_PASSED};

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

/// Resync of a node that is Ready, routable and self-tested: nothing is waited for.
pub const READY_RESYNC: Duration = Duration::from_secs(60);
/// Backoff cap while a Ready node waits for the network's verdict or its self-test.
pub const ROUTABLE_POLL_CAP: Duration = Duration::from_secs(30);
/// Backoff cap while the node's fleet waits for it in `validating`: at most `maxUnavailable`
/// nodes are there, and every second they wait holds the next wave back.
pub const VALIDATING_POLL_CAP: Duration = Duration::from_secs(5);
const POLL_MIN: Duration = Duration::from_secs(1);

/// How soon to look at the node again, from the status just computed and the pod action.
///
/// What a node waits for after it turns Ready (the network's first verdict, its self-test)
/// shows only in the sidecar's report, which no watch delivers, so it is polled: on a backoff
/// anchored at the status's latest condition flip (1 s, 2 s, 4 s … since the delay is the time
/// since then), capped. The anchor lives in the status, so the backoff survives an operator
/// restart and restarts itself on any change.
pub fn requeue_after(
    status: &ResultityNodeStatus,
    action: &PodAction,
    sidecar_unreachable: bool,
    now: &Time,
) -> Duration {
    let is_true = |t: &str| find(&status.conditions, t).is_some_and(|c| c.status == "True");
    let validating = status.rollout_step == Some(RolloutStep::Validating);
    let waiting = match status.phase {
        NodePhase::Invalid => return Duration::from_secs(300),
        _ if sidecar_unreachable => return Duration::from_secs(15),
        NodePhase::Ready => !(is_true(NETWORK_ROUTABLE) && is_true(SELF_TEST_PASSED)),
        // The new pod runs; what it still lacks (registration, models, engine) comes from
        // the sidecar too.
        NodePhase::Starting | NodePhase::Loading | NodePhase::Degraded => {
            validating && *action == PodAction::Keep(KeepReason::Current)
        }
        _ => false,
    };
    if !waiting {
        return match status.phase {
            NodePhase::Ready => READY_RESYNC,
            _ => action.requeue(),
        };
    }
    let cap = if validating {
        VALIDATING_POLL_CAP
    } else {
        ROUTABLE_POLL_CAP
    };
    let since = status
        .conditions
        .iter()
        .map(|c| &c.last_transition_time)
        .max_by_key(|t| t.0);
    since
        .map_or(POLL_MIN, |t| elapsed_since(t, now))
        .clamp(POLL_MIN, cap)
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

    fn cond(
        type_: &str,
        status: &str,
        since: i64,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "Test".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at(since),
        }
    }

    /// A status of `phase` whose Ready flipped at `ready_since` and whose routability and
    /// self-test are as given (flipped at -3600 unless they flipped later).
    fn status(
        phase: NodePhase,
        ready_since: i64,
        routable: (&str, i64),
        self_tested: &str,
        step: Option<RolloutStep>,
    ) -> ResultityNodeStatus {
        ResultityNodeStatus {
            phase,
            rollout_step: step,
            conditions: vec![
                cond(
                    "Ready",
                    if phase == NodePhase::Ready {
                        "True"
                    } else {
                        "False"
                    },
                    ready_since,
                ),
                cond(NETWORK_ROUTABLE, routable.0, routable.1),
                cond(SELF_TEST_PASSED, self_tested, -3600),
            ],
            ..ResultityNodeStatus::default()
        }
    }

    #[test]
    fn requeue_waits_for_what_a_node_still_lacks_on_a_backoff_not_a_fixed_minute() {
        use KeepReason::*;
        use NodePhase::*;
        use RolloutStep::Validating;
        let secs = Duration::from_secs;
        let keep = PodAction::Keep(Current);
        let now = at(0);
        let look = |s: &ResultityNodeStatus| requeue_after(s, &keep, false, &now);
        // Ready with nothing to wait for: the slow resync.
        assert_eq!(
            look(&status(Ready, -10, ("True", -10), "True", None)),
            READY_RESYNC
        );
        assert_eq!(
            look(&status(Ready, -10, ("True", -10), "True", Some(Validating))),
            READY_RESYNC
        );
        // Ready a moment ago, no verdict yet: 1 s, 2 s, 4 s … since the flip, capped.
        let fresh = |ago: i64, step| status(Ready, -ago, ("Unknown", -ago), "True", step);
        assert_eq!(look(&fresh(0, None)), secs(1));
        assert_eq!(look(&fresh(1, None)), secs(1));
        assert_eq!(look(&fresh(2, None)), secs(2));
        assert_eq!(look(&fresh(4, None)), secs(4));
        assert_eq!(look(&fresh(8, None)), secs(8));
        assert_eq!(look(&fresh(600, None)), ROUTABLE_POLL_CAP);
        // A fleet waiting for it in validating: a tighter cap.
        assert_eq!(look(&fresh(4, Some(Validating))), secs(4));
        assert_eq!(look(&fresh(600, Some(Validating))), VALIDATING_POLL_CAP);
        // The anchor is the latest flip: Ready long ago, routability lost just now.
        assert_eq!(
            look(&status(Ready, -9000, ("False", -2), "True", None)),
            secs(2)
        );
        // Routable but the self-test still runs.
        assert_eq!(
            look(&status(Ready, -3, ("True", -3), "Unknown", None)),
            secs(3)
        );
        // A clock behind the flip never asks for less than the minimum.
        assert_eq!(look(&fresh(-5, None)), secs(1));
        // Not Ready yet while validating: the sidecar's progress is polled as well.
        assert_eq!(
            look(&status(
                Loading,
                -2,
                ("Unknown", -2),
                "Unknown",
                Some(Validating)
            )),
            secs(2)
        );
        // Not Ready and nobody waits on it: the pod action's own interval.
        assert_eq!(
            look(&status(Loading, -2, ("Unknown", -2), "Unknown", None)),
            keep.requeue()
        );
        let drain = PodAction::Drain { started: at(-1) };
        assert_eq!(
            requeue_after(
                &status(Draining, -2, ("False", -2), "True", Some(Validating)),
                &drain,
                false,
                &now
            ),
            drain.requeue()
        );
        // Unreachable and invalid keep their own intervals.
        assert_eq!(
            requeue_after(&fresh(0, Some(Validating)), &keep, true, &now),
            secs(15)
        );
        assert_eq!(
            look(&status(Invalid, 0, ("Unknown", 0), "Unknown", None)),
            secs(300)
        );
    }
}
