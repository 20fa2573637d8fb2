//! Compute step: a ResultityNode's status from what was observed — the validate outcome, the
//! pod, and the sidecar's `/status` document (or why it could not be read). Pure, so every
//! combination of pod state and sidecar report is a fixture test.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use resultity_protocol::messages::common::{ModelState, NodePhase as SidecarPhase, SelfTest};
use resultity_protocol::status::{ConnectionState, NodeStatus};

use crate::conditions::{Cond, FALSE, TRUE, UNKNOWN, settle};
use crate::crd::{
    ConfigRef, GpuStatus, GpuVisibility, JobsStatus, ModelStateStatus, NodePhase, ResultityNode,
    ResultityNodeStatus,
};
use crate::pod_contract::{runtime_container_name, sidecar_container_name};
use crate::validate::Blocker;

/// Condition types of a ResultityNode.
pub mod types {
    pub const POD_SCHEDULED: &str = "PodScheduled";
    pub const RUNTIME_READY: &str = "RuntimeReady";
    pub const REGISTERED: &str = "Registered";
    pub const CONNECTED: &str = "Connected";
    pub const CONFIG_IN_SYNC: &str = "ConfigInSync";
    /// NVML reports no ECC/XID trouble and at least `spec.gpu.minMemoryMib`.
    pub const GPU_HEALTHY: &str = "GPUHealthy";
    /// Aggregate of the conditions above (GPUHealthy included).
    pub const READY: &str = "Ready";
    /// Informational, not part of Ready: the network's own verdict (eligible, penalty, reason),
    /// kept apart because a Ready node can still be unroutable for reasons of the network.
    pub const NETWORK_ROUTABLE: &str = "NetworkRoutable";
    /// Informational: a drain is under way.
    pub const DRAINING: &str = "Draining";
    /// Informational, but a fleet rollout waits for it: every model the node serves passed its
    /// test inference and, where the network's config gives one, its known answer.
    pub const SELF_TEST_PASSED: &str = "SelfTestPassed";
    /// Informational, not part of Ready: every model of the spec is active; while False with
    /// reason `Loading`, the message carries the progress.
    pub const MODELS_LOADED: &str = "ModelsLoaded";
}

/// The `GPUHealthy` reason of a node with `spec.gpu.visibility: none`: True, since nothing is
/// requested and nothing is checked.
pub const REASON_GPU_CHECKS_OFF: &str = "ChecksOff";

/// The `SelfTestPassed` reason a fleet rollout treats as final: the runtime answers, wrongly.
pub const REASON_KNOWN_ANSWER_MISMATCH: &str = "KnownAnswerMismatch";

/// The node's self-test from the models the sidecar reports.
fn self_test_condition(r: &NodeStatus) -> Cond {
    use types::SELF_TEST_PASSED;
    let name = |m: &resultity_protocol::messages::ModelStatus| {
        format!("{}@{}", m.model.id, m.model.revision)
    };
    let why = |m: &resultity_protocol::messages::ModelStatus| match &m.reason {
        Some(reason) => format!("{}: {reason}", name(m)),
        None => name(m),
    };
    let wanted: Vec<_> = r
        .models
        .iter()
        .filter(|m| m.state != ModelState::Inactive)
        .collect();
    let listed = |pick: &dyn Fn(&&resultity_protocol::messages::ModelStatus) -> bool| {
        wanted
            .iter()
            .filter(|m| pick(m))
            .map(|m| why(m))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mismatched = listed(&|m| m.self_test == Some(SelfTest::Mismatch));
    if !mismatched.is_empty() {
        return Cond::new(
            SELF_TEST_PASSED,
            FALSE,
            REASON_KNOWN_ANSWER_MISMATCH,
            mismatched,
        );
    }
    let failed = listed(&|m| m.state == ModelState::Failed);
    if !failed.is_empty() {
        return Cond::new(SELF_TEST_PASSED, FALSE, "ModelFailed", failed);
    }
    let testing = wanted
        .iter()
        .filter(|m| m.state != ModelState::Active)
        .map(|m| name(m))
        .collect::<Vec<_>>();
    if !testing.is_empty() {
        return Cond::new(
            SELF_TEST_PASSED,
            UNKNOWN,
            "Testing",
            format!("not yet tested: {}", testing.join(", ")),
        );
    }
    if wanted.is_empty() {
        return Cond::new(
            SELF_TEST_PASSED,
            UNKNOWN,
            "NoModels",
            "the node serves no model yet",
        );
    }
    let known = wanted
        .iter()
        .filter(|m| m.self_test == Some(SelfTest::Passed))
        .count();
    let n = wanted.len();
    if known == 0 {
        Cond::new(
            SELF_TEST_PASSED,
            TRUE,
            "TestInferencePassed",
            format!(
                "every served model answered a test inference ({n}); the network config gives no known answers"
            ),
        )
    } else if known == n {
        Cond::new(
            SELF_TEST_PASSED,
            TRUE,
            "Passed",
            format!("every served model gave its known answer ({n})"),
        )
    } else {
        Cond::new(
            SELF_TEST_PASSED,
            TRUE,
            "Passed",
            format!(
                "{known} of {n} served models gave their known answer; the others have none and answered a test inference"
            ),
        )
    }
}

/// `4m10s`-style durations for condition messages.
fn human(d: u64) -> String {
    match (d / 3600, (d % 3600) / 60, d % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// How long the runtime container has been running and its start-up budget (period ×
/// failureThreshold of its startup probe), both in seconds, when it runs.
fn runtime_loading_clock(pod: &Pod, now: &Time) -> Option<(u64, u64)> {
    let started = container(pod, runtime_container_name())?
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?;
    let elapsed =
        u64::try_from(now.0.as_second().saturating_sub(started.0.as_second())).unwrap_or(0);
    let probe = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == runtime_container_name())?
        .startup_probe
        .as_ref()?;
    let budget = i64::from(probe.period_seconds.unwrap_or(10))
        * i64::from(probe.failure_threshold.unwrap_or(3));
    Some((elapsed, u64::try_from(budget).unwrap_or(0)))
}

/// The ModelsLoaded condition: from the sidecar's model states when it reports, else from
/// the runtime container (running, not ready: loading weights).
fn models_loaded(
    node: &ResultityNode,
    pod: Option<&Pod>,
    report: Option<&NodeStatus>,
    runtime_running_unready: bool,
    without_report: Cond,
    now: &Time,
) -> Cond {
    use types::MODELS_LOADED;
    let total = node.spec.models.len();
    let clock = pod
        .and_then(|p| runtime_loading_clock(p, now))
        .map(|(elapsed, budget)| {
            format!(
                "; runtime up {} of a {} start-up budget",
                human(elapsed),
                human(budget)
            )
        })
        .unwrap_or_default();
    let Some(r) = report else {
        return if runtime_running_unready {
            Cond::new(
                MODELS_LOADED,
                FALSE,
                "Loading",
                format!("0/{total} models loaded, the runtime is loading weights{clock}"),
            )
        } else {
            without_report
        };
    };
    let state_of = |id: &str, rev: &str| {
        r.models
            .iter()
            .find(|m| m.model.id == id && m.model.revision == rev)
    };
    let mut active = 0usize;
    let mut unavailable = Vec::new();
    let mut loading = Vec::new();
    for m in &node.spec.models {
        match state_of(&m.id, &m.revision) {
            Some(s) if s.state == ModelState::Active => active += 1,
            Some(s) if matches!(s.state, ModelState::Failed | ModelState::Inactive) => {
                unavailable.push(match &s.reason {
                    Some(why) => format!("{}@{} {}: {why}", m.id, m.revision, s.state.as_str()),
                    None => format!("{}@{} {}", m.id, m.revision, s.state.as_str()),
                });
            }
            _ => loading.push(format!("{}@{}", m.id, m.revision)),
        }
    }
    if !unavailable.is_empty() {
        Cond::new(
            MODELS_LOADED,
            FALSE,
            "ModelsUnavailable",
            format!("{active}/{total} models active; {}", unavailable.join("; ")),
        )
    } else if !loading.is_empty() {
        Cond::new(
            MODELS_LOADED,
            FALSE,
            "Loading",
            format!(
                "{active}/{total} models loaded, loading {}{clock}",
                loading.join(", ")
            ),
        )
    } else {
        Cond::new(
            MODELS_LOADED,
            TRUE,
            "Loaded",
            format!("{active}/{total} models active"),
        )
    }
}

/// What the operator learned from the sidecar this round.
#[derive(Debug, Clone, PartialEq)]
pub enum SidecarObservation {
    /// The `/status` document.
    Report(Box<NodeStatus>),
    /// The sidecar should answer but did not; reason and message for the conditions.
    Unreachable { reason: String, message: String },
    /// Not asked: no pod, no pod IP, or the sidecar container is not running.
    NotRunning,
}

/// Everything the compute step looks at.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub node: &'a ResultityNode,
    /// Outcome of the validate step (`None` when the spec resolved).
    pub blocker: Option<&'a Blocker>,
    pub node_id: Option<&'a str>,
    /// The network's verified config.
    pub network_config: Option<&'a ConfigRef>,
    /// The pod as read back after apply.
    pub pod: Option<&'a Pod>,
    pub sidecar: &'a SidecarObservation,
    /// When a drain the operator asked for began.
    pub drain_started: Option<&'a Time>,
    pub now: &'a Time,
}

/// Container waiting reasons that mean the container will not come up by itself.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
}

/// `(failing, reason, message)` for a container that is not ready.
fn container_trouble(cs: &ContainerStatus) -> Option<(bool, String, String)> {
    let state = cs.state.as_ref()?;
    if let Some(w) = &state.waiting {
        let reason = w.reason.clone().unwrap_or_else(|| "Waiting".into());
        let failing = FAILING_REASONS.contains(&reason.as_str());
        return Some((failing, reason, w.message.clone().unwrap_or_default()));
    }
    if let Some(t) = &state.terminated {
        let reason = t.reason.clone().unwrap_or_else(|| "Terminated".into());
        let msg = format!("exit code {}", t.exit_code);
        return Some((true, reason, t.message.clone().unwrap_or(msg)));
    }
    None
}

fn time_from_ms(ms: u64) -> Option<Time> {
    let ms = i64::try_from(ms).ok()?;
    Timestamp::from_millisecond(ms).ok().map(Time)
}

fn pod_scheduled(pod: Option<&Pod>) -> Cond {
    let Some(pod) = pod else {
        return Cond::new(
            types::POD_SCHEDULED,
            FALSE,
            "PodMissing",
            "the pod does not exist",
        );
    };
    let cond = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"));
    match cond {
        Some(c) if c.status == "True" => Cond::new(types::POD_SCHEDULED, TRUE, "Scheduled", ""),
        Some(c) => Cond::new(
            types::POD_SCHEDULED,
            FALSE,
            c.reason.clone().unwrap_or_else(|| "Unschedulable".into()),
            c.message.clone().unwrap_or_default(),
        ),
        None => Cond::new(
            types::POD_SCHEDULED,
            UNKNOWN,
            "Pending",
            "the scheduler has not looked at the pod yet",
        ),
    }
}

/// Computes the status. `previous` supplies condition transition times.
pub fn compute_node_status(o: &Observed<'_>) -> ResultityNodeStatus {
    use types::*;
    let generation = o.node.metadata.generation;
    let previous = o.node.status.clone().unwrap_or_default();
    let report = match o.sidecar {
        SidecarObservation::Report(r) => Some(r.as_ref()),
        _ => None,
    };
    // Conditions that need the sidecar are Unknown without it, with the reason why.
    let sidecar_unknown = |type_: &'static str| match o.sidecar {
        SidecarObservation::Unreachable { reason, message } => {
            Cond::new(type_, UNKNOWN, reason.clone(), message.clone())
        }
        _ => Cond::new(
            type_,
            UNKNOWN,
            "SidecarNotRunning",
            "the sidecar is not running",
        ),
    };

    let scheduled = pod_scheduled(o.pod);
    // Running but not ready yet: the runtime is still loading its weights.
    let runtime_running_unready = o
        .pod
        .and_then(|p| container(p, runtime_container_name()))
        .is_some_and(|cs| !cs.ready && cs.state.as_ref().is_some_and(|s| s.running.is_some()));
    let mut failing: Option<(String, String)> = None;
    let runtime_ready = match o.pod {
        None => Cond::new(RUNTIME_READY, FALSE, "PodMissing", "the pod does not exist"),
        Some(pod) => {
            // A failing sidecar makes the node fail as much as a failing runtime.
            for name in [runtime_container_name(), sidecar_container_name()] {
                if let Some((true, reason, message)) =
                    container(pod, name).and_then(container_trouble)
                    && failing.is_none()
                {
                    failing = Some((reason, format!("container {name}: {message}")));
                }
            }
            match container(pod, runtime_container_name()) {
                Some(cs) if cs.ready => match report {
                    Some(r) if !r.runtime.ready => Cond::new(
                        RUNTIME_READY,
                        FALSE,
                        "EngineNotReady",
                        r.runtime.reason.clone().unwrap_or_default(),
                    ),
                    _ => Cond::new(RUNTIME_READY, TRUE, "ContainerReady", ""),
                },
                Some(cs) => match container_trouble(cs) {
                    Some((_, reason, message)) => Cond::new(RUNTIME_READY, FALSE, reason, message),
                    None => Cond::new(
                        RUNTIME_READY,
                        FALSE,
                        "ContainerNotReady",
                        "the runtime is running but not ready (loading the model?)",
                    ),
                },
                None => Cond::new(
                    RUNTIME_READY,
                    FALSE,
                    "ContainerNotStarted",
                    "the runtime container has not started",
                ),
            }
        }
    };

    let registered = match report {
        Some(r) if r.registered => Cond::new(REGISTERED, TRUE, "Registered", ""),
        Some(r) => Cond::new(
            REGISTERED,
            FALSE,
            "NotRegistered",
            format!("sidecar phase {}", r.phase.as_str()),
        ),
        None => sidecar_unknown(REGISTERED),
    };
    let connected = match report {
        Some(r) if r.connection.state == ConnectionState::Connected => {
            Cond::new(CONNECTED, TRUE, "Connected", "")
        }
        Some(r) => Cond::new(
            CONNECTED,
            FALSE,
            match r.connection.state {
                ConnectionState::Disconnected => "Disconnected",
                ConnectionState::Connecting => "Connecting",
                ConnectionState::Backoff => "Backoff",
                ConnectionState::Connected => "Connected",
            },
            r.connection.last_error.clone().unwrap_or_default(),
        ),
        None => sidecar_unknown(CONNECTED),
    };
    let applied = report
        .and_then(|r| r.applied_config.as_ref())
        .map(|p| ConfigRef {
            version: p.version,
            digest: p.digest.to_string(),
        });
    let in_sync = match (report, o.network_config) {
        (None, _) => sidecar_unknown(CONFIG_IN_SYNC),
        (Some(_), None) => Cond::new(
            CONFIG_IN_SYNC,
            UNKNOWN,
            "WaitingForNetworkConfig",
            "the network has no verified config",
        ),
        (Some(r), Some(net)) => match &applied {
            Some(a) if a.digest == net.digest => Cond::new(CONFIG_IN_SYNC, TRUE, "InSync", ""),
            _ if r.config_error.is_some() => Cond::new(
                CONFIG_IN_SYNC,
                FALSE,
                "ConfigRefused",
                r.config_error.clone().unwrap_or_default(),
            ),
            Some(a) => Cond::new(
                CONFIG_IN_SYNC,
                FALSE,
                "OutOfSync",
                format!(
                    "node applied version {} ({}), network is at version {} ({})",
                    a.version, a.digest, net.version, net.digest
                ),
            ),
            None => Cond::new(
                CONFIG_IN_SYNC,
                FALSE,
                "NoConfigApplied",
                format!("network is at version {}", net.version),
            ),
        },
    };

    let gpu_healthy = match report {
        // Checks off means "not checked", not "unhealthy": True, so Ready follows the rest,
        // with a reason that says nothing was checked.
        _ if o.node.spec.gpu.visibility == GpuVisibility::None => Cond::new(
            GPU_HEALTHY,
            TRUE,
            REASON_GPU_CHECKS_OFF,
            "spec.gpu.visibility is none: the node requests no GPU and none is checked",
        ),
        None => sidecar_unknown(GPU_HEALTHY),
        Some(r) if !r.gpu.present => Cond::new(
            GPU_HEALTHY,
            FALSE,
            "NoGPU",
            r.gpu
                .reason
                .clone()
                .unwrap_or_else(|| "no GPU visible to the sidecar".into()),
        ),
        Some(r) if !r.gpu.healthy() => {
            let bad: Vec<String> = r
                .gpu
                .devices
                .iter()
                .filter(|d| !d.healthy)
                .map(|d| {
                    let mut why = Vec::new();
                    if let Some(n) = d.ecc_uncorrected.filter(|n| *n > 0) {
                        why.push(format!("{n} uncorrected ECC errors"));
                    }
                    if let Some(x) = d.last_xid {
                        why.push(format!("XID {x}"));
                    }
                    if why.is_empty() {
                        why.push("reported unhealthy".into());
                    }
                    format!("GPU {} ({}): {}", d.index, d.uuid, why.join(", "))
                })
                .collect();
            Cond::new(GPU_HEALTHY, FALSE, "GPUErrors", bad.join("; "))
        }
        Some(r) => match o.node.spec.gpu.min_memory_mib {
            Some(min) if r.gpu.memory_total_mib() < min => Cond::new(
                GPU_HEALTHY,
                FALSE,
                "InsufficientMemory",
                format!(
                    "GPUs report {} MiB, spec.gpu.minMemoryMib is {min}",
                    r.gpu.memory_total_mib()
                ),
            ),
            _ => Cond::new(GPU_HEALTHY, TRUE, "Healthy", ""),
        },
    };

    let mut conds = vec![
        scheduled,
        runtime_ready,
        registered,
        connected,
        in_sync,
        gpu_healthy,
    ];
    let ready = if let Some(b) = o.blocker {
        Cond::new(READY, FALSE, b.reason(), b.message())
    } else if o.node.spec.paused {
        Cond::new(READY, FALSE, "Paused", "spec.paused is true")
    } else if let Some(not) = conds.iter().find(|c| !c.is_true()) {
        Cond::new(
            READY,
            FALSE,
            format!("Not{}", not.type_),
            if not.message.is_empty() {
                not.reason.clone()
            } else {
                format!("{}: {}", not.reason, not.message)
            },
        )
    } else {
        Cond::new(READY, TRUE, "NodeReady", "")
    };
    let ready_true = ready.is_true();
    conds.push(ready);
    let routable = match report.map(|r| &r.verdict) {
        None => sidecar_unknown(NETWORK_ROUTABLE),
        Some(None) => Cond::new(
            NETWORK_ROUTABLE,
            UNKNOWN,
            "NoVerdict",
            "the network has not answered a heartbeat yet",
        ),
        Some(Some(v)) if v.eligible => Cond::new(
            NETWORK_ROUTABLE,
            TRUE,
            "Eligible",
            format!("score {}, penalty {}", v.score, v.penalty),
        ),
        Some(Some(v)) => Cond::new(
            NETWORK_ROUTABLE,
            FALSE,
            if v.suspended_until_ms.is_some() {
                "Suspended"
            } else {
                "NotEligible"
            },
            format!(
                "{} (score {}, penalty {})",
                v.reason.clone().unwrap_or_default(),
                v.score,
                v.penalty
            ),
        ),
    };
    conds.push(routable);
    let loaded = models_loaded(
        o.node,
        o.pod,
        report,
        runtime_running_unready,
        sidecar_unknown(MODELS_LOADED),
        o.now,
    );
    let loading = loaded.reason == "Loading";
    conds.push(loaded);

    let draining = o.drain_started.is_some()
        || report.is_some_and(|r| r.draining || r.phase == SidecarPhase::Draining);
    conds.push(if draining {
        Cond::new(
            DRAINING,
            TRUE,
            if o.drain_started.is_some() {
                "Replacing"
            } else {
                "SidecarDraining"
            },
            report
                .map(|r| {
                    format!(
                        "{} jobs in flight, outbox {}",
                        r.jobs.in_flight, r.jobs.outbox
                    )
                })
                .unwrap_or_default(),
        )
    } else {
        Cond::new(DRAINING, FALSE, "NotDraining", "")
    });
    conds.push(match report {
        Some(r) => self_test_condition(r),
        None => sidecar_unknown(types::SELF_TEST_PASSED),
    });
    let phase = match o.blocker {
        Some(Blocker::Invalid(_) | Blocker::Rejected(_) | Blocker::Unsupported(_)) => {
            NodePhase::Invalid
        }
        Some(_) => NodePhase::Pending,
        None if o.node.spec.paused => NodePhase::Paused,
        None if draining => NodePhase::Draining,
        None if failing.is_some() => NodePhase::Failed,
        None if o.pod.is_none() || !conds[0].is_true() => NodePhase::Pending,
        None if ready_true => NodePhase::Ready,
        None if loading => NodePhase::Loading,
        None if !conds[1].is_true() => NodePhase::Starting,
        // A sidecar that has not started yet is starting; one that stopped answering is not.
        None if matches!(o.sidecar, SidecarObservation::NotRunning) => NodePhase::Starting,
        None => NodePhase::Degraded,
    };
    if let (Some((reason, message)), Some(c)) = (failing, conds.get_mut(1))
        && c.reason != reason
    {
        // Surface the sidecar's crash even when the runtime container itself looks fine.
        *c = Cond::new(types::RUNTIME_READY, FALSE, reason, message);
    }

    let models: Vec<ModelStateStatus> = report
        .map(|r| {
            r.models
                .iter()
                .map(|m| ModelStateStatus {
                    id: m.model.id.clone(),
                    revision: m.model.revision.clone(),
                    state: match m.state {
                        // The runtime runs: a pending model is being loaded or tested.
                        ModelState::Pending
                            if o.pod.is_some_and(|p| {
                                container(p, runtime_container_name()).is_some_and(|c| {
                                    c.state.as_ref().is_some_and(|s| s.running.is_some())
                                })
                            }) =>
                        {
                            "loading"
                        }
                        ModelState::Pending => "pending",
                        ModelState::Active => "active",
                        ModelState::Inactive => "inactive",
                        ModelState::Failed => "failed",
                    }
                    .into(),
                    reason: m.reason.clone(),
                    self_test: m.self_test.map(|t| t.as_str().to_owned()),
                })
                .collect()
        })
        .unwrap_or_default();
    let active = models.iter().filter(|m| m.state == "active").count();
    let gpu = report.map(|r| GpuStatus {
        present: r.gpu.present,
        count: u32::try_from(r.gpu.devices.len()).unwrap_or(u32::MAX),
        product: r.gpu.devices.first().map(|d| d.name.clone()),
        memory_total_mib: r.gpu.memory_total_mib(),
        // No GPU is never a healthy GPU.
        healthy: r.gpu.present && r.gpu.healthy(),
        driver_version: r.gpu.driver_version.clone(),
        reason: r.gpu.reason.clone(),
    });

    ResultityNodeStatus {
        observed_generation: generation,
        phase,
        node_id: o.node_id.map(str::to_owned),
        pod_name: o.pod.and_then(|p| p.metadata.name.clone()),
        applied_config: applied.or(previous.applied_config.filter(|_| report.is_none())),
        network_config: o.network_config.cloned(),
        models_summary: Some(format!("{active}/{}", o.node.spec.models.len())),
        models,
        // Without a report, keep what was last seen rather than blanking the resource.
        gpu: gpu.or(previous.gpu),
        last_heartbeat_time: report
            .and_then(|r| r.last_heartbeat_ms)
            .and_then(time_from_ms)
            .or(previous.last_heartbeat_time),
        jobs: report
            .map(|r| JobsStatus {
                completed: r.jobs.completed,
                failed: r.jobs.failed,
                in_flight: r.jobs.in_flight,
            })
            .or(previous.jobs),
        drain_started_time: o.drain_started.cloned(),
        // The build and rollout facts are the reconciler's to fill in.
        desired_spec_hash: None,
        pod_spec_hash: None,
        rollout_step: None,
        conditions: settle(conds, &previous.conditions, generation, o.now),
    }
}

/// How long a written status may stand when only its heartbeat time and job counters moved:
/// those change at every pull, and writing them each time would cost the API server one
/// request per node per resync for no decision anyone makes. Kubernetes' own Node status is
/// refreshed on the same terms (`nodeStatusReportFrequency`, 5 minutes).
pub const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

/// Whether the computed status must be written over `written` (the status the object
/// carries). Conditions compare whole: `settle` keeps a condition's `lastTransitionTime`
/// unless its status flipped, so an unchanged condition is equal.
pub fn status_needs_write(
    written: Option<&ResultityNodeStatus>,
    computed: &ResultityNodeStatus,
) -> bool {
    let Some(written) = written else {
        return true;
    };
    let steady = |s: &ResultityNodeStatus| ResultityNodeStatus {
        last_heartbeat_time: s
            .last_heartbeat_time
            .as_ref()
            .map(|_| Time(Timestamp::UNIX_EPOCH)),
        jobs: s.jobs.as_ref().map(|_| JobsStatus::default()),
        ..s.clone()
    };
    if steady(written) != steady(computed) {
        return true;
    }
    match (&written.last_heartbeat_time, &computed.last_heartbeat_time) {
        (Some(w), Some(c)) => {
            let moved = c.0.as_millisecond().saturating_sub(w.0.as_millisecond());
            u128::try_from(moved).unwrap_or(0) >= STATUS_REFRESH.as_millis()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn written() -> ResultityNodeStatus {
        ResultityNodeStatus {
            phase: NodePhase::Ready,
            last_heartbeat_time: Some(at(0)),
            jobs: Some(JobsStatus {
                completed: 10,
                failed: 0,
                in_flight: 2,
            }),
            conditions: settle(
                vec![Cond::new(types::READY, TRUE, "NodeReady", "")],
                &[],
                Some(1),
                &at(-100),
            ),
            ..ResultityNodeStatus::default()
        }
    }

    #[test]
    fn status_is_written_only_when_it_changes() {
        let w = written();
        assert!(status_needs_write(None, &w), "nothing written yet");
        assert!(!status_needs_write(Some(&w), &w), "unchanged");

        // The heartbeat and the job counters moved, within the refresh interval: no write.
        let mut busy = w.clone();
        busy.last_heartbeat_time = Some(at(60));
        busy.jobs = Some(JobsStatus {
            completed: 99,
            failed: 1,
            in_flight: 0,
        });
        assert!(!status_needs_write(Some(&w), &busy));
        // Past it: refreshed.
        busy.last_heartbeat_time = Some(at(300));
        assert!(status_needs_write(Some(&w), &busy));

        // A condition recomputed at a later time without a flip keeps its transition time,
        // so it compares equal; a flip or a new message is a change.
        let mut same = w.clone();
        same.conditions = settle(
            vec![Cond::new(types::READY, TRUE, "NodeReady", "")],
            &w.conditions,
            Some(1),
            &at(50),
        );
        assert!(!status_needs_write(Some(&w), &same));
        let mut flipped = w.clone();
        flipped.conditions = settle(
            vec![Cond::new(types::READY, FALSE, "NotConnected", "Backoff")],
            &w.conditions,
            Some(1),
            &at(50),
        );
        assert!(status_needs_write(Some(&w), &flipped));

        // Everything else counts: phase, generation, counters appearing.
        let mut phase = w.clone();
        phase.phase = NodePhase::Degraded;
        assert!(status_needs_write(Some(&w), &phase));
        let mut generation = w.clone();
        generation.observed_generation = Some(2);
        assert!(status_needs_write(Some(&w), &generation));
        let mut first_heartbeat = w.clone();
        first_heartbeat.last_heartbeat_time = None;
        assert!(status_needs_write(Some(&first_heartbeat), &w));
    }
}
