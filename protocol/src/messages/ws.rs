//! WebSocket messages (spec §7). Every frame is a text frame holding one signed envelope.
//!
//! Handshake: network `hello` (challenge) → node `auth` (signs the challenge) → network
//! `welcome` (session id). After that every message is a [`Sequenced`] body whose `session_id`
//! binds it to this session and whose `seq` is checked by a sliding window per direction.

use serde::{Deserialize, Serialize};

use super::common::*;
use crate::codes::ErrorCode;
use crate::digest::ConfigDigest;
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
    /// The model the job must run on; the result must name the same id and revision.
    pub model: ModelRef,
    /// Config snapshot the job must run under; the result must carry the same digest.
    pub config_digest: ConfigDigest,
    pub kind: JobKind,
    /// The request body for the runtime (OpenAI or KServe v2 JSON).
    #[cfg_attr(test, proptest(strategy = "crate::messages::arb::json_value()"))]
    pub request: serde_json::Value,
    /// Absolute deadline, unix ms (network clock).
    pub deadline_ms: u64,
    /// Largest output the network accepts in the result (for a streamed job: the sum of its
    /// stream events' bytes).
    pub max_output_bytes: u32,
    /// Stream the output: the node sends it as `job.chunk` frames while the runtime produces
    /// it, then a `job.result` whose `stream` binds every chunk. Absent means `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// What a streamed job's result binds about its chunks: how many events, their total bytes,
/// and `stream_digest` over all of them in order (spec §7.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct StreamSummary {
    pub events: u32,
    pub bytes: u64,
    /// `sha256:` + hex of SHA-256 over every event in order, each as
    /// `u32be(len(event)) ‖ event` (see [`StreamDigest`]).
    pub digest: String,
}

/// Running digest over a job's stream events, kept by the node while it sends chunks and by
/// the network while it receives them; equal summaries mean the same events in the same order.
#[derive(Debug, Clone, Default)]
pub struct StreamDigest {
    sha: sha2::Sha256,
    events: u32,
    bytes: u64,
}

impl StreamDigest {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds the next event. The length prefix keeps event boundaries in the digest, so
    /// splitting or merging events changes it.
    pub fn push(&mut self, event: &str) {
        use sha2::Digest;
        let len = u32::try_from(event.len()).unwrap_or(u32::MAX);
        self.sha.update(len.to_be_bytes());
        self.sha.update(event.as_bytes());
        self.events = self.events.saturating_add(1);
        self.bytes = self.bytes.saturating_add(event.len() as u64);
    }
    pub fn events(&self) -> u32 {
        self.events
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn summary(&self) -> StreamSummary {
        use sha2::Digest;
        let d = self.sha.clone().finalize();
        let mut digest = String::with_capacity(71);
        digest.push_str("sha256:");
        for b in d {
            digest.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            digest.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        StreamSummary {
            events: self.events,
            bytes: self.bytes,
            digest,
        }
    }
}

/// A runtime's own refusal of a request (HTTP 4xx with an OpenAI-style error object), carried
/// in `job.fail` so the caller sees the runtime's error type, parameter and code unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RuntimeRefusal {
    /// The runtime's HTTP status (400–499).
    pub status: u16,
    pub message: String,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// OpenAI codes are strings (`context_length_exceeded`); some servers send numbers.
    /// `"code": null` reads as absent, so a node never signs `Some(Null)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::messages::arb::refusal_code())")
    )]
    pub code: Option<serde_json::Value>,
}

/// A signed result, inside `job.result`. Everything that produced the output is bound into the
/// signature, so a late, replayed or wrong-config result is refused on its signature alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct JobResult {
    pub job_id: JobId,
    pub lease_epoch: u64,
    /// Config snapshot the node ran the job under: the assignment's `config_digest`. Optional
    /// on the wire only so results from older outboxes still parse (and are refused with
    /// `result_mismatch` instead of being resent forever).
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
    /// For a streamed job: the summary of every chunk sent for this lease (then `output` is
    /// empty). The network refuses the result unless it equals what it received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamSummary>,
}

impl JobResult {
    /// The digest `output_digest` must hold for `output`.
    pub fn digest_output(output: &str) -> String {
        crate::digest::sha256_text(output.as_bytes())
    }
    /// True when `output_digest` matches `output`.
    pub fn output_digest_matches(&self) -> bool {
        self.output_digest == Self::digest_output(&self.output)
    }

    /// The result-binding rule (spec §7.5): the signed result must name exactly the config
    /// digest and the model (id and revision) its assignment dictated, and its `output_digest`
    /// must be the digest of its `output`. A receiver refuses any mismatch with
    /// `result_mismatch`.
    pub fn check_binding(
        &self,
        config_digest: &ConfigDigest,
        model: &ModelRef,
    ) -> Result<(), ResultMismatch> {
        match &self.config_digest {
            None => {
                return Err(ResultMismatch::NoConfigDigest {
                    expected: config_digest.clone(),
                });
            }
            Some(got) if got != config_digest => {
                return Err(ResultMismatch::ConfigDigest {
                    expected: config_digest.clone(),
                    got: got.clone(),
                });
            }
            Some(_) => {}
        }
        if &self.model != model {
            return Err(ResultMismatch::Model {
                expected: format!("{}@{}", model.id, model.revision),
                got: format!(
                    "{}@{}",
                    crate::limits::clip_text(&self.model.id),
                    crate::limits::clip_text(&self.model.revision)
                ),
            });
        }
        if !self.output_digest_matches() {
            return Err(ResultMismatch::OutputDigest);
        }
        Ok(())
    }

    /// The stream-binding rule (spec §7.5): a streamed job's result must carry the summary of
    /// exactly the chunks the receiver got for this lease, in order; a job that was not
    /// streamed must carry none.
    pub fn check_stream(&self, received: Option<&StreamSummary>) -> Result<(), ResultMismatch> {
        match (received, &self.stream) {
            (None, None) => Ok(()),
            (Some(got), Some(signed)) if got == signed => Ok(()),
            (Some(_), None) => Err(ResultMismatch::NoStreamSummary),
            (None, Some(_)) => Err(ResultMismatch::UnexpectedStream),
            (Some(got), Some(signed)) => Err(ResultMismatch::StreamDigest {
                received: got.events,
                signed: signed.events,
            }),
        }
    }
}

/// How a result disagrees with its assignment (wire code `result_mismatch`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultMismatch {
    #[error("result names no config_digest; the job runs under {expected}")]
    NoConfigDigest { expected: ConfigDigest },
    #[error("result ran under config {got}; the job runs under {expected}")]
    ConfigDigest {
        expected: ConfigDigest,
        got: ConfigDigest,
    },
    #[error("result is for model {got}; the job is for {expected}")]
    Model { expected: String, got: String },
    #[error("output_digest is not the digest of output")]
    OutputDigest,
    #[error("the job was streamed but its result binds no stream summary")]
    NoStreamSummary,
    #[error("the result binds a stream, but the job was not streamed")]
    UnexpectedStream,
    #[error(
        "the signed stream summary ({signed} events) differs from the {received} events received"
    )]
    StreamDigest { received: u32, signed: u32 },
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
        /// With `runtime_rejected`: the runtime's own error, answered to the caller as is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refusal: Option<RuntimeRefusal>,
    },
    /// The next piece of a streamed job's output: `events` are runtime stream events (one
    /// OpenAI SSE `data:` payload each), `index` counts this job's chunks from 0 per lease.
    #[serde(rename = "job.chunk")]
    JobChunk {
        job_id: JobId,
        lease_epoch: u64,
        index: u32,
        events: Vec<String>,
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
            Self::JobChunk { .. } => Purpose::WsJobChunk,
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
