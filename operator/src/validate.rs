//! Validate step: checks a ResultityNode against its network's verified config and resolves
//! everything the build step needs. Pure: no client, so it is tested from fixtures.

use crate::crd::{
    ConfigRef, GpuVisibility, Participation, ResultityNetwork, ResultityNode, RuntimeKind,
};

/// Operator-wide settings the build step needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Sidecar image when neither the signed config nor the network spec names one.
    pub sidecar_image: String,
    /// Port of the sidecar's admin API (`/status`, `/drain`, probes).
    pub sidecar_port: u16,
    /// Port the runtime listens on inside the pod.
    pub runtime_port: u16,
    /// Registry mirroring the images the network's config names (air-gapped clusters).
    pub image_registry: Option<String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            sidecar_image: "ghcr.io/resultity/resultity-sidecar:0.1.0".into(),
            sidecar_port: 9090,
            runtime_port: 8000,
            image_registry: None,
        }
    }
}

/// Why a node cannot be built now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// `spec.networkRef` names no ResultityNetwork (wait for it to appear).
    NetworkNotFound(String),
    /// The network has no verified config yet (wait for the network controller).
    WaitingForNetworkConfig(String),
    /// The spec cannot work with this network; a person must change it.
    Invalid(Vec<String>),
    /// The API server refused the object built from the spec (a field it validates and we
    /// could not); a person must change the spec.
    Rejected(crate::error::Rejection),
    /// The spec needs an API the cluster does not serve (DRA's `resource.k8s.io`); the
    /// cluster or the spec must change.
    Unsupported(String),
}

impl Blocker {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NetworkNotFound(_) => "NetworkNotFound",
            Self::WaitingForNetworkConfig(_) => "WaitingForNetworkConfig",
            Self::Invalid(_) => "InvalidSpec",
            Self::Rejected(_) => "RejectedByAPIServer",
            Self::Unsupported(_) => "UnsupportedByCluster",
        }
    }
    /// Human-readable message.
    pub fn message(&self) -> String {
        match self {
            Self::NetworkNotFound(n) => format!("ResultityNetwork {n} not found"),
            Self::WaitingForNetworkConfig(n) => {
                format!("ResultityNetwork {n} has no verified config yet")
            }
            Self::Invalid(problems) => problems.join("; "),
            Self::Rejected(r) => r.to_string(),
            Self::Unsupported(why) => why.clone(),
        }
    }
}

/// Everything the build step needs, resolved from the node, its network and the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub network_id: String,
    pub io_endpoint: String,
    /// Keys the sidecar pins to verify the network's messages and configs.
    pub network_keys: Vec<String>,
    pub runtime_image: String,
    pub sidecar_image: String,
    pub network_config: ConfigRef,
    /// GPU memory the node's models need together, per the network's config: the size the
    /// runtime's start-up budget follows.
    pub model_memory_mib: u64,
}

/// Validates `node` against `network` (the object `spec.networkRef` names, if it exists).
pub fn validate_node(
    node: &ResultityNode,
    network: Option<&ResultityNetwork>,
    defaults: &Defaults,
) -> Result<Resolved, Blocker> {
    let spec = &node.spec;
    let net_name = spec.network_ref.name.clone();
    let network = network.ok_or_else(|| Blocker::NetworkNotFound(net_name.clone()))?;
    let status = network
        .status
        .as_ref()
        .filter(|_| network.has_config())
        .ok_or_else(|| Blocker::WaitingForNetworkConfig(net_name.clone()))?;
    let network_config = match (&status.config_version, &status.config_digest) {
        (Some(version), Some(digest)) => ConfigRef {
            version: *version,
            digest: digest.clone(),
        },
        _ => return Err(Blocker::WaitingForNetworkConfig(net_name)),
    };

    let mut problems = Vec::new();
    let kind = spec.runtime.kind;
    if kind == RuntimeKind::Vllm && spec.models.len() != 1 {
        problems.push(format!(
            "runtime vllm serves exactly one model per pod, spec.models has {}",
            spec.models.len()
        ));
    }
    if spec.models.is_empty() {
        problems.push("spec.models must name at least one model".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut model_memory_mib = 0u64;
    for m in &spec.models {
        if !seen.insert(m) {
            problems.push(format!("model {}@{} is listed twice", m.id, m.revision));
            continue;
        }
        match status
            .approved_models
            .iter()
            .find(|a| a.id == m.id && a.revision == m.revision)
        {
            None => problems.push(format!(
                "model {}@{} is not approved by network {}",
                m.id, m.revision, network.spec.network_id
            )),
            Some(a) => {
                model_memory_mib = model_memory_mib.saturating_add(a.min_gpu_memory_mib);
                if !a.runtimes.iter().any(|r| r == kind.as_str()) {
                    problems.push(format!(
                        "model {}@{} is not approved for runtime {}",
                        m.id,
                        m.revision,
                        kind.as_str()
                    ));
                }
                if let Some(have) = spec.gpu.min_memory_mib
                    && have < a.min_gpu_memory_mib
                {
                    problems.push(format!(
                        "model {}@{} needs {} MiB of GPU memory, spec.gpu.minMemoryMib is {have}",
                        m.id, m.revision, a.min_gpu_memory_mib
                    ));
                }
            }
        }
    }
    if !is_extended_resource_name(&spec.gpu.resource_name) {
        problems.push(format!(
            "spec.gpu.resourceName {} is not a qualified extended resource name",
            spec.gpu.resource_name
        ));
    }
    match (spec.gpu.visibility, &spec.gpu.resource_claim_template_name) {
        (GpuVisibility::Dra, None) => problems.push(
            "spec.gpu.visibility dra needs spec.gpu.resourceClaimTemplateName (the ResourceClaimTemplate the pod's GPU claim is made from)".into(),
        ),
        (GpuVisibility::DevicePlugin | GpuVisibility::None, Some(_)) => problems.push(format!(
            "spec.gpu.resourceClaimTemplateName is used only with spec.gpu.visibility dra, not {}",
            spec.gpu.visibility.as_str()
        )),
        _ => {}
    }
    if let Some(url) = &spec.gpu.dcgm_url {
        if spec.gpu.visibility != GpuVisibility::DevicePlugin {
            problems.push(format!(
                "spec.gpu.dcgmUrl is used only with spec.gpu.visibility devicePlugin, not {}",
                spec.gpu.visibility.as_str()
            ));
        } else if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.chars().any(char::is_whitespace)
        {
            problems.push(format!("spec.gpu.dcgmUrl {url} is not an http(s) URL"));
        }
    }
    for arg in &spec.runtime.extra_args {
        let flag = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f);
        if operator_owned_flags(kind).contains(&flag) {
            problems.push(format!(
                "spec.runtime.extraArgs may not set {flag}: the operator sets it for runtime {}",
                kind.as_str()
            ));
        }
    }
    problems.extend(spec_problems(node));
    let env = network.spec.environment;
    let accepts = matches!(
        (spec.participation, env),
        (Participation::Both, _)
            | (
                Participation::Testnet,
                crate::crd::NetworkEnvironment::Testnet
            )
            | (
                Participation::Mainnet,
                crate::crd::NetworkEnvironment::Mainnet
            )
    );
    if !accepts {
        problems.push(format!(
            "spec.participation {} does not accept network environment {}",
            spec.participation.as_str(),
            env.as_str()
        ));
    }
    let mirrored = |image: String| match &defaults.image_registry {
        Some(r) => crate::images::mirror(&image, r),
        None => image,
    };
    let mapped = status
        .runtime_images
        .as_ref()
        .and_then(|m| match kind {
            RuntimeKind::Vllm => m.vllm.clone(),
            RuntimeKind::Triton => m.triton.clone(),
            // The network approves models for openai, but no single image serves them all.
            RuntimeKind::Openai => None,
        })
        .map(mirrored);
    let runtime_image = spec.runtime.image.clone().or(mapped);
    if runtime_image.is_none() {
        problems.push(if kind == RuntimeKind::Openai {
            "runtime openai needs spec.runtime.image: the network config maps no image to it"
                .to_owned()
        } else {
            format!(
                "the network config maps no image for runtime {}; set spec.runtime.image",
                kind.as_str()
            )
        });
    }
    if !problems.is_empty() {
        return Err(Blocker::Invalid(problems));
    }
    // A sidecar image named on the ResultityNetwork is used as written; the config's and the
    // default one go through the mirror.
    let sidecar_image = match (&status.sidecar_image, &network.spec.sidecar_image) {
        (Some(from_config), _) => mirrored(from_config.clone()),
        (None, Some(explicit)) => explicit.clone(),
        (None, None) => mirrored(defaults.sidecar_image.clone()),
    };
    // A new node is pinned with every key trusted now: during a rotation's overlap the
    // network still signs with the retiring set, which the new set alone would refuse.
    let mut network_keys = if status.trusted_keys.is_empty() {
        network.spec.public_keys.clone()
    } else {
        status.trusted_keys.clone()
    };
    for r in &status.retiring_keys {
        if !network_keys.contains(&r.key) {
            network_keys.push(r.key.clone());
        }
    }
    Ok(Resolved {
        network_id: network.spec.network_id.clone(),
        io_endpoint: network.spec.io_endpoint.clone(),
        network_keys,
        runtime_image: runtime_image.unwrap_or_default(),
        sidecar_image,
        network_config,
        model_memory_mib,
    })
}

/// Problems of the spec alone (model cache and the pod escape hatches): what the CRD's CEL
/// rules refuse, checked again here because an API server may not evaluate them, plus what
/// CEL cannot express (mounts that name a volume, literal secrets).
pub fn spec_problems(node: &ResultityNode) -> Vec<String> {
    use crate::model_cache::{cache_env_names, is_positive_quantity};
    use crate::pod_contract::{OPERATOR_VOLUMES, RUNTIME_MOUNT_PATHS, SIDECAR_MOUNT_PATHS};
    let spec = &node.spec;
    let kind = spec.runtime.kind;
    let mut problems = Vec::new();
    let cache = spec.model_cache.as_ref();
    match cache {
        None if kind == RuntimeKind::Triton => problems.push(
            "runtime triton needs spec.modelCache: its model repository is read from the cache volume"
                .to_owned(),
        ),
        None => {}
        Some(c) => {
            let sources = [
                c.volume_claim_template.is_some(),
                c.existing_claim.is_some(),
                c.host_path.is_some(),
                c.empty_dir.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                problems.push(
                    "spec.modelCache needs exactly one of volumeClaimTemplate, existingClaim, hostPath or emptyDir"
                        .to_owned(),
                );
            }
            if let Some(t) = &c.volume_claim_template {
                if !is_positive_quantity(&t.size.0) {
                    problems.push(format!(
                        "spec.modelCache.volumeClaimTemplate.size {} is not a positive quantity such as 200Gi",
                        t.size.0
                    ));
                }
                if t.access_modes.is_empty() {
                    problems.push(
                        "spec.modelCache.volumeClaimTemplate.accessModes must name at least one mode"
                            .to_owned(),
                    );
                }
            }
            if let Some(h) = &c.host_path
                && (!h.path.starts_with('/') || h.path.split('/').any(|p| p == ".."))
            {
                problems.push(format!(
                    "spec.modelCache.hostPath.path {} must be an absolute path without '..'",
                    h.path
                ));
            }
            if let Some(d) = &c.empty_dir
                && !is_positive_quantity(&d.size_limit.0)
            {
                problems.push(format!(
                    "spec.modelCache.emptyDir.sizeLimit {} is not a positive quantity such as 100Gi",
                    d.size_limit.0
                ));
            }
        }
    }

    let owned_env = cache_env_names(kind, cache);
    for e in &spec.runtime.env {
        if owned_env.contains(&e.name.as_str()) {
            problems.push(format!(
                "spec.runtime.env may not set {}: the operator points it at the model cache",
                e.name
            ));
        }
        if e.value.as_deref().is_some_and(|v| !v.is_empty()) && looks_secret(&e.name) {
            problems.push(format!(
                "spec.runtime.env {} holds a literal value; take it from a Secret (valueFrom.secretKeyRef or envFrom) so it is not stored in the resource",
                e.name
            ));
        }
    }
    for (i, e) in spec.runtime.env_from.iter().enumerate() {
        if e.secret_ref.is_some() == e.config_map_ref.is_some() {
            problems.push(format!(
                "spec.runtime.envFrom[{i}] must name exactly one of secretRef or configMapRef"
            ));
        }
    }

    let overrides = spec.pod.clone().unwrap_or_default();
    let mut names = std::collections::BTreeSet::new();
    for v in &overrides.volumes {
        if OPERATOR_VOLUMES.contains(&v.name.as_str()) {
            problems.push(format!(
                "spec.pod.volumes may not use the name {}: the operator uses it",
                v.name
            ));
        } else if !names.insert(v.name.as_str()) {
            problems.push(format!("spec.pod.volumes lists {} twice", v.name));
        }
    }
    let sidecar = spec.sidecar.clone().unwrap_or_default();
    let runtime_paths: &[&str] = if cache.is_some() {
        RUNTIME_MOUNT_PATHS
    } else {
        &RUNTIME_MOUNT_PATHS[..1]
    };
    for (field, mounts, owned) in [
        (
            "spec.runtime.volumeMounts",
            &spec.runtime.volume_mounts,
            runtime_paths,
        ),
        (
            "spec.sidecar.volumeMounts",
            &sidecar.volume_mounts,
            SIDECAR_MOUNT_PATHS,
        ),
    ] {
        let mut paths = std::collections::BTreeSet::new();
        for m in mounts {
            let path = m.mount_path.trim_end_matches('/');
            if !names.contains(m.name.as_str()) {
                problems.push(format!(
                    "{field} mounts volume {}, which spec.pod.volumes does not define",
                    m.name
                ));
            }
            if !m.mount_path.starts_with('/') {
                problems.push(format!("{field} path {} must be absolute", m.mount_path));
            } else if owned.contains(&path) {
                problems.push(format!(
                    "{field} may not mount at {}: the operator mounts there",
                    m.mount_path
                ));
            } else if !paths.insert(path) {
                problems.push(format!("{field} mounts {} twice", m.mount_path));
            }
        }
    }
    for key in overrides.labels.keys() {
        if is_operator_label(key) {
            problems.push(format!(
                "spec.pod.labels may not set {key}: the operator sets it"
            ));
        }
    }
    for key in overrides.annotations.keys() {
        if key.starts_with("resultity.com/") {
            problems.push(format!(
                "spec.pod.annotations may not set {key}: resultity.com/ annotations are the operator's"
            ));
        }
    }
    if let Some(shm) = &overrides.shm_size
        && !is_positive_quantity(&shm.0)
    {
        problems.push(format!(
            "spec.pod.shmSize {} is not a positive quantity such as 16Gi",
            shm.0
        ));
    }
    problems
}

/// Label keys the operator sets on the pod (and selects it by).
fn is_operator_label(key: &str) -> bool {
    use crate::crd::{LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME};
    key.starts_with("resultity.com/")
        || [LABEL_NAME, LABEL_INSTANCE, LABEL_MANAGED_BY].contains(&key)
}

/// Names that conventionally carry credentials (`HF_TOKEN`, `NGC_API_KEY`, …): a literal
/// value there would sit in the resource for anyone who can read it.
fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["TOKEN", "_KEY", "SECRET", "PASSWORD", "CREDENTIALS"]
        .iter()
        .any(|s| upper.ends_with(s))
}

/// Runtime flags the operator sets itself (ports the probes and the sidecar rely on, the model
/// the network approved); `extraArgs` overriding one would silently break the node.
pub fn operator_owned_flags(kind: RuntimeKind) -> &'static [&'static str] {
    match kind {
        RuntimeKind::Vllm => &["--port", "--model", "--revision", "--host"],
        RuntimeKind::Triton => &[
            "--http-port",
            "--model-control-mode",
            "--model-repository",
            "--allow-http",
        ],
        // The operator passes no flags to an OpenAI-compatible server: its flags are the user's.
        RuntimeKind::Openai => &[],
    }
}

/// `domain/name`, as the API server requires for extended resources (MIG names included).
fn is_extended_resource_name(name: &str) -> bool {
    let Some((domain, res)) = name.split_once('/') else {
        return false;
    };
    let ok_chars = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
            && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    domain.len() <= 253 && res.len() <= 63 && ok_chars(domain, b"-.") && ok_chars(res, b"-_.")
}

#[cfg(test)]
mod tests {
    use super::is_extended_resource_name;

    #[test]
    fn extended_resource_names() {
        assert!(is_extended_resource_name("nvidia.com/gpu"));
        assert!(is_extended_resource_name("nvidia.com/mig-1g.10gb"));
        assert!(!is_extended_resource_name("gpu"));
        assert!(!is_extended_resource_name("nvidia.com/"));
        assert!(!is_extended_resource_name("/gpu"));
        assert!(!is_extended_resource_name("nvidia.com/gpu-"));
    }
}
