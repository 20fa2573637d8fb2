//! Caller-facing endpoints: OpenAI-compatible completions, KServe-v2-style inference, a
//! generic job API, and JSON views (`/v1/nodes`, `/v1/jobs/{id}`, `/v1/models`), health,
//! metrics and the admin config endpoints.
//!
//! A job request waits for its verified result. The runtime's answer is returned verbatim,
//! with headers naming the job, the node that served it and whether its signature verified.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use resultity_protocol::messages::{JobKind, ModelRef, RuntimeKind};
use resultity_protocol::{ErrorCode, JobId};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::core::{CompletedJob, JobOutcome, JobSpec};
use crate::error::ApiError;
use crate::metrics::Channel;
use crate::state::{AppState, read_body};
use crate::stream::StreamSink;

pub use crate::error::JOB_ID_HEADER;
pub const NODE_ID_HEADER: &str = "x-resultity-node-id";
pub const VERIFIED_HEADER: &str = "x-resultity-verified";

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 128;

/// Submits a job; returns its id and the receiver of its outcome.
fn submit(
    state: &AppState,
    model_name: &str,
    kind: JobKind,
    request: Value,
    stream: Option<StreamSink>,
) -> Result<(JobId, oneshot::Receiver<JobOutcome>), ApiError> {
    let id = JobId::random()
        .map_err(|e| state.reject(Channel::Api, ErrorCode::Internal, e.to_string()))?;
    let now = state.now();
    let rx = {
        let mut core = state.core();
        match core.resolve_model(model_name) {
            None => Err((
                ErrorCode::NotFound,
                format!(
                    "The model `{}` does not exist or is not approved on this network.",
                    crate::core::clip(model_name)
                ),
                None,
            )),
            Some(model) => {
                if let Some(refusal) =
                    endpoint_refusal(&core.runtimes_serving(&model, now), kind, &model)
                {
                    return Err(state
                        .reject(Channel::Api, ErrorCode::Malformed, refusal.0)
                        .with_param(refusal.1));
                }
                core.submit(
                    id.clone(),
                    JobSpec {
                        model,
                        kind,
                        request,
                        stream,
                    },
                    now,
                )
            }
        }
    };
    let rx = rx.map_err(|(code, msg, retry)| {
        let e = state.reject(Channel::Api, code, msg);
        let e = if code == ErrorCode::NotFound {
            e.with_param("model")
        } else {
            e
        };
        match retry {
            Some(ms) => e.with_retry_after(ms),
            None => e,
        }
    })?;
    Ok((id, rx))
}

/// Why the nodes serving `model` cannot answer this kind of request (OpenAI completions, and
/// so streams, from a model only Triton nodes serve), with the parameter at fault; `None` when
/// one can (or none serves it now: the scheduler says so then).
fn endpoint_refusal(
    kinds: &[RuntimeKind],
    kind: JobKind,
    model: &ModelRef,
) -> Option<(String, &'static str)> {
    if kinds.is_empty() {
        return None;
    }
    let openai = kinds.iter().any(|k| *k != RuntimeKind::Triton);
    match kind {
        JobKind::ChatCompletion | JobKind::Completion if !openai => Some((
            format!(
                "model {} is served here only by Triton nodes, which answer KServe v2 inference (POST /v2/models/{}/infer), not OpenAI completions",
                model.id, model.id
            ),
            "model",
        )),
        _ => None,
    }
}

/// What a caller is told when a job failed: the runtime's own refusal when there is one,
/// otherwise a message per code, never the network's internal job text (that stays in the
/// log and in `GET /v1/jobs/{id}`).
fn job_failed(state: &AppState, id: &JobId, outcome: JobOutcome) -> ApiError {
    let JobOutcome::Failed {
        code,
        reason,
        refusal,
    } = outcome
    else {
        return state.reject(Channel::Api, ErrorCode::Internal, "job completed twice");
    };
    tracing::debug!(job = %id, %code, %reason, "job failed for its caller");
    let message = match code {
        ErrorCode::Timeout => "No node completed the request within its deadline; retry later.",
        ErrorCode::TooLarge => "The answer exceeds the network's output size limit.",
        ErrorCode::Unavailable => {
            "The node or the network serving the request became unavailable; retry."
        }
        ErrorCode::Malformed => "The model's runtime refused the request.",
        _ => "The request could not be completed.",
    };
    let mut e = state
        .reject(Channel::Api, code, message)
        .with_job(id.as_str());
    if let Some(r) = refusal {
        e = e.with_runtime(r);
    }
    if matches!(code, ErrorCode::Timeout | ErrorCode::Unavailable) {
        e = e.with_retry_after(1000);
    }
    e
}

/// How long a caller waits: the core fails the job at its deadline; the extra second only
/// guards against a lost wake-up, so a caller is never left hanging.
fn caller_wait(state: &AppState) -> Duration {
    Duration::from_millis(
        state
            .settings
            .scheduler
            .request_timeout_ms
            .saturating_add(1000),
    )
}

/// Submits a job and waits for its outcome.
async fn run_job(
    state: &AppState,
    model_name: &str,
    kind: JobKind,
    request: Value,
) -> Result<CompletedJob, ApiError> {
    let (id, rx) = submit(state, model_name, kind, request, None)?;
    match tokio::time::timeout(caller_wait(state), rx).await {
        Ok(Ok(JobOutcome::Completed(done))) => Ok(done),
        Ok(Ok(failed)) => Err(job_failed(state, &id, failed)),
        Ok(Err(_)) => Err(state
            .reject(Channel::Api, ErrorCode::Internal, "The job was dropped.")
            .with_job(id.as_str())),
        Err(_) => Err(state
            .reject(
                Channel::Api,
                ErrorCode::Timeout,
                "No node completed the request within its deadline; retry later.",
            )
            .with_job(id.as_str())),
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

/// Checks the OpenAI fields the network itself depends on; the runtime checks the rest.
fn check_openai_request(state: &AppState, request: &Value) -> Result<(String, bool), ApiError> {
    let bad = |msg: &str, param: &str| {
        state
            .reject(Channel::Api, ErrorCode::Malformed, msg)
            .with_param(param)
    };
    if !request.is_object() {
        return Err(bad("The request body must be a JSON object.", "body"));
    }
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return Err(bad("The request needs a \"model\" string.", "model"));
    };
    let stream = match request.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("\"stream\" must be a boolean.", "stream")),
    };
    match request.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64().is_some_and(|n| (1..=MAX_CHOICES).contains(&n)) => {}
        Some(_) => {
            return Err(bad(
                &format!("\"n\" must be an integer from 1 to {MAX_CHOICES}."),
                "n",
            ));
        }
    }
    if let Some(opts) = request.get("stream_options").filter(|o| !o.is_null()) {
        if !stream {
            return Err(bad(
                "\"stream_options\" is only allowed with \"stream\": true.",
                "stream_options",
            ));
        }
        if !opts.is_object() {
            return Err(bad(
                "\"stream_options\" must be an object.",
                "stream_options",
            ));
        }
    }
    Ok((model.to_owned(), stream))
}

async fn openai(state: AppState, body: Body, kind: JobKind) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Api).await?;
    let request: Value = serde_json::from_slice(&bytes).map_err(|e| {
        state
            .reject(
                Channel::Api,
                ErrorCode::Malformed,
                format!("The request body is not valid JSON: {e}"),
            )
            .with_param("body")
    })?;
    let (model, stream) = check_openai_request(&state, &request)?;
    if stream {
        return stream_job(state, &model, kind, request).await;
    }
    let done = run_job(&state, &model, kind, request).await?;
    Ok(verbatim(done))
}

/// What a streamed answer still has to do.
enum StreamStep {
    /// Read chunks until the job's outcome.
    Reading,
    /// The outcome arrived; the caller still gets what is queued, then its end.
    Ending(JobOutcome),
    Done,
}

/// A streamed job's answer: the first event decides between an error answer (nothing was
/// produced: the job failed as a whole, or was restarted elsewhere until it could not be) and
/// `200 text/event-stream`. Events are OpenAI SSE `data:` lines; `data: [DONE]` follows only
/// once the signed result verified, with its stream digest equal to the events received; a
/// failure after the first event ends the stream with an OpenAI error event instead.
async fn stream_job(
    state: AppState,
    model: &str,
    kind: JobKind,
    request: Value,
) -> Result<Response, ApiError> {
    let (sink, mut events) = crate::stream::caller_channel();
    let (id, mut outcome) = submit(&state, model, kind, request, Some(sink))?;
    let deadline = tokio::time::Instant::now() + caller_wait(&state);
    // A closed channel (the job ended and dropped its sink) disables the first branch, so the
    // outcome decides.
    let (first, step) = tokio::select! {
        biased;
        Some(batch) = events.recv() => (Some(batch), StreamStep::Reading),
        out = &mut outcome => {
            match out {
                // Completed without a single event: the stream is just its end.
                Ok(done @ JobOutcome::Completed(_)) => (None, StreamStep::Ending(done)),
                Ok(failed) => return Err(job_failed(&state, &id, failed)),
                Err(_) => return Err(state.reject(Channel::Api, ErrorCode::Internal, "The job was dropped.").with_job(id.as_str())),
            }
        }
        _ = tokio::time::sleep_until(deadline) => {
            return Err(state.reject(Channel::Api, ErrorCode::Timeout, "No node completed the request within its deadline; retry later.").with_job(id.as_str()));
        }
    };
    let sse_state = (
        events,
        outcome,
        first,
        step,
        state.clone(),
        id.clone(),
        deadline,
    );
    let body = futures_util::stream::unfold(
        sse_state,
        |(mut events, mut outcome, mut first, mut step, state, id, deadline)| async move {
            let bytes = loop {
                if let Some(batch) = first.take() {
                    break sse_events(&batch);
                }
                match step {
                    StreamStep::Done => return None,
                    StreamStep::Ending(out) => {
                        // Chunks accepted before the result are already queued.
                        if let Ok(batch) = events.try_recv() {
                            step = StreamStep::Ending(out);
                            break sse_events(&batch);
                        }
                        step = StreamStep::Done;
                        break match out {
                            JobOutcome::Completed(_) => Bytes::from_static(b"data: [DONE]\n\n"),
                            failed => sse_error(&job_failed(&state, &id, failed)),
                        };
                    }
                    StreamStep::Reading => {
                        tokio::select! {
                            biased;
                            Some(batch) = events.recv() => break sse_events(&batch),
                            out = &mut outcome => {
                                step = StreamStep::Ending(out.unwrap_or(JobOutcome::Failed {
                                    code: ErrorCode::Internal,
                                    reason: "the job was dropped".into(),
                                    refusal: None,
                                }));
                            }
                            _ = tokio::time::sleep_until(deadline) => {
                                step = StreamStep::Ending(JobOutcome::Failed {
                                    code: ErrorCode::Timeout,
                                    reason: "the caller's deadline passed".into(),
                                    refusal: None,
                                });
                            }
                        }
                    }
                }
            };
            Some((
                Ok::<Bytes, std::convert::Infallible>(bytes),
                (events, outcome, first, step, state, id, deadline),
            ))
        },
    );
    let mut resp = Response::new(Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(id.as_str()) {
        headers.insert(JOB_ID_HEADER, v);
    }
    Ok(resp)
}

/// Runtime stream events as SSE `data:` lines (an event's own newlines become more `data:`
/// lines, which SSE joins back).
fn sse_events(batch: &[String]) -> Bytes {
    let mut out = String::with_capacity(batch.iter().map(|e| e.len() + 8).sum());
    for e in batch {
        for line in e.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    Bytes::from(out)
}

/// The OpenAI error event that ends a broken stream (clients raise it as an API error).
fn sse_error(e: &ApiError) -> Bytes {
    let body = json!({"error": e.openai_object()});
    Bytes::from(format!("data: {body}\n\n"))
}

/// `POST /v1/chat/completions` (OpenAI-compatible; `"stream": true` answers server-sent events).
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    openai(state, body, JobKind::ChatCompletion).await
}

/// `POST /v1/completions` (OpenAI-compatible; `"stream": true` answers server-sent events).
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

/// The OpenAI model object, with the APIs the nodes serving it answer.
fn model_object(m: &ModelRef, kinds: &[RuntimeKind]) -> Value {
    let mut endpoints = Vec::new();
    if kinds.iter().any(|k| *k != RuntimeKind::Triton) {
        endpoints.extend(["/v1/chat/completions", "/v1/completions"]);
    }
    if kinds.contains(&RuntimeKind::Triton) {
        endpoints.push("/v2/models/{model}/infer");
    }
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": "resultity", "revision": m.revision, "endpoints": endpoints})
}

/// `GET /v1/models`: approved models active on at least one eligible node (OpenAI list).
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let now = state.now();
    let core = state.core();
    let data: Vec<Value> = core
        .available_models(now)
        .iter()
        .map(|m| model_object(m, &core.runtimes_serving(m, now)))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (OpenAI `models.retrieve`): the model if some eligible node serves
/// it now, else 404. The id may contain `/` and may name a revision (`id@revision`).
pub async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let now = state.now();
    let found = {
        let core = state.core();
        core.resolve_model(&id)
            .filter(|m| core.available_models(now).contains(m))
            .map(|m| model_object(&m, &core.runtimes_serving(&m, now)))
    };
    found.map(Json).ok_or_else(|| {
        state
            .reject(
                Channel::Api,
                ErrorCode::NotFound,
                format!(
                    "The model `{}` does not exist or no node serves it now.",
                    crate::core::clip(&id)
                ),
            )
            .with_param("model")
    })
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

/// Wrong method on a known path: 405 `method_not_allowed`; the router adds the `Allow`
/// header listing the methods the path has.
pub async fn method_not_allowed(State(state): State<AppState>) -> ApiError {
    state.reject(
        Channel::Api,
        ErrorCode::MethodNotAllowed,
        "This endpoint does not accept this HTTP method; see the Allow header.",
    )
}

pub async fn not_found(State(state): State<AppState>) -> ApiError {
    state.reject(Channel::Api, ErrorCode::NotFound, "No such endpoint.")
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
