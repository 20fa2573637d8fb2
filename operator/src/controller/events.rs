//! Kubernetes Events (`events.k8s.io/v1`) with a series per *message*, not per reason.
//!
//! kube-runtime's `Recorder` groups repeats by type, reason and action and then only bumps the
//! series count of the first event, so an event whose text changed (`ConfigUpdated` to a newer
//! version) kept the old text for minutes. Here the note is part of the key: the same message
//! again is a series, a new message is a new event.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as KubeEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};

/// How long a series stays open (client-go's and kube-runtime's choice).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);
/// Bound on remembered series; the oldest go first.
const MAX_SERIES: usize = 4096;

#[derive(Debug, Clone)]
struct Series {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes events, grouping exact repeats into a series.
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    series: Mutex<HashMap<u64, Series>>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

fn key(ev: &Event, reference: &ObjectReference) -> u64 {
    let mut h = DefaultHasher::new();
    (
        &reference.uid,
        &reference.namespace,
        &reference.name,
        &reference.kind,
    )
        .hash(&mut h);
    (
        ev.type_ == EventType::Warning,
        &ev.reason,
        &ev.action,
        &ev.note,
    )
        .hash(&mut h);
    h.finish()
}

fn ttl_passed(since: Timestamp, now: Timestamp) -> bool {
    now.duration_since(since).as_secs() >= SERIES_TTL.as_secs().cast_signed()
}

/// A DNS-subdomain-safe event name: the object's name, a dot, and a unique suffix.
fn event_name(reference: &ObjectReference, now: Timestamp, k: u64) -> String {
    let base: String = reference
        .name
        .as_deref()
        .unwrap_or("object")
        .chars()
        .take(200)
        .collect();
    format!("{base}.{:x}{:x}", now.as_nanosecond(), k & 0xffff)
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            // events.k8s.io/v1 requires a reporting instance.
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the event, or bumps the series of an identical one from the last minutes.
    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let k = key(ev, reference);
        let open = {
            let mut series = self
                .series
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            series.retain(|_, s| !ttl_passed(s.last, now));
            if series.len() >= MAX_SERIES
                && let Some(oldest) = series.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k)
            {
                series.remove(&oldest);
            }
            series.get(&k).cloned()
        };
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &namespace);
        let recorded = match open {
            Some(mut s) => {
                s.count += 1;
                s.last = now;
                let patch = serde_json::json!({
                    "series": EventSeries {
                        count: s.count,
                        last_observed_time: MicroTime(now),
                    }
                });
                api.patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                s
            }
            None => {
                let name = event_name(reference, now, k);
                let event = KubeEvent {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    action: Some(ev.action.clone()),
                    reason: Some(ev.reason.clone()),
                    note: ev.note.clone(),
                    type_: Some(
                        match ev.type_ {
                            EventType::Normal => "Normal",
                            EventType::Warning => "Warning",
                        }
                        .into(),
                    ),
                    event_time: Some(MicroTime(now)),
                    regarding: Some(reference.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..KubeEvent::default()
                };
                api.create(&PostParams::default(), &event).await?;
                Series {
                    name,
                    count: 1,
                    last: now,
                }
            }
        };
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        series.insert(k, recorded);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "ConfigUpdated".into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }

    #[test]
    fn a_new_message_is_a_new_key() {
        let r = ObjectReference {
            name: Some("n".into()),
            uid: Some("u".into()),
            ..ObjectReference::default()
        };
        assert_eq!(key(&ev("version 1"), &r), key(&ev("version 1"), &r));
        assert_ne!(key(&ev("version 1"), &r), key(&ev("version 2"), &r));
    }

    /// Against a mocked API server: a repeat bumps the open series (PATCH, count 2), a changed
    /// message is a new event (POST), so a message never outlives what it says.
    #[tokio::test]
    async fn repeats_bump_the_series_and_a_changed_message_is_a_new_event() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        use serde_json::Value;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let publisher = EventPublisher::new(
            Client::new(service, "default"),
            "resultity-operator",
            Some("pod-1".into()),
        );
        let reference = ObjectReference {
            namespace: Some("gpu".into()),
            name: Some("n".into()),
            uid: Some("u".into()),
            ..ObjectReference::default()
        };
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let Some((req, send)) = handle.next_request().await else {
                    panic!("the publisher made fewer than 3 calls");
                };
                let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                send.send_response(Response::new(Body::from(bytes.to_vec())));
                seen.push((method, path, body));
            }
            seen
        });
        for note in ["version 1", "version 1", "version 2"] {
            publisher
                .publish(&ev(note), &reference)
                .await
                .unwrap_or_else(|e| panic!("publishing {note}: {e}"));
        }
        let seen = server.await.unwrap_or_default();
        let events = "/apis/events.k8s.io/v1/namespaces/gpu/events";
        assert_eq!((&seen[0].0, seen[0].1.as_str()), (&Method::POST, events));
        assert_eq!(seen[0].2["note"], "version 1");
        assert_eq!(seen[0].2["reportingInstance"], "pod-1");
        let first = seen[0].2["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(
            (&seen[1].0, seen[1].1.clone()),
            (&Method::PATCH, format!("{events}/{first}"))
        );
        assert_eq!(seen[1].2["series"]["count"], 2);
        assert_eq!((&seen[2].0, seen[2].1.as_str()), (&Method::POST, events));
        assert_eq!(seen[2].2["note"], "version 2");
        assert_ne!(seen[2].2["metadata"]["name"], seen[0].2["metadata"]["name"]);
    }
}
