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
}

impl Blocker {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NetworkNotFound(_) => "NetworkNotFound",
            Self::WaitingForNetworkConfig(_) => "WaitingForNetworkConfig",
            Self::Invalid(_) => "InvalidSpec",
            Self::Rejected(_) => "RejectedByAPIServer",
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
    let network_keys = if status.trusted_keys.is_empty() {
        network.spec.public_keys.clone()
    } else {
        status.trusted_keys.clone()
    };
    Ok(Resolved {
        network_id: network.spec.network_id.clone(),
        io_endpoint: network.spec.io_endpoint.clone(),
        network_keys,
        runtime_image: runtime_image.unwrap_or_default(),
        sidecar_image,
        network_config,
    })
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
