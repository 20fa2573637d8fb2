//! `resultity-devnet`: runs a whole local Resultity network to completion, or (`serve`) keeps
//! one up for OpenAI clients. Contract: `--help` and the README.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use resultity_devnet::{
    Devnet, DevnetConfig, LoadConfig, Progress, RuntimeChoice, Summary, run_load,
};

/// A local Resultity network on loopback: one IO service, N sidecars, N runtime simulators.
///
/// Without a subcommand it submits M jobs through the OpenAI-compatible entry point (Triton:
/// the KServe v2 entry point), checks every answer and exits 0 only if every job completed
/// with a verified signature.
#[derive(Debug, Parser)]
#[command(name = "resultity-devnet", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Nodes (sidecar + runtime simulator each).
    #[arg(long, env = "RESULTITY_DEVNET_NODES", default_value_t = 4)]
    nodes: usize,
    /// Jobs to submit.
    #[arg(long, env = "RESULTITY_DEVNET_JOBS", default_value_t = 200)]
    jobs: usize,
    /// Jobs in flight at once.
    #[arg(long, env = "RESULTITY_DEVNET_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Runtime API the nodes drive.
    #[arg(long, env = "RESULTITY_DEVNET_RUNTIME", value_enum, default_value_t = RuntimeChoice::Vllm)]
    runtime: RuntimeChoice,
    /// Simulated runtime latency per request, milliseconds.
    #[arg(long, env = "RESULTITY_DEVNET_LATENCY_MS", default_value_t = 20)]
    latency_ms: u64,
    /// Print one summary JSON object as the last stdout line.
    #[arg(long, env = "RESULTITY_DEVNET_JSON")]
    json: bool,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Keep the network up until Ctrl-C and print its OpenAI-compatible endpoint.
    Serve {
        /// Nodes (sidecar + runtime simulator each).
        #[arg(long, env = "RESULTITY_DEVNET_NODES", default_value_t = 4)]
        nodes: usize,
        /// Runtime API the nodes drive.
        #[arg(long, env = "RESULTITY_DEVNET_RUNTIME", value_enum, default_value_t = RuntimeChoice::Vllm)]
        runtime: RuntimeChoice,
        /// Simulated runtime latency per request, milliseconds.
        #[arg(long, env = "RESULTITY_DEVNET_LATENCY_MS", default_value_t = 20)]
        latency_ms: u64,
        /// The IO service's listener (loopback only).
        #[arg(
            long,
            env = "RESULTITY_DEVNET_LISTEN",
            default_value = "127.0.0.1:8080"
        )]
        listen: SocketAddr,
        /// Simulated decode time per output token, microseconds: the pace a streamed answer
        /// arrives at.
        #[arg(
            long,
            env = "RESULTITY_DEVNET_DECODE_US_PER_TOKEN",
            default_value_t = 0
        )]
        decode_us_per_token: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only errors by default: the progress table and the summary are the output.
    if let Err(e) = cli.log.init("error") {
        return resultity_logging::exit_code(Err(anyhow::Error::new(e)));
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return resultity_logging::exit_code(Err(
                anyhow::Error::new(e).context("starting the tokio runtime")
            ));
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Some(Command::Serve {
                nodes,
                runtime,
                latency_ms,
                listen,
                decode_us_per_token,
            }) => serve(nodes, runtime, latency_ms, listen, decode_us_per_token).await,
            None => run(cli).await,
        }
    });
    // Node runtimes are shut down in the background; do not wait for stragglers.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => resultity_logging::exit_code(Err(e)),
    }
}

async fn serve(
    nodes: usize,
    runtime: RuntimeChoice,
    latency_ms: u64,
    listen: SocketAddr,
    decode_us_per_token: u64,
) -> anyhow::Result<bool> {
    let net = Devnet::start(DevnetConfig {
        nodes,
        runtime,
        latency_ms,
        listen,
        decode_us_per_token,
        ..DevnetConfig::default()
    })
    .await
    .context("starting the devnet")?;
    net.wait_ready(Duration::from_secs(30)).await?;
    // Advertise only what the nodes serve: Triton answers KServe v2, not OpenAI completions
    // (the IO service refuses those for models only Triton nodes serve).
    match runtime {
        RuntimeChoice::Vllm => println!("OpenAI-compatible endpoint: {}", net.openai_base_url()),
        RuntimeChoice::Triton => println!(
            "KServe v2 endpoint: {}/v2/models/{}/infer",
            net.base_url(),
            resultity_devnet::MODEL
        ),
    }
    std::io::stdout().flush().ok();
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    net.shutdown().await;
    Ok(true)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    if cli.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let tty = std::io::stderr().is_terminal();
    let net = Arc::new(
        Devnet::start(DevnetConfig {
            nodes: cli.nodes,
            runtime: cli.runtime,
            latency_ms: cli.latency_ms,
            ..DevnetConfig::default()
        })
        .await
        .context("starting the devnet")?,
    );
    if tty {
        eprintln!(
            "devnet: IO service at {}, {} nodes ({}); waiting for them to serve…",
            net.base_url(),
            cli.nodes,
            cli.runtime.kind().as_str()
        );
    }
    net.wait_ready(Duration::from_secs(30)).await?;
    let progress = Arc::new(Progress::default());
    // Lines on screen, so the final redraw overwrites the last frame.
    let drawn = Arc::new(AtomicUsize::new(0));
    let display = tty.then(|| {
        let (net, progress, drawn) = (net.clone(), progress.clone(), drawn.clone());
        tokio::spawn(async move {
            loop {
                let lines = draw(&net, &progress, drawn.load(Ordering::Relaxed));
                drawn.store(lines, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    });
    let cfg = LoadConfig {
        jobs: cli.jobs,
        concurrency: cli.concurrency,
        runtime: cli.runtime,
        ..LoadConfig::default()
    };
    let summary = run_load(&net.base_url(), &cfg, progress.clone()).await?;
    if let Some(d) = display {
        d.abort();
        let _ = d.await;
        draw(&net, &progress, drawn.load(Ordering::Relaxed));
    }
    let summary = summary.with_network(&net);
    print_table(&summary);
    for f in &summary.failures {
        eprintln!("failed: {f}");
    }
    if cli.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if let Ok(net) = Arc::try_unwrap(net) {
        net.shutdown().await;
    }
    Ok(summary.all_verified())
}

/// Redraws the progress bar and node table on stderr; returns the lines drawn.
fn draw(net: &Devnet, p: &Progress, previous: usize) -> usize {
    let total = p.total.load(Ordering::Relaxed).max(1);
    let done = p.done.load(Ordering::Relaxed);
    let failed = p.failed.load(Ordering::Relaxed);
    const WIDTH: usize = 40;
    let filled = (done + failed) * WIDTH / total;
    let mut out = String::new();
    if previous > 0 {
        out.push_str(&format!("\x1b[{previous}A"));
    }
    out.push_str(&format!(
        "\x1b[K[{}{}] {}/{} done, {} failed\n",
        "#".repeat(filled),
        "·".repeat(WIDTH - filled),
        done,
        total,
        failed
    ));
    out.push_str(&format!(
        "\x1b[K{:<6}{:>8}{:>12}  state\n",
        "node", "jobs", "mean ms"
    ));
    let per = p.per_node();
    for n in &net.nodes {
        let (jobs, ms) = per.get(&n.node_id()).copied().unwrap_or((0, 0.0));
        out.push_str(&format!(
            "\x1b[K{:<6}{:>8}{:>12.1}  {}\n",
            n.index,
            jobs,
            ms,
            n.state()
        ));
    }
    eprint!("{out}");
    2 + net.nodes.len()
}

fn print_table(s: &Summary) {
    let rows: [(&str, String); 9] = [
        ("jobs submitted", s.jobs_submitted.to_string()),
        ("jobs completed", s.jobs_completed.to_string()),
        ("jobs failed", s.jobs_failed.to_string()),
        ("jobs reassigned", s.jobs_reassigned.to_string()),
        ("signatures verified", s.signatures_verified.to_string()),
        ("messages rejected", s.messages_rejected.to_string()),
        ("latency p50 (ms)", format!("{:.1}", s.p50_ms)),
        ("latency p99 (ms)", format!("{:.1}", s.p99_ms)),
        ("jobs per second", format!("{:.1}", s.jobs_per_s)),
    ];
    println!("{:-<34}", "");
    for (k, v) in rows {
        println!("{k:<22}{v:>12}");
    }
    println!("{:-<34}", "");
    let completed = s.jobs_completed.max(1) as f64;
    println!("jobs per node");
    for (node, jobs) in &s.jobs_per_node {
        let share = 100.0 * *jobs as f64 / completed;
        println!("  {node}  {jobs:>8} {share:>6.1}%");
    }
    println!("{:-<34}", "");
    let verdict = if s.all_verified() {
        "OK: every job completed with a verified signature"
    } else {
        "FAILED: not every job completed with a verified signature"
    };
    println!("{verdict}");
}
