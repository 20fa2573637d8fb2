//! Register → heartbeat → WebSocket auth → job pushed → signed result → confirmed, through
//! every caller entry point.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use resultity_protocol::ErrorCode;
use resultity_protocol::messages::http::{ConfigDigestResponse, paths};
use resultity_protocol::messages::ws::{NetworkMessage, NodeMessage};

#[tokio::test]
async fn node_serves_an_openai_request_end_to_end() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 4);

    let reg = node.register().await;
    assert_eq!(reg.protocol_version, 1);
    assert_eq!(reg.session_path, paths::SESSION);
    let hb = node.heartbeat().await;
    // Not routable before its session is open, and the verdict says why.
    assert!(!hb.verdict.eligible);
    assert_eq!(hb.verdict.reason.as_deref(), Some("no WebSocket session"));
    assert_eq!(hb.timing.ack_timeout_ms, 300);
    let digest: ConfigDigestResponse = http()
        .get(format!("{}{}", io.base_url(), paths::CONFIG_DIGEST))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hb.config, digest.config);

    let mut ws = WsClient::connect(&node, 4).await;
    assert_eq!(ws.welcome.resumed_jobs, 0);
    let hb = node.heartbeat().await;
    assert!(hb.verdict.eligible, "{:?}", hb.verdict);
    assert!(hb.verdict.score > 0);

    // The caller's request waits while the node answers by hand.
    let base = io.base_url();
    let caller = tokio::spawn(async move {
        http()
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body())
            .send()
            .await
            .unwrap()
    });
    let job = ws.recv_job().await;
    assert_eq!(job.lease_epoch, 1);
    assert_eq!(job.model, model());
    assert_eq!(job.request["messages"][0]["content"], "hi");
    ws.send(NodeMessage::JobAck {
        job_id: job.job_id.clone(),
        lease_epoch: 1,
    })
    .await;
    let result = result_for(&ws.node_id, &job);
    let expected_output = result.output.clone();
    let frame = ws.send(NodeMessage::JobResult(result)).await;
    match ws.recv().await {
        Ok(NetworkMessage::ResultConfirm {
            job_id,
            lease_epoch,
        }) => {
            assert_eq!(job_id, job.job_id);
            assert_eq!(lease_epoch, 1);
        }
        other => panic!("expected result.confirm, got {other:?}"),
    }

    let resp = caller.await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-resultity-job-id"], job.job_id.as_str());
    assert_eq!(h["x-resultity-node-id"], node.key.id().as_str());
    assert_eq!(h["x-resultity-verified"], "true");
    assert!(h.contains_key("x-resultity-server-time-ms"));
    assert_eq!(resp.text().await.unwrap(), expected_output);

    // The same result again (a node resending its outbox) is confirmed again, nothing else.
    let mut dup = ws.session.clone();
    let again = dup
        .seal(NodeMessage::JobResult(result_for(&ws.node_id, &job)))
        .unwrap();
    ws.session = dup;
    ws.send_raw(again).await;
    assert!(matches!(
        ws.recv().await,
        Ok(NetworkMessage::ResultConfirm { .. })
    ));
    // The exact same frame is a replay.
    ws.send_raw(frame).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::Replayed);

    let view: serde_json::Value = http()
        .get(format!("{}/v1/jobs/{}", io.base_url(), job.job_id.as_str()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["node_id"], node.key.id().as_str());
    assert_eq!(view["verified"], true);

    let models: serde_json::Value = http()
        .get(format!("{}/v1/models", io.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);

    let n = node_json(&io, node.key.id()).await;
    assert_eq!(n["completed"], 1);
    assert_eq!(n["outstanding"], 0);
    let metrics = http()
        .get(format!("{}/metrics", io.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("resultity_io_jobs_completed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("resultity_io_duplicate_results_total 1"),
        "{metrics}"
    );
    for name in [
        "resultity_io_nodes_connected 1",
        "resultity_io_nodes_eligible 1",
        "resultity_io_jobs_queued 0",
        "resultity_io_jobs_in_flight 0",
        "resultity_io_jobs_failed_total 0",
        "resultity_io_jobs_reassigned_total 0",
        "resultity_io_dispatch_latency_seconds_count 1",
        "resultity_io_end_to_end_latency_seconds_count 1",
        "resultity_io_rejections_total{channel=\"ws\",reason=\"replayed\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    io.shutdown().await;
}

#[tokio::test]
async fn generic_job_api_completions_and_kserve_are_served() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 2);
    let runner = spawn_runtime(
        node.join().await,
        Behavior {
            silent: false,
            latency_ms: 5,
        },
    );
    let c = http();

    let resp = c
        .post(format!("{}/v1/jobs", io.base_url()))
        .json(&serde_json::json!({"model": MODEL, "kind": "infer", "request": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["node_id"], node.key.id().as_str());
    assert_eq!(body["verified"], true);
    assert_eq!(body["output"]["object"], "chat.completion");

    let resp = c
        .post(format!("{}/v1/completions", io.base_url()))
        .json(&serde_json::json!({"model": MODEL, "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-resultity-verified"], "true");

    let resp = c
        .post(format!("{}/v2/models/{MODEL}/infer", io.base_url()))
        .json(&serde_json::json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-resultity-verified"], "true");

    let resp = c
        .post(format!("{}/v1/chat/completions", io.base_url()))
        .json(&serde_json::json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "not_found");
    assert!(err["server_time_ms"].as_u64().unwrap() > 0);

    assert_eq!(runner.stats.lock().unwrap().completed, 3);
    runner.stop();
    io.shutdown().await;
}
