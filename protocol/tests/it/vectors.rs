//! Checks the implementation against the committed test vectors (docs/protocol.md §12).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use resultity_protocol::config::{ConfigTrust, ConfigVerdict, SignedConfig};
use resultity_protocol::crypto::{self, signature_input};
use resultity_protocol::envelope::{self, RawEnvelope};
use resultity_protocol::{
    ErrorCode, NetworkId, NetworkKeyId, NetworkKeypair, NodeId, NodeKeypair, Purpose,
};
use serde_json::Value;

const VECTORS: &str = include_str!("../vectors/v1.json");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("vector field {k} missing in {v}"))
}

struct Keys {
    node: NodeKeypair,
    network: NetworkKeypair,
}

impl Keys {
    fn verifying(&self, name: &str) -> VerifyingKey {
        match name {
            "node" => self.node.verifying_key(),
            "network" => self.network.verifying_key(),
            other => panic!("unknown signer {other}"),
        }
    }
}

fn load() -> (Value, Keys) {
    let v: Value = serde_json::from_str(VECTORS).unwrap();
    assert_eq!(s(&v, "domain_tag").as_bytes(), crypto::DOMAIN_TAG);
    let mut by_name = HashMap::new();
    for k in v["keys"].as_array().unwrap() {
        let seed: [u8; 32] = crypto::unb64("seed", s(k, "seed_b64url")).unwrap();
        by_name.insert(
            s(k, "name").to_owned(),
            (
                seed,
                s(k, "id").to_owned(),
                s(k, "public_key_hex").to_owned(),
            ),
        );
    }
    let (node_seed, node_id, node_pk) = by_name["node"].clone();
    let (net_seed, net_id, net_pk) = by_name["network"].clone();
    let node = NodeKeypair::from_seed(&node_seed);
    let network = NetworkKeypair::from_seed(&net_seed);
    // Key derivation and id text form.
    assert_eq!(node.id().as_str(), node_id);
    assert_eq!(hex(node.verifying_key().as_bytes()), node_pk);
    assert_eq!(
        NodeId::parse(&node_id).unwrap().verifying_key().unwrap(),
        node.verifying_key()
    );
    assert_eq!(network.id().as_str(), net_id);
    assert_eq!(hex(network.verifying_key().as_bytes()), net_pk);
    assert_eq!(
        NetworkKeyId::parse(&net_id)
            .unwrap()
            .verifying_key()
            .unwrap(),
        network.verifying_key()
    );
    (v, Keys { node, network })
}

#[test]
fn envelopes_match_byte_for_byte() {
    let (v, keys) = load();
    let envelopes = v["envelopes"].as_array().unwrap();
    assert!(envelopes.len() >= 3);
    for e in envelopes {
        let purpose = Purpose::parse(s(e, "purpose")).unwrap();
        let body = s(e, "body");
        assert_eq!(
            hex(&signature_input(purpose.as_str(), body.as_bytes())),
            s(e, "signature_input_hex"),
            "{}",
            s(e, "name")
        );
        let sig = match s(e, "signer") {
            "node" => keys.node.sign(purpose.as_str(), body.as_bytes()),
            _ => keys.network.sign(purpose.as_str(), body.as_bytes()),
        };
        assert_eq!(
            crypto::b64(&sig.to_bytes()),
            s(e, "signature_b64url"),
            "{}",
            s(e, "name")
        );
        let sealed = match s(e, "signer") {
            "node" => envelope::seal_bytes(&keys.node, purpose, body),
            _ => envelope::seal_bytes(&keys.network, purpose, body),
        };
        assert_eq!(sealed, s(e, "envelope"), "{}", s(e, "name"));
        let raw = RawEnvelope::decode(s(e, "envelope").as_bytes(), usize::MAX).unwrap();
        let opened: Value = raw.open(purpose, &keys.verifying(s(e, "signer"))).unwrap();
        assert_eq!(opened, serde_json::from_str::<Value>(body).unwrap());
    }
}

#[test]
fn config_digest_and_signature_match() {
    let (v, keys) = load();
    for c in v["configs"].as_array().unwrap() {
        let signed = SignedConfig::decode(s(c, "envelope").as_bytes()).unwrap();
        assert_eq!(signed.digest().as_str(), s(c, "config_digest"));
        assert_eq!(
            resultity_protocol::config::sha256_text(s(c, "body").as_bytes()),
            s(c, "config_digest")
        );
        let snapshot = signed.parse_unverified().unwrap();
        let resigned = SignedConfig::sign(&keys.network, &snapshot).unwrap();
        assert_eq!(resigned.as_str(), s(c, "envelope"));
        let trust = ConfigTrust::pinned(
            NetworkId::parse("resultity-testnet").unwrap(),
            vec![keys.network.id().clone()],
        );
        let now = snapshot.issued_at_ms + 1;
        assert!(matches!(
            trust.verify(&signed, now),
            Ok(ConfigVerdict::New(_))
        ));
    }
}

#[test]
fn result_binding_vectors() {
    use resultity_protocol::messages::ws::{JobAssignment, JobResult};
    let (v, _) = load();
    let b = &v["result_binding"];
    let assignment: JobAssignment = serde_json::from_str(s(b, "assignment")).unwrap();
    // The assignment's config is the config vector's snapshot.
    assert_eq!(
        assignment.config_digest.as_str(),
        s(&v["configs"][0], "config_digest")
    );
    let cases = b["results"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let result: JobResult = serde_json::from_str(s(case, "result")).unwrap();
        let got = result
            .check_binding(&assignment.config_digest, &assignment.model)
            .err()
            .map(|_| ErrorCode::ResultMismatch);
        let want: Option<ErrorCode> = serde_json::from_value(case["error"].clone()).unwrap();
        assert_eq!(got, want, "{}", s(case, "name"));
    }
}

#[test]
fn invalid_ids_fail_with_their_code() {
    let (v, _) = load();
    let cases = v["invalid_ids"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let code = NodeId::parse(s(case, "text")).err().map(|e| e.code());
        let want: ErrorCode = serde_json::from_value(case["error"].clone()).unwrap();
        assert_eq!(code, Some(want), "{}", s(case, "name"));
    }
}

#[test]
fn invalid_vectors_fail_with_their_code() {
    let (v, keys) = load();
    for bad in v["invalid"].as_array().unwrap() {
        let expect = Purpose::parse(s(bad, "expect_purpose")).unwrap();
        let got = RawEnvelope::decode(s(bad, "envelope").as_bytes(), usize::MAX)
            .and_then(|raw| raw.open::<Value>(expect, &keys.verifying(s(bad, "signer"))));
        let code = got.err().map(|e| e.code());
        let want: ErrorCode = serde_json::from_value(bad["error"].clone()).unwrap();
        assert_eq!(code, Some(want), "{}", s(bad, "name"));
    }
}

#[test]
fn flipping_any_byte_breaks_verification() {
    let (v, keys) = load();
    let mut cases: Vec<(String, String, Purpose)> = v["envelopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                s(e, "signer").to_owned(),
                s(e, "envelope").to_owned(),
                Purpose::parse(s(e, "purpose")).unwrap(),
            )
        })
        .collect();
    for c in v["configs"].as_array().unwrap() {
        cases.push((
            "network".into(),
            s(c, "envelope").to_owned(),
            Purpose::NetConfig,
        ));
    }
    for (signer, env, purpose) in cases {
        let key = keys.verifying(&signer);
        let raw = RawEnvelope::decode(env.as_bytes(), usize::MAX).unwrap();
        // Flip every bit pattern 0x01 of every byte of the signed body and of the signature.
        let body = raw.body_bytes().to_vec();
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x01;
            let sig = raw.signature();
            let ok = crypto::verify(&key, purpose.as_str(), &b, sig, &signer).is_ok();
            assert!(!ok, "body byte {i} flipped still verifies");
        }
        let sig = raw.signature().to_bytes();
        for i in 0..sig.len() {
            let mut s2 = sig;
            s2[i] ^= 0x01;
            let ok = crypto::verify(
                &key,
                purpose.as_str(),
                &body,
                &ed25519_dalek::Signature::from_bytes(&s2),
                &signer,
            )
            .is_ok();
            assert!(!ok, "signature byte {i} flipped still verifies");
        }
        // And on the wire text: any flipped byte either fails to decode or fails to verify,
        // unless it only changed the outer JSON's insignificant parts (it has none: the
        // envelope is written without whitespace, so every byte is significant).
        let bytes = env.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            let opened =
                RawEnvelope::decode(&b, usize::MAX).and_then(|r| r.open::<Value>(purpose, &key));
            assert!(opened.is_err(), "envelope byte {i} flipped still opens");
        }
    }
}

#[test]
fn stream_binding_vectors() {
    use resultity_protocol::messages::ws::{JobAssignment, JobResult, StreamDigest, StreamSummary};
    let (v, _) = load();
    let b = &v["stream_binding"];
    let assignment: JobAssignment = serde_json::from_str(s(b, "assignment")).unwrap();
    assert!(assignment.stream);
    let result: JobResult = serde_json::from_str(s(b, "result")).unwrap();
    let summary: StreamSummary = serde_json::from_value(b["summary"].clone()).unwrap();
    // The node's digest over the events is the summary the result signs.
    let mut d = StreamDigest::new();
    for e in b["events"].as_array().unwrap() {
        d.push(e.as_str().unwrap());
    }
    assert_eq!(d.summary(), summary);
    assert_eq!(result.stream.as_ref(), Some(&summary));
    // Everything a non-streamed result binds still holds.
    result
        .check_binding(&assignment.config_digest, &assignment.model)
        .unwrap();
    let cases = b["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let mut got = StreamDigest::new();
        for e in case["received_events"].as_array().unwrap() {
            got.push(e.as_str().unwrap());
        }
        let code = result
            .check_stream(Some(&got.summary()))
            .err()
            .map(|_| ErrorCode::ResultMismatch);
        let want: Option<ErrorCode> = serde_json::from_value(case["error"].clone()).unwrap();
        assert_eq!(code, want, "{}", s(case, "name"));
    }
    // A streamed result where none was expected, and the reverse, are refused too.
    assert!(result.check_stream(None).is_err());
    let plain = JobResult {
        stream: None,
        ..result.clone()
    };
    assert!(plain.check_stream(Some(&summary)).is_err());
}

/// The heartbeat vectors read as heartbeats; the node's not-ready reasons are optional, so the
/// plain one (as an older node sends it) has no such field and reads as "none given".
#[test]
fn heartbeat_vectors_carry_readiness_only_when_not_ready() {
    use resultity_protocol::messages::http::HeartbeatRequest;
    let (v, _) = load();
    let body = |name: &str| {
        let e = v["envelopes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| s(e, "name") == name)
            .unwrap_or_else(|| panic!("vector {name}"));
        s(e, "body").to_owned()
    };
    let plain = body("http heartbeat");
    assert!(!plain.contains("not_ready"), "{plain}");
    let hb: HeartbeatRequest = serde_json::from_str(&plain).unwrap();
    assert!(hb.report.not_ready.is_empty());
    let hb: HeartbeatRequest = serde_json::from_str(&body("http heartbeat not ready")).unwrap();
    assert_eq!(
        hb.report.not_ready,
        ["results cannot be stored: No space left on device (os error 28)"]
    );
    assert_eq!(hb.report.credits, 0);
}

#[test]
fn invalid_requests_fail_with_their_code() {
    use resultity_protocol::messages::http::{PingRequest, open_node_request};
    let (v, keys) = load();
    let network_id = NetworkId::parse("resultity-testnet").unwrap();
    let valid = v["envelopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| s(e, "name") == "http ping")
        .map(|e| s(e, "envelope").to_owned())
        .unwrap();
    // The unaltered request opens, so each refusal below is caused by its alteration.
    let opened = open_node_request::<PingRequest>(valid.as_bytes(), &network_id).unwrap();
    assert_eq!(&opened.node_id, keys.node.id());
    let cases = v["invalid_requests"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let env = s(case, "envelope");
        assert_ne!(env, valid, "{}: not altered", s(case, "name"));
        let code = open_node_request::<PingRequest>(env.as_bytes(), &network_id)
            .err()
            .map(|e| e.code());
        let want: ErrorCode = serde_json::from_value(case["error"].clone()).unwrap();
        assert_eq!(code, Some(want), "{}", s(case, "name"));
    }
}

#[test]
fn replay_vectors() {
    use resultity_protocol::replay::{NonceStore, SeqWindow};
    let (v, keys) = load();
    let mut store = NonceStore::default();
    let steps = v["replay"]["http"].as_array().unwrap();
    assert!(steps.len() >= 5);
    for step in steps {
        let got = store
            .check(
                keys.node.id().as_str(),
                step["ts_ms"].as_u64().unwrap(),
                s(step, "nonce"),
                step["now_ms"].as_u64().unwrap(),
            )
            .err()
            .map(|e| e.code());
        let want: Option<ErrorCode> = serde_json::from_value(step["error"].clone()).unwrap();
        assert_eq!(got, want, "{}", s(step, "name"));
    }
    let mut window = SeqWindow::new();
    for step in v["replay"]["ws_seq"].as_array().unwrap() {
        let seq = step["seq"].as_u64().unwrap();
        let got = window.check(seq).err().map(|e| e.code());
        let want: Option<ErrorCode> = serde_json::from_value(step["error"].clone()).unwrap();
        assert_eq!(got, want, "seq {seq}");
    }
}

#[test]
fn rotation_and_config_refusal_vectors() {
    let (v, keys) = load();
    let mut rotation_keys = HashMap::new();
    for k in v["rotation_keys"].as_array().unwrap() {
        let seed: [u8; 32] = crypto::unb64("seed", s(k, "seed_b64url")).unwrap();
        let key = NetworkKeypair::from_seed(&seed);
        assert_eq!(key.id().as_str(), s(k, "id"));
        assert_eq!(hex(key.verifying_key().as_bytes()), s(k, "public_key_hex"));
        rotation_keys.insert(key.id().as_str().to_owned(), key);
    }
    assert!(rotation_keys.contains_key(keys.network.id().as_str()));
    let mut snapshots = HashMap::new();
    for c in v["config_snapshots"].as_array().unwrap() {
        let signed = SignedConfig::decode(s(c, "envelope").as_bytes()).unwrap();
        assert_eq!(signed.digest().as_str(), s(c, "config_digest"));
        // Deterministic: re-signing the snapshot with its signer gives the same bytes.
        let signer = &rotation_keys[signed.signer()];
        let resigned = SignedConfig::sign(signer, &signed.parse_unverified().unwrap()).unwrap();
        assert_eq!(resigned.as_str(), s(c, "envelope"), "{}", s(c, "name"));
        snapshots.insert(s(c, "name").to_owned(), signed);
    }
    let cases = v["config_cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = s(case, "name");
        let trust: ConfigTrust = serde_json::from_value(case["trust"].clone()).unwrap();
        let chain: Vec<SignedConfig> = case["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| snapshots[n.as_str().unwrap()].clone())
            .collect();
        let now = case["now_ms"].as_u64().unwrap();
        let want: Option<ErrorCode> = serde_json::from_value(case["error"].clone()).unwrap();
        let applied = case["applied_version"].as_u64();
        match trust.verify_chain(&chain, now) {
            Ok(ConfigVerdict::New(c)) => {
                assert_eq!(want, None, "{name}: accepted");
                assert_eq!(Some(c.snapshot.version), applied, "{name}");
            }
            Ok(ConfigVerdict::Unchanged) => {
                assert_eq!((want, applied), (None, None), "{name}: unchanged");
            }
            Err(e) => assert_eq!(Some(e.code()), want, "{name}: {e}"),
        }
    }
}
