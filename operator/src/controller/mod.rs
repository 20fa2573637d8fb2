//! Controllers: the I/O around the pure pipeline, wired into `kube::runtime::Controller`.

pub mod events;
pub mod fleet;
pub mod network;
pub mod node;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource};
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
    pub events: Arc<events::EventPublisher>,
    pub defaults: Defaults,
    pub clock: Arc<dyn Clock>,
    /// Set once the API server was seen serving `resource.k8s.io`: DRA cannot be switched off
    /// without restarting the API server, and a check per DRA node reconcile would cost a
    /// request each.
    pub dra_served: Arc<std::sync::atomic::AtomicBool>,
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
        let events = Arc::new(events::EventPublisher::new(
            client.clone(),
            crate::crd::MANAGER,
            std::env::var("POD_NAME").ok(),
        ));
        Self {
            client,
            sidecar,
            config_source,
            metrics,
            events,
            defaults,
            clock,
            dra_served: Arc::default(),
        }
    }

    /// Publishes an Event. A failure is logged, never fails the reconcile: events are for
    /// people, and the status already carries the state.
    pub async fn publish(&self, reference: &ObjectReference, event: Event) {
        if let Err(e) = self.events.publish(&event, reference).await {
            tracing::warn!(reason = %event.reason, error = %e, "publishing event failed");
        }
    }
}

/// Predicate for the primary resources' watches: spec (generation), finalizers and deletion
/// trigger a reconcile; our own status writes do not, or every status update (heartbeat
/// times, fetch times) would reconcile again at once.
pub fn meaningful_change<K: Resource>(obj: &K) -> Option<u64> {
    let m = obj.meta();
    let mut h = DefaultHasher::new();
    m.generation.hash(&mut h);
    m.finalizers.hash(&mut h);
    // A fleet grants a node its rollout slot through this label (no generation change).
    m.labels
        .as_ref()
        .and_then(|l| l.get(crate::crd::LABEL_ROLLOUT_STEP))
        .hash(&mut h);
    m.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond())
        .hash(&mut h);
    Some(h.finish())
}

/// An object that does not deserialize into its type (schema drift, an older CRD version):
/// tell its owner through a Warning event and wait for it to change, instead of failing the
/// whole watch or retrying in a loop.
pub async fn report_malformed<K: Resource<DynamicType = ()>>(
    invalid: &InvalidObject,
    ctx: &Context,
    controller: &'static str,
) -> Action {
    let m = &invalid.metadata;
    tracing::warn!(
        kind = %K::kind(&()),
        name = m.name.as_deref().unwrap_or(""),
        namespace = m.namespace.as_deref().unwrap_or(""),
        error = %invalid.error,
        "malformed object skipped"
    );
    ctx.metrics.failure(controller, "malformed_object");
    let reference = ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        ..ObjectReference::default()
    };
    ctx.publish(
        &reference,
        Event {
            type_: EventType::Warning,
            reason: "MalformedObject".into(),
            note: Some(format!("cannot read this object: {}", invalid.error)),
            action: "Reconcile".into(),
            secondary: None,
        },
    )
    .await;
    Action::await_change()
}
