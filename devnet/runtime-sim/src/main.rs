//! `resultity-runtime-sim`: a simulated vLLM/Triton runtime on one port, for the devnet, tests
//! and benchmarks. Every flag also reads an environment variable.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use resultity_runtime_sim::{Faults, Flavor, SimConfig};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Simulated inference runtime (vLLM OpenAI-compatible API and Triton KServe v2 API)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Models served (comma-separated).
    #[arg(
        long,
        env = "SIM_MODELS",
        value_delimiter = ',',
        default_value = "sim-model"
    )]
    models: Vec<String>,
    /// Fixed time before the first token of each request, in ms.
    #[arg(long, env = "SIM_PREFILL_MS", default_value_t = 20)]
    prefill_ms: u64,
    /// Decode time per output token at batch size 1, in µs.
    #[arg(long, env = "SIM_DECODE_US_PER_TOKEN", default_value_t = 2000)]
    decode_us_per_token: u64,
    /// Sequences decoded concurrently (continuous batching); more requests wait.
    #[arg(long, env = "SIM_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Per-token slowdown at a full batch, in percent.
    #[arg(long, env = "SIM_BATCH_SLOWDOWN_PCT", default_value_t = 30)]
    batch_slowdown_pct: u64,
    /// Output tokens when a request names no max_tokens.
    #[arg(long, env = "SIM_DEFAULT_MAX_TOKENS", default_value_t = 16)]
    default_max_tokens: u32,
    /// Per mille of inference requests that fail with HTTP 500.
    #[arg(long, env = "SIM_ERROR_RATE_PERMILLE", default_value_t = 0)]
    error_rate_permille: u32,
    /// Exit (status 1) after this many inference requests.
    #[arg(long, env = "SIM_CRASH_AFTER")]
    crash_after: Option<u64>,
    /// Seed of the fault RNG.
    #[arg(long, env = "SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// While requests are in progress, hold each new connection back up to this many ms
    /// (llama.cpp's fixed connection pool under load); 0 = off.
    #[arg(long, env = "SIM_STALL_NEW_CONNECTIONS_MS", default_value_t = 0)]
    stall_new_connections_ms: u64,
    /// Server imitated beyond the OpenAI API: vllm or llamacpp (llamacpp: metric names and
    /// GET /props).
    #[arg(long, env = "SIM_FLAVOR", value_parser = parse_flavor, default_value = "vllm")]
    flavor: Flavor,
    /// Serve no /health endpoint (as llama-cpp-python's server).
    #[arg(long, env = "SIM_NO_HEALTH_ENDPOINT")]
    no_health_endpoint: bool,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
}

fn parse_flavor(s: &str) -> Result<Flavor, String> {
    match s {
        "vllm" => Ok(Flavor::Vllm),
        "llamacpp" => Ok(Flavor::LlamaCpp),
        _ => Err(format!("{s} is not a flavor: use vllm or llamacpp")),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Each cause once, on one line, in the log format.
    resultity_logging::exit_code(run(Args::parse()).await)
}

async fn run(a: Args) -> anyhow::Result<()> {
    a.log.init("info")?;
    let cfg = SimConfig {
        models: a.models,
        prefill_ms: a.prefill_ms,
        decode_us_per_token: a.decode_us_per_token,
        max_batch: a.max_batch,
        batch_slowdown_pct: a.batch_slowdown_pct,
        default_max_tokens: a.default_max_tokens,
        seed: a.seed,
        faults: Faults {
            error_rate_permille: a.error_rate_permille,
            crash_after: a.crash_after,
            stall_new_connections_ms: a.stall_new_connections_ms,
            ..Faults::default()
        },
        flavor: a.flavor,
        health_endpoint: !a.no_health_endpoint,
    };
    let mut sim = resultity_runtime_sim::start(cfg, a.listen)
        .await
        .context("starting the runtime simulator")?;
    println!("runtime simulator listening on {}", sim.url());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            sim.shutdown().await;
            Ok(())
        }
        _ = sim.stopped() => anyhow::bail!("runtime simulator crashed (fault injection)"),
    }
}
