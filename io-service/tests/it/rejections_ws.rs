//! Refused WebSocket messages: each answered with an `error` of the right code, counted,
//! and without effect on jobs; repeated invalid signatures close the session.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use resultity_io::metrics::Channel;
use resultity_protocol::codes::close;
use resultity_protocol::messages::ws::{NetworkMessage, NodeMessage, Sequenced};
use resultity_protocol::session::NodeSession;
use resultity_protocol::{ErrorCode, JobId, NodeKeypair, Purpose, envelope};

#[tokio::test]
async fn replayed_misdirected_and_forged_frames_are_refused() {
    let io = start(|_| {}).await;
    let m = io.state().metrics.clone();
    let node = TestNode::new(&io, 2);
    let mut ws = node.join().await;
    let caller = call(&io);
    let job = ws.recv_job().await;

    // Replayed ack frame.
    let ack = ws
        .send(NodeMessage::JobAck {
            job_id: job.job_id.clone(),
            lease_epoch: job.lease_epoch,
        })
        .await;
    ws.send_raw(ack).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::Replayed);

    // A message signed for another purpose than its kind.
    let body = Sequenced {
        network_id: node.network_id.clone(),
        node_id: node.key.id().clone(),
        session_id: ws.welcome.session_id.clone(),
        seq: 50,
        msg: NodeMessage::JobAck {
            job_id: job.job_id.clone(),
            lease_epoch: job.lease_epoch,
        },
    };
    ws.send_raw(envelope::seal(&node.key, Purpose::WsJobResult, &body).unwrap())
        .await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::WrongPurpose);

    // A result for a job this node does not hold.
    let mut bogus = result_for(&ws.node_id, &job);
    bogus.job_id = JobId::parse("j-not-assigned").unwrap();
    ws.send(NodeMessage::JobResult(bogus)).await;
    // ...is refused, and confirmed so the node's outbox drops it (spec §7.5): the network
    // will never need it (here: a job it never issued, as after an IO service restart).
    let mut confirmed = false;
    let code = loop {
        match ws.recv().await {
            Ok(NetworkMessage::Error { code, .. }) => break code,
            Ok(NetworkMessage::ResultConfirm { job_id, .. }) => {
                assert_eq!(job_id.as_str(), "j-not-assigned");
                confirmed = true;
            }
            Ok(_) => continue,
            Err(c) => panic!("closed {c:?}"),
        }
    };
    assert_eq!(code, ErrorCode::NotAssigned);
    if !confirmed {
        match ws.recv().await {
            Ok(NetworkMessage::ResultConfirm { job_id, .. }) => {
                assert_eq!(job_id.as_str(), "j-not-assigned")
            }
            other => panic!("expected result.confirm, got {other:?}"),
        }
    }

    // A result whose output does not match its digest.
    let mut tampered = result_for(&ws.node_id, &job);
    tampered.output.push(' ');
    ws.send(NodeMessage::JobResult(tampered)).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::ResultMismatch);
    // ...which costs the node its lease: the job comes back as a new assignment elsewhere or
    // fails (only node) — here it fails with every eligible node tried.
    let resp = caller.await.unwrap();
    assert_eq!(resp.status(), 503);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "no_eligible_node");

    // Malformed frame: not an envelope.
    ws.send_raw("{\"nope\":true}".into()).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::Malformed);

    for code in [
        ErrorCode::Replayed,
        ErrorCode::WrongPurpose,
        ErrorCode::NotAssigned,
        ErrorCode::ResultMismatch,
        ErrorCode::Malformed,
    ] {
        assert_eq!(m.rejections(Channel::Ws, code), 1, "{code}");
    }
    let n = node_json(&io, node.key.id()).await;
    assert_eq!(n["completed"], 0);
    assert!(
        n["penalty"].as_u64().unwrap() > 0,
        "an invalid result is penalized: {n}"
    );
    io.shutdown().await;
}

/// A result is bound to what its assignment dictated: the config digest and the model
/// revision. Signed results that disagree (or name no config) are refused with
/// `result_mismatch`, never delivered to the caller.
#[tokio::test]
async fn results_not_bound_to_their_assignment_are_refused() {
    let io = start(|_| {}).await;
    let m = io.state().metrics.clone();
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    let published = io.state().published().pointer().digest;
    type Tamper = fn(&mut resultity_protocol::messages::ws::JobResult);
    let cases: [(&str, Tamper); 4] = [
        ("no config digest", |r| r.config_digest = None),
        ("another config", |r| {
            r.config_digest = Some(resultity_protocol::config::ConfigDigest::of_body(b"other"))
        }),
        ("another model revision", |r| r.model.revision = "v2".into()),
        ("another model", |r| r.model.id = "another-model".into()),
    ];
    for (name, tamper) in cases {
        let caller = call(&io);
        let job = ws.recv_job().await;
        assert_eq!(
            job.config_digest, published,
            "{name}: assignment names the config"
        );
        let mut bad = result_for(&ws.node_id, &job);
        tamper(&mut bad);
        ws.send(NodeMessage::JobResult(bad)).await;
        let (code, message) = ws.recv_error().await;
        assert_eq!(code, ErrorCode::ResultMismatch, "{name}: {message}");
        let resp = caller.await.unwrap();
        assert_ne!(
            resp.status(),
            200,
            "{name}: a mismatched result reached the caller"
        );
    }
    assert_eq!(m.rejections(Channel::Ws, ErrorCode::ResultMismatch), 4);
    // The faithful result of a fresh job is accepted.
    let caller = call(&io);
    let job = ws.recv_job().await;
    ws.send(NodeMessage::JobResult(result_for(&ws.node_id, &job)))
        .await;
    let resp = caller.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(node_json(&io, node.key.id()).await["completed"], 1);
    io.shutdown().await;
}

#[tokio::test]
async fn frames_signed_by_another_key_are_refused_and_repeated_ones_close_the_session() {
    let io = start(|s| s.scheduler.max_invalid_signatures = 3).await;
    let m = io.state().metrics.clone();
    let node = TestNode::new(&io, 2);
    let mut ws = node.join().await;
    let caller = call(&io);
    let job = ws.recv_job().await;

    // The session's network and id, but another key: the signer is not the session's node.
    let thief = NodeKeypair::generate().unwrap();
    let mut other = NodeSession::new(
        thief,
        node.network_id.clone(),
        ws.welcome.session_id.clone(),
        node.network_keys.clone(),
    );
    let stolen = other
        .seal(NodeMessage::JobResult(result_for(&ws.node_id, &job)))
        .unwrap();
    ws.send_raw(stolen).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::WrongNode);

    // The node's own frame with a forged signature.
    let good = ws
        .session
        .seal(NodeMessage::Credits {
            credits: 1,
            in_flight: 1,
        })
        .unwrap();
    let other_sig = ws
        .session
        .seal(NodeMessage::Credits {
            credits: 2,
            in_flight: 0,
        })
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["sig"] = serde_json::from_str::<serde_json::Value>(&other_sig).unwrap()["sig"].clone();
    ws.send_raw(v.to_string()).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::BadSignature);

    // The job was untouched: the real result is still accepted.
    ws.send(NodeMessage::JobResult(result_for(&ws.node_id, &job)))
        .await;
    assert!(matches!(
        ws.recv().await,
        Ok(NetworkMessage::ResultConfirm { .. })
    ));
    assert_eq!(caller.await.unwrap().status(), 200);

    // A third invalid signature closes the session.
    let mut v: serde_json::Value =
        serde_json::from_str(&ws.session.seal(NodeMessage::Drained {}).unwrap()).unwrap();
    v["sig"] = serde_json::from_str::<serde_json::Value>(&other_sig).unwrap()["sig"].clone();
    ws.send_raw(v.to_string()).await;
    let mut closed = None;
    for _ in 0..3 {
        match ws.recv().await {
            Err(code) => {
                closed = code;
                break;
            }
            Ok(_) => continue,
        }
    }
    assert_eq!(closed, Some(close::TOO_MANY_INVALID));
    assert_eq!(m.rejections(Channel::Ws, ErrorCode::BadSignature), 2);
    assert_eq!(m.rejections(Channel::Ws, ErrorCode::WrongNode), 1);
    let n = node_json(&io, node.key.id()).await;
    assert_eq!(n["invalid_signatures"], 3);
    assert_eq!(n["connected"], false);
    io.shutdown().await;
}

#[tokio::test]
async fn oversize_frame_is_refused_and_closes_the_session() {
    let io = start(|s| s.limits.max_frame_bytes = 16 * 1024).await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    ws.send_raw("x".repeat(20 * 1024)).await;
    assert_eq!(ws.recv_error().await.0, ErrorCode::TooLarge);
    let code = loop {
        match ws.recv().await {
            Err(c) => break c,
            Ok(_) => continue,
        }
    };
    assert_eq!(code, Some(close::TOO_BIG));
    assert_eq!(
        io.state()
            .metrics
            .rejections(Channel::Ws, ErrorCode::TooLarge),
        1
    );
    io.shutdown().await;
}

#[tokio::test]
async fn late_result_of_a_reassigned_job_is_refused_by_lease_epoch() {
    let io = start(|_| {}).await;
    let m = io.state().metrics.clone();
    let slow = TestNode::new(&io, 1);
    let mut slow_ws = slow.join().await;
    let caller = call(&io);
    let first = slow_ws.recv_job().await;
    assert_eq!(first.lease_epoch, 1);

    // Another node joins; the slow one never acks, so after the ack timeout (300 ms) the job
    // moves to the newcomer under lease_epoch 2.
    let fast = TestNode::new(&io, 1);
    let fast_ws = fast.join().await;
    let runner = spawn_runtime(
        fast_ws,
        Behavior {
            silent: false,
            latency_ms: 1,
        },
    );
    let resp = caller.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-resultity-node-id"],
        fast.key.id().as_str()
    );

    // The slow node's late result under epoch 1.
    slow_ws
        .send(NodeMessage::JobResult(result_for(&slow_ws.node_id, &first)))
        .await;
    // The refusal, the confirmation that lets the node drop the result, and the cancel of the
    // old lease may arrive in any order (the error is written by the session directly).
    let mut saw_cancel = false;
    let mut saw_confirm = false;
    let mut code = None;
    while code.is_none() || !saw_confirm || !saw_cancel {
        match slow_ws.recv().await {
            Ok(NetworkMessage::Error { code: c, .. }) => code = Some(c),
            Ok(NetworkMessage::ResultConfirm { lease_epoch, .. }) => {
                assert_eq!(lease_epoch, 1);
                saw_confirm = true;
            }
            Ok(NetworkMessage::JobCancel { lease_epoch, .. }) => {
                assert_eq!(lease_epoch, 1);
                saw_cancel = true;
            }
            Ok(_) => continue,
            Err(c) => panic!("closed {c:?}"),
        }
    }
    assert_eq!(code, Some(ErrorCode::StaleLease));
    assert_eq!(m.rejections(Channel::Ws, ErrorCode::StaleLease), 1);
    assert_eq!(m.stale_results.get(), 1);
    let view: serde_json::Value = http()
        .get(format!(
            "{}/v1/jobs/{}",
            io.base_url(),
            first.job_id.as_str()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["node_id"], fast.key.id().as_str());
    assert_eq!(view["lease_epoch"], 2);
    runner.stop();
    io.shutdown().await;
}

#[tokio::test]
async fn full_queue_answers_429_with_retry_after() {
    // A silent node holds the first job; the ack timeout must not take it back while the
    // test runs on a loaded machine (this test is about the queue, not reassignment).
    let io = start(|s| {
        s.limits.max_queue = 1;
        s.network_config.timing.ack_timeout_ms = 30_000;
    })
    .await;
    let node = TestNode::new(&io, 1);
    let _silent = spawn_runtime(
        node.join().await,
        Behavior {
            silent: true,
            latency_ms: 0,
        },
    );
    let _first = call(&io); // takes the node's only credit
    eventually("first job assigned", || async {
        io.state().core().stats().in_flight == 1
    })
    .await;
    let _second = call(&io); // waits in the queue
    eventually("second job queued", || async {
        io.state().core().stats().queued == 1
    })
    .await;

    let resp = http()
        .post(format!("{}/v1/chat/completions", io.base_url()))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "queue_full");
    let stats = io.state().core().stats();
    assert_eq!(
        (stats.queued, stats.in_flight),
        (1, 1),
        "the refused job changed nothing"
    );
    assert_eq!(
        io.state()
            .metrics
            .rejections(Channel::Api, ErrorCode::QueueFull),
        1
    );
    io.shutdown().await;
}
