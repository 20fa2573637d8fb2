//! `resultity-bench`: the macro benchmarks. Every figure is a ratio against a baseline
//! measured in the same run on the same machine:
//!
//! * P1 sidecar overhead — the same simulator and load called directly vs through the IO
//!   service and a sidecar: added p50/p99 latency and throughput ratio at concurrency 1 and 64;
//! * P2 IO throughput — end-to-end jobs/s with a zero-latency simulator vs the crypto-bound
//!   limit (the same seal + open work per job as the real sessions, in a tight loop);
//! * P3 idle sessions — N authenticated idle WebSocket sessions on one IO service, which runs
//!   in a child process so its resident memory is measured alone; RSS per session;
//! * P4 time to first token — streamed chat completions at concurrency 1, directly from the
//!   simulator vs through the IO service and a sidecar (chunks as signed session frames):
//!   p50/p99 time to the first content token and the added TTFT.
//!
//! Every flag also reads an environment variable (`RESULTITY_BENCH_*`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use resultity_devnet::{
    Devnet, DevnetConfig, LoadConfig, Progress, RuntimeChoice, Summary, run_load,
};
use resultity_io::{IoService, Settings as IoSettings};
use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::messages::http::{
    Capabilities, ChallengeRequest, ChallengeResponse, RegisterRequest, RequestHeader, paths,
};
use resultity_protocol::messages::ws::{
    Auth, Hello, JobAssignment, JobResult, NetworkMessage, NodeMessage,
};
use resultity_protocol::messages::{
    Environment, GpuReport, JobKind, ModelRef, Participation, RuntimeKind, Software, Timing, Usage,
};
use resultity_protocol::replay::new_nonce;
use resultity_protocol::session::{NetworkKeys, NetworkSession, NodeSession};
use resultity_protocol::{
    JobId, NetworkId, NetworkKeypair, NodeKeypair, Purpose, envelope, limits,
};
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(name = "resultity-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Benchmarks to run, comma-separated (p1,p2,p3,p4).
    #[arg(
        long,
        env = "RESULTITY_BENCH_ONLY",
        default_value = "p1,p2,p3,p4",
        value_delimiter = ',',
        // A misspelt name would otherwise run nothing and report success.
        value_parser = ["p1", "p2", "p3", "p4"]
    )]
    only: Vec<String>,
    /// P4: streamed requests per path (direct and through the network).
    #[arg(long, env = "RESULTITY_BENCH_P4_REQUESTS", default_value_t = 300)]
    p4_requests: usize,
    /// P1: simulated runtime latency per request, ms.
    #[arg(long, env = "RESULTITY_BENCH_P1_LATENCY_MS", default_value_t = 10)]
    p1_latency_ms: u64,
    /// P1: jobs per measurement at concurrency 1 (64 gets ten times as many).
    #[arg(long, env = "RESULTITY_BENCH_P1_JOBS", default_value_t = 200)]
    p1_jobs: usize,
    /// P2: jobs submitted end to end.
    #[arg(long, env = "RESULTITY_BENCH_P2_JOBS", default_value_t = 3000)]
    p2_jobs: usize,
    /// P2: nodes (each with a zero-latency simulator).
    #[arg(long, env = "RESULTITY_BENCH_P2_NODES", default_value_t = 2)]
    p2_nodes: usize,
    /// P3: idle authenticated sessions to open (needs about 2 file descriptors per session
    /// in this process and 1 in the IO service's: `ulimit -n` must allow it).
    #[arg(long, env = "RESULTITY_BENCH_SESSIONS", default_value_t = 10_000)]
    sessions: usize,
    /// Print one JSON object with every figure as the last stdout line.
    #[arg(long, env = "RESULTITY_BENCH_JSON")]
    json: bool,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// (internal) Run a bare IO service for P3, print its address, stop when stdin closes.
    #[command(hide = true)]
    IoServer {
        #[arg(long)]
        sessions: usize,
    },
}

#[derive(Debug, Default, Serialize)]
struct Report {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    p1: Vec<P1>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p2: Option<P2>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p3: Option<P3>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p4: Option<P4>,
}

#[derive(Debug, Serialize)]
struct P4 {
    requests: usize,
    prefill_ms: u64,
    decode_us_per_token: u64,
    direct_ttft_p50_ms: f64,
    direct_ttft_p99_ms: f64,
    network_ttft_p50_ms: f64,
    network_ttft_p99_ms: f64,
    added_ttft_p50_ms: f64,
    added_ttft_p99_ms: f64,
    /// Every streamed answer through the network ended with `[DONE]` (its digest verified).
    all_verified: bool,
}

#[derive(Debug, Serialize)]
struct P1 {
    concurrency: usize,
    jobs: usize,
    direct_p50_ms: f64,
    direct_p99_ms: f64,
    direct_jobs_per_s: f64,
    network_p50_ms: f64,
    network_p99_ms: f64,
    network_jobs_per_s: f64,
    added_p50_ms: f64,
    added_p99_ms: f64,
    throughput_ratio: f64,
    all_verified: bool,
}

#[derive(Debug, Serialize)]
struct P2 {
    jobs: usize,
    nodes: usize,
    end_to_end_jobs_per_s: f64,
    crypto_jobs_per_s_one_core: f64,
    cores: usize,
    crypto_jobs_per_s_all_cores: f64,
    ratio: f64,
    all_verified: bool,
}

#[derive(Debug, Serialize)]
struct P3 {
    sessions_requested: usize,
    sessions_open: usize,
    rss_baseline_mib: f64,
    rss_mib: f64,
    rss_per_session_kib: f64,
    projected_10k_mib: f64,
    setup_s: f64,
}

fn main() -> std::process::ExitCode {
    // Each cause once, on one line, in the log format.
    resultity_logging::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Only errors by default: the progress lines and the report are the output.
    cli.log.init("error")?;
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(async move {
        if let Some(Cmd::IoServer { sessions }) = cli.command {
            io_server(sessions).await?;
            return Ok(());
        }
        let mut report = Report::default();
        if cli.only.iter().any(|o| o == "p1") {
            for c in [1usize, 64] {
                let jobs = if c == 1 {
                    cli.p1_jobs
                } else {
                    cli.p1_jobs * 10
                };
                let r = p1(c, jobs, cli.p1_latency_ms).await?;
                eprintln!("P1 c={c}: {}", progress_json(&r));
                report.p1.push(r);
            }
        }
        if cli.only.iter().any(|o| o == "p2") {
            let r = p2(cli.p2_jobs, cli.p2_nodes).await?;
            eprintln!("P2: {}", progress_json(&r));
            report.p2 = Some(r);
        }
        if cli.only.iter().any(|o| o == "p3") {
            let r = p3(cli.sessions).await?;
            eprintln!("P3: {}", progress_json(&r));
            report.p3 = Some(r);
        }
        if cli.only.iter().any(|o| o == "p4") {
            let r = p4(cli.p4_requests).await?;
            eprintln!("P4: {}", progress_json(&r));
            report.p4 = Some(r);
        }
        print_table(&report);
        if cli.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

async fn load(
    base: &str,
    jobs: usize,
    concurrency: usize,
    prefix: &str,
) -> anyhow::Result<Summary> {
    let cfg = LoadConfig {
        jobs,
        concurrency,
        runtime: RuntimeChoice::Vllm,
        prompt_prefix: prefix.into(),
        ..LoadConfig::default()
    };
    let s = run_load(base, &cfg, Arc::new(Progress::default())).await?;
    if s.jobs_completed != s.jobs_submitted {
        bail!("load against {base} failed: {}", s.failures.join("; "));
    }
    Ok(s)
}

/// P1: one node; the same simulator is called directly and through IO service + sidecar.
async fn p1(concurrency: usize, jobs: usize, latency_ms: u64) -> anyhow::Result<P1> {
    let net = Devnet::start(DevnetConfig {
        nodes: 1,
        latency_ms,
        node_concurrency: 128,
        ..DevnetConfig::default()
    })
    .await?;
    net.wait_ready(Duration::from_secs(30)).await?;
    let sim = net.nodes[0].sim.url();
    // Warm both paths (connection pools, allocator) before measuring.
    load(&sim, 100, concurrency, "warm").await?;
    load(&net.base_url(), 100, concurrency, "warm").await?;
    let direct = load(&sim, jobs, concurrency, "p1").await?;
    let network = load(&net.base_url(), jobs, concurrency, "p1").await?;
    net.shutdown().await;
    Ok(P1 {
        concurrency,
        jobs,
        direct_p50_ms: direct.p50_ms,
        direct_p99_ms: direct.p99_ms,
        direct_jobs_per_s: direct.jobs_per_s,
        network_p50_ms: network.p50_ms,
        network_p99_ms: network.p99_ms,
        network_jobs_per_s: network.jobs_per_s,
        added_p50_ms: round(network.p50_ms - direct.p50_ms),
        added_p99_ms: round(network.p99_ms - direct.p99_ms),
        throughput_ratio: round(network.jobs_per_s / direct.jobs_per_s.max(1e-9)),
        all_verified: network.all_verified(),
    })
}

/// P4: one node; the same streamed chat completion at concurrency 1, directly from the
/// simulator and through IO service + sidecar, alternating so drift hits both alike.
async fn p4(requests: usize) -> anyhow::Result<P4> {
    const PREFILL_MS: u64 = 10;
    const DECODE_US: u64 = 2_000;
    let net = Devnet::start(DevnetConfig {
        nodes: 1,
        latency_ms: PREFILL_MS,
        decode_us_per_token: DECODE_US,
        ..DevnetConfig::default()
    })
    .await?;
    net.wait_ready(Duration::from_secs(30)).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let direct_url = format!("{}/v1/chat/completions", net.nodes[0].sim.url());
    let network_url = format!("{}/chat/completions", net.openai_base_url());
    let (mut direct, mut network) = (Vec::new(), Vec::new());
    let mut all_verified = true;
    for i in 0..requests + 20 {
        let req = json!({
            "model": resultity_devnet::MODEL,
            "messages": [{"role": "user", "content": format!("ttft {i}")}],
            "max_tokens": 16,
            "stream": true,
        });
        let (d, _) = time_to_first_token(&http, &direct_url, &req).await?;
        let (n, done) = time_to_first_token(&http, &network_url, &req).await?;
        all_verified &= done;
        // The first 20 warm connection pools and allocators.
        if i >= 20 {
            direct.push(d);
            network.push(n);
        }
    }
    net.shutdown().await;
    let (dp50, dp99) = (percentile(&mut direct, 0.50), percentile(&mut direct, 0.99));
    let (np50, np99) = (
        percentile(&mut network, 0.50),
        percentile(&mut network, 0.99),
    );
    Ok(P4 {
        requests,
        prefill_ms: PREFILL_MS,
        decode_us_per_token: DECODE_US,
        direct_ttft_p50_ms: round(dp50),
        direct_ttft_p99_ms: round(dp99),
        network_ttft_p50_ms: round(np50),
        network_ttft_p99_ms: round(np99),
        added_ttft_p50_ms: round(np50 - dp50),
        added_ttft_p99_ms: round(np99 - dp99),
        all_verified,
    })
}

/// Milliseconds from sending `req` to the first event with content, and whether the stream
/// then ended with `[DONE]`.
async fn time_to_first_token(
    http: &reqwest::Client,
    url: &str,
    req: &serde_json::Value,
) -> anyhow::Result<(f64, bool)> {
    let start = Instant::now();
    let mut resp = http.post(url).json(req).send().await?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    let mut buf = String::new();
    let mut first = None;
    while let Some(bytes) = resp.chunk().await? {
        buf.push_str(std::str::from_utf8(&bytes)?);
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                let ttft = first.ok_or_else(|| anyhow!("{url}: no content before [DONE]"))?;
                return Ok((ttft, true));
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            let content = v
                .pointer("/choices/0/delta/content")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("");
            if first.is_none() && !content.is_empty() {
                first = Some(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok((first.ok_or_else(|| anyhow!("{url}: no content"))?, false))
}

fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// P2: zero-latency simulators; the IO service and sidecars are the only cost.
async fn p2(jobs: usize, nodes: usize) -> anyhow::Result<P2> {
    let net = Devnet::start(DevnetConfig {
        nodes,
        latency_ms: 0,
        node_concurrency: 64,
        ..DevnetConfig::default()
    })
    .await?;
    net.wait_ready(Duration::from_secs(30)).await?;
    load(&net.base_url(), 200, 64, "warm").await?;
    let s = load(&net.base_url(), jobs, 64, "p2").await?;
    net.shutdown().await;
    let one_core = tokio::task::spawn_blocking(|| crypto_loop(4000)).await??;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let all = one_core * cores as f64;
    Ok(P2 {
        jobs,
        nodes,
        end_to_end_jobs_per_s: s.jobs_per_s,
        crypto_jobs_per_s_one_core: round(one_core),
        cores,
        crypto_jobs_per_s_all_cores: round(all),
        ratio: round(s.jobs_per_s / all),
        all_verified: s.all_verified(),
    })
}

/// The signing and verification one job costs on its sessions — `job.assign` (network seals,
/// node opens), `job.ack` and `job.result` (node seals, network opens), `result.confirm`
/// (network seals, node opens) — done back to back on one core. Returns jobs per second.
fn crypto_loop(jobs: usize) -> anyhow::Result<f64> {
    let net_key = NetworkKeypair::generate().map_err(|e| anyhow!("{e}"))?;
    let node_key = NodeKeypair::generate().map_err(|e| anyhow!("{e}"))?;
    let network_id = NetworkId::parse("devnet").map_err(|e| anyhow!("{e}"))?;
    let keys = NetworkKeys::new(&[net_key.id().clone()]).map_err(|e| anyhow!("{e}"))?;
    let mut node = NodeSession::new(node_key.clone(), network_id.clone(), "s1".into(), keys);
    let mut io = NetworkSession::new(
        network_id,
        node_key.id().clone(),
        node_key.verifying_key(),
        "s1".into(),
        limits::MAX_FRAME_BYTES,
    );
    let model = ModelRef {
        id: resultity_devnet::MODEL.into(),
        revision: "r1".into(),
    };
    let request = json!({"model": resultity_devnet::MODEL, "messages": [{"role": "user", "content": "p2 1"}], "max_tokens": 8});
    let output = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": resultity_devnet::MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "alpha beta gamma delta epsilon zeta eta theta"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}})
    .to_string();
    let start = Instant::now();
    for i in 0..jobs {
        let job_id = JobId::parse(&format!("j-bench-{i}")).map_err(|e| anyhow!("{e}"))?;
        let assign = io.seal(
            &net_key,
            NetworkMessage::JobAssign(JobAssignment {
                job_id: job_id.clone(),
                lease_epoch: 1,
                model: model.clone(),
                config_digest: bench_digest(),
                kind: JobKind::ChatCompletion,
                request: request.clone(),
                deadline_ms: 0,
                max_output_bytes: 1 << 20,
                stream: false,
            }),
        )?;
        node.open(assign.as_bytes())?;
        let ack = node.seal(NodeMessage::JobAck {
            job_id: job_id.clone(),
            lease_epoch: 1,
        })?;
        io.open(ack.as_bytes())?;
        let result = node.seal(NodeMessage::JobResult(JobResult {
            job_id: job_id.clone(),
            lease_epoch: 1,
            config_digest: Some(bench_digest()),
            model: model.clone(),
            output_digest: JobResult::digest_output(&output),
            output: output.clone(),
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: 8,
            },
            runtime_ms: 0,
            completed_at_ms: 0,
            stream: None,
        }))?;
        let opened = io.open(result.as_bytes())?;
        if let NodeMessage::JobResult(r) = opened.msg
            && !r.output_digest_matches()
        {
            bail!("digest mismatch");
        }
        let confirm = io.seal(
            &net_key,
            NetworkMessage::ResultConfirm {
                job_id,
                lease_epoch: 1,
            },
        )?;
        node.open(confirm.as_bytes())?;
    }
    Ok(jobs as f64 / start.elapsed().as_secs_f64())
}

fn p3_payload() -> NetworkConfig {
    NetworkConfig {
        environment: Environment::Testnet,
        models: vec![ApprovedModel {
            model: ModelRef {
                id: resultity_devnet::MODEL.into(),
                revision: "r1".into(),
            },
            runtimes: vec![RuntimeKind::Vllm],
            min_gpu_memory_mib: 0,
            subclouds: vec![],
            known_answer: None,
        }],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing: Timing::default(),
        subclouds: vec![],
        network_keys: vec![],
        retiring_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}

/// The child process of P3: a bare IO service sized for `sessions`.
async fn io_server(sessions: usize) -> anyhow::Result<()> {
    let key = NetworkKeypair::generate().map_err(|e| anyhow!("{e}"))?;
    let id = NetworkId::parse("devnet").map_err(|e| anyhow!("{e}"))?;
    let mut s = IoSettings::new(id, key.clone(), p3_payload());
    s.limits.max_sessions = sessions + 16;
    s.limits.max_connections = sessions + 1024;
    s.limits.max_challenges = sessions + 1024;
    s.limits.node_http_rate_per_s = 1000.0;
    s.limits.node_http_burst = 1000.0;
    // Every simulated node registers from the same loopback address.
    s.limits.challenge_burst_per_ip = sessions as f64 + 16.0;
    s.limits.challenge_rate_per_ip_per_s = 1_000_000.0;
    let io = IoService::start(s).await?;
    println!("{} {}", io.local_addr(), key.id().as_str());
    std::io::stdout().flush()?;
    // Runs until the parent closes our stdin (it exited or is done measuring).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    io.shutdown().await;
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Closing stdin stops it; kill in case it hangs.
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// P3: open `n` authenticated sessions on an IO service in a child process and keep them idle.
async fn p3(n: usize) -> anyhow::Result<P3> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["io-server", "--sessions", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the IO service child")?;
    let mut child = ChildGuard(child);
    let pid = child.0.id();
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow!("child stdout"))?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await??;
    let mut parts = line.split_whitespace();
    let (Some(addr), Some(key_id)) = (parts.next(), parts.next()) else {
        bail!(
            "IO service child printed \"{}\" instead of its address and key id",
            line.trim_end()
        );
    };
    let base = format!("http://{addr}");
    let keys = NetworkKeys::new(&[
        resultity_protocol::NetworkKeyId::parse(key_id).map_err(|e| anyhow!("{e}"))?
    ])
    .map_err(|e| anyhow!("{e}"))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // One session first, so the baseline includes everything a first session allocates once.
    let mut held = Vec::with_capacity(n);
    held.push(open_session(&http, &base, &keys).await?);
    wait_connected(&http, &base, 1).await?;
    let baseline = rss_kib(pid)?;
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(1));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (http, base, keys, next) = (http.clone(), base.clone(), keys.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match open_session(&http, &base, &keys).await {
                    Ok(s) => mine.push(s),
                    Err(e) => return (mine, Some(e)),
                }
            }
            (mine, None)
        }));
    }
    let mut first_error = None;
    for w in workers {
        let (mine, err) = w.await?;
        held.extend(mine);
        if first_error.is_none() {
            first_error = err;
        }
    }
    if let Some(e) = &first_error {
        eprintln!("P3: stopped opening sessions at {}: {e:#}", held.len());
    }
    let open = held.len();
    wait_connected(&http, &base, open).await?;
    let setup_s = start.elapsed().as_secs_f64();
    let rss = rss_kib(pid)?;
    let per = (rss.saturating_sub(baseline)) as f64 / (open.saturating_sub(1).max(1)) as f64;
    for h in held {
        h.abort();
    }
    drop(child);
    Ok(P3 {
        sessions_requested: n,
        sessions_open: open,
        rss_baseline_mib: round(baseline as f64 / 1024.0),
        rss_mib: round(rss as f64 / 1024.0),
        rss_per_session_kib: round(per),
        projected_10k_mib: round((baseline as f64 + per * 10_000.0) / 1024.0),
        setup_s: round(setup_s),
    })
}

/// Polls the child's `/metrics` until `n` sessions are connected (bounded).
async fn wait_connected(http: &reqwest::Client, base: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let connected = text
            .lines()
            .find_map(|l| l.strip_prefix("resultity_io_nodes_connected "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if connected as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {connected} of {n} sessions connected");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a fresh node and opens its session; the returned task keeps it alive (reading
/// frames so pings are answered) until aborted.
async fn open_session(
    http: &reqwest::Client,
    base: &str,
    keys: &NetworkKeys,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let key = NodeKeypair::generate().map_err(|e| anyhow!("{e}"))?;
    let network_id = NetworkId::parse("devnet").map_err(|e| anyhow!("{e}"))?;
    let ch: ChallengeResponse = http
        .post(format!("{base}{}", paths::CHALLENGE))
        .json(&ChallengeRequest {
            network_id: network_id.clone(),
            node_id: key.id().clone(),
        })
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let reg = RegisterRequest {
        hdr: RequestHeader {
            network_id: network_id.clone(),
            node_id: key.id().clone(),
            ts_ms: now,
            nonce: new_nonce().map_err(|e| anyhow!("{e}"))?,
        },
        challenge: ch.challenge,
        protocol_versions: vec![1],
        software: Software::default(),
        capabilities: Capabilities {
            runtime: RuntimeKind::Vllm,
            max_concurrency: 1,
            participation: Participation::Both,
            subclouds: vec![],
            gpu: GpuReport {
                present: false,
                reason: Some("bench".into()),
                driver_version: None,
                cuda_version: None,
                devices: vec![],
            },
            models_installed: vec![],
        },
    };
    let r = http
        .post(format!("{base}{}", paths::REGISTER))
        .body(envelope::seal(&key, Purpose::HttpRegister, &reg)?)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "register: HTTP {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    let url = format!("{}{}", base.replace("http://", "ws://"), paths::SESSION);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await??;
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .ok_or_else(|| anyhow!("closed before hello"))??;
    let hello: Hello = keys.open(frame.into_data().as_ref(), Purpose::WsHello)?;
    let auth = Auth {
        network_id,
        node_id: key.id().clone(),
        challenge: hello.challenge,
        protocol_version: 1,
        ts_ms: now,
        max_concurrency: 1,
        credits: 0,
        draining: false,
        outbox_len: 0,
    };
    ws.send(Message::Text(
        envelope::seal(&key, Purpose::WsAuth, &auth)?.into(),
    ))
    .await?;
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .ok_or_else(|| anyhow!("closed before welcome"))??;
    let _: resultity_protocol::messages::ws::Welcome =
        keys.open(frame.into_data().as_ref(), Purpose::WsWelcome)?;
    Ok(tokio::spawn(async move {
        // Reading answers the service's pings; the session otherwise stays idle.
        while let Some(Ok(_)) = ws.next().await {}
    }))
}

fn round(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn print_table(r: &Report) {
    for p in &r.p1 {
        println!(
            "P1 sidecar overhead, concurrency {:>2}: direct p50 {:.2} / p99 {:.2} ms, {:.0} jobs/s; \
             through IO+sidecar p50 {:.2} / p99 {:.2} ms, {:.0} jobs/s; added p50 {:+.2} ms, \
             p99 {:+.2} ms; throughput ratio {:.3}",
            p.concurrency,
            p.direct_p50_ms,
            p.direct_p99_ms,
            p.direct_jobs_per_s,
            p.network_p50_ms,
            p.network_p99_ms,
            p.network_jobs_per_s,
            p.added_p50_ms,
            p.added_p99_ms,
            p.throughput_ratio
        );
    }
    if let Some(p) = &r.p2 {
        println!(
            "P2 IO throughput: end to end {:.0} jobs/s ({} nodes, zero-latency runtime) vs \
             crypto-bound {:.0} jobs/s ({:.0}/core x {} cores): ratio {:.3}",
            p.end_to_end_jobs_per_s,
            p.nodes,
            p.crypto_jobs_per_s_all_cores,
            p.crypto_jobs_per_s_one_core,
            p.cores,
            p.ratio
        );
    }
    if let Some(p) = &r.p4 {
        println!(
            "P4 time to first token, concurrency 1 ({} streams, prefill {} ms, {} us/token): \
             direct p50 {:.2} / p99 {:.2} ms; through IO+sidecar p50 {:.2} / p99 {:.2} ms; \
             added p50 {:+.2} ms, p99 {:+.2} ms; every stream verified: {}",
            p.requests,
            p.prefill_ms,
            p.decode_us_per_token,
            p.direct_ttft_p50_ms,
            p.direct_ttft_p99_ms,
            p.network_ttft_p50_ms,
            p.network_ttft_p99_ms,
            p.added_ttft_p50_ms,
            p.added_ttft_p99_ms,
            p.all_verified
        );
    }
    if let Some(p) = &r.p3 {
        println!(
            "P3 idle sessions: {} of {} open; IO RSS {:.1} MiB (baseline {:.1} MiB), {:.1} KiB \
             per session, 10,000 projected {:.0} MiB; set up in {:.1} s",
            p.sessions_open,
            p.sessions_requested,
            p.rss_mib,
            p.rss_baseline_mib,
            p.rss_per_session_kib,
            p.projected_10k_mib,
            p.setup_s
        );
    }
}

/// A fixed config digest for the micro benchmark's assignments and results.
fn bench_digest() -> resultity_protocol::config::ConfigDigest {
    resultity_protocol::config::ConfigDigest::of_body(b"bench")
}

/// One finished benchmark as compact JSON for the progress lines on stderr.
fn progress_json<T: Serialize>(r: &T) -> String {
    serde_json::to_string(r).unwrap_or_else(|e| format!("(unprintable: {e})"))
}
