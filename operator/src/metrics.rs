//! Prometheus metrics (prometheus-client): reconcile runs, failures by reason, durations.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

/// The operator's metrics, registered in one registry served at `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            failures: Family::default(),
            // 1 ms .. ~16 s: reconciles include sidecar and config fetches with timeouts.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `resultity_operator` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("resultity_operator");
        r.register(
            "reconciles",
            "Reconcile runs by controller",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Failed reconciles by controller and error",
            self.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration by controller",
            self.duration.clone(),
        );
    }

    pub fn observe(&self, controller: &'static str, elapsed: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn failure(&self, controller: &'static str, error: &'static str) {
        self.failures
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }
}
