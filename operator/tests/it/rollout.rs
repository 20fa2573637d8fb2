//! The fleet rollout planner against a simulated fleet: nodes that drain, get new pods, become
//! Ready after their own delays and drop out of the network's routing at random. Properties
//! over random fleets, timelines and strategies, and the 100-node rollout figure of
//! docs/performance.md.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::time::Duration;

use proptest::prelude::*;
use resultity_operator::crd::RolloutStep;
use resultity_operator::rollout::{NodeFacts, Strategy, count_unavailable, plan_rollout};

/// One simulated node: its pod (by spec version), drain and readiness timing, and outages.
#[derive(Debug, Clone)]
struct SimNode {
    ordinal: u32,
    step: Option<RolloutStep>,
    ticks_in_step: u32,
    /// Spec version of the running pod; `None` while replaced.
    pod: Option<u32>,
    pod_age: u32,
    drain_ticks: u32,
    drained_for: u32,
    ready_after: u32,
    /// Ticks the network will not route to the node (a penalty, a lost connection).
    unroutable_for: u32,
    /// Pods replaced in total (restarts).
    replacements: u32,
}

struct Sim {
    nodes: Vec<SimNode>,
    desired: u32,
    /// Deterministic outage source (xorshift).
    rng: u64,
    outage_per_mille: u64,
    outages_until: u32,
    tick: u32,
}

impl Sim {
    fn new(n: u32, drain: &[u32], ready: &[u32], seed: u64) -> Self {
        let nodes = (0..n)
            .map(|i| SimNode {
                ordinal: i,
                step: Some(RolloutStep::Done),
                ticks_in_step: 0,
                pod: Some(1),
                pod_age: 100,
                drain_ticks: drain[i as usize % drain.len()],
                drained_for: 0,
                ready_after: ready[i as usize % ready.len()],
                unroutable_for: 0,
                replacements: 0,
            })
            .collect();
        Self {
            nodes,
            desired: 1,
            rng: seed | 1,
            outage_per_mille: 0,
            outages_until: 0,
            tick: 0,
        }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn facts(&self) -> Vec<NodeFacts> {
        self.nodes
            .iter()
            .map(|n| {
                let ready = n.pod.is_some() && n.pod_age >= n.ready_after;
                NodeFacts {
                    name: format!("f-{}", n.ordinal),
                    ordinal: n.ordinal,
                    step: n.step,
                    in_step_for: Duration::from_secs(u64::from(n.ticks_in_step)),
                    pod_present: n.pod.is_some(),
                    updated: n.pod == Some(self.desired),
                    ready,
                    routable: ready && n.unroutable_for == 0,
                    failing: false,
                    // The sidecar reports ready once its models passed their self-tests.
                    self_tested: ready,
                    answer_mismatch: None,
                }
            })
            .collect()
    }

    /// One planner round, checked, then one tick of the world.
    fn round(&mut self, s: &Strategy) -> resultity_operator::rollout::Plan {
        let before = self.facts();
        let plan = plan_rollout(&before, s);
        let mut after = before.clone();
        for t in &plan.transitions {
            let f = after.iter_mut().find(|f| f.name == t.node).unwrap();
            assert_eq!(f.step, t.from, "transition from a step the node is not in");
            match t.to {
                RolloutStep::Draining => {
                    assert_eq!(t.from, Some(RolloutStep::Pending), "{t:?}");
                    assert!(!s.paused, "a grant while paused: {t:?}");
                    assert!(f.ordinal >= s.partition, "a grant below the partition");
                }
                RolloutStep::Replacing => {
                    assert_eq!(t.from, Some(RolloutStep::Draining), "{t:?}");
                    assert!(!f.pod_present || f.updated, "replacing an undrained node");
                }
                _ => {}
            }
            f.step = Some(t.to);
        }
        let (was, now) = (count_unavailable(&before), count_unavailable(&after));
        assert!(
            now <= s.max_unavailable.max(was),
            "planner made {now} unavailable (was {was}, budget {})",
            s.max_unavailable
        );
        assert_eq!(plan.unavailable_after, now);
        for t in &plan.transitions {
            let n = self
                .nodes
                .iter_mut()
                .find(|n| format!("f-{}", n.ordinal) == t.node)
                .unwrap();
            n.step = Some(t.to);
            n.ticks_in_step = 0;
        }
        self.advance();
        plan
    }

    /// The node controllers and the kubelet: drain granted nodes, delete drained pods,
    /// create missing pods; pods age toward Ready; the network drops nodes at random.
    fn advance(&mut self) {
        self.tick += 1;
        let desired = self.desired;
        let outages = self.tick <= self.outages_until;
        for i in 0..self.nodes.len() {
            let roll = self.rand() % 1000;
            let n = &mut self.nodes[i];
            n.ticks_in_step += 1;
            n.unroutable_for = n.unroutable_for.saturating_sub(1);
            if outages && roll < self.outage_per_mille {
                n.unroutable_for = 1 + (roll % 3) as u32;
            }
            let granted = n.step.is_some_and(RolloutStep::grants_replacement);
            match n.pod {
                Some(v) if v != desired && granted => {
                    // Only a node the planner sent to draining deletes its old pod, and
                    // only after its drain ran.
                    assert_eq!(n.step, Some(RolloutStep::Draining), "delete before drain");
                    n.drained_for += 1;
                    if n.drained_for > n.drain_ticks {
                        n.pod = None;
                        n.drained_for = 0;
                    }
                }
                Some(_) => n.pod_age += 1,
                None => {
                    n.pod = Some(desired);
                    n.pod_age = 0;
                    n.replacements += 1;
                }
            }
        }
    }

    fn done(&self, s: &Strategy) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.ordinal >= s.partition)
            .all(|n| n.pod == Some(self.desired) && n.step == Some(RolloutStep::Done))
    }

    /// Rounds until the rollout completes (or `limit`).
    fn roll(&mut self, s: &Strategy, limit: u32) -> Option<u32> {
        self.roll_counting(s, limit).map(|(rounds, _)| rounds)
    }

    /// Rounds until complete, and the batches: rounds in which nodes were granted a slot.
    fn roll_counting(&mut self, s: &Strategy, limit: u32) -> Option<(u32, u32)> {
        let mut batches = 0;
        for round in 1..=limit {
            let plan = self.round(s);
            batches += u32::from(
                plan.transitions
                    .iter()
                    .any(|t| t.to == RolloutStep::Draining),
            );
            if self.done(s) {
                return Some((round, batches));
            }
        }
        None
    }
}

fn strategy(max_unavailable: u32, partition: u32, paused: bool) -> Strategy {
    Strategy {
        max_unavailable,
        partition,
        paused,
        progress_deadline: Duration::from_secs(3600),
        retry_failed: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random fleets, readiness timelines, network outages and strategies: the budget holds
    /// every round, only drained nodes are replaced, and the rollout finishes once outages end.
    #[test]
    fn rollouts_respect_the_budget_and_finish(
        n in 1u32..40,
        max_unavailable in 1u32..8,
        partition_frac in 0u32..3,
        drain in proptest::collection::vec(0u32..4, 1..8),
        ready in proptest::collection::vec(1u32..6, 1..8),
        outage_per_mille in 0u64..80,
        outages_until in 0u32..40,
        seed in any::<u64>(),
    ) {
        let partition = if partition_frac == 0 { 0 } else { n / (partition_frac + 1) };
        let s = strategy(max_unavailable, partition, false);
        let mut sim = Sim::new(n, &drain, &ready, seed);
        sim.outage_per_mille = outage_per_mille;
        sim.outages_until = outages_until;
        sim.desired = 2;
        // Bound: each node needs at most drain+ready+4 rounds, one budget slot at a time,
        // after the outages end.
        let per_node = 4 + 4 + 6;
        let limit = outages_until + 5 + per_node * n.div_ceil(max_unavailable) + 10;
        let rounds = sim.roll(&s, limit);
        prop_assert!(rounds.is_some(), "did not finish within {limit} rounds");
        for node in &sim.nodes {
            let expected = u32::from(node.ordinal >= partition);
            prop_assert_eq!(node.replacements, expected, "node {} replaced", node.ordinal);
        }
    }

    /// Paused: no node is granted a slot, whatever the fleet looks like.
    #[test]
    fn nothing_starts_while_paused(
        n in 1u32..30,
        max_unavailable in 1u32..8,
        ready in proptest::collection::vec(1u32..6, 1..8),
        seed in any::<u64>(),
    ) {
        let s = strategy(max_unavailable, 0, true);
        let mut sim = Sim::new(n, &[1], &ready, seed);
        sim.outage_per_mille = 50;
        sim.outages_until = 20;
        sim.desired = 2;
        for _ in 0..30 {
            let plan = sim.round(&s);
            prop_assert!(plan.transitions.iter().all(|t| t.to != RolloutStep::Draining));
        }
        prop_assert!(sim.nodes.iter().all(|n| n.replacements == 0));
    }

    /// A model-only config change leaves every pod's spec as it is: no drain, no restart,
    /// even while nodes drop in and out of routing.
    #[test]
    fn model_only_changes_restart_nothing(
        n in 1u32..30,
        max_unavailable in 1u32..8,
        seed in any::<u64>(),
    ) {
        let s = strategy(max_unavailable, 0, false);
        let mut sim = Sim::new(n, &[1], &[2], seed);
        sim.outage_per_mille = 100;
        sim.outages_until = 30;
        // desired stays 1: the config changed models, not the pod spec.
        for _ in 0..30 {
            let plan = sim.round(&s);
            prop_assert!(plan.transitions.iter().all(|t| t.to != RolloutStep::Draining));
        }
        prop_assert!(sim.nodes.iter().all(|n| n.replacements == 0));
    }
}

/// Rounds one node alone needs for a replacement with these timings (the unit of the ideal).
fn single_node_rounds(drain: u32, ready: u32) -> u32 {
    let mut sim = Sim::new(1, &[drain], &[ready], 1);
    sim.desired = 2;
    sim.roll(&strategy(1, 0, false), 1000).unwrap()
}

/// 100 nodes, `maxUnavailable: 10`, a runtime image change: planner rounds against the ideal
/// `ceil(100/10)` waves of one node's replacement time. The figure is in docs/performance.md.
#[test]
fn hundred_node_rollout_is_close_to_ideal() {
    let (drain, ready) = (2, 3);
    let one = single_node_rounds(drain, ready);
    let mut sim = Sim::new(100, &[drain], &[ready], 1);
    sim.desired = 2;
    let (rounds, batches) = sim.roll_counting(&strategy(10, 0, false), 10_000).unwrap();
    let waves = 100u32.div_ceil(10);
    let ideal = waves * one;
    let ratio = f64::from(rounds) / f64::from(ideal);
    println!(
        "rollout 100 nodes, maxUnavailable 10, uniform timing: {batches} batches vs ideal \
         {waves} ({:.2}x); {rounds} rounds vs {ideal} (10 waves x {one} rounds of one node \
         alone), {ratio:.2}x",
        f64::from(batches) / f64::from(waves)
    );
    assert!(
        f64::from(batches) / f64::from(waves) <= 1.2,
        "{batches} batches"
    );
    assert!(ratio <= 1.2, "ratio {ratio:.2}");
    assert!(sim.nodes.iter().all(|n| n.replacements == 1));

    // Mixed timings: each node drains in 1..=4 rounds and is Ready after 2..=6; the ideal
    // uses the mean single-node time.
    let drains = [1, 2, 3, 4];
    let readies = [2, 3, 4, 5, 6];
    let mut total = 0;
    for i in 0..100 {
        total += single_node_rounds(drains[i % 4], readies[i % 5]);
    }
    let mut sim = Sim::new(100, &drains, &readies, 7);
    sim.desired = 2;
    let rounds = sim.roll(&strategy(10, 0, false), 10_000).unwrap();
    let ideal = f64::from(total) / 100.0 * 10.0;
    println!(
        "rollout 100 nodes, maxUnavailable 10, mixed timing: {rounds} rounds, ideal {ideal:.1}, \
         ratio {:.2}",
        f64::from(rounds) / ideal
    );
    assert!(f64::from(rounds) / ideal <= 1.2);
}

// ---------- the rollout in seconds, with the node controller's own timing ----------

mod timed {
    //! The planner above sees every node's state the round it changes. The real fleet sees a
    //! node's state only once the node's reconcile wrote it, and what the sidecar reports
    //! (drained, the network's verdict) is read only when that reconcile runs: on a watch
    //! event (its rollout label, its pod) or when its requeue comes due. Here one tick is one
    //! second, the node controller's requeue is [`requeue_after`] itself, and the ideal is
    //! the fleet's waves times one node's real cycle (drain, pod start, first verdict) seen
    //! by an observer that looks every second.

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;
    use resultity_operator::conditions::{Cond, FALSE, TRUE, UNKNOWN, settle};
    use resultity_operator::crd::{NodePhase, ResultityNodeStatus};
    use resultity_operator::decide::{DeleteReason, KeepReason, PodAction, requeue_after};

    /// How the node controller decides when to look again.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Looks {
        /// The operator's [`requeue_after`].
        Operator,
        /// The operator's requeue before the backoff: a Ready node waits a flat 60 s.
        FlatMinute,
        /// Every second: the ideal observer, for the baseline.
        EverySecond,
    }

    /// One node: the world (its pod, drain, readiness, verdict) and the status its controller
    /// last wrote.
    #[derive(Clone)]
    struct Node {
        ordinal: u32,
        step: Option<RolloutStep>,
        step_since: u32,
        pod: Option<u32>,
        pod_age: u32,
        drain_asked: Option<u32>,
        drain_s: u32,
        ready_s: u32,
        verdict_s: u32,
        /// Status as written: the facts the fleet plans with.
        status: ResultityNodeStatus,
        written: Option<NodeFacts>,
        next_look: u32,
        replacements: u32,
    }

    struct Fleet {
        nodes: Vec<Node>,
        desired: u32,
        t: u32,
        looks: Looks,
        reconciles: u32,
    }

    fn time(t: u32) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + i64::from(t)).unwrap())
    }

    impl Fleet {
        fn new(n: u32, drain: &[u32], ready: &[u32], verdict: &[u32], looks: Looks) -> Self {
            let nodes = (0..n)
                .map(|i| {
                    let k = i as usize;
                    Node {
                        ordinal: i,
                        step: Some(RolloutStep::Done),
                        step_since: 0,
                        pod: Some(1),
                        pod_age: 1000,
                        drain_asked: None,
                        drain_s: drain[k % drain.len()],
                        ready_s: ready[k % ready.len()],
                        verdict_s: verdict[k % verdict.len()],
                        status: ResultityNodeStatus::default(),
                        written: None,
                        next_look: 0,
                        replacements: 0,
                    }
                })
                .collect();
            let mut f = Self {
                nodes,
                desired: 1,
                t: 0,
                looks,
                reconciles: 0,
            };
            // Settled on spec 1, then the fleet writes spec 2 into every node: a generation
            // change, so every node reconciles at once.
            for desired in [1, 2] {
                f.desired = desired;
                for i in 0..f.nodes.len() {
                    f.look(i);
                }
            }
            f.reconciles = 0;
            f
        }

        /// One node reconcile: decide, carry out, write status, requeue.
        fn look(&mut self, i: usize) {
            self.reconciles += 1;
            let (t, desired, looks) = (self.t, self.desired, self.looks);
            let n = &mut self.nodes[i];
            let granted = n.step.is_some_and(RolloutStep::grants_replacement);
            let action = match n.pod {
                None => {
                    n.pod = Some(desired);
                    n.pod_age = 0;
                    n.replacements += 1;
                    PodAction::Create
                }
                Some(v) if v != desired && granted => match n.drain_asked {
                    Some(at) if t >= at + n.drain_s => {
                        n.pod = None;
                        n.drain_asked = None;
                        PodAction::Delete(DeleteReason::Drained)
                    }
                    Some(at) => PodAction::Drain { started: time(at) },
                    None => {
                        n.drain_asked = Some(t);
                        PodAction::Drain { started: time(t) }
                    }
                },
                Some(v) if v != desired => PodAction::Keep(KeepReason::AwaitingRollout),
                Some(_) => PodAction::Keep(KeepReason::Current),
            };
            let ready = n.pod.is_some() && n.drain_asked.is_none() && n.pod_age >= n.ready_s;
            let routable = ready && n.pod_age >= n.ready_s + n.verdict_s;
            let phase = match (n.pod, n.drain_asked) {
                (_, Some(_)) => NodePhase::Draining,
                (None, _) => NodePhase::Pending,
                (Some(_), None) if ready => NodePhase::Ready,
                (Some(_), None) => NodePhase::Starting,
            };
            let flag = |b: bool, unknown: bool| match (b, unknown) {
                (true, _) => TRUE,
                (false, true) => UNKNOWN,
                (false, false) => FALSE,
            };
            let conds = vec![
                Cond::new("Ready", flag(ready, false), "Test", ""),
                Cond::new("NetworkRoutable", flag(routable, ready), "Test", ""),
                Cond::new("SelfTestPassed", flag(ready, true), "Test", ""),
            ];
            let conditions: Vec<Condition> = settle(conds, &n.status.conditions, Some(1), &time(t));
            n.status = ResultityNodeStatus {
                phase,
                rollout_step: n.step,
                conditions,
                ..ResultityNodeStatus::default()
            };
            n.written = Some(NodeFacts {
                name: format!("f-{}", n.ordinal),
                ordinal: n.ordinal,
                step: n.step,
                in_step_for: Duration::from_secs(u64::from(t - n.step_since)),
                pod_present: n.pod.is_some(),
                updated: n.pod == Some(desired),
                ready,
                routable,
                failing: false,
                self_tested: ready,
                answer_mismatch: None,
            });
            let after = match looks {
                Looks::EverySecond => Duration::from_secs(1),
                Looks::FlatMinute if phase == NodePhase::Ready => Duration::from_secs(60),
                Looks::FlatMinute => action.requeue(),
                Looks::Operator => requeue_after(&n.status, &action, false, &time(t)),
            };
            n.next_look = t + u32::try_from(after.as_secs()).unwrap().max(1);
        }

        /// One second: pods age (a pod turning Ready or going away is a watch event for its
        /// node), due reconciles run, then the fleet plans from what the nodes wrote; a
        /// changed rollout label is a watch event too.
        fn second(&mut self, s: &Strategy) -> bool {
            self.t += 1;
            let t = self.t;
            for i in 0..self.nodes.len() {
                let n = &mut self.nodes[i];
                let event = match n.pod {
                    Some(_) => {
                        n.pod_age += 1;
                        n.pod_age == n.ready_s
                    }
                    // The deleted pod is gone: the pod watch says so.
                    None => true,
                };
                if event || n.next_look <= t {
                    self.look(i);
                }
            }
            let facts: Vec<NodeFacts> = self
                .nodes
                .iter()
                .map(|n| {
                    let mut f = n.written.clone().unwrap();
                    f.step = n.step;
                    f.in_step_for = Duration::from_secs(u64::from(t - n.step_since));
                    f
                })
                .collect();
            let plan = plan_rollout(&facts, s);
            for tr in &plan.transitions {
                let i = self
                    .nodes
                    .iter()
                    .position(|n| format!("f-{}", n.ordinal) == tr.node)
                    .unwrap();
                self.nodes[i].step = Some(tr.to);
                self.nodes[i].step_since = t;
                self.look(i);
            }
            plan.complete
        }

        /// Seconds until the fleet reports the rollout complete.
        fn roll(&mut self, s: &Strategy) -> u32 {
            while !self.second(s) {
                assert!(self.t < 100_000, "the rollout never completed");
            }
            assert!(self.nodes.iter().all(|n| n.replacements == 1));
            self.t
        }
    }

    fn ideal_single(drain: u32, ready: u32, verdict: u32) -> u32 {
        Fleet::new(1, &[drain], &[ready], &[verdict], Looks::EverySecond)
            .roll(&strategy(1, 0, false))
    }

    /// 100 nodes, `maxUnavailable: 10`, a runtime image change; each node drains in 4–10 s,
    /// its new pod is Ready 15–27 s after it starts, and the network's first verdict comes
    /// 2–6 s after that. The rollout must take at most 1.2× ten waves of one node's real
    /// cycle; with a flat 60 s requeue of Ready nodes it takes about twice that.
    #[test]
    fn hundred_node_rollout_in_seconds_is_close_to_ideal() {
        let drains = [4, 6, 8, 10];
        let readies = [15, 19, 23, 27, 21];
        let verdicts = [2, 3, 4, 5, 6, 3, 2];
        let mut total = 0;
        for i in 0..100 {
            total += ideal_single(drains[i % 4], readies[i % 5], verdicts[i % 7]);
        }
        let one = f64::from(total) / 100.0;
        let ideal = one * 10.0;
        let s = strategy(10, 0, false);
        let run = |looks| {
            let mut f = Fleet::new(100, &drains, &readies, &verdicts, looks);
            let secs = f.roll(&s);
            (secs, f.reconciles)
        };
        let (secs, reconciles) = run(Looks::Operator);
        let (flat, flat_reconciles) = run(Looks::FlatMinute);
        let ratio = f64::from(secs) / ideal;
        let flat_ratio = f64::from(flat) / ideal;
        println!(
            "rollout 100 nodes, maxUnavailable 10, in seconds: one node's real cycle {one:.1} s, \
             ideal 10 waves = {ideal:.0} s; with the operator's requeue {secs} s ({ratio:.2}x, \
             {reconciles} node reconciles); with a flat 60 s requeue of Ready nodes {flat} s \
             ({flat_ratio:.2}x, {flat_reconciles} node reconciles)"
        );
        assert!(
            ratio <= 1.2,
            "the rollout took {secs} s, {ratio:.2}x the ideal {ideal:.0} s"
        );
        // The yardstick itself must show the defect, or it measures nothing.
        assert!(
            flat_ratio > 1.5,
            "the flat minute took only {flat_ratio:.2}x"
        );
    }
}
