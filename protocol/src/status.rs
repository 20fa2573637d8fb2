//! The node's local `/status` document (spec §11): served by the sidecar, read by the operator
//! to fill `ResultityNode.status`. Defined here so the two cannot drift.

use serde::{Deserialize, Serialize};

use crate::ids::{NetworkId, NodeId};
use crate::messages::common::*;

/// Version of the status document format; bumped on incompatible changes.
pub const STATUS_FORMAT: u32 = 1;

/// State of the node's WebSocket session with the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "PascalCase")]
pub enum ConnectionState {
    #[default]
    Disconnected,
    Connecting,
    Connected,
    Backoff,
}

/// The session with the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConnectionStatus {
    pub state: ConnectionState,
    /// When the state last changed, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    pub reconnects: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Job counters since the sidecar started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct JobCounters {
    pub completed: u64,
    pub failed: u64,
    pub rejected: u64,
    pub handed_back: u64,
    pub in_flight: u32,
    /// Results waiting in the outbox for the network's confirmation.
    pub outbox: u32,
}

/// The sidecar's `/status` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NodeStatus {
    pub format: u32,
    pub node_id: NodeId,
    pub network_id: NetworkId,
    pub phase: NodePhase,
    /// Registration with the network succeeded in this process.
    pub registered: bool,
    pub connection: ConnectionStatus,
    /// Config the node applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_config: Option<ConfigPointer>,
    /// Config the network announced last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<ConfigPointer>,
    /// Why the last offered config was refused, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Runtime image the applied config wants, when it differs from the running one (the
    /// operator rolls the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_runtime_image: Option<String>,
    /// Why the outbox cannot be written (full or read-only disk): the node takes no jobs
    /// until a write succeeds again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_error: Option<String>,
    #[serde(default)]
    pub models: Vec<ModelStatus>,
    pub gpu: GpuReport,
    pub runtime: RuntimeReport,
    pub jobs: JobCounters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
    /// The network's verdict from the last heartbeat answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    pub draining: bool,
    /// Draining finished: nothing in flight, outbox empty, network told.
    pub drained: bool,
    pub software: Software,
}

impl NodeStatus {
    /// Applied config equals the network's latest.
    pub fn config_in_sync(&self) -> bool {
        match (&self.applied_config, &self.network_config) {
            (Some(a), Some(n)) => a.digest == n.digest,
            _ => false,
        }
    }
}
