//! Node health against a real IO service: runtime probing that survives a busy runtime, GPU
//! status from dcgm-exporter (fixture text served over HTTP), GPU faults stopping intake, and
//! readiness that says plainly when no GPU is visible.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use resultity_io::IoServiceHandle;
use resultity_protocol::config::NetworkConfig;
use resultity_protocol::messages::{NodePhase, Timing};
use resultity_runtime_sim::{Faults, SimConfig};
use resultity_sidecar::agent::{Agent, Exit, Settings};
use resultity_sidecar::gpu::{GpuMode, GpuSettings};
use resultity_sidecar::runtime::probe::ProbeSettings;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common;
use common::{MODEL, Net, http};

const FIXTURE: &str = include_str!("../fixtures/dcgm-exporter.txt");
const POD: &str = "resultity-node-a-0";
const NAMESPACE: &str = "gpu-fleet";

fn payload() -> NetworkConfig {
    common::payload(Timing {
        heartbeat_interval_ms: 250,
        ack_timeout_ms: 2_000,
        ..common::quick_timing()
    })
}

async fn network(sim_cfg: SimConfig) -> Net {
    common::network(payload(), sim_cfg, 20_000, 30_000).await
}

fn settings(net: &Net, gpu: GpuSettings, probe: ProbeSettings) -> Settings {
    Settings {
        runtime_probe: probe,
        gpu,
        ..common::settings(net, "node")
    }
}

fn quick_probes() -> ProbeSettings {
    ProbeSettings {
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(5),
        failure_threshold: 2,
    }
}

fn spawn(settings: Settings) -> (Arc<Agent>, JoinHandle<Exit>) {
    let node = common::spawn(settings);
    (node.agent, node.run)
}

/// Polls `cond` every 20 ms for up to 20 s (generous: the test machine is shared).
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eligible(io: &IoServiceHandle) -> bool {
    common::eligible(&io.base_url()).await
}

async fn wait_eligible(io: &IoServiceHandle, want: bool) {
    common::wait_eligible(&io.base_url(), want, Duration::from_secs(20)).await;
}

async fn readyz(agent: &Agent) -> (u16, Value) {
    let r = http()
        .get(format!("http://{}/readyz", agent.api_addr().unwrap()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn wait_ready(agent: &Arc<Agent>) {
    let a = agent.clone();
    wait_for("node ready", move || {
        a.api.status().phase == NodePhase::Ready
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = readyz(agent).await;
        if code == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves `text` (changeable) as a dcgm-exporter would.
async fn exporter(text: Arc<Mutex<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let t = text.lock().unwrap().clone();
            async move { t }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/metrics")
}

fn dcgm(url: String) -> GpuSettings {
    GpuSettings {
        mode: GpuMode::Dcgm,
        dcgm_url: Some(url),
        pod_name: Some(POD.into()),
        pod_namespace: Some(NAMESPACE.into()),
    }
}

/// A runtime that makes every new connection wait while it is busy (llama.cpp's fixed pool)
/// under sustained load: probes are slow but the node stays ready and eligible throughout, and
/// heartbeats keep coming.
#[tokio::test]
async fn node_stays_eligible_while_a_busy_runtime_stalls_new_connections() {
    let net = network(SimConfig {
        prefill_ms: 400,
        decode_us_per_token: 0,
        max_batch: 4,
        ..SimConfig::default()
    })
    .await;
    // The probe timeout is above the stall, as the default (10 s) is above llama.cpp's 5 s.
    let (agent, run) = spawn(settings(
        &net,
        GpuSettings::off(),
        ProbeSettings {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(6),
            failure_threshold: 2,
        },
    ));
    wait_ready(&agent).await;
    wait_eligible(&net.io, true).await;
    net.sim
        .set_faults(Faults {
            stall_new_connections_ms: 2_500,
            ..Faults::default()
        })
        .await;

    // Sustained load: 6 clients back to back, more than the runtime's 4 slots.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let base = net.io.base_url();
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut ok = 0u32;
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    let r = http
                        .post(format!("{base}/v1/completions"))
                        .json(&json!({"model": MODEL, "prompt": format!("c{c} r{i}"), "max_tokens": 4}))
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
                    ok += 1;
                }
                ok
            })
        })
        .collect();

    // Watch until several probes have been stalled, and for at least 6 s.
    let started = tokio::time::Instant::now();
    let mut heartbeats = std::collections::BTreeSet::new();
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(6) || net.sim.stats().stalled_connections < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the runtime never stalled connections: {:?}",
            net.sim.stats()
        );
        let (code, body) = readyz(&agent).await;
        assert_eq!(code, 200, "node turned unready under load: {body}");
        assert!(
            eligible(&net.io).await,
            "the network stopped routing to a healthy busy node"
        );
        let st = agent.api.status();
        assert!(st.runtime.ready, "{:?}", st.runtime);
        heartbeats.insert(st.last_heartbeat_ms);
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut served = 0;
    for c in clients {
        served += c.await.unwrap();
    }
    assert!(served > 6, "too little load to mean anything: {served}");
    assert!(
        heartbeats.len() > 6,
        "heartbeats stalled: {} distinct in {checks} checks",
        heartbeats.len()
    );
    run.abort();
}

/// dcgm-exporter mode: this pod's GPUs are read from the exporter fixture into the status; a
/// hardware XID stops intake, hands the running job back and makes the node unready; the
/// fault clearing resumes it.
#[tokio::test]
async fn dcgm_gpu_status_and_xid_fault_stop_intake() {
    let net = network(SimConfig {
        prefill_ms: 0,
        decode_us_per_token: 0,
        ..SimConfig::default()
    })
    .await;
    let text = Arc::new(Mutex::new(FIXTURE.to_owned()));
    let url = exporter(text.clone()).await;
    let (agent, run) = spawn(settings(&net, dcgm(url), quick_probes()));
    wait_ready(&agent).await;
    wait_eligible(&net.io, true).await;
    let gpu = agent.api.status().gpu;
    assert!(gpu.present, "{gpu:?}");
    assert_eq!(gpu.devices.len(), 2, "only this pod's GPUs: {gpu:?}");
    assert_eq!(gpu.devices[0].index, 0);
    assert_eq!(
        gpu.devices[1].uuid,
        "GPU-5fd4a5b2-1c3e-4b7a-9d0e-0a1b2c3d4e02"
    );
    assert_eq!(
        gpu.memory_total_mib(),
        (74_500 + 6_128 + 531) + (74_428 + 6_200 + 531)
    );
    assert_eq!(gpu.devices[0].utilization_pct, Some(87));
    assert_eq!(gpu.devices[1].temperature_c, Some(58));
    assert!(gpu.healthy());

    // A job that hangs in the runtime, then an XID 79 (fallen off the bus) on GPU 1.
    net.sim
        .set_faults(Faults {
            hang: true,
            ..Faults::default()
        })
        .await;
    let base = net.io.base_url();
    let pending = tokio::spawn(async move {
        http()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": "hold", "max_tokens": 4}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
    });
    let a = agent.clone();
    wait_for("job running", move || a.api.status().jobs.in_flight == 1).await;
    *text.lock().unwrap() = FIXTURE
        .lines()
        .map(|l| {
            if l.starts_with("DCGM_FI_DEV_XID_ERRORS{gpu=\"1\"") {
                format!("{} 79", l.rsplit_once(' ').unwrap().0)
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let a = agent.clone();
    wait_for("job handed back on the GPU fault", move || {
        let s = a.api.status();
        s.jobs.handed_back >= 1 && s.jobs.in_flight == 0
    })
    .await;
    let st = agent.api.status();
    assert_eq!(st.phase, NodePhase::Degraded);
    assert_eq!(st.gpu.devices[1].last_xid, Some(79));
    assert!(!st.gpu.devices[1].healthy);
    let (code, body) = readyz(&agent).await;
    assert_eq!(code, 503);
    assert!(
        body["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("GPU fault: GPU 1 (XID 79)")),
        "{body}"
    );
    wait_eligible(&net.io, false).await;

    // Fault cleared (driver reset): intake resumes.
    net.sim.set_faults(Faults::default()).await;
    *text.lock().unwrap() = FIXTURE.to_owned();
    wait_ready(&agent).await;
    wait_eligible(&net.io, true).await;
    pending.abort();
    run.abort();
}

/// GPU checks on, but neither NVML nor the exporter gives a GPU: never a silent "ready".
#[tokio::test]
async fn no_visible_gpu_is_not_ready_with_the_reason() {
    let net = network(SimConfig {
        prefill_ms: 0,
        decode_us_per_token: 0,
        ..SimConfig::default()
    })
    .await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (agent, run) = spawn(settings(
        &net,
        dcgm(format!("http://{closed}/metrics")),
        quick_probes(),
    ));
    let a = agent.clone();
    wait_for("runtime ready, model active, GPU probed", move || {
        let s = a.api.status();
        s.runtime.ready
            && !s.models.is_empty()
            && s.gpu
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("dcgm-exporter"))
    })
    .await;
    let st = agent.api.status();
    assert!(!st.gpu.present);
    assert_eq!(st.phase, NodePhase::Degraded);
    let (code, body) = readyz(&agent).await;
    assert_eq!(code, 503);
    let problems = body["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| {
            let p = p.as_str().unwrap();
            p.starts_with("no GPU visible to the sidecar") && p.contains("unreachable")
        }),
        "{body}"
    );
    // The network hears it too: not eligible, with the node's reason, not a score of 850.
    let io_url = net.io.base_url();
    common::wait_until(
        "the network lists the node",
        Duration::from_secs(20),
        || {
            let io_url = io_url.clone();
            async move {
                common::only_node_view(&io_url).await["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("node not ready: no GPU visible to the sidecar"))
            }
        },
    )
    .await;
    let view = common::only_node_view(&io_url).await;
    assert_eq!(view["eligible"], false, "{view}");
    assert!(
        !eligible(&net.io).await,
        "the model is offered by a node that cannot serve it"
    );
    run.abort();
}
