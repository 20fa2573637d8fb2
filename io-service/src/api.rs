//! Caller-facing endpoints: OpenAI-compatible completions, KServe-v2-style inference, a
//! generic job API, and JSON views (`/v1/nodes`, `/v1/jobs/{id}`, `/v1/models`), health,
//! metrics and the admin config endpoints.
//!
//! A job request waits for its verified result. The runtime's answer is returned verbatim,
//! with headers naming the job, the node that served it and whether its signature verified.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use resultity_protocol::messages::JobKind;
use resultity_protocol::{ErrorCode, JobId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::core::{CompletedJob, JobOutcome, JobSpec};
use crate::error::ApiError;
use crate::metrics::Channel;
use crate::node_http::read_body;
use crate::server::AppState;

pub const JOB_ID_HEADER: &str = "x-resultity-job-id";
pub const NODE_ID_HEADER: &str = "x-resultity-node-id";
pub const VERIFIED_HEADER: &str = "x-resultity-verified";

/// Submits a job and waits for its outcome.
async fn run_job(
    state: &AppState,
    model_name: &str,
    kind: JobKind,
    request: Value,
) -> Result<CompletedJob, ApiError> {
    let id = JobId::random()
        .map_err(|e| state.reject(Channel::Api, ErrorCode::Internal, e.to_string()))?;
    let now = state.now();
    let rx = {
        let mut core = state.core();
        let model = core.resolve_model(model_name);
        match model {
            None => Err((
                ErrorCode::NotFound,
                format!("model {model_name:?} is not approved on this network"),
                None,
            )),
            Some(model) => core.submit(
                id.clone(),
                JobSpec {
                    model,
                    kind,
                    request,
                },
                now,
            ),
        }
    };
    let rx = rx.map_err(|(code, msg, retry)| {
        let e = state.reject(Channel::Api, code, msg);
        match retry {
            Some(ms) => e.with_retry_after(ms),
            None => e,
        }
    })?;
    // The core fails the job at its deadline; the extra second only guards against a lost
    // wake-up, so a caller is never left hanging.
    let wait = Duration::from_millis(
        state
            .settings
            .scheduler
            .request_timeout_ms
            .saturating_add(1000),
    );
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(JobOutcome::Completed(done))) => Ok(done),
        Ok(Ok(JobOutcome::Failed { code, reason })) => {
            Err(state.reject(Channel::Api, code, format!("job {id} failed: {reason}")))
        }
        Ok(Err(_)) => Err(state.reject(
            Channel::Api,
            ErrorCode::Internal,
            format!("job {id} was dropped"),
        )),
        Err(_) => Err(state.reject(
            Channel::Api,
            ErrorCode::Timeout,
            format!("job {id} timed out"),
        )),
    }
}

fn job_headers(headers: &mut HeaderMap, done: &CompletedJob) {
    let pairs = [
        (JOB_ID_HEADER, done.job_id.as_str().to_owned()),
        (NODE_ID_HEADER, done.node_id.as_str().to_owned()),
        (VERIFIED_HEADER, done.verified.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// The runtime's body verbatim, with the job headers.
fn verbatim(done: CompletedJob) -> Response {
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json")],
        done.output.clone(),
    )
        .into_response();
    job_headers(resp.headers_mut(), &done);
    resp
}

async fn openai(state: AppState, body: Body, kind: JobKind) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Api).await?;
    let request: Value = serde_json::from_slice(&bytes).map_err(|e| {
        state.reject(
            Channel::Api,
            ErrorCode::Malformed,
            format!("request body: {e}"),
        )
    })?;
    let Some(model) = request
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err(state.reject(
            Channel::Api,
            ErrorCode::Malformed,
            "request needs a \"model\" string",
        ));
    };
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(state.reject(
            Channel::Api,
            ErrorCode::Malformed,
            "streaming is not supported; send \"stream\": false",
        ));
    }
    let done = run_job(&state, &model, kind, request).await?;
    Ok(verbatim(done))
}

/// `POST /v1/chat/completions` (OpenAI-compatible, non-streaming).
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    openai(state, body, JobKind::ChatCompletion).await
}

/// `POST /v1/completions` (OpenAI-compatible, non-streaming).
pub async fn completions(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    openai(state, body, JobKind::Completion).await
}

/// `POST /v2/models/{model}/infer` (KServe v2 inference request, answered verbatim). The
/// model id may contain `/` (`org/name`), so the path is matched as a whole.
pub async fn kserve_infer(
    State(state): State<AppState>,
    Path(model_infer): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(model) = model_infer.strip_suffix("/infer").filter(|m| !m.is_empty()) else {
        return Err(state.reject(Channel::Api, ErrorCode::NotFound, "no such endpoint"));
    };
    let bytes = read_body(&state, body, Channel::Api).await?;
    let request: Value = serde_json::from_slice(&bytes).map_err(|e| {
        state.reject(
            Channel::Api,
            ErrorCode::Malformed,
            format!("request body: {e}"),
        )
    })?;
    let done = run_job(&state, model, JobKind::Infer, request).await?;
    Ok(verbatim(done))
}

#[derive(Debug, Deserialize)]
struct JobRequest {
    model: String,
    kind: JobKind,
    request: Value,
}

/// `POST /v1/jobs` `{model, kind, request}`: the generic job API. Answers a JSON object
/// with the job's identity and the runtime output (parsed when it is JSON).
pub async fn submit_job(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Api).await?;
    let req: JobRequest = serde_json::from_slice(&bytes).map_err(|e| {
        state.reject(
            Channel::Api,
            ErrorCode::Malformed,
            format!("job request: {e}"),
        )
    })?;
    let done = run_job(&state, &req.model, req.kind, req.request).await?;
    let output = serde_json::from_str::<Value>(&done.output)
        .unwrap_or_else(|_| Value::String(done.output.clone()));
    let body = json!({
        "job_id": done.job_id,
        "node_id": done.node_id,
        "verified": done.verified,
        "lease_epoch": done.lease_epoch,
        "attempts": done.attempts,
        "usage": done.usage,
        "output": output,
    });
    let mut resp = Json(body).into_response();
    job_headers(resp.headers_mut(), &done);
    Ok(resp)
}

/// `GET /v1/jobs/{id}`.
pub async fn job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = JobId::parse(&id)
        .ok()
        .and_then(|id| state.core().job_view(&id));
    match view {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(state.reject(
            Channel::Api,
            ErrorCode::NotFound,
            format!("no job {}", crate::core::clip(&id)),
        )),
    }
}

/// `GET /v1/models`: approved models active on at least one eligible node (OpenAI list).
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let now = state.now();
    let models = state.core().available_models(now);
    let data: Vec<Value> = models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "resultity", "revision": m.revision}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/nodes`: every node with its verdict and counters.
pub async fn nodes(State(state): State<AppState>) -> Json<Value> {
    let now = state.now();
    let nodes = state.core().node_views(now);
    Json(json!({"server_time_ms": now, "nodes": nodes}))
}

pub async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let stats = state.core().stats();
    Json(json!({"status": "ok", "server_time_ms": state.now(), "stats": stats}))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Wrong method on a known path: 405 with the spec's error body (code `not_found`: no such
/// route for this method).
pub async fn method_not_allowed(State(state): State<AppState>) -> Response {
    let mut resp = state
        .reject(
            Channel::Api,
            ErrorCode::NotFound,
            "method not allowed on this endpoint",
        )
        .into_response();
    *resp.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    resp
}

pub async fn not_found(State(state): State<AppState>) -> ApiError {
    state.reject(Channel::Api, ErrorCode::NotFound, "no such endpoint")
}

/// Admin endpoints need `Authorization: Bearer <token>`; without a configured token they do
/// not exist.
fn admin_auth(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.settings.admin_token else {
        return Err(state.reject(
            Channel::Api,
            ErrorCode::NotFound,
            "admin endpoints are disabled",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time compare: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(state.reject(
            Channel::Api,
            ErrorCode::BadSignature,
            "admin token missing or wrong",
        ))
    }
}

/// `POST /v1/admin/config`: body is a network config payload (JSON, or YAML with a YAML
/// content type); signs and publishes the next version.
pub async fn admin_publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admin_auth(&state, &headers)?;
    let bytes = read_body(&state, body, Channel::Api).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| state.reject(Channel::Api, ErrorCode::Malformed, "payload is not UTF-8"))?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"));
    let payload = crate::publish::parse_payload(text, "request body", !yaml)
        .map_err(|e| state.reject(Channel::Api, ErrorCode::Malformed, e.to_string()))?;
    let pointer = state
        .publish(payload)
        .map_err(|e| state.reject(Channel::Api, ErrorCode::Malformed, e.to_string()))?;
    Ok(Json(json!({"published": true, "config": pointer})).into_response())
}

/// `POST /v1/admin/config/reload`: re-reads the config source file.
pub async fn admin_reload(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin_auth(&state, &headers)?;
    let outcome = state
        .reload()
        .map_err(|e| state.reject(Channel::Api, ErrorCode::Malformed, e.to_string()))?;
    let current = state.published().pointer();
    Ok(Json(json!({"published": outcome.is_some(), "config": current})).into_response())
}
