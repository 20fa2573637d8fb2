//! Acceptance properties of the protocol crate across channels: purpose separation, replay
//! refusal on HTTP and WebSocket, audience and session binding.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use resultity_protocol::clock::{Clock, ManualClock};
use resultity_protocol::envelope::{self, RawEnvelope};
use resultity_protocol::messages::http::{self, PingRequest, RequestHeader};
use resultity_protocol::messages::ws::{Auth, NetworkMessage, NodeMessage};
use resultity_protocol::purpose::SignedBy;
use resultity_protocol::replay::{NonceStore, new_nonce};
use resultity_protocol::session::{self, NetworkKeys, NetworkSession, NodeSession};
use resultity_protocol::{
    ErrorCode, NetworkId, NetworkKeypair, NodeKeypair, ProtocolError, Purpose, limits,
};
use serde_json::json;

const NOW: u64 = 1_767_225_600_000;

fn net() -> NetworkId {
    NetworkId::parse("resultity-testnet").unwrap()
}

fn ping(node: &NodeKeypair, ts: u64, network: &NetworkId) -> String {
    let body = PingRequest {
        hdr: RequestHeader {
            network_id: network.clone(),
            node_id: node.id().clone(),
            ts_ms: ts,
            nonce: new_nonce().unwrap(),
        },
    };
    envelope::seal(node, Purpose::HttpPing, &body).unwrap()
}

#[test]
fn a_signature_for_one_purpose_is_refused_on_every_other() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let network = NetworkKeypair::from_seed(&[2; 32]);
    for &signed_for in Purpose::ALL {
        let (frame, key) = match signed_for.signed_by() {
            SignedBy::Node => (
                envelope::seal(&node, signed_for, &json!({"x": 1})).unwrap(),
                node.verifying_key(),
            ),
            SignedBy::Network => (
                envelope::seal(&network, signed_for, &json!({"x": 1})).unwrap(),
                network.verifying_key(),
            ),
        };
        let raw = RawEnvelope::decode(frame.as_bytes(), limits::MAX_ENVELOPE_BYTES).unwrap();
        assert!(raw.open::<serde_json::Value>(signed_for, &key).is_ok());
        for &other in Purpose::ALL.iter().filter(|p| **p != signed_for) {
            // Presented as-is where `other` is expected: refused by purpose.
            let err = raw.open::<serde_json::Value>(other, &key).unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::WrongPurpose,
                "{signed_for} accepted as {other}"
            );
            // Relabelled to `other`: the signature no longer verifies (or the signer kind is wrong).
            let relabelled = frame.replacen(
                &format!("\"purpose\":\"{}\"", signed_for.as_str()),
                &format!("\"purpose\":\"{}\"", other.as_str()),
                1,
            );
            let res = RawEnvelope::decode(relabelled.as_bytes(), limits::MAX_ENVELOPE_BYTES)
                .and_then(|r| r.open::<serde_json::Value>(other, &key));
            assert!(
                matches!(
                    res,
                    Err(ProtocolError::BadSignature { .. } | ProtocolError::UnknownSigner { .. })
                ),
                "{signed_for} relabelled as {other}: {res:?}"
            );
        }
    }
}

#[test]
fn replayed_http_request_is_refused() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let clock = ManualClock::new(NOW);
    let mut store = NonceStore::default();
    let frame = ping(&node, NOW, &net());
    let accept = |store: &mut NonceStore| -> Result<(), ProtocolError> {
        let opened = http::open_node_request::<PingRequest>(frame.as_bytes(), &net())?;
        let hdr = &opened.body.hdr;
        store.check(
            opened.node_id.as_str(),
            hdr.ts_ms,
            &hdr.nonce,
            clock.now_ms(),
        )
    };
    assert!(accept(&mut store).is_ok());
    assert_eq!(accept(&mut store).unwrap_err().code(), ErrorCode::Replayed);
    // After the window passes the same bytes fail on time, not on memory.
    clock.advance(limits::NONCE_TTL_MS);
    let mut fresh_store = NonceStore::default();
    assert_eq!(
        accept(&mut fresh_store).unwrap_err().code(),
        ErrorCode::StaleTimestamp
    );
}

#[test]
fn http_timestamps_outside_the_window_are_refused() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let mut store = NonceStore::default();
    for ts in [
        NOW - limits::HTTP_SKEW_MS - 1,
        NOW + limits::HTTP_SKEW_MS + 1,
    ] {
        let frame = ping(&node, ts, &net());
        let opened = http::open_node_request::<PingRequest>(frame.as_bytes(), &net()).unwrap();
        let err = store
            .check(opened.node_id.as_str(), ts, &opened.body.hdr.nonce, NOW)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::StaleTimestamp);
    }
}

#[test]
fn http_request_for_another_network_or_node_is_refused() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let other_net = NetworkId::parse("resultity-mainnet").unwrap();
    let frame = ping(&node, NOW, &other_net);
    let err = http::open_node_request::<PingRequest>(frame.as_bytes(), &net()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongAudience);

    // Signed by one node, naming another.
    let impostor = NodeKeypair::from_seed(&[3; 32]);
    let body = PingRequest {
        hdr: RequestHeader {
            network_id: net(),
            node_id: node.id().clone(),
            ts_ms: NOW,
            nonce: new_nonce().unwrap(),
        },
    };
    let frame = envelope::seal(&impostor, Purpose::HttpPing, &body).unwrap();
    let err = http::open_node_request::<PingRequest>(frame.as_bytes(), &net()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongNode);
}

fn sessions() -> (NodeSession, NetworkSession, NetworkKeypair) {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let network = NetworkKeypair::from_seed(&[2; 32]);
    let keys = NetworkKeys::new(&[network.id().clone()]).unwrap();
    let ns = NodeSession::new(node.clone(), net(), "sess-1".into(), keys);
    let nw = NetworkSession::new(
        net(),
        node.id().clone(),
        node.verifying_key(),
        "sess-1".into(),
        limits::MAX_FRAME_BYTES,
    );
    (ns, nw, network)
}

#[test]
fn replayed_ws_message_is_refused_in_both_directions() {
    let (mut node, mut network, net_key) = sessions();
    let up = node
        .seal(NodeMessage::Credits {
            credits: 4,
            in_flight: 0,
        })
        .unwrap();
    assert_eq!(network.open(up.as_bytes()).unwrap().seq, 1);
    assert_eq!(
        network.open(up.as_bytes()).unwrap_err().code(),
        ErrorCode::Replayed
    );

    let down = network.seal(&net_key, NetworkMessage::DrainAck {}).unwrap();
    assert!(node.open(down.as_bytes()).is_ok());
    assert_eq!(
        node.open(down.as_bytes()).unwrap_err().code(),
        ErrorCode::Replayed
    );
}

#[test]
fn ws_message_from_another_session_is_refused() {
    let (mut node, _, _) = sessions();
    let frame = node.seal(NodeMessage::Drained {}).unwrap();
    let n = NodeKeypair::from_seed(&[1; 32]);
    let mut other = NetworkSession::new(
        net(),
        n.id().clone(),
        n.verifying_key(),
        "sess-2".into(),
        limits::MAX_FRAME_BYTES,
    );
    assert_eq!(
        other.open(frame.as_bytes()).unwrap_err().code(),
        ErrorCode::Replayed
    );
}

#[test]
fn ws_message_signed_by_another_key_is_refused() {
    let (_, mut network, _) = sessions();
    let stranger = NodeKeypair::from_seed(&[9; 32]);
    let keys = NetworkKeys::new(&[]).unwrap();
    let mut s = NodeSession::new(stranger, net(), "sess-1".into(), keys);
    let frame = s.seal(NodeMessage::Drained {}).unwrap();
    assert_eq!(
        network.open(frame.as_bytes()).unwrap_err().code(),
        ErrorCode::WrongNode
    );
}

#[test]
fn oversize_frame_is_refused_before_parsing() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let mut nw = NetworkSession::new(
        net(),
        node.id().clone(),
        node.verifying_key(),
        "s".into(),
        1024,
    );
    let big = vec![b'{'; 1025];
    assert_eq!(nw.open(&big).unwrap_err().code(), ErrorCode::TooLarge);
}

#[test]
fn auth_binds_the_challenge() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let auth = Auth {
        network_id: net(),
        node_id: node.id().clone(),
        challenge: "challenge-a".into(),
        protocol_version: 1,
        ts_ms: NOW,
        max_concurrency: 8,
        credits: 8,
        draining: false,
        outbox_len: 0,
    };
    let frame = envelope::seal(&node, Purpose::WsAuth, &auth).unwrap();
    assert!(session::open_auth(frame.as_bytes(), &net(), "challenge-a").is_ok());
    let err = session::open_auth(frame.as_bytes(), &net(), "challenge-b").unwrap_err();
    assert_eq!(err.code(), ErrorCode::Replayed);
    let err = session::open_auth(
        frame.as_bytes(),
        &NetworkId::parse("other").unwrap(),
        "challenge-a",
    )
    .unwrap_err();
    assert_eq!(err.code(), ErrorCode::WrongAudience);
    let v2 = Auth {
        protocol_version: 2,
        ..auth
    };
    let frame = envelope::seal(&node, Purpose::WsAuth, &v2).unwrap();
    let err = session::open_auth(frame.as_bytes(), &net(), "challenge-a").unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
}
