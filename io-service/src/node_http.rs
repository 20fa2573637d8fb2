//! Signed node HTTP requests (spec §6): bounded read, envelope open (purpose, strict
//! signature, audience, sender), replay check, per-node rate limit, then the state change, and
//! an answer signed with the network key.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use resultity_protocol::config::ConfigChain;
use resultity_protocol::crypto::{b64, random_bytes};
use resultity_protocol::envelope;
use resultity_protocol::messages::http::{
    ChallengeRequest, ChallengeResponse, ConfigDigestResponse, DeregisterRequest,
    DeregisterResponse, HeartbeatRequest, HeartbeatResponse, NodeRequest, OpenedRequest,
    PingRequest, PingResponse, RegisterRequest, RegisterResponse, open_node_request, paths,
};
use resultity_protocol::{ErrorCode, Purpose, limits};

use crate::error::ApiError;
use crate::metrics::Channel;
use crate::state::{AppState, read_body};

/// A JSON answer signed with the network key.
fn signed<T: serde::Serialize>(
    state: &AppState,
    purpose: Purpose,
    body: &T,
) -> Result<Response, ApiError> {
    let text = envelope::seal(state.signing_key(), purpose, body)
        .map_err(|e| state.reject_protocol(Channel::Http, &e))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

/// Opens a signed request of a registered node and runs the replay and rate checks. Nothing
/// is changed for a request refused here.
fn open_registered<T: NodeRequest>(
    state: &AppState,
    bytes: &[u8],
) -> Result<OpenedRequest<T>, ApiError> {
    let opened = open_node_request::<T>(bytes, &state.settings.network_id)
        .map_err(|e| state.reject_protocol(Channel::Http, &e))?;
    let now = state.now();
    let mut core = state.core();
    if core.is_revoked(&opened.node_id) {
        drop(core);
        return Err(state.reject(Channel::Http, ErrorCode::Revoked, "node key revoked"));
    }
    if core.node_key(&opened.node_id).is_none() {
        drop(core);
        return Err(state.reject(
            Channel::Http,
            ErrorCode::NotRegistered,
            format!("node {} is not registered", opened.node_id),
        ));
    }
    let hdr = opened.body.hdr();
    if let Err(e) = core.check_nonce(&opened.node_id, hdr.ts_ms, &hdr.nonce, now) {
        drop(core);
        return Err(state.reject_protocol(Channel::Http, &e));
    }
    if let Err((code, msg)) = core.http_admit(&opened.node_id, now) {
        drop(core);
        let err = state.reject(Channel::Http, code, msg);
        return Err(if code == ErrorCode::RateLimited {
            err.with_retry_after(1000)
        } else {
            err
        });
    }
    Ok(opened)
}

/// `POST /v1/node/challenge` (unsigned).
pub async fn challenge(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(crate::listener::PeerAddr(addr)): axum::extract::ConnectInfo<
        crate::listener::PeerAddr,
    >,
    body: Body,
) -> Result<Json<ChallengeResponse>, ApiError> {
    let now = state.now();
    if !state.core().allow_challenge(addr.ip(), now) {
        return Err(state
            .reject(
                Channel::Http,
                ErrorCode::RateLimited,
                format!("too many challenge requests from {}", addr.ip()),
            )
            .with_retry_after(1000));
    }
    let bytes = read_body(&state, body, Channel::Http).await?;
    // The node id is parsed on its own so a weak key is answered `weak_key`, not `malformed`.
    #[derive(serde::Deserialize)]
    struct RawChallengeRequest {
        network_id: resultity_protocol::NetworkId,
        node_id: String,
    }
    let raw: RawChallengeRequest = serde_json::from_slice(&bytes).map_err(|e| {
        state.reject(
            Channel::Http,
            ErrorCode::Malformed,
            format!("challenge request: {e}"),
        )
    })?;
    let node_id = resultity_protocol::NodeId::parse(&raw.node_id)
        .map_err(|e| state.reject_protocol(Channel::Http, &e))?;
    let req = ChallengeRequest {
        network_id: raw.network_id,
        node_id,
    };
    if req.network_id != state.settings.network_id {
        return Err(state.reject(
            Channel::Http,
            ErrorCode::WrongAudience,
            format!(
                "this is network {}, not {}",
                state.settings.network_id, req.network_id
            ),
        ));
    }
    // Weak keys are refused before any state is kept for them.
    if let Err(e) = req.node_id.verifying_key() {
        return Err(state.reject_protocol(Channel::Http, &e));
    }
    let challenge = random_bytes::<32>().map(|b| b64(&b)).map_err(|e| {
        state.reject(
            Channel::Http,
            ErrorCode::Internal,
            format!("no randomness: {e}"),
        )
    })?;
    let now = state.now();
    let issued = {
        let mut core = state.core();
        if core.is_revoked(&req.node_id) {
            Err((ErrorCode::Revoked, "node key revoked".to_owned()))
        } else {
            core.issue_challenge(
                &req.node_id,
                challenge.clone(),
                limits::CHALLENGE_TTL_MS,
                now,
            )
        }
    };
    let expires_at_ms = issued.map_err(|(code, msg)| state.reject(Channel::Http, code, msg))?;
    Ok(Json(ChallengeResponse {
        challenge,
        expires_at_ms,
        server_time_ms: now,
    }))
}

/// `POST /v1/node/register`: the single-use challenge replaces the clock check, so a node
/// with a skewed clock can still register and learn server time.
pub async fn register(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Http).await?;
    let opened = open_node_request::<RegisterRequest>(&bytes, &state.settings.network_id)
        .map_err(|e| state.reject_protocol(Channel::Http, &e))?;
    let now = state.now();
    let version =
        limits::negotiate_version(&opened.body.protocol_versions, limits::PROTOCOL_VERSIONS);
    let outcome = {
        let mut core = state.core();
        if core.is_revoked(&opened.node_id) {
            Err((ErrorCode::Revoked, "node key revoked".to_owned()))
        } else if !core.take_challenge(&opened.body.challenge, &opened.node_id, now) {
            Err((
                ErrorCode::ChallengeInvalid,
                "challenge unknown, expired, used, or issued to another node".to_owned(),
            ))
        } else if let Some(v) = version {
            core.register(&opened.node_id, opened.key, &opened.body, v, now);
            Ok(v)
        } else {
            Err((
                ErrorCode::UnsupportedVersion,
                format!(
                    "no common protocol version: the node offers {}",
                    opened
                        .body
                        .protocol_versions
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
    };
    let protocol_version = outcome.map_err(|(code, msg)| state.reject(Channel::Http, code, msg))?;
    tracing::info!(node = %opened.node_id, "node registered");
    let published = state.published();
    let answer = RegisterResponse {
        network_id: state.settings.network_id.clone(),
        node_id: opened.node_id,
        server_time_ms: now,
        protocol_version,
        timing: published.snapshot.payload.timing.clone(),
        config: Some(published.pointer()),
        session_path: paths::SESSION.to_owned(),
    };
    signed(&state, Purpose::HttpRegisterOk, &answer)
}

/// `POST /v1/node/ping`.
pub async fn ping(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Http).await?;
    let opened = open_registered::<PingRequest>(&state, &bytes)?;
    let answer = PingResponse {
        network_id: state.settings.network_id.clone(),
        node_id: opened.node_id,
        server_time_ms: state.now(),
        nonce: opened.body.hdr.nonce,
    };
    signed(&state, Purpose::HttpPingOk, &answer)
}

/// `POST /v1/node/heartbeat`: stores the report; answers with the config pointer, the
/// node's verdict and the timing it must follow.
pub async fn heartbeat(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Http).await?;
    let opened = open_registered::<HeartbeatRequest>(&state, &bytes)?;
    let now = state.now();
    let verdict = state
        .core()
        .heartbeat(&opened.node_id, opened.body.report, now)
        .map_err(|(code, msg)| state.reject(Channel::Http, code, msg))?;
    let published = state.published();
    let answer = HeartbeatResponse {
        network_id: state.settings.network_id.clone(),
        node_id: opened.node_id,
        server_time_ms: now,
        config: Some(published.pointer()),
        verdict,
        timing: published.snapshot.payload.timing.clone(),
    };
    signed(&state, Purpose::HttpHeartbeatOk, &answer)
}

/// `POST /v1/node/deregister`: the node leaves; its open jobs are reassigned.
pub async fn deregister(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(&state, body, Channel::Http).await?;
    let opened = open_registered::<DeregisterRequest>(&state, &bytes)?;
    let now = state.now();
    state
        .core()
        .deregister(&opened.node_id, now)
        .map_err(|(code, msg)| state.reject(Channel::Http, code, msg))?;
    tracing::info!(node = %opened.node_id, reason = %crate::core::clip(&opened.body.reason), "node deregistered");
    let answer = DeregisterResponse {
        network_id: state.settings.network_id.clone(),
        node_id: opened.node_id,
        server_time_ms: now,
    };
    signed(&state, Purpose::HttpDeregisterOk, &answer)
}

/// `GET /v1/config`: the signed snapshot in force, byte for byte. With `?since=N`: the chain
/// a node at version `N` needs to reach it (spec §8.4) — the kept key rotations after `N`,
/// then the current snapshot.
pub async fn config(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let published = state.published();
    let since = match query.as_deref() {
        None | Some("") => None,
        Some(q) => Some(
            parse_since(q)
                .map_err(|reason| state.reject(Channel::Http, ErrorCode::Malformed, reason))?,
        ),
    };
    let mut resp = match since {
        None => (
            [(header::CONTENT_TYPE, "application/json")],
            published.signed.as_str().to_owned(),
        )
            .into_response(),
        Some(since) => {
            let rotations = state.rotations();
            let links = crate::publish::chain_since(&rotations, &published, since);
            Json(ConfigChain::new(
                state.settings.network_id.clone(),
                &links,
                state.now(),
            ))
            .into_response()
        }
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(published.signed.digest().as_str()) {
        resp.headers_mut().insert("x-resultity-config-digest", v);
    }
    Ok(resp)
}

/// The query of `GET /v1/config`: exactly `since=<version>`.
fn parse_since(query: &str) -> Result<u64, String> {
    let value = query
        .strip_prefix("since=")
        .ok_or_else(|| "the only query parameter of this endpoint is since=<version>".to_owned())?;
    value.parse::<u64>().map_err(|_| {
        format!(
            "since must be a config version (an unsigned integer), not \"{}\"",
            value
                .chars()
                .take(limits::QUOTE_MAX_CHARS)
                .collect::<String>()
        )
    })
}

/// `GET /v1/config/digest`.
pub async fn config_digest(State(state): State<AppState>) -> Json<ConfigDigestResponse> {
    Json(ConfigDigestResponse {
        network_id: state.settings.network_id.clone(),
        config: Some(state.published().pointer()),
        server_time_ms: state.now(),
    })
}
