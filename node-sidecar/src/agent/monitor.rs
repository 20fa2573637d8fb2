//! The health monitors: one task probes the runtime, one reads the GPUs. They publish into the
//! status document, which heartbeats and `/readyz` read, so neither ever waits for a probe.
//! Transitions act at once: a runtime that went down parks its models and stops intake, one
//! that came back gets them re-activated; a GPU fault stops intake and hands running jobs back.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use resultity_protocol::messages::{GpuReport, RuntimeReport};
use tokio::time::MissedTickBehavior;

use super::{Agent, default_max_concurrency};
use crate::runtime::Runtime;
use crate::runtime::probe::ProbeVerdict;

impl Agent {
    /// Probes the runtime every probe interval on the probe client.
    pub(super) async fn runtime_monitor(self: Arc<Self>) {
        let p = self.settings.runtime_probe;
        let mut verdict = ProbeVerdict::new(p.failure_threshold);
        let mut tick = tokio::time::interval(p.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut parallelism_known = false;
        // Health and metrics each have the probe timeout; this bounds the pair.
        let bound = p
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let raw = match tokio::time::timeout(bound, self.probe_runtime.report()).await {
                Ok(r) => r,
                Err(_) => RuntimeReport::not_ready(
                    self.settings.runtime_kind,
                    Some(format!("probe took longer than {} s", bound.as_secs())),
                ),
            };
            let report = verdict.observe(raw);
            if !report.ready {
                // A restarted runtime may come back with other settings.
                parallelism_known = false;
            } else if !parallelism_known {
                parallelism_known = true;
                self.adopt_parallelism().await;
            }
            self.apply_runtime_report(report).await;
        }
    }

    /// Credits follow the runtime's real parallelism where it reports it.
    async fn adopt_parallelism(&self) {
        let slots = self.probe_runtime.parallelism().await;
        let kind = self.settings.runtime_kind.as_str();
        match (self.settings.max_concurrency, slots) {
            (None, Some(n)) => {
                let before = self.max_concurrency.swap(n, Ordering::SeqCst);
                if before != n {
                    tracing::info!(
                        slots = n,
                        runtime = kind,
                        "credits follow the runtime's parallel slots"
                    );
                    self.advertise_credits();
                }
            }
            (Some(set), Some(n)) if set > n => tracing::warn!(
                max_concurrency = set,
                slots = n,
                "--max-concurrency exceeds the runtime's parallel slots; the excess requests queue inside the runtime"
            ),
            (None, None) => tracing::info!(
                credits = default_max_concurrency(self.settings.runtime_kind),
                runtime = kind,
                "the runtime does not report its parallelism; using the default credits (set --max-concurrency to match it)"
            ),
            _ => {}
        }
    }

    /// Publishes a runtime verdict and acts on a change.
    async fn apply_runtime_report(&self, report: RuntimeReport) {
        let was_ready = self.runtime_ready.swap(report.ready, Ordering::SeqCst);
        self.api.metrics.runtime_ready.set(i64::from(report.ready));
        self.api.update(|s| s.runtime = report.clone());
        if was_ready && !report.ready {
            let reason = report
                .reason
                .clone()
                .unwrap_or_else(|| "runtime not ready".into());
            tracing::warn!(%reason, "runtime went down: intake stops");
            let _serial = self.reconcile_lock.lock().await;
            self.models
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .mark_runtime_down(&reason);
            let statuses = self.model_statuses();
            self.api.update(|s| s.models = statuses);
        } else if !was_ready && report.ready {
            tracing::info!("runtime is ready");
            self.reconcile_models().await;
        }
        if was_ready != report.ready {
            self.advertise_credits();
        }
        self.set_phase();
    }

    /// Reads the GPUs every probe interval.
    pub(super) async fn gpu_monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.runtime_probe.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let report = self.gpu.report().await;
            self.apply_gpu_report(report).await;
        }
    }

    /// Publishes a GPU report; a fault stops intake and hands running jobs back, a change of
    /// visible memory re-decides which models fit.
    pub(super) async fn apply_gpu_report(&self, report: GpuReport) {
        let previous = self.api.status().gpu;
        let healthy = report.healthy();
        if previous.present != report.present || previous.reason != report.reason {
            match (&report.reason, report.present) {
                (Some(reason), false) if !self.gpu.required() => {
                    tracing::info!(%reason, "no GPU checks")
                }
                (_, true) => tracing::info!(
                    devices = report.devices.len(),
                    memory_mib = report.memory_total_mib(),
                    "GPUs visible"
                ),
                (Some(reason), false) => tracing::warn!(%reason, "no GPU visible"),
                (None, false) => tracing::warn!("no GPU visible"),
            }
        }
        let memory_changed = previous.memory_total_mib() != report.memory_total_mib();
        self.api.update(|s| s.gpu = report.clone());
        let was_healthy = self.gpu_healthy.swap(healthy, Ordering::SeqCst);
        if was_healthy && !healthy {
            let problem = self
                .api
                .readiness_problems()
                .into_iter()
                .find(|p| p.starts_with("GPU fault"))
                .unwrap_or_else(|| "GPU fault".into());
            tracing::error!(%problem, "GPU fault: intake stops, running jobs are handed back");
            self.hand_back_running(&problem);
            self.advertise_credits();
        } else if !was_healthy && healthy {
            tracing::info!("GPUs healthy again: intake resumes");
            self.advertise_credits();
        }
        if memory_changed {
            self.reconcile_models().await;
        }
        self.set_phase();
    }
}
