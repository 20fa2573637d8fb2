//! The node WebSocket session (spec §7): `hello` with a fresh challenge → signed `auth`
//! (bound to this connection) → `welcome`, then sequenced signed messages both ways.
//!
//! Every inbound frame is bounded, rate limited and opened by [`NetworkSession::open`]
//! (signer must be the session's node, signature strict, addressing, session id, purpose ↔
//! kind, sequence window) before the core sees it. Refusals are answered with an `error`
//! message and counted; repeated invalid signatures close the session.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use resultity_protocol::codes::close;
use resultity_protocol::crypto::{b64, random_bytes};
use resultity_protocol::envelope;
use resultity_protocol::messages::ws::{Hello, NetworkMessage, NodeMessage, Welcome};
use resultity_protocol::session::{NetworkSession, open_auth};
use resultity_protocol::{ErrorCode, NodeId, ProtocolError, Purpose, limits};
use tokio::sync::mpsc;

use crate::core::{Outbound, RateLimiter, SessionLink};
use crate::metrics::Channel;
use crate::state::AppState;

/// tungstenite's own limit sits above ours so an oversize message is answered with
/// `too_large` before the socket is closed, instead of a bare transport error.
const TRANSPORT_SLACK: usize = 64 * 1024;
/// A send that cannot complete within this is treated as a dead peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /v1/node/session`.
pub async fn upgrade(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // A plain GET (or a broken upgrade) gets the spec's JSON error, not axum's text.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return state
                .reject(
                    Channel::Ws,
                    ErrorCode::Malformed,
                    format!("WebSocket upgrade required: {rejection}"),
                )
                .into_response();
        }
    };
    let Ok(permit) = state.sessions.clone().try_acquire_owned() else {
        return state
            .reject(
                Channel::Ws,
                ErrorCode::Unavailable,
                "too many open sessions",
            )
            .with_retry_after(1000)
            .into_response();
    };
    let lim = &state.settings.limits;
    let transport_max = lim.max_frame_bytes.saturating_add(TRANSPORT_SLACK);
    ws.read_buffer_size(lim.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(transport_max)
        .max_frame_size(transport_max)
        .on_upgrade(move |socket| async move {
            run(state, socket).await;
            drop(permit);
        })
}

async fn send_text(socket: &mut WebSocket, text: String) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

/// RFC 6455 §5.5: a control frame's payload is at most 125 bytes, two of which are the code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// `reason` cut on a character boundary to fit a close frame.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: close_reason(reason).into(),
    };
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(Some(frame)))).await;
}

/// Handshake; on success, the session loop.
async fn run(state: AppState, mut socket: WebSocket) {
    let Ok(challenge) = random_bytes::<32>().map(|b| b64(&b)) else {
        close_with(&mut socket, close::GOING_AWAY, "no randomness").await;
        return;
    };
    let timing = state.published().snapshot.payload.timing.clone();
    let lim = state.settings.limits.clone();
    let hello = Hello {
        network_id: state.settings.network_id.clone(),
        challenge: challenge.clone(),
        server_time_ms: state.now(),
        protocol_versions: limits::PROTOCOL_VERSIONS.to_vec(),
        max_frame_bytes: u32::try_from(lim.max_frame_bytes).unwrap_or(u32::MAX),
        ping_interval_ms: timing.ping_interval_ms,
    };
    let Ok(text) = envelope::seal(state.signing_key(), Purpose::WsHello, &hello) else {
        return;
    };
    if !send_text(&mut socket, text).await {
        return;
    }
    // Pings (and pongs) may come before `auth`; they are answered by the transport and do not
    // extend the deadline.
    let auth_deadline = tokio::time::Instant::now() + Duration::from_millis(lim.auth_timeout_ms);
    let next_data = async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    };
    let auth_frame = match tokio::time::timeout_at(auth_deadline, next_data).await {
        Err(_) => {
            state.metrics.reject(Channel::Ws, ErrorCode::Timeout);
            close_with(&mut socket, close::AUTH_TIMEOUT, "no auth in time").await;
            return;
        }
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(_) => {
            state.metrics.reject(Channel::Ws, ErrorCode::Malformed);
            close_with(
                &mut socket,
                close::PROTOCOL_ERROR,
                "expected an auth text frame",
            )
            .await;
            return;
        }
    };
    let (auth, key) = match open_auth(
        auth_frame.as_bytes(),
        &state.settings.network_id,
        &challenge,
    ) {
        Ok(ok) => ok,
        Err(e) => {
            state.metrics.reject(Channel::Ws, e.code());
            let code = if matches!(e, ProtocolError::NoCommonVersion { .. }) {
                close::UNSUPPORTED_VERSION
            } else {
                close::AUTH_FAILED
            };
            close_with(&mut socket, code, &e.to_string()).await;
            return;
        }
    };
    let node_id = auth.node_id.clone();
    let Ok(session_id) = random_bytes::<16>().map(|b| b64(&b)) else {
        return;
    };
    let (tx, rx) = mpsc::channel(lim.session_outbound.max(1));
    let now = state.now();
    let attached = {
        let mut core = state.core();
        if core.is_revoked(&node_id) {
            Err((ErrorCode::Revoked, "node key revoked".to_owned()))
        } else {
            core.attach_session(
                &node_id,
                SessionLink {
                    session_id: session_id.clone(),
                    tx,
                },
                auth.credits,
                auth.max_concurrency,
                auth.draining,
                now,
            )
        }
    };
    let resumed_jobs = match attached {
        Ok(n) => n,
        Err((code, msg)) => {
            state.metrics.reject(Channel::Ws, code);
            // Revoked and unregistered nodes alike failed `auth` (spec §8.3: revoked → 4001).
            close_with(&mut socket, close::AUTH_FAILED, &msg).await;
            return;
        }
    };
    let welcome = Welcome {
        network_id: state.settings.network_id.clone(),
        node_id: node_id.clone(),
        session_id: session_id.clone(),
        protocol_version: auth.protocol_version,
        server_time_ms: now,
        resumed_jobs,
    };
    tracing::info!(node = %node_id, session = %session_id, resumed_jobs, "session open");
    let sent = match envelope::seal(state.signing_key(), Purpose::WsWelcome, &welcome) {
        Ok(text) => send_text(&mut socket, text).await,
        Err(_) => false,
    };
    if sent {
        let session = NetworkSession::new(
            state.settings.network_id.clone(),
            node_id.clone(),
            key,
            session_id.clone(),
            lim.max_frame_bytes,
        );
        let mut live = Live {
            rate: RateLimiter::new(lim.ws_msg_rate_per_s, lim.ws_msg_burst, now),
            invalid: 0,
            state: state.clone(),
            session,
            node_id: node_id.clone(),
        };
        live.run(&mut socket, rx, timing.ping_interval_ms).await;
    }
    state
        .core()
        .detach_session(&node_id, &session_id, state.now());
    tracing::info!(node = %node_id, session = %session_id, "session closed");
}

/// An authenticated session.
struct Live {
    state: AppState,
    session: NetworkSession,
    node_id: NodeId,
    rate: RateLimiter,
    invalid: u32,
}

/// What the loop does after a frame.
enum Next {
    Continue,
    Close(u16, String),
}

impl Live {
    async fn run(
        &mut self,
        socket: &mut WebSocket,
        mut rx: mpsc::Receiver<Outbound>,
        ping_interval_ms: u64,
    ) {
        let ping_every = Duration::from_millis(ping_interval_ms.max(100));
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        let mut last_heard = tokio::time::Instant::now();
        let mut shutdown = self.state.shutdown.clone();
        loop {
            // Biased, socket first: after a stall (GC pause, SIGSTOP, overload) frames that
            // arrived meanwhile are read before the ping timer may call the peer dead.
            let next = tokio::select! {
                biased;
                _ = crate::state::stopped(&mut shutdown) => Next::Close(close::GOING_AWAY, "network shutting down".into()),
                frame = socket.recv() => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        Some(Ok(Message::Text(t))) => self.on_frame(socket, t.as_str()).await,
                        Some(Ok(Message::Binary(_))) => {
                            self.state.metrics.reject(Channel::Ws, ErrorCode::Malformed);
                            Next::Close(close::PROTOCOL_ERROR, "binary frames are not part of the protocol".into())
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Next::Continue,
                        Some(Ok(Message::Close(_))) | None => return,
                        Some(Err(e)) => {
                            let text = e.to_string();
                            if text.contains("too long") || text.contains("Space limit") {
                                self.state.metrics.reject(Channel::Ws, ErrorCode::TooLarge);
                            }
                            tracing::debug!(node = %self.node_id, error = %text, "session transport error");
                            return;
                        }
                    }
                }
                out = rx.recv() => match out {
                    Some(Outbound::Msg(msg)) => self.send(socket, msg).await,
                    Some(Outbound::Close(code, why)) => Next::Close(code, why),
                    None => Next::Close(close::GOING_AWAY, "session dropped".into()),
                },
                _ = ping.tick() => {
                    // Dead after two ping intervals without any frame from the node.
                    if last_heard.elapsed() > ping_every * 2 {
                        Next::Close(close::DEAD_PEER, "no pong within two ping intervals".into())
                    } else if tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Ping(Vec::new().into()))).await.is_err() {
                        return;
                    } else {
                        Next::Continue
                    }
                }
            };
            if let Next::Close(code, why) = next {
                close_with(socket, code, &why).await;
                return;
            }
        }
    }

    async fn send(&mut self, socket: &mut WebSocket, msg: NetworkMessage) -> Next {
        match self.session.seal(self.state.signing_key(), msg) {
            Ok(text) => {
                if send_text(socket, text).await {
                    Next::Continue
                } else {
                    Next::Close(close::GOING_AWAY, "send failed".into())
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot seal a network message");
                Next::Continue
            }
        }
    }

    async fn refuse(
        &mut self,
        socket: &mut WebSocket,
        code: ErrorCode,
        message: String,
        seq: Option<u64>,
    ) -> Next {
        self.state.metrics.reject(Channel::Ws, code);
        tracing::debug!(node = %self.node_id, %code, %message, "ws message refused");
        self.send(socket, NetworkMessage::Error { code, message, seq })
            .await
    }

    async fn on_frame(&mut self, socket: &mut WebSocket, text: &str) -> Next {
        let max = self.state.settings.limits.max_frame_bytes;
        if text.len() > max {
            self.refuse(
                socket,
                ErrorCode::TooLarge,
                format!("frame of {} bytes exceeds {max}", text.len()),
                None,
            )
            .await;
            return Next::Close(close::TOO_BIG, "frame too large".into());
        }
        let now = self.state.now();
        if !self.rate.allow(now) {
            return self
                .refuse(
                    socket,
                    ErrorCode::RateLimited,
                    "too many messages".into(),
                    None,
                )
                .await;
        }
        let opened = match self.session.open(text.as_bytes()) {
            Ok(m) => m,
            Err(e) => {
                let code = e.code();
                let next = self.refuse(socket, code, e.to_string(), None).await;
                if matches!(
                    code,
                    ErrorCode::BadSignature | ErrorCode::WrongNode | ErrorCode::UnknownSigner
                ) {
                    self.invalid += 1;
                    self.state.core().on_invalid_signature(&self.node_id, now);
                    if self.invalid >= self.state.settings.scheduler.max_invalid_signatures {
                        return Next::Close(
                            close::TOO_MANY_INVALID,
                            "too many invalid signatures".into(),
                        );
                    }
                }
                return next;
            }
        };
        let seq = opened.seq;
        if let NodeMessage::JobChunk {
            job_id,
            lease_epoch,
            index,
            events,
        } = opened.msg
        {
            return self
                .on_chunk(socket, job_id, lease_epoch, index, events, seq, now)
                .await;
        }
        let outcome = {
            let mut core = self.state.core();
            match opened.msg {
                NodeMessage::JobAck {
                    job_id,
                    lease_epoch,
                } => core.on_ack(&self.node_id, &job_id, lease_epoch),
                NodeMessage::JobResult(result) => core.on_result(&self.node_id, result, now),
                NodeMessage::JobFail {
                    job_id,
                    lease_epoch,
                    code,
                    reason,
                    refusal,
                } => core.on_fail(
                    &self.node_id,
                    &job_id,
                    lease_epoch,
                    code,
                    &reason,
                    refusal,
                    now,
                ),
                // Handled above.
                NodeMessage::JobChunk { .. } => Ok(()),
                NodeMessage::Credits { credits, in_flight } => {
                    core.on_credits(&self.node_id, credits, in_flight, now);
                    Ok(())
                }
                NodeMessage::Draining { .. } => {
                    core.on_draining(&self.node_id);
                    Ok(())
                }
                NodeMessage::Drained {} => {
                    core.on_drained(&self.node_id);
                    Ok(())
                }
            }
        };
        match outcome {
            Ok(()) => Next::Continue,
            Err((code, message)) => self.refuse(socket, code, message, Some(seq)).await,
        }
    }

    /// A verified chunk: the core checks it against the lease and the stream so far; its
    /// events then go to the caller, waiting for room (backpressure: this session reads no
    /// further frame meanwhile). An accepted chunk costs no rate-limit token, since the
    /// stream's own limits bound it.
    #[allow(clippy::too_many_arguments)]
    async fn on_chunk(
        &mut self,
        socket: &mut WebSocket,
        job_id: resultity_protocol::JobId,
        lease_epoch: u64,
        index: u32,
        events: Vec<String>,
        seq: u64,
        now: u64,
    ) -> Next {
        let accepted =
            self.state
                .core()
                .on_chunk(&self.node_id, &job_id, lease_epoch, index, events, now);
        let (sink, events) = match accepted {
            Ok(x) => x,
            Err((code, message)) => return self.refuse(socket, code, message, Some(seq)).await,
        };
        self.rate.refund();
        self.state.metrics.stream_chunks.inc();
        let sent =
            tokio::time::timeout(crate::stream::CALLER_SEND_TIMEOUT, sink.send(events)).await;
        if !matches!(sent, Ok(Ok(()))) {
            let why = if sent.is_err() {
                "the caller stopped reading the stream"
            } else {
                "the caller closed the stream"
            };
            self.state
                .core()
                .caller_gone(&job_id, why, self.state.now());
        }
        Next::Continue
    }
}
