//! The runtime adapters (vLLM, generic OpenAI-compatible, Triton) against the runtime
//! simulator on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Duration;

use resultity_protocol::messages::{JobKind, RuntimeKind};
use resultity_runtime_sim::{Faults, Flavor, SimConfig, SimHandle, generate, start};
use resultity_sidecar::runtime::{AnyRuntime, Runtime, RuntimeError, RuntimeOptions};
use serde_json::{Value, json};

async fn sim(cfg: SimConfig) -> SimHandle {
    start(cfg, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn fast(models: &[&str]) -> SimConfig {
    SimConfig {
        models: models.iter().map(|m| m.to_string()).collect(),
        prefill_ms: 0,
        decode_us_per_token: 0,
        ..SimConfig::default()
    }
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn vllm_adapter_runs_jobs_and_reports_load() {
    let s = sim(fast(&["m1"])).await;
    let rt = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    rt.health().await.unwrap();
    assert!(rt.model_ready("m1").await.unwrap());
    assert!(!rt.model_ready("m2").await.unwrap());
    rt.load_model("m1").await.unwrap();
    assert!(matches!(
        rt.load_model("m2").await,
        Err(RuntimeError::Rejected { status: 404, .. })
    ));
    rt.test_inference("m1").await.unwrap();

    // The job's model wins over whatever the request body says, and streaming is turned off.
    let req = json!({"model": "something-else", "prompt": "hello there", "max_tokens": 5, "stream": true});
    let out = rt.infer(JobKind::Completion, "m1", &req, T).await.unwrap();
    let v: Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(v["choices"][0]["text"], generate("m1", "hello there", 5).0);
    assert_eq!(
        out.usage.completion_tokens,
        u64::from(generate("m1", "hello there", 5).1)
    );
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    let out = rt
        .infer(JobKind::ChatCompletion, "m1", &chat, T)
        .await
        .unwrap();
    assert!(out.body.contains("chat.completion"));

    // Streamed: every event reaches the receiver in order, and their text is the answer.
    let streamed = json!({"prompt": "hello there", "max_tokens": 5, "stream_options": {"include_usage": true}});
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let run = rt.infer_stream(JobKind::Completion, "m1", &streamed, T, tx);
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    };
    let (usage, events) = tokio::join!(run, collect);
    let usage = usage.unwrap();
    let (want, n) = generate("m1", "hello there", 5);
    let text: String = events
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, want);
    assert!(events.len() > 2, "{events:?}");
    assert_eq!(usage.completion_tokens, u64::from(n));
    // A runtime's own refusal keeps its type, param and code.
    let too_long = json!({"prompt": "hi", "max_tokens": 100_000});
    let Err(RuntimeError::Rejected {
        status, refusal, ..
    }) = rt.infer(JobKind::Completion, "m1", &too_long, T).await
    else {
        panic!("an oversize request was not refused");
    };
    assert_eq!(status, 400);
    let refusal = refusal.unwrap();
    assert_eq!(refusal.param.as_deref(), Some("prompt"));
    assert_eq!(
        refusal.code,
        Some(Value::String("context_length_exceeded".into()))
    );
    assert!(matches!(
        rt.infer(JobKind::Infer, "m1", &chat, T).await,
        Err(RuntimeError::Unsupported { .. })
    ));

    let report = rt.report().await;
    assert!(report.ready);
    assert_eq!(report.running, Some(0));
    assert!(report.generation_tokens_total.unwrap() > 0);
}

#[tokio::test]
async fn runtime_errors_map_to_the_contract() {
    let s = sim(fast(&["m1"])).await;
    let rt = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    // 4xx: rejected, not retriable.
    let err = rt
        .infer(JobKind::Completion, "m1", &json!({"prompt": 7}), T)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.retriable());
    // 5xx: failed, retriable.
    s.set_faults(Faults {
        failing_models: vec!["m1".into()],
        ..Faults::default()
    })
    .await;
    let err = rt
        .infer(JobKind::Completion, "m1", &json!({"prompt": "x"}), T)
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Failed(_)), "{err:?}");
    assert!(err.retriable());
    assert!(rt.test_inference("m1").await.is_err());
    // Hang: the call times out.
    s.set_faults(Faults {
        hang: true,
        ..Faults::default()
    })
    .await;
    let err = rt
        .infer(
            JobKind::Completion,
            "m1",
            &json!({"prompt": "x"}),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::Timeout(_)), "{err:?}");
    // Down: health fails, report says not ready with a reason.
    s.set_faults(Faults {
        down: true,
        ..Faults::default()
    })
    .await;
    assert!(rt.health().await.is_err());
    let report = rt.report().await;
    assert!(!report.ready);
    assert!(report.reason.is_some());
    // Gone entirely: unavailable.
    let url = s.url();
    s.shutdown().await;
    let gone = AnyRuntime::new(RuntimeKind::Vllm, &url, T).unwrap();
    let err = gone.health().await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn triton_adapter_loads_checks_and_infers() {
    let s = sim(fast(&["llm", "resnet"])).await;
    let rt = AnyRuntime::new(RuntimeKind::Triton, &s.url(), T).unwrap();
    rt.health().await.unwrap();
    assert!(rt.model_ready("llm").await.unwrap());
    rt.unload_model("resnet").await.unwrap();
    assert!(!rt.model_ready("resnet").await.unwrap());
    assert!(rt.test_inference("resnet").await.is_err());
    rt.load_model("resnet").await.unwrap();
    rt.test_inference("resnet").await.unwrap();
    assert!(matches!(
        rt.load_model("nope").await,
        Err(RuntimeError::Rejected { .. })
    ));
    assert!(matches!(
        rt.model_ready("../x").await,
        Err(RuntimeError::Rejected { .. })
    ));

    let req =
        json!({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]});
    let out = rt.infer(JobKind::Infer, "llm", &req, T).await.unwrap();
    let v: Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(
        v["outputs"][0]["data"][0],
        generate("llm", "hi", 16).0.trim_start()
    );
    assert!(matches!(
        rt.infer(JobKind::ChatCompletion, "llm", &req, T).await,
        Err(RuntimeError::Unsupported { .. })
    ));
    // KServe v2 answers once: a stream is refused, never faked.
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    assert!(matches!(
        rt.infer_stream(JobKind::Infer, "llm", &req, T, tx).await,
        Err(RuntimeError::StreamUnsupported { .. })
    ));
    assert!(rt.report().await.ready);
}

#[tokio::test]
async fn adapter_is_not_the_bottleneck_of_a_batching_runtime() {
    // 32 concurrent jobs through one adapter reach the runtime concurrently.
    let s = sim(SimConfig {
        prefill_ms: 50,
        decode_us_per_token: 0,
        max_batch: 64,
        ..fast(&["m1"])
    })
    .await;
    let rt = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    let jobs = (0..32).map(|i| {
        let rt = rt.clone();
        tokio::spawn(async move {
            rt.infer(
                JobKind::Completion,
                "m1",
                &json!({"prompt": format!("p{i}")}),
                T,
            )
            .await
        })
    });
    for j in jobs.collect::<Vec<_>>() {
        j.await.unwrap().unwrap();
    }
    assert!(
        s.stats().max_running >= 16,
        "peak concurrency {}",
        s.stats().max_running
    );
}

#[tokio::test]
async fn models_become_active_only_after_a_test_inference() {
    use resultity_protocol::messages::{ModelRef, ModelState};
    use resultity_sidecar::models::{KnownAnswers, Models, Refused};
    let s = sim(fast(&["good", "broken"])).await;
    s.set_faults(Faults {
        failing_models: vec!["broken".into()],
        ..Faults::default()
    })
    .await;
    let rt = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    let m = |id: &str| ModelRef {
        id: id.into(),
        revision: "r".into(),
    };
    let none = KnownAnswers::default();
    let mut models = Models::default();
    let refused = vec![Refused {
        model: "huge".into(),
        reason: "needs more GPU memory".into(),
    }];
    models
        .reconcile(&[m("good"), m("broken")], &refused, &none, &rt)
        .await;
    assert!(models.is_active(&m("good")));
    assert!(!models.is_active(&m("broken")));
    let st = models.statuses();
    let broken = st.iter().find(|s| s.model.id == "broken").unwrap();
    assert_eq!(broken.state, ModelState::Failed);
    assert!(
        broken
            .reason
            .as_deref()
            .unwrap()
            .contains("test inference failed")
    );
    let huge = st.iter().find(|s| s.model.id == "huge").unwrap();
    assert_eq!(huge.state, ModelState::Inactive);
    assert!(models.inactive_reason(&m("broken")).contains("failed"));
    // Still failing on the next pass: stays failed, gets no jobs.
    models
        .reconcile(&[m("good"), m("broken")], &[], &none, &rt)
        .await;
    assert!(!models.is_active(&m("broken")));
    // Dropped from the wanted set: inactive.
    models.reconcile(&[m("broken")], &[], &none, &rt).await;
    assert_eq!(
        models
            .statuses()
            .iter()
            .find(|s| s.model.id == "good")
            .unwrap()
            .state,
        ModelState::Inactive
    );
    // Fixed runtime: the model activates.
    s.set_faults(Faults::default()).await;
    models.reconcile(&[m("broken")], &[], &none, &rt).await;
    assert!(models.is_active(&m("broken")));
}

#[tokio::test]
async fn a_model_is_served_only_after_it_gives_its_known_answer() {
    use resultity_protocol::known_answer::KnownAnswer;
    use resultity_protocol::messages::common::SelfTest;
    use resultity_protocol::messages::{ModelRef, ModelState};
    use resultity_sidecar::models::{KnownAnswers, Models};
    let s = sim(fast(&["m1"])).await;
    let rt = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    let m1 = ModelRef {
        id: "m1".into(),
        revision: "r".into(),
    };
    let prompt = "The capital of France is";
    // What the simulator's deterministic decoder answers, computed, not copied.
    let (right, _) = generate("m1", prompt, 8);
    let answers = |text: &str| -> KnownAnswers {
        [(
            m1.clone(),
            KnownAnswer {
                kind: JobKind::Completion,
                request: json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
                expect: json!({"choices": [{"text": text}]}),
            },
        )]
        .into_iter()
        .collect()
    };
    let status = |models: &Models| {
        models
            .statuses()
            .into_iter()
            .find(|s| s.model == m1)
            .unwrap()
    };
    let want = [m1.clone()];
    let mut models = Models::default();
    models.reconcile(&want, &[], &answers(&right), &rt).await;
    assert!(models.is_active(&m1));
    assert_eq!(status(&models).self_test, Some(SelfTest::Passed));
    let served = s.stats().requests;

    // Same config again: the model is not tested again.
    models.reconcile(&want, &[], &answers(&right), &rt).await;
    assert_eq!(s.stats().requests, served);

    // A config whose known answer the runtime does not give: no more jobs for the model.
    models.reconcile(&want, &[], &answers(" Paris"), &rt).await;
    assert!(!models.is_active(&m1));
    let st = status(&models);
    assert_eq!(st.state, ModelState::Failed);
    assert_eq!(st.self_test, Some(SelfTest::Mismatch));
    let reason = st.reason.unwrap();
    assert!(reason.contains("choices[0].text is"), "{reason}");
    assert!(reason.contains(r#"expected " Paris""#), "{reason}");

    // The runtime fails the test request itself: an error, not a mismatch.
    s.set_faults(Faults {
        failing_models: vec!["m1".into()],
        ..Faults::default()
    })
    .await;
    models.reconcile(&want, &[], &answers(&right), &rt).await;
    assert!(!models.is_active(&m1));
    s.set_faults(Faults::default()).await;

    // Back to the right answer, then a config without one: served in both cases.
    models.reconcile(&want, &[], &answers(&right), &rt).await;
    assert!(models.is_active(&m1));
    models
        .reconcile(&want, &[], &KnownAnswers::default(), &rt)
        .await;
    assert!(models.is_active(&m1));
    assert_eq!(status(&models).self_test, None);
}

#[tokio::test]
async fn a_runtime_without_a_health_endpoint_becomes_ready() {
    // llama-cpp-python's server has no /health: listing models proves it is up.
    let s = sim(SimConfig {
        health_endpoint: false,
        ..fast(&["m1"])
    })
    .await;
    let rt = AnyRuntime::new(RuntimeKind::Openai, &s.url(), T).unwrap();
    rt.health().await.unwrap();
    let report = rt.report().await;
    assert!(report.ready, "{report:?}");
    assert_eq!(report.kind, RuntimeKind::Openai);
    // A configured path that does not exist falls back the same way…
    let custom = AnyRuntime::with_options(
        RuntimeKind::Openai,
        &s.url(),
        T,
        &RuntimeOptions {
            health_path: Some("/healthz".into()),
        },
    )
    .unwrap();
    assert!(custom.report().await.ready);
    // …but a server that answers its health endpoint with an error is not ready (no fallback
    // past a 5xx: llama-server answers 503 while it loads the model).
    let with_health = sim(fast(&["m1"])).await;
    with_health
        .set_faults(Faults {
            down: true,
            ..Faults::default()
        })
        .await;
    let down = AnyRuntime::new(RuntimeKind::Openai, &with_health.url(), T).unwrap();
    let report = down.report().await;
    assert!(!report.ready);
    assert!(report.reason.unwrap().contains("503"));
}

#[tokio::test]
async fn llama_cpp_metric_names_give_running_and_waiting() {
    let s = sim(SimConfig {
        flavor: Flavor::LlamaCpp,
        prefill_ms: 3_000,
        max_batch: 2,
        ..fast(&["m1"])
    })
    .await;
    let rt = AnyRuntime::new(RuntimeKind::Openai, &s.url(), Duration::from_secs(30)).unwrap();
    assert_eq!(rt.parallelism().await, Some(2), "slots from GET /props");
    let jobs: Vec<_> = (0..5)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.infer(
                    JobKind::Completion,
                    "m1",
                    &json!({"prompt": format!("p{i}"), "max_tokens": 3}),
                    Duration::from_secs(60),
                )
                .await
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = rt.report().await;
        assert!(r.ready, "{r:?}");
        if r.running == Some(2) && r.waiting == Some(3) {
            assert_eq!(r.reason, None, "load figures were found");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw 2 running and 3 waiting: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for j in jobs {
        j.await.unwrap().unwrap();
    }
    let r = rt.report().await;
    assert_eq!((r.running, r.waiting), (Some(0), Some(0)));
    assert_eq!(r.generation_tokens_total, Some(15));
    // vLLM reports no slots: the flag decides there.
    let v = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    assert_eq!(v.parallelism().await, None);
}

#[tokio::test]
async fn unknown_model_errors_name_the_runtime_kind() {
    let s = sim(fast(&["m1"])).await;
    let generic = AnyRuntime::new(RuntimeKind::Openai, &s.url(), T).unwrap();
    let Err(RuntimeError::Rejected { status, reason, .. }) = generic.load_model("ghost").await
    else {
        panic!("an unknown model must be refused");
    };
    assert_eq!(status, 404);
    assert_eq!(
        reason,
        "the OpenAI-compatible runtime does not serve model ghost (it serves: m1)"
    );
    let vllm = AnyRuntime::new(RuntimeKind::Vllm, &s.url(), T).unwrap();
    let Err(e) = vllm.load_model("ghost").await else {
        panic!("an unknown model must be refused");
    };
    assert!(
        e.to_string().contains("vLLM does not serve model ghost"),
        "{e}"
    );
    let Err(e) = generic.infer(JobKind::Infer, "m1", &json!({}), T).await else {
        panic!("KServe jobs are not for an OpenAI server");
    };
    assert_eq!(
        e.to_string(),
        "the OpenAI-compatible runtime does not serve KServe v2 inference jobs"
    );
}
