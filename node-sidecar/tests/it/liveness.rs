//! The sidecar's session liveness after a stall of the node shorter than the network's
//! silence limit: network frames that arrived meanwhile are waiting when the node resumes and
//! must count before its ping timer decides. The network runs on its own thread; the node on
//! this test's single-threaded runtime, which the test blocks to stall it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_io::IoService;
use resultity_protocol::messages::Timing;
use resultity_protocol::{NetworkKeyId, NetworkKeypair};
use resultity_sidecar::agent::Settings;
use resultity_sidecar::runtime::probe::ProbeSettings;
use serde_json::json;

use crate::common;
use common::MODEL;

/// The node checks silence every 60 ms (limit 120 ms); the network's ping interval has a
/// floor of 100 ms (limit 200 ms), so a 130 ms stall of the node is over the node's limit when
/// measured from the last frame it *read*, under it from the last frame it *received*, and
/// under the network's limit.
const PING_MS: u64 = 60;
const STALL: Duration = Duration::from_millis(130);
/// With the old unbiased select the timer won about a third of the races after a stall; the
/// chance of passing every round by luck is (2/3)¹⁶ ≈ 0.2 %.
const ROUNDS: usize = 16;

/// Starts the IO service and the runtime simulator on their own thread; returns the IO base
/// URL, the network key id and the simulator URL.
fn network_thread() -> (String, NetworkKeyId, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let key = NetworkKeypair::generate().unwrap();
            let io = IoService::start(common::io_settings(
                &key,
                common::payload(Timing {
                    // Stalls must not age heartbeats into an exclusion.
                    heartbeat_interval_ms: 1_000,
                    ping_interval_ms: PING_MS,
                    ack_timeout_ms: 2_000,
                    ..common::quick_timing()
                }),
            ))
            .await
            .unwrap();
            let sim = common::start_sim(common::instant_runtime()).await;
            tx.send((io.base_url(), key.id().clone(), sim.url()))
                .unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

#[tokio::test]
async fn network_frames_waiting_after_a_node_stall_keep_the_session() {
    let (io_url, key, sim_url) = network_thread();
    let dir = tempfile::tempdir().unwrap();
    let node = common::spawn(Settings {
        max_concurrency: Some(4),
        runtime_probe: ProbeSettings {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(5),
            failure_threshold: 3,
        },
        ..common::node_settings(io_url.clone(), key, sim_url, dir.path())
    });
    let agent = node.agent.clone();
    common::wait_until("node ready", Duration::from_secs(20), || {
        let s = agent.api.status();
        async move { common::serving(&s) }
    })
    .await;
    common::wait_eligible(&io_url, true, Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    for round in 0..ROUNDS {
        // Stall the node (CPU starvation, SIGSTOP) while the network keeps pinging it.
        std::thread::sleep(STALL);
        // A job through the session after the stall proves the session loop ran on.
        let r = client
            .post(format!("{io_url}/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": "after a stall", "max_tokens": 2}))
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}");
        let conn = node.agent.api.status().connection;
        assert_eq!(
            conn.reconnects,
            0,
            "round {round}: session closed after a {STALL:?} stall: {}",
            conn.last_error.unwrap_or_default()
        );
    }
    node.run.abort();
}
