//! Wiring: shared state, the router, background ticks, start and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use resultity_protocol::ErrorCode;
use resultity_protocol::messages::http::paths;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::Core;
use crate::error::IoError;
use crate::metrics::{Channel, Metrics};
use crate::publish;
use crate::settings::Settings;
pub use crate::state::{AppState, Shared, stopped};
use crate::{api, node_http, session};

/// Header carrying server time on every answer (bodies of protocol answers carry it too).
pub const SERVER_TIME_HEADER: &str = "x-resultity-server-time-ms";

/// The service; see [`IoService::start`].
#[derive(Debug)]
pub struct IoService;

/// A running service: its address, its state, and a way to stop it.
#[derive(Debug)]
pub struct IoServiceHandle {
    local_addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl IoService {
    /// Binds the listener, publishes the first config (continuing from the state file when
    /// one is configured) and starts serving.
    pub async fn start(settings: Settings) -> Result<IoServiceHandle, IoError> {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| IoError::Bind {
                addr: settings.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| IoError::Bind {
            addr: settings.listen,
            source,
        })?;
        let held = settings.held_keys();
        let stored = match &settings.config_state {
            Some(path) => publish::load_state(path, &held, &settings.network_id)?,
            None => None,
        };
        // Kept rotations only serve catch-up: a damaged file costs that, not the service.
        let rotations = match &settings.config_state {
            Some(path) => publish::load_rotations(&publish::rotations_path(path))
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "kept key rotations unreadable; nodes that missed a rotation must be re-pinned");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let payload = publish::prepare_payload(
            settings.network_config.clone(),
            &settings.network_key,
            settings.next_network_key.as_ref(),
            stored.as_ref().map(|s| &s.snapshot.payload),
        )?;
        let now = settings.clock.now_ms();
        let key = match &stored {
            Some(s) => publish::signing_key(&held, &s.snapshot.payload, now)?,
            None => &settings.network_key,
        };
        let first = publish::initial(
            stored,
            key,
            &settings.network_id,
            payload,
            now,
            settings.config_ttl_ms,
        )?;
        if let Some(path) = &settings.config_state {
            publish::save_state(path, &first)?;
        }
        let metrics = Metrics::new();
        metrics.configs_published.inc();
        let core = Core::new(
            settings.scheduler.clone(),
            settings.limits.clone(),
            metrics.clone(),
            Arc::new(first.snapshot.payload.clone()),
            first.pointer().digest,
        );
        let (stop, shutdown) = watch::channel(false);
        let state = AppState::new(settings, metrics, core, first, rotations, shutdown.clone());
        // A rotation whose window ended while the service was down is confirmed first; a
        // configured next key not yet published starts one.
        state.confirm_rotation()?;
        state.rotate_keys()?;
        let app = router(state.clone());
        let listener =
            crate::listener::BoundedListener::new(listener, state.settings.limits.max_connections);
        let header_timeout = Duration::from_millis(state.settings.limits.header_timeout_ms);
        let server = tokio::spawn(serve_http(listener, app, header_timeout, shutdown.clone()));
        let ticker = tokio::spawn(tick_loop(state.clone(), shutdown));
        tracing::info!(%local_addr, network = %state.settings.network_id, key = %state.signing_key().id(), "resultity-io listening");
        Ok(IoServiceHandle {
            local_addr,
            state,
            stop,
            server: Some(server),
            ticker: Some(ticker),
        })
    }
}

impl IoServiceHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
    /// `http://addr` — base URL of every endpoint.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }
    pub fn state(&self) -> &AppState {
        &self.state
    }
    /// Stops accepting, closes sessions (going away) and waits up to five seconds.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let now = self.state.now();
        self.state.core().fail_all("network shutting down", now);
        if let Some(server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
        {
            tracing::warn!("server did not stop within 5 s");
        }
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

impl Drop for IoServiceHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let now = self.state.now();
        self.state.core().fail_all("network shutting down", now);
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

/// Timeouts and retries run on a fixed tick; the config is re-signed at half its lifetime so
/// nodes never hold an expired snapshot.
async fn tick_loop(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(
        state.settings.scheduler.tick_ms.max(1),
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        let now = state.now();
        state.core().tick(now);
        let current = state.published();
        // Checked here without the publication lock: nearly every tick has nothing to confirm.
        if current
            .snapshot
            .payload
            .retiring_keys
            .iter()
            .any(|r| r.not_after_ms <= now)
            && let Err(e) = state.confirm_rotation()
        {
            tracing::error!(error = %e, "confirming the key rotation failed");
        }
        let half = state.settings.config_ttl_ms / 2;
        if now >= current.snapshot.issued_at_ms.saturating_add(half) {
            let payload = current.snapshot.payload.clone();
            if let Err(e) = state.publish(payload) {
                tracing::error!(error = %e, "re-signing the config failed");
            }
        }
    }
}

/// The HTTP/1 accept loop. axum's own `serve` sets no header read timeout, so a client that
/// never finishes its headers would hold a connection slot for as long as it likes; hyper's
/// `header_read_timeout` closes it. WebSocket upgrades are served on the same connections.
async fn serve_http(
    mut listener: crate::listener::BoundedListener,
    app: Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    use axum::serve::Listener;
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut shutdown) => return,
        };
        let app = app.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(crate::listener::PeerAddr(addr)));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
                    }
                }
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

/// Concurrency bound and server time on every answer.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let max = state.settings.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > max as u64) {
        // Refused on the declaration, before a byte of the body is read; the connection is
        // closed since the unread body would otherwise have to be drained.
        let mut resp = state
            .reject(
                Channel::Http,
                ErrorCode::TooLarge,
                format!("declared body of {len} bytes exceeds {max}"),
            )
            .into_response();
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
        return resp;
    }
    let permit = state.try_http_slot().ok_or(());
    let mut resp = match permit {
        Ok(_permit) => next.run(req).await,
        Err(_) => state
            .reject(
                Channel::Http,
                ErrorCode::Unavailable,
                "too many concurrent requests",
            )
            .with_retry_after(1000)
            .into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&state.now().to_string()) {
        resp.headers_mut().insert(SERVER_TIME_HEADER, v);
    }
    resp
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(paths::CHALLENGE, post(node_http::challenge))
        .route(paths::REGISTER, post(node_http::register))
        .route(paths::PING, post(node_http::ping))
        .route(paths::HEARTBEAT, post(node_http::heartbeat))
        .route(paths::DEREGISTER, post(node_http::deregister))
        .route(paths::CONFIG, get(node_http::config))
        .route(paths::CONFIG_DIGEST, get(node_http::config_digest))
        .route(paths::SESSION, get(session::upgrade))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::models))
        .route("/v1/models/{*id}", get(api::model))
        .route("/v1/jobs", post(api::submit_job))
        .route("/v1/jobs/{id}", get(api::job))
        .route("/v2/models/{*model_infer}", post(api::kserve_infer))
        .route("/v1/nodes", get(api::nodes))
        .route("/v1/admin/config", post(api::admin_publish))
        .route("/v1/admin/config/reload", post(api::admin_reload))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}
