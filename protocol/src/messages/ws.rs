//! WebSocket messages (spec §7). Every frame is a text frame holding one signed envelope.
//!
//! Handshake: network `hello` (challenge) → node `auth` (signs the challenge) → network
//! `welcome` (session id). After that every message is a [`Sequenced`] body whose `session_id`
//! binds it to this session and whose `seq` is checked by a sliding window per direction.

use serde::{Deserialize, Serialize};

use super::common::*;
use crate::codes::ErrorCode;
use crate::config::ConfigDigest;
use crate::ids::{JobId, NetworkId, NodeId};
use crate::purpose::Purpose;

/// First frame, network → node, purpose `ws/hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hello {
    pub network_id: NetworkId,
    /// 32 random bytes, base64url, fresh for this connection.
    pub challenge: String,
    pub server_time_ms: u64,
    pub protocol_versions: Vec<u32>,
    pub max_frame_bytes: u32,
    pub ping_interval_ms: u64,
}

/// Node's answer to `hello`, purpose `ws/auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Auth {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    /// The hello's challenge, echoed: the signature binds the node key to this connection.
    pub challenge: String,
    pub protocol_version: u32,
    pub ts_ms: u64,
    pub max_concurrency: u32,
    pub credits: u32,
    pub draining: bool,
    /// Results in the node's outbox, resent right after `welcome`.
    pub outbox_len: u32,
}

/// Network's acceptance of `auth`, purpose `ws/welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Welcome {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    /// Identifies the session in every later message (base64url of 16 random bytes).
    pub session_id: String,
    pub protocol_version: u32,
    pub server_time_ms: u64,
    /// Assignments still open for this node that the network will resend now.
    pub resumed_jobs: u32,
}

/// A job pushed to a node, inside `job.assign`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct JobAssignment {
    pub job_id: JobId,
    /// Incremented each time the job is (re)assigned; results carrying an older epoch are
    /// refused by the network.
    pub lease_epoch: u64,
    pub model: ModelRef,
    pub kind: JobKind,
    /// The request body for the runtime (OpenAI or KServe v2 JSON).
    #[cfg_attr(test, proptest(strategy = "crate::messages::arb::json_value()"))]
    pub request: serde_json::Value,
    /// Absolute deadline, unix ms (network clock).
    pub deadline_ms: u64,
    /// Largest output the network accepts in the result.
    pub max_output_bytes: u32,
}

/// A signed result, inside `job.result`. Everything that produced the output is bound into the
/// signature, so a late, replayed or wrong-config result is refused on its signature alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct JobResult {
    pub job_id: JobId,
    pub lease_epoch: u64,
    /// Config snapshot the node ran the job under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<ConfigDigest>,
    pub model: ModelRef,
    /// `sha256:` + hex of the exact `output` bytes.
    pub output_digest: String,
    /// The runtime's response body, verbatim.
    pub output: String,
    pub usage: Usage,
    pub runtime_ms: u64,
    pub completed_at_ms: u64,
}

impl JobResult {
    /// The digest `output_digest` must hold for `output`.
    pub fn digest_output(output: &str) -> String {
        crate::config::sha256_text(output.as_bytes())
    }
    /// True when `output_digest` matches `output`.
    pub fn output_digest_matches(&self) -> bool {
        self.output_digest == Self::digest_output(&self.output)
    }
}

/// Node → network messages after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(tag = "type")]
pub enum NodeMessage {
    /// The node took the job (counts against its credits until result or fail).
    #[serde(rename = "job.ack")]
    JobAck { job_id: JobId, lease_epoch: u64 },
    #[serde(rename = "job.result")]
    JobResult(JobResult),
    /// The node cannot complete the job; `code.retriable()` says whether to reassign.
    #[serde(rename = "job.fail")]
    JobFail {
        job_id: JobId,
        lease_epoch: u64,
        code: FailCode,
        reason: String,
    },
    /// Free slots now; the network never has more unacked jobs on the node than this.
    #[serde(rename = "credits")]
    Credits { credits: u32, in_flight: u32 },
    /// The node stops taking jobs (operator drain, SIGTERM, config change).
    #[serde(rename = "draining")]
    Draining {
        reason: String,
        in_flight: u32,
        expected_ms: u64,
    },
    /// Nothing in flight and the outbox is empty; the pod may be deleted.
    #[serde(rename = "drained")]
    Drained {},
}

impl NodeMessage {
    pub fn purpose(&self) -> Purpose {
        match self {
            Self::JobAck { .. } => Purpose::WsJobAck,
            Self::JobResult(_) => Purpose::WsJobResult,
            Self::JobFail { .. } => Purpose::WsJobFail,
            Self::Credits { .. } => Purpose::WsCredits,
            Self::Draining { .. } => Purpose::WsDraining,
            Self::Drained {} => Purpose::WsDrained,
        }
    }
}

/// Network → node messages after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(tag = "type")]
pub enum NetworkMessage {
    #[serde(rename = "job.assign")]
    JobAssign(JobAssignment),
    /// The network stopped wanting the job (reassigned, caller gone); drop it.
    #[serde(rename = "job.cancel")]
    JobCancel {
        job_id: JobId,
        lease_epoch: u64,
        reason: String,
    },
    /// The network durably has the result; the node deletes it from its outbox.
    #[serde(rename = "result.confirm")]
    ResultConfirm { job_id: JobId, lease_epoch: u64 },
    /// The network has stopped dispatching to the draining node.
    #[serde(rename = "drain.ack")]
    DrainAck {},
    /// A new config snapshot is published; fetch it without waiting for the next heartbeat.
    #[serde(rename = "config.available")]
    ConfigAvailable(ConfigPointer),
    /// A message was refused; the session continues unless a close follows.
    #[serde(rename = "error")]
    Error {
        code: ErrorCode,
        message: String,
        /// `seq` of the refused message, when it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

impl NetworkMessage {
    pub fn purpose(&self) -> Purpose {
        match self {
            Self::JobAssign(_) => Purpose::WsJobAssign,
            Self::JobCancel { .. } => Purpose::WsJobCancel,
            Self::ResultConfirm { .. } => Purpose::WsResultConfirm,
            Self::DrainAck {} => Purpose::WsDrainAck,
            Self::ConfigAvailable(_) => Purpose::WsConfigAvailable,
            Self::Error { .. } => Purpose::WsError,
        }
    }
}

/// A post-handshake body: addressing, session binding and sequence number around a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Sequenced<M> {
    pub network_id: NetworkId,
    pub node_id: NodeId,
    pub session_id: String,
    /// Per direction, starting at 1, incremented by one per message.
    pub seq: u64,
    pub msg: M,
}
