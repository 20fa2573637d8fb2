//! Penalties: what a failure is blamed on, how much it costs, when failures of one cause are
//! one incident, and when repeated incidents exclude a node for a cooldown. The penalty decays
//! with its half-life and lowers the node's score; an exclusion makes it ineligible.

use std::collections::HashMap;

use resultity_protocol::NodeId;
use resultity_protocol::messages::FailCode;

use super::Core;

/// What a failure is blamed on; failures of one cause within the incident window are one
/// incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCause {
    AckTimeout,
    ExecutionDeadline,
    /// The node stayed away past the resume window with work in hand.
    Gone,
    InvalidResult,
    InvalidSignature,
    /// A `job.fail` whose code is the node's fault.
    Reported(FailCode),
}

/// Effective exclusion policy: the network config's, where it sets one, else the service's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyPolicy {
    pub exclude_after_failures: u32,
    pub exclusion_cooldown_ms: u64,
    pub incident_window_ms: u64,
}

pub(super) const PENALTY_TIMEOUT: f64 = 400.0;
pub(super) const PENALTY_INVALID_RESULT: f64 = 500.0;
pub(super) const PENALTY_RUNTIME_ERROR: f64 = 200.0;
const PENALTY_INVALID_SIGNATURE: f64 = 300.0;
pub(super) const PENALTY_MAX: f64 = 1000.0;

/// A node's standing: decaying penalty, open incidents, failed incidents in a row and
/// suspension. Only this part changes it; the others read it through its methods.
#[derive(Debug)]
pub(super) struct PenaltyState {
    amount: f64,
    at_ms: u64,
    reason: Option<String>,
    /// Failed incidents in a row (reset by a completed job or a suspension).
    consecutive_failures: u32,
    /// Open incidents: cause → when it was first charged.
    incidents: HashMap<FailureCause, u64>,
    suspended_until_ms: Option<u64>,
}

impl PenaltyState {
    pub(super) fn new(now: u64) -> Self {
        Self {
            amount: 0.0,
            at_ms: now,
            reason: None,
            consecutive_failures: 0,
            incidents: HashMap::new(),
            suspended_until_ms: None,
        }
    }

    /// Penalty after decay, 0–1000.
    pub(super) fn at(&self, now_ms: u64, half_life_ms: u64) -> f64 {
        if self.amount <= 0.0 {
            return 0.0;
        }
        let age = now_ms.saturating_sub(self.at_ms) as f64;
        self.amount * 0.5f64.powf(age / half_life_ms.max(1) as f64)
    }

    /// Why the node was last charged (or suspended).
    pub(super) fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The end of a suspension still in force at `now`.
    pub(super) fn suspended_until(&self, now: u64) -> Option<u64> {
        self.suspended_until_ms.filter(|t| *t > now)
    }

    /// A completed job ends a run of failed incidents.
    pub(super) fn record_success(&mut self) {
        self.consecutive_failures = 0;
    }
}

impl Core {
    /// The exclusion thresholds in force: the network config's `penalties`, field by field,
    /// over the service's own settings.
    pub fn penalty_policy(&self) -> PenaltyPolicy {
        let p = self.config.penalties.as_ref();
        PenaltyPolicy {
            exclude_after_failures: p
                .and_then(|p| p.exclude_after_failures)
                .unwrap_or(self.sched.exclude_after_failures)
                .max(1),
            exclusion_cooldown_ms: p
                .and_then(|p| p.exclusion_cooldown_ms)
                .unwrap_or(self.sched.exclusion_cooldown_ms),
            incident_window_ms: p
                .and_then(|p| p.incident_window_ms)
                .unwrap_or(self.sched.incident_window_ms),
        }
    }

    /// Charges a node for a failure. Failures are counted per incident, not per job: one
    /// runtime crash or stall fails every job in flight at once, and charging each would take
    /// a node that recovered in seconds out for a whole cooldown. So a failure whose cause
    /// already opened an incident within the incident window adds neither penalty nor a
    /// consecutive failure (it is still counted in `failed`).
    pub(super) fn penalize(
        &mut self,
        node: &NodeId,
        amount: f64,
        why: &str,
        cause: Option<FailureCause>,
        now: u64,
    ) {
        let half_life = self.sched.penalty_half_life_ms;
        let policy = self.penalty_policy();
        let (limit, cooldown, window) = (
            policy.exclude_after_failures,
            policy.exclusion_cooldown_ms,
            policy.incident_window_ms,
        );
        let Some(rec) = self.nodes.get_mut(node) else {
            return;
        };
        if cause.is_some() {
            rec.failed += 1;
        }
        let st = &mut rec.penalty;
        if let Some(cause) = cause {
            match st.incidents.get(&cause) {
                Some(&opened) if now < opened.saturating_add(window) => {
                    tracing::debug!(node = %node, reason = why, "failure belongs to an open incident");
                    return;
                }
                _ => {
                    // Bounded: one entry per cause, and causes are a closed set.
                    st.incidents
                        .retain(|_, opened| now < opened.saturating_add(window));
                    st.incidents.insert(cause, now);
                }
            }
        }
        st.amount = (st.at(now, half_life) + amount).min(PENALTY_MAX);
        st.at_ms = now;
        st.reason = Some(why.to_owned());
        if cause.is_some() {
            st.consecutive_failures += 1;
            if st.consecutive_failures >= limit {
                st.consecutive_failures = 0;
                st.suspended_until_ms = Some(now.saturating_add(cooldown));
                st.reason = Some(format!(
                    "suspended after {limit} consecutive failed incidents; last: {why}"
                ));
                let until = now.saturating_add(cooldown);
                tracing::warn!(node = %node, until, "node suspended");
            }
        }
    }

    pub(super) fn penalty_u32(&self, penalty: &PenaltyState, now: u64) -> u32 {
        penalty
            .at(now, self.sched.penalty_half_life_ms)
            .round()
            .clamp(0.0, PENALTY_MAX) as u32
    }

    /// An invalid signature (or a frame signed by another key) on the node's session.
    pub fn on_invalid_signature(&mut self, node: &NodeId, now: u64) {
        if let Some(rec) = self.nodes.get_mut(node) {
            rec.invalid_signatures += 1;
        }
        self.penalize(
            node,
            PENALTY_INVALID_SIGNATURE,
            "invalid signature on session",
            Some(FailureCause::InvalidSignature),
            now,
        );
    }

    /// Forgets suspensions that have ended.
    pub(super) fn end_suspensions(&mut self, now: u64) {
        for rec in self.nodes.values_mut() {
            if rec.penalty.suspended_until_ms.is_some_and(|t| t <= now) {
                rec.penalty.suspended_until_ms = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use resultity_protocol::config::ConfigDigest;
    use resultity_protocol::messages::ConfigPointer;

    use resultity_protocol::{ErrorCode, JobId};

    use super::super::JobSpec;
    use super::super::testkit::{self, T0, TestNode, core_with_node};
    use super::*;
    use crate::settings::SchedulerSettings;

    const CAUSES: [FailureCause; 6] = [
        FailureCause::AckTimeout,
        FailureCause::ExecutionDeadline,
        FailureCause::InvalidResult,
        FailureCause::Reported(FailCode::RuntimeError),
        FailureCause::Reported(FailCode::DeadlineExceeded),
        FailureCause::Reported(FailCode::OutboxUnavailable),
    ];

    proptest::proptest! {
        /// A runtime crash fails every job in flight within moments: k failures of one cause
        /// inside the incident window are one penalty and one failed incident, never an
        /// exclusion.
        #[test]
        fn a_burst_from_one_incident_is_one_penalty(
            k in 1usize..64,
            offsets in proptest::collection::vec(0u64..5_000, 64),
            cause in 0usize..CAUSES.len(),
        ) {
            let sched = SchedulerSettings::default();
            let (half_life, window) = (sched.penalty_half_life_ms, sched.incident_window_ms);
            proptest::prop_assume!(offsets.iter().all(|o| *o < window));
            let (mut core, node) = core_with_node(sched);
            let t0 = 1_000_000;
            let mut times: Vec<u64> = offsets[..k].iter().map(|o| t0 + o).collect();
            times.sort_unstable();
            times[0] = t0;
            for t in &times {
                core.penalize(&node, PENALTY_TIMEOUT, "stall", Some(CAUSES[cause]), *t);
            }
            let last = times[k - 1];
            let rec = &core.nodes[&node];
            proptest::prop_assert_eq!(rec.penalty.consecutive_failures, 1);
            proptest::prop_assert_eq!(rec.failed, k as u64);
            proptest::prop_assert!(rec.penalty.suspended_until_ms.is_none());
            let one = PENALTY_TIMEOUT * 0.5f64.powf((last - t0) as f64 / half_life as f64);
            proptest::prop_assert!((rec.penalty.at(last, half_life) - one).abs() < 1e-6);
        }

        /// Failures a window apart are separate incidents: the node is suspended after the
        /// configured number of them, as before.
        #[test]
        fn separate_incidents_each_count(cause in 0usize..CAUSES.len()) {
            let sched = SchedulerSettings::default();
            let (limit, window) = (sched.exclude_after_failures, sched.incident_window_ms);
            let (mut core, node) = core_with_node(sched);
            for i in 0..u64::from(limit) {
                let t = 1_000_000 + i * window;
                core.penalize(&node, PENALTY_TIMEOUT, "stall", Some(CAUSES[cause]), t);
            }
            proptest::prop_assert!(core.nodes[&node].penalty.suspended_until_ms.is_some());
        }
    }

    #[test]
    fn the_network_config_overrides_the_service_penalty_settings() {
        let (mut core, _) = core_with_node(SchedulerSettings::default());
        let defaults = core.penalty_policy();
        assert_eq!(defaults.incident_window_ms, 5_000);
        let mut config = core.config().clone();
        config.penalties = Some(resultity_protocol::config::PenaltySettings {
            exclude_after_failures: Some(7),
            exclusion_cooldown_ms: None,
            incident_window_ms: Some(250),
        });
        let pointer = ConfigPointer {
            version: 2,
            digest: ConfigDigest::of_body(b"config 2"),
        };
        core.set_config(Arc::new(config), &pointer, 0);
        let p = core.penalty_policy();
        assert_eq!(p.exclude_after_failures, 7);
        assert_eq!(p.incident_window_ms, 250);
        assert_eq!(p.exclusion_cooldown_ms, defaults.exclusion_cooldown_ms);
    }

    #[test]
    fn hand_backs_and_unknown_codes_are_not_the_nodes_fault() {
        for code in [
            FailCode::HandedBack,
            FailCode::RuntimeUnavailable,
            FailCode::ConfigMismatch,
            FailCode::OverCapacity,
            FailCode::ModelInactive,
            FailCode::Unknown,
        ] {
            assert!(!code.node_fault(), "{code}");
            assert!(code.retriable(), "{code}");
        }
    }

    #[test]
    fn the_incident_window_edge_opens_a_new_incident() {
        let sched = SchedulerSettings::default();
        let window = sched.incident_window_ms;
        let (mut core, node) = core_with_node(sched);
        let t0 = 1_000_000;
        let stall = Some(FailureCause::ExecutionDeadline);
        core.penalize(&node, PENALTY_TIMEOUT, "stall", stall, t0);
        core.penalize(&node, PENALTY_TIMEOUT, "stall", stall, t0 + window - 1);
        assert_eq!(core.nodes[&node].penalty.consecutive_failures, 1);

        core.penalize(&node, PENALTY_TIMEOUT, "stall", stall, t0 + window);

        let rec = &core.nodes[&node];
        assert_eq!((rec.failed, rec.penalty.consecutive_failures), (3, 2));
    }

    #[test]
    fn different_causes_at_once_are_separate_incidents() {
        let (mut core, node) = core_with_node(SchedulerSettings::default());
        let t = 1_000_000;
        core.penalize(&node, 0.0, "a", Some(FailureCause::AckTimeout), t);
        core.penalize(&node, 0.0, "b", Some(FailureCause::InvalidResult), t);
        assert_eq!(core.nodes[&node].penalty.consecutive_failures, 2);
    }

    #[test]
    fn a_completed_job_ends_a_run_of_failed_incidents() {
        let (mut core, node) = core_with_node(SchedulerSettings::default());
        let window = core.penalty_policy().incident_window_ms;
        let t = 1_000_000;
        core.penalize(&node, 0.0, "a", Some(FailureCause::AckTimeout), t);
        core.penalize(&node, 0.0, "a", Some(FailureCause::AckTimeout), t + window);
        if let Some(rec) = core.nodes.get_mut(&node) {
            rec.penalty.record_success();
        }
        core.penalize(
            &node,
            0.0,
            "a",
            Some(FailureCause::AckTimeout),
            t + 2 * window,
        );
        let rec = &core.nodes[&node].penalty;
        assert_eq!(
            (rec.consecutive_failures, rec.suspended_until_ms),
            (1, None)
        );
    }

    #[test]
    fn an_exclusion_lasts_exactly_the_cooldown() {
        let sched = SchedulerSettings {
            exclude_after_failures: 2,
            exclusion_cooldown_ms: 20_000,
            ..SchedulerSettings::default()
        };
        let mut core = testkit::core(sched);
        let mut node = TestNode::join(&mut core, 1, 4, T0);
        let window = core.penalty_policy().incident_window_ms;
        let stall = Some(FailureCause::AckTimeout);
        core.penalize(&node.id, PENALTY_TIMEOUT, "stall", stall, T0);
        assert!(
            core.verdict(&node.id, T0).eligible,
            "one incident is not two"
        );
        let last = T0 + window;
        core.penalize(&node.id, PENALTY_TIMEOUT, "stall", stall, last);
        let until = last + 20_000;

        // One ms before the cooldown ends the node is still out, whatever it reports.
        core.heartbeat(&node.id, testkit::report(4), until - 1)
            .expect("heartbeat");
        let v = core.verdict(&node.id, until - 1);
        assert!(!v.eligible);
        assert_eq!(v.suspended_until_ms, Some(until));
        assert!(v.reason.is_some_and(|r| r.starts_with("suspended until")));
        let refused = core.submit(
            JobId::parse("job-1").expect("id"),
            JobSpec {
                model: testkit::model(),
                kind: resultity_protocol::messages::JobKind::ChatCompletion,
                request: serde_json::json!({}),
                stream: None,
            },
            until - 1,
        );
        assert_eq!(refused.err().map(|e| e.0), Some(ErrorCode::NoEligibleNode));

        // At the end of the cooldown it is back, and takes work (no tick needed).
        core.heartbeat(&node.id, testkit::report(4), until)
            .expect("heartbeat");
        let v = core.verdict(&node.id, until);
        assert!(v.eligible, "{:?}", v.reason);
        assert_eq!(v.suspended_until_ms, None);
        node.sent();
        let (job, _rx) = testkit::submit(&mut core, "job-2", testkit::model(), until);
        assert_eq!(node.assignments()[0].job_id, job);
    }

    #[test]
    fn the_penalty_decays_with_its_half_life() {
        let sched = SchedulerSettings::default();
        let half_life = sched.penalty_half_life_ms;
        let mut core = testkit::core(sched);
        let node = TestNode::join(&mut core, 1, 4, T0);
        let clean = core.verdict(&node.id, T0).score;
        core.penalize(
            &node.id,
            PENALTY_TIMEOUT,
            "stall",
            Some(FailureCause::AckTimeout),
            T0,
        );
        let penalty = |core: &Core, t: u64| core.verdict(&node.id, t).penalty;

        assert_eq!(penalty(&core, T0), 400);
        assert_eq!(penalty(&core, T0 + half_life), 200);
        assert_eq!(penalty(&core, T0 + 2 * half_life), 100);
        assert_eq!(penalty(&core, T0 + 20 * half_life), 0);
        // The score loses 300 × penalty/1000 and wins it back as the penalty decays.
        assert_eq!(core.verdict(&node.id, T0).score, clean - 120);
        assert_eq!(core.verdict(&node.id, T0 + half_life).score, clean - 60);
    }

    /// "Exclude for good" is a cooldown of `u64::MAX` (settable on `serve` and in the config):
    /// the suspension, and its log line, saturate instead of overflowing under the lock. A
    /// subscriber is installed because log fields are evaluated only when a log is wanted.
    #[test]
    fn an_unbounded_cooldown_saturates() {
        let sched = SchedulerSettings {
            exclude_after_failures: 1,
            exclusion_cooldown_ms: u64::MAX,
            ..SchedulerSettings::default()
        };
        let (mut core, node) = core_with_node(sched);
        let logs = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(logs, || {
            core.penalize(&node, 0.0, "stall", Some(FailureCause::Gone), T0);
        });
        let st = &core.nodes[&node].penalty;
        assert_eq!(st.suspended_until(T0), Some(u64::MAX));
    }
}
