//! The running operator against an API server that accepts connections and never answers:
//! it must stop within its grace on the shutdown signal, and must not start its controllers
//! when the CRDs cannot be confirmed (the error names the server).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::time::Duration;

use resultity_operator::runtime::{RunConfig, RunError, run};
use resultity_operator::validate::Defaults;

/// A TCP server that accepts and then says nothing, like an API server behind a dead link.
async fn silent_api_server() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (url, task)
}

fn config(url: &str, crd_wait: Duration) -> RunConfig {
    RunConfig {
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        defaults: Defaults::default(),
        sidecar_timeout: Duration::from_secs(3),
        config_fetch_timeout: Duration::from_secs(3),
        namespace: None,
        leader: None,
        api_url: url.to_owned(),
        concurrency: 4,
        crd_wait,
        shutdown_grace: Duration::from_secs(2),
    }
}

fn client(url: &str) -> kube::Client {
    let mut c = kube::Config::new(url.parse().unwrap());
    c.accept_invalid_certs = true;
    kube::Client::try_from(c).unwrap()
}

#[tokio::test]
async fn stops_on_signal_while_the_api_server_does_not_answer() {
    let (url, _server) = silent_api_server().await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let running = tokio::spawn(run(
        client(&url),
        config(&url, Duration::from_secs(600)),
        shutdown,
    ));
    // Let it get stuck talking to the silent server, then signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !running.is_finished(),
        "it should still be waiting for the API server"
    );
    let signalled = tokio::time::Instant::now();
    tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("still running 30 s after the signal")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    // Well inside the 600 s CRD wait: the signal, not a timeout, ended it.
    assert!(signalled.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn crd_wait_failure_stops_before_the_controllers_and_names_the_server() {
    let (url, _server) = silent_api_server().await;
    let never = std::future::pending::<()>();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        run(client(&url), config(&url, Duration::from_secs(1)), never),
    )
    .await
    .expect("the CRD wait is bounded");
    match result {
        Err(e @ RunError::Crd { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&url), "{msg}");
            assert!(msg.contains("not established within 1s"), "{msg}");
        }
        other => panic!("expected a CRD error, got {other:?}"),
    }
}

/// The real binary against a kubeconfig naming a server that never answers, with each log
/// format and stderr piped: its start event and its final error (the CRDs cannot be
/// confirmed) are JSON lines that parse, or plain text; neither has an escape byte.
#[test]
fn binary_logs_are_json_lines_or_plain_text_into_a_pipe() {
    // Accepts connections into the backlog and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("https://{}", silent.local_addr().unwrap());
    let kubeconfig = std::env::temp_dir().join(format!(
        "resultity-operator-test-kubeconfig-{}-{}",
        std::process::id(),
        silent.local_addr().unwrap().port()
    ));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
             clusters: [{{name: t, cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: t, user: {{token: t}}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n"
        ),
    )
    .unwrap();
    for format in ["json", "text"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_resultity-operator"))
            .args([
                "run",
                "--admin-listen",
                "127.0.0.1:0",
                "--crd-wait-seconds",
                "1",
            ])
            .args(["--log-format", format])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
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
        if format == "text" {
            assert!(stderr.contains("resultity-operator starting"), "{stderr}");
            assert!(
                stderr.lines().last().unwrap().starts_with("error: "),
                "{stderr}"
            );
            continue;
        }
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let start = lines
            .iter()
            .find(|l| l["message"] == "resultity-operator starting")
            .unwrap();
        assert_eq!(start["level"], "INFO");
        assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
        assert!(start["api_server"].as_str().unwrap().starts_with(&server));
        let last = lines.last().unwrap();
        assert_eq!(last["level"], "ERROR");
        assert!(
            last["message"].as_str().unwrap().contains(&server[8..]),
            "the error names the server: {last}"
        );
    }
    let _ = std::fs::remove_file(&kubeconfig);
}
