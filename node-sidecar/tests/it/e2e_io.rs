//! The sidecar against the real reference IO service and the runtime simulator, all on
//! loopback in one process: jobs, runtime outages, config publication, failing models, drain.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle};
use resultity_protocol::NetworkKeypair;
use resultity_protocol::config::NetworkConfig;
use resultity_protocol::messages::{ModelState, NodePhase};
use resultity_protocol::status::ConnectionState;
use resultity_runtime_sim::{Faults, SimConfig, generate};
use resultity_sidecar::agent::{Agent, Exit};
use serde_json::{Value, json};

use crate::common;
use common::{MODEL, Net, Node, http, instant_runtime, settings, spawn};

fn payload() -> NetworkConfig {
    common::payload(common::quick_timing())
}

async fn network(sim_cfg: SimConfig) -> Net {
    common::network(payload(), sim_cfg, 5_000, 10_000).await
}

/// Polls `cond` every 10 ms for up to 10 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_ready(node: &Node) {
    let agent = node.agent.clone();
    wait_for("node ready with an active model", move || {
        common::serving(&agent.api.status())
    })
    .await;
}

/// Node `name` of `net`, started and waited for until it is ready with an active model.
async fn ready_node(net: &Net, name: &str) -> Node {
    let node = spawn(settings(net, name));
    wait_ready(&node).await;
    node
}

/// [`ready_node`], waited for until the network routes jobs to it.
async fn serving_node(net: &Net, name: &str) -> Node {
    let node = ready_node(net, name).await;
    wait_eligible(&net.io).await;
    node
}

/// A simulator whose prefill takes `ms` and which decodes at once.
fn prefill(ms: u64) -> SimConfig {
    SimConfig {
        prefill_ms: ms,
        ..instant_runtime()
    }
}

/// The node's own `/readyz` answer.
async fn readyz(node: &Node) -> reqwest::Response {
    let addr = node.agent.api_addr().unwrap();
    http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap()
}

/// The node's `/status` document, read with its admin token.
async fn status_doc(node: &Node) -> Value {
    let addr = node.agent.api_addr().unwrap();
    http()
        .get(format!("http://{addr}/status"))
        .bearer_auth("token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn eligible(io: &IoServiceHandle) -> bool {
    common::eligible(&io.base_url()).await
}

async fn wait_eligible(io: &IoServiceHandle) {
    common::wait_eligible(&io.base_url(), true, Duration::from_secs(10)).await;
}

/// Submits a 6-token completion of `prompt` to the network, waiting up to `timeout` for the
/// answer; the request owns its data, so it can be spawned.
fn submit(
    io: &IoServiceHandle,
    prompt: &str,
    timeout: Duration,
) -> impl Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static {
    http()
        .post(format!("{}/v1/completions", io.base_url()))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 6}))
        .timeout(timeout)
        .send()
}

async fn complete(io: &IoServiceHandle, prompt: &str) -> reqwest::Response {
    submit(io, prompt, Duration::from_secs(15)).await.unwrap()
}

#[tokio::test]
async fn jobs_flow_concurrently_with_verified_results() {
    let net = network(prefill(100)).await;
    let node = serving_node(&net, "a").await;
    let reqs: Vec<_> = (0..16)
        .map(|i| {
            let call = submit(&net.io, &format!("prompt {i}"), Duration::from_secs(15));
            tokio::spawn(async move {
                let r = call.await.unwrap();
                let verified = r
                    .headers()
                    .get("x-resultity-verified")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body: Value = r.json().await.unwrap();
                (i, verified, body)
            })
        })
        .collect();
    for r in reqs {
        let (i, verified, body) = r.await.unwrap();
        assert_eq!(verified.as_deref(), Some("true"), "{body}");
        assert_eq!(
            body["choices"][0]["text"],
            generate(MODEL, &format!("prompt {i}"), 6).0,
            "{body}"
        );
    }
    assert!(
        net.sim.stats().max_running > 1,
        "runtime saw no parallel requests"
    );
    let agent = node.agent.clone();
    wait_for("all results confirmed", move || agent.outbox_pending() == 0).await;
    assert_eq!(node.agent.api.status().jobs.completed, 16);

    // The local API reports the same through HTTP with the token.
    let st = status_doc(&node).await;
    assert_eq!(st["jobs"]["completed"], 16);
    assert_eq!(st["registered"], true);
    assert_eq!(st["applied_config"], st["network_config"]);
    node.run.abort();
}

#[tokio::test]
async fn runtime_down_makes_node_unready_and_back_ready() {
    let net = network(instant_runtime()).await;
    let node = ready_node(&net, "a").await;
    assert_eq!(readyz(&node).await.status(), 200);

    net.sim
        .set_faults(Faults {
            down: true,
            ..Faults::default()
        })
        .await;
    let agent = node.agent.clone();
    wait_for("runtime reported down", move || {
        !agent.api.status().runtime.ready
    })
    .await;
    assert_eq!(readyz(&node).await.status(), 503);
    // The network hears it too: no eligible node, so requests are not routed to it.
    common::wait_until(
        "the network to stop routing to a node whose runtime is down",
        Duration::from_secs(10),
        || async { !eligible(&net.io).await },
    )
    .await;
    // With the node's own words for why.
    let view = common::only_node_view(&net.io.base_url()).await;
    assert_eq!(view["eligible"], false, "{view}");
    assert!(
        view["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("node not ready: runtime not ready")),
        "{view}"
    );

    net.sim.set_faults(Faults::default()).await;
    wait_ready(&node).await;
    wait_eligible(&net.io).await;
    let r = complete(&net.io, "back").await;
    assert_eq!(r.status(), 200);
    node.run.abort();
}

#[tokio::test]
async fn published_config_is_applied_and_reported() {
    let net = network(instant_runtime()).await;
    let node = ready_node(&net, "a").await;
    let v1 = node.agent.api.status().applied_config.unwrap();
    let mut next = payload();
    next.sidecar_image = Some("example/sidecar:2".into());
    next.runtime_images.vllm = Some("vllm/vllm-openai:v9".into());
    let published = net.io.state().publish(next).unwrap();
    assert!(published.version > v1.version);
    let agent = node.agent.clone();
    let want = published.digest.clone();
    wait_for("new config applied and announced", move || {
        let s = agent.api.status();
        s.applied_config.is_some_and(|p| p.digest == want)
            && s.network_config.is_some_and(|p| p.digest == want)
    })
    .await;
    let st = node.agent.api.status();
    assert_eq!(st.network_config.unwrap().digest, published.digest);
    assert!(st.config_error.is_none());
    // The new runtime image is reported so the operator can roll the pod.
    assert_eq!(
        st.desired_runtime_image.as_deref(),
        Some("vllm/vllm-openai:v9")
    );
    node.run.abort();

    // A restarted sidecar keeps the applied config (same data dir) before talking to anyone.
    let again = Agent::new(settings(&net, "a")).unwrap();
    assert_eq!(
        again.api.status().applied_config.unwrap().digest,
        published.digest
    );
}

#[tokio::test]
async fn model_failing_its_test_inference_stays_failed_and_gets_no_jobs() {
    let net = network(SimConfig {
        prefill_ms: 0,
        decode_us_per_token: 0,
        faults: Faults {
            failing_models: vec![MODEL.into()],
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let node = spawn(settings(&net, "a"));
    let agent = node.agent.clone();
    wait_for("model failed", move || {
        agent
            .api
            .status()
            .models
            .iter()
            .any(|m| m.state == ModelState::Failed)
    })
    .await;
    let agent = node.agent.clone();
    wait_for("heartbeat reported", move || {
        agent.api.status().last_heartbeat_ms.is_some()
    })
    .await;
    assert!(!eligible(&net.io).await);
    let r = complete(&net.io, "x").await;
    assert!(
        !r.status().is_success(),
        "a job was served by a failed model"
    );
    assert_eq!(net.sim.stats().completed, 0);
    node.run.abort();
}

#[tokio::test]
async fn drain_finishes_in_flight_jobs_and_exits_clean() {
    let net = network(prefill(400)).await;
    let mut node = serving_node(&net, "a").await;
    let calls: Vec<_> = (0..4)
        .map(|i| {
            let call = submit(&net.io, &format!("d{i}"), Duration::from_secs(15));
            tokio::spawn(async move { call.await.unwrap().status() })
        })
        .collect();
    let agent = node.agent.clone();
    wait_for("jobs in flight", move || {
        agent.api.status().jobs.in_flight == 4
    })
    .await;
    // SIGTERM: drain, finish what runs, exit.
    let exit = node.drain_to_exit(Duration::from_secs(15)).await;
    assert_eq!(exit, Exit::Drained);
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(node.agent.outbox_pending(), 0);
    let st = node.agent.api.status();
    assert!(st.drained);
    assert_eq!(st.phase, NodePhase::Drained);
    assert_eq!(st.jobs.completed, 4);
}

#[tokio::test]
async fn operator_drain_keeps_reporting_drained_and_deregisters() {
    let net = network(instant_runtime()).await;
    let mut node = serving_node(&net, "a").await;
    let addr = node.agent.api_addr().unwrap();
    let c = http();
    assert_eq!(
        c.post(format!("http://{addr}/drain?deregister=maybe"))
            .bearer_auth("token")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let r = c
        .post(format!("http://{addr}/drain?deregister=true"))
        .bearer_auth("token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let agent = node.agent.clone();
    wait_for("drained", move || agent.api.status().drained).await;
    // The network forgot the node.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = reqwest::get(format!("{}/v1/nodes", net.io.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["nodes"].as_array().is_some_and(|n| n.is_empty()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node not deregistered: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still up, still reporting drained (a container restart must not rejoin before deletion).
    assert!(!node.run.is_finished());
    let st = status_doc(&node).await;
    assert_eq!(st["drained"], true);
    assert_eq!(st["phase"], "Drained");
    let exit = node.drain_to_exit(Duration::from_secs(5)).await;
    assert_eq!(exit, Exit::Drained);
}

/// An operator drain without deregistration, then the pod's preStop hook asking to
/// deregister: the drained node still leaves the network.
#[tokio::test]
async fn a_deregister_request_after_the_drain_still_leaves_the_network() {
    let net = network(instant_runtime()).await;
    let node = serving_node(&net, "a").await;
    let addr = node.agent.api_addr().unwrap();
    let id = node.agent.node_id().to_string();
    let drain = |query: &'static str| {
        http()
            .post(format!("http://{addr}/drain{query}"))
            .bearer_auth("token")
            .send()
    };
    assert_eq!(drain("").await.unwrap().status(), 202);
    let agent = node.agent.clone();
    wait_for("drained", move || agent.api.status().drained).await;
    assert!(io_node(&net.io, &id).await.is_some());
    assert!(node.agent.api.status().registered);
    assert_eq!(drain("?deregister=true").await.unwrap().status(), 202);
    common::wait_until(
        "the node gone from the network",
        Duration::from_secs(10),
        || async { io_node(&net.io, &id).await.is_none() },
    )
    .await;
    let agent = node.agent.clone();
    wait_for("status says not registered", move || {
        !agent.api.status().registered
    })
    .await;
    node.run.abort();
}

/// The IO service's view of node `id` (`None` while it does not know the node).
async fn io_node(io: &IoServiceHandle, id: &str) -> Option<Value> {
    let v: Value = http()
        .get(format!("{}/v1/nodes", io.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node_id"] == id)
        .cloned()
}

/// Waits until the IO service would route to node `id`.
async fn wait_node_eligible(io: &IoServiceHandle, id: &str) {
    common::wait_until("the node eligible", Duration::from_secs(10), || async {
        io_node(io, id).await.is_some_and(|n| n["eligible"] == true)
    })
    .await;
}

/// Job longer than the drain timeout (7 s against 1 s), so a drain that waits for it
/// overruns the timeout plus the 5 s bound.
const LONG_JOB_MS: u64 = 7_000;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// What a drain may take beyond its timeout.
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// A network whose jobs take [`LONG_JOB_MS`] and whose scheduler waits that long for them.
async fn long_job_network() -> Net {
    common::network(payload(), prefill(LONG_JOB_MS), 30_000, 40_000).await
}

/// On a network whose jobs take [`LONG_JOB_MS`], two routable nodes (drain timeout
/// [`DRAIN_TIMEOUT`]) and one job: returns the node running it (`a`), the other (`b`) and the
/// caller's pending answer. (A node started after the job would still be testing its model
/// when the job ends: its known-answer test takes as long.)
async fn long_job_on_a(
    net: &Net,
) -> (
    Node,
    Node,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let start = |name: &str| {
        let mut s = settings(net, name);
        s.drain_grace = DRAIN_TIMEOUT;
        spawn(s)
    };
    let (x, y) = (start("x"), start("y"));
    for n in [&x, &y] {
        wait_ready(n).await;
        wait_node_eligible(&net.io, n.agent.node_id().as_str()).await;
    }
    let call = tokio::spawn(submit(&net.io, "long", Duration::from_secs(40)));
    let (xa, ya) = (x.agent.clone(), y.agent.clone());
    wait_for("the job running on a node", move || {
        xa.api.status().jobs.in_flight + ya.api.status().jobs.in_flight == 1
    })
    .await;
    let (a, b) = if x.agent.api.status().jobs.in_flight == 1 {
        (x, y)
    } else {
        (y, x)
    };
    (a, b, call)
}

/// Every job handed back at the drain timeout was answered by node `b`.
async fn served_by_b(
    a: &Agent,
    b: &Agent,
    call: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (a, b) = (a.api.status().jobs, b.api.status().jobs);
    assert_eq!((a.handed_back, a.completed), (1, 0), "node a: {a:?}");
    assert_eq!(b.completed, 1, "node b: {b:?}");
}

#[tokio::test]
async fn sigterm_drain_hands_a_long_job_back_at_the_timeout_and_exits() {
    let net = long_job_network().await;
    let (mut a, b, call) = long_job_on_a(&net).await;
    assert_eq!(
        a.agent.api.status().jobs.in_flight,
        1,
        "the job ended before the drain"
    );
    let started = tokio::time::Instant::now();
    let exit = a.drain_to_exit(Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(exit, Exit::Drained);
    assert!(
        took < DRAIN_TIMEOUT + DRAIN_BOUND,
        "SIGTERM drain took {took:?} with a {DRAIN_TIMEOUT:?} drain timeout"
    );
    served_by_b(&a.agent, &b.agent, call).await;
    // It left the network, and says so.
    let st = a.agent.api.status();
    assert!(!st.registered);
    assert_eq!(st.connection.state, ConnectionState::Disconnected);
    assert!(io_node(&net.io, a.agent.node_id().as_str()).await.is_none());
}

#[tokio::test]
async fn operator_drain_hands_a_long_job_back_and_status_tells_the_truth() {
    let net = long_job_network().await;
    let (mut a, b, call) = long_job_on_a(&net).await;
    assert_eq!(
        a.agent.api.status().jobs.in_flight,
        1,
        "the job ended before the drain"
    );
    let addr = a.agent.api_addr().unwrap();
    let started = tokio::time::Instant::now();
    let r = http()
        .post(format!("http://{addr}/drain?deregister=true"))
        .bearer_auth("token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let agent = a.agent.clone();
    common::wait_until("drained", Duration::from_secs(30), || {
        let agent = agent.clone();
        async move { agent.api.status().drained }
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < DRAIN_TIMEOUT + DRAIN_BOUND,
        "drain took {took:?} with a {DRAIN_TIMEOUT:?} drain timeout"
    );
    served_by_b(&a.agent, &b.agent, call).await;
    // Status and metrics follow the session and the deregistration.
    let st = status_doc(&a).await;
    assert_eq!(st["phase"], "Drained", "{st}");
    assert_eq!(st["registered"], false, "{st}");
    assert_eq!(st["connection"]["state"], "Disconnected", "{st}");
    let metrics = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "resultity_sidecar_connected 0",
        "resultity_sidecar_registered 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    assert!(io_node(&net.io, a.agent.node_id().as_str()).await.is_none());
    // It stays up, drained, and does not rejoin on its own.
    assert!(!a.run.is_finished());
    assert!(!a.agent.api.status().registered);
    let exit = a.drain_to_exit(Duration::from_secs(5)).await;
    assert_eq!(exit, Exit::Drained);
}

#[tokio::test]
async fn runtime_crash_mid_job_hands_the_job_to_another_node() {
    let net = network(prefill(2_000)).await;
    let a = serving_node(&net, "a").await;
    // Only node A exists when the job is submitted, so A gets it.
    let call = {
        let call = submit(&net.io, "keep going", Duration::from_secs(20));
        tokio::spawn(async move {
            let r = call.await.unwrap();
            let node = r
                .headers()
                .get("x-resultity-node-id")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), node, r.json::<Value>().await.unwrap())
        })
    };
    let sim_a = &net.sim;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim_a.stats().running == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never reached runtime A"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Node B, with a healthy fast runtime, joins; then A's runtime crashes mid-decode.
    let sim_b = common::start_sim(instant_runtime()).await;
    let mut sb = settings(&net, "b");
    sb.runtime_url = sim_b.url();
    let b = spawn(sb);
    wait_ready(&b).await;
    sim_a.crash();
    let (code, node, body) = call.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(node.as_deref(), Some(b.agent.node_id().as_str()));
    assert_eq!(
        body["choices"][0]["text"],
        generate(MODEL, "keep going", 6).0
    );
    // A noticed its runtime is gone: not ready, and it reported the job back rather than lose it.
    let agent = a.agent.clone();
    wait_for("node A not ready", move || {
        !agent.api.status().runtime.ready
    })
    .await;
    let st = a.agent.api.status();
    assert_eq!(st.jobs.completed, 0);
    assert_eq!(st.jobs.failed + st.jobs.handed_back, 1, "{:?}", st.jobs);
    assert_eq!(readyz(&a).await.status(), 503);
    a.run.abort();
    b.run.abort();
}

/// A TCP proxy whose existing connections can be frozen: bytes stop flowing both ways but the
/// sockets stay open, as with a dead NAT entry or a hung peer. New connections flow normally.
struct FreezingProxy {
    addr: std::net::SocketAddr,
    freeze: tokio::sync::watch::Sender<u64>,
}

impl FreezingProxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (freeze, _) = tokio::sync::watch::channel(0u64);
        let tx = freeze.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let generation = *tx.borrow();
                let mut frozen = tx.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pump = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    tokio::select! {
                        _ = pump => {}
                        _ = async { let _ = frozen.wait_for(|g| *g > generation).await; } => {
                            // Hold both sockets open, forwarding nothing.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self { addr, freeze }
    }

    fn freeze_existing(&self) {
        self.freeze.send_modify(|g| *g += 1);
    }
}

#[tokio::test]
async fn silent_network_is_detected_after_two_ping_intervals_and_the_node_reconnects() {
    let key = NetworkKeypair::generate().unwrap();
    let mut fast = payload();
    fast.timing.ping_interval_ms = 200;
    let io = IoService::start(common::io_settings(&key, fast))
        .await
        .unwrap();
    let proxy = FreezingProxy::start(io.local_addr()).await;
    let sim = common::start_sim(instant_runtime()).await;
    let net = Net {
        io,
        sim,
        key,
        dir: tempfile::tempdir().unwrap(),
    };
    let mut st = settings(&net, "a");
    st.io_url = format!("http://{}", proxy.addr);
    let node = spawn(st);
    wait_ready(&node).await;
    assert_eq!(node.agent.api.status().connection.reconnects, 0);

    proxy.freeze_existing();
    let agent = node.agent.clone();
    wait_for("dead connection detected", move || {
        agent.api.status().connection.reconnects >= 1
    })
    .await;
    let err = node
        .agent
        .api
        .status()
        .connection
        .last_error
        .unwrap_or_default();
    assert!(err.contains("silent for two ping intervals"), "{err}");
    // Reconnected through a fresh connection, and jobs flow again once heartbeats (whose pooled
    // HTTP connection froze too, until its timeout) are fresh again.
    let since = resultity_protocol::clock::Clock::now_ms(&resultity_protocol::clock::SystemClock);
    let agent = node.agent.clone();
    wait_for("heartbeats flowing again", move || {
        agent
            .api
            .status()
            .last_heartbeat_ms
            .is_some_and(|t| t > since + 300)
    })
    .await;
    wait_ready(&node).await;
    wait_eligible(&net.io).await;
    let r = complete(&net.io, "after the freeze").await;
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    node.run.abort();
}

#[tokio::test]
async fn unwritable_outbox_stops_intake_until_a_write_succeeds() {
    let net = network(instant_runtime()).await;
    let node = serving_node(&net, "a").await;
    let fault = node.agent.outbox_write_fault();
    fault.set(true);

    // The job runs, but its result cannot be stored: the job fails and intake stops.
    let first = tokio::spawn(submit(&net.io, "first", Duration::from_secs(20)));
    let agent = node.agent.clone();
    wait_for("outbox reported unwritable", move || {
        let s = agent.api.status();
        s.outbox_error.is_some() && s.phase == NodePhase::Degraded
    })
    .await;
    let r = readyz(&node).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    let problems = body["problems"].to_string();
    assert!(problems.contains("results cannot be stored"), "{problems}");
    assert_eq!(node.agent.api.metrics.credits.get(), 0);
    let st = node.agent.api.status();
    assert_eq!(st.jobs.failed, 1, "the job whose result was lost");
    assert_eq!(st.jobs.completed, 0);

    // A job submitted now is not sent to the node: the runtime sees no new request while
    // several heartbeats (and many scheduler ticks) pass.
    let served = net.sim.stats().requests;
    let second = {
        let call = submit(&net.io, "second", Duration::from_secs(20));
        tokio::spawn(async move { call.await.unwrap().status() })
    };
    let since = node.agent.api.status().last_heartbeat_ms.unwrap();
    let agent = node.agent.clone();
    wait_for("three more heartbeats", move || {
        agent
            .api
            .status()
            .last_heartbeat_ms
            .is_some_and(|t| t >= since + 3 * 150)
    })
    .await;
    assert_eq!(
        net.sim.stats().requests,
        served,
        "a job reached the runtime"
    );
    assert_eq!(node.agent.api.status().jobs.failed, 1);

    // Writes work again: the node recovers by itself and the waiting job runs — on this
    // node, which proves it was never handed to it before (a job is not offered to a node
    // that held it already).
    fault.set(false);
    wait_ready(&node).await;
    assert!(node.agent.api.status().outbox_error.is_none());
    assert_eq!(readyz(&node).await.status(), 200);
    assert_eq!(second.await.unwrap(), 200);
    assert_eq!(node.agent.api.status().jobs.completed, 1);
    first.abort();
    node.run.abort();
}

/// A node whose outbox becomes unwritable while both its slots are busy and more jobs wait:
/// the network learns why from the next heartbeat, sent at once rather than at the (long)
/// interval, lists the node `eligible: false` with that reason, and sends it no job to bounce
/// meanwhile: the failed jobs' slots stay taken until the node advertises credits again.
#[tokio::test]
async fn a_not_ready_node_is_ineligible_with_its_reason_and_gets_no_bounces() {
    const HEARTBEAT_MS: u64 = 4_000;
    let net = common::network(
        common::payload(resultity_protocol::messages::Timing {
            heartbeat_interval_ms: HEARTBEAT_MS,
            ..common::quick_timing()
        }),
        prefill(300),
        20_000,
        30_000,
    )
    .await;
    let mut st = settings(&net, "a");
    st.max_concurrency = Some(2);
    let node = spawn(st);
    wait_ready(&node).await;
    common::wait_eligible(&net.io.base_url(), true, Duration::from_secs(20)).await;
    let fault = node.agent.outbox_write_fault();
    fault.set(true);

    // Both slots busy, then more work queued at the network.
    let busy: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(submit(
                &net.io,
                &format!("busy {i}"),
                Duration::from_secs(30),
            ))
        })
        .collect();
    let agent = node.agent.clone();
    wait_for("both slots busy", move || {
        agent.api.status().jobs.in_flight == 2
    })
    .await;
    let waiting: Vec<_> = (0..8)
        .map(|i| {
            let call = submit(&net.io, &format!("waiting {i}"), Duration::from_secs(30));
            tokio::spawn(async move { call.await.unwrap().status() })
        })
        .collect();

    // The first result cannot be stored: the node turns not ready.
    let agent = node.agent.clone();
    wait_for("outbox reported unwritable", move || {
        agent.api.status().outbox_error.is_some()
    })
    .await;
    let since = tokio::time::Instant::now();
    let io_url = net.io.base_url();
    let mut view = common::only_node_view(&io_url).await;
    while view["eligible"] != false {
        assert!(
            since.elapsed() < Duration::from_millis(HEARTBEAT_MS),
            "still eligible one heartbeat interval after the outbox failed: {view}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        view = common::only_node_view(&io_url).await;
    }
    let reason = view["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.starts_with("node not ready: ") && reason.contains("results cannot be stored"),
        "{view}"
    );
    // The node got the same verdict back, where the operator reads it.
    let agent = node.agent.clone();
    wait_for("the verdict reached the node", move || {
        agent.api.status().verdict.is_some_and(|v| {
            !v.eligible && v.reason.is_some_and(|r| r.contains("cannot be stored"))
        })
    })
    .await;
    let doc = status_doc(&node).await;
    assert_eq!(doc["verdict"]["eligible"], false, "{doc}");

    // Both running jobs end (their results are lost); over several heartbeats, nothing else
    // reaches the node: no job is handed to it only to be handed straight back.
    let agent = node.agent.clone();
    wait_for("both running jobs ended", move || {
        let s = agent.api.status();
        s.jobs.in_flight == 0 && s.jobs.failed == 2
    })
    .await;
    let served = net.sim.stats().requests;
    let settle = tokio::time::Instant::now() + Duration::from_millis(HEARTBEAT_MS + 500);
    while tokio::time::Instant::now() < settle {
        let jobs = node.agent.api.status().jobs;
        assert_eq!(
            (jobs.handed_back, jobs.rejected, jobs.in_flight),
            (0, 0, 0),
            "jobs bounced off a node that is not ready: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        net.sim.stats().requests,
        served,
        "a job reached the runtime"
    );
    assert_eq!(common::only_node_view(&io_url).await["eligible"], false);

    // Writable again: the node says so at once and the waiting jobs run, each on its first
    // attempt (none was tried on this node before).
    fault.set(false);
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200);
    }
    assert_eq!(node.agent.api.status().jobs.handed_back, 0);
    for b in busy {
        b.abort();
    }
    node.run.abort();
}
