//! HTTP bodies (spec §6). Requests from nodes are signed envelopes; answers from the network are
//! signed envelopes too, except the challenge, the config pointer and errors, which carry
//! nothing a node acts on without further verification.

use serde::{Deserialize, Serialize};

use super::common::*;
use crate::codes::ErrorCode;
use crate::ids::{NetworkId, NodeId};

/// Path of each HTTP endpoint, relative to the network's base URL.
pub mod paths {
    pub const CHALLENGE: &str = "/v1/node/challenge";
    pub const REGISTER: &str = "/v1/node/register";
    pub const PING: &str = "/v1/node/ping";
    pub const HEARTBEAT: &str = "/v1/node/heartbeat";
    pub const DEREGISTER: &str = "/v1/node/deregister";
    pub const SESSION: &str = "/v1/node/session";
    pub const CONFIG: &str = "/v1/config";
    pub const CONFIG_DIGEST: &str = "/v1/config/digest";
}

/// Replay-protection header of every signed node request: audience, sender, clock and nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RequestHeader {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    /// Node's clock, unix milliseconds; must be within the skew window of server time.
    pub ts_ms: u64,
    /// 16 random bytes, base64url; unique per node within the skew window.
    pub nonce: String,
}

/// `POST /v1/node/challenge` (unsigned): asks for a registration challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ChallengeRequest {
    pub network_id: NetworkId,
    pub node_id: NodeId,
}

/// Answer to [`ChallengeRequest`] (unsigned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ChallengeResponse {
    /// 32 random bytes, base64url; single use, bound to the node id that asked.
    pub challenge: String,
    pub expires_at_ms: u64,
    pub server_time_ms: u64,
}

/// What a node offers the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Capabilities {
    pub runtime: RuntimeKind,
    pub max_concurrency: u32,
    #[serde(default)]
    pub participation: Participation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subclouds: Vec<String>,
    pub gpu: GpuReport,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_installed: Vec<ModelRef>,
}

/// `POST /v1/node/register`, purpose `http/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RegisterRequest {
    pub hdr: RequestHeader,
    /// The challenge from `/v1/node/challenge`: registration freshness does not rely on clocks.
    pub challenge: String,
    /// Protocol versions the node speaks; the network picks the highest common one.
    pub protocol_versions: Vec<u32>,
    pub software: Software,
    pub capabilities: Capabilities,
}

/// Answer to registration, purpose `http/register.ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RegisterResponse {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub server_time_ms: u64,
    pub protocol_version: u32,
    pub timing: Timing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigPointer>,
    /// Path of the WebSocket session endpoint.
    pub session_path: String,
}

/// `POST /v1/node/ping`, purpose `http/ping`: cheap liveness and clock check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PingRequest {
    pub hdr: RequestHeader,
}

/// Answer to ping, purpose `http/ping.ok`; echoes the nonce so the answer is bound to the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PingResponse {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub server_time_ms: u64,
    pub nonce: String,
}

/// Everything a node reports about itself in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NodeReport {
    pub phase: NodePhase,
    /// Config snapshot the node runs under; `None` before the first one is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigPointer>,
    pub draining: bool,
    pub max_concurrency: u32,
    pub in_flight: u32,
    /// Free slots (max_concurrency − in_flight, or 0 while draining or not ready).
    pub credits: u32,
    /// Results written but not yet confirmed by the network.
    pub outbox_len: u32,
    #[serde(default)]
    pub participation: Participation,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subclouds: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelStatus>,
    pub gpu: GpuReport,
    pub runtime: RuntimeReport,
    pub software: Software,
    /// Why the node cannot serve jobs now (what its `/readyz` says: runtime down, GPU missing
    /// or faulty, no model servable, results cannot be stored), one reason per entry; empty
    /// when it can. Absent from nodes that predate the field, which the network then judges
    /// by `runtime` and `gpu` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ready: Vec<String>,
}

/// `POST /v1/node/heartbeat`, purpose `http/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HeartbeatRequest {
    pub hdr: RequestHeader,
    pub report: NodeReport,
}

/// Answer to a heartbeat, purpose `http/heartbeat.ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HeartbeatResponse {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub server_time_ms: u64,
    /// The network's current config; a node whose digest differs fetches `/v1/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigPointer>,
    pub verdict: Verdict,
    pub timing: Timing,
}

/// `POST /v1/node/deregister`, purpose `http/deregister`: the node leaves the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeregisterRequest {
    pub hdr: RequestHeader,
    pub reason: String,
}

/// Answer to deregistration, purpose `http/deregister.ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeregisterResponse {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub server_time_ms: u64,
}

/// `GET /v1/config/digest` (unsigned): where the network's config stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConfigDigestResponse {
    pub network_id: NetworkId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigPointer>,
    pub server_time_ms: u64,
}

/// The error object of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Every non-2xx answer: `{"error":{...},"server_time_ms":...}` (unsigned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ErrorResponse {
    pub error: ErrorBody,
    pub server_time_ms: u64,
}

/// A signed node → network HTTP request body.
pub trait NodeRequest: serde::de::DeserializeOwned + Serialize {
    const PURPOSE: crate::purpose::Purpose;
    fn hdr(&self) -> &RequestHeader;
}

/// A signed network → node HTTP answer body.
pub trait NetworkAnswer: serde::de::DeserializeOwned + Serialize {
    const PURPOSE: crate::purpose::Purpose;
    fn network_id(&self) -> &NetworkId;
    fn node_id(&self) -> &NodeId;
}

macro_rules! node_request {
    ($t:ty, $p:ident) => {
        impl NodeRequest for $t {
            const PURPOSE: crate::purpose::Purpose = crate::purpose::Purpose::$p;
            fn hdr(&self) -> &RequestHeader {
                &self.hdr
            }
        }
    };
}
node_request!(RegisterRequest, HttpRegister);
node_request!(PingRequest, HttpPing);
node_request!(HeartbeatRequest, HttpHeartbeat);
node_request!(DeregisterRequest, HttpDeregister);

macro_rules! network_answer {
    ($t:ty, $p:ident) => {
        impl NetworkAnswer for $t {
            const PURPOSE: crate::purpose::Purpose = crate::purpose::Purpose::$p;
            fn network_id(&self) -> &NetworkId {
                &self.network_id
            }
            fn node_id(&self) -> &NodeId {
                &self.node_id
            }
        }
    };
}
network_answer!(RegisterResponse, HttpRegisterOk);
network_answer!(PingResponse, HttpPingOk);
network_answer!(HeartbeatResponse, HttpHeartbeatOk);
network_answer!(DeregisterResponse, HttpDeregisterOk);

/// A node request that passed envelope, purpose, signature and addressing checks (not yet the
/// replay check, which needs the caller's [`NonceStore`](crate::replay::NonceStore)).
#[derive(Debug, Clone)]
pub struct OpenedRequest<T> {
    pub body: T,
    pub node_id: NodeId,
    pub key: ed25519_dalek::VerifyingKey,
}

/// Opens a node's HTTP request: bounded decode, purpose, signer key (weak keys refused),
/// strict signature, then body parse and audience/sender checks.
pub fn open_node_request<T: NodeRequest>(
    bytes: &[u8],
    network_id: &NetworkId,
) -> crate::error::Result<OpenedRequest<T>> {
    use crate::error::ProtocolError;
    let raw = crate::envelope::RawEnvelope::decode(bytes, crate::limits::MAX_ENVELOPE_BYTES)?;
    raw.expect_purpose(T::PURPOSE)?;
    let node_id = NodeId::parse(raw.signer())?;
    let key = node_id.verifying_key()?;
    raw.verify(&key)?;
    let body: T = raw.parse_body()?;
    let hdr = body.hdr();
    if &hdr.network_id != network_id {
        return Err(ProtocolError::WrongAudience {
            expected: network_id.to_string(),
            found: hdr.network_id.to_string(),
        });
    }
    if hdr.node_id != node_id {
        return Err(ProtocolError::WrongNode {
            expected: node_id.to_string(),
            found: hdr.node_id.to_string(),
        });
    }
    Ok(OpenedRequest { body, node_id, key })
}

/// Opens the network's signed answer on the node: signer must be a trusted network key, and the
/// body must name this network and this node.
pub fn open_network_answer<T: NetworkAnswer>(
    bytes: &[u8],
    keys: &crate::session::NetworkKeys,
    network_id: &NetworkId,
    node_id: &NodeId,
) -> crate::error::Result<T> {
    let body: T = keys.open(bytes, T::PURPOSE)?;
    crate::session::check_addressing(body.network_id(), body.node_id(), network_id, node_id)?;
    Ok(body)
}
