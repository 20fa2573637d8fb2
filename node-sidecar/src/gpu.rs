//! GPU probe through NVML, loaded at run time: a node without an NVIDIA driver or GPU reports
//! `present: false` with the reason and keeps working (CPU-only test rigs, driver upgrades).
//!
//! Health: volatile uncorrected ECC errors mark a device unhealthy, which stops intake
//! (operators must not be paid for results computed on corrupting memory).

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use resultity_protocol::messages::{GpuDevice, GpuReport, MigDevice};

const MIB: u64 = 1024 * 1024;

/// A loaded NVML handle, or the reason there is none.
#[derive(Debug)]
pub struct GpuProbe {
    nvml: Result<Nvml, String>,
}

impl GpuProbe {
    /// Tries to load NVML. Never fails: an absent library or driver is a reportable state.
    pub fn init() -> Self {
        Self {
            nvml: Nvml::init().map_err(|e| format!("NVML unavailable: {e}")),
        }
    }

    /// A probe that reports no GPU with `reason` (tests, `--gpu-probe=off`).
    pub fn disabled(reason: &str) -> Self {
        Self {
            nvml: Err(reason.to_owned()),
        }
    }

    /// Reads every device now.
    pub fn report(&self) -> GpuReport {
        let nvml = match &self.nvml {
            Ok(n) => n,
            Err(reason) => {
                return GpuReport {
                    present: false,
                    reason: Some(reason.clone()),
                    ..GpuReport::default()
                };
            }
        };
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                return GpuReport {
                    present: false,
                    reason: Some(format!("NVML device count failed: {e}")),
                    ..GpuReport::default()
                };
            }
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

    #[test]
    fn disabled_probe_reports_absent_with_reason() {
        let r = GpuProbe::disabled("no GPU on this test machine").report();
        assert!(!r.present);
        assert_eq!(r.reason.as_deref(), Some("no GPU on this test machine"));
        assert!(r.devices.is_empty());
        assert!(r.healthy());
    }

    #[test]
    fn real_probe_never_fails() {
        // On a machine without the NVIDIA driver this exercises the absent-library path; on a
        // GPU machine it reads the devices. Either way it returns a coherent report.
        let r = GpuProbe::init().report();
        if r.present {
            assert!(!r.devices.is_empty());
            assert!(r.devices.iter().all(|d| d.memory_total_mib > 0));
        } else {
            assert!(r.reason.as_deref().is_some_and(|s| !s.is_empty()), "{r:?}");
        }
    }
}
