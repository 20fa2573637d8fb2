//! Network key rotation seen by a real sidecar: a node that was offline across two rotations
//! verifies its way forward through the catch-up chain and serves again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::NetworkKeypair;
use resultity_protocol::config::{ConfigTrust, SignedConfig};
use resultity_sidecar::agent::Settings;
use resultity_sidecar::config_store::ConfigStore;
use serde_json::json;

use crate::common;
use common::MODEL;

fn io_settings(
    key: &NetworkKeypair,
    next: Option<&NetworkKeypair>,
    state: &std::path::Path,
) -> IoSettings {
    let mut s = common::io_settings(key, common::payload(common::quick_timing()));
    s.next_network_key = next.cloned();
    s.key_overlap_ms = 200;
    s.config_state = Some(state.to_owned());
    s
}

/// Polls `cond` every 20 ms for up to 20 s.
async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, cond: impl FnMut() -> F) {
    common::wait_until(what, Duration::from_secs(20), cond).await;
}

async fn published_version(io: &IoServiceHandle, version: u64) {
    let st = io.state().clone();
    wait_for(&format!("config version {version} published"), move || {
        let st = st.clone();
        async move { st.published().snapshot.version >= version }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_offline_across_two_rotations_catches_up_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("io-state.json");
    let node_dir = dir.path().join("node");
    let (k1, k2, k3) = (
        NetworkKeypair::generate().unwrap(),
        NetworkKeypair::generate().unwrap(),
        NetworkKeypair::generate().unwrap(),
    );

    // The node applied v1 (signed by k1, the key it is pinned with), then went offline.
    let io = IoService::start(io_settings(&k1, None, &state))
        .await
        .unwrap();
    let v1 = SignedConfig::sign(&k1, &io.state().published().snapshot).unwrap();
    assert_eq!(v1.digest(), io.state().published().signed.digest());
    let mut store = ConfigStore::open(
        &node_dir.join("config"),
        ConfigTrust::pinned(common::net_id(), vec![k1.id().clone()]),
    )
    .unwrap();
    assert!(
        store
            .offer(&v1, v1.parse_unverified().unwrap().issued_at_ms)
            .unwrap()
            .is_some()
    );
    drop(store);
    drop(io);

    // Meanwhile the network rotated k1 → k2 (v2, confirmed by v3) and k2 → k3 (v4, v5).
    let io = IoService::start(io_settings(&k1, Some(&k2), &state))
        .await
        .unwrap();
    published_version(&io, 3).await;
    drop(io);
    let io = IoService::start(io_settings(&k2, Some(&k3), &state))
        .await
        .unwrap();
    published_version(&io, 5).await;
    assert_eq!(io.state().published().signed.signer(), k3.id().as_str());

    // The node comes back pinned with k1: every answer is signed by k3, so it syncs the chain
    // since v1, verifies v2 (k1) → v4 (k2) → v5 (k3), registers and serves.
    let sim = common::start_sim(common::instant_runtime()).await;
    let node = common::spawn(Settings {
        max_concurrency: Some(4),
        ..common::node_settings(io.base_url(), k1.id().clone(), sim.url(), &node_dir)
    });
    let watched = node.agent.clone();
    wait_for("node caught up and ready", move || {
        let s = watched.api.status();
        async move { common::serving(&s) && s.applied_config.as_ref().is_some_and(|c| c.version == 5) }
    })
    .await;
    assert_eq!(node.agent.api.status().config_error, None);
    let client = reqwest::Client::new();
    let base = io.base_url();
    common::wait_eligible(&base, true, Duration::from_secs(20)).await;
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "after two rotations", "max_tokens": 4}))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        r.headers()
            .get("x-resultity-verified")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    node.run.abort();
}

/// What a leaked retiring key signs is refused by the node's trust store, and the refusal
/// survives a restart: after k1 → k2 (k1 retiring for 12 s), k1 can neither extend its window
/// nor make itself active again, so after the 12 s the node no longer trusts k1's signature on
/// any network answer.
#[test]
fn a_leaked_retiring_key_cannot_extend_its_window_or_reactivate_itself() {
    use resultity_protocol::clock::{Clock, ManualClock};
    use resultity_protocol::config::{ConfigSnapshot, RetiringKey};
    use resultity_protocol::{ErrorCode, NodeKeypair};
    use resultity_sidecar::agent::NetClient;
    use resultity_sidecar::config_store::OfferError;

    const T: u64 = 1_767_225_600_000;
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    let (k1, k2) = (
        NetworkKeypair::from_seed(&[1; 32]),
        NetworkKeypair::from_seed(&[2; 32]),
    );
    let snap = |version: u64, prev: Option<&SignedConfig>, keys: &[&NetworkKeypair]| {
        let mut payload = common::payload(common::quick_timing());
        payload.network_keys = keys.iter().map(|k| k.id().clone()).collect();
        ConfigSnapshot {
            network_id: common::net_id(),
            version,
            issued_at_ms: T,
            expires_at_ms: T + 86_400_000,
            prev_digest: prev.map(|p| p.digest().clone()),
            payload,
        }
    };
    let code = |r: Result<(), OfferError>| match r {
        Err(OfferError::Refused(e)) => e.code(),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("applied"),
    };
    let v1 = SignedConfig::sign(&k1, &snap(1, None, &[&k1])).unwrap();
    let mut rotation = snap(2, Some(&v1), &[&k2]);
    rotation.payload.retiring_keys = vec![RetiringKey {
        key: k1.id().clone(),
        not_after_ms: T + 12_000,
    }];
    let v2 = SignedConfig::sign(&k1, &rotation).unwrap();
    let mut extend = snap(3, Some(&v2), &[&k2]);
    extend.payload.retiring_keys = vec![RetiringKey {
        key: k1.id().clone(),
        not_after_ms: T + 86_400_000,
    }];
    let extend = SignedConfig::sign(&k1, &extend).unwrap();
    let reactivate_inside = SignedConfig::sign(&k1, &snap(3, Some(&v2), &[&k1])).unwrap();
    let reactivate_after = SignedConfig::sign(&k1, &snap(4, Some(&extend), &[&k1])).unwrap();

    let mut store = ConfigStore::open(
        &config_dir,
        ConfigTrust::pinned(common::net_id(), vec![k1.id().clone()]),
    )
    .unwrap();
    store.offer(&v1, T).unwrap();
    store.offer(&v2, T).unwrap();
    // Inside the window: the extension and a self-re-activation are refused.
    assert_eq!(
        code(store.offer(&extend, T + 5_000).map(|_| ())),
        ErrorCode::ConfigEquivocation
    );
    assert_eq!(
        code(store.offer(&reactivate_inside, T + 5_000).map(|_| ())),
        ErrorCode::ConfigEquivocation
    );
    assert_eq!(
        code(
            store
                .offer_chain(&[extend.clone(), reactivate_after.clone()], T + 5_000)
                .map(|_| ())
        ),
        ErrorCode::ConfigEquivocation
    );
    drop(store);

    // Restarted after the window: the persisted trust is the one the rotation fixed.
    let after = T + 12_000;
    let mut store = ConfigStore::open(
        &config_dir,
        ConfigTrust::pinned(common::net_id(), vec![k1.id().clone()]),
    )
    .unwrap();
    assert_eq!(store.current().map(|c| c.snapshot.version), Some(2));
    assert_eq!(store.trust().keys_at(after), vec![k2.id().clone()]);
    assert_eq!(
        code(
            store
                .offer_chain(&[extend, reactivate_after.clone()], after)
                .map(|_| ())
        ),
        ErrorCode::UnknownSigner
    );
    assert_eq!(
        code(store.offer(&reactivate_after, after).map(|_| ())),
        ErrorCode::UnknownSigner
    );
    // The keys that verify network answers (heartbeat.ok, hello, session frames) follow.
    let clock = std::sync::Arc::new(ManualClock::new(T + 5_000));
    let net = NetClient::new(
        "http://127.0.0.1:9",
        common::net_id(),
        NodeKeypair::generate().unwrap(),
        store.trust().clone(),
        clock.clone(),
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(
        net.keys_now().0.find(k1.id().as_str()).is_ok(),
        "inside the window"
    );
    clock.set(after);
    assert_eq!(clock.now_ms(), after);
    assert!(net.keys_now().0.find(k1.id().as_str()).is_err());
    assert!(net.keys_now().0.find(k2.id().as_str()).is_ok());
}

/// Every config answer the node cannot use names its own reason in `/status`: a snapshot
/// signed by a stranger, then a chain whose link has another purpose, one whose link is over
/// 4 MiB, and a chain of 17 links (over the 16 of spec §8.4), each replacing the last reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_unusable_config_answer_names_its_own_reason() {
    use resultity_protocol::config::ConfigChain;
    use resultity_protocol::{Purpose, envelope, limits};

    let dir = tempfile::tempdir().unwrap();
    let k1 = NetworkKeypair::from_seed(&[1; 32]);
    let stranger = NetworkKeypair::from_seed(&[9; 32]);
    let snapshot = resultity_protocol::config::ConfigSnapshot {
        network_id: common::net_id(),
        version: 1,
        issued_at_ms: 1_767_225_600_000,
        expires_at_ms: u64::MAX / 2,
        prev_digest: None,
        payload: common::payload(common::quick_timing()),
    };
    let chain_of = |links: Vec<String>| {
        serde_json::to_string(&ConfigChain {
            network_id: common::net_id(),
            snapshots: links,
            server_time_ms: 0,
        })
        .unwrap()
    };
    let by_stranger = SignedConfig::sign(&stranger, &snapshot).unwrap();
    let wrong_purpose = envelope::seal(&k1, Purpose::HttpPing, &snapshot).unwrap();
    let huge = "x".repeat(limits::MAX_CONFIG_BYTES + 1);
    let long = vec![by_stranger.as_str().to_owned(); limits::MAX_CONFIG_CHAIN_LINKS + 1];
    let base = common::canned_http::serve_answers(vec![
        chain_of(vec![by_stranger.as_str().to_owned()]),
        chain_of(vec![wrong_purpose]),
        chain_of(vec![huge]),
        chain_of(long),
    ])
    .await;
    let agent = resultity_sidecar::agent::Agent::new(common::node_settings(
        base,
        k1.id().clone(),
        "http://127.0.0.1:9".into(),
        dir.path(),
    ))
    .unwrap();
    let mut seen = Vec::new();
    for want in ["not trusted", "purpose", "over the limit", "17 snapshots"] {
        agent.sync_config().await.unwrap();
        let error = agent.api.status().config_error.unwrap_or_default();
        assert!(error.contains(want), "want {want:?} in {error:?}");
        assert!(!seen.contains(&error), "the previous reason is replaced");
        seen.push(error);
    }
    assert_eq!(agent.api.status().applied_config, None);
}
