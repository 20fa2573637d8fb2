//! Runtime health probing that survives a busy runtime.
//!
//! A runtime under load may answer a health probe late: llama.cpp's `llama-server` serves a
//! fixed pool of connections, and a new connection waits until a keep-alive one frees (its
//! keep-alive timeout is 5 s). So probes run on their own client (a fresh connection each, see
//! [`super::AnyRuntime::for_probes`]) in their own task, with a timeout above common keep-alive
//! settings, and the runtime counts as not ready only after several consecutive failures. The
//! heartbeat never waits for a probe: it reports the last verdict.

use std::time::Duration;

use resultity_protocol::messages::RuntimeReport;

/// How the runtime is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// Time one probe (health, then metrics) may take.
    pub timeout: Duration,
    /// Consecutive failed probes before a ready runtime counts as not ready.
    pub failure_threshold: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            // Above the 5 s keep-alive of llama.cpp and uvicorn (vLLM, SGLang), so a probe
            // stalled behind one freed connection still answers.
            timeout: Duration::from_secs(10),
            failure_threshold: 3,
        }
    }
}

/// Longest probe interval or timeout accepted.
pub const MAX_PROBE_PERIOD: Duration = Duration::from_secs(3600);

impl ProbeSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("probe interval and timeout must be positive".into());
        }
        // A probe is how the node notices a dead runtime; beyond an hour it notices nothing.
        if self.interval > MAX_PROBE_PERIOD || self.timeout > MAX_PROBE_PERIOD {
            return Err(format!(
                "probe interval and timeout must be at most {} s",
                MAX_PROBE_PERIOD.as_secs()
            ));
        }
        if self.failure_threshold == 0 {
            return Err("probe failure threshold must be at least 1".into());
        }
        Ok(())
    }
}

/// Turns raw probe results into the runtime verdict: ready at the first success, not ready
/// only after `failure_threshold` failures in a row (or at once while never yet ready).
#[derive(Debug, Clone)]
pub struct ProbeVerdict {
    threshold: u32,
    failures: u32,
    last_ready: Option<RuntimeReport>,
}

impl ProbeVerdict {
    pub fn new(failure_threshold: u32) -> Self {
        Self {
            threshold: failure_threshold.max(1),
            failures: 0,
            last_ready: None,
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The report to publish after probe result `raw`.
    pub fn observe(&mut self, raw: RuntimeReport) -> RuntimeReport {
        if raw.ready {
            self.failures = 0;
            self.last_ready = Some(raw.clone());
            return raw;
        }
        self.failures = self.failures.saturating_add(1);
        match &self.last_ready {
            Some(good) if self.failures < self.threshold => {
                // Still ready: the last good load figures stand; the reason says a probe failed.
                let mut r = good.clone();
                r.reason = Some(format!(
                    "last probe failed, not ready after {} failures in a row: {}",
                    self.threshold,
                    raw.reason.as_deref().unwrap_or("no reason given")
                ));
                r
            }
            _ => {
                self.last_ready = None;
                raw
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::messages::RuntimeKind;

    fn ok(running: u32) -> RuntimeReport {
        let mut r = RuntimeReport::not_ready(RuntimeKind::Openai, None);
        r.ready = true;
        r.running = Some(running);
        r
    }

    fn bad() -> RuntimeReport {
        RuntimeReport::not_ready(RuntimeKind::Openai, Some("timed out".into()))
    }

    #[test]
    fn not_ready_only_after_threshold_consecutive_failures() {
        let mut v = ProbeVerdict::new(3);
        assert!(
            !v.observe(bad()).ready,
            "never ready yet: a failure counts at once"
        );
        assert!(v.observe(ok(2)).ready);
        let held = v.observe(bad());
        assert!(held.ready);
        assert_eq!(held.running, Some(2), "last good figures stand");
        assert!(
            held.reason
                .as_deref()
                .is_some_and(|r| r.contains("timed out"))
        );
        assert!(v.observe(bad()).ready);
        let down = v.observe(bad());
        assert!(!down.ready);
        assert_eq!(down.reason.as_deref(), Some("timed out"));
        assert!(!v.observe(bad()).ready, "stays down until a success");
        assert!(v.observe(ok(0)).ready);
        assert_eq!(v.failures(), 0);
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut v = ProbeVerdict::new(2);
        v.observe(ok(1));
        assert!(v.observe(bad()).ready);
        assert!(v.observe(ok(1)).ready);
        assert!(v.observe(bad()).ready, "count restarted after the success");
        assert!(!v.observe(bad()).ready);
    }

    #[test]
    fn settings_are_checked() {
        assert!(ProbeSettings::default().validate().is_ok());
        let zero = ProbeSettings {
            failure_threshold: 0,
            ..ProbeSettings::default()
        };
        assert!(zero.validate().is_err());
        let forever = ProbeSettings {
            timeout: Duration::from_secs(u64::MAX),
            ..ProbeSettings::default()
        };
        assert!(forever.validate().is_err());
        let rare = ProbeSettings {
            interval: MAX_PROBE_PERIOD + Duration::from_secs(1),
            ..ProbeSettings::default()
        };
        assert!(rare.validate().is_err());
        let hourly = ProbeSettings {
            interval: MAX_PROBE_PERIOD,
            ..ProbeSettings::default()
        };
        assert!(hourly.validate().is_ok());
    }
}
