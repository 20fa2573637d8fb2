//! Network key rotation with an overlap window, and catch-up chains for nodes that missed
//! rotations (spec §8.4), against a running service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use resultity_protocol::config::{
    ConfigChain, ConfigSnapshot, ConfigTrust, ConfigVerdict, SignedConfig,
};
use resultity_protocol::messages::http::{HeartbeatResponse, open_network_answer, paths};
use resultity_protocol::session::NetworkKeys;
use resultity_protocol::{ErrorCode, NetworkKeypair, ProtocolError, RawEnvelope};

/// Long enough for the checks inside the window on a loaded machine.
const OVERLAP_MS: u64 = 8_000;

fn temp_path(name: &str) -> std::path::PathBuf {
    let nonce = resultity_protocol::replay::new_nonce().unwrap();
    std::env::temp_dir().join(format!("resultity-io-rotation-{}-{name}", &nonce[..8]))
}

async fn get(base: &str, path: &str) -> (u16, String) {
    let resp = http().get(format!("{base}{path}")).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn current(base: &str) -> SignedConfig {
    let (status, text) = get(base, paths::CONFIG).await;
    assert_eq!(status, 200, "{text}");
    SignedConfig::decode(text.as_bytes()).unwrap()
}

async fn chain_since(base: &str, since: u64) -> Vec<SignedConfig> {
    let (status, text) = get(base, &format!("{}?since={since}", paths::CONFIG)).await;
    assert_eq!(status, 200, "{text}");
    ConfigChain::decode(text.as_bytes()).unwrap()
}

fn version(c: &SignedConfig) -> u64 {
    c.parse_unverified().unwrap().version
}

/// Heartbeat answer text, unverified (the caller decides which keys it trusts).
async fn heartbeat_text(node: &TestNode) -> String {
    let env = node.heartbeat_envelope(report(1));
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_eq!(status, 200, "{text}");
    text
}

fn apply(trust: &mut ConfigTrust, verdict: Result<ConfigVerdict, ProtocolError>) {
    match verdict {
        Ok(ConfigVerdict::New(c)) => trust.apply(&c),
        other => panic!("expected a new config, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_step_rotation_keeps_unsynced_nodes_working_and_lets_them_catch_up() {
    let state = temp_path("state.json");
    let k1 = NetworkKeypair::generate().unwrap();
    let k2 = NetworkKeypair::generate().unwrap();

    // v1 under k1; a node fetches it, pinned with k1 only.
    let io = start(|s| {
        s.network_key = k1.clone();
        s.config_state = Some(state.clone());
    })
    .await;
    let base = io.base_url();
    let node = TestNode::new(&io, 1);
    node.register().await;
    let mut trust = ConfigTrust::pinned(node.network_id.clone(), vec![k1.id().clone()]);
    let v1 = current(&base).await;
    {
        let v = trust.verify(&v1, now_ms());
        apply(&mut trust, v);
    }
    let late_trust = trust.clone();
    drop(io);

    // The operator deploys the next key: one step, no coordination with the fleet.
    let io = start(|s| {
        s.network_key = k1.clone();
        s.next_network_key = Some(k2.clone());
        s.key_overlap_ms = OVERLAP_MS;
        s.config_state = Some(state.clone());
    })
    .await;
    let base = io.base_url();
    let node = TestNode {
        base: base.clone(),
        ..node
    };
    node.register().await;
    let rotation = current(&base).await;
    assert_eq!(version(&rotation), 2);
    assert_eq!(rotation.signer(), k1.id().as_str(), "signed by the old key");
    let snap: ConfigSnapshot = rotation.parse_unverified().unwrap();
    assert_eq!(snap.payload.network_keys, vec![k2.id().clone()]);
    assert_eq!(snap.payload.retiring_keys[0].key, *k1.id());
    let not_after = snap.payload.retiring_keys[0].not_after_ms;

    // Within the overlap a node that has not fetched the rotation trusts only k1 and keeps
    // working: answers and the session handshake verify with k1.
    let text = heartbeat_text(&node).await;
    let hb: HeartbeatResponse = open_network_answer(
        text.as_bytes(),
        &NetworkKeys::new(&late_trust.keys).unwrap(),
        &node.network_id,
        node.key.id(),
    )
    .unwrap();
    assert!(hb.server_time_ms < not_after, "checked within the window");
    assert_eq!(hb.config.unwrap().version, 2);
    let ws = WsClient::connect(&node, 1).await;
    drop(ws);
    // A node that syncs applies the rotation (signed by k1) and trusts both keys.
    {
        let v = trust.verify(&rotation, now_ms());
        apply(&mut trust, v);
    }
    assert_eq!(
        trust.keys_at(now_ms()),
        vec![k2.id().clone(), k1.id().clone()]
    );

    // The window ends: the service confirms the rotation with a snapshot signed by k2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while io.state().published().snapshot.version < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let confirmation = current(&base).await;
    assert_eq!(confirmation.signer(), k2.id().as_str());
    let now = now_ms();
    assert!(now >= not_after);
    let unconfirmed = trust.clone();
    {
        let v = trust.verify(&confirmation, now);
        apply(&mut trust, v);
    }
    assert_eq!(trust.keys_at(now), vec![k2.id().clone()]);
    // Answers are now signed by k2: the synced node verifies them, the late one cannot…
    let text = heartbeat_text(&node).await;
    assert!(
        open_network_answer::<HeartbeatResponse>(
            text.as_bytes(),
            &NetworkKeys::new(&trust.keys_at(now_ms())).unwrap(),
            &node.network_id,
            node.key.id(),
        )
        .is_ok()
    );
    assert!(matches!(
        open_network_answer::<HeartbeatResponse>(
            text.as_bytes(),
            &NetworkKeys::new(&late_trust.keys).unwrap(),
            &node.network_id,
            node.key.id(),
        ),
        Err(ProtocolError::UnknownSigner { .. })
    ));
    // …until it catches up through the chain since its version.
    let late_v1 = late_trust.current.as_ref().unwrap().version;
    let chain = chain_since(&base, late_v1).await;
    assert_eq!(chain.iter().map(version).collect::<Vec<_>>(), vec![2, 3]);
    let mut caught_up = late_trust.clone();
    assert!(matches!(
        caught_up.verify(chain.last().unwrap(), now_ms()),
        Err(ProtocolError::UnknownSigner { .. })
    ));
    {
        let v = caught_up.verify_chain(&chain, now_ms());
        apply(&mut caught_up, v);
    }
    assert_eq!(caught_up, trust);
    // The retired key is refused after the window: by its expiry on a node that has not seen
    // the confirmation, as unknown on one that has.
    let forged = ConfigSnapshot {
        version: 4,
        prev_digest: Some(confirmation.digest().clone()),
        ..confirmation.parse_unverified().unwrap()
    };
    let forged = SignedConfig::sign(&k1, &forged).unwrap();
    assert!(matches!(
        unconfirmed.verify(&forged, now_ms()),
        Err(ProtocolError::KeyRetired { .. })
    ));
    assert!(matches!(
        trust.verify(&forged, now_ms()),
        Err(ProtocolError::UnknownSigner { .. })
    ));
    drop(io);

    // Restarted with the new key promoted and the old one gone: the chain is still served.
    let io = start(|s| {
        s.network_key = k2.clone();
        s.config_state = Some(state.clone());
    })
    .await;
    let base = io.base_url();
    assert_eq!(version(&current(&base).await), 3);
    let chain = chain_since(&base, 1).await;
    assert_eq!(chain.iter().map(version).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(
        chain_since(&base, 3)
            .await
            .iter()
            .map(version)
            .collect::<Vec<_>>(),
        vec![3]
    );
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(resultity_io::publish::rotations_path(&state));
}

#[tokio::test]
async fn config_query_must_be_a_version() {
    let io = start(|_| {}).await;
    let base = io.base_url();
    for q in ["since=abc", "since=-1", "version=1", "since="] {
        let (status, text) = get(&base, &format!("{}?{q}", paths::CONFIG)).await;
        assert_eq!(status, 400, "{q}: {text}");
        let err: resultity_protocol::messages::http::ErrorResponse =
            serde_json::from_str(&text).unwrap();
        assert_eq!(err.error.code, ErrorCode::Malformed, "{q}");
    }
    // The plain form is still the snapshot itself, byte for byte.
    let (_, text) = get(&base, paths::CONFIG).await;
    assert!(RawEnvelope::decode(text.as_bytes(), usize::MAX).is_ok());
}

#[tokio::test]
async fn rotating_to_the_current_key_is_refused_at_start() {
    let mut s = settings();
    s.next_network_key = Some(s.network_key.clone());
    let err = resultity_io::IoService::start(s)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("is the current key")),
        "{err:?}"
    );
}
