//! A simulated inference runtime for tests, the devnet and benchmarks.
//!
//! It speaks the two runtime APIs the sidecar drives — vLLM's OpenAI-compatible server
//! (`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/metrics`) and Triton's
//! KServe v2 protocol (`/v2/health/ready`, `/v2/models/{m}/ready`, `/v2/models/{m}/infer`,
//! `/v2/repository/index`, load/unload) — on one listener, with:
//! * a latency model: prefill time plus per-token decode time, with continuous batching of up to
//!   `max_batch` sequences whose per-token time grows mildly with the batch, so throughput grows
//!   with concurrency the way vLLM's does;
//! * deterministic outputs derived from model and prompt ([`generate`]), so results are checkable,
//!   ending on a prompt-dependent natural stop (`finish_reason: "stop"`) or at `max_tokens`
//!   (`"length"`); `n` choices; OpenAI's `context_length_exceeded` past a 4096-token context;
//! * `"stream": true`: OpenAI server-sent events, one token per event after each per-token
//!   decode delay, `stream_options.include_usage`, `[DONE]` (a crash cuts the stream without it);
//! * fault injection: error rate, hangs, down, per-model failures, crash after N requests, and
//!   new connections stalled while requests are in progress (llama.cpp's `llama-server` serves
//!   a fixed pool of connections: a new one waits until a busy keep-alive one frees) —
//!   settable at start or live through `POST /sim/faults`;
//! * other OpenAI-compatible servers' faces ([`Flavor`]): llama.cpp's metric names and
//!   `GET /props` slots, or no `/health` endpoint at all (llama-cpp-python);
//! * `GET /sim/stats` with the peak concurrency seen, so tests can assert parallelism, and the
//!   streams still open (with the `hold_streams_after_tokens` fault, a test sees a stream
//!   mid-generation as a condition rather than a race).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Notify, Semaphore, watch};

/// Faults the simulator injects. Every field can be changed live through `POST /sim/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Per mille of inference requests answered with HTTP 500.
    pub error_rate_permille: u32,
    /// Inference requests never answer (until `hang` is cleared or the server stops).
    pub hang: bool,
    /// Health endpoints and inference answer 503, as a runtime that is restarting.
    pub down: bool,
    /// Models whose inference always fails with HTTP 500 (a broken model).
    pub failing_models: Vec<String>,
    /// Stop serving after this many inference requests (simulated crash).
    pub crash_after: Option<u64>,
    /// While any inference request is in progress, a newly accepted connection is not served
    /// until none is or this many ms passed (0 = off). Connections already open are unaffected.
    pub stall_new_connections_ms: u64,
    /// Streams pause after emitting this many tokens (per choice) until the field is cleared:
    /// lets a test observe a stream mid-generation without relying on timing.
    pub hold_streams_after_tokens: Option<u32>,
}

/// Which OpenAI-compatible server the simulator imitates beyond the shared API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// vLLM: `vllm:` metric names.
    #[default]
    Vllm,
    /// llama.cpp's `llama-server`: `llamacpp:` metric names and `GET /props` with
    /// `total_slots` (= `max_batch`).
    LlamaCpp,
}

/// Latency and capacity model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Models served (vLLM `/v1/models`, Triton repository).
    pub models: Vec<String>,
    /// Fixed time before the first token of each request.
    pub prefill_ms: u64,
    /// Decode time per output token at batch size 1, in microseconds.
    pub decode_us_per_token: u64,
    /// Sequences decoded concurrently; more requests wait (vLLM's `num_requests_waiting`).
    pub max_batch: usize,
    /// Per-token slowdown at a full batch, in percent (memory-bandwidth contention).
    pub batch_slowdown_pct: u64,
    /// Output tokens when the request names no `max_tokens`.
    pub default_max_tokens: u32,
    /// Seed of the fault RNG, so error patterns repeat run to run.
    pub seed: u64,
    pub faults: Faults,
    /// Metric names and extra endpoints of the imitated server.
    #[serde(default)]
    pub flavor: Flavor,
    /// Whether `GET /health` exists (llama-cpp-python's server has none: 404).
    #[serde(default = "yes")]
    pub health_endpoint: bool,
}

fn yes() -> bool {
    true
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec!["sim-model".into()],
            prefill_ms: 20,
            decode_us_per_token: 2_000,
            max_batch: 64,
            batch_slowdown_pct: 30,
            default_max_tokens: 16,
            seed: 1,
            faults: Faults::default(),
            flavor: Flavor::Vllm,
            health_endpoint: true,
        }
    }
}

/// Counters exposed at `GET /sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    pub requests: u64,
    pub completed: u64,
    pub errors: u64,
    pub running: u64,
    pub waiting: u64,
    /// Highest number of inference requests in progress at once.
    pub max_running: u64,
    pub generation_tokens_total: u64,
    pub prompt_tokens_total: u64,
    /// Connections that waited because of `stall_new_connections_ms`.
    pub stalled_connections: u64,
    /// Streamed answers still generating.
    pub streams_open: u64,
    /// Tokens sent on streams so far.
    pub streamed_tokens: u64,
}

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid simulator config: {0}")]
    Config(String),
}

struct Shared {
    cfg: SimConfig,
    faults: Mutex<Faults>,
    /// Loaded models (Triton load/unload changes it).
    loaded: Mutex<Vec<String>>,
    slots: Arc<Semaphore>,
    unhang: Notify,
    /// Mirrors `faults.hold_streams_after_tokens`, so streams wait for it to change.
    hold: watch::Sender<Option<u32>>,
    streams_open: AtomicU64,
    streamed_tokens: AtomicU64,
    rng: AtomicU64,
    requests: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    max_running: AtomicU64,
    gen_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    stalled: AtomicU64,
    crash: watch::Sender<bool>,
}

impl Shared {
    fn stats(&self) -> SimStats {
        SimStats {
            requests: self.requests.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            max_running: self.max_running.load(Ordering::Relaxed),
            generation_tokens_total: self.gen_tokens.load(Ordering::Relaxed),
            prompt_tokens_total: self.prompt_tokens.load(Ordering::Relaxed),
            stalled_connections: self.stalled.load(Ordering::Relaxed),
            streams_open: self.streams_open.load(Ordering::Relaxed),
            streamed_tokens: self.streamed_tokens.load(Ordering::Relaxed),
        }
    }

    /// xorshift64*: a seeded, lock-free stream for fault decisions.
    fn next_random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .rng
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_f491_4f6c_dd1d),
                Err(cur) => x = cur,
            }
        }
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<SharedDebug>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Wrapper so `SimHandle` can derive Debug without exposing internals.
struct SharedDebug(Arc<Shared>);
impl std::fmt::Debug for SharedDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeSim").finish_non_exhaustive()
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn stats(&self) -> SimStats {
        self.shared.0.stats()
    }
    /// Replaces the fault settings (hung requests are released when `hang` turns off).
    pub async fn set_faults(&self, faults: Faults) {
        set_faults(&self.shared.0, faults).await;
    }
    /// True once the server stopped (crash fault or [`SimHandle::shutdown`]).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
    /// Crashes now: the listener closes, requests in progress or hung fail with 503.
    pub fn crash(&self) {
        let _ = self.shared.0.crash.send(true);
    }
    /// Resolves when the server stops by itself (the crash fault).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.task).await;
    }
    /// Stops serving and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.shared.0.unhang.notify_waiters();
        let _ = self.task.await;
    }
}

async fn set_faults(shared: &Shared, faults: Faults) {
    let unhang = !faults.hang;
    shared.hold.send_replace(faults.hold_streams_after_tokens);
    *shared.faults.lock().await = faults;
    if unhang {
        shared.unhang.notify_waiters();
    }
}

/// Starts a simulator on `addr` (use port 0 for an ephemeral port).
pub async fn start(cfg: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
    if cfg.max_batch == 0 {
        return Err(SimError::Config("max_batch must be at least 1".into()));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let (crash_tx, mut crash_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        faults: Mutex::new(cfg.faults.clone()),
        loaded: Mutex::new(cfg.models.clone()),
        slots: Arc::new(Semaphore::new(cfg.max_batch)),
        unhang: Notify::new(),
        hold: watch::channel(cfg.faults.hold_streams_after_tokens).0,
        streams_open: AtomicU64::new(0),
        streamed_tokens: AtomicU64::new(0),
        rng: AtomicU64::new(cfg.seed.max(1)),
        requests: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        running: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        max_running: AtomicU64::new(0),
        gen_tokens: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        stalled: AtomicU64::new(0),
        crash: crash_tx,
        cfg,
    });
    let app = router(shared.clone());
    let listener = StallingListener {
        inner: listener,
        shared: shared.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let crash_shared = shared.clone();
    let task = tokio::spawn(async move {
        // Both a stop and a crash close the listener (new connections are refused) and every
        // keep-alive connection; a crash also fails whatever is in flight or hung.
        let shutdown = async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = crash_rx.wait_for(|c| *c) => {
                    tracing::warn!("runtime simulator crashed (fault injection)");
                    crash_shared.unhang.notify_waiters();
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "runtime simulator stopped with an error");
        }
    });
    Ok(SimHandle {
        addr,
        shared: Arc::new(SharedDebug(shared)),
        stop: Some(stop_tx),
        task,
    })
}

/// Accepts connections, holding each new one back while the runtime is busy when the stall
/// fault is on — the way a fixed connection pool behaves under load.
struct StallingListener {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for StallingListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let conn = axum::serve::Listener::accept(&mut self.inner).await;
        // As vLLM's server (uvicorn) does: without it, a streamed token written right after
        // the previous one waits for the client's delayed ACK (up to 40 ms on Linux).
        if let Err(e) = conn.0.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let stall_ms = self.shared.faults.lock().await.stall_new_connections_ms;
        let busy =
            |s: &Shared| s.running.load(Ordering::Relaxed) + s.waiting.load(Ordering::Relaxed) > 0;
        if stall_ms > 0 && busy(&self.shared) {
            self.shared.stalled.fetch_add(1, Ordering::Relaxed);
            // A stall too long to represent is a stall until the runtime is idle.
            let deadline = tokio::time::Instant::now().checked_add(Duration::from_millis(stall_ms));
            while busy(&self.shared) && deadline.is_none_or(|d| tokio::time::Instant::now() < d) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        conn
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let openai = if shared.cfg.health_endpoint {
        Router::new().route("/health", get(health))
    } else {
        Router::new()
    };
    let openai = match shared.cfg.flavor {
        Flavor::Vllm => openai,
        Flavor::LlamaCpp => openai.route("/props", get(props)),
    };
    openai
        // OpenAI-compatible (vLLM, llama.cpp, …)
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics))
        // Triton (KServe v2)
        .route("/v2/health/ready", get(health))
        .route("/v2/health/live", get(live))
        .route("/v2/models/{model}/ready", get(triton_model_ready))
        .route("/v2/models/{model}/infer", post(triton_infer))
        .route("/v2/repository/index", post(triton_index))
        .route("/v2/repository/models/{model}/load", post(triton_load))
        .route("/v2/repository/models/{model}/unload", post(triton_unload))
        // simulator control
        .route("/sim/stats", get(stats))
        .route("/sim/faults", post(update_faults).get(get_faults))
        .with_state(shared)
}

/// Deterministic output for `prompt` on `model`: the text and its token count (at most
/// `max_tokens`, at least 1). Clients use it to check results.
pub fn generate(model: &str, prompt: &str, max_tokens: u32) -> (String, u32) {
    let (text, n, _) = generate_choice(model, prompt, max_tokens);
    (text, n)
}

/// Longest context (prompt plus completion tokens) the simulated model accepts.
pub const MAX_MODEL_LEN: u32 = 4096;

/// [`generate`] with the finish reason: each prompt has a natural length (4 to 15 tokens, then
/// end of sequence), so the answer ends with `"stop"` when that fits in `max_tokens` and with
/// `"length"` when `max_tokens` cuts it.
pub fn generate_choice(model: &str, prompt: &str, max_tokens: u32) -> (String, u32, &'static str) {
    const WORDS: [&str; 16] = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
        "lambda", "mu", "nu", "xi", "omicron", "pi",
    ];
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(prompt.as_bytes());
    let d = h.finalize();
    let natural = 4 + u32::from(d[0] % 12);
    let n = natural.min(max_tokens.max(1));
    let text = (0..n as usize)
        .map(|i| WORDS[usize::from(d[(i + 1) % 32] % 16)])
        .collect::<Vec<_>>()
        .join(" ");
    let finish = if natural <= max_tokens {
        "stop"
    } else {
        "length"
    };
    (format!(" {text}"), n, finish)
}

/// The prompt choice `i` of a request with `n` choices is generated from: choice 0 is the
/// answer an `n`-less request gets, the others differ deterministically.
fn choice_prompt(prompt: &str, i: u32) -> String {
    if i == 0 {
        prompt.to_owned()
    } else {
        format!("{prompt}\u{1f}{i}")
    }
}

/// An OpenAI error with `param` and a string `code`, as OpenAI answers request errors.
fn openai_error_full(
    status: StatusCode,
    kind: &str,
    message: String,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
        ),
    )
        .into_response()
}

fn openai_error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})),
    )
        .into_response()
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    if s.faults.lock().await.down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn list_models(State(s): State<Arc<Shared>>) -> Response {
    let loaded = s.loaded.lock().await.clone();
    let data: Vec<Value> = loaded
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "resultity-sim", "max_model_len": 4096}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Why an inference request did not run.
enum Refusal {
    Down,
    UnknownModel(String),
    Injected,
    Crashed,
}

impl Refusal {
    fn into_response(self, openai: bool) -> Response {
        let (status, kind, msg) = match self {
            Self::Down => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "runtime is down".to_string(),
            ),
            Self::UnknownModel(m) => (
                StatusCode::NOT_FOUND,
                "NotFoundError",
                format!("The model `{m}` does not exist."),
            ),
            Self::Injected => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "injected failure".to_string(),
            ),
            Self::Crashed => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "runtime crashed".to_string(),
            ),
        };
        if openai {
            openai_error(status, kind, msg)
        } else {
            (status, axum::Json(json!({"error": msg}))).into_response()
        }
    }
}

/// An admitted request: it holds a decode slot until dropped.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _guard: RunningGuard,
    /// Decode time per token at the batch occupancy it was admitted at.
    per_token_us: u64,
}

/// Admission, batching and latency for one inference request. Returns when the simulated
/// decode is done.
async fn run_inference(
    s: &Arc<Shared>,
    model: &str,
    prompt_tokens: u32,
    output_tokens: u32,
) -> Result<(), Refusal> {
    let admitted = admit(s, model).await?;
    let total = decode_time(s.cfg.prefill_ms, admitted.per_token_us, output_tokens);
    if !total.is_zero() {
        let mut crash = s.crash.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(total) => {}
            // A crashed runtime does not finish what it was decoding.
            _ = crash.wait_for(|c| *c) => return Err(Refusal::Crashed),
        }
    }
    account(s, prompt_tokens, output_tokens);
    Ok(())
}

fn account(s: &Shared, prompt_tokens: u32, output_tokens: u32) {
    s.gen_tokens
        .fetch_add(u64::from(output_tokens), Ordering::Relaxed);
    s.prompt_tokens
        .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
    s.completed.fetch_add(1, Ordering::Relaxed);
}

/// Faults, model check and a decode slot (waiting while the batch is full).
async fn admit(s: &Arc<Shared>, model: &str) -> Result<Admitted, Refusal> {
    let n = s.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if *s.crash.borrow() {
        return Err(Refusal::Crashed);
    }
    let faults = s.faults.lock().await.clone();
    if let Some(limit) = faults.crash_after
        && n > limit
    {
        let _ = s.crash.send(true);
        return Err(Refusal::Crashed);
    }
    if faults.down {
        s.errors.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::Down);
    }
    if !s.loaded.lock().await.iter().any(|m| m == model) {
        s.errors.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::UnknownModel(model.to_owned()));
    }
    let injected = faults.failing_models.iter().any(|m| m == model)
        || (faults.error_rate_permille > 0
            && s.next_random() % 1000 < u64::from(faults.error_rate_permille));
    if injected {
        s.errors.fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::Injected);
    }
    if faults.hang {
        // Wait until the fault is cleared; the client's timeout is what ends this normally.
        s.unhang.notified().await;
        if *s.crash.borrow() {
            return Err(Refusal::Crashed);
        }
    }
    s.waiting.fetch_add(1, Ordering::Relaxed);
    let permit = s.slots.clone().acquire_owned().await;
    s.waiting.fetch_sub(1, Ordering::Relaxed);
    let Ok(permit) = permit else {
        return Err(Refusal::Crashed);
    };
    let running = s.running.fetch_add(1, Ordering::Relaxed) + 1;
    s.max_running.fetch_max(running, Ordering::Relaxed);
    let guard = RunningGuard(s.clone());
    Ok(Admitted {
        _permit: permit,
        _guard: guard,
        per_token_us: per_token_us(&s.cfg, running),
    })
}

/// Decode time per token with `running` sequences decoding: it grows linearly with batch
/// occupancy up to `batch_slowdown_pct` at a full batch. Every factor is a flag, so the
/// arithmetic saturates instead of overflowing.
fn per_token_us(cfg: &SimConfig, running: u64) -> u64 {
    let base = u128::from(cfg.decode_us_per_token);
    let slowdown = base
        .saturating_mul(u128::from(cfg.batch_slowdown_pct))
        .saturating_mul(u128::from(running))
        / (100 * u128::try_from(cfg.max_batch).unwrap_or(u128::MAX)).max(1);
    u64::try_from(base.saturating_add(slowdown)).unwrap_or(u64::MAX)
}

/// Prefill plus `output_tokens` tokens at `per_token_us` each, saturating.
fn decode_time(prefill_ms: u64, per_token_us: u64, output_tokens: u32) -> Duration {
    Duration::from_millis(prefill_ms).saturating_add(Duration::from_micros(
        per_token_us.saturating_mul(u64::from(output_tokens)),
    ))
}

struct RunningGuard(Arc<Shared>);
impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

fn count_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

fn max_tokens(req: &Value, default: u32) -> u32 {
    req.get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        .unwrap_or(default)
}

fn parse_json(body: &[u8]) -> Result<Value, Box<Response>> {
    serde_json::from_slice::<Value>(body).map_err(|e| {
        Box::new(openai_error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            format!("invalid JSON body: {e}"),
        ))
    })
}

fn model_of(req: &Value) -> Result<String, Box<Response>> {
    req.get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            Box::new(openai_error(
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                "`model` is required".into(),
            ))
        })
}

/// The two OpenAI endpoints differ only in where the prompt comes from and how the answer is
/// shaped; everything else (parsing, model check, generation, batching) is shared here.
#[derive(Clone, Copy)]
enum OpenAiKind {
    Completion,
    Chat,
}

fn completion_prompt(req: &Value) -> Option<String> {
    match req.get("prompt")? {
        Value::String(p) => Some(p.clone()),
        Value::Array(ps) => Some(
            ps.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// One OpenAI request's choices: text pieces (tokens) and finish reason per choice.
struct Choices {
    model: String,
    prompt_tokens: u32,
    /// Per choice: its tokens (the first keeps its leading space) and finish reason.
    choices: Vec<(Vec<String>, &'static str)>,
}

impl Choices {
    fn completion_tokens(&self) -> u32 {
        self.choices
            .iter()
            .map(|(t, _)| u32::try_from(t.len()).unwrap_or(u32::MAX))
            .sum()
    }
}

/// Parses and checks an OpenAI request (model, prompt, `n`, context length) and generates its
/// choices; an error is the runtime's OpenAI error answer.
fn plan_openai(req: &Value, kind: OpenAiKind, default_max: u32) -> Result<Choices, Box<Response>> {
    let model = model_of(req)?;
    let (prompt, shape_error, prompt_param) = match kind {
        OpenAiKind::Completion => (
            completion_prompt(req),
            "`prompt` must be a string or an array of strings",
            "prompt",
        ),
        OpenAiKind::Chat => (
            chat_prompt(req),
            "`messages` must be an array of {role, content}",
            "messages",
        ),
    };
    let Some(prompt) = prompt else {
        return Err(Box::new(openai_error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            shape_error.into(),
        )));
    };
    let n = match req.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64().filter(|n| (1..=128).contains(n)) {
            Some(n) => n as u32,
            None => {
                return Err(Box::new(openai_error_full(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "`n` must be an integer from 1 to 128".into(),
                    Some("n"),
                    None,
                )));
            }
        },
    };
    let max = max_tokens(req, default_max);
    let prompt_tokens = count_tokens(&prompt);
    if u64::from(prompt_tokens) + u64::from(max) > u64::from(MAX_MODEL_LEN) {
        // What OpenAI (and vLLM's OpenAI layer) answer for a request that cannot fit.
        return Err(Box::new(openai_error_full(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {} tokens ({prompt_tokens} in the {prompt_param}, {max} in the completion). Please reduce the length of the {prompt_param} or completion.",
                u64::from(prompt_tokens) + u64::from(max)
            ),
            Some(prompt_param),
            Some("context_length_exceeded"),
        )));
    }
    let choices = (0..n)
        .map(|i| {
            let (text, _, finish) = generate_choice(&model, &choice_prompt(&prompt, i), max);
            let tokens = text.split(' ').skip(1).map(|w| format!(" {w}")).collect();
            (tokens, finish)
        })
        .collect();
    Ok(Choices {
        model,
        prompt_tokens,
        choices,
    })
}

async fn openai_inference(s: &Arc<Shared>, body: &[u8], kind: OpenAiKind) -> Response {
    let req = match parse_json(body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let plan = match plan_openai(&req, kind, s.cfg.default_max_tokens) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        return stream_inference(s, plan, kind, include_usage).await;
    }
    let n = plan.completion_tokens();
    if let Err(r) = run_inference(s, &plan.model, plan.prompt_tokens, n).await {
        return r.into_response(true);
    }
    let seq = s.requests.load(Ordering::Relaxed);
    let prompt_tokens = plan.prompt_tokens;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n});
    let choices: Vec<Value> = plan
        .choices
        .iter()
        .enumerate()
        .map(|(i, (tokens, finish))| {
            let text = tokens.concat();
            match kind {
                OpenAiKind::Completion => json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish}),
                OpenAiKind::Chat => json!({"index": i, "message": {"role": "assistant", "content": text.trim_start()}, "finish_reason": finish}),
            }
        })
        .collect();
    let (id, object) = match kind {
        OpenAiKind::Completion => (format!("cmpl-{seq}"), "text_completion"),
        OpenAiKind::Chat => (format!("chatcmpl-{seq}"), "chat.completion"),
    };
    axum::Json(json!({
        "id": id,
        "object": object,
        "created": unix_s(),
        "model": plan.model,
        "choices": choices,
        "usage": usage,
    }))
    .into_response()
}

/// Streams a request as OpenAI server-sent events: (chat) a role chunk per choice, one chunk
/// per token after each per-token delay, a finish chunk per choice, the usage chunk when
/// asked, `data: [DONE]`. A crash ends the body without `[DONE]`, as a killed server does.
async fn stream_inference(
    s: &Arc<Shared>,
    plan: Choices,
    kind: OpenAiKind,
    include_usage: bool,
) -> Response {
    let admitted = match admit(s, &plan.model).await {
        Ok(a) => a,
        Err(r) => return r.into_response(true),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(4);
    let s = s.clone();
    tokio::spawn(async move {
        s.streams_open.fetch_add(1, Ordering::Relaxed);
        let ok = emit_stream(&s, &plan, kind, include_usage, admitted.per_token_us, &tx).await;
        s.streams_open.fetch_sub(1, Ordering::Relaxed);
        if ok {
            account(&s, plan.prompt_tokens, plan.completion_tokens());
        }
        drop(admitted);
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Writes one stream's events; `false` when it was cut (crash, or the client went away).
async fn emit_stream(
    s: &Arc<Shared>,
    plan: &Choices,
    kind: OpenAiKind,
    include_usage: bool,
    per_token_us: u64,
    tx: &tokio::sync::mpsc::Sender<String>,
) -> bool {
    let seq = s.requests.load(Ordering::Relaxed);
    let created = unix_s();
    let (id, object) = match kind {
        OpenAiKind::Completion => (format!("cmpl-{seq}"), "text_completion"),
        OpenAiKind::Chat => (format!("chatcmpl-{seq}"), "chat.completion.chunk"),
    };
    let usage_field = |v: Value| {
        if include_usage { Some(v) } else { None }
    };
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": plan.model, "choices": choices});
        if let (Some(u), Some(o)) = (usage, c.as_object_mut()) {
            o.insert("usage".into(), u);
        }
        format!("data: {c}\n\n")
    };
    let mut crash = s.crash.subscribe();
    let mut hold = s.hold.subscribe();
    if let OpenAiKind::Chat = kind {
        for i in 0..plan.choices.len() {
            let c = chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                usage_field(Value::Null),
            );
            if tx.send(c).await.is_err() {
                return false;
            }
        }
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(s.cfg.prefill_ms)) => {}
        _ = crash.wait_for(|c| *c) => return false,
    }
    let longest = plan.choices.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    for k in 0..longest {
        let held = hold.wait_for(|h| h.is_none_or(|h| (k as u64) < u64::from(h)));
        tokio::select! {
            r = held => if r.is_err() { return false },
            _ = crash.wait_for(|c| *c) => return false,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_micros(per_token_us)) => {}
            _ = crash.wait_for(|c| *c) => return false,
        }
        for (i, (tokens, _)) in plan.choices.iter().enumerate() {
            let Some(tok) = tokens.get(k) else { continue };
            let piece = match kind {
                OpenAiKind::Completion => {
                    json!({"index": i, "text": tok, "logprobs": null, "finish_reason": null})
                }
                // The first token carries no leading space, as in the non-streamed content.
                OpenAiKind::Chat => {
                    let text = if k == 0 {
                        tok.trim_start()
                    } else {
                        tok.as_str()
                    };
                    json!({"index": i, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
                }
            };
            // Counted before it leaves, so a client that sees the token sees the count.
            s.streamed_tokens.fetch_add(1, Ordering::Relaxed);
            if tx
                .send(chunk(json!([piece]), usage_field(Value::Null)))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    for (i, (_, finish)) in plan.choices.iter().enumerate() {
        let piece = match kind {
            OpenAiKind::Completion => {
                json!({"index": i, "text": "", "logprobs": null, "finish_reason": finish})
            }
            OpenAiKind::Chat => {
                json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish})
            }
        };
        if tx
            .send(chunk(json!([piece]), usage_field(Value::Null)))
            .await
            .is_err()
        {
            return false;
        }
    }
    if include_usage {
        let n = plan.completion_tokens();
        let p = plan.prompt_tokens;
        let usage = json!({"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n});
        if tx.send(chunk(json!([]), Some(usage))).await.is_err() {
            return false;
        }
    }
    tx.send("data: [DONE]\n\n".to_owned()).await.is_ok()
}

async fn completions(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    openai_inference(&s, &body, OpenAiKind::Completion).await
}

async fn chat_completions(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    openai_inference(&s, &body, OpenAiKind::Chat).await
}

/// The prompt a chat request stands for: its messages' roles and contents, in order.
pub fn chat_prompt(req: &Value) -> Option<String> {
    let msgs = req.get("messages")?.as_array()?;
    let mut out = String::new();
    for m in msgs {
        let role = m.get("role")?.as_str()?;
        let content = match m.get("content")? {
            Value::String(s) => s.clone(),
            // Content parts: keep the text ones.
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            _ => return None,
        };
        out.push_str(role);
        out.push_str(": ");
        out.push_str(&content);
        out.push('\n');
    }
    Some(out)
}

/// vLLM-style Prometheus metrics (names as vLLM ≥ 0.6 exports them).
/// llama-server's `GET /props`: the part the sidecar reads.
async fn props(State(s): State<Arc<Shared>>) -> Response {
    let model = s.loaded.lock().await.first().cloned().unwrap_or_default();
    axum::Json(json!({"total_slots": s.cfg.max_batch, "model_path": model})).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let st = s.stats();
    let cache = st.running as f64 / s.cfg.max_batch as f64;
    let mut out = String::new();
    if s.cfg.flavor == Flavor::LlamaCpp {
        // llama-server serves one model and labels nothing.
        out.push_str(&format!(
            "# HELP llamacpp:requests_processing Number of requests processing.\n\
             # TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing {}\n\
             # HELP llamacpp:requests_deferred Number of requests deferred.\n\
             # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred {}\n\
             # HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n\
             # TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {}\n\
             # TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total {}\n",
            st.running, st.waiting, st.generation_tokens_total, st.prompt_tokens_total
        ));
        return ([("content-type", "text/plain; version=0.0.4")], out).into_response();
    }
    for m in s.loaded.lock().await.iter() {
        let l = format!("{{model_name=\"{m}\"}}");
        out.push_str(&format!(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{l} {}\n\
             # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{l} {}\n\
             # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{l} {cache}\n\
             # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{l} {cache}\n\
             # TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{l} {}\n\
             # TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{l} {}\n",
            st.running, st.waiting, st.generation_tokens_total, st.prompt_tokens_total
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn triton_model_ready(State(s): State<Arc<Shared>>, Path(model): Path<String>) -> StatusCode {
    if s.faults.lock().await.down {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if s.loaded.lock().await.contains(&model) {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn triton_infer(
    State(s): State<Arc<Shared>>,
    Path(model): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let bad =
        |msg: String| (StatusCode::BAD_REQUEST, axum::Json(json!({"error": msg}))).into_response();
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("failed to parse the request JSON buffer: {e}")),
    };
    let Some(inputs) = req.get("inputs").and_then(Value::as_array) else {
        return bad("request must contain `inputs`".into());
    };
    let mut outputs = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0u32;
    let mut output_tokens = 0u32;
    for (i, input) in inputs.iter().enumerate() {
        let (Some(shape), Some(datatype), Some(data)) = (
            input.get("shape"),
            input.get("datatype").and_then(Value::as_str),
            input.get("data").and_then(Value::as_array),
        ) else {
            return bad(format!("input {i} needs `shape`, `datatype` and `data`"));
        };
        let out: Vec<Value> = data
            .iter()
            .map(|x| match x {
                Value::String(t) => {
                    prompt_tokens = prompt_tokens.saturating_add(count_tokens(t));
                    let (g, n) = generate(&model, t, s.cfg.default_max_tokens);
                    output_tokens = output_tokens.saturating_add(n);
                    Value::String(g.trim_start().to_owned())
                }
                Value::Number(n) => {
                    output_tokens = output_tokens.saturating_add(1);
                    n.as_f64().map(|f| json!(f * 2.0)).unwrap_or(Value::Null)
                }
                other => other.clone(),
            })
            .collect();
        outputs.push(json!({"name": format!("OUTPUT{i}"), "datatype": datatype, "shape": shape, "data": out}));
    }
    if let Err(r) = run_inference(&s, &model, prompt_tokens, output_tokens.max(1)).await {
        return r.into_response(false);
    }
    let mut resp = json!({"model_name": model, "model_version": "1", "outputs": outputs});
    if let Some(id) = req.get("id") {
        resp["id"] = id.clone();
    }
    axum::Json(resp).into_response()
}

async fn triton_index(State(s): State<Arc<Shared>>) -> Response {
    let loaded = s.loaded.lock().await.clone();
    let mut all = s.cfg.models.clone();
    for m in &loaded {
        if !all.contains(m) {
            all.push(m.clone());
        }
    }
    let entries: Vec<Value> = all
        .iter()
        .map(|m| {
            if loaded.contains(m) {
                json!({"name": m, "version": "1", "state": "READY"})
            } else {
                json!({"name": m, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"})
            }
        })
        .collect();
    axum::Json(Value::Array(entries)).into_response()
}

async fn triton_load(State(s): State<Arc<Shared>>, Path(model): Path<String>) -> Response {
    if !s.cfg.models.contains(&model) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": format!("failed to load '{model}', no version is available")}),
            ),
        )
            .into_response();
    }
    let mut loaded = s.loaded.lock().await;
    if !loaded.contains(&model) {
        loaded.push(model);
    }
    StatusCode::OK.into_response()
}

async fn triton_unload(State(s): State<Arc<Shared>>, Path(model): Path<String>) -> StatusCode {
    s.loaded.lock().await.retain(|m| m != &model);
    StatusCode::OK
}

async fn stats(State(s): State<Arc<Shared>>) -> axum::Json<SimStats> {
    axum::Json(s.stats())
}

async fn get_faults(State(s): State<Arc<Shared>>) -> axum::Json<Faults> {
    axum::Json(s.faults.lock().await.clone())
}

async fn update_faults(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            set_faults(&s, f.clone()).await;
            axum::Json(f).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": format!("invalid faults: {e}")})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_time_saturates_on_extreme_flags() {
        let cfg = SimConfig {
            decode_us_per_token: u64::MAX,
            batch_slowdown_pct: u64::MAX,
            max_batch: 1,
            ..SimConfig::default()
        };
        assert_eq!(per_token_us(&cfg, u64::MAX), u64::MAX);
        assert!(decode_time(u64::MAX, u64::MAX, u32::MAX) >= Duration::from_millis(u64::MAX));
    }

    #[test]
    fn per_token_time_grows_with_the_batch() {
        let cfg = SimConfig {
            decode_us_per_token: 1_000,
            batch_slowdown_pct: 30,
            max_batch: 10,
            ..SimConfig::default()
        };
        assert_eq!(per_token_us(&cfg, 1), 1_030);
        assert_eq!(per_token_us(&cfg, 10), 1_300);
        assert_eq!(decode_time(20, 1_300, 10), Duration::from_millis(33));
    }
}
