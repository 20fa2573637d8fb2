//! `resultity-sidecar`: the Resultity node agent. Every flag also reads an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use resultity_protocol::messages::{Participation, RuntimeKind};
use resultity_protocol::{NetworkId, NetworkKeyId};
use resultity_sidecar::agent::{Agent, Exit, Settings, SyncPolicy};
use resultity_sidecar::gpu::{GpuMode, GpuSettings};
use resultity_sidecar::runtime::RuntimeOptions;
use resultity_sidecar::runtime::probe::ProbeSettings;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Resultity node agent: registers with the network, syncs its signed config, runs jobs on the co-located vLLM, Triton or other OpenAI-compatible runtime"
)]
struct Cli {
    /// Parse and validate the flags, print what would run, and exit without touching files
    /// or the network (checks a pod's arguments).
    #[arg(long, global = true, env = "RESULTITY_DRY_RUN")]
    dry_run: bool,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the agent (until SIGTERM: then drain and exit).
    Run(Box<Args>),
    /// Ask a running agent to drain (the pod's preStop hook).
    Drain(DrainArgs),
    /// Preflight: IO reachability and TLS, clock skew, the signed config against the pinned
    /// keys, GPU health. One line per check; exit status 1 when any fails.
    Doctor(DoctorArgs),
}

/// The network to join and the keys that anchor trust in it; shared by `run` and `doctor` so
/// both read the same flags.
#[derive(Debug, clap::Args)]
struct NetworkArgs {
    /// Base URL of the network's IO service.
    #[arg(long, visible_alias = "io-endpoint", env = "RESULTITY_IO_URL")]
    io_url: String,
    /// Network id (e.g. resultity-testnet).
    #[arg(long, env = "RESULTITY_NETWORK_ID")]
    network_id: String,
    /// Pinned network public key ids (rk1…), repeated or comma-separated.
    #[arg(
        long,
        visible_alias = "network-key",
        env = "RESULTITY_NETWORK_KEYS",
        value_delimiter = ',',
        required = true
    )]
    network_keys: Vec<String>,
}

impl NetworkArgs {
    /// The IO service URL, the network id and the pinned keys, each checked.
    fn parse(self) -> anyhow::Result<(String, NetworkId, Vec<NetworkKeyId>)> {
        let network_keys = self
            .network_keys
            .iter()
            .map(|k| NetworkKeyId::parse(k.trim()).with_context(|| format!("network key {k:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let network_id = NetworkId::parse(&self.network_id).context("--network-id")?;
        Ok((self.io_url, network_id, network_keys))
    }
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    #[command(flatten)]
    network: NetworkArgs,
    /// Largest tolerated difference between the local clock and the IO service's, in ms
    /// (default: half the protocol's request window).
    #[arg(long, env = "RESULTITY_DOCTOR_MAX_CLOCK_SKEW_MS", default_value_t = resultity_sidecar::doctor::DEFAULT_MAX_CLOCK_SKEW_MS)]
    max_clock_skew_ms: u64,
    /// Timeout of each call to the IO service, in seconds.
    #[arg(long, env = "RESULTITY_DOCTOR_TIMEOUT_SECONDS", default_value_t = 10)]
    timeout_seconds: u64,
    /// GPU checks (a node without a visible GPU skips the check).
    #[command(flatten)]
    gpu: GpuArgs,
}

/// Where GPU status comes from; shared by `run` and `doctor` so both see the same GPUs.
#[derive(Debug, clap::Args)]
struct GpuArgs {
    /// Where GPU status comes from: auto (NVML, else dcgm-exporter if configured), nvml (DRA
    /// ResourceClaim shared with the runtime, or bare metal), dcgm (device plugin: the node's
    /// dcgm-exporter), or off (no GPU checks; CPU runtimes). With a check on and no GPU
    /// visible the node is not ready and says why.
    #[arg(long, env = "RESULTITY_GPU_CHECK", value_parser = GpuMode::parse, default_value = "auto")]
    gpu_check: GpuMode,
    /// Deprecated: `--gpu-probe=false` is `--gpu-check=off`.
    #[arg(long, env = "RESULTITY_GPU_PROBE", hide = true, action = clap::ArgAction::Set)]
    gpu_probe: Option<bool>,
    /// dcgm-exporter metrics URL. Default with RESULTITY_HOST_IP set:
    /// http://$RESULTITY_HOST_IP:9400/metrics (the exporter's port on this pod's node).
    #[arg(long, env = "RESULTITY_DCGM_URL")]
    dcgm_url: Option<String>,
    /// This node's IP (Downward API status.hostIP), to find the node's dcgm-exporter.
    #[arg(long, env = "RESULTITY_HOST_IP")]
    host_ip: Option<String>,
    /// This pod's name (Downward API metadata.name): picks its GPUs from dcgm-exporter.
    #[arg(long, env = "RESULTITY_POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace (Downward API metadata.namespace).
    #[arg(long, env = "RESULTITY_POD_NAMESPACE")]
    pod_namespace: Option<String>,
}

impl GpuArgs {
    fn settings(self) -> GpuSettings {
        GpuSettings {
            mode: if self.gpu_probe == Some(false) {
                GpuMode::Off
            } else {
                self.gpu_check
            },
            dcgm_url: self.dcgm_url.or_else(|| {
                self.host_ip
                    .as_deref()
                    .map(|ip| format!("http://{}:9400/metrics", url_host(ip)))
            }),
            pod_name: self.pod_name,
            pod_namespace: self.pod_namespace,
        }
    }
}

#[derive(Debug, clap::Args)]
struct DrainArgs {
    /// The agent's local API.
    #[arg(
        long,
        env = "RESULTITY_DRAIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    url: String,
    /// File holding the bearer token.
    #[arg(long, env = "RESULTITY_ADMIN_TOKEN_FILE")]
    admin_token_file: PathBuf,
    /// Also leave the network once drained.
    #[arg(long, env = "RESULTITY_DRAIN_DEREGISTER")]
    deregister: bool,
    /// Wait until the agent reports drained.
    #[arg(long, env = "RESULTITY_DRAIN_WAIT")]
    wait: bool,
    /// Give up waiting after this many seconds (exit status 1).
    #[arg(long, env = "RESULTITY_DRAIN_TIMEOUT_SECONDS", default_value_t = 120)]
    timeout_seconds: u64,
}

#[derive(Debug, clap::Args)]
// `run` says what the pinned keys are for.
#[command(mut_arg("network_keys", |a| a.help(
    "Pinned network public key ids (rk1…), repeated or comma-separated: the root of trust"
)))]
struct Args {
    #[command(flatten)]
    network: NetworkArgs,
    /// Node key file; created with mode 0600 if missing (or a read-only Secret mount).
    #[arg(
        long,
        visible_alias = "identity-file",
        env = "RESULTITY_KEY_FILE",
        default_value = "/var/lib/resultity/node.key"
    )]
    key_file: PathBuf,
    /// Data directory (outbox, applied config).
    #[arg(
        long,
        visible_alias = "state-dir",
        env = "RESULTITY_DATA_DIR",
        default_value = "/var/lib/resultity"
    )]
    data_dir: PathBuf,
    /// Runtime kind: vllm, triton, or openai (any other OpenAI-compatible server: llama.cpp's
    /// llama-server, SGLang, llama-cpp-python, …).
    #[arg(long, env = "RESULTITY_RUNTIME", value_parser = parse_runtime, default_value = "vllm")]
    runtime: RuntimeKind,
    /// Runtime base URL.
    #[arg(
        long,
        env = "RESULTITY_RUNTIME_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    runtime_url: String,
    /// Runtime image running now (lets the node report when the config wants another).
    #[arg(long, env = "RESULTITY_RUNTIME_IMAGE")]
    runtime_image: Option<String>,
    /// Jobs run at once, the credits the node advertises. Unset: the runtime's parallel slots
    /// where it reports them (llama-server's /props), else 64 for vllm and triton (set it to
    /// vLLM's --max-num-seqs) and 4 for openai. More than the runtime decodes at once only
    /// queues requests inside the runtime, where the network cannot see them.
    #[arg(long, env = "RESULTITY_MAX_CONCURRENCY")]
    max_concurrency: Option<u32>,
    /// Health endpoint of an OpenAI-compatible runtime; a 404 or 405 there falls back to
    /// GET /v1/models (servers without a health endpoint). Triton uses /v2/health/ready.
    #[arg(long, env = "RESULTITY_RUNTIME_HEALTH_PATH", default_value = "/health")]
    runtime_health_path: String,
    /// Seconds between runtime health probes (they run in their own task, apart from
    /// heartbeats and on their own connections).
    #[arg(long, env = "RESULTITY_PROBE_INTERVAL_SECONDS", default_value_t = 5)]
    probe_interval_seconds: u64,
    /// Seconds one runtime probe may take; keep it above the runtime's keep-alive timeout
    /// (5 s for llama.cpp and uvicorn), which a busy runtime makes new connections wait for.
    #[arg(long, env = "RESULTITY_PROBE_TIMEOUT_SECONDS", default_value_t = 10)]
    probe_timeout_seconds: u64,
    /// Consecutive failed probes before a ready runtime counts as not ready.
    #[arg(long, env = "RESULTITY_PROBE_FAILURE_THRESHOLD", default_value_t = 3)]
    probe_failure_threshold: u32,
    /// Which environments' jobs to take: testnet, mainnet or both.
    #[arg(long, env = "RESULTITY_PARTICIPATION", value_parser = parse_participation, default_value = "both")]
    participation: Participation,
    /// Subclouds to serve, repeated or comma-separated.
    #[arg(
        long,
        visible_alias = "subcloud",
        env = "RESULTITY_SUBCLOUDS",
        value_delimiter = ','
    )]
    subclouds: Vec<String>,
    /// Models to serve as `id` or `id@revision`, repeated or comma-separated; none = all
    /// approved for this node.
    #[arg(
        long,
        visible_alias = "model",
        env = "RESULTITY_MODELS",
        value_delimiter = ','
    )]
    models: Vec<String>,
    /// Local API address (/healthz, /readyz, /status, /metrics, /drain).
    #[arg(long, env = "RESULTITY_LISTEN", default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// File holding the bearer token for /status and /drain.
    #[arg(long, env = "RESULTITY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// How long a drain may take, in seconds: in-flight jobs still running then are handed
    /// back to the network (no penalty) and the node reports drained a few seconds later.
    #[arg(
        long,
        visible_alias = "drain-timeout-seconds",
        env = "RESULTITY_DRAIN_GRACE_SECONDS",
        default_value_t = 120
    )]
    drain_grace_seconds: u64,
    /// This pod's UID (Downward API metadata.uid). A node drained through `POST /drain`
    /// stays drained when its container restarts in the same pod; a new pod starts fresh.
    /// Unset: every start is fresh.
    #[arg(long, env = "RESULTITY_POD_UID")]
    pod_uid: Option<String>,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Refuse models whose GPU memory requirement the node does not meet.
    #[arg(long, env = "RESULTITY_ENFORCE_GPU_MEMORY", default_value_t = true, action = clap::ArgAction::Set)]
    enforce_gpu_memory: bool,
    /// When results reach the disk: `deferred` (page cache before sending, fsynced in batches
    /// every 50 ms; survives a process crash) or `always` (fsync before sending each result).
    #[arg(long, env = "RESULTITY_OUTBOX_SYNC", value_parser = parse_sync, default_value = "deferred")]
    outbox_sync: SyncPolicy,
}

fn parse_sync(s: &str) -> Result<SyncPolicy, String> {
    match s {
        "deferred" => Ok(SyncPolicy::Deferred),
        "always" => Ok(SyncPolicy::Always),
        _ => Err(format!(
            "{s:?} is not a sync policy: use deferred or always"
        )),
    }
}

fn parse_runtime(s: &str) -> Result<RuntimeKind, String> {
    match s {
        "vllm" => Ok(RuntimeKind::Vllm),
        "triton" => Ok(RuntimeKind::Triton),
        "openai" => Ok(RuntimeKind::Openai),
        _ => Err(format!("{s} is not a runtime: use vllm, triton or openai")),
    }
}

/// An IP as a URL host (IPv6 in brackets).
fn url_host(ip: &str) -> String {
    if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

fn parse_participation(s: &str) -> Result<Participation, String> {
    match s {
        "testnet" => Ok(Participation::Testnet),
        "mainnet" => Ok(Participation::Mainnet),
        "both" => Ok(Participation::Both),
        _ => Err(format!(
            "{s:?} is not a participation: use testnet, mainnet or both"
        )),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Each cause once, on one line (anyhow's `Caused by:` list repeats quoted causes), in the
    // log format.
    resultity_logging::exit_code(run_cli().await)
}

async fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init("info")?;
    match cli.command {
        Command::Run(a) => run(*a, cli.dry_run).await,
        Command::Drain(d) if cli.dry_run => {
            println!(
                "would ask {} to drain (deregister: {}, wait: {})",
                d.url, d.deregister, d.wait
            );
            Ok(())
        }
        Command::Drain(d) => drain(d).await,
        Command::Doctor(d) if cli.dry_run => {
            println!(
                "would check {} for network {} with {} pinned key(s)",
                d.network.io_url,
                d.network.network_id,
                d.network.network_keys.len()
            );
            Ok(())
        }
        Command::Doctor(d) => doctor(d).await,
    }
}

/// Prints one line per check; a failed check makes the exit status 1 (a bad flag: 2, by clap).
async fn doctor(d: DoctorArgs) -> anyhow::Result<()> {
    use resultity_sidecar::doctor::{DoctorSettings, diagnose};
    let (io_url, network_id, network_keys) = d.network.parse()?;
    let settings = DoctorSettings {
        io_url,
        network_id,
        network_keys,
        max_clock_skew: Duration::from_millis(d.max_clock_skew_ms),
        timeout: Duration::from_secs(d.timeout_seconds.max(1)),
    };
    // Read before the network checks: the report is the same whichever line uses it.
    let gpu = resultity_sidecar::gpu::GpuProbe::new(&d.gpu.settings())
        .report()
        .await;
    let report = diagnose(
        &settings,
        &resultity_protocol::clock::SystemClock,
        move || gpu,
    )
    .await?;
    print!("{report}");
    if report.passed() {
        return Ok(());
    }
    // Exit 1 without anyhow's error line: the failing checks already said why, once each.
    std::io::Write::flush(&mut std::io::stdout()).context("writing the report")?;
    std::process::exit(1)
}

/// Client side of `POST /drain`, for the pod's preStop hook (exec, so the token never appears
/// in the pod spec).
async fn drain(d: DrainArgs) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&d.admin_token_file)
        .with_context(|| format!("reading admin token file {}", d.admin_token_file.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()?;
    let base = d.url.trim_end_matches('/');
    let r = http
        .post(format!("{base}/drain?deregister={}", d.deregister))
        .bearer_auth(token.trim())
        .send()
        .await
        .with_context(|| format!("asking {base} to drain"))?;
    anyhow::ensure!(
        r.status().is_success(),
        "drain request refused: HTTP {}",
        r.status()
    );
    if !d.wait {
        return Ok(());
    }
    let deadline = resultity_sidecar::agent::deadline_after(Duration::from_secs(d.timeout_seconds));
    loop {
        let st = http
            .get(format!("{base}/status"))
            .bearer_auth(token.trim())
            .send()
            .await;
        if let Ok(r) = st
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["drained"] == serde_json::Value::Bool(true)
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not drained after {} s",
            d.timeout_seconds
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(a: Args, dry_run: bool) -> anyhow::Result<()> {
    let admin_token = match &a.admin_token_file {
        Some(p) if dry_run => format!("<read from {}>", p.display()),
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading admin token file {}", p.display()))?
            .trim()
            .to_owned(),
        None => String::new(),
    };
    let (io_url, network_id, network_keys) = a.network.parse()?;
    let settings = Settings {
        io_url,
        network_id,
        network_keys,
        key_file: a.key_file,
        data_dir: a.data_dir,
        runtime_kind: a.runtime,
        runtime_url: a.runtime_url,
        runtime_image: a.runtime_image,
        max_concurrency: a.max_concurrency,
        runtime_options: RuntimeOptions {
            health_path: Some(a.runtime_health_path),
        },
        runtime_probe: ProbeSettings {
            interval: Duration::from_secs(a.probe_interval_seconds),
            timeout: Duration::from_secs(a.probe_timeout_seconds),
            failure_threshold: a.probe_failure_threshold,
        },
        participation: a.participation,
        subclouds: a.subclouds,
        models: a.models,
        listen: a.listen,
        admin_token,
        drain_grace: Duration::from_secs(a.drain_grace_seconds),
        pod_uid: a.pod_uid.filter(|u| !u.is_empty()),
        gpu: a.gpu.settings(),
        enforce_gpu_memory: a.enforce_gpu_memory,
        outbox_sync: a.outbox_sync,
    };
    if dry_run {
        println!(
            "would run: network {} at {} with {} pinned key(s), {} runtime at {}, models {}, GPU check {}{}, state in {}",
            settings.network_id,
            settings.io_url,
            settings.network_keys.len(),
            settings.runtime_kind.as_str(),
            settings.runtime_url,
            if settings.models.is_empty() {
                "all approved".to_owned()
            } else {
                settings.models.join(", ")
            },
            settings.gpu.mode.as_str(),
            settings
                .gpu
                .dcgm_url
                .as_deref()
                .map(|u| format!(" (dcgm-exporter {u})"))
                .unwrap_or_default(),
            settings.data_dir.display()
        );
        return Ok(());
    }
    let agent = Agent::new(settings).context("starting the agent")?;
    tracing::info!(node_id = %agent.node_id(), "resultity sidecar starting");
    // SIGTERM (pod deletion) and Ctrl-C both drain; a second signal stops at once.
    let drainer = agent.clone();
    let stop = async move {
        wait_signal().await;
        drainer.drain_and_exit();
        wait_signal().await;
        tracing::warn!("second signal: stopping without finishing the drain");
    };
    match agent.run(stop).await? {
        Exit::Drained => Ok(()),
        Exit::DrainIncomplete => {
            anyhow::bail!("drain grace ended with unconfirmed results (kept in the outbox)")
        }
        Exit::Stopped => anyhow::bail!("stopped before draining finished"),
    }
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
