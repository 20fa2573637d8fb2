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

/// Nodes the IO service would route to, by node id.
async fn eligible_nodes(base: &str) -> Vec<String> {
    let Ok(r) = reqwest::get(format!("{base}/v1/nodes")).await else {
        return vec![];
    };
    let v: Value = r.json().await.unwrap_or_default();
    v["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter(|n| n["eligible"] == true)
                .filter_map(|n| n["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Nodes the IO service knows at all.
async fn known_nodes(base: &str) -> Vec<String> {
    let Ok(r) = reqwest::get(format!("{base}/v1/nodes")).await else {
        return vec![];
    };
    let v: Value = r.json().await.unwrap_or_default();
    v["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|n| n["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Longer than the drain timeout plus its bound, so a drain that waits for the job overruns.
const LONG_JOB_MS: u64 = 7_000;
/// Drain timeout of node "a" (seconds), and what the drain may take beyond it.
const DRAIN_TIMEOUT_S: u64 = 1;
const DRAIN_BOUND: Duration = Duration::from_secs(5);

/// A sidecar process with a drain timeout of [`DRAIN_TIMEOUT_S`], its state directory, admin
/// port and node id.
struct Proc {
    child: Sidecar,
    dir: std::path::PathBuf,
    port: u16,
    id: String,
}

/// Starts a sidecar on `dir` and `port` as pod `pod_uid`.
fn start_node(net: &Loopback, dir: &std::path::Path, port: u16, pod_uid: &str) -> Sidecar {
    let mut cmd = sidecar_command(&net.base, &net.key, &net.runtime.url(), dir, port);
    let child = cmd
        .arg(format!("--drain-timeout-seconds={DRAIN_TIMEOUT_S}"))
        .env("RESULTITY_POD_UID", pod_uid)
        .env("RESULTITY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Sidecar(child)
}

/// The node id a sidecar on `port` reports, once its local API answers (at most 20 s).
async fn node_id_on(port: u16) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(id) = status(port)
            .await
            .and_then(|s| s["node_id"].as_str().map(str::to_owned))
        {
            return id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar's status never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Jobs a sidecar on `port` runs now.
async fn in_flight(port: u16) -> u64 {
    status(port)
        .await
        .and_then(|s| s["jobs"]["in_flight"].as_u64())
        .unwrap_or(0)
}

/// Two routable sidecars (pods "pod-x" and "pod-y") and one job of [`LONG_JOB_MS`]: returns
/// the one running it (`a`), the other, and the caller's pending answer. (A node started
/// after the job would still be testing its model when the job ends: that test takes as
/// long.)
async fn long_job_on_a(net: &Loopback) -> (Proc, Proc, tokio::task::JoinHandle<(u16, Value)>) {
    let mut nodes = Vec::new();
    for (name, port, pod) in [("x", net.port, "pod-x"), ("y", free_port(), "pod-y")] {
        let dir = net.node_dir.with_file_name(format!("node-{name}"));
        let child = start_node(net, &dir, port, pod);
        let id = node_id_on(port).await;
        nodes.push(Proc {
            child,
            dir,
            port,
            id,
        });
    }
    wait_until("both nodes eligible", || async {
        eligible_nodes(&net.base).await.len() == 2
    })
    .await;
    let call = complete(&net.base, "long");
    let (px, py) = (nodes[0].port, nodes[1].port);
    wait_until("the job running on a node", || async move {
        in_flight(px).await + in_flight(py).await == 1
    })
    .await;
    let y = nodes.pop().unwrap();
    let x = nodes.pop().unwrap();
    if in_flight(x.port).await == 1 {
        (x, y, call)
    } else {
        (y, x, call)
    }
}

/// Waits for `child` to exit (at most 30 s); returns its status and how long it took from
/// `since`.
async fn exit_of(
    child: &mut Sidecar,
    since: tokio::time::Instant,
) -> (std::process::ExitStatus, Duration) {
    let deadline = since + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return (status, since.elapsed());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sigterm(child: &Sidecar) {
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn sigterm_hands_a_job_longer_than_the_drain_timeout_back_and_exits_zero() {
    let net = loopback(LONG_JOB_MS).await;
    let (mut a, _b, call) = long_job_on_a(&net).await;
    assert_eq!(in_flight(a.port).await, 1, "the job ended before the drain");
    let started = tokio::time::Instant::now();
    sigterm(&a.child);
    let (exit, took) = exit_of(&mut a.child, started).await;
    assert!(exit.success(), "exit status {exit}");
    assert!(
        took < Duration::from_secs(DRAIN_TIMEOUT_S) + DRAIN_BOUND,
        "SIGTERM drain took {took:?} with a {DRAIN_TIMEOUT_S} s drain timeout"
    );
    // The job went back and the other node answered it; the drained node left the network.
    let (code, body) = call.await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!known_nodes(&net.base).await.contains(&a.id));
    net.io.shutdown().await;
}

/// The pod's preStop hook: `resultity-sidecar drain` on the sidecar's admin port (not the
/// default 9090) ends within the drain timeout plus its bound with the job handed back; the
/// same pod's container restarted on the same state stays out of the network, a new pod
/// joins.
#[tokio::test]
async fn prestop_drain_on_the_admin_port_hands_back_and_a_restart_stays_drained() {
    let net = loopback(LONG_JOB_MS).await;
    let (mut a, _b, call) = long_job_on_a(&net).await;
    assert_ne!(a.port, 9090);
    let mut hook = Command::new(env!("CARGO_BIN_EXE_resultity-sidecar"));
    hook.args(["drain", "--wait", "--deregister"])
        .arg(format!("--url=http://127.0.0.1:{}", a.port))
        .arg(format!(
            "--admin-token-file={}",
            a.dir.join("token").display()
        ))
        .arg(format!("--timeout-seconds={}", DRAIN_TIMEOUT_S + 5))
        .env("RESULTITY_LOG", "warn");
    assert_eq!(in_flight(a.port).await, 1, "the job ended before the drain");
    let started = tokio::time::Instant::now();
    // Off the test's runtime thread, which also serves the IO service.
    let out = tokio::task::spawn_blocking(move || hook.output())
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "preStop failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(DRAIN_TIMEOUT_S) + DRAIN_BOUND,
        "preStop drain took {took:?} with a {DRAIN_TIMEOUT_S} s drain timeout"
    );
    let (code, body) = call.await.unwrap();
    assert_eq!(code, 200, "{body}");
    let st = status(a.port).await.unwrap();
    assert_eq!(st["phase"], "Drained", "{st}");
    assert_eq!(st["registered"], false, "{st}");
    assert_eq!(st["connection"]["state"], "Disconnected", "{st}");
    assert_eq!(st["jobs"]["handed_back"], 1, "{st}");
    assert!(!known_nodes(&net.base).await.contains(&a.id));
    // Then the kubelet's SIGTERM: already drained, it exits at once.
    let started = tokio::time::Instant::now();
    sigterm(&a.child);
    let (exit, _) = exit_of(&mut a.child, started).await;
    assert!(exit.success(), "exit status {exit}");

    // The same pod's container restarts on the same state: drained, not rejoining. Watched
    // for 2 s (a fresh start registers within milliseconds here).
    let pod = if a.port == net.port { "pod-x" } else { "pod-y" };
    let again = start_node(&net, &a.dir, a.port, pod);
    assert_eq!(node_id_on(a.port).await, a.id);
    let st = status(a.port).await.unwrap();
    assert_eq!(st["phase"], "Drained", "{st}");
    assert_eq!(st["drained"], true, "{st}");
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch_until {
        assert!(
            !known_nodes(&net.base).await.contains(&a.id),
            "the restarted container rejoined the network"
        );
        let st = status(a.port).await.unwrap();
        assert_eq!(st["registered"], false, "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(again);
    // A new pod on the same volume starts fresh and joins.
    let _fresh = start_node(&net, &a.dir, a.port, "pod-new");
    wait_until("the new pod's node eligible", || async {
        eligible_nodes(&net.base).await.contains(&a.id)
    })
    .await;
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
