//! Reconcilers against a scripted API server (the kube-rs `tower-test` pattern): every test
//! lists the calls the reconciler must make, in order — method, path, field manager, body —
//! and fails on a wrong call, a missing call, or a call beyond the script.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use resultity_operator::build::{build_identity_secret, build_pod};
use resultity_operator::config_source::{ConfigSource, FetchError};
use resultity_operator::controller::{Context, network, node};
use resultity_operator::crd::{
    DeletionPolicy, NodePhase, ResultityNetwork, ResultityNode, ResultityNodeStatus,
};
use resultity_operator::metrics::Metrics;
use resultity_operator::sidecar::{SidecarClient, SidecarError, SidecarTarget};
use resultity_operator::validate::{Defaults, validate_node};
use resultity_protocol::clock::ManualClock;
use resultity_protocol::config::{ConfigSnapshot, NetworkConfig, RuntimeImages};
use resultity_protocol::messages::common::{Environment, Timing};
use resultity_protocol::status::NodeStatus;
use resultity_protocol::{NetworkId, NetworkKeypair, NodeKeypair, SignedConfig};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

// ---------- fixtures ----------

use crate::common;
use common::fixture;

const NOW_MS: u64 = 1_795_500_700_000;
const MANAGER_QUERY: &str = "fieldManager=resultity-operator";
const NODE_STATUS: &str =
    "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes/gpu-a/status";
const NODE: &str = "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes/gpu-a";
const NETWORK: &str = "/apis/resultity.com/v1alpha1/resultitynetworks/testnet";
const SECRET: &str = "/api/v1/namespaces/fleet/secrets/gpu-a-identity";
const SECRETS: &str = "/api/v1/namespaces/fleet/secrets";
const POD: &str = "/api/v1/namespaces/fleet/pods/gpu-a-node";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/fleet/events";

fn finalized_node() -> ResultityNode {
    let mut n: ResultityNode = fixture("node-vllm.yaml");
    n.metadata.finalizers = Some(vec![node::FINALIZER.into()]);
    n
}

fn key() -> NodeKeypair {
    NodeKeypair::from_seed(&[7; 32])
}

fn secret(n: &ResultityNode) -> Secret {
    let k = key();
    let mut s = build_identity_secret(
        n,
        &k.to_key_file_text(),
        k.id().as_str(),
        "test-admin-token-0123456789abcdef",
    );
    s.metadata.resource_version = Some("1".into());
    s
}

/// The pod the operator would build for `n`, as the API server reports it once running.
fn running_pod(n: &ResultityNode) -> Pod {
    let r = validate_node(n, Some(&fixture("network.yaml")), &Defaults::default()).unwrap();
    let mut pod = build_pod(n, &r, key().id().as_str(), &Defaults::default()).unwrap();
    let live: Pod = fixture("pod-running-ready.yaml");
    pod.status = live.status;
    pod
}

/// The node's finalized object with a status that last said Ready.
fn ready_node() -> ResultityNode {
    let mut n = finalized_node();
    n.status = Some(ResultityNodeStatus {
        phase: NodePhase::Ready,
        ..ResultityNodeStatus::default()
    });
    n
}

fn report() -> NodeStatus {
    fixture("sidecar-ready.json")
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

// ---------- fakes for the two outside services ----------

/// A sidecar that answers from a script and records what it was asked.
#[derive(Debug, Default)]
struct FakeSidecar {
    statuses: Mutex<VecDeque<Result<NodeStatus, SidecarError>>>,
    calls: Mutex<Vec<String>>,
}

impl FakeSidecar {
    fn answering(statuses: Vec<Result<NodeStatus, SidecarError>>) -> Arc<Self> {
        Arc::new(Self {
            statuses: Mutex::new(statuses.into()),
            calls: Mutex::default(),
        })
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl SidecarClient for FakeSidecar {
    fn status<'a>(
        &'a self,
        target: &'a SidecarTarget,
    ) -> BoxFuture<'a, Result<NodeStatus, SidecarError>> {
        assert_eq!(target.token, "test-admin-token-0123456789abcdef");
        self.calls
            .lock()
            .unwrap()
            .push(format!("status {}:{}", target.pod_ip, target.port));
        let next = self
            .statuses
            .lock()
            .unwrap()
            .pop_front()
            .expect("unexpected sidecar status call");
        Box::pin(async move { next })
    }
    fn drain<'a>(
        &'a self,
        _target: &'a SidecarTarget,
        deregister: bool,
    ) -> BoxFuture<'a, Result<(), SidecarError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("drain deregister={deregister}"));
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug)]
struct FakeSource(Result<Vec<u8>, FetchError>);

impl ConfigSource for FakeSource {
    fn fetch<'a>(
        &'a self,
        io_endpoint: &'a str,
        _since: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        assert_eq!(io_endpoint, "https://io.testnet.resultity.com");
        let r = self.0.clone();
        Box::pin(async move { r })
    }
}

// ---------- the scripted API server ----------

type Check = Box<dyn Fn(&Value) + Send>;
type Reply = Box<dyn Fn(&Value) -> (u16, Value) + Send>;

/// One expected API call and the answer to give.
struct Call {
    method: Method,
    path: &'static str,
    query: &'static [&'static str],
    checks: Vec<Check>,
    reply: Reply,
}

impl Call {
    fn new(method: Method, path: &'static str) -> Self {
        Self {
            method,
            path,
            query: &[],
            checks: Vec::new(),
            reply: Box::new(|_| (200, json!({}))),
        }
    }
    fn get(path: &'static str, answer: impl serde::Serialize) -> Self {
        let v = serde_json::to_value(answer).unwrap();
        Self::new(Method::GET, path).reply(move |_| (200, v.clone()))
    }
    fn get_missing(path: &'static str) -> Self {
        Self::new(Method::GET, path).reply(|_| not_found())
    }
    /// Server-side apply with our field manager, forced.
    fn apply(path: &'static str) -> Self {
        let mut c = Self::new(Method::PATCH, path);
        c.query = &[MANAGER_QUERY, "force=true"];
        c.reply(|body| (200, body.clone()))
    }
    /// Status apply: answers with `obj` carrying the applied status.
    fn apply_status(path: &'static str, obj: impl serde::Serialize) -> Self {
        let obj = serde_json::to_value(obj).unwrap();
        let mut c = Self::new(Method::PATCH, path);
        c.query = &[MANAGER_QUERY, "force=true"];
        c.reply(move |body| {
            let mut o = obj.clone();
            o["status"] = body["status"].clone();
            (200, o)
        })
    }
    fn event(path: &'static str, reason: &'static str) -> Self {
        Self::new(Method::POST, path)
            .check(move |b| assert_eq!(b["reason"], reason, "event: {b}"))
            .reply(|body| (201, body.clone()))
    }
    /// Adds a body check (checks accumulate).
    fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Self {
        self.checks.push(Box::new(f));
        self
    }
    fn reply(mut self, f: impl Fn(&Value) -> (u16, Value) + Send + 'static) -> Self {
        self.reply = Box::new(f);
        self
    }
}

async fn serve(mut handle: Handle<Request<Body>, Response<Body>>, script: Vec<Call>) {
    for (i, call) in script.into_iter().enumerate() {
        let Some((req, send)) = handle.next_request().await else {
            panic!("call {i} ({} {}) never came", call.method, call.path);
        };
        let uri = req.uri().clone();
        assert_eq!(
            (req.method(), uri.path()),
            (&call.method, call.path),
            "call {i}: got {} {uri}",
            req.method()
        );
        let query = uri.query().unwrap_or("");
        for q in call.query {
            assert!(query.contains(q), "call {i}: {uri} lacks {q}");
        }
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        for check in &call.checks {
            check(&body);
        }
        let (status, answer) = (call.reply)(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }
    // Once the reconciler is done and the client dropped, no call may be left.
    if let Some((req, _)) = handle.next_request().await {
        panic!("unexpected extra call {} {}", req.method(), req.uri());
    }
}

struct World {
    ctx: Arc<Context>,
    server: tokio::task::JoinHandle<()>,
}

fn world(script: Vec<Call>, sidecar: Arc<FakeSidecar>, source: FakeSource) -> World {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ctx = Arc::new(Context::new(
        client,
        sidecar,
        Arc::new(source),
        Arc::new(Metrics::default()),
        Defaults::default(),
        Arc::new(ManualClock::new(NOW_MS)),
    ));
    World {
        ctx,
        server: tokio::spawn(serve(handle, script)),
    }
}

impl World {
    /// Runs `f` to completion, then checks the script was followed to the end.
    async fn run<T>(self, f: impl FnOnce(Arc<Context>) -> BoxFuture<'static, T>) -> T {
        let out = tokio::time::timeout(Duration::from_secs(10), f(self.ctx))
            .await
            .expect("reconcile hung: it made a call the script does not answer");
        // `ctx` (and with it the client) is gone now, so the server sees the end.
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(Ok(())) => out,
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("scenario task failed: {e}"),
            Err(_) => panic!("scenario did not finish: the reconciler stopped calling"),
        }
    }
}

/// The read of the network every reconcile starts with.
fn network_read() -> Call {
    Call::get(NETWORK, fixture::<ResultityNetwork>("network.yaml"))
}

fn no_source() -> FakeSource {
    FakeSource(Err(FetchError::Status {
        url: "unused".into(),
        status: 500,
    }))
}

fn reconcile_node(
    n: ResultityNode,
) -> impl FnOnce(Arc<Context>) -> BoxFuture<'static, resultity_operator::Result<Action>> {
    move |ctx| Box::pin(node::reconcile(Arc::new(n), ctx))
}

/// A node reconcile's script: it reads the network and `n`'s identity Secret, then makes the
/// calls `then`.
fn node_script(n: &ResultityNode, then: impl IntoIterator<Item = Call>) -> Vec<Call> {
    [network_read(), Call::get(SECRET, secret(n))]
        .into_iter()
        .chain(then)
        .collect()
}

/// Reconciles `n` against `script` (no sidecar is asked anything).
async fn run_node(n: ResultityNode, script: Vec<Call>) -> resultity_operator::Result<Action> {
    world(script, FakeSidecar::answering(vec![]), no_source())
        .run(reconcile_node(n))
        .await
}

fn status_of(body: &Value) -> ResultityNodeStatus {
    serde_json::from_value(body["status"].clone()).unwrap()
}

fn cond<'a>(s: &'a ResultityNodeStatus, t: &str) -> (&'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

// ---------- node scenarios ----------

#[tokio::test]
async fn create_makes_identity_then_pod_then_status() {
    let n = finalized_node();
    let created_id = Arc::new(Mutex::new(String::new()));
    let id_in_secret = created_id.clone();
    let id_for_pod = created_id.clone();
    let id_for_status = created_id.clone();
    let script = vec![
        network_read(),
        Call::get_missing(SECRET),
        Call::new(Method::POST, SECRETS)
            .check(move |b| {
                assert_eq!(b["metadata"]["name"], "gpu-a-identity");
                assert!(b["metadata"].get("ownerReferences").is_none());
                assert!(b["data"]["node.key"].is_string());
                assert!(b["data"]["admin-token"].is_string());
                let id = b["metadata"]["labels"]["resultity.com/node-id"]
                    .as_str()
                    .unwrap();
                assert!(id.starts_with("rn1") && id.len() == 61);
                *id_in_secret.lock().unwrap() = id.to_owned();
            })
            .reply(|b| (201, b.clone())),
        Call::get_missing(POD),
        Call::apply(POD).check(move |b| {
            assert_eq!(b["kind"], "Pod");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "ResultityNode");
            assert_eq!(b["metadata"]["ownerReferences"][0]["controller"], true);
            assert!(b["metadata"]["annotations"]["resultity.com/spec-hash"].is_string());
            assert_eq!(
                b["metadata"]["labels"]["resultity.com/node-id"],
                id_for_pod.lock().unwrap().as_str()
            );
            assert_eq!(b["spec"]["automountServiceAccountToken"], false);
        }),
        Call::event(EVENTS, "PodCreated"),
        Call::apply_status(NODE_STATUS, &n).check(move |b| {
            assert_eq!(b["apiVersion"], "resultity.com/v1alpha1");
            assert_eq!(b["kind"], "ResultityNode");
            let s = status_of(b);
            assert_eq!(s.phase, NodePhase::Pending);
            assert_eq!(s.observed_generation, Some(2));
            assert_eq!(
                s.node_id.as_deref(),
                Some(id_for_status.lock().unwrap().as_str())
            );
            assert_eq!(s.pod_name.as_deref(), Some("gpu-a-node"));
            assert!(
                s.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(2))
            );
        }),
    ];
    let sidecar = FakeSidecar::answering(vec![]);
    let action = world(script, sidecar.clone(), no_source())
        .run(reconcile_node(n))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    // The pod has no IP yet: nobody to ask.
    assert!(sidecar.calls().is_empty());
}

#[tokio::test]
async fn new_object_gets_the_finalizer_first() {
    let n: ResultityNode = fixture("node-vllm.yaml");
    let script =
        vec![
            Call::new(Method::PATCH, NODE)
                .check(|b| {
                    let ops = b.as_array().unwrap();
                    assert!(ops.iter().any(|op| op["value"] == json!([node::FINALIZER])
                        || op["value"] == node::FINALIZER));
                })
                .reply(|_| (200, serde_json::to_value(finalized_node()).unwrap())),
        ];
    let action = run_node(n, script).await.unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn spec_update_drains_then_replaces_the_pod() {
    let old = finalized_node();
    let live = running_pod(&old);
    let mut changed = old.clone();
    changed.metadata.generation = Some(3);
    changed
        .spec
        .runtime
        .extra_args
        .push("--enforce-eager".into());
    changed.status = Some(ResultityNodeStatus {
        phase: NodePhase::Ready,
        ..ResultityNodeStatus::default()
    });

    // Round 1: the drain is asked for; the sidecar is still draining, so the pod stays.
    let mut draining = report();
    draining.draining = true;
    let sidecar = FakeSidecar::answering(vec![Ok(draining)]);
    let drain_started = Arc::new(Mutex::new(None::<Value>));
    let started = drain_started.clone();
    let script = node_script(
        &changed,
        [
            Call::get(POD, &live),
            // The drain has its own event reason and says why, not the previous phase's reason.
            Call::event(EVENTS, "Draining").check(|b| {
                let note = b["note"].as_str().unwrap();
                assert!(
                    note.contains("out of date") && note.contains("300s"),
                    "{note}"
                );
            }),
            Call::apply_status(NODE_STATUS, &changed).check(move |b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Draining);
                assert!(s.drain_started_time.is_some());
                assert_ne!(s.desired_spec_hash, s.pod_spec_hash, "out of date");
                *started.lock().unwrap() = Some(b["status"]["drainStartedTime"].clone());
            }),
        ],
    );
    let action = world(script, sidecar.clone(), no_source())
        .run(reconcile_node(changed.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(
        sidecar.calls(),
        vec!["status 10.42.0.17:9090", "drain deregister=false"]
    );

    // Round 2: drained, so the old pod is deleted.
    let mut round2 = changed.clone();
    round2.status = Some(ResultityNodeStatus {
        phase: NodePhase::Draining,
        drain_started_time: Some(
            serde_json::from_value(drain_started.lock().unwrap().clone().unwrap()).unwrap(),
        ),
        ..ResultityNodeStatus::default()
    });
    let mut drained = report();
    drained.draining = true;
    drained.drained = true;
    let sidecar = FakeSidecar::answering(vec![Ok(drained)]);
    let live2 = live.clone();
    let script = node_script(
        &changed,
        [
            Call::get(POD, &live),
            Call::new(Method::DELETE, POD)
                .reply(move |_| (200, serde_json::to_value(&live2).unwrap())),
            Call::event(EVENTS, "PodReplaced"),
            Call::apply_status(NODE_STATUS, &changed).check(|b| {
                let s = status_of(b);
                assert!(s.drain_started_time.is_none());
                assert!(s.pod_spec_hash.is_none(), "the deleted pod is not counted");
            }),
        ],
    );
    let action = world(script, sidecar.clone(), no_source())
        .run(reconcile_node(round2))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    // Already drained: no second drain request.
    assert_eq!(sidecar.calls(), vec!["status 10.42.0.17:9090"]);

    // Round 3: the pod is gone; the new one carries the new spec.
    let want =
        running_pod(&changed).metadata.annotations.unwrap()["resultity.com/spec-hash"].clone();
    assert_ne!(
        Some(&want),
        live.metadata
            .annotations
            .as_ref()
            .unwrap()
            .get("resultity.com/spec-hash")
    );
    let mut round3 = changed.clone();
    round3.status = Some(ResultityNodeStatus {
        phase: NodePhase::Draining,
        ..ResultityNodeStatus::default()
    });
    let script = node_script(
        &changed,
        [
            Call::get_missing(POD),
            Call::apply(POD).check(move |b| {
                assert_eq!(
                    b["metadata"]["annotations"]["resultity.com/spec-hash"],
                    want.as_str()
                );
                let args = b["spec"]["containers"][0]["args"].as_array().unwrap();
                assert!(args.contains(&json!("--enforce-eager")));
            }),
            Call::event(EVENTS, "PodCreated"),
            Call::apply_status(NODE_STATUS, &changed)
                .check(|b| assert_eq!(status_of(b).phase, NodePhase::Pending)),
            Call::event(EVENTS, "Pending"),
        ],
    );
    run_node(round3, script).await.unwrap();
}

#[tokio::test]
async fn pod_deleted_out_of_band_is_recreated() {
    let n = ready_node();
    let script = node_script(
        &n,
        [
            Call::get_missing(POD),
            Call::apply(POD).check(|b| {
                assert_eq!(
                    b["metadata"]["labels"]["resultity.com/node-id"],
                    key().id().as_str()
                );
            }),
            Call::event(EVENTS, "PodCreated"),
            Call::apply_status(NODE_STATUS, &n).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Pending);
                assert_eq!(s.node_id.as_deref(), Some(key().id().as_str()));
            }),
            Call::event(EVENTS, "Pending"),
        ],
    );
    run_node(n, script).await.unwrap();
}

#[tokio::test]
async fn status_pull_failure_is_unknown_with_a_requeue() {
    let n = ready_node();
    let pod = running_pod(&n);
    let sidecar = FakeSidecar::answering(vec![Err(SidecarError::Timeout(Duration::from_secs(3)))]);
    let script = node_script(
        &n,
        [
            // Same spec hash: nothing to apply, the pod is read back as is.
            Call::get(POD, &pod),
            Call::apply_status(NODE_STATUS, &n).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Degraded);
                assert_eq!(cond(&s, "Registered"), ("Unknown", "SidecarUnreachable"));
                assert_eq!(cond(&s, "Connected"), ("Unknown", "SidecarUnreachable"));
                assert_eq!(cond(&s, "ConfigInSync"), ("Unknown", "SidecarUnreachable"));
                assert_eq!(cond(&s, "RuntimeReady"), ("True", "ContainerReady"));
                assert_eq!(cond(&s, "Ready").0, "False");
            }),
            Call::event(EVENTS, "Degraded"),
        ],
    );
    let action = world(script, sidecar.clone(), no_source())
        .run(reconcile_node(n))
        .await
        .unwrap();
    // Not an error (no error storm): a plain requeue.
    assert_eq!(action, Action::requeue(Duration::from_secs(15)));
    assert_eq!(sidecar.calls(), vec!["status 10.42.0.17:9090"]);
}

#[tokio::test]
async fn ready_node_status_from_the_sidecar() {
    let n = ready_node();
    let pod = running_pod(&n);
    let script = node_script(
        &n,
        [
            Call::get(POD, &pod),
            Call::apply_status(NODE_STATUS, &n).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Ready);
                assert_eq!(s.jobs.unwrap().completed, 1289);
                assert_eq!(s.models_summary.as_deref(), Some("1/1"));
            }),
        ],
    );
    let action = world(
        script,
        FakeSidecar::answering(vec![Ok(report())]),
        no_source(),
    )
    .run(reconcile_node(n))
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

/// The API requests of a node reconcile with nothing to do: the network, the identity Secret
/// and the pod. Its budget, counted by the scripted server (a call beyond the script fails).
const STEADY_STATE_REQUESTS: usize = 3;

#[tokio::test]
async fn steady_state_reconcile_writes_no_status() {
    // First pass: the status is written.
    let n = ready_node();
    let pod = running_pod(&n);
    let written = Arc::new(Mutex::new(None::<Value>));
    let keep = written.clone();
    let script = node_script(
        &n,
        [
            Call::get(POD, &pod),
            Call::apply_status(NODE_STATUS, &n)
                .check(move |b| *keep.lock().unwrap() = Some(b["status"].clone())),
        ],
    );
    world(
        script,
        FakeSidecar::answering(vec![Ok(report())]),
        no_source(),
    )
    .run(reconcile_node(n.clone()))
    .await
    .unwrap();
    let mut settled = n.clone();
    settled.status =
        Some(serde_json::from_value(written.lock().unwrap().clone().unwrap()).unwrap());

    // Next pass: a later heartbeat and more jobs done, nothing else. Reads only.
    let mut later = report();
    later.last_heartbeat_ms = later.last_heartbeat_ms.map(|ms| ms + 30_000);
    later.jobs.completed += 7;
    let script = node_script(&settled, [Call::get(POD, &pod)]);
    assert_eq!(script.len(), STEADY_STATE_REQUESTS);
    let action = world(script, FakeSidecar::answering(vec![Ok(later)]), no_source())
        .run(reconcile_node(settled.clone()))
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));

    // The network stops routing to it: that is a change, written at once.
    let mut penalized = report();
    if let Some(v) = penalized.verdict.as_mut() {
        v.eligible = false;
        v.reason = Some("penalized: 3 failed jobs".into());
    }
    let script = node_script(
        &settled,
        [
            Call::get(POD, &pod),
            Call::apply_status(NODE_STATUS, &settled).check(|b| {
                let s = status_of(b);
                assert_eq!(cond(&s, "NetworkRoutable"), ("False", "NotEligible"));
            }),
        ],
    );
    let action = world(
        script,
        FakeSidecar::answering(vec![Ok(penalized)]),
        no_source(),
    )
    .run(reconcile_node(settled))
    .await
    .unwrap();
    // Ready but not routable: looked at again within seconds, not a minute.
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
}

fn deleting(policy: DeletionPolicy) -> ResultityNode {
    let mut n = finalized_node();
    n.spec.identity.deletion_policy = policy;
    n.metadata.deletion_timestamp = Some(Time(
        Timestamp::from_millisecond(i64::try_from(NOW_MS).unwrap() - 10_000).unwrap(),
    ));
    n
}

#[tokio::test]
async fn deletion_drains_deregisters_then_releases() {
    let n = deleting(DeletionPolicy::Delete);
    let mut drained = report();
    drained.drained = true;
    let sidecar = FakeSidecar::answering(vec![Ok(drained)]);
    let released = n.clone();
    let script = vec![
        Call::get(SECRET, secret(&n)),
        Call::get(POD, running_pod(&n)),
        // deletionPolicy: Delete, and the Secret is the operator's own.
        Call::new(Method::DELETE, SECRET).reply(|_| {
            (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
        }),
        Call::new(Method::PATCH, NODE)
            .check(|b| {
                let ops = b.as_array().unwrap();
                assert_eq!(ops[0]["op"], "test");
                assert_eq!(ops[0]["value"], node::FINALIZER);
                assert_eq!(ops[1]["op"], "remove");
                assert_eq!(ops[1]["path"], "/metadata/finalizers/0");
            })
            .reply(move |_| (200, serde_json::to_value(&released).unwrap())),
    ];
    let action = world(script, sidecar.clone(), no_source())
        .run(reconcile_node(n))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(
        sidecar.calls(),
        vec!["drain deregister=true", "status 10.42.0.17:9090"]
    );
}

#[tokio::test]
async fn deletion_waits_while_draining_and_retains_the_identity() {
    // Still draining, within the timeout: the finalizer stays.
    let n = deleting(DeletionPolicy::Retain);
    let mut busy = report();
    busy.draining = true;
    let sidecar = FakeSidecar::answering(vec![Ok(busy)]);
    let script = vec![
        Call::get(SECRET, secret(&n)),
        Call::get(POD, running_pod(&n)),
        // The status says the node is draining while the finalizer waits.
        Call::apply_status(NODE_STATUS, &n).check(|b| {
            let s = status_of(b);
            assert_eq!(s.phase, NodePhase::Draining);
            assert_eq!(cond(&s, "Draining"), ("True", "Deleting"));
            assert!(s.drain_started_time.is_some());
        }),
    ];
    let result = world(script, sidecar, no_source())
        .run(reconcile_node(n.clone()))
        .await;
    assert!(matches!(result, Err(resultity_operator::Error::Draining)));

    // Already reported: the next wait writes nothing.
    let mut reported = n.clone();
    reported.status = Some(ResultityNodeStatus {
        phase: NodePhase::Draining,
        conditions: vec![Condition {
            type_: "Draining".into(),
            status: "True".into(),
            reason: "Deleting".into(),
            message: String::new(),
            observed_generation: Some(2),
            last_transition_time: Time(Timestamp::from_second(1_700_000_000).unwrap()),
        }],
        ..ResultityNodeStatus::default()
    });
    let mut busy = report();
    busy.draining = true;
    let script = vec![
        Call::get(SECRET, secret(&n)),
        Call::get(POD, running_pod(&n)),
    ];
    let result = world(script, FakeSidecar::answering(vec![Ok(busy)]), no_source())
        .run(reconcile_node(reported))
        .await;
    assert!(matches!(result, Err(resultity_operator::Error::Draining)));

    // Past the drain timeout: released anyway, with a warning; Retain keeps the Secret.
    let mut late = n;
    late.spec.drain_timeout_seconds = 5;
    let mut busy = report();
    busy.draining = true;
    let sidecar = FakeSidecar::answering(vec![Ok(busy)]);
    let released = late.clone();
    let script = vec![
        Call::get(SECRET, secret(&late)),
        Call::get(POD, running_pod(&late)),
        Call::event(EVENTS, "DrainTimedOut"),
        Call::new(Method::PATCH, NODE)
            .reply(move |_| (200, serde_json::to_value(&released).unwrap())),
    ];
    let action = world(script, sidecar, no_source())
        .run(reconcile_node(late))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn unusable_identity_secret_is_invalid_not_overwritten() {
    let n = finalized_node();
    let mut bad = secret(&n);
    bad.data.as_mut().unwrap().insert(
        "node.key".into(),
        k8s_openapi::ByteString(b"garbage".to_vec()),
    );
    let script = vec![
        network_read(),
        Call::get(SECRET, bad),
        Call::get_missing(POD),
        Call::apply_status(NODE_STATUS, &n).check(|b| {
            let s = status_of(b);
            assert_eq!(s.phase, NodePhase::Invalid);
            let (status, reason) = cond(&s, "Ready");
            assert_eq!((status, reason), ("False", "InvalidSpec"));
        }),
        Call::event(EVENTS, "Invalid"),
    ];
    let action = run_node(n, script).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

// ---------- network scenarios ----------

fn net_key() -> NetworkKeypair {
    NetworkKeypair::from_seed(&[1; 32])
}

fn snapshot(version: u64, prev: Option<resultity_protocol::ConfigDigest>) -> ConfigSnapshot {
    ConfigSnapshot {
        network_id: NetworkId::parse("resultity-testnet").unwrap(),
        version,
        issued_at_ms: NOW_MS - 60_000,
        expires_at_ms: NOW_MS + 86_400_000,
        prev_digest: prev,
        payload: NetworkConfig {
            environment: Environment::Testnet,
            models: vec![],
            runtime_images: RuntimeImages {
                vllm: Some(format!("vllm/vllm-openai:v0.{version}.0")),
                triton: None,
            },
            sidecar_image: Some("ghcr.io/resultity/resultity-sidecar:0.2.0".into()),
            timing: Timing::default(),
            subclouds: vec![],
            network_keys: vec![net_key().id().clone()],
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        },
    }
}

fn bare_network() -> ResultityNetwork {
    let mut n: ResultityNetwork = fixture("network.yaml");
    n.status = None;
    n
}

fn reconcile_network(
    n: ResultityNetwork,
) -> impl FnOnce(Arc<Context>) -> BoxFuture<'static, resultity_operator::Result<Action>> {
    move |ctx| Box::pin(network::reconcile(Arc::new(n), ctx))
}

const NETWORK_STATUS: &str = "/apis/resultity.com/v1alpha1/resultitynetworks/testnet/status";
const DEFAULT_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

#[tokio::test]
async fn network_config_verified_and_recorded() {
    let v1 = SignedConfig::sign(&net_key(), &snapshot(1, None)).unwrap();
    let digest = v1.digest().to_string();
    let net = bare_network();
    let script = vec![
        Call::apply_status(NETWORK_STATUS, &net).check(move |b| {
            let s = &b["status"];
            assert_eq!(s["configVersion"], 1);
            assert_eq!(s["configDigest"], digest.as_str());
            assert_eq!(s["runtimeImages"]["vllm"], "vllm/vllm-openai:v0.1.0");
            assert_eq!(s["trustedKeys"][0], net_key().id().as_str());
            let verified = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "ConfigVerified")
                .unwrap();
            assert_eq!(verified["status"], "True");
        }),
        Call::event(DEFAULT_EVENTS, "ConfigUpdated"),
    ];
    let action = world(
        script,
        FakeSidecar::answering(vec![]),
        FakeSource(Ok(v1.as_str().as_bytes().to_vec())),
    )
    .run(reconcile_network(net))
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
}

#[tokio::test]
async fn network_config_rollback_is_refused_and_last_good_kept() {
    let v1 = SignedConfig::sign(&net_key(), &snapshot(1, None)).unwrap();
    let v2 = SignedConfig::sign(&net_key(), &snapshot(2, Some(v1.digest().clone()))).unwrap();
    // The operator holds v2; the endpoint now serves the older v1.
    let (holding, _) = network::compute_network_status(
        &bare_network(),
        &Ok(v2.as_str().as_bytes().to_vec()),
        NOW_MS,
    );
    let mut net = bare_network();
    net.status = Some(holding);
    let v2_digest = v2.digest().to_string();
    let script = vec![
        Call::apply_status(NETWORK_STATUS, &net).check(move |b| {
            let s = &b["status"];
            assert_eq!(s["configVersion"], 2, "last good config kept");
            assert_eq!(s["configDigest"], v2_digest.as_str());
            assert_eq!(s["runtimeImages"]["vllm"], "vllm/vllm-openai:v0.2.0");
            let by_type = |t: &str| {
                s["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == t)
                    .unwrap()
                    .clone()
            };
            let verified = by_type("ConfigVerified");
            assert_eq!(verified["status"], "False");
            assert_eq!(verified["reason"], "Rollback");
            assert_eq!(by_type("Ready")["status"], "True", "v2 is still in force");
        }),
        Call::event(DEFAULT_EVENTS, "ConfigRefused").check(|b| {
            assert_eq!(b["type"], "Warning");
        }),
    ];
    world(
        script,
        FakeSidecar::answering(vec![]),
        FakeSource(Ok(v1.as_str().as_bytes().to_vec())),
    )
    .run(reconcile_network(net))
    .await
    .unwrap();
}

#[test]
fn network_refusals_have_reasons() {
    let v1 = SignedConfig::sign(&net_key(), &snapshot(1, None)).unwrap();
    let reason = |net: &ResultityNetwork, bytes: &[u8], now: u64| {
        let (s, _) = network::compute_network_status(net, &Ok(bytes.to_vec()), now);
        s.conditions
            .iter()
            .find(|c| c.type_ == "ConfigVerified")
            .map(|c| c.reason.clone())
            .unwrap()
    };
    // Expired.
    assert_eq!(
        reason(&bare_network(), v1.as_str().as_bytes(), NOW_MS + 86_400_001),
        "Expired"
    );
    // Signed by a key nobody pinned.
    let stranger =
        SignedConfig::sign(&NetworkKeypair::from_seed(&[9; 32]), &snapshot(1, None)).unwrap();
    assert_eq!(
        reason(&bare_network(), stranger.as_str().as_bytes(), NOW_MS),
        "UnknownSigner"
    );
    // Not an envelope at all.
    assert_eq!(reason(&bare_network(), b"<html>", NOW_MS), "Malformed");
    // A mainnet config offered to a testnet resource.
    let mut main = snapshot(1, None);
    main.payload.environment = Environment::Mainnet;
    let main = SignedConfig::sign(&net_key(), &main).unwrap();
    assert_eq!(
        reason(&bare_network(), main.as_str().as_bytes(), NOW_MS),
        "WrongEnvironment"
    );
    // A fetch failure keeps the verdict on the config in force.
    let (held, _) = network::compute_network_status(
        &bare_network(),
        &Ok(v1.as_str().as_bytes().to_vec()),
        NOW_MS,
    );
    let mut net = bare_network();
    net.status = Some(held);
    let (s, notice) = network::compute_network_status(
        &net,
        &Err(FetchError::Timeout {
            url: "https://io.testnet.resultity.com/v1/config".into(),
            timeout: Duration::from_secs(10),
        }),
        NOW_MS + 1000,
    );
    assert_eq!(s.config_version, Some(1));
    let fetched = s
        .conditions
        .iter()
        .find(|c| c.type_ == "ConfigFetched")
        .unwrap();
    assert_eq!(
        (fetched.status.as_str(), fetched.reason.as_str()),
        ("False", "FetchFailed")
    );
    assert!(notice.is_none());
}

/// v1 under k1; v2 rotates to k2 (signed by k1, k1 retiring until `window_end`); v3, signed by
/// k2 after the window, confirms.
fn rotation(window_end: u64) -> (SignedConfig, SignedConfig, SignedConfig) {
    use resultity_protocol::config::RetiringKey;
    let k2 = NetworkKeypair::from_seed(&[2; 32]);
    let v1 = SignedConfig::sign(&net_key(), &snapshot(1, None)).unwrap();
    let mut r = snapshot(2, Some(v1.digest().clone()));
    r.payload.network_keys = vec![k2.id().clone()];
    r.payload.retiring_keys = vec![RetiringKey {
        key: net_key().id().clone(),
        not_after_ms: window_end,
    }];
    let v2 = SignedConfig::sign(&net_key(), &r).unwrap();
    let mut c = snapshot(3, Some(v2.digest().clone()));
    c.issued_at_ms = window_end;
    c.expires_at_ms = window_end + 86_400_000;
    c.payload.network_keys = vec![k2.id().clone()];
    let v3 = SignedConfig::sign(&k2, &c).unwrap();
    (v1, v2, v3)
}

fn chain(links: &[&SignedConfig]) -> Vec<u8> {
    let id = NetworkId::parse("resultity-testnet").unwrap();
    serde_json::to_vec(&resultity_protocol::config::ConfigChain::new(
        id, links, NOW_MS,
    ))
    .unwrap()
}

fn holding(net: &ResultityNetwork, bytes: &[u8], now: u64) -> ResultityNetwork {
    let (status, _) = network::compute_network_status(net, &Ok(bytes.to_vec()), now);
    let mut n = net.clone();
    n.status = Some(status);
    n
}

#[test]
fn during_an_overlap_new_nodes_pin_both_key_sets_until_the_window_ends() {
    let window_end = NOW_MS + 30_000;
    let (v1, v2, _) = rotation(window_end);
    let k1 = net_key().id().as_str().to_owned();
    let k2 = NetworkKeypair::from_seed(&[2; 32]).id().as_str().to_owned();
    let at_v1 = holding(&bare_network(), v1.as_str().as_bytes(), NOW_MS);
    let at_v2 = holding(&at_v1, &chain(&[&v2]), NOW_MS + 1_000);
    let s = at_v2.status.as_ref().unwrap();
    assert_eq!(s.config_version, Some(2));
    assert_eq!(s.trusted_keys, std::slice::from_ref(&k2));
    assert_eq!(s.retiring_keys.len(), 1);
    assert_eq!(s.retiring_keys[0].key, k1);
    assert_eq!(
        s.retiring_keys[0].not_after_time.0.as_millisecond(),
        i64::try_from(window_end).unwrap()
    );
    // Looked at again when the window ends, not a whole poll interval later.
    assert_eq!(
        network::next_poll(&at_v2, s, NOW_MS + 1_000),
        Duration::from_secs(29)
    );
    let node: ResultityNode = fixture("node-vllm.yaml");
    // The node's model, approved as in the fixture (these snapshots approve none).
    let approved = fixture::<ResultityNetwork>("network.yaml")
        .status
        .unwrap()
        .approved_models;
    let pins = |net: &ResultityNetwork| {
        let mut net = net.clone();
        net.status.as_mut().unwrap().approved_models = approved.clone();
        validate_node(&node, Some(&net), &Defaults::default())
            .unwrap()
            .network_keys
    };
    assert_eq!(pins(&at_v2), [k2.clone(), k1.clone()]);

    // The operator restarted: the retiring key is read back from status and still verifies.
    let again = holding(&at_v2, &chain(&[&v2]), NOW_MS + 2_000);
    assert_eq!(again.status.as_ref().unwrap().retiring_keys.len(), 1);

    // The window ended: the key leaves the status and new pins, though nothing new came.
    let after = holding(&at_v2, &chain(&[&v2]), window_end);
    let s = after.status.as_ref().unwrap();
    assert!(s.retiring_keys.is_empty(), "{:?}", s.retiring_keys);
    assert_eq!(pins(&after), [k2]);
    assert_eq!(
        network::next_poll(&after, s, window_end),
        Duration::from_secs(60)
    );
}

fn config_verified(conditions: &[Condition]) -> &Condition {
    conditions
        .iter()
        .find(|c| c.type_ == "ConfigVerified")
        .unwrap()
}

#[test]
fn a_retiring_key_can_neither_extend_its_window_nor_reactivate_itself() {
    use resultity_protocol::config::RetiringKey;
    let window_end = NOW_MS + 12_000;
    let (v1, v2, _) = rotation(window_end);
    let k1 = net_key();
    let k2 = NetworkKeypair::from_seed(&[2; 32]);
    let at_v1 = holding(&bare_network(), v1.as_str().as_bytes(), NOW_MS);
    let at_v2 = holding(&at_v1, &chain(&[&v2]), NOW_MS + 1_000);
    // Inside its window the leaked k1 keeps k2 active but re-lists itself for a day.
    let mut ext = snapshot(3, Some(v2.digest().clone()));
    ext.payload.network_keys = vec![k2.id().clone()];
    ext.payload.retiring_keys = vec![RetiringKey {
        key: k1.id().clone(),
        not_after_ms: NOW_MS + 86_400_000,
    }];
    let ext = SignedConfig::sign(&k1, &ext).unwrap();
    let (refused, notice) =
        network::compute_network_status(&at_v2, &Ok(chain(&[&ext])), NOW_MS + 2_000);
    let verified = config_verified(&refused.conditions);
    assert_eq!(
        (verified.status.as_str(), verified.reason.as_str()),
        ("False", "RotationConflict")
    );
    assert!(
        verified.message.contains("may only be shortened"),
        "{}",
        verified.message
    );
    assert!(notice.is_some_and(|n| n.warning));
    assert_eq!(refused.config_version, Some(2));
    assert_eq!(
        refused.retiring_keys[0].not_after_time.0.as_millisecond(),
        i64::try_from(window_end).unwrap(),
        "the window stays the one the rotation fixed"
    );
    let mut at_ext = at_v2.clone();
    at_ext.status = Some(refused);
    // After the original window, k1 signs a snapshot that makes itself active again.
    let mut back = snapshot(4, Some(ext.digest().clone()));
    back.payload.network_keys = vec![k1.id().clone()];
    let back = SignedConfig::sign(&k1, &back).unwrap();
    let later = window_end + 1_000;
    let (s, _) = network::compute_network_status(&at_ext, &Ok(chain(&[&ext, &back])), later);
    assert_eq!(config_verified(&s.conditions).reason, "UnknownSigner");
    assert_eq!(s.config_version, Some(2));
    assert_eq!(s.trusted_keys, [k2.id().as_str()]);
    assert!(s.retiring_keys.is_empty());
    // Inside the window, re-activation signed only by the retiring key is refused too.
    let mut inside = snapshot(3, Some(v2.digest().clone()));
    inside.payload.network_keys = vec![k1.id().clone()];
    let inside = SignedConfig::sign(&k1, &inside).unwrap();
    let (s, _) = network::compute_network_status(
        &at_v2,
        &Ok(inside.as_str().as_bytes().to_vec()),
        NOW_MS + 2_000,
    );
    assert_eq!(config_verified(&s.conditions).reason, "RotationConflict");
    assert_eq!(s.trusted_keys, [k2.id().as_str()]);
}

#[test]
fn an_operator_down_past_a_rotation_window_catches_up_without_re_pinning() {
    let window_end = NOW_MS + 30_000;
    let (v1, v2, v3) = rotation(window_end);
    let at_v1 = holding(&bare_network(), v1.as_str().as_bytes(), NOW_MS);
    let later = window_end + 60_000;
    // Offered only the confirmation, it cannot verify it: signed by a key it never learned.
    let (alone, _) =
        network::compute_network_status(&at_v1, &Ok(v3.as_str().as_bytes().to_vec()), later);
    let verified = config_verified(&alone.conditions);
    assert_eq!(verified.reason, "UnknownSigner");
    assert_eq!(alone.config_version, Some(1));
    // The catch-up chain carries the rotation, so the confirmation verifies.
    let caught_up = holding(&at_v1, &chain(&[&v2, &v3]), later);
    let s = caught_up.status.as_ref().unwrap();
    assert_eq!(s.config_version, Some(3));
    assert_eq!(
        s.trusted_keys,
        [NetworkKeypair::from_seed(&[2; 32]).id().as_str()]
    );
    assert!(s.retiring_keys.is_empty());
    let verified = config_verified(&s.conditions);
    assert_eq!(verified.status, "True");
    // A tampered step refuses the whole chain and keeps v1.
    let mut forged = v2.as_str().to_owned();
    forged = forged.replacen("version\\\":2,", "version\\\":9,", 1);
    assert_ne!(forged, v2.as_str(), "the step was tampered with");
    let forged = resultity_protocol::config::ConfigChain {
        network_id: NetworkId::parse("resultity-testnet").unwrap(),
        snapshots: vec![forged, v3.as_str().to_owned()],
        server_time_ms: later,
    };
    let (refused, _) =
        network::compute_network_status(&at_v1, &Ok(serde_json::to_vec(&forged).unwrap()), later);
    assert_eq!(refused.config_version, Some(1));
    let verified = config_verified(&refused.conditions);
    assert_eq!(verified.status, "False");
}

#[tokio::test]
async fn malformed_object_is_reported_not_retried() {
    use kube::core::DeserializeGuard;
    use kube::core::error_boundary::InvalidObject;
    // What a watch yields for an object that does not fit the type (e.g. an older CRD).
    let raw = json!({
        "apiVersion": "resultity.com/v1alpha1", "kind": "ResultityNode",
        "metadata": {"name": "gpu-a", "namespace": "fleet", "uid": "u-1"},
        "spec": {"networkRef": "not-an-object"}
    });
    let guard: DeserializeGuard<ResultityNode> = serde_json::from_value(raw).unwrap();
    assert!(matches!(&guard.0, Err(InvalidObject { .. })));
    let script = vec![Call::event(EVENTS, "MalformedObject").check(|b| {
        assert_eq!(b["type"], "Warning");
        assert_eq!(b["regarding"]["name"], "gpu-a");
    })];
    let action = world(script, FakeSidecar::answering(vec![]), no_source())
        .run(move |ctx| Box::pin(node::reconcile_guarded(Arc::new(guard), ctx)))
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn evicted_pod_is_replaced() {
    let n = finalized_node();
    let mut evicted = running_pod(&n);
    let st = evicted.status.as_mut().unwrap();
    st.phase = Some("Failed".into());
    st.reason = Some("Evicted".into());
    st.pod_ip = None;
    let script = node_script(
        &n,
        [
            Call::get(POD, &evicted),
            Call::new(Method::DELETE, POD).reply({
                let p = serde_json::to_value(&evicted).unwrap();
                move |_| (200, p.clone())
            }),
            Call::event(EVENTS, "PodReplaced").check(|b| {
                assert_eq!(b["type"], "Warning");
                assert!(b["note"].as_str().unwrap().contains("Evicted"));
            }),
            Call::apply_status(NODE_STATUS, &n).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Pending);
                assert_eq!(cond(&s, "PodScheduled"), ("False", "PodMissing"));
            }),
        ],
    );
    let action = run_node(n, script).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
}

#[tokio::test]
async fn api_rejection_becomes_a_condition_and_a_warning() {
    let mut n = finalized_node();
    n.status = Some(ResultityNodeStatus {
        phase: NodePhase::Pending,
        ..ResultityNodeStatus::default()
    });
    let api_message = "Pod \"gpu-a-node\" is invalid: spec.tolerations[0].operator: \
                       Unsupported value: \"Foo\": supported values: \"Equal\", \"Exists\"";
    let script = node_script(
        &n,
        [
            Call::get_missing(POD),
            Call::apply(POD).reply(move |_| {
                (
                    422,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                       "status": "Failure", "reason": "Invalid", "code": 422,
                       "message": api_message}),
                )
            }),
            Call::event(EVENTS, "PodRejected").check(move |b| {
                assert_eq!(b["type"], "Warning");
                assert!(b["note"].as_str().unwrap().contains(api_message), "{b}");
            }),
            Call::apply_status(NODE_STATUS, &n).check(move |b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Invalid);
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
                assert_eq!(
                    (ready.status.as_str(), ready.reason.as_str()),
                    ("False", "RejectedByAPIServer")
                );
                assert!(ready.message.contains(api_message), "{}", ready.message);
                assert!(ready.message.contains("HTTP 422"), "{}", ready.message);
            }),
            Call::event(EVENTS, "Invalid").check(|b| assert_eq!(b["type"], "Warning")),
        ],
    );
    let action = world(script, FakeSidecar::answering(vec![]), no_source())
        .run(reconcile_node(n))
        .await
        .expect("a rejection is reported, not retried as an error");
    // Not on every network poll: the spec must change (or the cluster) for a retry to help.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

const CACHE_CLAIM: &str = "/api/v1/namespaces/fleet/persistentvolumeclaims/gpu-a-model-cache";

fn cached_node() -> ResultityNode {
    let mut n = finalized_node();
    n.spec.model_cache = Some(
        serde_json::from_value(
            json!({"volumeClaimTemplate": {"size": "200Gi", "storageClassName": "fast-ssd"}}),
        )
        .unwrap(),
    );
    n
}

#[tokio::test]
async fn model_cache_claim_is_created_by_apply_owned_by_the_node_before_the_pod() {
    let n = cached_node();
    let uid = n.metadata.uid.clone().unwrap();
    let script = node_script(
        &n,
        [
            Call::get_missing(POD),
            Call::get_missing(CACHE_CLAIM),
            Call::apply(CACHE_CLAIM).check(move |b| {
                assert_eq!(b["kind"], "PersistentVolumeClaim");
                assert_eq!(b["metadata"]["name"], "gpu-a-model-cache");
                let owner = &b["metadata"]["ownerReferences"][0];
                assert_eq!(owner["kind"], "ResultityNode");
                assert_eq!(owner["name"], "gpu-a");
                assert_eq!(owner["uid"], uid.as_str());
                assert_eq!(owner["controller"], true);
                assert_eq!(b["spec"]["resources"]["requests"]["storage"], "200Gi");
                assert_eq!(b["spec"]["storageClassName"], "fast-ssd");
                assert_eq!(b["spec"]["accessModes"], json!(["ReadWriteOnce"]));
            }),
            Call::event(EVENTS, "CacheClaimCreated"),
            Call::apply(POD).check(|b| {
                let volumes = b["spec"]["volumes"].as_array().unwrap();
                let cache = volumes.iter().find(|v| v["name"] == "model-cache").unwrap();
                assert_eq!(
                    cache["persistentVolumeClaim"]["claimName"],
                    "gpu-a-model-cache"
                );
            }),
            Call::event(EVENTS, "PodCreated"),
            Call::apply_status(NODE_STATUS, &n)
                .check(|b| assert_eq!(status_of(b).phase, NodePhase::Pending)),
        ],
    );
    run_node(n, script).await.unwrap();

    // The next pass finds the claim it owns and leaves it alone (no write).
    let n = cached_node();
    let owned = resultity_operator::model_cache::build_cache_claim(&n).unwrap();
    let script = node_script(
        &n,
        [
            Call::get_missing(POD),
            Call::get(CACHE_CLAIM, &owned),
            Call::apply(POD),
            Call::event(EVENTS, "PodCreated"),
            Call::apply_status(NODE_STATUS, &n),
        ],
    );
    run_node(n, script).await.unwrap();
}

#[tokio::test]
async fn a_foreign_claim_of_the_cache_name_is_refused_not_adopted() {
    let n = cached_node();
    let mut foreign = resultity_operator::model_cache::build_cache_claim(&n).unwrap();
    foreign.metadata.owner_references = None;
    let script = node_script(
        &n,
        [
        Call::get_missing(POD),
        Call::get(CACHE_CLAIM, &foreign),
        // No claim write and no pod: the node is Invalid with the reason.
        Call::apply_status(NODE_STATUS, &n).check(|b| {
            let s = status_of(b);
            assert_eq!(s.phase, NodePhase::Invalid);
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
            assert_eq!(ready.reason, "InvalidSpec");
            assert!(
                ready.message.contains("PersistentVolumeClaim gpu-a-model-cache exists and does not belong to this node"),
                "{}",
                ready.message
            );
        }),
        Call::event(EVENTS, "Invalid"),
        ],
    );
    run_node(n, script).await.unwrap();
}

#[tokio::test]
async fn a_claim_the_api_server_refuses_is_a_condition() {
    let n = cached_node();
    let script = node_script(
        &n,
        [
        Call::get_missing(POD),
        Call::get_missing(CACHE_CLAIM),
        Call::apply(CACHE_CLAIM).reply(|_| {
            (
                422,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "reason": "Invalid", "code": 422,
                       "message": "storageclass.storage.k8s.io \"fast-ssd\" not found"}),
            )
        }),
        Call::apply_status(NODE_STATUS, &n).check(|b| {
            let s = status_of(b);
            assert_eq!(s.phase, NodePhase::Invalid);
            assert_eq!(cond(&s, "Ready"), ("False", "RejectedByAPIServer"));
        }),
        Call::event(EVENTS, "Invalid"),
        ],
    );
    run_node(n, script).await.unwrap();
}

#[tokio::test]
async fn fleet_member_waits_for_its_rollout_slot() {
    let mut held = finalized_node();
    held.metadata.labels = Some(
        [
            ("resultity.com/fleet".to_owned(), "f".to_owned()),
            (
                "resultity.com/rollout-step".to_owned(),
                "pending".to_owned(),
            ),
        ]
        .into(),
    );
    let live = running_pod(&held);
    held.metadata.generation = Some(3);
    held.spec.runtime.extra_args.push("--enforce-eager".into());
    held.status = Some(ResultityNodeStatus {
        phase: NodePhase::Ready,
        ..ResultityNodeStatus::default()
    });
    // Held: the out-of-date pod keeps serving; no drain, no delete.
    let sidecar = FakeSidecar::answering(vec![Ok(report())]);
    let script = node_script(
        &held,
        [
            Call::get(POD, &live),
            Call::apply_status(NODE_STATUS, &held).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Ready);
                assert_ne!(s.desired_spec_hash, s.pod_spec_hash);
                assert_eq!(
                    s.rollout_step,
                    Some(resultity_operator::crd::RolloutStep::Pending)
                );
            }),
        ],
    );
    world(script, sidecar.clone(), no_source())
        .run(reconcile_node(held.clone()))
        .await
        .unwrap();
    assert_eq!(sidecar.calls(), vec!["status 10.42.0.17:9090"]);

    // Granted (step draining): the drain starts.
    let mut granted = held;
    granted
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("resultity.com/rollout-step".into(), "draining".into());
    let sidecar = FakeSidecar::answering(vec![Ok(report())]);
    let script = node_script(
        &granted,
        [
            Call::get(POD, &live),
            Call::event(EVENTS, "Draining"),
            Call::apply_status(NODE_STATUS, &granted)
                .check(|b| assert_eq!(status_of(b).phase, NodePhase::Draining)),
        ],
    );
    world(script, sidecar.clone(), no_source())
        .run(reconcile_node(granted))
        .await
        .unwrap();
    assert_eq!(
        sidecar.calls(),
        vec!["status 10.42.0.17:9090", "drain deregister=false"]
    );
}

// ---------- fleet scenarios ----------

mod fleets {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use resultity_operator::controller::fleet;
    use resultity_operator::crd::{
        ConfigRef, NodeTemplate, ResultityFleet, ResultityFleetSpec, ResultityFleetStatus,
        RolloutStrategy,
    };

    const NODES: &str = "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes";
    const FLEET_STATUS: &str =
        "/apis/resultity.com/v1alpha1/namespaces/fleet/resultityfleets/gpus/status";
    const NODE_PATHS: [&str; 3] = [
        "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes/gpus-0",
        "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes/gpus-1",
        "/apis/resultity.com/v1alpha1/namespaces/fleet/resultitynodes/gpus-2",
    ];

    fn gpu_fleet(replicas: u32, generation: i64) -> ResultityFleet {
        let template: ResultityNode = fixture("node-vllm.yaml");
        let mut f = ResultityFleet::new(
            "gpus",
            ResultityFleetSpec {
                replicas,
                selector: [("pool".to_owned(), "a".to_owned())].into(),
                template: NodeTemplate {
                    labels: [("pool".to_owned(), "a".to_owned())].into(),
                    spec: template.spec,
                },
                strategy: RolloutStrategy {
                    max_unavailable: IntOrString::Int(1),
                    ..RolloutStrategy::default()
                },
                config_policy: Default::default(),
            },
        );
        f.metadata.namespace = Some("fleet".into());
        f.metadata.uid = Some("fleet-uid".into());
        f.metadata.generation = Some(generation);
        f.status = Some(ResultityFleetStatus {
            observed_generation: Some(generation),
            ..ResultityFleetStatus::default()
        });
        f
    }

    fn cond(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "Test".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(1_700_000_000).unwrap()),
        }
    }

    /// A fleet member as the fleet wrote it, with the status its node controller reported.
    fn member(f: &ResultityFleet, ordinal: u32, step: &str, updated: bool) -> ResultityNode {
        let mut n = resultity_operator::fleet::build_fleet_node(f, ordinal, None).unwrap();
        n.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("resultity.com/rollout-step".into(), step.into());
        n.metadata.annotations = Some(
            [(
                "resultity.com/rollout-step-since".to_owned(),
                Timestamp::from_millisecond(NOW_MS as i64 - 60_000)
                    .unwrap()
                    .to_string(),
            )]
            .into(),
        );
        n.metadata.generation = Some(1);
        n.status = Some(ResultityNodeStatus {
            observed_generation: Some(1),
            phase: NodePhase::Ready,
            desired_spec_hash: Some(if updated { "new" } else { "new2" }.into()),
            pod_spec_hash: Some("new".into()),
            applied_config: Some(ConfigRef {
                version: 7,
                digest: "sha256:aa".into(),
            }),
            conditions: vec![
                cond("Ready", "True"),
                cond("NetworkRoutable", "True"),
                cond("SelfTestPassed", "True"),
            ],
            ..ResultityNodeStatus::default()
        });
        n
    }

    /// [`member`] for each of `ordinals`, all at the same step.
    fn members(
        f: &ResultityFleet,
        ordinals: std::ops::Range<u32>,
        step: &str,
        updated: bool,
    ) -> Vec<ResultityNode> {
        ordinals.map(|o| member(f, o, step, updated)).collect()
    }

    fn list(items: Vec<ResultityNode>) -> Value {
        json!({"apiVersion": "resultity.com/v1alpha1", "kind": "ResultityNodeList",
               "metadata": {"resourceVersion": "9"}, "items": items})
    }

    /// A fleet reconcile's script: it lists the members `nodes`, reads the network, then
    /// makes the calls `then`.
    fn fleet_script(nodes: Vec<ResultityNode>, then: impl IntoIterator<Item = Call>) -> Vec<Call> {
        [Call::get(NODES, list(nodes)), network_read()]
            .into_iter()
            .chain(then)
            .collect()
    }

    /// The fleet's status write, whose status must pass `check`.
    fn fleet_status_is(
        f: &ResultityFleet,
        check: impl Fn(&ResultityFleetStatus) + Send + 'static,
    ) -> Call {
        Call::apply_status(FLEET_STATUS, f).check(move |b| check(&fleet_status(b)))
    }

    /// Reconciles `f` against `script` (no sidecar is asked anything).
    async fn run_fleet(f: ResultityFleet, script: Vec<Call>) -> Action {
        world(script, FakeSidecar::answering(vec![]), no_source())
            .run(reconcile_fleet(f))
            .await
            .unwrap()
    }

    fn apply_member(path: &'static str, step: Option<&'static str>) -> Call {
        Call::apply(path).check(move |b| {
            assert_eq!(b["kind"], "ResultityNode");
            assert_eq!(
                b["metadata"]["ownerReferences"][0]["kind"],
                "ResultityFleet"
            );
            assert_eq!(b["metadata"]["ownerReferences"][0]["controller"], true);
            assert_eq!(b["metadata"]["labels"]["resultity.com/fleet"], "gpus");
            assert_eq!(b["metadata"]["labels"]["pool"], "a");
            match step {
                Some(s) => assert_eq!(b["metadata"]["labels"]["resultity.com/rollout-step"], s),
                None => assert!(
                    b["metadata"]["labels"]
                        .get("resultity.com/rollout-step")
                        .is_none()
                ),
            }
        })
    }

    fn fleet_status(body: &Value) -> ResultityFleetStatus {
        serde_json::from_value(body["status"].clone()).unwrap()
    }

    fn fcond<'a>(s: &'a ResultityFleetStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn reconcile_fleet(
        f: ResultityFleet,
    ) -> impl FnOnce(Arc<Context>) -> BoxFuture<'static, resultity_operator::Result<Action>> {
        move |ctx| Box::pin(fleet::reconcile(Arc::new(f), ctx))
    }

    #[tokio::test]
    async fn create_makes_ordinal_nodes() {
        let f = gpu_fleet(2, 1);
        let script = fleet_script(
            vec![],
            [
                apply_member(NODE_PATHS[0], None),
                apply_member(NODE_PATHS[1], None),
                Call::event(EVENTS, "ScaledUp").check(|b| {
                    assert_eq!(b["note"], "created nodes gpus-0, gpus-1");
                }),
                fleet_status_is(&f, |s| {
                    assert_eq!(s.observed_generation, Some(1));
                    assert!(s.target_config_digest.is_some());
                    assert_eq!(fcond(s, "Paused"), ("False", "NotPaused"));
                }),
            ],
        );
        run_fleet(f, script).await;
    }

    #[tokio::test]
    async fn scale_down_deletes_the_highest_ordinals_first() {
        let f = gpu_fleet(1, 1);
        let nodes = members(&f, 0..3, "done", true);
        let gone: Vec<Value> = nodes
            .iter()
            .map(|n| serde_json::to_value(n).unwrap())
            .collect();
        let gone2 = gone.clone();
        let script = fleet_script(
            nodes,
            [
                Call::new(Method::DELETE, NODE_PATHS[2]).reply(move |_| (200, gone[2].clone())),
                Call::event(EVENTS, "ScaledDown")
                    .check(|b| assert!(b["note"].as_str().unwrap().contains("gpus-2"))),
                Call::new(Method::DELETE, NODE_PATHS[1]).reply(move |_| (200, gone2[1].clone())),
                Call::event(EVENTS, "ScaledDown")
                    .check(|b| assert!(b["note"].as_str().unwrap().contains("gpus-1"))),
                // gpus-0 is as desired: no write.
                fleet_status_is(&f, |s| {
                    assert_eq!(
                        (s.replicas, s.ready, s.updated, s.unavailable),
                        (1, 1, 1, 0)
                    );
                    assert_eq!(s.applied_digests[0].nodes, 1);
                    assert_eq!(fcond(s, "Progressing"), ("True", "RolloutComplete"));
                    assert_eq!(fcond(s, "Available"), ("True", "MinimumNodesAvailable"));
                }),
            ],
        );
        run_fleet(f, script).await;
    }

    #[tokio::test]
    async fn template_change_rolls_one_node_at_a_time_highest_first() {
        // Round 1: the new template goes to every node; their steps stay (done): the nodes
        // hold their pods until granted.
        let mut f = gpu_fleet(3, 2);
        f.spec.template.spec.runtime.extra_args = vec!["--enforce-eager".into()];
        let old = gpu_fleet(3, 1);
        let nodes = members(&old, 0..3, "done", true);
        let script = fleet_script(
            nodes,
            [
                apply_member(NODE_PATHS[0], Some("done")).check(|b| {
                    assert_eq!(
                        b["spec"]["runtime"]["extraArgs"],
                        json!(["--enforce-eager"])
                    );
                }),
                apply_member(NODE_PATHS[1], Some("done")),
                apply_member(NODE_PATHS[2], Some("done")),
                Call::apply_status(FLEET_STATUS, &f),
            ],
        );
        run_fleet(f.clone(), script).await;

        // Round 2: the nodes report they are out of date; with maxUnavailable 1 only the
        // highest ordinal is granted its slot; the others wait as pending.
        let nodes = members(&f, 0..3, "done", false);
        let script = fleet_script(
            nodes,
            [
                apply_member(NODE_PATHS[0], Some("pending")),
                apply_member(NODE_PATHS[1], Some("pending")),
                apply_member(NODE_PATHS[2], Some("draining")),
                fleet_status_is(&f, |s| {
                    assert_eq!(s.unavailable, 1);
                    assert_eq!(s.updated, 0);
                    assert_eq!(fcond(s, "Progressing"), ("True", "RollingOut"));
                    let last = s.last_steps.last().unwrap();
                    assert_eq!(
                        (last.node.as_str(), last.step),
                        ("gpus-2", resultity_operator::crd::RolloutStep::Draining)
                    );
                }),
                Call::event(EVENTS, "RolloutBatch")
                    .check(|b| assert!(b["note"].as_str().unwrap().contains("gpus-2"), "{b}")),
            ],
        );
        let action = run_fleet(f, script).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn paused_fleet_grants_nothing_until_resumed() {
        let mut f = gpu_fleet(3, 2);
        f.spec.strategy.paused = true;
        let nodes = members(&f, 0..3, "pending", false);
        let script = fleet_script(
            nodes.clone(),
            [fleet_status_is(&f, |s| {
                assert_eq!(fcond(s, "Paused"), ("True", "Paused"));
                assert_eq!(fcond(s, "Progressing"), ("False", "RolloutPaused"));
                assert_eq!(s.unavailable, 0);
            })],
        );
        run_fleet(f.clone(), script).await;

        f.spec.strategy.paused = false;
        let script = fleet_script(
            nodes,
            [
                apply_member(NODE_PATHS[2], Some("draining")),
                fleet_status_is(&f, |s| assert_eq!(fcond(s, "Paused").0, "False")),
                Call::event(EVENTS, "RolloutBatch"),
            ],
        );
        run_fleet(f, script).await;
    }

    #[tokio::test]
    async fn scale_up_adds_the_lowest_free_ordinals_and_keeps_the_rest() {
        let f = gpu_fleet(3, 2);
        let nodes = vec![member(&f, 0, "done", true)];
        let script = fleet_script(
            nodes,
            [
                // gpus-0 is as desired: no write; the new members start with no step.
                apply_member(NODE_PATHS[1], None),
                apply_member(NODE_PATHS[2], None),
                Call::event(EVENTS, "ScaledUp").check(|b| {
                    assert_eq!(b["note"], "created nodes gpus-1, gpus-2");
                }),
                fleet_status_is(&f, |s| {
                    assert_eq!(s.ready, 1);
                    // The two new nodes are not serving yet: 1 of 3 is below 3 - maxUnavailable 1.
                    assert_eq!(s.unavailable, 2);
                    assert_eq!(fcond(s, "Available"), ("False", "TooFewNodesAvailable"));
                }),
            ],
        );
        run_fleet(f, script).await;
    }

    #[tokio::test]
    async fn a_wrong_known_answer_fails_the_rollout_and_stops_it() {
        let f = gpu_fleet(3, 2);
        let mut nodes = members(&f, 0..2, "pending", false);
        // gpus-2 runs the new pod, Ready and routable, but its model answers wrongly.
        let mut validating = member(&f, 2, "validating", true);
        let why = r#"qwen@main: known-answer self-test failed: choices[0].text is " Lyon", expected " Paris""#;
        if let Some(st) = validating.status.as_mut() {
            st.conditions[2] = Condition {
                status: "False".into(),
                reason: "KnownAnswerMismatch".into(),
                message: why.into(),
                ..cond("SelfTestPassed", "False")
            };
        }
        nodes.push(validating);
        let script = fleet_script(
            nodes,
            [
                // Only the failing node is written: nobody else is granted a slot.
                apply_member(NODE_PATHS[2], Some("failed")),
                fleet_status_is(&f, |s| {
                    assert_eq!(fcond(s, "Progressing"), ("False", "RolloutFailed"));
                    let last = s.last_steps.last().unwrap();
                    assert_eq!(
                        (last.node.as_str(), last.step),
                        ("gpus-2", resultity_operator::crd::RolloutStep::Failed)
                    );
                    assert!(
                        last.message.contains(r#"expected " Paris""#),
                        "{}",
                        last.message
                    );
                }),
                Call::event(EVENTS, "RolloutFailed").check(move |b| {
                    assert_eq!(b["type"], "Warning");
                    let note = b["note"].as_str().unwrap();
                    assert_eq!(note, format!("node gpus-2: {why}; the rollout stopped"));
                }),
            ],
        );
        let action = run_fleet(f, script).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }
}

// ---------- DRA on a server that may not serve it ----------

fn dra_node() -> ResultityNode {
    let mut n = finalized_node();
    n.spec.gpu.visibility = resultity_operator::crd::GpuVisibility::Dra;
    n.spec.gpu.resource_claim_template_name = Some("single-gpu".into());
    n
}

/// `GET /apis`, with `resource.k8s.io` among the groups or not.
fn api_groups(dra: bool) -> Call {
    let group = |name: &str, version: &str| {
        let gv = format!("{name}/{version}");
        json!({"name": name, "versions": [{"groupVersion": gv, "version": version}],
               "preferredVersion": {"groupVersion": gv, "version": version}})
    };
    let mut groups = vec![group("apps", "v1"), group("resultity.com", "v1alpha1")];
    if dra {
        groups.push(group("resource.k8s.io", "v1beta1"));
    }
    Call::get(
        "/apis",
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
    )
}

/// A default Kubernetes 1.32 server serves no `resource.k8s.io` and would accept the pod with
/// its `resourceClaims` dropped: the node is refused with a reason and a warning instead, and
/// no pod is created.
#[tokio::test]
async fn dra_node_on_a_server_without_dra_is_refused_not_created_without_its_claim() {
    let mut n = dra_node();
    n.status = Some(ResultityNodeStatus {
        phase: NodePhase::Pending,
        ..ResultityNodeStatus::default()
    });
    let script = node_script(
        &n,
        [
            Call::get_missing(POD),
            api_groups(false),
            Call::apply_status(NODE_STATUS, &n).check(|b| {
                let s = status_of(b);
                assert_eq!(s.phase, NodePhase::Invalid);
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
                assert_eq!(
                    (ready.status.as_str(), ready.reason.as_str()),
                    ("False", "UnsupportedByCluster")
                );
                assert!(
                    ready.message.contains("serves no resource.k8s.io version"),
                    "{}",
                    ready.message
                );
            }),
            Call::event(EVENTS, "Invalid").check(|b| {
                assert_eq!(b["type"], "Warning");
                assert!(
                    b["note"].as_str().unwrap().contains("resource.k8s.io"),
                    "{b}"
                );
            }),
        ],
    );
    let action = run_node(n, script).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
}

/// Where DRA is served the pod is created with its claim, and the answer is remembered: the
/// next reconcile does not ask again.
#[tokio::test]
async fn dra_node_on_a_server_with_dra_gets_its_claim_and_asks_once() {
    let n = dra_node();
    let created = Arc::new(Mutex::new(None::<Value>));
    let keep = created.clone();
    let mut script = node_script(
        &n,
        [
            Call::get_missing(POD),
            api_groups(true),
            Call::apply(POD)
                .check(|b| {
                    assert_eq!(b["spec"]["resourceClaims"][0]["name"], "gpu", "{b}");
                    assert_eq!(
                        b["spec"]["resourceClaims"][0]["resourceClaimTemplateName"],
                        "single-gpu"
                    );
                })
                .check(move |b| *keep.lock().unwrap() = Some(b.clone())),
            Call::event(EVENTS, "PodCreated"),
            Call::apply_status(NODE_STATUS, &n),
        ],
    );
    let served = created.clone();
    script.extend(node_script(
        &n,
        [
            Call::new(Method::GET, POD)
                .reply(move |_| (200, served.lock().unwrap().clone().unwrap())),
            Call::apply_status(NODE_STATUS, &n),
        ],
    ));
    let (first, second) = (n.clone(), n);
    world(script, FakeSidecar::answering(vec![]), no_source())
        .run(move |ctx| {
            Box::pin(async move {
                node::reconcile(Arc::new(first), ctx.clone()).await.unwrap();
                node::reconcile(Arc::new(second), ctx).await.unwrap();
            })
        })
        .await;
}
