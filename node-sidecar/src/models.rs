//! Model states on this node: pending → active / failed, and inactive when no longer wanted.
//! A model becomes `active` only after a test inference through the runtime succeeded, so the
//! network never routes a job to a model that cannot answer, and, where the network's config
//! gives the model a known answer, only after the runtime gave that answer.

use std::collections::BTreeMap;
use std::time::Duration;

use resultity_protocol::config::NetworkConfig;
use resultity_protocol::known_answer::{self, KnownAnswer};
use resultity_protocol::messages::common::SelfTest;
use resultity_protocol::messages::{ModelRef, ModelState, ModelStatus, RuntimeKind};
use serde_json::Value;

use crate::runtime::Runtime;

/// Why a requested model is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub model: String,
    pub reason: String,
}

/// The models this node should serve: those it was asked to serve (all approved ones if the
/// list is empty) that the network approves for this runtime, whose GPU memory need is met, and
/// whose subcloud restriction (if any) intersects the node's subclouds. Pure: decided from the
/// config alone, so every node decides the same.
pub fn desired_models(
    requested: &[String],
    config: &NetworkConfig,
    runtime: RuntimeKind,
    gpu_memory_mib: u64,
    enforce_gpu_memory: bool,
    subclouds: &[String],
) -> (Vec<ModelRef>, Vec<Refused>) {
    let mut want = Vec::new();
    let mut refused = Vec::new();
    // Entries are `id` or `id@revision`; model ids themselves never contain '@'.
    let candidates: Vec<(&str, Option<&str>)> = if requested.is_empty() {
        config
            .models
            .iter()
            .map(|m| (m.model.id.as_str(), None))
            .collect()
    } else {
        requested
            .iter()
            .map(|r| match r.rsplit_once('@') {
                Some((id, rev)) => (id, Some(rev)),
                None => (r.as_str(), None),
            })
            .collect()
    };
    for (id, revision) in candidates {
        let Some(approved) = config.models.iter().find(|m| m.model.id == id) else {
            refused.push(Refused {
                model: id.into(),
                reason: "not approved by the network config".into(),
            });
            continue;
        };
        let reason = if revision.is_some_and(|r| r != approved.model.revision) {
            Some(format!(
                "revision {} is not approved (the network approves {})",
                revision.unwrap_or_default(),
                approved.model.revision
            ))
        } else if !approved.runtimes.contains(&runtime) {
            Some(format!("not approved for the {} runtime", runtime.as_str()))
        } else if enforce_gpu_memory && gpu_memory_mib < approved.min_gpu_memory_mib {
            Some(format!(
                "needs {} MiB of GPU memory, node has {gpu_memory_mib} MiB",
                approved.min_gpu_memory_mib
            ))
        } else if !approved.subclouds.is_empty()
            && !approved.subclouds.iter().any(|s| subclouds.contains(s))
        {
            Some(format!(
                "restricted to subclouds {}",
                approved.subclouds.join(", ")
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => refused.push(Refused {
                model: id.into(),
                reason,
            }),
            None => want.push(approved.model.clone()),
        }
    }
    (want, refused)
}

/// The known answers the applied config gives, by model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownAnswers(BTreeMap<ModelRef, KnownAnswer>);

impl KnownAnswers {
    pub fn from_config(config: &NetworkConfig) -> Self {
        Self(
            config
                .models
                .iter()
                .filter_map(|m| Some((m.model.clone(), m.known_answer.clone()?)))
                .collect(),
        )
    }

    pub fn get(&self, model: &ModelRef) -> Option<&KnownAnswer> {
        self.0.get(model)
    }
}

impl FromIterator<(ModelRef, KnownAnswer)> for KnownAnswers {
    fn from_iter<I: IntoIterator<Item = (ModelRef, KnownAnswer)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A known-answer request gets as long as a job may: a cold runtime can take a while for the
/// first token, and a timeout here only delays activation to the next pass.
const KNOWN_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `answer` against `model` and says how it went, with the reason for anything but a pass.
async fn run_known_answer<R: Runtime>(
    runtime: &R,
    model: &ModelRef,
    answer: &KnownAnswer,
) -> (SelfTest, Option<String>) {
    let out = match runtime
        .infer(
            answer.kind,
            &model.id,
            &answer.request,
            KNOWN_ANSWER_TIMEOUT,
        )
        .await
    {
        Ok(out) => out,
        Err(e) => {
            return (
                SelfTest::Error,
                Some(format!("known-answer self-test could not run: {e}")),
            );
        }
    };
    let body: Value = match serde_json::from_str(&out.body) {
        Ok(v) => v,
        Err(e) => {
            return (
                SelfTest::Error,
                Some(format!(
                    "known-answer self-test: the runtime's answer is not JSON ({e})"
                )),
            );
        }
    };
    match known_answer::contains(&body, &answer.expect) {
        Ok(()) => (SelfTest::Passed, None),
        Err(m) => (
            SelfTest::Mismatch,
            Some(format!("known-answer self-test failed: {m}")),
        ),
    }
}

/// Tracks each model's state and drives the runtime toward the desired set.
#[derive(Debug, Default, Clone)]
pub struct Models {
    states: BTreeMap<ModelRef, ModelStatus>,
    /// The known answer each active model passed (`None`: it had none), so a config that
    /// changes it tests the model again.
    tested: BTreeMap<ModelRef, Option<KnownAnswer>>,
}

impl Models {
    /// Current states, for heartbeats and `/status`.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        self.states.values().cloned().collect()
    }

    /// Whether jobs for `model` may run.
    pub fn is_active(&self, model: &ModelRef) -> bool {
        self.states
            .get(model)
            .is_some_and(|s| s.state == ModelState::Active)
    }

    /// Why `model` cannot take jobs (for `job.fail` reasons).
    pub fn inactive_reason(&self, model: &ModelRef) -> String {
        match self.states.get(model) {
            None => format!(
                "model {}@{} is not served by this node",
                model.id, model.revision
            ),
            Some(s) => format!(
                "model {}@{} is {}{}",
                model.id,
                model.revision,
                s.state.as_str(),
                s.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )
            .to_lowercase(),
        }
    }

    /// Activates wanted models (load, test inference, then the known answer if the config
    /// gives one), deactivates unwanted ones, and marks refused ones inactive with their
    /// reason. Failed models are retried on each call; an active model whose known answer
    /// changed is tested again.
    pub async fn reconcile<R: Runtime>(
        &mut self,
        want: &[ModelRef],
        refused: &[Refused],
        answers: &KnownAnswers,
        runtime: &R,
    ) {
        for model in want {
            let answer = answers.get(model);
            if self.is_active(model) && self.tested.get(model).map(Option::as_ref) == Some(answer) {
                continue;
            }
            let was_active = self.is_active(model);
            self.tested.remove(model);
            if !was_active {
                self.set(model, ModelState::Pending, None, None);
                let outcome = match runtime.load_model(&model.id).await {
                    Ok(()) => runtime.test_inference(&model.id).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    self.set(
                        model,
                        ModelState::Failed,
                        Some(format!("test inference failed: {e}")),
                        None,
                    );
                    continue;
                }
            }
            let verdict = match answer {
                Some(a) => Some(run_known_answer(runtime, model, a).await),
                None => None,
            };
            match verdict {
                None => self.set(model, ModelState::Active, None, None),
                Some((SelfTest::Passed, _)) => {
                    self.set(model, ModelState::Active, None, Some(SelfTest::Passed));
                }
                Some((outcome, reason)) => {
                    tracing::warn!(
                        model = %model.id,
                        revision = %model.revision,
                        reason = reason.as_deref().unwrap_or_default(),
                        "model not served"
                    );
                    self.set(model, ModelState::Failed, reason, Some(outcome));
                    continue;
                }
            }
            self.tested.insert(model.clone(), answer.cloned());
        }
        let unwanted: Vec<ModelRef> = self
            .states
            .keys()
            .filter(|m| !want.contains(m))
            .cloned()
            .collect();
        for model in unwanted {
            let was_active = self.is_active(&model);
            if was_active && let Err(e) = runtime.unload_model(&model.id).await {
                tracing::warn!(model = %model.id, error = %e, "unloading a deactivated model failed");
            }
            let reason = refused
                .iter()
                .find(|r| r.model == model.id)
                .map(|r| r.reason.clone())
                .unwrap_or_else(|| "no longer wanted".into());
            self.tested.remove(&model);
            self.set(&model, ModelState::Inactive, Some(reason), None);
        }
        for r in refused {
            if !self.states.keys().any(|m| m.id == r.model) {
                let model = ModelRef {
                    id: r.model.clone(),
                    revision: String::new(),
                };
                self.set(&model, ModelState::Inactive, Some(r.reason.clone()), None);
            }
        }
    }

    /// Marks every active model failed (the runtime went down): no jobs until it is back.
    pub fn mark_runtime_down(&mut self, reason: &str) {
        for s in self.states.values_mut() {
            if s.state == ModelState::Active {
                s.state = ModelState::Pending;
                s.reason = Some(reason.to_owned());
            }
        }
    }

    fn set(
        &mut self,
        model: &ModelRef,
        state: ModelState,
        reason: Option<String>,
        self_test: Option<SelfTest>,
    ) {
        self.states.insert(
            model.clone(),
            ModelStatus {
                model: model.clone(),
                state,
                reason,
                self_test,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::config::{ApprovedModel, RuntimeImages};
    use resultity_protocol::messages::{Environment, Timing};

    fn config() -> NetworkConfig {
        let m = |id: &str, rt: Vec<RuntimeKind>, mem: u64, sub: Vec<&str>| ApprovedModel {
            model: ModelRef {
                id: id.into(),
                revision: "r1".into(),
            },
            runtimes: rt,
            min_gpu_memory_mib: mem,
            subclouds: sub.into_iter().map(String::from).collect(),
            known_answer: None,
        };
        NetworkConfig {
            environment: Environment::Testnet,
            models: vec![
                m("small", vec![RuntimeKind::Vllm], 8_000, vec![]),
                m("big", vec![RuntimeKind::Vllm], 80_000, vec![]),
                m("triton-only", vec![RuntimeKind::Triton], 0, vec![]),
                m("eu-only", vec![RuntimeKind::Vllm], 0, vec!["eu"]),
            ],
            runtime_images: RuntimeImages::default(),
            sidecar_image: None,
            timing: Timing::default(),
            subclouds: vec![],
            network_keys: vec![],
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        }
    }

    #[test]
    fn desired_set_follows_approval_runtime_memory_and_subcloud() {
        let (want, refused) = desired_models(&[], &config(), RuntimeKind::Vllm, 24_000, true, &[]);
        assert_eq!(
            want.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["small"]
        );
        let reasons: Vec<_> = refused
            .iter()
            .map(|r| (r.model.as_str(), r.reason.as_str()))
            .collect();
        assert!(
            reasons
                .iter()
                .any(|(m, r)| *m == "big" && r.contains("80000 MiB"))
        );
        assert!(
            reasons
                .iter()
                .any(|(m, r)| *m == "triton-only" && r.contains("vllm"))
        );
        assert!(
            reasons
                .iter()
                .any(|(m, r)| *m == "eu-only" && r.contains("eu"))
        );
        let (want, _) = desired_models(
            &["eu-only".into(), "ghost".into()],
            &config(),
            RuntimeKind::Vllm,
            0,
            false,
            &["eu".into()],
        );
        assert_eq!(want.len(), 1);
        let (_, refused) = desired_models(
            &["ghost".into()],
            &config(),
            RuntimeKind::Vllm,
            0,
            false,
            &[],
        );
        assert_eq!(refused[0].reason, "not approved by the network config");
    }
}
