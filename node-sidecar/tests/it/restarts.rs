//! Crash and restart behaviour: the sidecar *process* killed mid-job and restarted, and the IO
//! service restarted under a connected sidecar. Real processes and servers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::NetworkKeypair;
use resultity_protocol::config::NetworkConfig;
use resultity_protocol::messages::Timing;
use resultity_runtime_sim::{SimConfig, SimHandle, generate};
use serde_json::{Value, json};

use crate::common;
use common::MODEL;

fn payload() -> NetworkConfig {
    common::payload(Timing {
        ack_timeout_ms: 2_000,
        backoff_cap_ms: 300,
        resume_window_ms: 20_000,
        ..common::quick_timing()
    })
}

fn io_settings(
    key: &NetworkKeypair,
    listen: std::net::SocketAddr,
    state: &std::path::Path,
) -> IoSettings {
    let mut s = common::io_settings(key, payload());
    s.listen = listen;
    s.config_state = Some(state.to_owned());
    s.scheduler.attempt_timeout_ms = 20_000;
    s.scheduler.request_timeout_ms = 30_000;
    s
}

async fn sim(prefill_ms: u64) -> SimHandle {
    common::start_sim(SimConfig {
        prefill_ms,
        ..common::instant_runtime()
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(
    io: &str,
    key: &NetworkKeypair,
    sim: &str,
    dir: &std::path::Path,
    api_port: u16,
) -> Sidecar {
    let child = sidecar_command(io, key, sim, dir, api_port)
        .env("RESULTITY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Sidecar(child)
}

/// The sidecar's `run` command against this network, stdio not yet chosen.
fn sidecar_command(
    io: &str,
    key: &NetworkKeypair,
    sim: &str,
    dir: &std::path::Path,
    api_port: u16,
) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("token"), "token").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_resultity-sidecar"));
    cmd.arg("run")
        .args([
            "--io-endpoint",
            io,
            "--network-id",
            "testnet",
            "--network-key",
            key.id().as_str(),
        ])
        .args([
            "--runtime-url",
            sim,
            "--max-concurrency",
            "4",
            "--gpu-probe",
            "false",
            "--enforce-gpu-memory",
            "false",
        ])
        .arg(format!(
            "--identity-file={}",
            dir.join("node.key").display()
        ))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg(format!(
            "--admin-token-file={}",
            dir.join("token").display()
        ))
        .arg(format!("--listen=127.0.0.1:{api_port}"));
    cmd
}

/// Runs `cmd` with stderr piped until a stderr line contains `wanted` (at most 20 s), then
/// kills it; returns everything it wrote to stderr.
async fn stderr_until(mut cmd: Command, wanted: &str) -> Vec<u8> {
    let mut child = Sidecar(cmd.stderr(Stdio::piped()).spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // A blocking reader on its own thread: the test's runtime also runs the IO service.
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stderr);
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut reader, b'\n', &mut line) {
                Ok(n) if n > 0 && tx.send(line).is_ok() => {}
                _ => break,
            }
        }
    });
    let mut out = Vec::new();
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            out.extend_from_slice(&line);
            if String::from_utf8_lossy(&line).contains(wanted) {
                return true;
            }
        }
        false
    })
    .await;
    drop(child);
    // The pipe closes with the process, which ends the reader.
    while let Some(line) = rx.recv().await {
        out.extend_from_slice(&line);
    }
    assert!(
        matches!(seen, Ok(true)),
        "no stderr line with {wanted:?}:\n{}",
        String::from_utf8_lossy(&out)
    );
    out
}

/// Polls `cond` every 20 ms for up to 20 s.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, cond: impl FnMut() -> F) {
    common::wait_until(what, Duration::from_secs(20), cond).await;
}

/// An IO service on a free loopback port, a runtime whose prefill takes `prefill_ms`, and a
/// state directory and API port for one sidecar process.
struct Loopback {
    key: NetworkKeypair,
    /// Holds the state directories until the test ends.
    _dir: tempfile::TempDir,
    io: IoServiceHandle,
    base: String,
    runtime: SimHandle,
    port: u16,
    node_dir: std::path::PathBuf,
}

async fn loopback(prefill_ms: u64) -> Loopback {
    let key = NetworkKeypair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let io = IoService::start(io_settings(
        &key,
        "127.0.0.1:0".parse().unwrap(),
        &dir.path().join("io-state.json"),
    ))
    .await
    .unwrap();
    let node_dir = dir.path().join("node");
    Loopback {
        base: io.base_url(),
        runtime: sim(prefill_ms).await,
        port: free_port(),
        key,
        _dir: dir,
        io,
        node_dir,
    }
}

impl Loopback {
    /// Starts the sidecar process against this network.
    fn sidecar(&self) -> Sidecar {
        sidecar(
            &self.base,
            &self.key,
            &self.runtime.url(),
            &self.node_dir,
            self.port,
        )
    }
}

async fn eligible(base: &str) -> bool {
    match reqwest::get(format!("{base}/v1/models")).await {
        Ok(r) => r
            .json::<Value>()
            .await
            .is_ok_and(|v| v["data"].as_array().is_some_and(|d| !d.is_empty())),
        Err(_) => false,
    }
}

async fn status(port: u16) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/status"))
        .bearer_auth("token")
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

fn complete(base: &str, prompt: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = format!("{base}/v1/completions");
    let prompt = prompt.to_owned();
    tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(url)
            .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 6}))
            .timeout(Duration::from_secs(40))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    })
}

#[tokio::test]
async fn sidecar_killed_mid_job_restarts_and_the_job_completes_once() {
    let net = loopback(1_500).await;
    let first = net.sidecar();
    wait_until("node eligible", || eligible(&net.base)).await;

    let call = complete(&net.base, "survive a crash");
    wait_until("job running in the runtime", || async {
        net.runtime.stats().running == 1
    })
    .await;
    drop(first); // SIGKILL mid-job: the result was never produced.

    let _second = net.sidecar();
    let (code, body) = call.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["choices"][0]["text"],
        generate(MODEL, "survive a crash", 6).0
    );
    // Delivered once: the caller got one answer, the restarted node's outbox is confirmed empty.
    wait_until("outbox drained", || async {
        status(net.port)
            .await
            .is_some_and(|s| s["jobs"]["outbox"] == 0 && s["jobs"]["completed"] == 1)
    })
    .await;
    net.io.shutdown().await;
}

#[tokio::test]
async fn io_service_restart_reconnects_and_loses_nothing() {
    let key = NetworkKeypair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("io-state.json");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let io = IoService::start(io_settings(&key, addr, &state))
        .await
        .unwrap();
    let base = io.base_url();
    let runtime = sim(0).await;
    let port = free_port();
    let _node = sidecar(&base, &key, &runtime.url(), &dir.path().join("node"), port);
    wait_until("node eligible", || eligible(&base)).await;
    let (code, _) = complete(&base, "before").await.unwrap();
    assert_eq!(code, 200);

    io.shutdown().await;
    wait_until("node notices the outage", || async {
        status(port)
            .await
            .is_some_and(|s| s["connection"]["state"] != "Connected")
    })
    .await;
    let io: IoServiceHandle = IoService::start(io_settings(&key, addr, &state))
        .await
        .unwrap();
    wait_until("node back and eligible", || eligible(&base)).await;
    let st = status(port).await.unwrap();
    assert!(
        st["connection"]["reconnects"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert_eq!(st["connection"]["state"], "Connected");
    // The restarted network continued its config chain, so the node kept its config.
    assert!(st["config_error"].is_null(), "{st}");
    for i in 0..5 {
        let (code, body) = complete(&base, &format!("after {i}")).await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    wait_until("every result confirmed", || async {
        status(port)
            .await
            .is_some_and(|s| s["jobs"]["outbox"] == 0 && s["jobs"]["completed"] == 6)
    })
    .await;
    io.shutdown().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let net = loopback(800).await;
    let mut node = net.sidecar();
    wait_until("node eligible", || eligible(&net.base)).await;
    let calls: Vec<_> = (0..3)
        .map(|i| complete(&net.base, &format!("term {i}")))
        .collect();
    wait_until("three jobs running", || async {
        net.runtime.stats().running == 3
    })
    .await;
    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sidecar did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    for c in calls {
        let (code, body) = c.await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // Nothing left in the outbox on disk.
    let left: Vec<_> = std::fs::read_dir(net.node_dir.join("state/outbox"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "outbox not empty: {left:?}");
    net.io.shutdown().await;
}

/// The real sidecar with each log format, chosen by the environment variables, and stderr
/// piped, until it has registered: every JSON line parses and the registration event carries
/// its fields; neither format writes an escape byte into a pipe (colour is for terminals).
#[tokio::test]
async fn logs_are_json_lines_or_plain_text_into_a_pipe() {
    let net = loopback(0).await;
    for format in ["json", "text"] {
        let mut cmd = sidecar_command(
            &net.base,
            &net.key,
            &net.runtime.url(),
            &net.node_dir,
            net.port,
        );
        cmd.env("RESULTITY_LOG_FORMAT", format)
            .env("RESULTITY_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null());
        // The event itself, not the readiness warning "not registered with the network".
        let wanted = match format {
            "json" => r#""message":"registered with the network""#,
            _ => ": registered with the network",
        };
        let stderr = stderr_until(cmd, wanted).await;
        let text = String::from_utf8(stderr).unwrap();
        assert!(
            !text.contains('\x1b'),
            "escape byte in {format} logs:\n{text}"
        );
        if format == "text" {
            assert!(text.contains(" INFO "), "{text}");
            continue;
        }
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let registered = lines
            .iter()
            .find(|l| l["message"] == "registered with the network")
            .unwrap_or_else(|| panic!("no registration event:\n{text}"));
        assert_eq!(registered["level"], "INFO");
        assert!(registered["node_id"].is_string(), "{registered}");
        assert!(registered["protocol"].is_number(), "{registered}");
    }
}
