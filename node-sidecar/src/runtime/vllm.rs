//! vLLM's OpenAI-compatible server: `/health`, `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions`, `/metrics`.

use std::time::Duration;

use resultity_protocol::messages::{JobKind, RuntimeKind, RuntimeReport, Usage};
use serde_json::{Value, json};

use super::{Runtime, RuntimeError, RuntimeOutput, VllmMetrics, send};

/// Client for one vLLM server.
#[derive(Debug, Clone)]
pub struct VllmRuntime {
    http: reqwest::Client,
    base: String,
    control_timeout: Duration,
}

impl VllmRuntime {
    pub fn new(http: reqwest::Client, base: String) -> Self {
        Self {
            http,
            base,
            control_timeout: Duration::from_secs(5),
        }
    }

    async fn served_models(&self) -> Result<Vec<String>, RuntimeError> {
        let (_, body) = send(
            self.http.get(format!("{}/v1/models", self.base)),
            self.control_timeout,
        )
        .await?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| RuntimeError::Failed(format!("bad /v1/models answer: {e}")))?;
        Ok(v.get("data")
            .and_then(Value::as_array)
            .map(|d| {
                d.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
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

impl Runtime for VllmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Vllm
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        send(
            self.http.get(format!("{}/health", self.base)),
            self.control_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn model_ready(&self, model: &str) -> Result<bool, RuntimeError> {
        Ok(self.served_models().await?.iter().any(|m| m == model))
    }

    async fn load_model(&self, model: &str) -> Result<(), RuntimeError> {
        // vLLM serves the model(s) it was started with; "loading" is checking it is one.
        if self.model_ready(model).await? {
            Ok(())
        } else {
            Err(RuntimeError::Rejected {
                status: 404,
                reason: format!("vLLM does not serve model {model}"),
            })
        }
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
        let path = match kind {
            JobKind::ChatCompletion => "/v1/chat/completions",
            JobKind::Completion => "/v1/completions",
            JobKind::Infer => {
                return Err(RuntimeError::Unsupported {
                    runtime: "vLLM",
                    kind,
                });
            }
        };
        let mut body = request.clone();
        if let Some(obj) = body.as_object_mut() {
            // The signed result names the model; the runtime must run exactly that one, and
            // the network expects one answer, not a stream.
            obj.insert("model".into(), Value::String(model.to_owned()));
            obj.insert("stream".into(), Value::Bool(false));
        } else {
            return Err(RuntimeError::Rejected {
                status: 400,
                reason: "request must be a JSON object".into(),
            });
        }
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

    async fn report(&self) -> RuntimeReport {
        let mut report = RuntimeReport::not_ready(RuntimeKind::Vllm, None);
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
                let m = VllmMetrics::parse(&text);
                // Gauges are small non-negative counts; saturating float→int casts are intended.
                report.running = m.running.map(|v| v.max(0.0) as u32);
                report.waiting = m.waiting.map(|v| v.max(0.0) as u32);
                report.kv_cache_usage_permille = m
                    .kv_cache_usage
                    .map(|v| (v.clamp(0.0, 1.0) * 1000.0).round() as u32);
                report.generation_tokens_total =
                    m.generation_tokens_total.map(|v| v.max(0.0) as u64);
            }
            Err(e) => report.reason = Some(format!("metrics unavailable: {e}")),
        }
        report
    }
}
