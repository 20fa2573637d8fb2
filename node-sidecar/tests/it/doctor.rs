//! `resultity-sidecar doctor` against the real reference IO service on loopback: a healthy
//! setup passes; a skewed clock, a wrong pinned key and an unreachable IO service each fail
//! with their own line and nothing else fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use resultity_io::{IoService, IoServiceHandle, Settings as IoSettings};
use resultity_protocol::clock::{Clock, SystemClock};
use resultity_protocol::messages::{GpuReport, Timing};
use resultity_protocol::{NetworkId, NetworkKeypair};
use resultity_sidecar::doctor::{DoctorSettings, Outcome, Report, diagnose};

use crate::common;

/// The system clock shifted by a fixed offset (a node whose NTP is broken).
#[derive(Debug)]
struct SkewedClock(i64);

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.0)
    }
}

async fn io() -> (IoServiceHandle, NetworkKeypair) {
    let key = NetworkKeypair::generate().unwrap();
    let s = IoSettings::new(
        NetworkId::parse("testnet").unwrap(),
        key.clone(),
        common::payload(Timing::default()),
    );
    (IoService::start(s).await.unwrap(), key)
}

fn settings(io_url: String, key: &NetworkKeypair) -> DoctorSettings {
    DoctorSettings {
        io_url,
        network_id: NetworkId::parse("testnet").unwrap(),
        network_keys: vec![key.id().clone()],
        max_clock_skew: Duration::from_secs(15),
        timeout: Duration::from_secs(10),
    }
}

/// Asserts exactly the checks in `failing` failed, each printed on its own line.
fn assert_only_failing(r: &Report, failing: &[&str]) {
    let text = r.to_string();
    for c in &r.checks {
        let expect_fail = failing.contains(&c.name);
        assert_eq!(
            c.outcome == Outcome::Fail,
            expect_fail,
            "check {} in report:\n{text}",
            c.name
        );
    }
    for name in failing {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(*name))
            .collect();
        assert_eq!(lines.len(), 1, "one FAIL line for {name} in:\n{text}");
    }
    assert_eq!(r.passed(), failing.is_empty(), "{text}");
}

#[tokio::test]
async fn healthy_setup_passes_every_check() {
    let (io, key) = io().await;
    let r = diagnose(
        &settings(io.base_url(), &key),
        &SystemClock,
        GpuReport::default,
    )
    .await
    .unwrap();
    assert_only_failing(&r, &[]);
    for name in ["io", "network", "clock", "config"] {
        assert_eq!(r.check(name).unwrap().outcome, Outcome::Pass, "{r}");
    }
    assert!(
        r.check("config").unwrap().detail.contains("version 1"),
        "{r}"
    );
    // No GPU in the test rig: reported, not failed.
    assert_eq!(r.check("gpu").unwrap().outcome, Outcome::Skip, "{r}");
}

#[tokio::test]
async fn skewed_clock_fails_the_clock_check_only() {
    let (io, key) = io().await;
    // Two minutes: well past the tolerated skew, inside the config's own validity margin,
    // so only the clock line may fail.
    let r = diagnose(
        &settings(io.base_url(), &key),
        &SkewedClock(120_000),
        GpuReport::default,
    )
    .await
    .unwrap();
    assert_only_failing(&r, &["clock"]);
    assert!(r.check("clock").unwrap().detail.contains("ahead of"), "{r}");
    let r = diagnose(
        &settings(io.base_url(), &key),
        &SkewedClock(-120_000),
        GpuReport::default,
    )
    .await
    .unwrap();
    assert_only_failing(&r, &["clock"]);
    assert!(r.check("clock").unwrap().detail.contains("behind"), "{r}");
}

#[tokio::test]
async fn wrong_pinned_key_fails_the_config_check_only() {
    let (io, _key) = io().await;
    let stranger = NetworkKeypair::generate().unwrap();
    let r = diagnose(
        &settings(io.base_url(), &stranger),
        &SystemClock,
        GpuReport::default,
    )
    .await
    .unwrap();
    assert_only_failing(&r, &["config"]);
    assert!(
        r.check("config").unwrap().detail.contains("not trusted"),
        "{r}"
    );
}

#[tokio::test]
async fn unreachable_io_fails_the_io_check_and_skips_what_depends_on_it() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let key = NetworkKeypair::generate().unwrap();
    let r = diagnose(
        &settings(format!("http://{addr}"), &key),
        &SystemClock,
        GpuReport::default,
    )
    .await
    .unwrap();
    assert_only_failing(&r, &["io"]);
    for name in ["network", "clock", "config"] {
        assert_eq!(r.check(name).unwrap().outcome, Outcome::Skip, "{r}");
    }
    assert!(r.check("io").unwrap().detail.contains("unreachable"), "{r}");
}

#[tokio::test]
async fn tls_to_a_plain_http_server_fails_the_io_check() {
    let (io, key) = io().await;
    let https = io.base_url().replacen("http://", "https://", 1);
    let r = diagnose(&settings(https, &key), &SystemClock, GpuReport::default)
        .await
        .unwrap();
    assert_only_failing(&r, &["io"]);
}

#[tokio::test]
async fn wrong_network_id_fails_the_network_check() {
    let (io, key) = io().await;
    let mut s = settings(io.base_url(), &key);
    s.network_id = NetworkId::parse("mainnet").unwrap();
    let r = diagnose(&s, &SystemClock, GpuReport::default)
        .await
        .unwrap();
    // The config names the network too, so its audience check fails as well: two causes
    // a user must both see (wrong IO URL or wrong --network-id).
    assert_only_failing(&r, &["network", "config"]);
}

/// The binary: one line per check, exit status 0 on success and 1 on a failed check.
#[tokio::test]
async fn binary_prints_one_line_per_check_and_sets_the_exit_status() {
    let (io, key) = io().await;
    let bin = env!("CARGO_BIN_EXE_resultity-sidecar");
    let run = |keys: String| {
        let url = io.base_url();
        tokio::task::spawn_blocking(move || {
            Command::new(bin)
                .args([
                    "doctor",
                    "--io-url",
                    &url,
                    "--network-id",
                    "testnet",
                    "--network-key",
                    &keys,
                    "--gpu-probe=false",
                ])
                .env_remove("RESULTITY_IO_URL")
                .output()
                .unwrap()
        })
    };
    let ok = run(key.id().to_string()).await.unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(names, ["io", "network", "clock", "config", "gpu"], "{out}");

    let wrong = NetworkKeypair::generate().unwrap();
    let bad = run(wrong.id().to_string()).await.unwrap();
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("FAIL")).count(),
        1,
        "{out}"
    );
}
