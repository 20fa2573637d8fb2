//! The fleet rollout planner: which node moves to which rollout step, as one pure function of
//! what the fleet's nodes report. The fleet controller only writes the answer onto the nodes.
//!
//! The model is the NVIDIA GPU Operator's driver upgrade: a per-node step
//! (pending → draining → replacing → validating → done, or failed), drain first and no surge
//! (GPUs are scarce, so a node's pod is replaced in place), and a budget counted in nodes the
//! network can route to, not only pods that are Ready.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::RolloutStep;

/// What the planner needs to know about one node of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub ordinal: u32,
    /// The step recorded on the node (`None`: never part of a rollout).
    pub step: Option<RolloutStep>,
    /// How long the node has been in `step`.
    pub in_step_for: Duration,
    /// The node has a pod (old or new) that is not terminating.
    pub pod_present: bool,
    /// The pod runs the spec the node wants now.
    pub updated: bool,
    /// The node's Ready condition is True.
    pub ready: bool,
    /// The network routes jobs to the node (NetworkRoutable True).
    pub routable: bool,
    /// The node's pod is failing (crash loop, image pull) or its spec was rejected.
    pub failing: bool,
    /// Every model the node serves passed its self-test (SelfTestPassed True): a test
    /// inference, and the known answer where the network's config gives one.
    pub self_tested: bool,
    /// A model answered its known-answer request wrongly, with what differed: the new
    /// runtime or weights do not do what the network expects, so the rollout stops here.
    pub answer_mismatch: Option<String>,
}

impl NodeFacts {
    /// Serving jobs: Ready, routable, and not held by a rollout step.
    pub fn available(&self) -> bool {
        self.ready && self.routable && !self.step.is_some_and(RolloutStep::in_progress)
    }
}

/// The fleet's rollout settings, resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strategy {
    /// At least 1: with no surge, 0 could never make progress.
    pub max_unavailable: u32,
    pub partition: u32,
    pub paused: bool,
    pub progress_deadline: Duration,
    /// Retry nodes whose step is `failed` (the fleet's spec changed since they failed).
    pub retry_failed: bool,
}

/// `maxUnavailable` as a node count: an integer, or a percentage of `replicas` rounded down;
/// never below 1. `Err` names a malformed value.
pub fn resolve_max_unavailable(value: &IntOrString, replicas: u32) -> Result<u32, String> {
    let n = match value {
        IntOrString::Int(n) => u32::try_from(*n).map_err(|_| format!("{n} is negative"))?,
        IntOrString::String(s) => {
            let pct: u32 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("{s} is neither a number nor a percentage"))?;
            let n = u64::from(replicas) * u64::from(pct) / 100;
            u32::try_from(n).unwrap_or(u32::MAX)
        }
    };
    Ok(n.max(1))
}

/// One step change for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub node: String,
    pub from: Option<RolloutStep>,
    pub to: RolloutStep,
    /// Why, for the fleet's status and events.
    pub message: String,
}

/// Why the rollout is not making progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    Paused,
    /// A node failed validation; nothing new starts until the fleet's spec changes.
    Failed {
        node: String,
    },
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub transitions: Vec<Transition>,
    pub halted: Option<Halt>,
    /// Every node at or above the partition is updated and done.
    pub complete: bool,
    /// Unavailable nodes once the transitions are applied.
    pub unavailable_after: u32,
}

/// The step a node in progress (or done) moves to by what it reports.
fn advance(n: &NodeFacts, s: &Strategy) -> Option<(RolloutStep, String)> {
    use RolloutStep::*;
    let step = n.step?;
    match step {
        Draining if !n.pod_present || n.updated => Some((
            Replacing,
            "drained; the old pod is gone, the new one is being created".into(),
        )),
        Replacing if n.updated && n.pod_present => {
            Some((Validating, "the new pod runs the desired spec".into()))
        }
        Validating if n.updated && n.ready && n.routable && n.self_tested => Some((
            Done,
            "Ready, routable and self-tested with the desired spec".into(),
        )),
        // The message already names the model and says the self-test failed.
        Validating if n.updated && n.answer_mismatch.is_some() => {
            Some((Failed, n.answer_mismatch.clone().unwrap_or_default()))
        }
        Validating | Replacing if n.failing => Some((
            Failed,
            "the new pod is failing; see the node's conditions".into(),
        )),
        Validating if n.in_step_for >= s.progress_deadline => Some((
            Failed,
            format!(
                "not Ready, routable and self-tested within {}s",
                s.progress_deadline.as_secs()
            ),
        )),
        Pending if n.updated && n.pod_present => {
            Some((Done, "already runs the desired spec".into()))
        }
        Done if !n.updated && n.pod_present => {
            Some((Pending, "out of date; waiting for a rollout slot".into()))
        }
        Failed if s.retry_failed && !n.updated => {
            Some((Pending, "the fleet changed; retrying".into()))
        }
        Failed if n.updated && n.ready && n.routable && n.self_tested => {
            Some((Done, "recovered: Ready and routable".into()))
        }
        _ => None,
    }
}

/// Plans one round of the rollout.
pub fn plan_rollout(nodes: &[NodeFacts], s: &Strategy) -> Plan {
    use RolloutStep::*;
    let mut plan = Plan::default();
    // Steps after the progress transitions, so the budget sees nodes that just finished.
    let mut now: Vec<NodeFacts> = nodes.to_vec();
    for n in &mut now {
        let next = match n.step {
            None if n.pod_present && !n.updated => {
                Some((Pending, "out of date; waiting for a rollout slot".into()))
            }
            None if n.pod_present && n.updated && n.ready => {
                Some((Done, "runs the desired spec".into()))
            }
            _ => advance(n, s),
        };
        if let Some((to, message)) = next {
            plan.transitions.push(Transition {
                node: n.name.clone(),
                from: n.step,
                to,
                message,
            });
            n.step = Some(to);
        }
    }

    let failed = now
        .iter()
        .filter(|n| n.step == Some(Failed))
        .max_by_key(|n| n.ordinal);
    plan.halted = match (s.paused, failed) {
        (_, Some(f)) => Some(Halt::Failed {
            node: f.name.clone(),
        }),
        (true, None) => Some(Halt::Paused),
        (false, None) => None,
    };

    let mut unavailable = count_unavailable(&now);
    if plan.halted.is_none() {
        // Nodes already out of service cost no budget, so they go first; then the highest
        // ordinals, as a StatefulSet does (a partition keeps the lowest ones as they are).
        let mut candidates: Vec<&mut NodeFacts> = now
            .iter_mut()
            .filter(|n| n.step == Some(Pending) && n.ordinal >= s.partition)
            .collect();
        candidates.sort_by_key(|n| (n.available(), std::cmp::Reverse(n.ordinal)));
        for n in candidates {
            let costs = n.available();
            if costs && unavailable >= s.max_unavailable {
                break;
            }
            if costs {
                unavailable += 1;
            }
            plan.transitions.push(Transition {
                node: n.name.clone(),
                from: n.step,
                to: Draining,
                message: "granted a rollout slot; draining".into(),
            });
            n.step = Some(Draining);
        }
    }
    plan.unavailable_after = unavailable;
    plan.complete = now
        .iter()
        .filter(|n| n.ordinal >= s.partition)
        .all(|n| n.updated && n.step == Some(Done));
    plan
}

/// Nodes not serving: not Ready, not routable, or held by a rollout step.
pub fn count_unavailable(nodes: &[NodeFacts]) -> u32 {
    u32::try_from(nodes.iter().filter(|n| !n.available()).count()).unwrap_or(u32::MAX)
}

/// Scale-down order: which nodes to delete to reach `replicas` (the highest ordinals).
pub fn nodes_to_remove(ordinals: &[u32], replicas: u32) -> Vec<u32> {
    let mut extra: Vec<u32> = ordinals
        .iter()
        .copied()
        .filter(|o| *o >= replicas)
        .collect();
    extra.sort_unstable_by(|a, b| b.cmp(a));
    extra
}

/// Ordinals to create to reach `replicas` (the lowest free ones).
pub fn nodes_to_create(ordinals: &[u32], replicas: u32) -> Vec<u32> {
    (0..replicas).filter(|o| !ordinals.contains(o)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_unavailable_resolution() {
        let r = |v: IntOrString, n| resolve_max_unavailable(&v, n);
        assert_eq!(r(IntOrString::Int(3), 10), Ok(3));
        assert_eq!(r(IntOrString::Int(0), 10), Ok(1));
        assert_eq!(r(IntOrString::String("10%".into()), 100), Ok(10));
        assert_eq!(r(IntOrString::String("25%".into()), 10), Ok(2));
        assert_eq!(r(IntOrString::String("1%".into()), 10), Ok(1));
        assert!(r(IntOrString::String("ten".into()), 10).is_err());
        assert!(r(IntOrString::String("150%".into()), 10).is_err());
        assert!(r(IntOrString::Int(-1), 10).is_err());
    }

    fn validating(name: &str, ordinal: u32) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            ordinal,
            step: Some(RolloutStep::Validating),
            in_step_for: Duration::from_secs(5),
            pod_present: true,
            updated: true,
            ready: true,
            routable: true,
            failing: false,
            self_tested: false,
            answer_mismatch: None,
        }
    }

    fn strategy() -> Strategy {
        Strategy {
            max_unavailable: 1,
            partition: 0,
            paused: false,
            progress_deadline: Duration::from_secs(600),
            retry_failed: false,
        }
    }

    fn pending(name: &str, ordinal: u32) -> NodeFacts {
        NodeFacts {
            step: Some(RolloutStep::Pending),
            updated: false,
            self_tested: true,
            ..validating(name, ordinal)
        }
    }

    #[test]
    fn validating_waits_for_the_self_test_and_a_wrong_answer_stops_the_rollout() {
        let s = strategy();
        // Ready and routable, self-test still running: stays validating, takes the budget.
        let plan = plan_rollout(&[validating("n-1", 1), pending("n-0", 0)], &s);
        assert!(plan.transitions.is_empty(), "{:?}", plan.transitions);
        assert!(!plan.complete);

        let passed = NodeFacts {
            self_tested: true,
            ..validating("n-1", 1)
        };
        let plan = plan_rollout(&[passed, pending("n-0", 0)], &s);
        let to: Vec<_> = plan
            .transitions
            .iter()
            .map(|t| (t.node.as_str(), t.to))
            .collect();
        assert_eq!(
            to,
            vec![("n-1", RolloutStep::Done), ("n-0", RolloutStep::Draining)]
        );

        let wrong = NodeFacts {
            answer_mismatch: Some(
                "qwen@r2: known-answer self-test failed: choices[0].text is \" Lyon\", \
                 expected \" Paris\""
                    .into(),
            ),
            ..validating("n-1", 1)
        };
        let plan = plan_rollout(&[wrong, pending("n-0", 0)], &s);
        assert_eq!(plan.transitions.len(), 1);
        assert_eq!(plan.transitions[0].to, RolloutStep::Failed);
        assert!(
            plan.transitions[0].message.contains("expected \" Paris\""),
            "{}",
            plan.transitions[0].message
        );
        assert_eq!(plan.halted, Some(Halt::Failed { node: "n-1".into() }));
    }

    #[test]
    fn scale_orders() {
        assert_eq!(nodes_to_remove(&[0, 1, 2, 3, 4], 2), vec![4, 3, 2]);
        assert_eq!(nodes_to_create(&[0, 2], 4), vec![1, 3]);
        assert!(nodes_to_create(&[0, 1], 2).is_empty());
    }
}
