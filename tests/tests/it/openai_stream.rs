//! The OpenAI surface real clients use, through the whole devnet (IO service, sidecar agents,
//! runtime simulators on loopback): streamed completions (`"stream": true`, server-sent
//! events) end to end, node failures before and during a stream, OpenAI error objects,
//! `models.retrieve`, `n`, finish reasons and what a Triton network advertises.
//!
//! Mid-generation is observed, not timed: the simulator holds its streams after a number of
//! tokens until the test releases them, and reports how many streams are still open.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_devnet::{Devnet, DevnetConfig, MODEL, RuntimeChoice};
use resultity_runtime_sim::{Faults, chat_prompt, generate_choice};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::common;
use common::wait_for;

async fn devnet(nodes: usize, runtime: RuntimeChoice) -> Devnet {
    let net = Devnet::start(DevnetConfig {
        nodes,
        runtime,
        latency_ms: 5,
        decode_us_per_token: 1_000,
        // Long enough that a killed node's session loss, not the resume window, moves a
        // stream on.
        resume_window_ms: 60_000,
        ..DevnetConfig::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(15)).await.unwrap();
    net
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// POSTs `body` as JSON to `url`.
async fn post_json(c: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    c.post(url).json(body).send().await.unwrap()
}

/// GETs `url` and parses its JSON body.
async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// The JSON body of an answer that must have `status`.
async fn answer_with(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status(), status);
    r.json().await.unwrap()
}

/// The job id the network names in a response's headers.
fn job_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-resultity-job-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn hold_streams(net: &Devnet, after_tokens: Option<u32>) {
    for n in &net.nodes {
        if n.is_alive() {
            n.sim
                .set_faults(Faults {
                    hold_streams_after_tokens: after_tokens,
                    ..Faults::default()
                })
                .await;
        }
    }
}

/// A server-sent event stream read from a response, one `data:` payload at a time.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event's data, `None` once the body ended.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if !data.is_empty() {
                    return Some(data.join("\n"));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("no SSE bytes within 30 s")
                .expect("SSE body failed");
            match chunk {
                Some(b) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                None => {
                    assert!(
                        self.buf.trim().is_empty(),
                        "body ended mid-event: {:?}",
                        self.buf
                    );
                    return None;
                }
            }
        }
    }

    /// Every event's data up to `[DONE]`, which is consumed; `None` if the body ended first.
    async fn until_done(&mut self) -> Option<Vec<String>> {
        let mut events = Vec::new();
        while let Some(data) = self.next().await {
            if data == "[DONE]" {
                return Some(events);
            }
            events.push(data);
        }
        None
    }
}

// The OpenAI chat completion chunk object, field for field; unknown fields are refused so
// the test fails on anything the official schema does not have.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatCompletionChunk {
    id: String,
    object: String,
    created: u64,
    model: String,
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<CompletionUsage>,
    #[serde(default)]
    system_fingerprint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkChoice {
    index: u32,
    delta: ChoiceDelta,
    #[serde(default)]
    logprobs: Option<Value>,
    finish_reason: Option<FinishReason>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChoiceDelta {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    FunctionCall,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct CompletionUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

fn chat_request(content: &str, max_tokens: u32, stream: bool) -> Value {
    let mut req = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    });
    if stream {
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
    }
    req
}

async fn job_view(net: &Devnet, job_id: &str) -> Value {
    get_json(&http(), &format!("{}/v1/jobs/{job_id}", net.base_url())).await
}

/// A streamed chat completion: several SSE chunks, the first while the runtime still
/// generates; parsed strictly as OpenAI chunks, their text equals the non-streamed answer
/// and the stream ends with `[DONE]` only after the signed result verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_arrives_in_chunks_before_generation_ends_and_equals_the_answer() {
    let net = devnet(1, RuntimeChoice::Vllm).await;
    let url = format!("{}/chat/completions", net.openai_base_url());
    let prompt = "Count the Greek letters, please.";
    let plain: Value = post_json(&http(), &url, &chat_request(prompt, 64, false))
        .await
        .json()
        .await
        .unwrap();
    let want = plain["choices"][0]["message"]["content"].as_str().unwrap();
    let (_, want_tokens, want_finish) = generate_choice(
        MODEL,
        &chat_prompt(&chat_request(prompt, 64, false)).unwrap(),
        64,
    );
    assert!(want_tokens >= 4);

    let completed_before = net.nodes[0].sim.stats().completed;
    hold_streams(&net, Some(1)).await;
    let resp = post_json(&http(), &url, &chat_request(prompt, 64, true)).await;
    let job_id = job_id(&resp);
    let mut sse = Sse::new(resp);
    let mut chunks: Vec<ChatCompletionChunk> = Vec::new();
    // Role chunk, then the first token: both arrive while the runtime holds the rest.
    while chunks.iter().all(|c| {
        c.choices
            .iter()
            .all(|ch| ch.delta.content.as_deref().unwrap_or("").is_empty())
    }) {
        let data = sse
            .next()
            .await
            .expect("stream ended before the first token");
        chunks.push(serde_json::from_str(&data).unwrap());
    }
    let sim = net.nodes[0].sim.stats();
    assert_eq!(sim.streams_open, 1, "generation already ended: {sim:?}");
    assert_eq!(sim.streamed_tokens, 1, "{sim:?}");
    assert_eq!(sim.completed, completed_before, "{sim:?}");
    hold_streams(&net, None).await;
    let rest = sse
        .until_done()
        .await
        .expect("the stream ended without [DONE]");
    assert!(sse.next().await.is_none(), "events after [DONE]");
    chunks.extend(rest.iter().map(|data| serde_json::from_str(data).unwrap()));
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    for c in &chunks {
        assert_eq!(c.object, "chat.completion.chunk");
        assert_eq!(c.model, MODEL);
        assert!(c.id.starts_with("chatcmpl-") && c.created > 0);
        assert!(c.system_fingerprint.is_none());
        assert!(
            c.choices
                .iter()
                .all(|ch| ch.index == 0 && ch.logprobs.is_none())
        );
        assert!(
            c.choices
                .iter()
                .all(|ch| ch.delta.refusal.is_none() && ch.delta.tool_calls.is_none())
        );
    }
    assert_eq!(
        chunks[0].choices[0].delta.role.as_deref(),
        Some("assistant")
    );
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|ch| ch.delta.content.clone())
        .collect();
    assert_eq!(text, want);
    let finish: Vec<FinishReason> = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|ch| ch.finish_reason)
        .collect();
    let want_finish = match want_finish {
        "stop" => FinishReason::Stop,
        _ => FinishReason::Length,
    };
    assert_eq!(finish, [want_finish]);
    assert_eq!(
        plain["choices"][0]["finish_reason"],
        json!(want_finish_str(want_finish))
    );
    // include_usage: the last chunk has no choices and the usage of the whole answer.
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    let usage = last.usage.as_ref().unwrap();
    assert_eq!(usage.completion_tokens, u64::from(want_tokens));
    assert_eq!(
        usage.prompt_tokens,
        plain["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    // The network accepted the node's signed result: its stream digest matched every chunk.
    let view = job_view(&net, &job_id).await;
    assert_eq!(view["state"], "completed", "{view}");
    assert_eq!(view["verified"], true, "{view}");
    net.shutdown().await;
}

fn want_finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        _ => "length",
    }
}

/// Index of the live node whose simulator holds an open stream.
fn streaming_node(net: &Devnet) -> Option<usize> {
    net.nodes
        .iter()
        .position(|n| n.is_alive() && n.sim.stats().streams_open > 0)
}

/// A node that dies after part of a stream reached the caller: the caller's stream ends
/// with an OpenAI error event (never a silent cut, never `[DONE]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_ends_the_stream_with_an_error_event() {
    let mut net = devnet(2, RuntimeChoice::Vllm).await;
    hold_streams(&net, Some(2)).await;
    let resp = post_json(
        &http(),
        &format!("{}/chat/completions", net.openai_base_url()),
        &chat_request("Tell me a long story.", 64, true),
    )
    .await;
    let mut sse = Sse::new(resp);
    let first = sse.next().await.unwrap();
    let _: ChatCompletionChunk = serde_json::from_str(&first).unwrap();
    let victim = streaming_node(&net).expect("no simulator is streaming");
    net.kill_node(victim).unwrap();
    let mut error = None;
    while let Some(data) = sse.next().await {
        assert_ne!(data, "[DONE]", "a broken stream was completed");
        let v: Value = serde_json::from_str(&data).unwrap();
        if v.get("error").is_some() {
            error = Some(v);
            assert!(sse.next().await.is_none(), "events after the error event");
            break;
        }
    }
    let error = error.expect("the stream ended without an error event");
    let e = &error["error"];
    assert_eq!(e["type"], "server_error", "{error}");
    assert_eq!(e["code"], "unavailable", "{error}");
    assert!(e["message"].as_str().unwrap().len() > 10, "{error}");
    assert!(e.get("param").is_some(), "{error}");
    net.shutdown().await;
}

/// A node that dies before any chunk reached the caller: the job restarts on another node
/// and the caller gets the whole stream as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_before_the_first_chunk_restarts_the_stream_elsewhere() {
    let mut net = devnet(2, RuntimeChoice::Vllm).await;
    // Completions have no role chunk: nothing is sent before the first token.
    hold_streams(&net, Some(0)).await;
    let url = format!("{}/completions", net.openai_base_url());
    let req =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64, "stream": true});
    let call = tokio::spawn({
        let req = req.clone();
        let url = url.clone();
        async move { post_json(&http(), &url, &req).await }
    });
    let mut victim = None;
    wait_for("a simulator streaming", Duration::from_secs(15), || {
        victim = streaming_node(&net);
        victim.is_some()
    })
    .await;
    let victim = victim.unwrap();
    let survivor = 1 - victim;
    let survivor_id = net.nodes[survivor].node_id();
    net.kill_node(victim).unwrap();
    hold_streams(&net, None).await;
    let resp = call.await.unwrap();
    let job_id = job_id(&resp);
    let events = Sse::new(resp).until_done().await;
    let mut text = String::new();
    for data in events.expect("the stream ended without [DONE]") {
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(text, generate_choice(MODEL, "Once upon a time", 64).0);
    let view = job_view(&net, &job_id).await;
    assert_eq!(view["state"], "completed", "{view}");
    assert_eq!(view["attempts"], 2, "{view}");
    assert_eq!(view["node_id"], survivor_id.as_str(), "{view}");
    net.shutdown().await;
}

/// Errors are OpenAI error objects, a runtime's own refusal keeps its type, param and code,
/// `models.retrieve` works, `n` is honoured, and answers end on a natural stop or on length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_surface_answers_as_openai_does() {
    let net = devnet(1, RuntimeChoice::Vllm).await;
    let base = net.openai_base_url();
    let c = http();
    // models.retrieve
    let m = get_json(&c, &format!("{base}/models/{MODEL}")).await;
    assert_eq!(m["id"], MODEL, "{m}");
    assert_eq!(m["object"], "model");
    let r = c
        .get(format!("{base}/models/no-such-model"))
        .send()
        .await
        .unwrap();
    let e = answer_with(r, 404).await;
    assert_eq!(e["error"]["type"], "not_found_error", "{e}");
    assert_eq!(e["error"]["param"], "model", "{e}");
    assert_eq!(e["error"]["code"], "not_found", "{e}");

    // Unknown model on a completion: 404 in OpenAI shape, no job text.
    let chat = format!("{base}/chat/completions");
    let ghost = json!({"model": "ghost", "messages": [{"role": "user", "content": "hi"}]});
    let e = answer_with(post_json(&c, &chat, &ghost).await, 404).await;
    assert_eq!(e["error"]["param"], "model", "{e}");

    // The runtime's context-length refusal, unchanged.
    let too_long = chat_request("hello", 100_000, false);
    let e = answer_with(post_json(&c, &chat, &too_long).await, 400).await;
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
    assert_eq!(e["error"]["param"], "messages", "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("This model's maximum context length"),
        "{e}"
    );
    assert!(!msg.contains("job") && !msg.contains("node"), "{e}");
    // The same refusal before a stream starts is an error answer, not an event stream.
    let too_long = chat_request("hello", 100_000, true);
    let e = answer_with(post_json(&c, &chat, &too_long).await, 400).await;
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");

    // n is honoured: n choices, choice 0 the n-less answer.
    let mut req = chat_request("Name three colours.", 32, false);
    let single = answer_with(post_json(&c, &chat, &req).await, 200).await;
    req["n"] = json!(3);
    let three = answer_with(post_json(&c, &chat, &req).await, 200).await;
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{three}");
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
    }
    assert_eq!(choices[0]["message"], single["choices"][0]["message"]);
    assert_ne!(choices[1]["message"], choices[2]["message"]);
    // A bad n is refused naming the parameter.
    req["n"] = json!(0);
    let e = answer_with(post_json(&c, &chat, &req).await, 400).await;
    assert_eq!(e["error"]["param"], "n", "{e}");

    // Finish reasons: a natural stop within max_tokens, "length" when max_tokens cuts.
    for (max, want) in [(64, "stop"), (2, "length")] {
        let req = json!({"model": MODEL, "prompt": "Why is the sky blue?", "max_tokens": max});
        let body = answer_with(
            post_json(&c, &format!("{base}/completions"), &req).await,
            200,
        )
        .await;
        assert_eq!(body["choices"][0]["finish_reason"], want, "{body}");
    }
    // Bad JSON: OpenAI shape with the parameter at fault.
    let r = c
        .post(&chat)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let e = answer_with(r, 400).await;
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert_eq!(e["error"]["code"], "malformed", "{e}");
    net.shutdown().await;
}

/// A network of Triton nodes serves KServe v2 only: it does not offer OpenAI completions
/// for its model, and refuses them (and streams) clearly instead of failing the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_network_refuses_openai_completions_and_streams_clearly() {
    let net = devnet(1, RuntimeChoice::Triton).await;
    let c = http();
    let models = get_json(&c, &format!("{}/v1/models", net.base_url())).await;
    assert_eq!(
        models["data"][0]["endpoints"],
        json!(["/v2/models/{model}/infer"]),
        "{models}"
    );
    for stream in [false, true] {
        let chat = format!("{}/v1/chat/completions", net.base_url());
        let e = answer_with(
            post_json(&c, &chat, &chat_request("hi", 8, stream)).await,
            400,
        )
        .await;
        assert_eq!(e["error"]["param"], "model", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("KServe v2"),
            "{e}"
        );
    }
    // The runtime's own inference still works there.
    let infer = format!("{}/v2/models/{MODEL}/infer", net.base_url());
    let req =
        json!({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]});
    assert_eq!(post_json(&c, &infer, &req).await.status(), 200);
    net.shutdown().await;
}
