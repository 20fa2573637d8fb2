//! Runtime adapters behind one trait: OpenAI-compatible servers (vLLM, llama.cpp, SGLang, …)
//! and Triton's KServe v2. [`probe`] watches the runtime's health on its own client and task.
//!
//! Error mapping is the contract the job session relies on: a runtime 4xx means the request is
//! bad ([`RuntimeError::Rejected`], reported as `runtime_rejected`, not retried elsewhere); a 5xx,
//! timeout or connection failure is retriable ([`RuntimeError::Failed`] /
//! [`RuntimeError::Unavailable`]), and `Unavailable` also makes the node not ready.

use std::future::Future;
use std::time::Duration;

use resultity_protocol::messages::ws::RuntimeRefusal;
use resultity_protocol::messages::{JobKind, RuntimeKind, RuntimeReport, Usage};
use serde_json::Value;
use tokio::sync::mpsc;

mod metrics;
mod openai;
pub mod probe;
mod triton;

pub(crate) use metrics::sample as prometheus_sample;
pub use metrics::{LoadMetrics, MetricsFamily};
pub use openai::{DEFAULT_HEALTH_PATH, OpenAiRuntime};
pub use triton::TritonRuntime;

/// Largest runtime response body read; beyond it the job fails with `output_too_large`.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Why a runtime call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime refused the request (HTTP 4xx): another node would refuse it too.
    #[error("runtime rejected the request (HTTP {status}): {reason}")]
    Rejected {
        status: u16,
        reason: String,
        /// The runtime's own OpenAI-style error object, when it sent one: handed to the caller
        /// unchanged (type, param and code such as `context_length_exceeded`).
        refusal: Option<Box<RuntimeRefusal>>,
    },
    /// The runtime failed (HTTP 5xx or a malformed answer): retriable elsewhere.
    #[error("runtime failed: {0}")]
    Failed(String),
    /// The call exceeded its timeout.
    #[error("runtime call timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The runtime could not be reached (down, restarting).
    #[error("runtime unreachable: {0}")]
    Unavailable(String),
    /// The answer exceeded the size limit.
    #[error("runtime answer of {size} bytes exceeds {max}")]
    TooLarge { size: usize, max: usize },
    /// This runtime kind does not serve this job kind.
    #[error("{runtime} does not serve {} jobs", job_kind_name(*kind))]
    Unsupported {
        runtime: &'static str,
        kind: JobKind,
    },
    /// This runtime kind answers once; it cannot stream.
    #[error("{runtime} cannot stream its output; send the request without \"stream\": true")]
    StreamUnsupported { runtime: &'static str },
    /// Whoever consumed the stream stopped (the job was cancelled or its session ended).
    #[error("the stream's consumer stopped reading")]
    StreamAbandoned,
}

/// A job kind as users know it (the wire name).
fn job_kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::ChatCompletion => "chat completion",
        JobKind::Completion => "completion",
        JobKind::Infer => "KServe v2 inference",
    }
}

impl RuntimeError {
    /// Whether another attempt (here or elsewhere) may succeed.
    pub fn retriable(&self) -> bool {
        matches!(
            self,
            Self::Failed(_) | Self::Timeout(_) | Self::Unavailable(_)
        )
    }
}

/// A runtime's answer to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeOutput {
    /// Response body, verbatim (it is what the signed result carries).
    pub body: String,
    pub usage: Usage,
}

/// One inference runtime the sidecar drives.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Liveness of the server itself (`/health`, `/v2/health/ready`).
    fn health(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Whether `model` is loaded and servable now.
    fn model_ready(&self, model: &str) -> impl Future<Output = Result<bool, RuntimeError>> + Send;
    /// Asks the runtime to load `model` (Triton); vLLM serves a fixed model set, so there this
    /// only checks it is served.
    fn load_model(&self, model: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Asks the runtime to unload `model` (Triton); no-op for vLLM.
    fn unload_model(&self, model: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// A minimal inference proving `model` works end to end.
    fn test_inference(&self, model: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Runs one job's request streamed: every runtime stream event (an OpenAI SSE `data:`
    /// payload, `[DONE]` excluded) is sent to `events` as it arrives, waiting while the
    /// receiver is full (backpressure up to the runtime's socket). Returns the usage the stream
    /// reported (zeros when it reported none).
    fn infer_stream(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
        events: mpsc::Sender<String>,
    ) -> impl Future<Output = Result<Usage, RuntimeError>> + Send;
    /// Runs one job's request.
    fn infer(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
    ) -> impl Future<Output = Result<RuntimeOutput, RuntimeError>> + Send;
    /// Health and load for heartbeats and `/status`.
    fn report(&self) -> impl Future<Output = RuntimeReport> + Send;
}

/// How to talk to the runtime beyond its kind and URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Health endpoint of an OpenAI-compatible server (default `/health`; a 404 or 405 there
    /// falls back to `GET /v1/models`). Triton always uses `/v2/health/ready`.
    pub health_path: Option<String>,
}

impl RuntimeOptions {
    /// Refuses a health path that is not an absolute path on the runtime's origin.
    pub fn validate(&self) -> Result<(), String> {
        match &self.health_path {
            Some(p)
                if !p.starts_with('/') || p.starts_with("//") || p.contains(['?', '#', ' ']) =>
            {
                Err(format!(
                    "health path {p} must be an absolute path such as /health, without query"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The configured runtime: one type the agent holds, whichever kind it is.
#[derive(Debug, Clone)]
pub enum AnyRuntime {
    /// vLLM or another OpenAI-compatible server.
    OpenAi(OpenAiRuntime),
    Triton(TritonRuntime),
}

impl AnyRuntime {
    /// A client for `kind` at `base_url` with `timeout` for control calls.
    pub fn new(kind: RuntimeKind, base_url: &str, timeout: Duration) -> Result<Self, RuntimeError> {
        Self::with_options(kind, base_url, timeout, &RuntimeOptions::default())
    }

    /// A client for jobs and model control: a large connection pool for batched jobs.
    pub fn with_options(
        kind: RuntimeKind,
        base_url: &str,
        timeout: Duration,
        options: &RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        Ok(Self::build(
            kind,
            base_url,
            http_client(timeout)?,
            timeout,
            options,
        ))
    }

    /// A client for health probes only, kept apart from job traffic: it opens a fresh
    /// connection per probe, so a probe never waits behind jobs in a shared pool nor lands on
    /// a keep-alive connection the server has meanwhile closed, and `timeout` bounds each probe.
    pub fn for_probes(
        kind: RuntimeKind,
        base_url: &str,
        timeout: Duration,
        options: &RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| RuntimeError::Unavailable(format!("cannot build HTTP client: {e}")))?;
        Ok(Self::build(kind, base_url, http, timeout, options))
    }

    fn build(
        kind: RuntimeKind,
        base_url: &str,
        http: reqwest::Client,
        control_timeout: Duration,
        options: &RuntimeOptions,
    ) -> Self {
        let base = base_url.trim_end_matches('/').to_owned();
        match kind {
            RuntimeKind::Vllm | RuntimeKind::Openai => Self::OpenAi(OpenAiRuntime::new(
                kind,
                http,
                base,
                control_timeout,
                options.health_path.as_deref(),
            )),
            RuntimeKind::Triton => Self::Triton(TritonRuntime::new(http, base, control_timeout)),
        }
    }

    /// Requests the runtime processes at once, where it tells (`llama-server`'s slots).
    pub async fn parallelism(&self) -> Option<u32> {
        match self {
            Self::OpenAi(r) => r.parallelism().await,
            Self::Triton(_) => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            AnyRuntime::OpenAi($r) => $e,
            AnyRuntime::Triton($r) => $e,
        }
    };
}

impl Runtime for AnyRuntime {
    fn kind(&self) -> RuntimeKind {
        delegate!(self, r => r.kind())
    }
    async fn health(&self) -> Result<(), RuntimeError> {
        delegate!(self, r => r.health().await)
    }
    async fn model_ready(&self, model: &str) -> Result<bool, RuntimeError> {
        delegate!(self, r => r.model_ready(model).await)
    }
    async fn load_model(&self, model: &str) -> Result<(), RuntimeError> {
        delegate!(self, r => r.load_model(model).await)
    }
    async fn unload_model(&self, model: &str) -> Result<(), RuntimeError> {
        delegate!(self, r => r.unload_model(model).await)
    }
    async fn test_inference(&self, model: &str) -> Result<(), RuntimeError> {
        delegate!(self, r => r.test_inference(model).await)
    }
    async fn infer(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
    ) -> Result<RuntimeOutput, RuntimeError> {
        delegate!(self, r => r.infer(kind, model, request, timeout).await)
    }
    async fn infer_stream(
        &self,
        kind: JobKind,
        model: &str,
        request: &Value,
        timeout: Duration,
        events: mpsc::Sender<String>,
    ) -> Result<Usage, RuntimeError> {
        delegate!(self, r => r.infer_stream(kind, model, request, timeout, events).await)
    }
    async fn report(&self) -> RuntimeReport {
        delegate!(self, r => r.report().await)
    }
}

/// HTTP client for a co-located runtime: bounded connect time, no proxy (the runtime is on
/// localhost; a cluster-wide HTTP proxy must not intercept it), and a generous idle pool so
/// batched concurrent jobs reuse connections.
fn http_client(timeout: Duration) -> Result<reqwest::Client, RuntimeError> {
    reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| RuntimeError::Unavailable(format!("cannot build HTTP client: {e}")))
}

/// Maps a transport error to the runtime error contract.
fn transport_error(e: reqwest::Error, timeout: Duration) -> RuntimeError {
    if e.is_timeout() {
        RuntimeError::Timeout(timeout)
    } else if e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
        // Refused, reset, or closed mid-answer (reqwest reports a body cut short as a decode
        // error): the runtime is down or died under the request,
        // which is not the job's fault (handed back without penalty).
        // reqwest's own message is generic; the cause (refused, reset) is in its chain.
        RuntimeError::Unavailable(resultity_protocol::error_chain(&e))
    } else {
        RuntimeError::Failed(resultity_protocol::error_chain(&e))
    }
}

/// Sends a request and reads the body bounded; maps statuses per the module contract.
async fn send(
    req: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<(u16, String), RuntimeError> {
    let mut resp = req
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| transport_error(e, timeout))?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| transport_error(e, timeout))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(RuntimeError::TooLarge {
                size: body.len() + chunk.len(),
                max: MAX_RESPONSE_BYTES,
            });
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(body)
        .map_err(|_| RuntimeError::Failed("runtime answered with non-UTF-8 bytes".into()))?;
    match status {
        200..=299 => Ok((status, text)),
        400..=499 => Err(RuntimeError::Rejected {
            status,
            reason: error_reason(&text),
            refusal: openai_refusal(status, &text).map(Box::new),
        }),
        _ => Err(RuntimeError::Failed(format!(
            "HTTP {status}: {}",
            error_reason(&text)
        ))),
    }
}

/// The runtime's OpenAI error object (`{"error":{"message","type","param","code"}}`), with the
/// message bounded; `None` for any other body (Triton's `{"error":"…"}`, plain text).
fn openai_refusal(status: u16, body: &str) -> Option<RuntimeRefusal> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?.as_object()?;
    let text = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .map(resultity_protocol::limits::clip_text)
    };
    Some(RuntimeRefusal {
        status,
        message: text("message").unwrap_or_else(|| error_reason(body)),
        kind: text("type"),
        param: text("param"),
        code: e
            .get("code")
            .filter(|c| c.is_string() || c.is_number())
            .map(|c| match c.as_str() {
                Some(s) => Value::String(resultity_protocol::limits::clip_text(s)),
                None => c.clone(),
            }),
    })
}

/// Reads a runtime's server-sent events and forwards each `data:` payload to `events`
/// (`[DONE]` ends the stream). Lines and events are bounded; the usage of the last event that
/// reports one is returned.
async fn forward_sse(
    mut resp: reqwest::Response,
    timeout: Duration,
    events: &mpsc::Sender<String>,
) -> Result<Usage, RuntimeError> {
    use resultity_protocol::limits::{MAX_STREAM_EVENT_BYTES, MAX_STREAM_EVENTS};
    let mut pending: Vec<u8> = Vec::new();
    let mut data: Option<String> = None;
    let mut count: u32 = 0;
    let mut usage = Usage::default();
    while let Some(bytes) = resp
        .chunk()
        .await
        .map_err(|e| transport_error(e, timeout))?
    {
        pending.extend_from_slice(&bytes);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = pending.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line)
                .map_err(|_| RuntimeError::Failed("runtime streamed non-UTF-8 bytes".into()))?;
            if line.is_empty() {
                // A blank line ends one event.
                let Some(event) = data.take() else { continue };
                if event == "[DONE]" {
                    return Ok(usage);
                }
                count += 1;
                if count > MAX_STREAM_EVENTS {
                    return Err(RuntimeError::TooLarge {
                        size: count as usize,
                        max: MAX_STREAM_EVENTS as usize,
                    });
                }
                if event.contains("\"usage\"") {
                    let u = openai::openai_usage(&event);
                    if u != Usage::default() {
                        usage = u;
                    }
                }
                events
                    .send(event)
                    .await
                    .map_err(|_| RuntimeError::StreamAbandoned)?;
            } else if let Some(rest) = line.strip_prefix("data:") {
                let rest = rest.strip_prefix(' ').unwrap_or(rest);
                let event = data.get_or_insert_with(String::new);
                if !event.is_empty() {
                    event.push('\n');
                }
                event.push_str(rest);
                if event.len() > MAX_STREAM_EVENT_BYTES {
                    return Err(RuntimeError::TooLarge {
                        size: event.len(),
                        max: MAX_STREAM_EVENT_BYTES,
                    });
                }
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing we forward.
        }
        if pending.len() > MAX_STREAM_EVENT_BYTES + 64 {
            return Err(RuntimeError::TooLarge {
                size: pending.len(),
                max: MAX_STREAM_EVENT_BYTES,
            });
        }
    }
    // The body ended without `[DONE]`: the runtime died or cut the stream.
    Err(RuntimeError::Unavailable(
        "runtime ended the stream before [DONE]".into(),
    ))
}

/// Sends a streaming request; a non-2xx answer is read whole and mapped like [`send`].
async fn send_stream(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    events: &mpsc::Sender<String>,
) -> Result<Usage, RuntimeError> {
    let mut resp = req
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| transport_error(e, timeout))?;
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return forward_sse(resp, timeout, events).await;
    }
    // An error answer is only quoted: read at most MAX_RESPONSE_BYTES of it and drop the rest
    // unread, so a runtime cannot make the node buffer (or wait out) an endless body.
    let mut body = Vec::new();
    while body.len() < MAX_RESPONSE_BYTES
        && let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(e, timeout))?
    {
        let room = MAX_RESPONSE_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    let text = &*String::from_utf8_lossy(&body);
    match status {
        400..=499 => Err(RuntimeError::Rejected {
            status,
            reason: error_reason(text),
            refusal: openai_refusal(status, text).map(Box::new),
        }),
        _ => Err(RuntimeError::Failed(format!(
            "HTTP {status}: {}",
            error_reason(text)
        ))),
    }
}

/// The human reason in an OpenAI (`{"error":{"message":…}}`) or Triton (`{"error":"…"}`) error
/// body, bounded so a hostile runtime cannot fill logs.
fn error_reason(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.to_owned());
    let mut end = msg.len().min(512);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reasons() {
        assert_eq!(error_reason(r#"{"error":{"message":"bad"}}"#), "bad");
        assert_eq!(
            error_reason(r#"{"error":"triton says no"}"#),
            "triton says no"
        );
        assert_eq!(error_reason("plain"), "plain");
        assert!(error_reason(&"é".repeat(1000)).len() <= 512);
    }

    #[test]
    fn openai_errors_keep_type_param_and_code() {
        let body = r#"{"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let r = openai_refusal(400, body).unwrap();
        assert_eq!(r.message, "too long");
        assert_eq!(r.kind.as_deref(), Some("invalid_request_error"));
        assert_eq!(r.param.as_deref(), Some("messages"));
        assert_eq!(
            r.code,
            Some(Value::String("context_length_exceeded".into()))
        );
        assert_eq!(openai_refusal(400, r#"{"error":"triton says no"}"#), None);
        assert_eq!(openai_refusal(400, "plain"), None);
    }

    /// SSE framing: CRLF lines, multi-line data, comments and a payload split across reads.
    #[tokio::test]
    async fn sse_events_are_forwarded_in_order_until_done() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let parts: [&[u8]; 4] = [
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n: ping\r\n\r\ndata: {\"a\"",
                b":1}\r\n\r\ndata: line1\ndata: line2\n\n",
                b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
                b"data: [DONE]\n\n",
            ];
            for p in parts {
                sock.write_all(p).await.unwrap();
                sock.flush().await.unwrap();
            }
        });
        let timeout = Duration::from_secs(10);
        let client = http_client(timeout).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let usage = send_stream(
            client
                .post(format!("http://{addr}/v1/completions"))
                .body("{}"),
            timeout,
            &tx,
        )
        .await
        .unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        server.await.unwrap();
        assert_eq!(
            got,
            [
                r#"{"a":1}"#,
                "line1\nline2",
                r#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#
            ]
        );
        assert_eq!(usage.prompt_tokens, 3);
        assert_eq!(usage.completion_tokens, 2);
    }

    /// An error answer whose body never ends is quoted from its start, not buffered whole.
    #[tokio::test]
    async fn an_endless_error_body_is_read_bounded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
            if sock.write_all(head).await.is_err() {
                return;
            }
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            // Until the client hangs up.
            while sock.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let timeout = Duration::from_secs(60);
        let client = http_client(timeout).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let got = send_stream(
            client
                .post(format!("http://{addr}/v1/completions"))
                .body("{}"),
            timeout,
            &tx,
        )
        .await;
        server.await.unwrap();
        match got {
            Err(RuntimeError::Rejected { status, reason, .. }) => {
                assert_eq!(status, 400);
                assert_eq!(reason, "x".repeat(512));
            }
            other => panic!("expected a bounded rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_timeout_says_its_length_in_ms() {
        let e = RuntimeError::Timeout(Duration::from_millis(1500));
        assert_eq!(e.to_string(), "runtime call timed out after 1500 ms");
    }

    #[test]
    fn retriable_classes() {
        assert!(
            !RuntimeError::Rejected {
                status: 400,
                reason: String::new(),
                refusal: None,
            }
            .retriable()
        );
        assert!(RuntimeError::Failed(String::new()).retriable());
        assert!(RuntimeError::Timeout(Duration::from_secs(1)).retriable());
        assert!(RuntimeError::Unavailable(String::new()).retriable());
        assert!(!RuntimeError::TooLarge { size: 2, max: 1 }.retriable());
    }

    /// A runtime that dies under a request (after reading it, with part of an answer or none)
    /// is unavailable, not failing: the job is handed back without penalty.
    #[tokio::test]
    async fn a_runtime_killed_mid_request_is_unavailable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for partial in [
            &b""[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"choi"[..],
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(partial).await;
                // Dropping the socket is what SIGKILL of the runtime does to the connection.
            });
            let timeout = Duration::from_secs(10);
            let client = http_client(timeout).unwrap();
            let got = send(
                client
                    .post(format!("http://{addr}/v1/completions"))
                    .body("{}"),
                timeout,
            )
            .await;
            server.await.unwrap();
            assert!(
                matches!(got, Err(RuntimeError::Unavailable(_))),
                "partial answer of {} bytes: {got:?}",
                partial.len()
            );
        }
    }
}
