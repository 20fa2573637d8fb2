//! GPU status from the node's dcgm-exporter, for clusters where the GPU is allocated by the
//! device plugin to the runtime container only (the sidecar then sees no GPU through NVML).
//! The exporter's Kubernetes mapping labels each series with the `pod`, `namespace` and
//! `container` that hold the GPU; this module keeps the series of this pod's GPUs.
//!
//! Read: `DCGM_FI_DEV_FB_USED`/`_FREE`/`_RESERVED` (MiB), `DCGM_FI_DEV_GPU_UTIL` (%),
//! `DCGM_FI_DEV_GPU_TEMP` (°C), `DCGM_FI_DEV_XID_ERRORS` (the last XID code),
//! `DCGM_FI_DEV_ECC_DBE_VOL_TOTAL` (volatile uncorrectable ECC errors) and
//! `DCGM_FI_DEV_ROW_REMAP_FAILURE`. A hardware XID, an uncorrectable ECC error or a failed row
//! remap marks the device unhealthy.

use std::collections::BTreeMap;
use std::time::Duration;

use resultity_protocol::messages::{GpuDevice, GpuReport};

use crate::runtime::prometheus_sample;

/// Largest exporter answer read (8 GPUs with every field are a few hundred KiB).
pub const MAX_EXPORT_BYTES: usize = 8 * 1024 * 1024;
/// Time for one scrape of the exporter.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the exporter gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DcgmError {
    #[error("dcgm-exporter at {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("dcgm-exporter at {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("dcgm-exporter at {url} answered more than {max} bytes")]
    TooLarge { url: String, max: usize },
    #[error("dcgm-exporter at {url} reports no GPU for pod {namespace}/{pod}")]
    NoGpuForPod {
        url: String,
        namespace: String,
        pod: String,
    },
    #[error("cannot build the dcgm-exporter client: {0}")]
    Client(String),
}

/// XIDs NVIDIA attributes to the application (bad kernel, killed process), not the GPU:
/// reported, but they do not stop intake.
const APPLICATION_XIDS: [u64; 4] = [13, 31, 43, 45];

/// Whether XID `code` says the GPU itself is at fault.
pub fn xid_is_hardware_fault(code: u64) -> bool {
    code != 0 && !APPLICATION_XIDS.contains(&code)
}

/// One scrape target: the exporter URL and the pod whose GPUs to keep.
#[derive(Debug, Clone)]
pub struct DcgmSource {
    http: reqwest::Client,
    url: String,
    pod: String,
    namespace: String,
}

impl DcgmSource {
    pub fn new(url: String, pod: String, namespace: String) -> Result<Self, DcgmError> {
        let http = reqwest::Client::builder()
            .timeout(SCRAPE_TIMEOUT)
            .connect_timeout(SCRAPE_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| DcgmError::Client(e.to_string()))?;
        Ok(Self {
            http,
            url,
            pod,
            namespace,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Scrapes the exporter and returns this pod's GPUs.
    pub async fn report(&self) -> Result<GpuReport, DcgmError> {
        // reqwest's own message is generic and repeats the URL; the cause is in its chain.
        let unreachable = |e: reqwest::Error| DcgmError::Unreachable {
            url: self.url.clone(),
            reason: resultity_protocol::error_chain(&e.without_url()),
        };
        let mut resp = self.http.get(&self.url).send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(DcgmError::Status {
                url: self.url.clone(),
                status,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_EXPORT_BYTES {
                return Err(DcgmError::TooLarge {
                    url: self.url.clone(),
                    max: MAX_EXPORT_BYTES,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        let devices = pod_gpus(&text, &self.pod, &self.namespace);
        if devices.is_empty() {
            return Err(DcgmError::NoGpuForPod {
                url: self.url.clone(),
                namespace: self.namespace.clone(),
                pod: self.pod.clone(),
            });
        }
        Ok(GpuReport {
            present: true,
            reason: None,
            driver_version: None,
            cuda_version: None,
            devices,
        })
    }
}

#[derive(Default)]
struct Acc {
    index: Option<u32>,
    uuid: String,
    name: String,
    fb_used: Option<f64>,
    fb_free: Option<f64>,
    fb_reserved: Option<f64>,
    util: Option<f64>,
    temp: Option<f64>,
    xid: Option<f64>,
    ecc_dbe: Option<f64>,
    remap_failure: Option<f64>,
}

/// The GPUs (or MIG instances) that dcgm-exporter attributes to `namespace/pod`, in index
/// order. Pure: the exporter's text in, devices out.
pub fn pod_gpus(text: &str, pod: &str, namespace: &str) -> Vec<GpuDevice> {
    let mut by_device: BTreeMap<(u32, String, String), Acc> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, value)) = prometheus_sample(line) else {
            continue;
        };
        if !name.starts_with("DCGM_FI_") {
            continue;
        }
        let labels = parse_labels(line);
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let series_pod = label("pod").or_else(|| label("exported_pod"));
        let series_ns = label("namespace").or_else(|| label("exported_namespace"));
        if series_pod != Some(pod) || series_ns != Some(namespace) {
            continue;
        }
        let index = label("gpu").and_then(|g| g.parse::<u32>().ok());
        let uuid = label("UUID").unwrap_or_default().to_owned();
        let mig = label("GPU_I_ID").unwrap_or_default().to_owned();
        let acc = by_device
            .entry((index.unwrap_or(u32::MAX), uuid.clone(), mig.clone()))
            .or_default();
        acc.index = index;
        acc.uuid = if mig.is_empty() {
            uuid
        } else {
            format!("{uuid}/{mig}")
        };
        if let Some(m) = label("modelName") {
            acc.name = match label("GPU_I_PROFILE") {
                Some(p) => format!("{m} MIG {p}"),
                None => m.to_owned(),
            };
        }
        let slot = match name {
            "DCGM_FI_DEV_FB_USED" => &mut acc.fb_used,
            "DCGM_FI_DEV_FB_FREE" => &mut acc.fb_free,
            "DCGM_FI_DEV_FB_RESERVED" => &mut acc.fb_reserved,
            "DCGM_FI_DEV_GPU_UTIL" => &mut acc.util,
            "DCGM_FI_DEV_GPU_TEMP" => &mut acc.temp,
            "DCGM_FI_DEV_XID_ERRORS" => &mut acc.xid,
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL" => &mut acc.ecc_dbe,
            "DCGM_FI_DEV_ROW_REMAP_FAILURE" => &mut acc.remap_failure,
            _ => continue,
        };
        *slot = Some(value);
    }
    by_device
        .into_values()
        .enumerate()
        .map(|(i, a)| {
            // Exported values are small non-negative numbers; saturating casts are intended.
            let whole = |v: f64| v.max(0.0) as u64;
            let used = a.fb_used.map_or(0, whole);
            let total = used
                .saturating_add(a.fb_free.map_or(0, whole))
                .saturating_add(a.fb_reserved.map_or(0, whole));
            let xid = a.xid.map(whole);
            let ecc = a.ecc_dbe.map(whole);
            let healthy = !xid.is_some_and(xid_is_hardware_fault)
                && ecc.is_none_or(|e| e == 0)
                && a.remap_failure.is_none_or(|f| f == 0.0);
            GpuDevice {
                index: a.index.unwrap_or(u32::try_from(i).unwrap_or(u32::MAX)),
                uuid: a.uuid,
                name: a.name,
                memory_total_mib: total,
                memory_used_mib: used,
                utilization_pct: a.util.map(|u| u32::try_from(whole(u)).unwrap_or(u32::MAX)),
                temperature_c: a.temp.map(|t| u32::try_from(whole(t)).unwrap_or(u32::MAX)),
                ecc_uncorrected: ecc,
                last_xid: xid.filter(|x| *x != 0),
                mig_devices: vec![],
                healthy,
            }
        })
        .collect()
}

/// The label pairs of one sample line (`name{k="v",…} value`), with `\"`, `\\` and `\n`
/// unescaped. A malformed label set yields what was parsed before the fault.
fn parse_labels(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(open) = line.find('{') else {
        return out;
    };
    let mut chars = line[open + 1..].chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == '}' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return out,
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return out,
            }
        }
        out.push((key.trim().to_owned(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_escapes() {
        let l = parse_labels(r#"m{a="x",b="y\"}z",c="\\"} 1"#);
        assert_eq!(
            l,
            vec![
                ("a".into(), "x".into()),
                ("b".into(), "y\"}z".into()),
                ("c".into(), "\\".into())
            ]
        );
        assert!(parse_labels("m 1").is_empty());
        assert_eq!(parse_labels(r#"m{a="x",b=oops} 1"#).len(), 1);
    }

    const FIXTURE: &str = include_str!("../tests/fixtures/dcgm-exporter.txt");

    #[test]
    fn fixture_keeps_only_this_pods_gpus() {
        let d = pod_gpus(FIXTURE, "resultity-node-a-0", "gpu-fleet");
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!((d[0].index, d[1].index), (0, 1));
        assert_eq!(d[0].uuid, "GPU-5fd4a5b2-1c3e-4b7a-9d0e-0a1b2c3d4e01");
        assert_eq!(d[0].name, "NVIDIA A100-SXM4-80GB");
        assert_eq!(d[0].memory_used_mib, 74_500);
        assert_eq!(d[0].memory_total_mib, 74_500 + 6_128 + 531);
        assert_eq!(d[0].utilization_pct, Some(87));
        assert_eq!(d[0].temperature_c, Some(61));
        // Lifetime (aggregate) ECC errors do not count; volatile ones do.
        assert_eq!(d[0].ecc_uncorrected, Some(0));
        assert_eq!(d[0].last_xid, None);
        assert!(d.iter().all(|g| g.healthy));
        // Another pod's GPU (with an application XID) and an idle GPU are not ours.
        let other = pod_gpus(FIXTURE, "other-workload-7c9f", "ml-team");
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].last_xid, Some(13));
        assert!(other[0].healthy, "XID 13 is the application's fault");
        assert!(pod_gpus(FIXTURE, "resultity-node-a-0", "elsewhere").is_empty());
    }

    fn with_value(metric_gpu: &str, value: &str) -> String {
        FIXTURE
            .lines()
            .map(|l| match l.rsplit_once(' ') {
                Some((series, _)) if l.starts_with(metric_gpu) => format!("{series} {value}"),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn hardware_faults_mark_the_device_unhealthy() {
        let xid = with_value("DCGM_FI_DEV_XID_ERRORS{gpu=\"1\"", "79");
        let d = pod_gpus(&xid, "resultity-node-a-0", "gpu-fleet");
        assert!(d[0].healthy);
        assert!(!d[1].healthy);
        assert_eq!(d[1].last_xid, Some(79));
        let ecc = with_value("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{gpu=\"0\"", "3");
        let d = pod_gpus(&ecc, "resultity-node-a-0", "gpu-fleet");
        assert!(!d[0].healthy);
        assert_eq!(d[0].ecc_uncorrected, Some(3));
        let remap = with_value("DCGM_FI_DEV_ROW_REMAP_FAILURE{gpu=\"1\"", "1");
        assert!(!pod_gpus(&remap, "resultity-node-a-0", "gpu-fleet")[1].healthy);
    }

    #[tokio::test]
    async fn an_unreachable_exporter_says_why_once() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", closed.local_addr().unwrap());
        drop(closed);
        let source = DcgmSource::new(url.clone(), "p".into(), "n".into()).unwrap();
        match source.report().await {
            Err(DcgmError::Unreachable { url: at, reason }) => {
                assert_eq!(at, url);
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
                assert!(
                    !reason.contains("127.0.0.1"),
                    "the URL is said once: {reason}"
                );
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
    }

    #[test]
    fn absurd_memory_figures_saturate() {
        let text = [
            r#"DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-x",pod="p",namespace="n"} 1e300"#,
            r#"DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-x",pod="p",namespace="n"} 1e300"#,
        ]
        .join("\n");
        let d = pod_gpus(&text, "p", "n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].memory_total_mib, u64::MAX);
    }

    #[test]
    fn exported_labels_are_read_too() {
        let text = r#"DCGM_FI_DEV_FB_USED{gpu="3",UUID="GPU-x",exported_pod="p",exported_namespace="n"} 10"#;
        let d = pod_gpus(text, "p", "n");
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].index, d[0].memory_used_mib), (3, 10));
    }

    #[test]
    fn application_xids_are_not_faults() {
        assert!(!xid_is_hardware_fault(0));
        assert!(!xid_is_hardware_fault(13));
        assert!(!xid_is_hardware_fault(43));
        assert!(xid_is_hardware_fault(48));
        assert!(xid_is_hardware_fault(79));
    }
}
