//! Statements of docs/protocol.md that a stranger asked about, each checked against the code:
//! envelope serialization and duplicates, the codes for a bad `v`, `sig` length and base64
//! padding, and the edges of the WebSocket sequence window.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use resultity_protocol::envelope::seal_bytes;
use resultity_protocol::limits::MAX_ENVELOPE_BYTES;
use resultity_protocol::replay::SeqWindow;
use resultity_protocol::{ErrorCode, NodeKeypair, Purpose, RawEnvelope};
use serde_json::Value;

const BODY: &str = r#"{"hdr":{"network_id":"resultity-testnet"}}"#;

fn sealed() -> (NodeKeypair, Value) {
    let key = NodeKeypair::from_seed(&[7; 32]);
    let env = seal_bytes(&key, Purpose::HttpPing, BODY);
    (key, serde_json::from_str(&env).unwrap())
}

fn code_of(text: &str) -> Result<(), ErrorCode> {
    let raw = RawEnvelope::decode(text.as_bytes(), MAX_ENVELOPE_BYTES).map_err(|e| e.code())?;
    let key = resultity_protocol::NodeId::parse(raw.signer())
        .unwrap()
        .verifying_key()
        .unwrap();
    raw.verify(&key).map_err(|e| e.code())
}

fn field(v: &Value, name: &str) -> String {
    v[name].as_str().unwrap().to_owned()
}

#[test]
fn member_order_whitespace_and_escaping_do_not_matter() {
    let (_, v) = sealed();
    // Reordered, spaced, and the body written with escapes that decode to the same bytes.
    let escaped_body = serde_json::to_string(BODY)
        .unwrap()
        .replace("hdr", "\\u0068dr");
    let text = format!(
        "{{ \"body\" : {escaped_body} ,\n \"sig\":\"{}\", \"signer\":\"{}\", \"purpose\":\"http/ping\", \"v\":1 }}",
        field(&v, "sig"),
        field(&v, "signer"),
    );
    assert_eq!(code_of(&text), Ok(()));
}

#[test]
fn duplicate_envelope_member_is_malformed() {
    let (_, v) = sealed();
    let text = format!(
        "{{\"v\":1,\"v\":1,\"purpose\":\"http/ping\",\"signer\":\"{}\",\"sig\":\"{}\",\"body\":{}}}",
        field(&v, "signer"),
        field(&v, "sig"),
        serde_json::to_string(BODY).unwrap()
    );
    assert_eq!(code_of(&text), Err(ErrorCode::Malformed));
}

#[test]
fn version_codes() {
    let (_, v) = sealed();
    for (version, code) in [
        (Value::from(2), ErrorCode::UnsupportedVersion),
        (serde_json::json!(1.0), ErrorCode::Malformed),
        (serde_json::json!("1"), ErrorCode::Malformed),
        (serde_json::json!(-1), ErrorCode::Malformed),
    ] {
        let mut e = v.clone();
        e["v"] = version.clone();
        assert_eq!(code_of(&e.to_string()), Err(code), "v = {version}");
    }
}

#[test]
fn signature_length_padding_and_alphabet_are_malformed() {
    let (_, v) = sealed();
    let sig = field(&v, "sig");
    assert_eq!(sig.len(), 86);
    let padded = format!("{sig}==");
    let short = sig[..85].to_owned();
    let standard = sig.replace('-', "+").replace('_', "/");
    let mut cases = vec![padded, short, format!("{sig}AA")];
    if standard != sig {
        cases.push(standard);
    }
    for bad in cases {
        let mut e = v.clone();
        e["sig"] = Value::from(bad.clone());
        assert_eq!(code_of(&e.to_string()), Err(ErrorCode::Malformed), "{bad}");
    }
}

#[test]
fn sequence_window_edges() {
    let mut w = SeqWindow::new();
    assert_eq!(w.check(0).map_err(|e| e.code()), Err(ErrorCode::Malformed));
    w.check(1).unwrap();
    // Any jump ahead is accepted; skipped numbers stay acceptable inside the window.
    w.check(1_000).unwrap();
    w.check(1_000 - 63).unwrap();
    assert_eq!(
        w.check(1_000 - 64).map_err(|e| e.code()),
        Err(ErrorCode::Replayed)
    );
    assert_eq!(
        w.check(1_000 - 63).map_err(|e| e.code()),
        Err(ErrorCode::Replayed),
        "each number once"
    );
    w.check(999).unwrap();
}
