//! Errors: [`ApiError`] is a rejection answered on the wire (spec `ErrorResponse`, status from
//! [`ErrorCode::http_status`]); [`IoError`] is a failure to start or reconfigure the service.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use resultity_protocol::messages::http::{ErrorBody, ErrorResponse};
use resultity_protocol::{ErrorCode, ProtocolError};

/// A refused request, ready to be answered. Built through `AppState::reject` so every
/// rejection is counted by reason before it leaves.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    pub server_time_ms: u64,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>, server_time_ms: u64) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
            server_time_ms,
        }
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
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code,
                message: self.message,
                retry_after_ms: self.retry_after_ms,
            },
            server_time_ms: self.server_time_ms,
        };
        let mut resp = (status, axum::Json(body)).into_response();
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
