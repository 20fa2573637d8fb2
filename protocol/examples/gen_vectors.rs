//! Regenerates `protocol/tests/vectors/v1.json`:
//! `cargo run -p resultity-protocol --example gen_vectors > protocol/tests/vectors/v1.json`.
//! Ed25519 signing is deterministic, so the output is identical on every run; the vectors test
//! fails if the implementation ever drifts from the committed file.

use resultity_protocol::config::{
    ConfigDigest, ConfigSnapshot, NetworkConfig, RuntimeImages, SignedConfig,
};
use resultity_protocol::crypto::{self, signature_input};
use resultity_protocol::envelope::{self, EnvelopeSigner};
use resultity_protocol::ids::{JobId, NetworkId};
use resultity_protocol::messages::http::{
    HeartbeatRequest, NodeReport, PingRequest, RequestHeader,
};
use resultity_protocol::messages::ws::{
    JobAssignment, JobResult, NetworkMessage, NodeMessage, Sequenced,
};
use resultity_protocol::messages::*;
use resultity_protocol::{NetworkKeypair, NodeKeypair, Purpose};
use serde_json::{Value, json};

const TS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key_vector(name: &str, seed: [u8; 32], id: &str, public: &[u8]) -> Value {
    json!({"name": name, "seed_b64url": crypto::b64(&seed), "public_key_hex": hex(public), "id": id})
}

fn envelope_vector(
    name: &str,
    signer_name: &str,
    signer: &impl EnvelopeSigner,
    purpose: Purpose,
    body: &str,
) -> Value {
    let input = signature_input(purpose.as_str(), body.as_bytes());
    let sig = signer.sign_bytes(purpose.as_str(), body.as_bytes());
    json!({
        "name": name,
        "signer": signer_name,
        "purpose": purpose.as_str(),
        "body": body,
        "signature_input_hex": hex(&input),
        "signature_b64url": crypto::b64(&sig.to_bytes()),
        "envelope": envelope::seal_bytes(signer, purpose, body),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node_seed = [0x11u8; 32];
    let net_seed = [0x22u8; 32];
    let node = NodeKeypair::from_seed(&node_seed);
    let network = NetworkKeypair::from_seed(&net_seed);
    let network_id = NetworkId::parse("resultity-testnet")?;

    let hdr = RequestHeader {
        network_id: network_id.clone(),
        node_id: node.id().clone(),
        ts_ms: TS,
        nonce: crypto::b64(&[7u8; 16]),
    };
    let ping = serde_json::to_string(&PingRequest { hdr: hdr.clone() })?;
    let heartbeat = serde_json::to_string(&HeartbeatRequest {
        hdr: RequestHeader {
            nonce: crypto::b64(&[8u8; 16]),
            ..hdr.clone()
        },
        report: NodeReport {
            phase: NodePhase::Ready,
            config: None,
            draining: false,
            max_concurrency: 8,
            in_flight: 2,
            credits: 6,
            outbox_len: 0,
            participation: Participation::Testnet,
            subclouds: vec![],
            models: vec![ModelStatus {
                model: ModelRef {
                    id: "qwen2.5-0.5b-instruct".into(),
                    revision: "main".into(),
                },
                state: ModelState::Active,
                reason: None,
            }],
            gpu: GpuReport {
                present: false,
                reason: Some("NVML library not found".into()),
                ..Default::default()
            },
            runtime: RuntimeReport {
                kind: RuntimeKind::Vllm,
                ready: true,
                reason: None,
                running: Some(2),
                waiting: Some(0),
                kv_cache_usage_permille: Some(125),
                generation_tokens_total: Some(4096),
            },
            software: Software {
                sidecar_version: "0.1.0".into(),
                runtime_version: None,
                runtime_image: None,
            },
        },
    })?;
    let snapshot = ConfigSnapshot {
        network_id: network_id.clone(),
        version: 1,
        issued_at_ms: TS,
        expires_at_ms: TS + 30 * 24 * 3_600_000,
        prev_digest: None,
        payload: NetworkConfig {
            environment: Environment::Testnet,
            models: vec![resultity_protocol::config::ApprovedModel {
                model: ModelRef {
                    id: "qwen2.5-0.5b-instruct".into(),
                    revision: "main".into(),
                },
                runtimes: vec![RuntimeKind::Vllm],
                min_gpu_memory_mib: 8192,
                subclouds: vec![],
            }],
            runtime_images: RuntimeImages {
                vllm: Some("vllm/vllm-openai:v0.11.0".into()),
                triton: None,
            },
            sidecar_image: Some("ghcr.io/resultity/sidecar:0.1.0".into()),
            timing: Timing::default(),
            subclouds: vec![],
            network_keys: vec![network.id().clone()],
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        },
    };
    let config = SignedConfig::sign(&network, &snapshot)?;
    let config_body = serde_json::to_string(&snapshot)?;

    // The assignment names the config (the snapshot below) and model the job must run under;
    // the result echoes both and is bound to them by its signature.
    let model = ModelRef {
        id: "qwen2.5-0.5b-instruct".into(),
        revision: "main".into(),
    };
    let assignment = JobAssignment {
        job_id: JobId::parse("j-0001")?,
        lease_epoch: 2,
        model: model.clone(),
        config_digest: config.digest().clone(),
        kind: JobKind::Completion,
        request: json!({"model": "qwen2.5-0.5b-instruct", "prompt": "2+2=", "max_tokens": 1}),
        deadline_ms: TS + 120_000,
        max_output_bytes: 524_288,
    };
    let assign = serde_json::to_string(&Sequenced {
        network_id: network_id.clone(),
        node_id: node.id().clone(),
        session_id: crypto::b64(&[9u8; 16]),
        seq: 4,
        msg: NetworkMessage::JobAssign(assignment.clone()),
    })?;
    let output = r#"{"choices":[{"text":"4"}]}"#.to_string();
    let job_result = JobResult {
        job_id: assignment.job_id.clone(),
        lease_epoch: assignment.lease_epoch,
        config_digest: Some(assignment.config_digest.clone()),
        model: model.clone(),
        output_digest: JobResult::digest_output(&output),
        output,
        usage: Usage {
            prompt_tokens: 5,
            completion_tokens: 1,
        },
        runtime_ms: 12,
        completed_at_ms: TS + 50,
    };
    let result = serde_json::to_string(&Sequenced {
        network_id: network_id.clone(),
        node_id: node.id().clone(),
        session_id: crypto::b64(&[9u8; 16]),
        seq: 3,
        msg: NodeMessage::JobResult(job_result.clone()),
    })?;
    // Results a network must refuse with `result_mismatch` for this assignment.
    let other_digest = ConfigDigest::of_body(b"another snapshot");
    let mismatches = [
        (
            "config_digest absent",
            JobResult {
                config_digest: None,
                ..job_result.clone()
            },
        ),
        (
            "config_digest of another snapshot",
            JobResult {
                config_digest: Some(other_digest),
                ..job_result.clone()
            },
        ),
        (
            "model revision differs",
            JobResult {
                model: ModelRef {
                    revision: "v2".into(),
                    ..model.clone()
                },
                ..job_result.clone()
            },
        ),
        (
            "model id differs",
            JobResult {
                model: ModelRef {
                    id: "llama-3.1-8b".into(),
                    ..model.clone()
                },
                ..job_result.clone()
            },
        ),
        (
            "output_digest not of output",
            JobResult {
                output: r#"{"choices":[{"text":"5"}]}"#.into(),
                ..job_result.clone()
            },
        ),
    ];
    let mut binding = vec![
        json!({"name": "result matches its assignment", "result": serde_json::to_string(&job_result)?, "error": null}),
    ];
    for (name, r) in mismatches {
        binding.push(
            json!({"name": name, "result": serde_json::to_string(&r)?, "error": "result_mismatch"}),
        );
    }

    let flipped_purpose = envelope::seal_bytes(&node, Purpose::HttpPing, &ping).replace(
        "\"purpose\":\"http/ping\"",
        "\"purpose\":\"http/heartbeat\"",
    );

    // The identity point's encoding (y = 1): small order, so weak.
    let mut weak_key = [0u8; 32];
    weak_key[0] = 1;
    let mut typo_id = node.id().as_str().to_owned();
    let flipped = if typo_id.ends_with('a') { "b" } else { "a" };
    typo_id.replace_range(typo_id.len() - 1.., flipped);

    let vectors = json!({
        "description": "Resultity protocol v1 test vectors (docs/protocol.md §12). Keys are derived from the seeds; signatures are deterministic Ed25519 (RFC 8032).",
        "domain_tag": "resultity/v1",
        "keys": [
            key_vector("node", node_seed, node.id().as_str(), node.verifying_key().as_bytes()),
            key_vector("network", net_seed, network.id().as_str(), network.verifying_key().as_bytes()),
        ],
        "envelopes": [
            envelope_vector("http ping", "node", &node, Purpose::HttpPing, &ping),
            envelope_vector("http heartbeat", "node", &node, Purpose::HttpHeartbeat, &heartbeat),
            envelope_vector("ws job.result", "node", &node, Purpose::WsJobResult, &result),
            envelope_vector("ws job.assign", "network", &network, Purpose::WsJobAssign, &assign),
        ],
        "result_binding": {
            "assignment": serde_json::to_string(&assignment)?,
            "results": binding,
        },
        "configs": [{
            "name": "config v1",
            "signer": "network",
            "body": config_body,
            "envelope": config.as_str(),
            "config_digest": config.digest().as_str(),
        }],
        "invalid_ids": [
            {"name": "node id of a small-order point (weak key)", "text": resultity_protocol::ids::node_id_text_unchecked(&weak_key), "error": "weak_key"},
            {"name": "node id with one character changed (checksum)", "text": typo_id, "error": "malformed"},
        ],
        "invalid": [
            {"name": "purpose changed after signing", "envelope": flipped_purpose, "expect_purpose": "http/heartbeat", "signer": "node", "error": "bad_signature"},
            {"name": "ping presented on the heartbeat endpoint", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &ping), "expect_purpose": "http/heartbeat", "signer": "node", "error": "wrong_purpose"},
            {"name": "body whitespace added", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &ping).replace("{\\\"hdr\\\"", "{ \\\"hdr\\\""), "expect_purpose": "http/ping", "signer": "node", "error": "bad_signature"},
        ],
    });
    println!("{}", serde_json::to_string_pretty(&vectors)?);
    Ok(())
}
