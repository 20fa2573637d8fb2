//! Frames from a newer peer: codes and phases this build does not know are read as `Unknown`
//! instead of refusing the whole (signed, valid) message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use resultity_protocol::envelope;
use resultity_protocol::messages::ws::{NetworkMessage, NodeMessage};
use resultity_protocol::messages::{FailCode, NodePhase};
use resultity_protocol::session::{NetworkKeys, NetworkSession, NodeSession};
use resultity_protocol::status::NodeStatus;
use resultity_protocol::{ErrorCode, NetworkId, NetworkKeypair, NodeKeypair, Purpose, limits};
use serde_json::json;

fn net() -> NetworkId {
    NetworkId::parse("resultity-testnet").unwrap()
}

#[test]
fn an_error_code_from_a_newer_network_is_read_as_unknown() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let network = NetworkKeypair::from_seed(&[2; 32]);
    let mut session = NodeSession::new(
        node.clone(),
        net(),
        "s1".into(),
        NetworkKeys::new(&[network.id().clone()]).unwrap(),
    );
    // Hand-written body: a code this build has never heard of.
    let body = json!({"network_id": "resultity-testnet", "node_id": node.id().as_str(),
        "session_id": "s1", "seq": 1,
        "msg": {"type": "error", "code": "quota_exhausted", "message": "try later", "seq": 7}});
    let frame = envelope::seal(&network, Purpose::WsError, &body).unwrap();
    let opened = session.open(frame.as_bytes()).unwrap();
    match opened.msg {
        NetworkMessage::Error { code, seq, .. } => {
            assert_eq!(code, ErrorCode::Unknown);
            assert_eq!(seq, Some(7));
        }
        other => panic!("expected an error message, got {other:?}"),
    }
}

#[test]
fn a_fail_code_from_a_newer_node_is_read_as_unknown_and_retriable() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let mut session = NetworkSession::new(
        net(),
        node.id().clone(),
        node.verifying_key(),
        "s1".into(),
        limits::MAX_FRAME_BYTES,
    );
    let body = json!({"network_id": "resultity-testnet", "node_id": node.id().as_str(),
        "session_id": "s1", "seq": 1,
        "msg": {"type": "job.fail", "job_id": "j-1", "lease_epoch": 1,
                "code": "gpu_fell_off_the_bus", "reason": "xid 79"}});
    let frame = envelope::seal(&node, Purpose::WsJobFail, &body).unwrap();
    let opened = session.open(frame.as_bytes()).unwrap();
    match opened.msg {
        NodeMessage::JobFail { code, .. } => {
            assert_eq!(code, FailCode::Unknown);
            assert!(code.retriable());
            assert!(!code.node_fault());
        }
        other => panic!("expected job.fail, got {other:?}"),
    }
}

#[test]
fn a_status_document_with_a_newer_phase_still_parses() {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let doc = json!({"format": 1, "node_id": node.id().as_str(), "network_id": "resultity-testnet",
        "phase": "Hibernating", "registered": true,
        "connection": {"state": "Connected", "reconnects": 0},
        "gpu": {"present": false, "reason": "no driver"},
        "runtime": {"kind": "vllm", "ready": true},
        "jobs": {"completed": 0, "failed": 0, "rejected": 0, "handed_back": 0, "in_flight": 0, "outbox": 0},
        "draining": false, "drained": false, "software": {"sidecar_version": "9.0.0"}});
    let status: NodeStatus = serde_json::from_value(doc).unwrap();
    assert_eq!(status.phase, NodePhase::Unknown);
}
