//! Controllers: the I/O around the pure pipeline, wired into `kube::runtime::Controller`.

pub mod network;
pub mod node;

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
use resultity_protocol::clock::Clock;

use crate::config_source::ConfigSource;
use crate::metrics::Metrics;
use crate::sidecar::SidecarClient;
use crate::validate::Defaults;

/// Shared state of every reconcile.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub sidecar: Arc<dyn SidecarClient>,
    pub config_source: Arc<dyn ConfigSource>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub defaults: Defaults,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("sidecar", &self.sidecar)
            .field("config_source", &self.config_source)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        sidecar: Arc<dyn SidecarClient>,
        config_source: Arc<dyn ConfigSource>,
        metrics: Arc<Metrics>,
        defaults: Defaults,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::crd::MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Self {
            client,
            sidecar,
            config_source,
            metrics,
            recorder,
            defaults,
            clock,
        }
    }

    /// Publishes an Event. A failure is logged, never fails the reconcile: events are for
    /// people, and the status already carries the state.
    pub async fn publish(&self, reference: &ObjectReference, event: Event) {
        if let Err(e) = self.recorder.publish(&event, reference).await {
            tracing::warn!(reason = %event.reason, error = %e, "publishing event failed");
        }
    }
}
