//! Scheduler behaviour seen from outside: reassignment away from a silent node and its
//! deprioritization, credits under load, resume, heartbeat exclusion, suspension and
//! cooldown, drain.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use resultity_protocol::messages::FailCode;
use resultity_protocol::messages::ws::{NetworkMessage, NodeMessage};

#[tokio::test]
async fn silent_node_loses_the_job_and_is_deprioritized() {
    let io = start(|_| {}).await;
    let silent = TestNode::new(&io, 2);
    let silent_rt = spawn_runtime(
        silent.join().await,
        Behavior {
            silent: true,
            latency_ms: 0,
        },
    );
    let started = Instant::now();
    let caller = call(&io);
    eventually("job pushed to the silent node", || async {
        silent_rt.assigned() == 1
    })
    .await;

    let good = TestNode::new(&io, 2);
    let good_rt = spawn_runtime(
        good.join().await,
        Behavior {
            silent: false,
            latency_ms: 1,
        },
    );
    let resp = caller.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-resultity-node-id"],
        good.key.id().as_str()
    );
    // Ack timeout (300 ms) plus one tick (20 ms), with slack for a loaded machine.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(300 + 20 + 1000),
        "{elapsed:?}"
    );

    let s = node_json(&io, silent.key.id()).await;
    let g = node_json(&io, good.key.id()).await;
    assert!(s["penalty"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["penalty_reason"], "ack timeout");
    assert_eq!(s["failed"], 1);
    assert_eq!(g["penalty"], 0);
    assert!(
        s["score"].as_u64().unwrap() < g["score"].as_u64().unwrap(),
        "{s} vs {g}"
    );

    // The next jobs are all served by the healthy node. The silent one is still drawn, at
    // e^-6 of the healthy node's weight (its penalty costs it 120 points): one of the 5 about
    // 1 % of the time (and reassigned at its ack timeout), two practically never.
    for _ in 0..5 {
        let resp = call(&io).await.unwrap();
        assert_eq!(
            resp.headers()["x-resultity-node-id"],
            good.key.id().as_str()
        );
    }
    assert!(silent_rt.assigned() <= 2, "{}", silent_rt.assigned());
    assert!(io.state().metrics.jobs_reassigned.get() <= 2);
    silent_rt.stop();
    good_rt.stop();
    io.shutdown().await;
}

#[tokio::test]
async fn credits_are_never_exceeded_under_load() {
    // A generous ack timeout: this test is about credits, not reassignment, and a loaded
    // two-core CI machine must not turn slow acks into reassignments.
    let io = start(|s| s.network_config.timing.ack_timeout_ms = 3_000).await;
    let mut runners = Vec::new();
    for max in [1u32, 2, 4] {
        let node = TestNode::new(&io, max);
        runners.push((
            max,
            spawn_runtime(
                node.join().await,
                Behavior {
                    silent: false,
                    latency_ms: 15,
                },
            ),
        ));
    }
    let calls: Vec<_> = (0..60).map(|_| call(&io)).collect();
    for c in calls {
        assert_eq!(c.await.unwrap().status(), 200);
    }
    let mut total = 0;
    for (max, rt) in &runners {
        {
            let s = rt.stats.lock().unwrap();
            assert!(
                s.max_in_flight <= *max,
                "node with {max} credits ran {} at once",
                s.max_in_flight
            );
            assert!(s.errors.is_empty(), "{:?}", s.errors);
            total += s.completed;
        }
        let view = node_json(&io, &rt.node_id).await;
        assert!(
            view["max_outstanding_seen"].as_u64().unwrap() <= u64::from(*max),
            "{view}"
        );
    }
    assert_eq!(total, 60);
    // Concurrency is used, not one job at a time: the 4-credit node ran more than one.
    assert!(runners[2].1.stats.lock().unwrap().max_in_flight > 1);
    for (_, rt) in runners {
        rt.stop();
    }
    io.shutdown().await;
}

#[tokio::test]
async fn reconnect_within_resume_window_resends_unacked_jobs() {
    let io = start(|s| {
        s.network_config.timing.ack_timeout_ms = 2_000;
        s.network_config.timing.resume_window_ms = 5_000;
    })
    .await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    let caller = call(&io);
    let job = ws.recv_job().await;
    drop(ws); // connection lost before the ack
    eventually("session gone", || async {
        io.state().core().stats().connected == 0
    })
    .await;

    let mut ws = WsClient::connect(&node, 1).await;
    assert_eq!(ws.welcome.resumed_jobs, 1);
    let again = ws.recv_job().await;
    assert_eq!(
        (again.job_id.clone(), again.lease_epoch),
        (job.job_id.clone(), job.lease_epoch)
    );
    ws.send(NodeMessage::JobAck {
        job_id: again.job_id.clone(),
        lease_epoch: again.lease_epoch,
    })
    .await;
    ws.send(NodeMessage::JobResult(result_for(&ws.node_id, &again)))
        .await;
    assert_eq!(caller.await.unwrap().status(), 200);
    io.shutdown().await;
}

#[tokio::test]
async fn work_of_a_node_gone_past_the_resume_window_is_reassigned() {
    let io = start(|s| {
        s.network_config.timing.ack_timeout_ms = 5_000;
        s.network_config.timing.resume_window_ms = 200;
    })
    .await;
    let gone = TestNode::new(&io, 1);
    let mut ws = gone.join().await;
    let caller = call(&io);
    let job = ws.recv_job().await;
    ws.send(NodeMessage::JobAck {
        job_id: job.job_id.clone(),
        lease_epoch: job.lease_epoch,
    })
    .await;
    drop(ws);
    let other = TestNode::new(&io, 1);
    let rt = spawn_runtime(
        other.join().await,
        Behavior {
            silent: false,
            latency_ms: 1,
        },
    );
    let resp = caller.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-resultity-node-id"],
        other.key.id().as_str()
    );
    rt.stop();
    io.shutdown().await;
}

#[tokio::test]
async fn missed_heartbeats_exclude_until_the_next_one() {
    let io = start(|s| s.network_config.timing.heartbeat_interval_ms = 100).await;
    let node = TestNode::new(&io, 1);
    let rt = spawn_runtime(
        node.join().await,
        Behavior {
            silent: false,
            latency_ms: 1,
        },
    );
    eventually("excluded after three missed intervals", || async {
        let n = node_json(&io, node.key.id()).await;
        n["eligible"] == false
            && n["reason"]
                .as_str()
                .unwrap_or("")
                .contains("heartbeat missed")
    })
    .await;
    let resp = call(&io).await.unwrap();
    assert_eq!(resp.status(), 503);
    let models: serde_json::Value = http()
        .get(format!("{}/v1/models", io.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 0);

    let hb = node.heartbeat().await;
    assert!(hb.verdict.eligible, "{:?}", hb.verdict);
    assert_eq!(call(&io).await.unwrap().status(), 200);
    rt.stop();
    io.shutdown().await;
}

#[tokio::test]
async fn repeated_failures_suspend_a_node_until_cooldown() {
    let io = start(|s| {
        s.scheduler.exclude_after_failures = 2;
        s.scheduler.exclusion_cooldown_ms = 400;
        // Every failure its own incident: this test is about the threshold.
        s.scheduler.incident_window_ms = 0;
    })
    .await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    for _ in 0..2 {
        let caller = call(&io);
        let job = ws.recv_job().await;
        ws.send(NodeMessage::JobFail {
            job_id: job.job_id,
            lease_epoch: job.lease_epoch,
            code: FailCode::RuntimeError,
            reason: "CUDA error".into(),
            refusal: None,
        })
        .await;
        // Only node, and it failed the job: the caller gets an OpenAI-shaped error without
        // the network's job text; the reason stays in the job's view.
        let resp = caller.await.unwrap();
        let status = resp.status();
        let job_id = resp.headers()["x-resultity-job-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(status, 503, "{err}");
        assert_eq!(err["error"]["type"], "server_error", "{err}");
        assert!(err["error"].get("param").is_some(), "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains("CUDA error") && !message.contains(&job_id),
            "{err}"
        );
        let view: serde_json::Value = http()
            .get(format!("{}/v1/jobs/{job_id}", io.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            view["error"].as_str().unwrap().contains("CUDA error"),
            "{view}"
        );
    }
    let hb = node.heartbeat().await;
    assert!(
        !hb.verdict.eligible,
        "{:?} {}",
        hb.verdict,
        node_json(&io, node.key.id()).await
    );
    assert!(hb.verdict.suspended_until_ms.is_some(), "{:?}", hb.verdict);
    assert!(hb.verdict.reason.unwrap().contains("suspended"));
    assert_eq!(call(&io).await.unwrap().status(), 503);

    eventually("restored after cooldown", || async {
        node_json(&io, node.key.id()).await["eligible"] == true
    })
    .await;
    let caller = call(&io);
    let job = ws.recv_job().await;
    ws.send(NodeMessage::JobResult(result_for(&ws.node_id, &job)))
        .await;
    assert_eq!(caller.await.unwrap().status(), 200);
    io.shutdown().await;
}

#[tokio::test]
async fn draining_node_is_acknowledged_and_gets_no_more_jobs() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    ws.send(NodeMessage::Draining {
        reason: "operator drain".into(),
        in_flight: 0,
        expected_ms: 0,
    })
    .await;
    assert!(matches!(ws.recv().await, Ok(NetworkMessage::DrainAck {})));
    let n = node_json(&io, node.key.id()).await;
    assert_eq!(n["eligible"], false);
    assert_eq!(n["reason"], "draining");
    assert_eq!(call(&io).await.unwrap().status(), 503);
    io.shutdown().await;
}
