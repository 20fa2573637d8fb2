//! Every refused node HTTP request gets the spec's error code and status, is counted by
//! reason, and changes nothing.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use resultity_io::metrics::Channel;
use resultity_protocol::ErrorCode;
use resultity_protocol::messages::http::*;
use resultity_protocol::{NetworkId, NodeKeypair, Purpose};

fn error_of(text: &str) -> ErrorResponse {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not an ErrorResponse ({e}): {text}"))
}

fn assert_refused(status: u16, text: &str, want: ErrorCode) {
    let err = error_of(text);
    assert_eq!(err.error.code, want, "{text}");
    assert_eq!(status, want.http_status(), "{text}");
    assert!(err.server_time_ms > 0);
}

/// Swaps the signature of `env` for the one of `other` (both valid base64 signatures).
fn swap_sig(env: &str, other: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(env).unwrap();
    let o: serde_json::Value = serde_json::from_str(other).unwrap();
    v["sig"] = o["sig"].clone();
    v.to_string()
}

#[tokio::test]
async fn forged_replayed_misaddressed_and_malformed_requests_are_refused() {
    let io = start(|s| s.limits.max_body_bytes = 16 * 1024).await;
    let m = &io.state().metrics;
    let node = TestNode::new(&io, 2);
    node.register().await;
    node.heartbeat().await;
    let before = node_json(&io, node.key.id()).await;

    // Forged signature: the signature of another message.
    let env = node.heartbeat_envelope(report(7));
    let other = node.heartbeat_envelope(report(2));
    let (status, text) = node
        .post_raw(paths::HEARTBEAT, swap_sig(&env, &other))
        .await;
    assert_refused(status, &text, ErrorCode::BadSignature);
    // A different key claiming to be this node.
    let impostor = NodeKeypair::generate().unwrap();
    let body = HeartbeatRequest {
        hdr: node.hdr(),
        report: report(7),
    };
    let forged =
        resultity_protocol::envelope::seal(&impostor, Purpose::HttpHeartbeat, &body).unwrap();
    let forged = forged.replace(impostor.id().as_str(), node.key.id().as_str());
    let (status, text) = node.post_raw(paths::HEARTBEAT, forged).await;
    assert_refused(status, &text, ErrorCode::BadSignature);
    assert_eq!(m.rejections(Channel::Http, ErrorCode::BadSignature), 2);

    // Replay: the same signed request twice.
    let env = node.heartbeat_envelope(report(2));
    assert_eq!(node.post_raw(paths::HEARTBEAT, env.clone()).await.0, 200);
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_refused(status, &text, ErrorCode::Replayed);

    // Signed for another purpose: a ping body signed as a heartbeat.
    let ping = node.seal(Purpose::HttpHeartbeat, &PingRequest { hdr: node.hdr() });
    let (status, text) = node.post_raw(paths::PING, ping).await;
    assert_refused(status, &text, ErrorCode::WrongPurpose);

    // Wrong network id, in a signed request and in a challenge request.
    let mut hdr = node.hdr();
    hdr.network_id = NetworkId::parse("othernet").unwrap();
    let env = node.seal(
        Purpose::HttpHeartbeat,
        &HeartbeatRequest {
            hdr,
            report: report(7),
        },
    );
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_refused(status, &text, ErrorCode::WrongAudience);
    let req = ChallengeRequest {
        network_id: NetworkId::parse("othernet").unwrap(),
        node_id: node.key.id().clone(),
    };
    let (status, text) = node
        .post_raw(paths::CHALLENGE, serde_json::to_string(&req).unwrap())
        .await;
    assert_refused(status, &text, ErrorCode::WrongAudience);

    // Stale timestamp.
    let mut hdr = node.hdr();
    hdr.ts_ms -= 10 * 60_000;
    let env = node.seal(
        Purpose::HttpHeartbeat,
        &HeartbeatRequest {
            hdr,
            report: report(7),
        },
    );
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_refused(status, &text, ErrorCode::StaleTimestamp);

    // Malformed JSON: not an envelope, and an envelope whose signed body is not a heartbeat.
    let (status, text) = node.post_raw(paths::HEARTBEAT, "{not json").await;
    assert_refused(status, &text, ErrorCode::Malformed);
    let env =
        resultity_protocol::envelope::seal_bytes(&node.key, Purpose::HttpHeartbeat, "{\"hdr\":1}");
    let (status, text) = node.post_raw(paths::HEARTBEAT, env).await;
    assert_refused(status, &text, ErrorCode::Malformed);

    // Oversize body.
    let (status, text) = node.post_raw(paths::HEARTBEAT, vec![b' '; 20 * 1024]).await;
    assert_refused(status, &text, ErrorCode::TooLarge);

    // Nothing of the node changed: its report still says max_concurrency 2 and the same
    // heartbeat count of refusals did not alter its verdict.
    let after = node_json(&io, node.key.id()).await;
    assert_eq!(after["max_concurrency"], 2);
    assert_eq!(after["penalty"], before["penalty"]);
    assert_eq!(after["eligible"], before["eligible"]);
    for code in [
        ErrorCode::Replayed,
        ErrorCode::WrongPurpose,
        ErrorCode::StaleTimestamp,
        ErrorCode::TooLarge,
    ] {
        assert_eq!(m.rejections(Channel::Http, code), 1, "{code}");
    }
    assert_eq!(m.rejections(Channel::Http, ErrorCode::WrongAudience), 2);
    assert_eq!(m.rejections(Channel::Http, ErrorCode::Malformed), 2);
    let metrics = http()
        .get(format!("{}/metrics", io.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("resultity_io_rejections_total{channel=\"http\",reason=\"replayed\"} 1"),
        "{metrics}"
    );
    io.shutdown().await;
}

#[tokio::test]
async fn registration_needs_a_fresh_single_use_challenge_of_the_same_node() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 1);
    let other = TestNode::new(&io, 1);

    // Unregistered nodes are refused on every signed endpoint.
    let (status, text) = node
        .post_raw(paths::HEARTBEAT, node.heartbeat_envelope(report(1)))
        .await;
    assert_refused(status, &text, ErrorCode::NotRegistered);

    let ch = node.challenge().await;
    // A challenge issued to another node.
    let env = other.seal(
        Purpose::HttpRegister,
        &other.register_request(ch.challenge.clone()),
    );
    let (status, text) = other.post_raw(paths::REGISTER, env).await;
    assert_refused(status, &text, ErrorCode::ChallengeInvalid);
    // That attempt consumed it: single use even when misused.
    let env = node.seal(Purpose::HttpRegister, &node.register_request(ch.challenge));
    let (status, text) = node.post_raw(paths::REGISTER, env.clone()).await;
    assert_refused(status, &text, ErrorCode::ChallengeInvalid);

    let ch = node.challenge().await;
    let env = node.seal(Purpose::HttpRegister, &node.register_request(ch.challenge));
    assert_eq!(node.post_raw(paths::REGISTER, env.clone()).await.0, 200);
    // The same registration replayed.
    let (status, text) = node.post_raw(paths::REGISTER, env).await;
    assert_refused(status, &text, ErrorCode::ChallengeInvalid);
    // An unknown protocol version.
    let ch = node.challenge().await;
    let mut req = node.register_request(ch.challenge);
    req.protocol_versions = vec![99];
    let (status, text) = node
        .post_raw(paths::REGISTER, node.seal(Purpose::HttpRegister, &req))
        .await;
    assert_refused(status, &text, ErrorCode::UnsupportedVersion);

    assert_eq!(io.state().core().stats().nodes, 1);
    io.shutdown().await;
}

#[tokio::test]
async fn per_node_rate_limit_answers_429_with_retry_after() {
    let io = start(|s| {
        s.limits.node_http_burst = 3.0;
        s.limits.node_http_rate_per_s = 0.001;
    })
    .await;
    let node = TestNode::new(&io, 1);
    node.register().await;
    for _ in 0..3 {
        node.heartbeat().await;
    }
    let resp = node
        .http
        .post(format!("{}{}", io.base_url(), paths::PING))
        .body(node.seal(Purpose::HttpPing, &PingRequest { hdr: node.hdr() }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let err: ErrorResponse = resp.json().await.unwrap();
    assert_eq!(err.error.code, ErrorCode::RateLimited);
    io.shutdown().await;
}

#[tokio::test]
async fn wrong_methods_and_plain_gets_on_the_session_path_get_json_errors() {
    let io = start(|_| {}).await;
    let c = http();
    let r = c
        .get(format!("{}/v1/node/register", io.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let e: ErrorResponse = r.json().await.unwrap();
    assert_eq!(e.error.code, ErrorCode::MethodNotAllowed);
    // Every route: the caller API too, with the OpenAI error shape.
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::DELETE, "/v1/completions", "POST"),
        (reqwest::Method::POST, "/v1/models", "GET,HEAD"),
        (reqwest::Method::PUT, "/v1/jobs", "POST"),
        (reqwest::Method::POST, "/healthz", "GET,HEAD"),
    ] {
        let r = c
            .request(method.clone(), format!("{}{path}", io.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(e["error"]["message"].is_string() && e["error"].get("param").is_some());
    }
    let r = c
        .get(format!("{}/v1/node/session", io.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: ErrorResponse = r.json().await.unwrap();
    assert_eq!(e.error.code, ErrorCode::Malformed);
    assert!(
        e.error.message.contains("WebSocket upgrade required"),
        "{}",
        e.error.message
    );
    let r = c
        .get(format!("{}/no/such/route", io.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<ErrorResponse>().await.is_ok());
}

#[tokio::test]
async fn challenge_flood_from_one_address_is_rate_limited_per_ip() {
    let io = start(|s| {
        s.limits.challenge_burst_per_ip = 3.0;
        s.limits.challenge_rate_per_ip_per_s = 0.001;
    })
    .await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let ask = |c: reqwest::Client| {
        let url = format!("{}/v1/node/challenge", io.base_url());
        async move {
            let node = NodeKeypair::generate().unwrap();
            let body = ChallengeRequest {
                network_id: NetworkId::parse("testnet-1").unwrap(),
                node_id: node.id().clone(),
            };
            c.post(url).json(&body).send().await.unwrap()
        }
    };
    let flooder = from([127, 0, 0, 1]);
    for _ in 0..3 {
        assert_eq!(ask(flooder.clone()).await.status(), 200);
    }
    let r = ask(flooder.clone()).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: ErrorResponse = r.json().await.unwrap();
    assert_eq!(e.error.code, ErrorCode::RateLimited);
    // Another address is not affected.
    assert_eq!(ask(from([127, 0, 0, 2])).await.status(), 200);
}

/// Sends `head` on a raw connection and returns what the service answered before closing,
/// or panics if it neither answered nor closed within `bound` (far above the configured
/// timeouts; the service used to hold such connections for 40 s and more).
async fn raw_exchange(io: &resultity_io::IoServiceHandle, head: &[u8], bound: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(io.local_addr())
        .await
        .unwrap();
    sock.write_all(head).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "connection neither answered nor closed within {bound:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

use std::time::Duration;

#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_is_sent() {
    let io = start(|_| {}).await;
    // Declares 64 MiB and never sends a byte of it.
    let head = b"POST /v1/node/ping HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 67108864\r\n\r\n";
    let answer = raw_exchange(&io, head, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
    assert_eq!(
        io.state()
            .metrics
            .rejections(Channel::Http, ErrorCode::TooLarge),
        1
    );
    io.shutdown().await;
}

#[tokio::test]
async fn unfinished_headers_and_bodies_are_cut_off_by_their_timeouts() {
    let io = start(|s| {
        s.limits.header_timeout_ms = 300;
        s.limits.body_timeout_ms = 300;
    })
    .await;
    // Headers that never end (slow-loris): the connection is closed.
    let started = std::time::Instant::now();
    let answer = raw_exchange(
        &io,
        b"POST /v1/node/ping HTTP/1.1\r\nhost: x\r\nx-slow: ",
        Duration::from_secs(10),
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A body shorter than declared: answered with `timeout` once the body timeout passes.
    let answer = raw_exchange(
        &io,
        b"POST /v1/node/ping HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"hdr\":",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.contains("\"timeout\""), "{answer}");

    // The service still serves normal requests.
    assert_eq!(
        http()
            .get(format!("{}/healthz", io.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    io.shutdown().await;
}
