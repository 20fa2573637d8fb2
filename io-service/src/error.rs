//! Errors: [`ApiError`] is a rejection answered on the wire (spec `ErrorResponse`, status from
//! [`ErrorCode::http_status`]); [`IoError`] is a failure to start or reconfigure the service.
//!
//! Every error answer is also an OpenAI error object: `{"error":{"message","type","param",
//! "code"}}` (plus the spec's `retry_after_ms` and `server_time_ms`), so OpenAI clients read
//! it and nodes, which ignore unknown fields, still read `code`. A runtime's own refusal keeps
//! its status, type, param and code.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use resultity_protocol::messages::ws::RuntimeRefusal;
use resultity_protocol::{ErrorCode, ProtocolError};
use serde_json::{Value, json};

/// Header naming the job an answer (or an error after the job was created) belongs to.
pub const JOB_ID_HEADER: &str = "x-resultity-job-id";

/// A refused request, ready to be answered. Built through `AppState::reject` so every
/// rejection is counted by reason before it leaves.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub server_time_ms: u64,
    /// The request field at fault (OpenAI `param`).
    pub param: Option<String>,
    /// A runtime's refusal answered in its own terms instead of `code`'s.
    pub runtime: Option<Box<RuntimeRefusal>>,
    /// The job this answer is about (`x-resultity-job-id`).
    pub job_id: Option<String>,
}

/// The OpenAI error `type` for an HTTP status.
pub fn openai_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>, server_time_ms: u64) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
            server_time_ms,
            param: None,
            runtime: None,
            job_id: None,
        }
    }
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }
    pub fn with_runtime(mut self, refusal: RuntimeRefusal) -> Self {
        self.runtime = Some(Box::new(refusal));
        self
    }
    pub fn with_job(mut self, job_id: &str) -> Self {
        self.job_id = Some(job_id.to_owned());
        self
    }
    /// HTTP status of the answer: the runtime's own for a runtime refusal.
    pub fn status(&self) -> u16 {
        match &self.runtime {
            Some(r) if (400..500).contains(&r.status) => r.status,
            _ => self.code.http_status(),
        }
    }
    /// The OpenAI error object (`{"message","type","param","code"}` and `retry_after_ms`).
    pub fn openai_object(&self) -> Value {
        let status = self.status();
        let (message, kind, param, code) = match &self.runtime {
            Some(r) => (
                r.message.clone(),
                r.kind
                    .clone()
                    .unwrap_or_else(|| openai_type(status).to_owned()),
                r.param.clone().or_else(|| self.param.clone()),
                r.code
                    .clone()
                    .unwrap_or_else(|| Value::String(self.code.as_str().to_owned())),
            ),
            None => (
                self.message.clone(),
                openai_type(status).to_owned(),
                self.param.clone(),
                Value::String(self.code.as_str().to_owned()),
            ),
        };
        let mut obj = json!({"message": message, "type": kind, "param": param, "code": code});
        if let (Some(ms), Some(o)) = (self.retry_after_ms, obj.as_object_mut()) {
            o.insert("retry_after_ms".into(), json!(ms));
        }
        obj
    }
    pub fn from_protocol(err: &ProtocolError, server_time_ms: u64) -> Self {
        Self::new(err.code(), err.to_string(), server_time_ms)
    }
    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": self.openai_object(), "server_time_ms": self.server_time_ms});
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(v) = self
            .job_id
            .as_deref()
            .and_then(|j| HeaderValue::from_str(j).ok())
        {
            resp.headers_mut().insert(JOB_ID_HEADER, v);
        }
        if let Some(ms) = self.retry_after_ms {
            // Retry-After is whole seconds; round up so clients never retry early.
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Why the service could not start, load its inputs or publish a config.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("invalid network config in {what}: {reason}")]
    InvalidConfig { what: String, reason: String },
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
}
