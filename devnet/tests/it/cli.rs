//! The devnet's command-line contract, against the built binary: the `--json`
//! summary is the last stdout line with exactly the agreed keys and the exit status says
//! whether every job verified; `serve` prints its endpoint line and answers OpenAI requests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_resultity-devnet");

#[test]
fn json_summary_is_the_last_stdout_line_and_exit_status_reflects_it() {
    for runtime in ["vllm", "triton"] {
        let out = Command::new(BIN)
            .args(["--nodes", "2", "--jobs", "24", "--concurrency", "6"])
            .args(["--runtime", runtime, "--latency-ms", "5", "--json"])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{runtime}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap();
        let v: Value = serde_json::from_str(last).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "jobs_completed",
                "jobs_failed",
                "jobs_per_node",
                "jobs_per_s",
                "jobs_reassigned",
                "jobs_submitted",
                "messages_rejected",
                "p50_ms",
                "p99_ms",
                "signatures_verified"
            ]
        );
        assert_eq!(v["jobs_submitted"], 24);
        assert_eq!(v["jobs_completed"], 24);
        assert_eq!(v["signatures_verified"], 24);
        assert_eq!(v["jobs_failed"], 0);
        // Not a TTY: no progress bar escapes in the output.
        assert!(!String::from_utf8_lossy(&out.stderr).contains("\x1b["));
    }
}

/// One caller sending jobs one after another to 4 equal nodes: each serves a fair share
/// (100 of 400, ±35), not one node everything while the others idle.
#[test]
fn four_equal_nodes_share_400_sequential_jobs() {
    let out = Command::new(BIN)
        .args(["--nodes", "4", "--jobs", "400", "--concurrency", "1"])
        .args(["--latency-ms", "1", "--json"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let per_node = v["jobs_per_node"].as_object().unwrap();
    assert_eq!(per_node.len(), 4, "{v}");
    let total: u64 = per_node.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(total, 400, "{v}");
    for (node, jobs) in per_node {
        let jobs = jobs.as_u64().unwrap();
        assert!(
            (60..=140).contains(&jobs),
            "node {node} served {jobs} of 400: {v}"
        );
    }
    // The human summary lists the same nodes.
    for node in per_node.keys() {
        assert!(stdout.contains(node.as_str()), "{stdout}");
    }
}

#[test]
fn flags_fall_back_to_environment_variables() {
    let out = Command::new(BIN)
        .env("RESULTITY_DEVNET_NODES", "1")
        .env("RESULTITY_DEVNET_JOBS", "3")
        .env("RESULTITY_DEVNET_LATENCY_MS", "1")
        .env("RESULTITY_DEVNET_JSON", "true")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["jobs_submitted"], 3);
}

#[test]
fn bad_arguments_fail() {
    let out = Command::new(BIN).args(["--jobs", "0"]).output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve bound a non-loopback address");
}

/// A child process killed when the test ends, however it ends.
struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `resultity-devnet serve` with one node, `args` and a free loopback port; waits up to
/// 30 s for its first stdout line and returns the URL that follows `prefix` there.
fn serve(args: &[&str], prefix: &str) -> (Kill, String) {
    let mut child = Kill(
        Command::new(BIN)
            .args(["serve", "--nodes", "1", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let url = line
        .trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned();
    (child, url)
}

/// POSTs `body` as JSON to `url`, with a 10 s timeout.
async fn post(c: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    c.post(url)
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap()
}

fn chat_hi() -> Value {
    json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn serve_prints_its_endpoint_and_answers_an_openai_chat_completion() {
    let (child, base) = serve(&[], "OpenAI-compatible endpoint: ");
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{base}"
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth("unused")
        .json(&chat_hi())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-resultity-verified"], "true");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["choices"][0]["message"]["content"].is_string());
    drop(child);
}

/// A Triton network advertises the KServe v2 route its nodes answer, not an OpenAI endpoint,
/// and that route serves.
#[tokio::test]
async fn serve_with_triton_prints_the_kserve_endpoint_it_serves() {
    let (child, url) = serve(&["--runtime", "triton"], "KServe v2 endpoint: ");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/v2/models/tiny-chat/infer"),
        "{url}"
    );
    let c = reqwest::Client::new();
    let infer =
        json!({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]});
    let r = post(&c, &url, &infer).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-resultity-verified"], "true");
    // The OpenAI route is refused clearly, naming the model and the route that works.
    let base = url.split("/v2/").next().unwrap();
    let r = post(&c, &format!("{base}/v1/chat/completions"), &chat_hi()).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "model", "{e}");
    drop(child);
}

/// Every stderr line of a run with `--log-format json` parsed; no escape byte in any format
/// (stderr is a pipe here, and colour is for terminals).
fn log_lines(format: &str, stderr: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(stderr);
    assert!(
        !text.contains('\x1b'),
        "escape byte in {format} logs:\n{text}"
    );
    if format != "json" {
        return Vec::new();
    }
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn logs_are_json_lines_or_plain_text_into_a_pipe() {
    for format in ["json", "text"] {
        let out = Command::new(BIN)
            .args(["--nodes", "1", "--jobs", "2", "--latency-ms", "1"])
            .args(["--log", "info", "--log-format", format])
            .env_remove("NO_COLOR")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = log_lines(format, &out.stderr);
        if format == "text" {
            assert!(String::from_utf8_lossy(&out.stderr).contains(" INFO "));
            continue;
        }
        // The in-process IO service and sidecar log through the same subscriber.
        let registered = lines
            .iter()
            .find(|l| l["message"] == "node registered")
            .unwrap_or_else(|| panic!("no registration event: {lines:?}"));
        assert_eq!(registered["level"], "INFO");
        assert!(registered["node"].is_string(), "{registered}");
    }
}

#[test]
fn a_failing_run_ends_its_json_log_with_one_error_line() {
    let out = Command::new(BIN)
        .args(["--jobs", "0", "--log-format", "json"])
        .env_remove("RESULTITY_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines = log_lines("json", &out.stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR");
    assert_eq!(last["message"], "--jobs must be at least 1");
}

const BENCH: &str = env!("CARGO_BIN_EXE_resultity-bench");

/// The bench's internal IO server starts, logs, and stops as soon as its stdin closes.
#[test]
fn bench_logs_are_json_lines_or_plain_text_into_a_pipe() {
    for format in ["json", "text"] {
        let out = Command::new(BENCH)
            .args(["io-server", "--sessions", "1"])
            .env("RESULTITY_LOG", "info")
            .env("RESULTITY_LOG_FORMAT", format)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = log_lines(format, &out.stderr);
        if format == "json" {
            assert!(
                lines
                    .iter()
                    .any(|l| l["message"] == "resultity-io listening"),
                "{lines:?}"
            );
        } else {
            assert!(String::from_utf8_lossy(&out.stderr).contains("resultity-io listening"));
        }
    }
}

#[test]
fn bench_refuses_an_unknown_benchmark_name() {
    let out = Command::new(BENCH)
        .args(["--only", "p1,p9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("p9"));
}
