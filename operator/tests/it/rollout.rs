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
