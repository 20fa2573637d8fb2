//! OpenAI-compatible servers: vLLM, and any other (`openai` kind: llama.cpp's `llama-server`,
//! SGLang, llama-cpp-python, …). One client, since they share `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions` and usually `/metrics`; they differ in the health
//! endpoint (not every server has `/health`), the metric names (see [`super::LoadMetrics`]) and
//! whether the parallelism can be read (`llama-server`'s `GET /props`).

use std::time::Duration;

use resultity_protocol::messages::{JobKind, RuntimeKind, RuntimeReport, Usage};
use serde_json::{Value, json};

use super::{LoadMetrics, Runtime, RuntimeError, RuntimeOutput, send, send_stream};
use tokio::sync::mpsc;

/// Health path when none is configured.
pub const DEFAULT_HEALTH_PATH: &str = "/health";
/// Model list, also the fallback health check of servers without a health endpoint.
const MODELS_PATH: &str = "/v1/models";
/// Largest number of served model names quoted in an error.
const MAX_NAMES_QUOTED: usize = 8;

/// Client for one OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct OpenAiRuntime {
    http: reqwest::Client,
    base: String,
    control_timeout: Duration,
    kind: RuntimeKind,
    health_path: String,
}

impl OpenAiRuntime {
    /// `kind` is [`RuntimeKind::Vllm`] or [`RuntimeKind::Openai`]; `health_path` defaults to
    /// `/health`.
    pub fn new(
        kind: RuntimeKind,
        http: reqwest::Client,
        base: String,
        control_timeout: Duration,
        health_path: Option<&str>,
    ) -> Self {
        Self {
            http,
            base,
            control_timeout,
            kind,
            health_path: health_path.unwrap_or(DEFAULT_HEALTH_PATH).to_owned(),
        }
    }

    /// The server's name in user-facing messages.
    pub fn display_name(&self) -> &'static str {
        match self.kind {
            RuntimeKind::Vllm => "vLLM",
            _ => "the OpenAI-compatible runtime",
        }
    }

    async fn served_models(&self) -> Result<Vec<String>, RuntimeError> {
        let (_, body) = send(
            self.http.get(format!("{}{MODELS_PATH}", self.base)),
            self.control_timeout,
        )
        .await?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| RuntimeError::Failed(format!("bad {MODELS_PATH} answer: {e}")))?;
        Ok(v.get("data")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Requests the server decodes at once, where it says: `llama-server` reports its slots
    /// in `GET /props` (`total_slots`). vLLM and SGLang expose no such figure; `None` then.
    pub async fn parallelism(&self) -> Option<u32> {
        if self.kind == RuntimeKind::Vllm {
            return None;
        }
        let (_, body) = send(
            self.http.get(format!("{}/props", self.base)),
            self.control_timeout,
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v.get("total_slots")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
    }
}

impl OpenAiRuntime {
    /// The endpoint and body for one job: the model the signed result names is forced, and
    /// `stream` is what the assignment asked for, not what the caller wrote.
    fn job_request(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        stream: bool,
    ) -> Result<(&'static str, Value), RuntimeError> {
        let path = match kind {
            JobKind::ChatCompletion => "/v1/chat/completions",
            JobKind::Completion => "/v1/completions",
            JobKind::Infer => {
                return Err(RuntimeError::Unsupported {
                    runtime: self.display_name(),
                    kind,
                });
            }
        };
        let mut body = request.clone();
        let Some(obj) = body.as_object_mut() else {
            return Err(RuntimeError::Rejected {
                status: 400,
                reason: "request must be a JSON object".into(),
                refusal: None,
            });
        };
        obj.insert("model".into(), Value::String(model.to_owned()));
        obj.insert("stream".into(), Value::Bool(stream));
        if !stream {
            // Only meaningful with a stream; servers refuse it otherwise.
            obj.remove("stream_options");
        }
        Ok((path, body))
    }
}

/// `usage` of an OpenAI answer (zeros when absent).
pub(super) fn openai_usage(body: &str) -> Usage {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let get = |k: &str| {
        v.as_ref()
            .and_then(|v| v.pointer(&format!("/usage/{k}")))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Usage {
        prompt_tokens: get("prompt_tokens"),
        completion_tokens: get("completion_tokens"),
    }
}

impl Runtime for OpenAiRuntime {
    fn kind(&self) -> RuntimeKind {
        self.kind
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        match send(
            self.http.get(format!("{}{}", self.base, self.health_path)),
            self.control_timeout,
        )
        .await
        {
            Ok(_) => Ok(()),
            // No such endpoint (llama-cpp-python has none): a server that lists its models
            // is up. A 5xx (llama-server answers 503 while loading) is not ready, no fallback.
            Err(RuntimeError::Rejected {
                status: 404 | 405, ..
            }) if self.health_path != MODELS_PATH => send(
                self.http.get(format!("{}{MODELS_PATH}", self.base)),
                self.control_timeout,
            )
            .await
            .map(|_| ()),
            Err(e) => Err(e),
        }
    }

    async fn model_ready(&self, model: &str) -> Result<bool, RuntimeError> {
        Ok(self.served_models().await?.iter().any(|m| m == model))
    }

    async fn load_model(&self, model: &str) -> Result<(), RuntimeError> {
        // These servers serve the model(s) they were started with; "loading" is checking it
        // is one of them.
        let served = self.served_models().await?;
        if served.iter().any(|m| m == model) {
            return Ok(());
        }
        let listed = if served.is_empty() {
            "none".to_owned()
        } else {
            let mut names: Vec<&str> = served
                .iter()
                .take(MAX_NAMES_QUOTED)
                .map(String::as_str)
                .collect();
            if served.len() > MAX_NAMES_QUOTED {
                names.push("…");
            }
            names.join(", ")
        };
        Err(RuntimeError::Rejected {
            status: 404,
            reason: format!(
                "{} does not serve model {model} (it serves: {listed})",
                self.display_name()
            ),
            refusal: None,
        })
    }

    async fn unload_model(&self, _model: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn test_inference(&self, model: &str) -> Result<(), RuntimeError> {
        let req = json!({"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0});
        self.infer(JobKind::Completion, model, &req, Duration::from_secs(60))
            .await
            .map(|_| ())
    }

    async fn infer(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
    ) -> Result<RuntimeOutput, RuntimeError> {
        let (path, body) = self.job_request(kind, model, request, false)?;
        let (_, text) = send(
            self.http.post(format!("{}{path}", self.base)).json(&body),
            timeout,
        )
        .await?;
        Ok(RuntimeOutput {
            usage: openai_usage(&text),
            body: text,
        })
    }

    async fn infer_stream(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
        events: mpsc::Sender<String>,
    ) -> Result<Usage, RuntimeError> {
        let (path, body) = self.job_request(kind, model, request, true)?;
        send_stream(
            self.http.post(format!("{}{path}", self.base)).json(&body),
            timeout,
            &events,
        )
        .await
    }

    async fn report(&self) -> RuntimeReport {
        let mut report = RuntimeReport::not_ready(self.kind, None);
        if let Err(e) = self.health().await {
            report.reason = Some(e.to_string());
            return report;
        }
        report.ready = true;
        match send(
            self.http.get(format!("{}/metrics", self.base)),
            self.control_timeout,
        )
        .await
        {
            Ok((_, text)) => {
                let m = LoadMetrics::parse(&text);
                if m.family.is_none() {
                    report.reason = Some(
                        "no load figures: /metrics has no vllm:, llamacpp: or sglang: series"
                            .into(),
                    );
                }
                // Gauges are small non-negative counts; saturating float→int casts are intended.
                report.running = m.running.map(|v| v.max(0.0) as u32);
                report.waiting = m.waiting.map(|v| v.max(0.0) as u32);
                report.kv_cache_usage_permille = m
                    .kv_cache_usage
                    .map(|v| (v.clamp(0.0, 1.0) * 1000.0).round() as u32);
                report.generation_tokens_total =
                    m.generation_tokens_total.map(|v| v.max(0.0) as u64);
            }
            Err(e) => report.reason = Some(format!("no load figures: /metrics: {e}")),
        }
        report
    }
}
