//! Model storage: the cache volume a node's runtime reads its weights from, the claim the
//! operator creates for it, and the start-up budget that follows the models' size. Pure
//! functions, so every source is a snapshot test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, EnvVar, HostPathVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;

use crate::crd::{
    LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_NODE, MANAGER, ModelCacheSpec,
    ResultityNode, RuntimeKind,
};

/// Name of the cache volume in the pod.
pub const CACHE_VOLUME: &str = "model-cache";
/// Where the cache is mounted in the runtime container: Triton's model repository, and the
/// root of the Hugging Face (and llama.cpp) caches for the other runtimes.
pub const CACHE_DIR: &str = "/models";
/// `HF_HOME` under the cache: vLLM (and most OpenAI-compatible servers) download there.
pub const HF_HOME: &str = "/models/huggingface";
/// The hub cache inside `HF_HOME`, set explicitly so an image's own `HF_HUB_CACHE` cannot
/// send the weights elsewhere.
pub const HF_HUB_CACHE: &str = "/models/huggingface/hub";
/// llama.cpp's download directory for `--hf-repo`.
pub const LLAMA_CACHE: &str = "/models/llama.cpp";

/// Name of the claim the operator creates for a node's `volumeClaimTemplate`.
pub fn cache_claim_name(node: &ResultityNode) -> String {
    format!(
        "{}-model-cache",
        node.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Environment variables the operator sets on the runtime for its cache (none for Triton,
/// which takes the repository as a flag, or without a cache). `spec.runtime.env` may not set
/// these names.
pub fn cache_env_names(
    kind: RuntimeKind,
    cache: Option<&ModelCacheSpec>,
) -> &'static [&'static str] {
    match (kind, cache) {
        (_, None) | (RuntimeKind::Triton, _) => &[],
        (RuntimeKind::Vllm, Some(_)) => &["HF_HOME", "HF_HUB_CACHE"],
        (RuntimeKind::Openai, Some(_)) => &["HF_HOME", "HF_HUB_CACHE", "LLAMA_CACHE"],
    }
}

/// The runtime's environment for its cache.
pub fn cache_env(kind: RuntimeKind, cache: Option<&ModelCacheSpec>) -> Vec<EnvVar> {
    cache_env_names(kind, cache)
        .iter()
        .map(|name| EnvVar {
            name: (*name).to_owned(),
            value: Some(
                match *name {
                    "HF_HOME" => HF_HOME,
                    "HF_HUB_CACHE" => HF_HUB_CACHE,
                    _ => LLAMA_CACHE,
                }
                .to_owned(),
            ),
            ..EnvVar::default()
        })
        .collect()
}

/// The cache's mount in the runtime container.
pub fn cache_mount(cache: &ModelCacheSpec) -> VolumeMount {
    VolumeMount {
        name: CACHE_VOLUME.into(),
        mount_path: CACHE_DIR.into(),
        read_only: cache.read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The cache volume of the pod.
pub fn cache_volume(node: &ResultityNode, cache: &ModelCacheSpec) -> Volume {
    let mut v = Volume {
        name: CACHE_VOLUME.into(),
        ..Volume::default()
    };
    if cache.volume_claim_template.is_some() {
        v.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: cache_claim_name(node),
            read_only: cache.read_only.then_some(true),
        });
    } else if let Some(claim) = &cache.existing_claim {
        v.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.clone(),
            read_only: cache.read_only.then_some(true),
        });
    } else if let Some(host) = &cache.host_path {
        v.host_path = Some(HostPathVolumeSource {
            path: host.path.clone(),
            type_: Some(host.type_.as_str().to_owned()),
        });
    } else if let Some(dir) = &cache.empty_dir {
        v.empty_dir = Some(EmptyDirVolumeSource {
            size_limit: Some(dir.size_limit.clone()),
            ..EmptyDirVolumeSource::default()
        });
    }
    v
}

/// The claim for a `volumeClaimTemplate` cache, owned by the node: it outlives pod
/// replacements and goes with the ResultityNode. `None` for every other source.
pub fn build_cache_claim(node: &ResultityNode) -> Option<PersistentVolumeClaim> {
    let template = node
        .spec
        .model_cache
        .as_ref()?
        .volume_claim_template
        .as_ref()?;
    let owner = node.controller_owner_ref(&())?;
    let name = node.metadata.name.clone().unwrap_or_default();
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(cache_claim_name(node)),
            namespace: node.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (LABEL_NAME.to_owned(), "resultity-model-cache".to_owned()),
                (LABEL_INSTANCE.to_owned(), name.clone()),
                (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
                (LABEL_NODE.to_owned(), name),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(
                template
                    .access_modes
                    .iter()
                    .map(|m| m.as_str().to_owned())
                    .collect(),
            ),
            storage_class_name: template.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    template.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    })
}

/// Start-up budget with no size known, and the least any model gets.
pub const STARTUP_FLOOR_SECONDS: u32 = 600;
/// The most any model gets without `spec.runtime.startupTimeoutSeconds`.
pub const STARTUP_CAP_SECONDS: u32 = 14_400;
/// Fixed part: image start, CUDA context, graph capture and warm-up.
pub const STARTUP_BASE_SECONDS: u32 = 300;
/// Per GiB of the models' GPU memory need: a download at about 35 MiB/s plus the load into
/// GPU memory. The need (weights plus KV cache) overstates the weights, which errs long.
pub const STARTUP_SECONDS_PER_GIB: u32 = 30;
/// Period of the runtime's startup probe.
pub const STARTUP_PERIOD_SECONDS: u32 = 10;

/// How long the runtime may take to first answer: `base + perGiB × GiB` of the models'
/// summed GPU memory need, between the floor and the cap; an explicit
/// `spec.runtime.startupTimeoutSeconds` wins.
pub fn startup_budget_seconds(model_memory_mib: u64, explicit: Option<u32>) -> u32 {
    if let Some(s) = explicit {
        return s;
    }
    let gib = model_memory_mib.div_ceil(1024);
    let derived = u64::from(STARTUP_BASE_SECONDS)
        .saturating_add(gib.saturating_mul(u64::from(STARTUP_SECONDS_PER_GIB)));
    let capped = derived.clamp(
        u64::from(STARTUP_FLOOR_SECONDS),
        u64::from(STARTUP_CAP_SECONDS),
    );
    u32::try_from(capped).unwrap_or(STARTUP_CAP_SECONDS)
}

/// `(periodSeconds, failureThreshold)` of the startup probe for a budget.
pub fn startup_probe_timing(budget_seconds: u32) -> (i32, i32) {
    let failures = budget_seconds.div_ceil(STARTUP_PERIOD_SECONDS).max(1);
    (
        i32::try_from(STARTUP_PERIOD_SECONDS).unwrap_or(10),
        i32::try_from(failures).unwrap_or(i32::MAX),
    )
}

/// Whether `s` is a positive Kubernetes quantity (`200Gi`, `1.5T`, `500M`, `1e9`, `+8`, an
/// integer written unquoted), as the API server parses them.
pub fn is_positive_quantity(s: &str) -> bool {
    let s = s.strip_prefix('+').unwrap_or(s);
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let valid_number = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let valid_suffix = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|exp| {
        let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        !digits.is_empty() && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit())
    });
    valid_number && valid_suffix && number.chars().any(|c| ('1'..='9').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_follows_size_between_floor_and_cap() {
        assert_eq!(startup_budget_seconds(0, None), STARTUP_FLOOR_SECONDS);
        // 8 GiB: 300 + 240 = 540, under the floor.
        assert_eq!(startup_budget_seconds(8 * 1024, None), 600);
        // 24000 MiB rounds up to 24 GiB: 300 + 720.
        assert_eq!(startup_budget_seconds(24_000, None), 1020);
        // 160 GiB: 300 + 4800.
        assert_eq!(startup_budget_seconds(160 * 1024, None), 5100);
        assert_eq!(
            startup_budget_seconds(2048 * 1024, None),
            STARTUP_CAP_SECONDS
        );
        assert_eq!(startup_budget_seconds(u64::MAX, None), STARTUP_CAP_SECONDS);
        assert_eq!(startup_budget_seconds(160 * 1024, Some(90)), 90);
        assert_eq!(startup_probe_timing(1020), (10, 102));
        assert_eq!(
            startup_probe_timing(1025),
            (10, 103),
            "rounds up, never short"
        );
    }

    proptest::proptest! {
        #[test]
        fn budget_is_monotonic_and_bounded(a in 0u64..4_000_000, b in 0u64..4_000_000) {
            let (small, large) = (a.min(b), a.max(b));
            let (s, l) = (startup_budget_seconds(small, None), startup_budget_seconds(large, None));
            proptest::prop_assert!(s <= l);
            proptest::prop_assert!((STARTUP_FLOOR_SECONDS..=STARTUP_CAP_SECONDS).contains(&l));
            let (period, failures) = startup_probe_timing(l);
            // The probe never gives up before the budget is spent.
            proptest::prop_assert!(i64::from(period) * i64::from(failures) >= i64::from(l));
        }
    }

    #[test]
    fn quantities() {
        // What the CRD's quantity pattern admits and is above zero, signs and a bare
        // trailing point included (the API server parses `1.Gi` as 1Gi).
        for ok in [
            "200Gi", "1", "1.5T", "500M", "1e9", "0.5Gi", "100Mi", "2E", "+8", "1.Gi",
        ] {
            assert!(is_positive_quantity(ok), "{ok}");
        }
        for bad in [
            "", "0", "+0", "0Gi", "Gi", "-1Gi", "10GB", "1.2.3Gi", "ten", "1 Gi", "1e", "+",
        ] {
            assert!(!is_positive_quantity(bad), "{bad}");
        }
    }
}
