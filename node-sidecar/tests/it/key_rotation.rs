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
