//! The load driver: submits jobs through the caller-facing entry points and checks answers.
//!
//! A job counts as completed only when its answer is HTTP 200, carries
//! `x-resultity-verified: true` (the IO service checked the node's signature over the result)
//! and its output equals the simulator's deterministic [`resultity_runtime_sim::generate`]
//! for that prompt — so a node that answers with anything else is caught here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use resultity_runtime_sim::{SimConfig, chat_prompt, generate};
use serde::Serialize;
use serde_json::{Value, json};

use crate::network::{Devnet, MODEL, RuntimeChoice};

/// What [`run_load`] submits.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub jobs: usize,
    pub concurrency: usize,
    /// vLLM: OpenAI chat completions; Triton: KServe v2 inference.
    pub runtime: RuntimeChoice,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// When set, a job whose request fails to connect or is answered 5xx/429 is submitted
    /// again until this much time has passed since its first attempt (what a client does
    /// across an IO service restart). `None`: one attempt.
    pub retry_for: Option<Duration>,
    /// Distinguishes prompts of separate runs against one network.
    pub prompt_prefix: String,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            jobs: 200,
            concurrency: 16,
            runtime: RuntimeChoice::Vllm,
            request_timeout: Duration::from_secs(60),
            retry_for: None,
            prompt_prefix: "devnet job".into(),
        }
    }
}

/// Why the load driver could not run at all (individual job failures are counted instead).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("worker task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Live counters, read by the progress display while jobs run.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicUsize,
    pub done: AtomicUsize,
    pub failed: AtomicUsize,
    /// node id → (jobs, summed latency in µs).
    pub per_node: Mutex<BTreeMap<String, (u64, u64)>>,
}

impl Progress {
    fn record(&self, node: &str, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut m) = self.per_node.lock() {
            let e = m.entry(node.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.saturating_add(us);
        }
    }

    /// node id → (jobs, mean latency ms).
    pub fn per_node(&self) -> BTreeMap<String, (u64, f64)> {
        self.per_node
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, (n, us))| (k.clone(), (*n, *us as f64 / (*n).max(1) as f64 / 1e3)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The `--json` summary object (the devnet's `--json` contract); exactly these keys are serialized.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub jobs_submitted: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_reassigned: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub jobs_per_s: f64,
    pub signatures_verified: u64,
    pub messages_rejected: u64,
    /// Completed jobs per node id, every node of the network listed (0 for one that served
    /// none), so a starved node shows.
    pub jobs_per_node: BTreeMap<String, u64>,
    /// Why jobs failed (first few), for people; not part of the JSON contract.
    #[serde(skip)]
    pub failures: Vec<String>,
    /// Retried submissions (connection errors, 5xx), not part of the JSON contract.
    #[serde(skip)]
    pub retries: u64,
}

impl Summary {
    /// True when every submitted job completed with a verified signature.
    pub fn all_verified(&self) -> bool {
        self.jobs_submitted > 0
            && self.jobs_completed == self.jobs_submitted
            && self.signatures_verified == self.jobs_submitted
            && self.jobs_failed == 0
    }

    /// Adds what only the network knows: reassignments and rejected node messages (counted
    /// by the IO service running now; a restart starts them from zero).
    pub fn with_network(mut self, net: &Devnet) -> Self {
        self.jobs_reassigned = net.jobs_reassigned();
        self.messages_rejected = net.messages_rejected();
        for n in &net.nodes {
            self.jobs_per_node.entry(n.node_id()).or_insert(0);
        }
        self
    }
}

/// One job's request and the output it must produce.
fn job(runtime: RuntimeChoice, prompt: &str) -> (String, Value, String) {
    match runtime {
        RuntimeChoice::Vllm => {
            let body = json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
            });
            let p = chat_prompt(&body).unwrap_or_default();
            let want = generate(MODEL, &p, 8).0.trim_start().to_owned();
            ("/v1/chat/completions".into(), body, want)
        }
        RuntimeChoice::Triton => {
            let body = json!({
                "inputs": [{"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [prompt]}],
            });
            // Triton requests name no token budget: the simulator uses its default.
            let n = SimConfig::default().default_max_tokens;
            let want = generate(MODEL, prompt, n).0.trim_start().to_owned();
            (format!("/v2/models/{MODEL}/infer"), body, want)
        }
    }
}

fn output_of(runtime: RuntimeChoice, body: &Value) -> Option<&str> {
    match runtime {
        RuntimeChoice::Vllm => body["choices"][0]["message"]["content"].as_str(),
        RuntimeChoice::Triton => body["outputs"][0]["data"][0].as_str(),
    }
}

enum Outcome {
    Done {
        latency: Duration,
        node: String,
        verified: bool,
    },
    Failed(String),
}

/// Sends one job (retrying per `cfg.retry_for`) and checks its answer.
async fn one_job(
    client: &reqwest::Client,
    base: &str,
    cfg: &LoadConfig,
    i: usize,
    retries: &AtomicU64,
) -> Outcome {
    let prompt = format!("{} {i}", cfg.prompt_prefix);
    let (path, body, want) = job(cfg.runtime, &prompt);
    let first = Instant::now();
    loop {
        let start = Instant::now();
        let sent = client
            .post(format!("{base}{path}"))
            .json(&body)
            .timeout(cfg.request_timeout)
            .send()
            .await;
        let retryable = match &sent {
            Err(e) => e.is_connect() || e.is_request() || e.is_timeout(),
            Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
        };
        if retryable && cfg.retry_for.is_some_and(|d| first.elapsed() < d) {
            retries.fetch_add(1, Ordering::Relaxed);
            // Not a wait for a condition: a client's pause before resubmitting.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let r = match sent {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("job {i}: {e}")),
        };
        let status = r.status();
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let verified = header("x-resultity-verified").as_deref() == Some("true");
        let node = header("x-resultity-node-id").unwrap_or_default();
        let text = match r.text().await {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(format!("job {i}: reading the answer: {e}")),
        };
        let latency = start.elapsed();
        if !status.is_success() {
            return Outcome::Failed(format!("job {i}: HTTP {status}: {text}"));
        }
        let got: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        return match output_of(cfg.runtime, &got) {
            Some(out) if out == want => Outcome::Done {
                latency,
                node,
                verified,
            },
            _ => Outcome::Failed(format!(
                "job {i}: output differs from the simulator's: want {want:?}, got {text}"
            )),
        };
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Submits `cfg.jobs` jobs to the IO service at `base` with `cfg.concurrency` in flight.
pub async fn run_load(
    base: &str,
    cfg: &LoadConfig,
    progress: Arc<Progress>,
) -> Result<Summary, LoadError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(cfg.concurrency.max(1))
        .build()?;
    progress.total.store(cfg.jobs, Ordering::Relaxed);
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency.clamp(1, cfg.jobs.max(1)) {
        let (client, base, cfg) = (client.clone(), base.to_owned(), cfg.clone());
        let (next, retries, progress) = (next.clone(), retries.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.jobs {
                    return out;
                }
                let o = one_job(&client, &base, &cfg, i, &retries).await;
                match &o {
                    Outcome::Done { latency, node, .. } => {
                        progress.record(node, *latency);
                        progress.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Failed(_) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                out.push(o);
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(cfg.jobs);
    for w in workers {
        outcomes.extend(w.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut s = Summary {
        jobs_submitted: cfg.jobs as u64,
        retries: retries.load(Ordering::Relaxed),
        ..Summary::default()
    };
    let mut lat = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Done {
                latency, verified, ..
            } => {
                s.jobs_completed += 1;
                s.signatures_verified += u64::from(verified);
                lat.push(latency.as_secs_f64() * 1e3);
            }
            Outcome::Failed(why) => {
                s.jobs_failed += 1;
                if s.failures.len() < 5 {
                    s.failures.push(why);
                }
            }
        }
    }
    s.jobs_per_node = progress
        .per_node()
        .into_iter()
        .map(|(node, (jobs, _))| (node, jobs))
        .collect();
    lat.sort_by(f64::total_cmp);
    s.p50_ms = round3(percentile(&lat, 0.50));
    s.p99_ms = round3(percentile(&lat, 0.99));
    s.jobs_per_s = if elapsed > 0.0 {
        round3(s.jobs_completed as f64 / elapsed)
    } else {
        0.0
    };
    Ok(s)
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn summary_json_has_exactly_the_contract_keys() {
        let v = serde_json::to_value(Summary::default()).unwrap_or(Value::Null);
        let mut keys: Vec<_> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "jobs_completed",
                "jobs_failed",
                "jobs_per_node",
                "jobs_per_s",
                "jobs_reassigned",
                "jobs_submitted",
                "messages_rejected",
                "p50_ms",
                "p99_ms",
                "signatures_verified"
            ]
        );
    }

    #[test]
    fn all_verified_needs_every_job() {
        let mut s = Summary {
            jobs_submitted: 2,
            jobs_completed: 2,
            signatures_verified: 2,
            ..Summary::default()
        };
        assert!(s.all_verified());
        s.signatures_verified = 1;
        assert!(!s.all_verified());
        assert!(!Summary::default().all_verified());
    }
}
