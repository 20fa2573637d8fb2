//! Streamed jobs at the network: chunks are accepted only in order for the current streamed
//! lease, reach the caller as server-sent events while the job runs, and the caller's stream
//! ends with `[DONE]` only when the node's signed result binds exactly those chunks; a
//! tampered, reordered or missing chunk ends it with an OpenAI error event instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use resultity_protocol::ErrorCode;
use resultity_protocol::messages::ws::{
    JobAssignment, JobResult, NetworkMessage, NodeMessage, StreamDigest,
};

fn event(i: usize, text: &str) -> String {
    serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
        "model": MODEL, "choices": [{"index": 0, "delta": {"content": format!("{text}{i}")}, "finish_reason": null}]})
    .to_string()
}

/// Starts a streamed chat completion; resolves to the response once the network committed
/// to it (first event) or refused it.
fn stream_call(io: &resultity_io::IoServiceHandle) -> tokio::task::JoinHandle<reqwest::Response> {
    let base = io.base_url();
    tokio::spawn(async move {
        let mut body = chat_body();
        body["stream"] = serde_json::json!(true);
        http()
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    })
}

/// Reads SSE `data:` payloads until the body ends.
async fn read_events(mut resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    while let Some(b) = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("no SSE bytes within 10 s")
        .unwrap()
    {
        buf.push_str(std::str::from_utf8(&b).unwrap());
    }
    buf.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn streamed_result(
    node: &resultity_protocol::NodeId,
    job: &JobAssignment,
    events: &[String],
) -> JobResult {
    let mut d = StreamDigest::new();
    for e in events {
        d.push(e);
    }
    JobResult {
        output: String::new(),
        output_digest: JobResult::digest_output(""),
        stream: Some(d.summary()),
        ..result_for(node, job)
    }
}

async fn chunk(ws: &mut WsClient, job: &JobAssignment, index: u32, events: &[String]) {
    ws.send(NodeMessage::JobChunk {
        job_id: job.job_id.clone(),
        lease_epoch: job.lease_epoch,
        index,
        events: events.to_vec(),
    })
    .await;
}

async fn recv_confirm(ws: &mut WsClient) {
    loop {
        match ws.recv().await {
            Ok(NetworkMessage::ResultConfirm { .. }) => return,
            Ok(NetworkMessage::Error { code, message, .. }) => {
                panic!("result refused: {code} {message}")
            }
            Ok(_) => continue,
            Err(c) => panic!("session closed ({c:?})"),
        }
    }
}

#[tokio::test]
async fn an_honest_stream_reaches_the_caller_in_order_and_ends_with_done() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 2);
    let mut ws = node.join().await;
    let caller = stream_call(&io);
    let job = ws.recv_job().await;
    assert!(job.stream, "a streamed request was assigned unstreamed");
    ws.send(NodeMessage::JobAck {
        job_id: job.job_id.clone(),
        lease_epoch: job.lease_epoch,
    })
    .await;
    let events: Vec<String> = (0..5).map(|i| event(i, "tok")).collect();
    chunk(&mut ws, &job, 0, &events[..1]).await;
    // The caller's answer starts with the first chunk, before the job's result exists.
    let resp = caller.await.unwrap();
    assert_eq!(resp.headers()["x-resultity-job-id"], job.job_id.as_str());
    // The rest, coalesced two per chunk.
    chunk(&mut ws, &job, 1, &events[1..3]).await;
    chunk(&mut ws, &job, 2, &events[3..]).await;
    ws.send(NodeMessage::JobResult(streamed_result(
        &ws.node_id.clone(),
        &job,
        &events,
    )))
    .await;
    recv_confirm(&mut ws).await;
    let got = read_events(resp).await;
    let mut want = events.clone();
    want.push("[DONE]".into());
    assert_eq!(got, want);
    io.shutdown().await;
}

#[tokio::test]
async fn a_result_that_does_not_bind_the_chunks_received_ends_the_stream_with_an_error() {
    for case in ["tampered", "reordered", "missing"] {
        let io = start(|_| {}).await;
        let node = TestNode::new(&io, 2);
        let mut ws = node.join().await;
        let caller = stream_call(&io);
        let job = ws.recv_job().await;
        let events: Vec<String> = (0..3).map(|i| event(i, "tok")).collect();
        chunk(&mut ws, &job, 0, &events).await;
        let resp = caller.await.unwrap();
        let mut signed = events.clone();
        match case {
            "tampered" => signed[1] = event(1, "TOK"),
            "reordered" => signed.swap(0, 2),
            _ => {
                signed.pop();
            }
        }
        ws.send(NodeMessage::JobResult(streamed_result(
            &ws.node_id.clone(),
            &job,
            &signed,
        )))
        .await;
        let (code, message) = ws.recv_error().await;
        assert_eq!(code, ErrorCode::ResultMismatch, "{case}: {message}");
        let got = read_events(resp).await;
        assert_eq!(got[..3], events[..], "{case}");
        assert_eq!(got.len(), 4, "{case}: {got:?}");
        let err: serde_json::Value = serde_json::from_str(&got[3]).unwrap();
        assert_eq!(err["error"]["type"], "server_error", "{case}: {err}");
        assert!(err["error"]["message"].is_string(), "{case}: {err}");
        io.shutdown().await;
    }
}

#[tokio::test]
async fn chunks_out_of_order_or_for_an_unstreamed_job_are_refused() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 2);
    let mut ws = node.join().await;
    // A chunk for a job assigned without streaming is malformed.
    let plain = call(&io);
    let job = ws.recv_job().await;
    assert!(!job.stream);
    chunk(&mut ws, &job, 0, &[event(0, "x")]).await;
    let (code, _) = ws.recv_error().await;
    assert_eq!(code, ErrorCode::Malformed);
    ws.send(NodeMessage::JobResult(result_for(
        &ws.node_id.clone(),
        &job,
    )))
    .await;
    assert_eq!(plain.await.unwrap().status(), 200);

    // A skipped index breaks the stream after the caller got its first part.
    let caller = stream_call(&io);
    let job = ws.recv_job().await;
    chunk(&mut ws, &job, 0, &[event(0, "x")]).await;
    let resp = caller.await.unwrap();
    chunk(&mut ws, &job, 2, &[event(2, "x")]).await;
    let (code, message) = ws.recv_error().await;
    assert_eq!(code, ErrorCode::ResultMismatch, "{message}");
    let got = read_events(resp).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[1].contains("\"error\""), "{got:?}");
    io.shutdown().await;
}

/// A network with Triton and vLLM nodes for one model: OpenAI jobs, streamed or not, go to
/// the vLLM node even when the Triton node has more free slots; KServe jobs may go anywhere.
#[tokio::test]
async fn a_mixed_network_sends_openai_jobs_and_streams_only_to_openai_runtimes() {
    use resultity_protocol::Purpose;
    use resultity_protocol::messages::RuntimeKind;
    use resultity_protocol::messages::http::paths;
    let io = start(|s| {
        s.network_config.models[0]
            .runtimes
            .push(RuntimeKind::Triton)
    })
    .await;
    let triton = TestNode::new(&io, 8);
    let ch = triton.challenge().await;
    let mut req = triton.register_request(ch.challenge);
    req.capabilities.runtime = RuntimeKind::Triton;
    let (status, text) = triton
        .post_raw(paths::REGISTER, triton.seal(Purpose::HttpRegister, &req))
        .await;
    assert_eq!(status, 200, "{text}");
    let mut rep = report(8);
    rep.runtime.kind = RuntimeKind::Triton;
    let (status, text) = triton
        .post_raw(paths::HEARTBEAT, triton.heartbeat_envelope(rep))
        .await;
    assert_eq!(status, 200, "{text}");
    let mut tws = WsClient::connect(&triton, 8).await;
    let vllm = TestNode::new(&io, 1);
    let mut ws = vllm.join().await;

    let plain = call(&io);
    let job = ws.recv_job().await;
    assert!(!job.stream);
    ws.send(NodeMessage::JobResult(result_for(
        &ws.node_id.clone(),
        &job,
    )))
    .await;
    let resp = plain.await.unwrap();
    assert_eq!(
        resp.headers()["x-resultity-node-id"],
        vllm.key.id().as_str()
    );

    let streamed = stream_call(&io);
    let job = ws.recv_job().await;
    assert!(job.stream);
    let events = vec![event(0, "t")];
    chunk(&mut ws, &job, 0, &events).await;
    ws.send(NodeMessage::JobResult(streamed_result(
        &ws.node_id.clone(),
        &job,
        &events,
    )))
    .await;
    let got = read_events(streamed.await.unwrap()).await;
    assert_eq!(got.last().map(String::as_str), Some("[DONE]"));

    // KServe inference is the Triton node's (the vLLM node is busy with nothing, but has
    // fewer free slots).
    let base = io.base_url();
    let kserve = tokio::spawn(async move {
        http()
            .post(format!("{base}/v2/models/{MODEL}/infer"))
            .json(&serde_json::json!({"inputs": []}))
            .send()
            .await
            .unwrap()
    });
    // The first assignment the Triton node ever saw is this one.
    let job = tws.recv_job().await;
    assert_eq!(
        job.kind,
        resultity_protocol::messages::JobKind::Infer,
        "an OpenAI job reached the Triton node"
    );
    tws.send(NodeMessage::JobResult(result_for(
        &tws.node_id.clone(),
        &job,
    )))
    .await;
    assert_eq!(kserve.await.unwrap().status(), 200);
    io.shutdown().await;
}

/// A caller that goes away mid-stream: the job is cancelled on its node (freeing the slot)
/// instead of streaming into the void.
#[tokio::test]
async fn a_caller_that_disconnects_mid_stream_gets_its_job_cancelled() {
    let io = start(|_| {}).await;
    let node = TestNode::new(&io, 2);
    let mut ws = node.join().await;
    let caller = stream_call(&io);
    let job = ws.recv_job().await;
    chunk(&mut ws, &job, 0, &[event(0, "t")]).await;
    drop(caller.await.unwrap());
    // The next chunks find no reader; the network cancels the lease.
    let mut index = 1;
    let cancelled = loop {
        chunk(&mut ws, &job, index, &[event(index as usize, "t")]).await;
        index += 1;
        let next = tokio::time::timeout(Duration::from_millis(200), ws.recv()).await;
        match next {
            Ok(Ok(NetworkMessage::JobCancel {
                job_id,
                lease_epoch,
                ..
            })) => break (job_id, lease_epoch),
            Ok(Ok(NetworkMessage::Error { code, message, .. })) => {
                // Chunks after the cancel are for a job that no longer exists.
                panic!("refused before the cancel: {code} {message}")
            }
            Ok(Ok(_)) | Err(_) => {
                assert!(index < 200, "no cancel after {index} chunks");
            }
            Ok(Err(c)) => panic!("session closed ({c:?})"),
        }
    };
    assert_eq!(cancelled, (job.job_id.clone(), job.lease_epoch));
    let view: serde_json::Value = http()
        .get(format!("{}/v1/jobs/{}", io.base_url(), job.job_id.as_str()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "failed", "{view}");
    io.shutdown().await;
}
