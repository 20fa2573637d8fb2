//! `resultity-io`: the reference IO service binary. Thin: parses flags (each with an
//! environment fallback), loads the key and the config payload, and runs the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use resultity_io::publish::load_payload;
use resultity_io::{IoService, Settings};
use resultity_protocol::{NetworkId, NetworkKeypair};

#[derive(Debug, Parser)]
#[command(
    name = "resultity-io",
    version,
    about = "Reference network side of Resultity"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the node protocol, the job entry points and the operational endpoints.
    Serve(Box<ServeArgs>),
    /// Write a new network key file (mode 0600) and print its key id.
    Keygen {
        /// Key file to create (must not exist).
        #[arg(long, env = "RESULTITY_IO_KEYGEN_OUT")]
        out: PathBuf,
    },
    /// Config snapshots.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Send a payload (YAML or JSON) to a running service, which signs and publishes the next
    /// version.
    Publish {
        /// Payload file (YAML, or JSON for `.json`).
        file: PathBuf,
        /// Base URL of the running service.
        #[arg(
            long,
            env = "RESULTITY_IO_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        url: String,
        /// Admin token of the running service.
        #[arg(long, env = "RESULTITY_IO_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: String,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the single listener (node protocol, job API, metrics).
    #[arg(long, env = "RESULTITY_IO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Network id (DNS label) nodes must address.
    #[arg(long, env = "RESULTITY_IO_NETWORK_ID")]
    network_id: String,
    /// Network key file written by `resultity-io keygen`.
    #[arg(long, env = "RESULTITY_IO_KEY_FILE")]
    key_file: PathBuf,
    /// Key file of the network key to rotate to: the service publishes a rotation signed by
    /// the current key and switches to the new one when the overlap ends.
    #[arg(long, env = "RESULTITY_IO_NEXT_KEY_FILE")]
    next_key_file: Option<PathBuf>,
    /// How long the old key stays trusted during a rotation, seconds.
    #[arg(long, env = "RESULTITY_IO_KEY_OVERLAP_S", default_value_t = 24 * 3600)]
    key_overlap_s: u64,
    /// Network config payload (YAML, or JSON for `.json`); re-read on SIGHUP.
    #[arg(long, env = "RESULTITY_IO_CONFIG_FILE")]
    config_file: PathBuf,
    /// File holding the last published signed snapshot; restarts continue its version chain.
    #[arg(long, env = "RESULTITY_IO_CONFIG_STATE")]
    config_state: Option<PathBuf>,
    /// Enables `/v1/admin/*` with `Authorization: Bearer <token>`.
    #[arg(long, env = "RESULTITY_IO_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Lifetime of a signed config snapshot, seconds (re-signed at half-life).
    #[arg(long, env = "RESULTITY_IO_CONFIG_TTL_S", default_value_t = 7 * 24 * 3600)]
    config_ttl_s: u64,
    /// Largest HTTP request body, bytes.
    #[arg(long, env = "RESULTITY_IO_MAX_BODY_BYTES", default_value_t = resultity_protocol::limits::MAX_ENVELOPE_BYTES)]
    max_body_bytes: usize,
    /// Largest WebSocket message from a node, bytes.
    #[arg(long, env = "RESULTITY_IO_MAX_FRAME_BYTES", default_value_t = resultity_protocol::limits::MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Open node sessions before new ones get 503.
    #[arg(long, env = "RESULTITY_IO_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Concurrent HTTP requests before 503.
    #[arg(
        long,
        env = "RESULTITY_IO_MAX_HTTP_CONCURRENCY",
        default_value_t = 4096
    )]
    max_http_concurrency: usize,
    /// Open TCP connections (sessions included); further clients wait in the backlog.
    #[arg(long, env = "RESULTITY_IO_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: usize,
    /// Jobs waiting for a node before callers get 429.
    #[arg(long, env = "RESULTITY_IO_MAX_QUEUE", default_value_t = 1024)]
    max_queue: usize,
    /// Signed HTTP requests per second per node.
    #[arg(long, env = "RESULTITY_IO_NODE_RATE", default_value_t = 5.0)]
    node_rate_per_s: f64,
    /// Registration challenges per second per client IP.
    #[arg(long, env = "RESULTITY_IO_CHALLENGE_RATE", default_value_t = 20.0)]
    challenge_rate_per_ip: f64,
    /// Burst of registration challenges per client IP.
    #[arg(long, env = "RESULTITY_IO_CHALLENGE_BURST", default_value_t = 100.0)]
    challenge_burst_per_ip: f64,
    /// Execution deadline of one attempt, ms.
    #[arg(
        long,
        env = "RESULTITY_IO_ATTEMPT_TIMEOUT_MS",
        default_value_t = 120_000
    )]
    attempt_timeout_ms: u64,
    /// Total time a caller waits for a job, ms.
    #[arg(
        long,
        env = "RESULTITY_IO_REQUEST_TIMEOUT_MS",
        default_value_t = 300_000
    )]
    request_timeout_ms: u64,
    /// Assignments per job before it fails for good.
    #[arg(long, env = "RESULTITY_IO_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// Failed incidents in a row before a node is excluded for the cooldown (the network
    /// config's `penalties` overrides it).
    #[arg(long, env = "RESULTITY_IO_EXCLUDE_AFTER_FAILURES", default_value_t = 3)]
    exclude_after_failures: u32,
    /// How long an excluded node gets no jobs, ms.
    #[arg(
        long,
        env = "RESULTITY_IO_EXCLUSION_COOLDOWN_MS",
        default_value_t = 60_000
    )]
    exclusion_cooldown_ms: u64,
    /// Failures of one cause within this many ms of the first are one incident (0: every
    /// failure counts).
    #[arg(long, env = "RESULTITY_IO_INCIDENT_WINDOW_MS", default_value_t = 5_000)]
    incident_window_ms: u64,
    /// A request's headers must arrive within this many ms (else the connection is closed).
    #[arg(long, env = "RESULTITY_IO_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// A request's body must arrive within this many ms after its headers.
    #[arg(long, env = "RESULTITY_IO_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    body_timeout_ms: u64,
    /// Invalid signatures within one session before it is closed (4002).
    #[arg(long, env = "RESULTITY_IO_MAX_INVALID_SIGNATURES", default_value_t = 5)]
    max_invalid_signatures: u32,
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
    match cli.cmd {
        Cmd::Serve(args) => serve(*args).await,
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Config(ConfigCmd::Publish {
            file,
            url,
            admin_token,
        }) => publish(&file, &url, &admin_token).await,
    }
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let key = NetworkKeypair::generate().context("generating a key")?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
    f.write_all(key.to_key_file_text().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", key.id());
    Ok(())
}

async fn publish(file: &Path, url: &str, token: &str) -> anyhow::Result<()> {
    // Validate locally first so a typo is reported here, not as a remote 400.
    let payload = load_payload(file)?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let resp = client
        .post(format!("{}/v1/admin/config", url.trim_end_matches('/')))
        .bearer_auth(token)
        .json(&payload)
        .send()
        .await
        .with_context(|| format!("posting to {url}"))?;
    let status = resp.status();
    let text = read_answer(resp)
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        bail!("publish refused ({status}): {text}");
    }
    println!("{text}");
    Ok(())
}

/// The admin API's answer, at most 1 MiB (it is a short JSON object); a longer one is an error
/// rather than memory spent.
async fn read_answer(mut resp: reqwest::Response) -> anyhow::Result<String> {
    const MAX: usize = 1 << 20;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX {
            bail!("the answer is over {MAX} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let key_text = std::fs::read_to_string(&args.key_file)
        .with_context(|| format!("reading key file {}", args.key_file.display()))?;
    let key =
        NetworkKeypair::from_key_file_text(key_text.trim()).context("parsing the key file")?;
    let network_id = NetworkId::parse(&args.network_id).context("--network-id")?;
    let payload = load_payload(&args.config_file)?;
    let mut settings = Settings::new(network_id, key, payload);
    if let Some(path) = &args.next_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading next key file {}", path.display()))?;
        settings.next_network_key = Some(
            NetworkKeypair::from_key_file_text(text.trim()).context("parsing the next key file")?,
        );
    }
    settings.key_overlap_ms = args.key_overlap_s.saturating_mul(1000);
    settings.listen = args.listen;
    settings.config_source = Some(args.config_file);
    settings.admin_token = args.admin_token;
    settings.config_state = args.config_state;
    settings.config_ttl_ms = args.config_ttl_s.saturating_mul(1000);
    settings.limits.max_body_bytes = args.max_body_bytes;
    settings.limits.max_frame_bytes = args.max_frame_bytes;
    settings.limits.max_sessions = args.max_sessions;
    settings.limits.max_connections = args.max_connections;
    settings.limits.max_http_concurrency = args.max_http_concurrency;
    settings.limits.max_queue = args.max_queue;
    settings.limits.node_http_rate_per_s = args.node_rate_per_s;
    settings.limits.challenge_rate_per_ip_per_s = args.challenge_rate_per_ip;
    settings.limits.challenge_burst_per_ip = args.challenge_burst_per_ip;
    settings.scheduler.attempt_timeout_ms = args.attempt_timeout_ms;
    settings.scheduler.request_timeout_ms = args.request_timeout_ms;
    settings.scheduler.max_attempts = args.max_attempts;
    settings.limits.header_timeout_ms = args.header_timeout_ms.max(1);
    settings.limits.body_timeout_ms = args.body_timeout_ms.max(1);
    settings.scheduler.exclude_after_failures = args.exclude_after_failures.max(1);
    settings.scheduler.exclusion_cooldown_ms = args.exclusion_cooldown_ms;
    settings.scheduler.incident_window_ms = args.incident_window_ms;
    settings.scheduler.max_invalid_signatures = args.max_invalid_signatures.max(1);
    let handle = IoService::start(settings).await?;
    println!("resultity-io listening on {}", handle.base_url());
    wait_for_signals(&handle).await;
    handle.shutdown().await;
    Ok(())
}

/// SIGHUP re-reads the config file; SIGINT/SIGTERM stop the service.
async fn wait_for_signals(handle: &resultity_io::IoServiceHandle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut hup), Ok(mut term)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match handle.state().reload() {
                    Ok(Some(p)) => tracing::info!(version = p.version, "config reloaded and published"),
                    Ok(None) => tracing::info!("config unchanged"),
                    Err(e) => tracing::error!(error = %e, "config reload failed; the current one stays"),
                },
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
