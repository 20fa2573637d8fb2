//! WebSocket conformance at the edges: pings before `auth`, close frames within RFC 6455's
//! control-frame limit, and the close code the spec names for deregistration (revocation:
//! `policy.rs`).
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use resultity_protocol::codes::close;
use resultity_protocol::messages::http::{DeregisterRequest, paths};
use resultity_protocol::messages::ws::{Auth, Hello};
use resultity_protocol::{ErrorCode, NodeKeypair, Purpose};
use tokio_tungstenite::tungstenite::Message;

/// Next frame that is not a text frame we skip; panics after 5 s.
async fn next_frame(ws: &mut Ws) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no frame within 5 s")
}

#[tokio::test]
async fn a_ping_before_auth_is_answered_and_refusals_close_with_rfc_sized_reasons() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    node.register().await;
    let url = format!(
        "{}{}",
        io.base_url().replace("http://", "ws://"),
        paths::SESSION
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello: Hello = match next_frame(&mut ws).await {
        Some(Ok(Message::Text(t))) => node
            .network_keys
            .open(t.as_bytes(), Purpose::WsHello)
            .unwrap(),
        other => panic!("expected hello, got {other:?}"),
    };
    // A keepalive ping before auth: answered, the handshake goes on.
    ws.send(Message::Ping(b"early".to_vec().into()))
        .await
        .unwrap();
    match next_frame(&mut ws).await {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"early"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // An auth naming another node than its signer: refused with a reason quoting two node
    // ids (over 125 bytes untrimmed). The close frame must still be a valid control frame.
    let other = NodeKeypair::generate().unwrap();
    let auth = Auth {
        network_id: node.network_id.clone(),
        node_id: other.id().clone(),
        challenge: hello.challenge,
        protocol_version: 1,
        ts_ms: now_ms(),
        max_concurrency: 1,
        credits: 1,
        draining: false,
        outbox_len: 0,
    };
    ws.send(Message::Text(node.seal(Purpose::WsAuth, &auth).into()))
        .await
        .unwrap();
    match next_frame(&mut ws).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), close::AUTH_FAILED);
            assert!(frame.reason.len() <= 123, "{}", frame.reason);
            assert!(!frame.reason.is_empty());
        }
        other => panic!("expected a 4001 close frame, got {other:?}"),
    }
    io.shutdown().await;
}

async fn close_code(ws: &mut WsClient) -> Option<u16> {
    loop {
        match ws.recv().await {
            Err(code) => return code,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn deregistration_closes_the_session_with_4007() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    let req = DeregisterRequest {
        hdr: node.hdr(),
        reason: "operator deleted the node".into(),
    };
    let (status, text) = node
        .post_raw(paths::DEREGISTER, node.seal(Purpose::HttpDeregister, &req))
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(close_code(&mut ws).await, Some(close::EXCLUDED));
    io.shutdown().await;
}

#[tokio::test]
async fn a_weak_key_asking_for_a_challenge_is_refused_as_weak_key() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let mut weak = [0u8; 32];
    weak[0] = 1;
    let body = serde_json::json!({
        "network_id": node.network_id.as_str(),
        "node_id": resultity_protocol::ids::node_id_text_unchecked(&weak),
    });
    let (status, text) = node.post_raw(paths::CHALLENGE, body.to_string()).await;
    let err: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["code"], ErrorCode::WeakKey.as_str(), "{text}");
    assert_eq!(status, 400);
    io.shutdown().await;
}

#[test]
fn a_session_closes_after_five_invalid_signatures_by_default() {
    assert_eq!(
        resultity_io::settings::SchedulerSettings::default().max_invalid_signatures,
        5
    );
}
