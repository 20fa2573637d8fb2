//! Lease acquisition and renewal against a scripted API server (tower-test): the calls made and
//! the decision taken for an absent lease, one held by another replica, our own lease, and a
//! lost race.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Api, Client};
use resultity_operator::leader::{LeaseConfig, Observer, release, try_hold};
use serde_json::{Value, json};
use tower_test::mock;

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/resultity-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

/// One expected call: method, path, and the answer (status, body).
type Step = (Method, &'static str, u16, Value);

/// Serves `script` in order and returns the bodies the client sent; panics on any deviation.
async fn serve(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    script: Vec<Step>,
) -> Vec<Value> {
    let mut sent = Vec::new();
    for (method, path, status, answer) in script {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("expected call never came")
            .expect("client gone");
        assert_eq!(req.method(), method);
        assert_eq!(req.uri().path(), path);
        let bytes = req.into_body().collect_bytes().await.unwrap();
        sent.push(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }
    sent
}

fn setup() -> (
    Api<Lease>,
    mock::Handle<Request<Body>, Response<Body>>,
    LeaseConfig,
) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "ops");
    let cfg = LeaseConfig {
        name: "resultity-operator".into(),
        identity: "replica-a".into(),
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        renew_every: Duration::from_secs(3),
    };
    (Api::namespaced(client, "ops"), handle, cfg)
}

fn lease(holder: &str, renewed: Timestamp) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "resultity-operator", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed.to_string()}
    })
}

/// A lease of 1 s, so the test can let it expire on its own clock.
fn short_lease(holder: &str, renewed: Timestamp) -> Value {
    let mut l = lease(holder, renewed);
    l["spec"]["leaseDurationSeconds"] = json!(1);
    l
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

#[tokio::test]
async fn absent_lease_is_created_with_our_identity() {
    let (api, handle, cfg) = setup();
    let server = tokio::spawn(serve(
        handle,
        vec![
            (Method::GET, LEASE, 404, not_found()),
            (
                Method::POST,
                LEASES,
                201,
                lease("replica-a", Timestamp::now()),
            ),
        ],
    ));
    assert!(
        try_hold(&api, &cfg, &mut Observer::default())
            .await
            .unwrap()
    );
    let sent = server.await.unwrap();
    assert_eq!(sent[1]["spec"]["holderIdentity"], "replica-a");
    assert_eq!(sent[1]["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(sent[1]["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn fresh_lease_of_another_replica_is_left_alone() {
    let (api, handle, cfg) = setup();
    let server = tokio::spawn(serve(
        handle,
        vec![(
            Method::GET,
            LEASE,
            200,
            lease("replica-b", Timestamp::now()),
        )],
    ));
    assert!(
        !try_hold(&api, &cfg, &mut Observer::default())
            .await
            .unwrap()
    );
    server.await.unwrap();
}

#[tokio::test]
async fn own_lease_is_renewed_and_an_expired_one_taken_over() {
    let (api, handle, cfg) = setup();
    // Another holder's renewTime an hour "ago" by our clock: clocks differ, so that alone
    // does not expire it. Only a record unchanged for the lease duration by our clock does.
    let stale = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3600);
    let server = tokio::spawn(serve(
        handle,
        vec![
            (
                Method::GET,
                LEASE,
                200,
                lease("replica-a", Timestamp::now()),
            ),
            (
                Method::PUT,
                LEASE,
                200,
                lease("replica-a", Timestamp::now()),
            ),
            (Method::GET, LEASE, 200, short_lease("replica-b", stale)),
            (Method::GET, LEASE, 200, short_lease("replica-b", stale)),
            (
                Method::PUT,
                LEASE,
                200,
                lease("replica-a", Timestamp::now()),
            ),
        ],
    ));
    let mut seen = Observer::default();
    assert!(try_hold(&api, &cfg, &mut seen).await.unwrap());
    assert!(
        !try_hold(&api, &cfg, &mut seen).await.unwrap(),
        "first sight"
    );
    // The lease lasts 1 s: let that pass on our clock with the record unchanged.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        try_hold(&api, &cfg, &mut seen).await.unwrap(),
        "unchanged for the lease duration"
    );
    let sent = server.await.unwrap();
    // Replace carries the resourceVersion read, so a concurrent writer loses with 409.
    assert_eq!(sent[1]["metadata"]["resourceVersion"], "7");
    assert_eq!(sent[4]["spec"]["holderIdentity"], "replica-a");
}

#[tokio::test]
async fn shutdown_releases_our_lease_only() {
    let (api, handle, cfg) = setup();
    let server = tokio::spawn(serve(
        handle,
        vec![
            (
                Method::GET,
                LEASE,
                200,
                lease("replica-a", Timestamp::now()),
            ),
            (Method::PUT, LEASE, 200, lease("", Timestamp::now())),
            (
                Method::GET,
                LEASE,
                200,
                lease("replica-b", Timestamp::now()),
            ),
        ],
    ));
    assert!(release(&api, &cfg).await.unwrap());
    assert!(!release(&api, &cfg).await.unwrap(), "not ours: left alone");
    let sent = server.await.unwrap();
    assert!(
        sent[1]["spec"].get("holderIdentity").is_none(),
        "{}",
        sent[1]
    );
    assert_eq!(sent[1]["metadata"]["resourceVersion"], "7");
}

#[tokio::test]
async fn lost_race_is_not_leadership() {
    let (api, handle, cfg) = setup();
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"});
    let server = tokio::spawn(serve(
        handle,
        vec![
            (Method::GET, LEASE, 404, not_found()),
            (Method::POST, LEASES, 409, conflict.clone()),
            (
                Method::GET,
                LEASE,
                200,
                lease("replica-a", Timestamp::now()),
            ),
            (Method::PUT, LEASE, 409, conflict),
        ],
    ));
    assert!(
        !try_hold(&api, &cfg, &mut Observer::default())
            .await
            .unwrap()
    );
    assert!(
        !try_hold(&api, &cfg, &mut Observer::default())
            .await
            .unwrap()
    );
    server.await.unwrap();
}
