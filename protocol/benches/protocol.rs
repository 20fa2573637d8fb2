//! Micro benchmarks of the protocol's hot paths: `cargo bench -p resultity-protocol`.
//! The `verify_strict` figure is the baseline: envelope decode+verify should cost little more
//! than the signature check itself (docs/performance.md records the ratio).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use resultity_protocol::config::{ConfigDigest, ConfigSnapshot, NetworkConfig, SignedConfig};
use resultity_protocol::crypto::signature_input;
use resultity_protocol::envelope::{self, RawEnvelope};
use resultity_protocol::messages::http::{self, HeartbeatRequest, NodeReport, RequestHeader};
use resultity_protocol::messages::ws::{JobResult, NodeMessage};
use resultity_protocol::messages::*;
use resultity_protocol::replay::NonceStore;
use resultity_protocol::session::{NetworkKeys, NetworkSession, NodeSession};
use resultity_protocol::{JobId, NetworkId, NetworkKeypair, NodeKeypair, Purpose, limits};

const NOW: u64 = 1_767_225_600_000;

fn heartbeat(node: &NodeKeypair, net: &NetworkId, nonce: u64) -> HeartbeatRequest {
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&nonce.to_le_bytes());
    HeartbeatRequest {
        hdr: RequestHeader {
            network_id: net.clone(),
            node_id: node.id().clone(),
            ts_ms: NOW,
            nonce: resultity_protocol::crypto::b64(&n),
        },
        report: NodeReport {
            phase: NodePhase::Ready,
            config: None,
            draining: false,
            max_concurrency: 64,
            in_flight: 10,
            credits: 54,
            outbox_len: 0,
            participation: Participation::Both,
            subclouds: vec![],
            models: vec![ModelStatus {
                model: ModelRef {
                    id: "meta-llama/Llama-3.1-8B-Instruct".into(),
                    revision: "0e9e39f".into(),
                },
                state: ModelState::Active,
                reason: None,
                self_test: None,
            }],
            gpu: GpuReport::default(),
            runtime: RuntimeReport {
                kind: RuntimeKind::Vllm,
                ready: true,
                reason: None,
                running: Some(10),
                waiting: Some(0),
                kv_cache_usage_permille: Some(310),
                generation_tokens_total: Some(123_456),
            },
            software: Software {
                sidecar_version: "0.1.0".into(),
                runtime_version: None,
                runtime_image: None,
            },
            not_ready: vec![],
        },
    }
}

fn benches(c: &mut Criterion) {
    let node = NodeKeypair::from_seed(&[1; 32]);
    let network = NetworkKeypair::from_seed(&[2; 32]);
    let net = NetworkId::parse("resultity-testnet").unwrap_or_else(|_| unreachable!());
    let hb = heartbeat(&node, &net, 1);
    let hb_body = serde_json::to_string(&hb).unwrap_or_default();
    let hb_frame = envelope::seal(&node, Purpose::HttpHeartbeat, &hb).unwrap_or_default();
    let sig = node.sign("http/heartbeat", hb_body.as_bytes());
    let vk = node.verifying_key();
    let input = signature_input("http/heartbeat", hb_body.as_bytes());

    let mut g = c.benchmark_group("crypto");
    g.bench_function("sign (heartbeat body)", |b| {
        b.iter(|| node.sign("http/heartbeat", black_box(hb_body.as_bytes())))
    });
    g.bench_function("verify_strict (heartbeat body)", |b| {
        b.iter(|| vk.verify_strict(black_box(&input), black_box(&sig)).is_ok())
    });
    g.finish();

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Bytes(hb_frame.len() as u64));
    g.bench_function("encode+sign heartbeat", |b| {
        b.iter(|| envelope::seal(&node, Purpose::HttpHeartbeat, black_box(&hb)))
    });
    g.bench_function("decode+verify heartbeat (node key from id)", |b| {
        b.iter(|| http::open_node_request::<HeartbeatRequest>(black_box(hb_frame.as_bytes()), &net))
    });
    g.bench_function("decode+verify heartbeat (cached key)", |b| {
        b.iter(|| {
            RawEnvelope::decode(black_box(hb_frame.as_bytes()), limits::MAX_ENVELOPE_BYTES)
                .and_then(|r| r.open::<HeartbeatRequest>(Purpose::HttpHeartbeat, &vk))
        })
    });
    g.finish();

    // A job result of 2 KiB output through the WebSocket session both ways.
    let keys = NetworkKeys::new(&[network.id().clone()]).unwrap_or_default();
    let mut ns = NodeSession::new(node.clone(), net.clone(), "s".into(), keys);
    let output = "x".repeat(2048);
    let result = NodeMessage::JobResult(JobResult {
        job_id: JobId::parse("j-1").unwrap_or_else(|_| unreachable!()),
        lease_epoch: 1,
        config_digest: Some(resultity_protocol::config::ConfigDigest::of_body(b"bench")),
        model: ModelRef {
            id: "m".into(),
            revision: "r".into(),
        },
        output_digest: JobResult::digest_output(&output),
        output,
        usage: Usage::default(),
        runtime_ms: 1,
        completed_at_ms: NOW,
        stream: None,
    });
    let mut g = c.benchmark_group("ws");
    g.bench_function("seal job.result (2 KiB output)", |b| {
        b.iter(|| ns.seal(black_box(result.clone())))
    });
    let frames: Vec<String> = (0..100_000)
        .map(|_| ns.seal(result.clone()).unwrap_or_default())
        .collect();
    let mut i = 0;
    let mut nw = NetworkSession::new(
        net.clone(),
        node.id().clone(),
        vk,
        "s".into(),
        limits::MAX_FRAME_BYTES,
    );
    g.bench_function("open job.result (2 KiB output)", |b| {
        b.iter(|| {
            // Fresh sequence numbers each time; past the prepared frames the window refuses
            // (still doing the full verify first), so the cost measured stays the same.
            let r = nw.open(frames[i % frames.len()].as_bytes());
            i += 1;
            r
        })
    });
    g.finish();

    let mut store = NonceStore::default();
    let mut n = 0u64;
    c.bench_function("nonce store check (1 node)", |b| {
        b.iter(|| {
            n += 1;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&n.to_le_bytes());
            store.check("node", NOW, &resultity_protocol::crypto::b64(&raw), NOW)
        })
    });

    let snapshot = ConfigSnapshot {
        network_id: net.clone(),
        version: 1,
        issued_at_ms: NOW,
        expires_at_ms: NOW + 1,
        prev_digest: None,
        payload: NetworkConfig {
            environment: Environment::Testnet,
            models: (0..50)
                .map(|i| resultity_protocol::config::ApprovedModel {
                    model: ModelRef {
                        id: format!("org/model-{i}"),
                        revision: "main".into(),
                    },
                    runtimes: vec![RuntimeKind::Vllm, RuntimeKind::Triton],
                    min_gpu_memory_mib: 16_384,
                    subclouds: vec![],
                    known_answer: None,
                })
                .collect(),
            runtime_images: Default::default(),
            sidecar_image: None,
            timing: Timing::default(),
            subclouds: vec![],
            network_keys: vec![network.id().clone()],
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        },
    };
    let signed = SignedConfig::sign(&network, &snapshot);
    let body = serde_json::to_string(&snapshot).unwrap_or_default();
    let mut g = c.benchmark_group("config");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("config digest (50 models)", |b| {
        b.iter(|| ConfigDigest::of_body(black_box(body.as_bytes())))
    });
    if let Ok(signed) = signed {
        g.bench_function("config decode (50 models)", |b| {
            b.iter(|| SignedConfig::decode(black_box(signed.as_str().as_bytes())))
        });
    }
    g.finish();
}

criterion_group!(protocol, benches);
criterion_main!(protocol);
