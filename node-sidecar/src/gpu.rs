//! GPU probe: NVML (loaded at run time) where the sidecar can see the pod's GPUs — a pod-level
//! DRA ResourceClaim shared by runtime and sidecar, or a bare-metal host — and otherwise the
//! node's dcgm-exporter filtered to this pod ([`crate::dcgm`]), for device-plugin clusters
//! where only the runtime container holds the GPU.
//!
//! Neither source is a reportable state, never a failure: the report says `present: false`
//! with the reason, and the node is not ready unless GPU checks are explicitly off
//! ([`GpuMode::Off`], for CPU-only runtimes and test rigs).
//!
//! Health: volatile uncorrected ECC errors or a hardware XID mark a device unhealthy, which
//! stops intake (operators must not be paid for results computed on corrupting memory).

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use resultity_protocol::messages::{GpuDevice, GpuReport, MigDevice};

use crate::dcgm::DcgmSource;

const MIB: u64 = 1024 * 1024;

/// Where GPU status comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuMode {
    /// NVML if it sees a device, else dcgm-exporter if configured.
    #[default]
    Auto,
    /// NVML only (DRA or bare metal).
    Nvml,
    /// dcgm-exporter only (device plugin).
    Dcgm,
    /// No GPU checks: the node serves without a GPU (CPU runtimes, tests). Explicit, so a
    /// GPU node that cannot see its GPU is never silently ready.
    Off,
}

impl GpuMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "nvml" => Ok(Self::Nvml),
            "dcgm" => Ok(Self::Dcgm),
            "off" => Ok(Self::Off),
            _ => Err(format!(
                "{s} is not a GPU check mode: use auto, nvml, dcgm or off"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Nvml => "nvml",
            Self::Dcgm => "dcgm",
            Self::Off => "off",
        }
    }
}

/// GPU check configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuSettings {
    pub mode: GpuMode,
    /// dcgm-exporter metrics URL (e.g. `http://HOST_IP:9400/metrics`).
    pub dcgm_url: Option<String>,
    /// This pod's name and namespace (Downward API), to pick its GPUs from the exporter.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}

impl GpuSettings {
    /// GPU checks off (CPU-only runtimes, tests).
    pub fn off() -> Self {
        Self {
            mode: GpuMode::Off,
            ..Self::default()
        }
    }
}

/// The GPU sources in use, or the reasons there are none.
#[derive(Debug)]
pub struct GpuProbe {
    mode: GpuMode,
    nvml: Option<Result<Nvml, String>>,
    dcgm: Option<Result<DcgmSource, String>>,
}

impl GpuProbe {
    /// Sets up the sources `settings` asks for. Never fails: an absent NVML library, driver
    /// or exporter is a reportable state.
    pub fn new(settings: &GpuSettings) -> Self {
        let want_nvml = matches!(settings.mode, GpuMode::Auto | GpuMode::Nvml);
        let want_dcgm = match settings.mode {
            GpuMode::Dcgm => true,
            GpuMode::Auto => settings.dcgm_url.is_some(),
            GpuMode::Nvml | GpuMode::Off => false,
        };
        let nvml = want_nvml.then(|| Nvml::init().map_err(|e| format!("NVML unavailable: {e}")));
        let dcgm = want_dcgm.then(|| dcgm_source(settings));
        Self {
            mode: settings.mode,
            nvml,
            dcgm,
        }
    }

    /// Whether a node without a visible GPU is unready.
    pub fn required(&self) -> bool {
        self.mode != GpuMode::Off
    }

    /// A probe that reports no GPU with `reason` (tests).
    pub fn disabled(reason: &str) -> Self {
        Self {
            mode: GpuMode::Nvml,
            nvml: Some(Err(reason.to_owned())),
            dcgm: None,
        }
    }

    /// Reads every source now: NVML first, then the exporter.
    pub async fn report(&self) -> GpuReport {
        if self.mode == GpuMode::Off {
            return absent("GPU checks are off (--gpu-check off)".to_owned());
        }
        let mut reasons = Vec::new();
        match &self.nvml {
            Some(Ok(nvml)) => {
                let r = nvml_report(nvml);
                if r.present {
                    return r;
                }
                reasons.push(r.reason.unwrap_or_else(|| "NVML reports no devices".into()));
            }
            Some(Err(reason)) => reasons.push(reason.clone()),
            None => {}
        }
        match &self.dcgm {
            Some(Ok(source)) => match source.report().await {
                Ok(r) => return r,
                Err(e) => reasons.push(e.to_string()),
            },
            Some(Err(reason)) => reasons.push(reason.clone()),
            None if self.mode == GpuMode::Auto => reasons.push(
                "dcgm-exporter not configured (--dcgm-url) for device-plugin clusters".into(),
            ),
            None => {}
        }
        absent(reasons.join("; "))
    }
}

fn absent(reason: String) -> GpuReport {
    GpuReport {
        present: false,
        reason: Some(reason),
        ..GpuReport::default()
    }
}

fn dcgm_source(s: &GpuSettings) -> Result<DcgmSource, String> {
    let url = s
        .dcgm_url
        .clone()
        .ok_or("dcgm-exporter URL not set (--dcgm-url or RESULTITY_HOST_IP)")?;
    let (Some(pod), Some(namespace)) = (s.pod_name.clone(), s.pod_namespace.clone()) else {
        return Err(
            "pod name and namespace unknown (set RESULTITY_POD_NAME and RESULTITY_POD_NAMESPACE from the Downward API)"
                .into(),
        );
    };
    DcgmSource::new(url, pod, namespace).map_err(|e| e.to_string())
}

/// Reads every NVML device now.
fn nvml_report(nvml: &Nvml) -> GpuReport {
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => return absent(format!("NVML device count failed: {e}")),
    };
    let mut devices = Vec::new();
    let mut errors = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(d) => devices.push(read_device(index, &d)),
            Err(e) => errors.push(format!("device {index}: {e}")),
        }
    }
    GpuReport {
        present: !devices.is_empty(),
        reason: if devices.is_empty() {
            Some(if errors.is_empty() {
                "NVML reports no devices".into()
            } else {
                errors.join("; ")
            })
        } else {
            None
        },
        driver_version: nvml.sys_driver_version().ok(),
        cuda_version: nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        }),
        devices,
    }
}

fn read_device(index: u32, d: &nvml_wrapper::Device<'_>) -> GpuDevice {
    let mem = d.memory_info().ok();
    let ecc = d
        .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
        .ok();
    let mut mig_devices = Vec::new();
    if let Ok(max) = d.mig_device_count() {
        for i in 0..max {
            if let Ok(m) = d.mig_device_by_index(i) {
                mig_devices.push(MigDevice {
                    uuid: m.uuid().unwrap_or_default(),
                    memory_total_mib: m.memory_info().map(|mi| mi.total / MIB).unwrap_or(0),
                });
            }
        }
    }
    GpuDevice {
        index,
        uuid: d.uuid().unwrap_or_default(),
        name: d.name().unwrap_or_default(),
        memory_total_mib: mem.as_ref().map(|m| m.total / MIB).unwrap_or(0),
        memory_used_mib: mem.as_ref().map(|m| m.used / MIB).unwrap_or(0),
        utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
        ecc_uncorrected: ecc,
        last_xid: None,
        mig_devices,
        healthy: ecc.is_none_or(|n| n == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn disabled_probe_reports_absent_with_reason() {
        let r = GpuProbe::disabled("no GPU on this test machine")
            .report()
            .await;
        assert!(!r.present);
        assert_eq!(r.reason.as_deref(), Some("no GPU on this test machine"));
        assert!(r.devices.is_empty());
        assert!(r.healthy());
    }

    #[tokio::test]
    async fn off_mode_says_so_and_is_not_required() {
        let p = GpuProbe::new(&GpuSettings::off());
        assert!(!p.required());
        let r = p.report().await;
        assert!(!r.present);
        assert!(r.reason.as_deref().is_some_and(|s| s.contains("off")));
    }

    #[tokio::test]
    async fn dcgm_mode_without_pod_identity_names_the_missing_env() {
        let p = GpuProbe::new(&GpuSettings {
            mode: GpuMode::Dcgm,
            dcgm_url: Some("http://127.0.0.1:9/metrics".into()),
            ..GpuSettings::default()
        });
        assert!(p.required());
        let r = p.report().await;
        assert!(!r.present);
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|s| s.contains("RESULTITY_POD_NAME")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn real_probe_never_fails() {
        // On a machine without the NVIDIA driver this exercises the absent-library path; on a
        // GPU machine it reads the devices. Either way it returns a coherent report.
        let r = GpuProbe::new(&GpuSettings::default()).report().await;
        if r.present {
            assert!(!r.devices.is_empty());
            assert!(r.devices.iter().all(|d| d.memory_total_mib > 0));
        } else {
            let reason = r.reason.unwrap_or_default();
            assert!(reason.contains("NVML"), "{reason}");
            assert!(reason.contains("dcgm-exporter"), "{reason}");
        }
    }
}
