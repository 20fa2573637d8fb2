//! Config publication: signed, chained, served, announced to sessions and reflected in
//! heartbeat answers; admin endpoints and the command line.
// Helpers outside #[test] fns unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use resultity_protocol::config::{ApprovedModel, ConfigTrust, ConfigVerdict, SignedConfig};
use resultity_protocol::messages::http::{ConfigDigestResponse, paths};
use resultity_protocol::messages::ws::NetworkMessage;
use resultity_protocol::messages::{ModelRef, RuntimeKind};
use resultity_protocol::{ErrorCode, NetworkKeypair};

const TOKEN: &str = "s3cret-admin-token";

async fn served_config(base: &str) -> SignedConfig {
    let text = http()
        .get(format!("{base}{}", paths::CONFIG))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    SignedConfig::decode(text.as_bytes()).unwrap()
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let nonce = resultity_protocol::replay::new_nonce().unwrap();
    std::env::temp_dir().join(format!("resultity-io-test-{}-{name}", &nonce[..8]))
}

#[tokio::test]
async fn published_config_reaches_nodes_and_verifies_with_the_network_key() {
    let io = start(|s| s.admin_token = Some(TOKEN.into())).await;
    let st = io.state();
    let base = io.base_url();
    let node = TestNode::new(&io, 1);
    let mut ws = node.join().await;
    let v1 = served_config(&base).await;
    let hb = node.heartbeat().await;
    assert_eq!(hb.config.as_ref().unwrap().digest, *v1.digest());

    let mut payload = payload();
    payload.models.push(ApprovedModel {
        model: ModelRef {
            id: "acme/other".into(),
            revision: "r9".into(),
        },
        runtimes: vec![RuntimeKind::Triton],
        min_gpu_memory_mib: 0,
        subclouds: vec![],
        known_answer: None,
    });
    payload.network_keys = vec![st.settings.network_key.id().clone()];
    let c = http();
    // Without the token: refused, nothing published.
    let resp = c
        .post(format!("{base}/v1/admin/config"))
        .json(&payload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(served_config(&base).await.digest(), v1.digest());

    let resp = c
        .post(format!("{base}/v1/admin/config"))
        .bearer_auth(TOKEN)
        .json(&payload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["config"]["version"], 2);

    // Connected nodes are told at once.
    let announced = loop {
        match ws.recv().await {
            Ok(NetworkMessage::ConfigAvailable(p)) => break p,
            Ok(_) => continue,
            Err(c) => panic!("closed {c:?}"),
        }
    };
    assert_eq!(announced.version, 2);

    // The next heartbeat answer carries the new digest; the old snapshot is no longer served.
    let v2 = served_config(&base).await;
    assert_ne!(v2.digest(), v1.digest());
    let hb = node.heartbeat().await;
    assert_eq!(hb.config.unwrap(), announced);
    assert_eq!(&announced.digest, v2.digest());
    let digest: ConfigDigestResponse = c
        .get(format!("{base}{}", paths::CONFIG_DIGEST))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(digest.config.unwrap(), announced);

    // A node pinning the network key accepts v1 then v2 (signature, expiry, version, chain).
    let mut trust = ConfigTrust::pinned(
        st.settings.network_id.clone(),
        vec![st.settings.network_key.id().clone()],
    );
    let now = now_ms();
    let ConfigVerdict::New(first) = trust.verify(&v1, now).unwrap() else {
        panic!("v1 not new")
    };
    trust.apply(&first);
    let ConfigVerdict::New(second) = trust.verify(&v2, now).unwrap() else {
        panic!("v2 not new")
    };
    assert_eq!(second.snapshot.version, 2);
    assert_eq!(second.snapshot.prev_digest.as_ref(), Some(v1.digest()));
    assert!(second.snapshot.expires_at_ms > now);
    assert_eq!(second.snapshot.payload.models.len(), 2);
    trust.apply(&second);
    // Rollback to v1 is refused by the node side.
    assert!(trust.verify(&v1, now).is_err());

    // A payload naming only other keys is refused (nodes would reject what follows).
    let mut bad = payload.clone();
    bad.network_keys = vec![NetworkKeypair::generate().unwrap().id().clone()];
    let resp = c
        .post(format!("{base}/v1/admin/config"))
        .bearer_auth(TOKEN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(served_config(&base).await.digest(), v2.digest());
    assert_eq!(st.metrics.configs_published.get(), 2);
    io.shutdown().await;
}

#[tokio::test]
async fn reload_publishes_only_when_the_source_file_changed() {
    let path = temp_path("network.yaml");
    std::fs::write(&path, serde_norway::to_string(&payload()).unwrap()).unwrap();
    let p = path.clone();
    let io = start(move |s| {
        s.admin_token = Some(TOKEN.into());
        s.config_source = Some(p);
    })
    .await;
    let reload = || async {
        let resp = http()
            .post(format!("{}/v1/admin/config/reload", io.base_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.unwrap()
    };
    let unchanged = reload().await;
    assert_eq!(unchanged["published"], false);
    assert_eq!(unchanged["config"]["version"], 1);

    let mut changed = payload();
    changed.models[0].min_gpu_memory_mib = 1;
    std::fs::write(&path, serde_norway::to_string(&changed).unwrap()).unwrap();
    let r = reload().await;
    assert_eq!(r["published"], true);
    assert_eq!(r["config"]["version"], 2);
    let served = served_config(&io.base_url())
        .await
        .parse_unverified()
        .unwrap();
    assert_eq!(served.payload.models[0].min_gpu_memory_mib, 1);

    // Broken file: refused, the current config stays.
    std::fs::write(&path, "models: [").unwrap();
    let resp = http()
        .post(format!("{}/v1/admin/config/reload", io.base_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], ErrorCode::Malformed.as_str());
    assert_eq!(io.state().published().snapshot.version, 2);
    let _ = std::fs::remove_file(&path);
    io.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_do_not_exist_without_a_token() {
    let io = start(|_| {}).await;
    let resp = http()
        .post(format!("{}/v1/admin/config", io.base_url()))
        .bearer_auth("anything")
        .json(&payload())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    io.shutdown().await;
}

/// Stops the child service even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn command_line_keygen_serve_and_publish() {
    use std::io::BufRead;
    let bin = env!("CARGO_BIN_EXE_resultity-io");
    let key_path = temp_path("network.key");
    let out = std::process::Command::new(bin)
        .args(["keygen", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&key_path).unwrap();
    let key = NetworkKeypair::from_key_file_text(text.trim()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        key.id().as_str()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Refuses to overwrite a key.
    let again = std::process::Command::new(bin)
        .args(["keygen", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let cfg_path = temp_path("network.json");
    std::fs::write(&cfg_path, serde_json::to_string(&payload()).unwrap()).unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--network-id",
                "clinet",
                "--log",
                "warn",
            ])
            .arg("--key-file")
            .arg(&key_path)
            .arg("--config-file")
            .arg(&cfg_path)
            .env("RESULTITY_IO_ADMIN_TOKEN", TOKEN)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), line)
        .await
        .unwrap()
        .unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    let health: serde_json::Value = http()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");

    let mut changed = payload();
    changed.timing.heartbeat_interval_ms = 1234;
    std::fs::write(&cfg_path, serde_json::to_string(&changed).unwrap()).unwrap();
    let (p, b) = (cfg_path.clone(), base.clone());
    let publish = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["config", "publish"])
            .arg(&p)
            .args(["--url", &b, "--admin-token", TOKEN])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        publish.status.success(),
        "{}",
        String::from_utf8_lossy(&publish.stderr)
    );
    let served = served_config(&base).await;
    let snapshot = served.parse_unverified().unwrap();
    assert_eq!(snapshot.version, 2);
    assert_eq!(snapshot.payload.timing.heartbeat_interval_ms, 1234);
    assert_eq!(served.signer(), key.id().as_str());

    drop(child);
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&cfg_path);
}

/// `serve` with each log format and stderr piped, until the listening event, then killed:
/// every JSON line parses and the event carries its fields; neither format writes an escape
/// byte into a pipe (colour is for terminals).
#[test]
fn command_line_logs_are_json_lines_or_plain_text_into_a_pipe() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_resultity-io");
    let key_path = temp_path("log-network.key");
    let key = NetworkKeypair::generate().unwrap();
    std::fs::write(&key_path, key.to_key_file_text()).unwrap();
    let cfg_path = temp_path("log-network.json");
    std::fs::write(&cfg_path, serde_json::to_string(&payload()).unwrap()).unwrap();
    for format in ["json", "text"] {
        let mut child = KillOnDrop(
            Command::new(bin)
                // Before the subcommand here, after it for --log: both places work.
                .args(["--log-format", format, "serve", "--log", "info"])
                .args(["--listen", "127.0.0.1:0", "--network-id", "clinet"])
                .arg("--key-file")
                .arg(&key_path)
                .arg("--config-file")
                .arg(&cfg_path)
                .env_remove("NO_COLOR")
                .env_remove("RESULTITY_LOG")
                .env_remove("RESULTITY_LOG_FORMAT")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stderr = child.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !lines
            .iter()
            .any(|l: &String| l.contains("resultity-io listening"))
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => panic!("no listening event in {format}:\n{}", lines.join("\n")),
            }
        }
        drop(child);
        // The pipe closes with the process, which ends the reader.
        lines.extend(rx.iter());
        let text = lines.join("\n");
        assert!(
            !text.contains('\x1b'),
            "escape byte in {format} logs:\n{text}"
        );
        if format == "text" {
            assert!(text.contains(" INFO "), "{text}");
            continue;
        }
        let events: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let listening = events
            .iter()
            .find(|e| e["message"] == "resultity-io listening")
            .unwrap();
        assert_eq!(listening["level"], "INFO");
        assert_eq!(listening["network"], "clinet");
        assert_eq!(listening["key"], key.id().as_str());
        assert!(
            listening["local_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
    }
    let _ = std::fs::remove_file(&key_path);
    let _ = std::fs::remove_file(&cfg_path);
}

/// A bad filter is reported once, in the chosen format, and the service does not start.
#[test]
fn a_bad_log_filter_is_one_json_error_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resultity-io"))
        .args(["keygen", "--out", "/nonexistent/never-written.key"])
        .args(["--log", "resultity=loud", "--log-format", "json"])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(line["level"], "ERROR");
    let message = line["message"].as_str().unwrap();
    assert!(
        message.starts_with("invalid log filter \"resultity=loud\""),
        "{message}"
    );
    assert_eq!(
        message.matches("invalid log filter").count(),
        1,
        "{message}"
    );
}

#[tokio::test]
async fn a_restart_continues_the_version_chain_from_the_state_file() {
    let state = temp_path("config-state.json");
    let key = NetworkKeypair::generate().unwrap();
    let (k1, s1) = (key.clone(), state.clone());
    let io = start(move |s| {
        s.network_key = k1;
        s.config_state = Some(s1);
    })
    .await;
    let mut payload = payload();
    payload.models[0].min_gpu_memory_mib = 2;
    io.state().publish(payload.clone()).unwrap();
    let v2 = io.state().published();
    assert_eq!(v2.snapshot.version, 2);
    io.shutdown().await;

    // Same payload: the stored snapshot is served as is.
    let (k2, s2, p2) = (key.clone(), state.clone(), payload.clone());
    let io = start(move |s| {
        s.network_key = k2;
        s.config_state = Some(s2);
        s.network_config = p2;
    })
    .await;
    assert_eq!(io.state().published().signed.digest(), v2.signed.digest());
    io.shutdown().await;

    // Changed payload: version 3, chained to 2.
    let (k3, s3) = (key.clone(), state.clone());
    let io = start(move |s| {
        s.network_key = k3;
        s.config_state = Some(s3);
    })
    .await;
    let v3 = io.state().published();
    assert_eq!(v3.snapshot.version, 3);
    assert_eq!(v3.snapshot.prev_digest.as_ref(), Some(v2.signed.digest()));
    io.shutdown().await;

    // A state file signed by another key is refused at start.
    let other = NetworkKeypair::generate().unwrap();
    let s4 = state.clone();
    let mut settings = resultity_io::Settings::new(v3.snapshot.network_id.clone(), other, payload);
    settings.config_state = Some(s4);
    assert!(resultity_io::IoService::start(settings).await.is_err());
    let _ = std::fs::remove_file(&state);
}
