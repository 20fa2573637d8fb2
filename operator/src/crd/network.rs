//! `ResultityNetwork` (cluster-scoped): where a network's IO service is and which keys sign its
//! configuration.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which network environment this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkEnvironment {
    Testnet,
    Mainnet,
}

impl From<NetworkEnvironment> for resultity_protocol::messages::common::Environment {
    fn from(e: NetworkEnvironment) -> Self {
        match e {
            NetworkEnvironment::Testnet => Self::Testnet,
            NetworkEnvironment::Mainnet => Self::Mainnet,
        }
    }
}

fn default_poll_seconds() -> u32 {
    60
}

/// A Resultity network the cluster's nodes join.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "resultity.com",
    version = "v1alpha1",
    kind = "ResultityNetwork",
    plural = "resultitynetworks",
    shortname = "rnet",
    category = "resultity",
    status = "ResultityNetworkStatus",
    doc = "A Resultity network: IO service endpoint and the pinned keys that sign its configuration",
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".spec.networkId"}"#,
    printcolumn = r#"{"name":"Env","type":"string","jsonPath":".spec.environment"}"#,
    printcolumn = r#"{"name":"Config","type":"integer","jsonPath":".status.configVersion"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.configDigestShort"}"#,
    printcolumn = r#"{"name":"Verified","type":"string","jsonPath":".status.conditions[?(@.type==\"ConfigVerified\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ResultityNetworkSpec {
    /// The network's id (a DNS label), e.g. `resultity-testnet`. Signed configs must name it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub network_id: String,
    /// Base URL of the network's IO service, e.g. `https://io.testnet.resultity.com`.
    #[schemars(length(min = 8, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('https://') || self.startsWith('http://')",
        "message": "ioEndpoint must be an http(s) URL"
    }]))]
    pub io_endpoint: String,
    /// Network signing keys (`rk1…`) trusted to sign the first config the operator sees; later
    /// rotations are followed only when signed by a trusted key.
    #[schemars(length(min = 1, max = 16))]
    pub public_keys: Vec<String>,
    pub environment: NetworkEnvironment,
    /// Seconds between polls of the network's config endpoint.
    #[serde(default = "default_poll_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub config_poll_interval_seconds: u32,
    /// Sidecar image used when the signed config names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_image: Option<String>,
}

/// Container images the verified config pins per runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeImageMapping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vllm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triton: Option<String>,
}

/// A model the verified config approves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovedModelStatus {
    pub id: String,
    pub revision: String,
    /// Runtimes allowed to serve it (`vllm`, `triton`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub min_gpu_memory_mib: u64,
}

/// A key of the previous set, trusted until its rotation's overlap window ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringKeyStatus {
    pub key: String,
    /// End of the overlap window (whole seconds, rounded down: the operator stops trusting the
    /// key at most a second early, never late).
    pub not_after_time: Time,
}

/// What the operator last verified of the network's configuration. The config in force is
/// kept here so rollback protection survives operator restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultityNetworkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Version of the last good (verified) config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// First 12 hex digits of `configDigest`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest_short: Option<String>,
    /// Config expiry; after it nodes refuse the config until a newer one is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_expires_time: Option<Time>,
    /// Keys trusted for the next config (the pinned keys until the network rotates them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<String>,
    /// Keys of the previous set during a rotation's overlap window: still trusted, and pinned
    /// into new nodes, until their `notAfterTime` (dropped from here when it passes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring_keys: Vec<RetiringKeyStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_images: Option<RuntimeImageMapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approved_models: Vec<ApprovedModelStatus>,
    /// Last fetch attempt, successful or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fetch_time: Option<Time>,
    /// Last time a config was verified (new or unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::schema::conditions")]
    pub conditions: Vec<Condition>,
}

impl ResultityNetwork {
    /// True once a verified config is known.
    pub fn has_config(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.config_version.is_some() && s.config_digest.is_some())
    }
}

impl NetworkEnvironment {
    /// The spelling of the resource (`testnet`, `mainnet`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Testnet => "testnet",
            Self::Mainnet => "mainnet",
        }
    }
    pub fn from_protocol(e: resultity_protocol::messages::common::Environment) -> Self {
        match e {
            resultity_protocol::messages::common::Environment::Testnet => Self::Testnet,
            resultity_protocol::messages::common::Environment::Mainnet => Self::Mainnet,
        }
    }
}
