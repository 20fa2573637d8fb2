//! The simulator against real HTTP clients on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_runtime_sim::{Faults, Flavor, SimConfig, SimHandle, generate, start};
use serde_json::{Value, json};

async fn sim(cfg: SimConfig) -> SimHandle {
    start(cfg, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn fast() -> SimConfig {
    SimConfig {
        prefill_ms: 0,
        decode_us_per_token: 0,
        ..SimConfig::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// GETs `url`.
async fn get(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> reqwest::Response {
    c.get(url).send().await.unwrap()
}

/// POSTs `body` as JSON to `url`.
async fn post(c: &reqwest::Client, url: impl reqwest::IntoUrl, body: &Value) -> reqwest::Response {
    c.post(url).json(body).send().await.unwrap()
}

/// An empty POST to `url` (Triton's repository API).
async fn post_empty(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> reqwest::Response {
    c.post(url).send().await.unwrap()
}

/// A response's JSON body.
async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

/// Polls `cond` every 5 ms for up to 5 s.
async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn completions_are_deterministic_and_counted() {
    let s = sim(fast()).await;
    let c = client();
    let body = json!({"model": "sim-model", "prompt": "two plus two", "max_tokens": 8});
    let r = json_of(post(&c, format!("{}/v1/completions", s.url()), &body).await).await;
    let (text, n) = generate("sim-model", "two plus two", 8);
    assert_eq!(r["choices"][0]["text"], text);
    assert_eq!(r["usage"]["completion_tokens"], n);
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    let again = json_of(post(&c, format!("{}/v1/completions", s.url()), &body).await).await;
    assert_eq!(again["choices"], r["choices"]);
    assert_eq!(s.stats().completed, 2);
    assert_eq!(s.stats().generation_tokens_total, 2 * u64::from(n));
}

#[tokio::test]
async fn chat_completions_and_models() {
    let s = sim(fast()).await;
    let c = client();
    let body = json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]});
    let r = json_of(post(&c, format!("{}/v1/chat/completions", s.url()), &body).await).await;
    let (text, _) = generate("sim-model", "user: hi\n", 16);
    assert_eq!(r["choices"][0]["message"]["content"], text.trim_start());
    assert_eq!(r["object"], "chat.completion");
    let m = json_of(get(&c, format!("{}/v1/models", s.url())).await).await;
    assert_eq!(m["data"][0]["id"], "sim-model");
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let s = sim(fast()).await;
    let c = client();
    let r = c
        .post(format!("{}/v1/completions", s.url()))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = post(
        &c,
        format!("{}/v1/completions", s.url()),
        &json!({"model": "other", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("other"));
    let r = post(
        &c,
        format!("{}/v1/chat/completions", s.url()),
        &json!({"model": "sim-model"}),
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn batches_concurrent_requests_up_to_max_batch() {
    // 16 requests, batch of 4: decoding happens 4 at a time, never more.
    let s = sim(SimConfig {
        prefill_ms: 30,
        decode_us_per_token: 0,
        max_batch: 4,
        ..SimConfig::default()
    })
    .await;
    let c = client();
    let url = format!("{}/v1/completions", s.url());
    let reqs = (0..16).map(|i| {
        let c = c.clone();
        let url = url.clone();
        async move {
            post(
                &c,
                url,
                &json!({"model": "sim-model", "prompt": format!("p{i}")}),
            )
            .await
            .status()
        }
    });
    let statuses = futures_join(reqs).await;
    assert!(statuses.iter().all(|s| s.is_success()));
    let st = s.stats();
    assert_eq!(st.max_running, 4);
    assert_eq!(st.completed, 16);
    assert_eq!(st.running, 0);
}

async fn futures_join<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn down_and_failing_models_and_error_rate() {
    let s = sim(fast()).await;
    let c = client();
    s.set_faults(Faults {
        down: true,
        ..Faults::default()
    })
    .await;
    assert_eq!(get(&c, format!("{}/health", s.url())).await.status(), 503);
    assert_eq!(
        get(&c, format!("{}/v2/health/ready", s.url()))
            .await
            .status(),
        503
    );
    s.set_faults(Faults {
        failing_models: vec!["sim-model".into()],
        ..Faults::default()
    })
    .await;
    assert_eq!(get(&c, format!("{}/health", s.url())).await.status(), 200);
    let r = post(
        &c,
        format!("{}/v1/completions", s.url()),
        &json!({"model": "sim-model", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status(), 500);
    // Half the requests fail, reproducibly for a seed.
    s.set_faults(Faults {
        error_rate_permille: 500,
        ..Faults::default()
    })
    .await;
    let mut failed = 0;
    for _ in 0..200 {
        let r = post(
            &c,
            format!("{}/v1/completions", s.url()),
            &json!({"model": "sim-model", "prompt": "x"}),
        )
        .await;
        if r.status() == 500 {
            failed += 1;
        }
    }
    assert!(
        (60..140).contains(&failed),
        "{failed} of 200 failed at 50 %"
    );
}

#[tokio::test]
async fn hang_holds_requests_until_cleared() {
    let s = sim(fast()).await;
    s.set_faults(Faults {
        hang: true,
        ..Faults::default()
    })
    .await;
    let url = format!("{}/v1/completions", s.url());
    let req = tokio::spawn(async move {
        client()
            .post(url)
            .json(&json!({"model": "sim-model", "prompt": "x"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    wait_for(|| s.stats().requests == 1).await;
    assert!(!req.is_finished());
    assert_eq!(s.stats().completed, 0);
    s.set_faults(Faults::default()).await;
    assert!(req.await.unwrap().is_success());
    assert_eq!(s.stats().completed, 1);
}

#[tokio::test]
async fn crash_after_n_requests_stops_the_server() {
    let mut s = sim(SimConfig {
        faults: Faults {
            crash_after: Some(2),
            ..Faults::default()
        },
        ..fast()
    })
    .await;
    let c = client();
    let url = format!("{}/v1/completions", s.url());
    for _ in 0..2 {
        assert!(
            post(&c, &url, &json!({"model": "sim-model", "prompt": "x"}))
                .await
                .status()
                .is_success()
        );
    }
    let third = c
        .post(&url)
        .json(&json!({"model": "sim-model", "prompt": "x"}))
        .send()
        .await;
    assert!(third.is_err() || !third.unwrap().status().is_success());
    tokio::time::timeout(Duration::from_secs(5), s.stopped())
        .await
        .unwrap();
    assert!(c.get(format!("{}/health", s.url())).send().await.is_err());
}

#[tokio::test]
async fn triton_kserve_v2() {
    let s = sim(SimConfig {
        models: vec!["resnet".into(), "llm".into()],
        ..fast()
    })
    .await;
    let c = client();
    let u = s.url();
    assert_eq!(get(&c, format!("{u}/v2/health/ready")).await.status(), 200);
    assert_eq!(
        get(&c, format!("{u}/v2/models/resnet/ready"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&c, format!("{u}/v2/models/nope/ready")).await.status(),
        400
    );
    let req = json!({"id": "42", "inputs": [
        {"name": "INPUT0", "shape": [2], "datatype": "FP32", "data": [1.5, 2.0]},
        {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]});
    let r = json_of(post(&c, format!("{u}/v2/models/llm/infer"), &req).await).await;
    assert_eq!(r["id"], "42");
    assert_eq!(r["outputs"][0]["data"], json!([3.0, 4.0]));
    assert_eq!(
        r["outputs"][1]["data"][0],
        generate("llm", "hello", 16).0.trim_start()
    );
    let bad = post(
        &c,
        format!("{u}/v2/models/llm/infer"),
        &json!({"inputs": [{"name": "x"}]}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    // Unload makes the model unready and unknown to inference; load brings it back.
    assert_eq!(
        post_empty(&c, format!("{u}/v2/repository/models/resnet/unload"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&c, format!("{u}/v2/models/resnet/ready"))
            .await
            .status(),
        400
    );
    let idx = json_of(post_empty(&c, format!("{u}/v2/repository/index")).await).await;
    let resnet = idx
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "resnet")
        .unwrap();
    assert_eq!(resnet["state"], "UNAVAILABLE");
    assert_eq!(
        post_empty(&c, format!("{u}/v2/repository/models/resnet/load"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&c, format!("{u}/v2/models/resnet/ready"))
            .await
            .status(),
        200
    );
    assert_eq!(
        post_empty(&c, format!("{u}/v2/repository/models/unknown/load"))
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn vllm_metrics_and_live_fault_api() {
    let s = sim(fast()).await;
    let c = client();
    let text = get(&c, format!("{}/metrics", s.url()))
        .await
        .text()
        .await
        .unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:generation_tokens_total",
    ] {
        assert!(
            text.contains(&format!("{name}{{model_name=\"sim-model\"}}")),
            "{name} missing:\n{text}"
        );
    }
    let r = post(
        &c,
        format!("{}/sim/faults", s.url()),
        &json!({"down": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, format!("{}/health", s.url())).await.status(), 503);
    assert_eq!(
        c.post(format!("{}/sim/faults", s.url()))
            .body("[")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    let st = json_of(get(&c, format!("{}/sim/stats", s.url())).await).await;
    assert_eq!(st["requests"], 0);
}

#[tokio::test]
async fn busy_runtime_stalls_new_connections_but_not_open_ones() {
    let s = sim(SimConfig {
        prefill_ms: 3_000,
        ..fast()
    })
    .await;
    s.set_faults(Faults {
        stall_new_connections_ms: 60_000,
        ..Faults::default()
    })
    .await;
    // A keep-alive connection opened while the runtime is idle.
    let open = client();
    assert_eq!(
        get(&open, format!("{}/health", s.url())).await.status(),
        200
    );
    let busy = {
        let url = s.url();
        tokio::spawn(async move {
            client()
                .post(format!("{url}/v1/completions"))
                .json(&json!({"model": "sim-model", "prompt": "slow"}))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    wait_for(|| s.stats().running == 1).await;
    // A new connection is held back while the request runs…
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let stalled = fresh.get(format!("{}/health", s.url())).send().await;
    assert!(
        stalled.as_ref().is_err_and(reqwest::Error::is_timeout),
        "{stalled:?}"
    );
    assert!(s.stats().stalled_connections >= 1);
    // …the open one is served at once…
    assert_eq!(
        get(&open, format!("{}/health", s.url())).await.status(),
        200
    );
    // …and once the runtime is idle, new connections are served again.
    assert_eq!(busy.await.unwrap(), 200);
    let later = client()
        .get(format!("{}/health", s.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(later.status(), 200);
}

#[tokio::test]
async fn llama_cpp_flavor_exports_its_metric_names_and_slots() {
    let s = sim(SimConfig {
        flavor: Flavor::LlamaCpp,
        max_batch: 3,
        health_endpoint: false,
        ..fast()
    })
    .await;
    let c = client();
    let props = json_of(get(&c, format!("{}/props", s.url())).await).await;
    assert_eq!(props["total_slots"], 3);
    c.post(format!("{}/v1/completions", s.url()))
        .json(&json!({"model": "sim-model", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    let text = get(&c, format!("{}/metrics", s.url()))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("llamacpp:requests_processing 0"), "{text}");
    assert!(text.contains("llamacpp:requests_deferred 0"), "{text}");
    assert!(text.contains("llamacpp:tokens_predicted_total 2"), "{text}");
    assert!(!text.contains("vllm:"), "{text}");
    assert_eq!(get(&c, format!("{}/health", s.url())).await.status(), 404);
}

/// The binary on a port already taken: it stops with one error line, JSON with
/// `--log-format json`, plain text otherwise, and no escape byte written into the pipe.
#[test]
fn the_binary_reports_its_final_error_in_the_log_format() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for format in ["json", "text"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_resultity-runtime-sim"))
            .args(["--listen", &addr, "--log-format", format])
            .env_remove("NO_COLOR")
            .env_remove("RESULTITY_LOG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !stderr.contains('\x1b'),
            "escape byte in {format}:\n{stderr}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        let message = if format == "json" {
            let line: Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(line["level"], "ERROR");
            line["message"].as_str().unwrap().to_owned()
        } else {
            lines[0].strip_prefix("error: ").unwrap().to_owned()
        };
        assert!(
            message.starts_with("starting the runtime simulator: "),
            "{message}"
        );
    }
}
