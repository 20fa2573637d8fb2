//! Session handshake failures, liveness, resource bounds, eligibility rules, revocation and
//! config re-signing.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use resultity_protocol::codes::close;
use resultity_protocol::config::{ApprovedModel, SubcloudPolicy};
use resultity_protocol::messages::http::{ErrorResponse, paths};
use resultity_protocol::messages::ws::{Auth, Hello};
use resultity_protocol::messages::{Environment, Participation};
use resultity_protocol::{ErrorCode, Purpose};
use tokio_tungstenite::tungstenite::Message;

async fn raw_ws(io: &resultity_io::IoServiceHandle) -> Ws {
    let url = format!(
        "{}{}",
        io.base_url().replace("http://", "ws://"),
        paths::SESSION
    );
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// Reads until the server closes; returns its close code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no close within 5 s")
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

async fn hello(ws: &mut Ws, node: &TestNode) -> Hello {
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            return node
                .network_keys
                .open(t.as_bytes(), Purpose::WsHello)
                .unwrap();
        }
    }
}

fn auth(node: &TestNode, challenge: String) -> Auth {
    Auth {
        network_id: node.network_id.clone(),
        node_id: node.key.id().clone(),
        challenge,
        protocol_version: 1,
        ts_ms: now_ms(),
        max_concurrency: 1,
        credits: 1,
        draining: false,
        outbox_len: 0,
    }
}

#[tokio::test]
async fn handshake_failures_close_with_their_codes() {
    let io = start(|s| s.limits.auth_timeout_ms = 150).await;
    let node = TestNode::new(&io, 1);

    // No auth in time.
    let mut ws = raw_ws(&io).await;
    hello(&mut ws, &node).await;
    assert_eq!(close_code(&mut ws).await, Some(close::AUTH_TIMEOUT));

    // Auth for another connection's challenge.
    let mut ws = raw_ws(&io).await;
    hello(&mut ws, &node).await;
    let wrong = node.seal(Purpose::WsAuth, &auth(&node, "b3RoZXItY2hhbGxlbmdl".into()));
    ws.send(Message::Text(wrong.into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(close::AUTH_FAILED));

    // Correct auth, but the node never registered.
    let mut ws = raw_ws(&io).await;
    let h = hello(&mut ws, &node).await;
    ws.send(Message::Text(
        node.seal(Purpose::WsAuth, &auth(&node, h.challenge)).into(),
    ))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(close::AUTH_FAILED));

    let m = &io.state().metrics;
    assert_eq!(
        m.rejections(resultity_io::metrics::Channel::Ws, ErrorCode::NotRegistered),
        1
    );
    assert_eq!(
        m.rejections(resultity_io::metrics::Channel::Ws, ErrorCode::Replayed),
        1
    );
    io.shutdown().await;
}

#[tokio::test]
async fn a_node_that_stops_answering_pings_is_dropped() {
    let io = start(|s| s.network_config.timing.ping_interval_ms = 100).await;
    let node = TestNode::new(&io, 1);
    // Joined, then never reads again: pings go unanswered.
    let _ws = node.join().await;
    assert_eq!(io.state().core().stats().connected, 1);
    eventually("dead peer dropped", || async {
        io.state().core().stats().connected == 0
    })
    .await;
    io.shutdown().await;
}

#[tokio::test]
async fn session_limit_refuses_extra_sessions() {
    let io = start(|s| s.limits.max_sessions = 1).await;
    let a = TestNode::new(&io, 1);
    let _first = a.join().await;
    let url = format!(
        "{}{}",
        io.base_url().replace("http://", "ws://"),
        paths::SESSION
    );
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            let body: ErrorResponse =
                serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body.error.code, ErrorCode::Unavailable);
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    io.shutdown().await;
}

#[tokio::test]
async fn a_new_session_supersedes_the_old_one() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let mut old = node.join().await;
    let _new = WsClient::connect(&node, 1).await;
    assert_eq!(old.recv().await.err(), Some(Some(close::SUPERSEDED)));
    assert_eq!(io.state().core().stats().connected, 1);
    io.shutdown().await;
}

async fn reason_for(
    io: &resultity_io::IoServiceHandle,
    node: &TestNode,
    report: resultity_protocol::messages::http::NodeReport,
) -> String {
    let env = node.heartbeat_envelope(report);
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_eq!(status, 200, "{text}");
    let n = node_json(io, node.key.id()).await;
    assert_eq!(n["eligible"], false, "{n}");
    n["reason"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn eligibility_follows_model_gpu_participation_subcloud_and_health() {
    let io = start(|s| {
        s.network_config.environment = Environment::Mainnet;
        s.network_config.models.push(ApprovedModel {
            model: resultity_protocol::messages::ModelRef {
                id: "acme/private".into(),
                revision: "p1".into(),
            },
            runtimes: vec![resultity_protocol::messages::RuntimeKind::Vllm],
            min_gpu_memory_mib: 0,
            subclouds: vec!["vault".into()],
            known_answer: None,
        });
        s.network_config.subclouds.push(SubcloudPolicy {
            name: "vault".into(),
            members: Some(vec![]),
            min_gpu_memory_mib: 0,
        });
    })
    .await;
    let node = TestNode::new(&io, 1);
    let _ws = node.join().await;
    assert_eq!(node_json(&io, node.key.id()).await["eligible"], true);

    let mut r = report(1);
    r.gpu.devices[0].memory_total_mib = 8_000;
    let why = reason_for(&io, &node, r).await;
    assert!(why.contains("8000 MiB of GPU memory"), "{why}");

    let mut r = report(1);
    r.models[0].state = resultity_protocol::messages::ModelState::Pending;
    let why = reason_for(&io, &node, r).await;
    assert!(why.contains("not active on the node"), "{why}");

    let mut r = report(1);
    r.participation = Participation::Testnet;
    assert!(reason_for(&io, &node, r).await.contains("participation"));

    let mut r = report(1);
    r.runtime.ready = false;
    assert!(
        reason_for(&io, &node, r)
            .await
            .contains("runtime not ready")
    );

    let mut r = report(1);
    r.gpu.devices[0].healthy = false;
    assert!(reason_for(&io, &node, r).await.contains("GPU"));

    let mut r = report(1);
    r.draining = true;
    assert_eq!(reason_for(&io, &node, r).await, "draining");

    // The subcloud model: active and asked for, but the node is not a member.
    let mut r = report(1);
    r.subclouds = vec!["vault".into()];
    r.models.push(resultity_protocol::messages::ModelStatus {
        model: resultity_protocol::messages::ModelRef {
            id: "acme/private".into(),
            revision: "p1".into(),
        },
        state: resultity_protocol::messages::ModelState::Active,
        reason: None,
        self_test: None,
    });
    node.post_raw(paths::HEARTBEAT, node.heartbeat_envelope(r))
        .await;
    let n = node_json(&io, node.key.id()).await;
    assert_eq!(n["eligible"], true);
    assert_eq!(n["active_models"].as_array().unwrap().len(), 1, "{n}");
    let resp = http()
        .post(format!("{}/v1/chat/completions", io.base_url()))
        .json(&serde_json::json!({"model": "acme/private", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    io.shutdown().await;
}

#[tokio::test]
async fn revoking_a_node_key_closes_its_session_and_refuses_its_requests() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    let mut payload = io.state().published().snapshot.payload.clone();
    payload.revoked_node_keys.push(node.key.id().clone());
    io.state().publish(payload).unwrap();
    let code = loop {
        match ws.recv().await {
            Ok(_) => continue,
            Err(c) => break c,
        }
    };
    // Spec §8.3: a revoked node failed authentication (4001), it is not merely excluded.
    assert_eq!(code, Some(close::AUTH_FAILED));
    let (status, text) = node
        .post_raw(paths::HEARTBEAT, node.heartbeat_envelope(report(1)))
        .await;
    assert_eq!(status, 403, "{text}");
    let err: ErrorResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(err.error.code, ErrorCode::Revoked);
    io.shutdown().await;
}

#[tokio::test]
async fn config_is_re_signed_before_it_expires() {
    let io = start(|s| s.config_ttl_ms = 300).await;
    eventually("re-signed at half-life", || async {
        io.state().published().snapshot.version >= 3
    })
    .await;
    let p = io.state().published();
    assert!(p.snapshot.expires_at_ms > now_ms());
    assert!(p.snapshot.prev_digest.is_some());
    io.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_bound_wait_until_one_closes() {
    let io = start(|s| s.limits.max_connections = 4).await;
    let a = TestNode::new(&io, 1);
    let b = TestNode::new(&io, 1);
    a.register().await;
    b.register().await;
    // The two nodes' HTTP clients keep one pooled connection each: 2 of the 4 slots.
    let wa = WsClient::connect(&a, 1).await;
    let _wb = WsClient::connect(&b, 1).await;
    let url = format!(
        "{}{}",
        io.base_url().replace("http://", "ws://"),
        paths::SESSION
    );
    // A negative check needs a bounded wait: the third handshake cannot complete.
    let third = tokio::time::timeout(
        Duration::from_millis(300),
        tokio_tungstenite::connect_async(url.clone()),
    )
    .await;
    assert!(third.is_err(), "a third connection was served");
    drop(wa);
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    assert!(matches!(third, Ok(Ok(_))), "no slot freed");
    io.shutdown().await;
}
