//! Triton Inference Server over the KServe v2 protocol: `/v2/health/ready`,
//! `/v2/models/{m}/ready`, `/v2/models/{m}/infer`, `/v2/repository/index`, load and unload.

use std::time::Duration;

use resultity_protocol::messages::{JobKind, RuntimeKind, RuntimeReport, Usage};
use serde_json::{Value, json};

use super::{Runtime, RuntimeError, RuntimeOutput, send};

/// Client for one Triton server.
#[derive(Debug, Clone)]
pub struct TritonRuntime {
    http: reqwest::Client,
    base: String,
    control_timeout: Duration,
}

impl TritonRuntime {
    pub fn new(http: reqwest::Client, base: String, control_timeout: Duration) -> Self {
        Self {
            http,
            base,
            control_timeout,
        }
    }

    /// Model names are path segments: refuse anything that could escape one.
    fn model_path(&self, model: &str, suffix: &str) -> Result<String, RuntimeError> {
        let ok = !model.is_empty()
            && model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && model != "."
            && model != "..";
        if !ok {
            return Err(RuntimeError::Rejected {
                status: 400,
                reason: format!("{model:?} is not a valid Triton model name"),
                refusal: None,
            });
        }
        Ok(format!("{}/v2/models/{model}{suffix}", self.base))
    }

    /// Models in the repository with their state (`READY`, `UNAVAILABLE`, …).
    pub async fn repository_index(&self) -> Result<Vec<(String, String)>, RuntimeError> {
        let (_, body) = send(
            self.http
                .post(format!("{}/v2/repository/index", self.base))
                .json(&json!({})),
            self.control_timeout,
        )
        .await?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| RuntimeError::Failed(format!("bad repository index: {e}")))?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            m.get("name")?.as_str()?.to_owned(),
                            m.get("state")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Runtime for TritonRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Triton
    }

    async fn health(&self) -> Result<(), RuntimeError> {
        send(
            self.http.get(format!("{}/v2/health/ready", self.base)),
            self.control_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn model_ready(&self, model: &str) -> Result<bool, RuntimeError> {
        match send(
            self.http.get(self.model_path(model, "/ready")?),
            self.control_timeout,
        )
        .await
        {
            Ok(_) => Ok(true),
            // Triton answers 400 for a model that exists but is not ready, 404 for none.
            Err(RuntimeError::Rejected { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn load_model(&self, model: &str) -> Result<(), RuntimeError> {
        self.model_path(model, "")?;
        send(
            self.http
                .post(format!("{}/v2/repository/models/{model}/load", self.base))
                .json(&json!({})),
            // Loading weights takes long; the control timeout would be wrong here.
            Duration::from_secs(600),
        )
        .await
        .map(|_| ())
    }

    async fn unload_model(&self, model: &str) -> Result<(), RuntimeError> {
        self.model_path(model, "")?;
        send(
            self.http
                .post(format!("{}/v2/repository/models/{model}/unload", self.base))
                .json(&json!({})),
            self.control_timeout,
        )
        .await
        .map(|_| ())
    }

    async fn test_inference(&self, model: &str) -> Result<(), RuntimeError> {
        // Readiness is Triton's own end-to-end check of a loaded model; a generic input cannot
        // be built without the model's signature.
        if self.model_ready(model).await? {
            Ok(())
        } else {
            Err(RuntimeError::Rejected {
                status: 400,
                reason: format!("model {model} is not ready"),
                refusal: None,
            })
        }
    }

    async fn infer_stream(
        &self,
        _kind: JobKind,
        _model: &str,
        _request: &Value,
        _timeout: Duration,
        _events: tokio::sync::mpsc::Sender<String>,
    ) -> Result<Usage, RuntimeError> {
        // KServe v2 `infer` answers once; Triton's generate_stream extension is not part of
        // the v2 protocol this adapter speaks, so a stream is refused, never faked.
        Err(RuntimeError::StreamUnsupported { runtime: "Triton" })
    }

    async fn infer(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
    ) -> Result<RuntimeOutput, RuntimeError> {
        if kind != JobKind::Infer {
            return Err(RuntimeError::Unsupported {
                runtime: "Triton",
                kind,
            });
        }
        if !request.is_object() {
            return Err(RuntimeError::Rejected {
                status: 400,
                reason: "request must be a JSON object".into(),
                refusal: None,
            });
        }
        let (_, body) = send(
            self.http
                .post(self.model_path(model, "/infer")?)
                .json(request),
            timeout,
        )
        .await?;
        Ok(RuntimeOutput {
            body,
            usage: Usage::default(),
        })
    }

    async fn report(&self) -> RuntimeReport {
        let mut report = RuntimeReport::not_ready(RuntimeKind::Triton, None);
        match self.health().await {
            Ok(()) => report.ready = true,
            Err(e) => report.reason = Some(e.to_string()),
        }
        report
    }
}
