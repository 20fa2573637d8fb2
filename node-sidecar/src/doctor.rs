//! `resultity-sidecar doctor`: a preflight a user (or `helm test`) runs before trusting a node.
//! Each check prints one line; any failure makes the command exit non-zero.
//!
//! Checks, in order: the IO service answers (and its TLS certificate verifies when the URL is
//! `https`), it serves the expected network, the local clock agrees with the IO service's
//! server time, the network's signed config verifies with the pinned keys, and — when NVML
//! sees a GPU — every GPU is healthy. A check that cannot run because an earlier one failed
//! says so instead of failing again, so every cause is reported once.

use std::fmt;
use std::time::{Duration, Instant};

use resultity_protocol::clock::Clock;
use resultity_protocol::config::{ConfigTrust, ConfigVerdict, SignedConfig};
use resultity_protocol::messages::GpuReport;
use resultity_protocol::messages::http::{ConfigDigestResponse, paths};
use resultity_protocol::{NetworkId, NetworkKeyId, error_chain, limits};

/// What the doctor checks against.
#[derive(Debug, Clone)]
pub struct DoctorSettings {
    pub io_url: String,
    pub network_id: NetworkId,
    pub network_keys: Vec<NetworkKeyId>,
    /// Largest tolerated difference between the local clock and the IO service's.
    pub max_clock_skew: Duration,
    /// Timeout of each call to the IO service.
    pub timeout: Duration,
}

/// Default tolerated clock skew: half the protocol's request window, so a node that passes
/// still has room for network latency and drift before its signed requests are refused.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = limits::HTTP_SKEW_MS / 2;

/// Result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not applicable here (no GPU visible) or not checkable because an earlier check failed.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable short name: `io`, `network`, `clock`, `config`, `gpu`.
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        write!(f, "{tag} {:<8}{}", self.name, self.detail)
    }
}

/// Every check's result, in the order run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when no check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    /// The check named `name`, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    fn push(&mut self, name: &'static str, outcome: Outcome, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            outcome,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{c}")?;
        }
        Ok(())
    }
}

/// Why the doctor could not even start.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Runs every check. `gpu` is called only for the GPU check (tests pass a fixed report; the
/// binary reads NVML).
pub async fn diagnose(
    settings: &DoctorSettings,
    clock: &dyn Clock,
    gpu: impl FnOnce() -> GpuReport,
) -> Result<Report, DoctorError> {
    let http = reqwest::Client::builder()
        .connect_timeout(settings.timeout)
        .timeout(settings.timeout)
        .build()
        .map_err(|e| DoctorError::Client(error_chain(&e)))?;
    let base = settings.io_url.trim_end_matches('/');
    let tls = base.starts_with("https://");
    let mut report = Report::default();

    // IO reachability (and TLS), with the server time bracketed by two local readings.
    let url = format!("{base}{}", paths::CONFIG_DIGEST);
    let before = clock.now_ms();
    let started = Instant::now();
    let digest = fetch_bounded(&http, &url).await;
    let rtt = started.elapsed();
    let after = clock.now_ms();
    let digest = match digest.and_then(|(status, body)| {
        if !(200..300).contains(&status) {
            return Err(format!("{url} answered HTTP {status}"));
        }
        serde_json::from_slice::<ConfigDigestResponse>(&body)
            .map_err(|e| format!("{url} did not answer a config digest document: {e}"))
    }) {
        Ok(d) => {
            let transport = if tls {
                "TLS certificate verified"
            } else {
                "plain HTTP, no TLS"
            };
            report.push(
                "io",
                Outcome::Pass,
                format!("{base} answered in {} ms ({transport})", rtt.as_millis()),
            );
            d
        }
        Err(e) => {
            report.push("io", Outcome::Fail, e);
            for name in ["network", "clock", "config"] {
                report.push(
                    name,
                    Outcome::Skip,
                    "not checked: the IO service is unreachable",
                );
            }
            gpu_check(&mut report, gpu());
            return Ok(report);
        }
    };

    if digest.network_id == settings.network_id {
        report.push(
            "network",
            Outcome::Pass,
            format!("the IO service serves {}", settings.network_id),
        );
    } else {
        report.push(
            "network",
            Outcome::Fail,
            format!(
                "the IO service serves {}, not {}",
                digest.network_id, settings.network_id
            ),
        );
    }

    // The server read its clock somewhere between our two readings: compare with the middle.
    let local_mid = before + after.saturating_sub(before) / 2;
    let skew_ms = i128::from(local_mid) - i128::from(digest.server_time_ms);
    let max = settings.max_clock_skew.as_millis();
    let ahead = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let detail = format!(
        "local clock {} ms {ahead} the IO service (limit {} ms, round trip {} ms)",
        skew_ms.unsigned_abs(),
        max,
        rtt.as_millis()
    );
    if skew_ms.unsigned_abs() <= max {
        report.push("clock", Outcome::Pass, detail);
    } else {
        report.push(
            "clock",
            Outcome::Fail,
            format!("{detail}: signed requests would be refused; sync the node's time (NTP)"),
        );
    }

    config_check(&mut report, &http, base, settings, clock.now_ms()).await;
    gpu_check(&mut report, gpu());
    Ok(report)
}

async fn config_check(
    report: &mut Report,
    http: &reqwest::Client,
    base: &str,
    settings: &DoctorSettings,
    now_ms: u64,
) {
    let url = format!("{base}{}", paths::CONFIG);
    let (status, body) = match fetch_bounded(http, &url).await {
        Ok(r) => r,
        Err(e) => return report.push("config", Outcome::Fail, e),
    };
    if status == 404 {
        return report.push(
            "config",
            Outcome::Fail,
            format!("{url}: the network publishes no config yet"),
        );
    }
    if !(200..300).contains(&status) {
        return report.push(
            "config",
            Outcome::Fail,
            format!("{url} answered HTTP {status}"),
        );
    }
    let signed = match SignedConfig::decode(&body) {
        Ok(s) => s,
        Err(e) => {
            return report.push(
                "config",
                Outcome::Fail,
                format!("{url} is not a signed config: {e}"),
            );
        }
    };
    let trust = ConfigTrust::pinned(settings.network_id.clone(), settings.network_keys.clone());
    match trust.verify(&signed, now_ms) {
        Ok(ConfigVerdict::New(v)) => {
            let left = v.snapshot.expires_at_ms.saturating_sub(now_ms) / 3_600_000;
            report.push(
                "config",
                Outcome::Pass,
                format!(
                    "version {} ({}) signed by {} verifies with the pinned keys; expires in {left} h",
                    v.snapshot.version,
                    v.digest().short(),
                    signed.signer()
                ),
            );
        }
        // A pinned-only trust has no current snapshot, so every valid config is new; kept
        // total so a future trust change cannot turn a pass into a silent skip.
        Ok(ConfigVerdict::Unchanged) => report.push(
            "config",
            Outcome::Pass,
            "the signed config verifies with the pinned keys",
        ),
        Err(e) => report.push(
            "config",
            Outcome::Fail,
            format!(
                "version from {url} does not verify with the {} pinned key(s): {e}",
                settings.network_keys.len()
            ),
        ),
    }
}

fn gpu_check(report: &mut Report, gpu: GpuReport) {
    if !gpu.present {
        let why = gpu.reason.unwrap_or_else(|| "NVML sees no GPU".into());
        return report.push("gpu", Outcome::Skip, format!("no GPU visible ({why})"));
    }
    let driver = gpu.driver_version.as_deref().unwrap_or("unknown");
    let unhealthy: Vec<String> = gpu
        .devices
        .iter()
        .filter(|d| !d.healthy)
        .map(|d| {
            let mut why = Vec::new();
            if let Some(e) = d.ecc_uncorrected.filter(|e| *e > 0) {
                why.push(format!("{e} uncorrected ECC errors"));
            }
            if let Some(x) = d.last_xid {
                why.push(format!("XID {x}"));
            }
            if why.is_empty() {
                format!("GPU {} ({})", d.index, d.uuid)
            } else {
                format!("GPU {} ({}): {}", d.index, d.uuid, why.join(", "))
            }
        })
        .collect();
    if unhealthy.is_empty() {
        report.push(
            "gpu",
            Outcome::Pass,
            format!(
                "{} GPU(s) healthy, driver {driver}{}",
                gpu.devices.len(),
                gpu.cuda_version
                    .as_deref()
                    .map(|c| format!(", CUDA {c}"))
                    .unwrap_or_default()
            ),
        );
    } else {
        report.push(
            "gpu",
            Outcome::Fail,
            format!("unhealthy: {}", unhealthy.join("; ")),
        );
    }
}

/// GET with the body bounded by the largest protocol document (a signed config).
async fn fetch_bounded(http: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    // `without_url`: the line names the URL once, not again inside reqwest's message.
    let mut resp = http.get(url).send().await.map_err(|e| {
        if e.is_timeout() {
            format!("{url} did not answer in time")
        } else {
            format!("{url} unreachable: {}", error_chain(&e.without_url()))
        }
    })?;
    let status = resp.status().as_u16();
    let max = limits::MAX_CONFIG_BYTES;
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading {url}: {}", error_chain(&e.without_url())))?
    {
        if body.len() + chunk.len() > max {
            return Err(format!("{url} answered more than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::messages::GpuDevice;

    /// Built from JSON so fields added later with defaults keep this fixture valid.
    fn device(healthy: bool) -> GpuDevice {
        serde_json::from_value(serde_json::json!({
            "index": 0, "uuid": "GPU-1", "name": "H100",
            "memory_total_mib": 80_000, "memory_used_mib": 0,
            "ecc_uncorrected": if healthy { 0 } else { 3 },
            "healthy": healthy
        }))
        .unwrap_or_else(|e| panic!("GPU device fixture: {e}"))
    }

    #[test]
    fn gpu_check_skips_without_a_gpu_and_fails_on_an_unhealthy_one() {
        let mut r = Report::default();
        gpu_check(&mut r, GpuReport::default());
        assert_eq!(r.checks[0].outcome, Outcome::Skip);

        let mut r = Report::default();
        gpu_check(
            &mut r,
            GpuReport {
                present: true,
                devices: vec![device(true)],
                ..GpuReport::default()
            },
        );
        assert_eq!(r.checks[0].outcome, Outcome::Pass, "{}", r.checks[0]);

        let mut r = Report::default();
        gpu_check(
            &mut r,
            GpuReport {
                present: true,
                devices: vec![device(false)],
                ..GpuReport::default()
            },
        );
        assert_eq!(r.checks[0].outcome, Outcome::Fail);
        assert!(r.checks[0].detail.contains("3 uncorrected ECC errors"));
        assert!(!r.passed());
    }
}
