//! Regenerates `protocol/tests/vectors/v1.json`:
//! `cargo run -p resultity-protocol --example gen_vectors > protocol/tests/vectors/v1.json`.
//! Ed25519 signing is deterministic, so the output is identical on every run; the vectors test
//! fails if the implementation ever drifts from the committed file.

use resultity_protocol::config::{
    ConfigDigest, ConfigSnapshot, ConfigTrust, NetworkConfig, RetiringKey, RuntimeImages,
    SignedConfig,
};
use resultity_protocol::crypto::{self, signature_input};
use resultity_protocol::envelope::{self, EnvelopeSigner};
use resultity_protocol::ids::{JobId, NetworkId};
use resultity_protocol::messages::http::{
    HeartbeatRequest, NodeReport, PingRequest, RequestHeader,
};
use resultity_protocol::messages::ws::{
    JobAssignment, JobResult, NetworkMessage, NodeMessage, Sequenced, StreamDigest,
};
use resultity_protocol::messages::*;
use resultity_protocol::{NetworkKeypair, NodeKeypair, Purpose};
use serde_json::{Value, json};

const TS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const HOUR: u64 = 3_600_000;
/// Ed25519's group order L, little-endian.
const L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// `S + L` for the scalar half of a signature: the same point equation holds, but the scalar
/// is not reduced, so strict verification must refuse it.
fn non_canonical(sig: &[u8; 64]) -> [u8; 64] {
    let mut out = *sig;
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(sig[32 + i]) + u16::from(L[i]) + carry;
        out[32 + i] = (v & 0xff) as u8;
        carry = v >> 8;
    }
    out
}

#[path = "../src/config/rotation_fixture.rs"]
mod rotation_fixture;
use rotation_fixture::{retiring_keys, rotation_snapshot};

fn trust_after(
    network_id: &NetworkId,
    keys: &[&NetworkKeypair],
    retiring: &[(&NetworkKeypair, u64)],
    current: Option<&SignedConfig>,
) -> Result<Value, Box<dyn std::error::Error>> {
    let current = match current {
        Some(c) => Some(ConfigPointer {
            version: c.parse_unverified()?.version,
            digest: c.digest().clone(),
        }),
        None => None,
    };
    let trust = ConfigTrust {
        network_id: network_id.clone(),
        keys: keys.iter().map(|k| k.id().clone()).collect(),
        retiring: retiring_keys(retiring),
        current,
    };
    Ok(serde_json::to_value(trust)?)
}

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
    let heartbeat_request = HeartbeatRequest {
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
                self_test: None,
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
            not_ready: vec![],
        },
    };
    let heartbeat = serde_json::to_string(&heartbeat_request)?;
    // The same node with its outbox unwritable: it says why, and advertises no slot.
    let mut not_ready = heartbeat_request.clone();
    not_ready.hdr.nonce = crypto::b64(&[9u8; 16]);
    not_ready.report.phase = NodePhase::Degraded;
    not_ready.report.credits = 0;
    not_ready.report.not_ready =
        vec!["results cannot be stored: No space left on device (os error 28)".into()];
    let heartbeat_not_ready = serde_json::to_string(&not_ready)?;
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
                known_answer: None,
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
        stream: false,
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
        stream: None,
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

    // A streamed job: two chunks of OpenAI chunk events, then a result binding them.
    let stream_assignment = JobAssignment {
        job_id: JobId::parse("j-0002")?,
        lease_epoch: 1,
        kind: JobKind::ChatCompletion,
        request: json!({"model": "qwen2.5-0.5b-instruct", "messages": [{"role": "user", "content": "2+2="}], "stream": true}),
        stream: true,
        ..assignment.clone()
    };
    let events = [
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,"model":"qwen2.5-0.5b-instruct","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,"model":"qwen2.5-0.5b-instruct","choices":[{"index":0,"delta":{"content":"4"},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1767225600,"model":"qwen2.5-0.5b-instruct","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
    ];
    let chunks: [Vec<String>; 2] = [
        vec![events[0].to_owned()],
        vec![events[1].to_owned(), events[2].to_owned()],
    ];
    let mut chunk_vectors = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let body = serde_json::to_string(&Sequenced {
            network_id: network_id.clone(),
            node_id: node.id().clone(),
            session_id: crypto::b64(&[9u8; 16]),
            seq: 5 + i as u64,
            msg: NodeMessage::JobChunk {
                job_id: stream_assignment.job_id.clone(),
                lease_epoch: stream_assignment.lease_epoch,
                index: u32::try_from(i)?,
                events: c.clone(),
            },
        })?;
        chunk_vectors.push(envelope_vector(
            &format!("ws job.chunk {i}"),
            "node",
            &node,
            Purpose::WsJobChunk,
            &body,
        ));
    }
    let digest_of = |evs: &[&str]| {
        let mut d = StreamDigest::new();
        for e in evs {
            d.push(e);
        }
        d.summary()
    };
    let summary = digest_of(&events);
    let stream_result = JobResult {
        job_id: stream_assignment.job_id.clone(),
        lease_epoch: stream_assignment.lease_epoch,
        output: String::new(),
        output_digest: JobResult::digest_output(""),
        stream: Some(summary.clone()),
        ..job_result.clone()
    };
    let tampered = events[1].replace("\"4\"", "\"5\"");
    let stream_cases = [
        ("every chunk received in order", events.to_vec(), None),
        (
            "two events reordered",
            vec![events[0], events[2], events[1]],
            Some("result_mismatch"),
        ),
        (
            "last event missing",
            events[..2].to_vec(),
            Some("result_mismatch"),
        ),
        (
            "an event tampered",
            vec![events[0], &tampered, events[2]],
            Some("result_mismatch"),
        ),
    ];
    let stream_cases: Vec<Value> = stream_cases
        .iter()
        .map(|(name, evs, err)| json!({"name": name, "received_events": evs, "error": err}))
        .collect();

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

    // Envelopes a network must refuse when opening a node request (`http/ping` here).
    let ping_env = envelope::seal_bytes(&node, Purpose::HttpPing, &ping);
    let ping_raw = envelope::RawEnvelope::decode(ping_env.as_bytes(), usize::MAX)?;
    let good_sig = crypto::b64(&ping_raw.signature().to_bytes());
    let big_s = crypto::b64(&non_canonical(&ping_raw.signature().to_bytes()));
    let other_node = NodeKeypair::from_seed(&[0x33u8; 32]);
    let wrong_net = serde_json::to_string(&PingRequest {
        hdr: RequestHeader {
            network_id: NetworkId::parse("resultity-mainnet")?,
            ..hdr.clone()
        },
    })?;
    let wrong_node = serde_json::to_string(&PingRequest {
        hdr: RequestHeader {
            node_id: other_node.id().clone(),
            ..hdr.clone()
        },
    })?;
    let body_json = serde_json::to_string(&ping)?;
    let with_member = |extra: &str| {
        format!(
            "{{\"v\":1,\"purpose\":\"http/ping\",\"signer\":\"{}\",\"sig\":\"{good_sig}\",\"body\":{body_json}{extra}}}",
            node.id()
        )
    };
    let invalid_requests = json!([
        {"name": "signer is a small-order point (weak key)", "envelope": ping_env.replace(node.id().as_str(), &resultity_protocol::ids::node_id_text_unchecked(&weak_key)), "error": "weak_key"},
        {"name": "signature scalar S >= L (non-canonical)", "envelope": ping_env.replace(&good_sig, &big_s), "error": "bad_signature"},
        {"name": "addressed to another network", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &wrong_net), "error": "wrong_audience"},
        {"name": "hdr names another node than the signer", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &wrong_node), "error": "wrong_node"},
        {"name": "signer is a network key id", "envelope": ping_env.replace(node.id().as_str(), network.id().as_str()), "error": "malformed"},
        {"name": "envelope version 2", "envelope": ping_env.replace("{\"v\":1,", "{\"v\":2,"), "error": "unsupported_version"},
        {"name": "envelope version as a string", "envelope": ping_env.replace("{\"v\":1,", "{\"v\":\"1\","), "error": "malformed"},
        {"name": "unknown envelope member", "envelope": with_member(",\"extra\":1"), "error": "malformed"},
        {"name": "envelope member twice", "envelope": with_member(",\"purpose\":\"http/ping\""), "error": "malformed"},
        {"name": "sig of 63 bytes", "envelope": ping_env.replace(&good_sig, &good_sig[..84]), "error": "malformed"},
        {"name": "sig with base64 padding", "envelope": ping_env.replace(&good_sig, &format!("{good_sig}==")), "error": "malformed"},
        {"name": "body is an object, not a string", "envelope": ping_env.replace(&body_json, &ping), "error": "malformed"},
        {"name": "truncated JSON", "envelope": &ping_env[..ping_env.len() - 1], "error": "malformed"},
    ]);

    // Replay: the HTTP nonce store (default bounds) and the WebSocket sequence window, each a
    // sequence of checks in order.
    let nonce = |b: u8| crypto::b64(&[b; 16]);
    let http_replay = json!([
        {"name": "fresh", "ts_ms": TS, "nonce": nonce(1), "now_ms": TS, "error": null},
        {"name": "same nonce again", "ts_ms": TS, "nonce": nonce(1), "now_ms": TS + 1_000, "error": "replayed"},
        {"name": "another nonce", "ts_ms": TS + 1, "nonce": nonce(2), "now_ms": TS + 1_000, "error": null},
        {"name": "30 001 ms old", "ts_ms": TS - 30_001, "nonce": nonce(3), "now_ms": TS, "error": "stale_timestamp"},
        {"name": "30 001 ms ahead", "ts_ms": TS + 30_001, "nonce": nonce(4), "now_ms": TS, "error": "stale_timestamp"},
        {"name": "exactly 30 000 ms old", "ts_ms": TS - 30_000, "nonce": nonce(5), "now_ms": TS, "error": null},
    ]);
    let ws_replay = json!([
        {"seq": 1, "error": null},
        {"seq": 1, "error": "replayed"},
        {"seq": 3, "error": null},
        {"seq": 2, "error": null},
        {"seq": 2, "error": "replayed"},
        {"seq": 70, "error": null},
        {"seq": 6, "error": "replayed"},
        {"seq": 7, "error": null},
        {"seq": 0, "error": "malformed"},
    ]);

    // Key rotation (k1 -> k2 -> k3) and config refusals: each case is a trust state, a chain
    // of snapshots offered (one snapshot, or a catch-up chain) and a fixed `now_ms`.
    let k1 = &network;
    let k2 = NetworkKeypair::from_seed(&[0x44u8; 32]);
    let k3 = NetworkKeypair::from_seed(&[0x55u8; 32]);
    let r = |v, prev, at, keys: &[&NetworkKeypair], ret: &[(&NetworkKeypair, u64)]| {
        rotation_snapshot(&network_id, v, prev, at, keys, ret)
    };
    let v1 = SignedConfig::sign(k1, &r(1, None, TS, &[k1], &[]))?;
    let v2 = SignedConfig::sign(k1, &r(2, Some(&v1), TS, &[&k2], &[(k1, TS + HOUR)]))?;
    let v3 = SignedConfig::sign(&k2, &r(3, Some(&v2), TS + HOUR, &[&k2], &[]))?;
    let v4 = SignedConfig::sign(
        &k2,
        &r(4, Some(&v3), TS + 2 * HOUR, &[&k3], &[(&k2, TS + 3 * HOUR)]),
    )?;
    let v5 = SignedConfig::sign(&k3, &r(5, Some(&v4), TS + 3 * HOUR, &[&k3], &[]))?;
    let v3_by_retiring = SignedConfig::sign(
        k1,
        &r(3, Some(&v2), TS + HOUR / 2, &[&k2], &[(k1, TS + HOUR)]),
    )?;
    let mut other = r(2, Some(&v1), TS, &[&k2], &[(k1, TS + HOUR)]);
    other.payload.sidecar_image = Some("ghcr.io/resultity/sidecar:0.1.1".into());
    let v2_other = SignedConfig::sign(k1, &other)?;
    let v2_unchained = SignedConfig::sign(k1, &r(2, None, TS, &[&k2], &[(k1, TS + HOUR)]))?;
    // The rotation rules (§8.4), from v2 (k2 active, k1 retiring until TS + HOUR).
    let mid = TS + HOUR / 2;
    let v3_extend = SignedConfig::sign(k1, &r(3, Some(&v2), mid, &[&k2], &[(k1, TS + 25 * HOUR)]))?;
    let v4_reactivate = SignedConfig::sign(k1, &r(4, Some(&v3_extend), mid, &[k1], &[]))?;
    let v3_reactivate = SignedConfig::sign(k1, &r(3, Some(&v2), mid, &[k1], &[]))?;
    let v3_retiring_rotates =
        SignedConfig::sign(k1, &r(3, Some(&v2), mid, &[&k3], &[(k1, TS + HOUR)]))?;
    let v3_active_extends =
        SignedConfig::sign(&k2, &r(3, Some(&v2), mid, &[&k2], &[(k1, TS + 25 * HOUR)]))?;
    let v3_untrusted_retiring = SignedConfig::sign(
        &k2,
        &r(
            3,
            Some(&v2),
            mid,
            &[&k2],
            &[(k1, TS + HOUR), (&k3, TS + HOUR)],
        ),
    )?;
    let v3_shorten = SignedConfig::sign(k1, &r(3, Some(&v2), mid, &[&k2], &[(k1, mid + 1)]))?;
    let v3_drop = SignedConfig::sign(&k2, &r(3, Some(&v2), mid, &[&k2], &[]))?;
    let v3_active_reactivates = SignedConfig::sign(&k2, &r(3, Some(&v2), mid, &[k1, &k2], &[]))?;
    let v3_ended_entry =
        SignedConfig::sign(&k2, &r(3, Some(&v2), TS + HOUR, &[&k2], &[(k1, TS + HOUR)]))?;
    // Active sets compare as sets: a retiring key may reorder the set, not shrink it.
    let v2_two = SignedConfig::sign(k1, &r(2, Some(&v1), TS, &[&k2, &k3], &[(k1, TS + HOUR)]))?;
    let v3_reordered = SignedConfig::sign(
        k1,
        &r(3, Some(&v2_two), mid, &[&k3, &k2], &[(k1, TS + HOUR)]),
    )?;
    let v3_shrunk = SignedConfig::sign(k1, &r(3, Some(&v2_two), mid, &[&k2], &[(k1, TS + HOUR)]))?;
    let v2_emergency = SignedConfig::sign(k1, &r(2, Some(&v1), TS, &[&k2], &[]))?;
    let v3_after_emergency =
        SignedConfig::sign(k1, &r(3, Some(&v2_emergency), TS + 1, &[k1], &[]))?;
    let snapshots = [
        ("v1", &v1),
        ("v2", &v2),
        ("v3", &v3),
        ("v4", &v4),
        ("v5", &v5),
        ("v3 signed by the retiring key", &v3_by_retiring),
        ("v2 other content", &v2_other),
        ("v2 without prev_digest", &v2_unchained),
        (
            "v3 by the retiring key extending its own window",
            &v3_extend,
        ),
        (
            "v4 by the retiring key re-activating itself after the extension",
            &v4_reactivate,
        ),
        (
            "v3 by the retiring key re-activating itself",
            &v3_reactivate,
        ),
        (
            "v3 by the retiring key rotating to k3",
            &v3_retiring_rotates,
        ),
        (
            "v3 by the active key extending the retiring window",
            &v3_active_extends,
        ),
        (
            "v3 listing an untrusted key as retiring",
            &v3_untrusted_retiring,
        ),
        ("v3 by the retiring key shortening its window", &v3_shorten),
        ("v3 by the active key dropping the retiring key", &v3_drop),
        (
            "v3 by the active key re-activating the retiring key",
            &v3_active_reactivates,
        ),
        (
            "v3 listing a retiring entry that has ended",
            &v3_ended_entry,
        ),
        ("v2 rotating to k2 and k3", &v2_two),
        (
            "v3 by the retiring key, active set reordered",
            &v3_reordered,
        ),
        (
            "v3 by the retiring key, dropping k3 from the active set",
            &v3_shrunk,
        ),
        ("v2 emergency rotation dropping k1", &v2_emergency),
        ("v3 by k1 after the emergency rotation", &v3_after_emergency),
    ];
    let at_v1 = trust_after(&network_id, &[k1], &[], Some(&v1))?;
    let at_v2 = trust_after(&network_id, &[&k2], &[(k1, TS + HOUR)], Some(&v2))?;
    let at_v4 = trust_after(&network_id, &[&k3], &[(&k2, TS + 3 * HOUR)], Some(&v4))?;
    let pinned_k3 = trust_after(&network_id, &[&k3], &[], None)?;
    let at_v2_two = trust_after(&network_id, &[&k2, &k3], &[(k1, TS + HOUR)], Some(&v2_two))?;
    let case = |name: &str,
                trust: &Value,
                chain: &[&str],
                now: u64,
                error: Option<&str>,
                version: Option<u64>| {
        json!({"name": name, "trust": trust, "chain": chain, "now_ms": now, "error": error, "applied_version": version})
    };
    let config_cases = json!([
        case(
            "rotation signed by the old key, node at v1",
            &at_v1,
            &["v2"],
            TS + 1,
            None,
            Some(2)
        ),
        case(
            "retiring key within its window",
            &at_v2,
            &["v3 signed by the retiring key"],
            TS + HOUR / 2,
            None,
            Some(3)
        ),
        case(
            "retiring key after its window",
            &at_v2,
            &["v3 signed by the retiring key"],
            TS + HOUR,
            Some("unknown_signer"),
            None
        ),
        case(
            "new key during the overlap",
            &at_v2,
            &["v3"],
            TS + HOUR - 1,
            None,
            Some(3)
        ),
        case(
            "current snapshot alone after two missed rotations",
            &at_v1,
            &["v5"],
            TS + 26 * HOUR,
            Some("unknown_signer"),
            None
        ),
        case(
            "catch-up chain after two missed rotations (expired steps)",
            &at_v1,
            &["v2", "v4", "v5"],
            TS + 26 * HOUR,
            None,
            Some(5)
        ),
        case(
            "catch-up chain, node pinned with the newest key",
            &pinned_k3,
            &["v2", "v4", "v5"],
            TS + 26 * HOUR,
            None,
            Some(5)
        ),
        case(
            "rollback to an older version",
            &at_v4,
            &["v3"],
            TS + 2 * HOUR + 1,
            Some("config_rollback"),
            None
        ),
        case(
            "same version, other content (equivocation)",
            &at_v2,
            &["v2 other content"],
            TS + 1,
            Some("config_equivocation"),
            None
        ),
        case(
            "next version not chained to the current one",
            &at_v1,
            &["v2 without prev_digest"],
            TS + 1,
            Some("config_equivocation"),
            None
        ),
        case(
            "expired snapshot",
            &at_v1,
            &["v2"],
            TS + 24 * HOUR,
            Some("config_expired"),
            None
        ),
        case(
            "equivocation inside a catch-up chain",
            &at_v2,
            &["v2 other content", "v3"],
            TS + HOUR - 1,
            Some("config_equivocation"),
            None
        ),
        case("same snapshot again", &at_v2, &["v2"], TS + 1, None, None),
        case(
            "retiring key extends its own window",
            &at_v2,
            &["v3 by the retiring key extending its own window"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "extend then re-activate, within the original window (catch-up chain)",
            &at_v2,
            &[
                "v3 by the retiring key extending its own window",
                "v4 by the retiring key re-activating itself after the extension"
            ],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "extend then re-activate, after the original window",
            &at_v2,
            &[
                "v3 by the retiring key extending its own window",
                "v4 by the retiring key re-activating itself after the extension"
            ],
            TS + HOUR + 1,
            Some("unknown_signer"),
            None
        ),
        case(
            "re-activation signed only by the retiring key",
            &at_v2,
            &["v3 by the retiring key re-activating itself"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "retiring key rotates to a key of its choosing",
            &at_v2,
            &["v3 by the retiring key rotating to k3"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "active key extends a retiring window",
            &at_v2,
            &["v3 by the active key extending the retiring window"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "retiring entry for a key not trusted now",
            &at_v2,
            &["v3 listing an untrusted key as retiring"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "retiring key shortens its own window",
            &at_v2,
            &["v3 by the retiring key shortening its window"],
            mid,
            None,
            Some(3)
        ),
        case(
            "active key drops the retiring key",
            &at_v2,
            &["v3 by the active key dropping the retiring key"],
            mid,
            None,
            Some(3)
        ),
        case(
            "active key re-activates the retiring key",
            &at_v2,
            &["v3 by the active key re-activating the retiring key"],
            mid,
            None,
            Some(3)
        ),
        case(
            "a retiring entry that has ended grants nothing and is allowed",
            &at_v2,
            &["v3 listing a retiring entry that has ended"],
            TS + HOUR + 1,
            None,
            Some(3)
        ),
        case(
            "retiring key names the active set in another order (compared as a set)",
            &at_v2_two,
            &["v3 by the retiring key, active set reordered"],
            mid,
            None,
            Some(3)
        ),
        case(
            "retiring key drops a key from the active set",
            &at_v2_two,
            &["v3 by the retiring key, dropping k3 from the active set"],
            mid,
            Some("config_equivocation"),
            None
        ),
        case(
            "emergency rotation drops the old key at once",
            &at_v1,
            &["v2 emergency rotation dropping k1"],
            TS + 1,
            None,
            Some(2)
        ),
        case(
            "old key after an emergency rotation (catch-up chain)",
            &at_v1,
            &[
                "v2 emergency rotation dropping k1",
                "v3 by k1 after the emergency rotation"
            ],
            TS + 2,
            Some("unknown_signer"),
            None
        ),
    ]);

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
            envelope_vector("http heartbeat not ready", "node", &node, Purpose::HttpHeartbeat, &heartbeat_not_ready),
            envelope_vector("ws job.result", "node", &node, Purpose::WsJobResult, &result),
            envelope_vector("ws job.assign", "network", &network, Purpose::WsJobAssign, &assign),
            chunk_vectors[0].clone(),
            chunk_vectors[1].clone(),
        ],
        "result_binding": {
            "assignment": serde_json::to_string(&assignment)?,
            "results": binding,
        },
        "stream_binding": {
            "assignment": serde_json::to_string(&stream_assignment)?,
            "events": events,
            "summary": summary,
            "result": serde_json::to_string(&stream_result)?,
            "cases": stream_cases,
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
        "invalid_requests": invalid_requests,
        "replay": {"http": http_replay, "ws_seq": ws_replay},
        "rotation_keys": [
            key_vector("k1 (= network)", net_seed, k1.id().as_str(), k1.verifying_key().as_bytes()),
            key_vector("k2", [0x44u8; 32], k2.id().as_str(), k2.verifying_key().as_bytes()),
            key_vector("k3", [0x55u8; 32], k3.id().as_str(), k3.verifying_key().as_bytes()),
        ],
        "config_snapshots": snapshots.iter().map(|(n, c)| json!({"name": n, "envelope": c.as_str(), "config_digest": c.digest().as_str()})).collect::<Vec<_>>(),
        "config_cases": config_cases,
        "invalid": [
            {"name": "purpose changed after signing", "envelope": flipped_purpose, "expect_purpose": "http/heartbeat", "signer": "node", "error": "bad_signature"},
            {"name": "ping presented on the heartbeat endpoint", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &ping), "expect_purpose": "http/heartbeat", "signer": "node", "error": "wrong_purpose"},
            {"name": "body whitespace added", "envelope": envelope::seal_bytes(&node, Purpose::HttpPing, &ping).replace("{\\\"hdr\\\"", "{ \\\"hdr\\\""), "expect_purpose": "http/ping", "signer": "node", "error": "bad_signature"},
        ],
    });
    println!("{}", serde_json::to_string_pretty(&vectors)?);
    Ok(())
}
