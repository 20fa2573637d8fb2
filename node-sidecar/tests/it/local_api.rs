//! The sidecar's local API over real HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::Arc;

use resultity_protocol::messages::{
    GpuReport, ModelRef, ModelState, ModelStatus, NodePhase, RuntimeKind, RuntimeReport, Software,
};
use resultity_protocol::status::{
    ConnectionState, ConnectionStatus, JobCounters, NodeStatus, STATUS_FORMAT,
};
use resultity_protocol::{NetworkId, NodeKeypair};
use resultity_sidecar::api::{ApiState, router};
use serde_json::Value;

fn status() -> NodeStatus {
    NodeStatus {
        format: STATUS_FORMAT,
        node_id: NodeKeypair::from_seed(&[1; 32]).id().clone(),
        network_id: NetworkId::parse("testnet").unwrap(),
        phase: NodePhase::Starting,
        registered: false,
        connection: ConnectionStatus::default(),
        applied_config: None,
        network_config: None,
        config_error: None,
        desired_runtime_image: None,
        outbox_error: None,
        models: vec![],
        gpu: GpuReport::default(),
        runtime: RuntimeReport {
            kind: RuntimeKind::Vllm,
            ready: false,
            reason: Some("starting".into()),
            running: None,
            waiting: None,
            kv_cache_usage_permille: None,
            generation_tokens_total: None,
        },
        jobs: JobCounters::default(),
        last_heartbeat_ms: None,
        verdict: None,
        draining: false,
        drained: false,
        software: Software::default(),
    }
}

async fn serve(state: Arc<ApiState>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

/// GETs `url` without a token.
async fn get(c: &reqwest::Client, url: String) -> reqwest::Response {
    c.get(url).send().await.unwrap()
}

#[tokio::test]
async fn probes_status_metrics_and_drain() {
    let state = ApiState::new(status(), "s3cret-token".into());
    let base = serve(state.clone()).await;
    let c = reqwest::Client::new();

    assert_eq!(get(&c, format!("{base}/healthz")).await.status(), 200);
    let r = get(&c, format!("{base}/readyz")).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert_eq!(
        problems[3], "no model is servable: no network config applied yet",
        "{problems:?}"
    );

    let model = ModelRef {
        id: "m".into(),
        revision: "r".into(),
    };
    state.update(|s| {
        s.registered = true;
        s.connection.state = ConnectionState::Connected;
        s.runtime.ready = true;
        s.runtime.reason = None;
        s.models = vec![ModelStatus {
            model: model.clone(),
            state: ModelState::Inactive,
            reason: Some("needs 8192 MiB of GPU memory, node has 0 MiB".into()),
            self_test: None,
        }];
    });
    // Everything up but no model servable: not ready, with the model's reason.
    let body: Value = get(&c, format!("{base}/readyz"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(
        body["problems"],
        serde_json::json!([
            "no model is servable: m inactive: needs 8192 MiB of GPU memory, node has 0 MiB"
        ])
    );
    // A GPU required but not visible: said plainly.
    state.readiness.set_gpu_required(true);
    state.update(|s| {
        s.models[0].state = ModelState::Active;
        s.models[0].reason = None;
        s.gpu.reason = Some("NVML unavailable: library not found".into());
    });
    let body: Value = get(&c, format!("{base}/readyz"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["problems"],
        serde_json::json!(["no GPU visible to the sidecar: NVML unavailable: library not found"])
    );
    // GPU checks off (the explicit opt-out): ready.
    state.readiness.set_gpu_required(false);
    state.update(|s| s.phase = NodePhase::Ready);
    assert_eq!(get(&c, format!("{base}/readyz")).await.status(), 200);

    // /status needs the token, exactly.
    assert_eq!(get(&c, format!("{base}/status")).await.status(), 401);
    let wrong = c
        .get(format!("{base}/status"))
        .bearer_auth("s3cret-tokem")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = c
        .get(format!("{base}/status"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let doc: NodeStatus = ok.json().await.unwrap();
    assert_eq!(doc.phase, NodePhase::Ready);
    assert_eq!(&doc.node_id, NodeKeypair::from_seed(&[1; 32]).id());

    state.metrics.job("completed");
    state.metrics.in_flight.set(3);
    let text = get(&c, format!("{base}/metrics"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("resultity_sidecar_jobs_total{outcome=\"completed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("resultity_sidecar_jobs_in_flight 3"),
        "{text}"
    );

    // Drain: refused without the token, then signalled.
    let mut rx = state.drain.subscribe();
    assert_eq!(
        c.post(format!("{base}/drain"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(!*rx.borrow());
    assert_eq!(
        c.post(format!("{base}/drain"))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    rx.changed().await.unwrap();
    assert!(*rx.borrow());
}

#[tokio::test]
async fn empty_token_disables_admin_endpoints() {
    let state = ApiState::new(status(), String::new());
    let base = serve(state).await;
    let c = reqwest::Client::new();
    let r = c
        .get(format!("{base}/status"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
