//! The whole system on loopback: the reference IO service, sidecar agents and runtime
//! simulators started by the devnet library, driven through the caller-facing entry points.
//! Every wait polls a condition with a deadline; nothing sleeps for a fixed time to "let
//! things settle".

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use resultity_devnet::{
    Devnet, DevnetConfig, LoadConfig, MODEL, Progress, RuntimeChoice, Summary, run_load,
};
use resultity_runtime_sim::{chat_prompt, generate};
use serde_json::{Value, json};

use crate::common;
use common::wait_for;

async fn devnet(nodes: usize, runtime: RuntimeChoice, latency_ms: u64) -> Devnet {
    let net = Devnet::start(DevnetConfig {
        nodes,
        runtime,
        latency_ms,
        ..DevnetConfig::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(15)).await.unwrap();
    net
}

fn assert_all_verified(s: &Summary) {
    assert!(s.all_verified(), "not every job completed verified: {s:?}");
}

async fn four_nodes_complete_all_jobs(runtime: RuntimeChoice) {
    let net = devnet(4, runtime, 10).await;
    let progress = Arc::new(Progress::default());
    let cfg = LoadConfig {
        jobs: 120,
        concurrency: 16,
        runtime,
        ..LoadConfig::default()
    };
    let s = run_load(&net.base_url(), &cfg, progress.clone())
        .await
        .unwrap()
        .with_network(&net);
    assert_all_verified(&s);
    assert_eq!(s.jobs_submitted, 120);
    assert_eq!(s.messages_rejected, 0, "{s:?}");
    assert!(
        s.p50_ms > 0.0 && s.p99_ms >= s.p50_ms && s.jobs_per_s > 0.0,
        "{s:?}"
    );
    // Work spread over the network: every node served jobs, and the runtimes ran them.
    let per = progress.per_node();
    assert_eq!(per.len(), 4, "not every node served: {per:?}");
    let ran: u64 = net.nodes.iter().map(|n| n.sim.stats().completed).sum();
    assert!(ran >= 120, "runtimes ran {ran} jobs");
    // Every node's results were confirmed by the network.
    wait_for("outboxes drained", Duration::from_secs(10), || {
        net.nodes.iter().all(|n| n.agent.outbox_pending() == 0)
    })
    .await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_vllm_nodes_complete_all_jobs_through_openai_entry_point() {
    four_nodes_complete_all_jobs(RuntimeChoice::Vllm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_triton_nodes_complete_all_jobs_through_kserve_entry_point() {
    four_nodes_complete_all_jobs(RuntimeChoice::Triton).await;
}

/// A node that vanishes with jobs in flight (its agent, sessions and runtime stop at once):
/// the IO service takes those jobs back after the resume window and another node completes
/// them, so every caller still gets a verified, correct answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_jobs_complete_elsewhere() {
    let mut net = devnet(4, RuntimeChoice::Vllm, 300).await;
    let progress = Arc::new(Progress::default());
    let cfg = LoadConfig {
        jobs: 48,
        concurrency: 16,
        ..LoadConfig::default()
    };
    let base = net.base_url();
    let load = tokio::spawn({
        let progress = progress.clone();
        async move { run_load(&base, &cfg, progress).await.unwrap() }
    });
    let victim = net.nodes[0].agent.clone();
    wait_for("node 0 running jobs", Duration::from_secs(10), || {
        victim.api.status().jobs.in_flight > 0
    })
    .await;
    let killed_id = net.nodes[0].node_id();
    net.kill_node(0).unwrap();
    let s = load.await.unwrap().with_network(&net);
    assert_all_verified(&s);
    assert!(
        s.jobs_reassigned >= 1,
        "the killed node's jobs were not reassigned: {s:?}"
    );
    // The survivors did the rest of the work.
    let per = progress.per_node();
    let survivors: u64 = per
        .iter()
        .filter(|(id, _)| **id != killed_id)
        .map(|(_, (n, _))| n)
        .sum();
    assert!(survivors >= 48 - per.get(&killed_id).map_or(0, |(n, _)| *n));
    // The network no longer routes to the dead node.
    wait_for("3 eligible nodes", Duration::from_secs(10), || {
        net.eligible_nodes() == 3
    })
    .await;
    net.shutdown().await;
}

/// The IO service stops mid-run and a new one starts on the same address (same network key,
/// persisted config chain, empty job table). "No job lost" means, precisely:
/// 1. every one of the M jobs a client submitted ends with a verified, correct answer — a job
///    whose HTTP request the restart cut off (connection error or 5xx) is resubmitted by the
///    client, as OpenAI clients do, and none is answered wrongly or left without an answer;
/// 2. results nodes computed for the old service do not linger: every node's outbox drains
///    (confirmed, or dropped once the new service disowns the job);
/// 3. the nodes rejoin the new service by themselves and jobs submitted after the restart
///    complete without any retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_restart_mid_run_loses_no_job() {
    let mut net = devnet(4, RuntimeChoice::Vllm, 100).await;
    let progress = Arc::new(Progress::default());
    let cfg = LoadConfig {
        jobs: 80,
        concurrency: 8,
        retry_for: Some(Duration::from_secs(30)),
        request_timeout: Duration::from_secs(20),
        ..LoadConfig::default()
    };
    let base = net.base_url();
    let load = tokio::spawn({
        let progress = progress.clone();
        async move { run_load(&base, &cfg, progress).await.unwrap() }
    });
    wait_for(
        "a quarter of the jobs done",
        Duration::from_secs(15),
        || progress.done.load(Ordering::Relaxed) >= 20,
    )
    .await;
    net.restart_io(Duration::from_millis(200)).await.unwrap();
    let s = load.await.unwrap();
    assert_all_verified(&s);
    assert!(s.retries > 0, "the restart interrupted no request: {s:?}");
    wait_for("outboxes drained", Duration::from_secs(15), || {
        net.nodes.iter().all(|n| n.agent.outbox_pending() == 0)
    })
    .await;
    net.wait_ready(Duration::from_secs(15)).await.unwrap();
    let after = LoadConfig {
        jobs: 20,
        concurrency: 8,
        prompt_prefix: "after restart".into(),
        ..LoadConfig::default()
    };
    let s = run_load(&net.base_url(), &after, Arc::new(Progress::default()))
        .await
        .unwrap();
    assert_all_verified(&s);
    assert_eq!(s.retries, 0);
    net.shutdown().await;
}

/// What `resultity-devnet serve` exposes, asked the way an OpenAI client asks: list models,
/// then a non-streaming chat completion, over plain HTTP at `<base_url>/chat/completions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_a_plain_http_openai_chat_completion() {
    let net = devnet(2, RuntimeChoice::Vllm, 5).await;
    let base = net.openai_base_url();
    assert!(base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let models: Value = http
        .get(format!("{base}/models"))
        .bearer_auth("sk-anything")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    let req = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."}
        ],
        "max_tokens": 12,
        "temperature": 0.7,
        "stream": false
    });
    let r = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-anything")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-resultity-verified"], "true");
    assert!(r.headers().contains_key("x-resultity-node-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let want = generate(MODEL, &chat_prompt(&req).unwrap(), 12).0;
    assert_eq!(body["choices"][0]["message"]["content"], want.trim_start());
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);

    net.shutdown().await;
}
