//! `ResultityFleet` (namespaced): N ResultityNodes from one template, rolled through spec and
//! network config changes with a drain-first, no-surge budget.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ResultityNodeSpec;

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

/// How a fleet replaces pods whose spec or runtime image changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Most nodes that may be unavailable at once: not Ready, not routable by the network, or
    /// in a rollout step. A number or a percentage of `replicas` (rounded down, at least 1).
    #[serde(default = "default_max_unavailable")]
    #[schemars(schema_with = "crate::crd::schema::int_or_percent")]
    pub max_unavailable: IntOrString,
    /// Nodes with an ordinal below this keep their current pods (canary: `replicas - 1`
    /// updates only the highest ordinal).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub partition: u32,
    /// Start no new rollout step; steps under way finish.
    #[serde(default)]
    pub paused: bool,
    /// A node still validating after this long fails the rollout.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 60, max = 86400))]
    pub progress_deadline_seconds: u32,
}

fn default_progress_deadline() -> u32 {
    1800
}

impl Default for RolloutStrategy {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            partition: 0,
            paused: false,
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// Which network config the fleet's pods follow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigPolicy {
    /// `follow`: roll to every new config the network publishes. `pin`: roll only while the
    /// network's config version is at most `version`.
    #[serde(default)]
    pub mode: ConfigMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConfigMode {
    #[default]
    Follow,
    Pin,
}

/// Labels and spec of every node the fleet creates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplate {
    /// Labels added to each ResultityNode (and matched by `spec.selector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub spec: ResultityNodeSpec,
}

/// N GPU nodes from one template, rolled out fleet-wide.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "resultity.com",
    version = "v1alpha1",
    kind = "ResultityFleet",
    plural = "resultityfleets",
    shortname = "rfleet",
    category = "resultity",
    namespaced,
    status = "ResultityFleetStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas"}"#,
    doc = "A fleet of Resultity GPU nodes from one template, with drain-first rollouts",
    // Node names are `<fleet>-<ordinal>` (ordinal up to 4 digits) and must stay label values.
    validation = kube::core::Rule::new("self.metadata.name.size() <= 58").message("metadata.name must be at most 58 characters (node names add -<ordinal> and are label values)"),
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Routable","type":"integer","jsonPath":".status.routable"}"#,
    printcolumn = r#"{"name":"Updated","type":"integer","jsonPath":".status.updated"}"#,
    printcolumn = r#"{"name":"Unavailable","type":"integer","jsonPath":".status.unavailable"}"#,
    printcolumn = r#"{"name":"Progressing","type":"string","jsonPath":".status.conditions[?(@.type==\"Progressing\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ResultityFleetSpec {
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: u32,
    /// Must match `template.labels`; selects the fleet's nodes for status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub template: NodeTemplate,
    #[serde(default)]
    pub strategy: RolloutStrategy,
    #[serde(default)]
    pub config_policy: ConfigPolicy,
}

/// A node's place in a rollout, recorded on the node (label and status).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RolloutStep {
    /// Out of date, waiting for a slot in the budget.
    Pending,
    /// Granted: the sidecar drains (no new jobs, in-flight finished or handed back).
    Draining,
    /// The old pod is gone or going; the new one is being created.
    Replacing,
    /// The new pod runs; waiting for Ready (engine up, registered, connected, ConfigInSync).
    Validating,
    /// Up to date and Ready.
    Done,
    /// The new pod did not become Ready; the rollout stops here.
    Failed,
}

impl RolloutStep {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Draining => "draining",
            Self::Replacing => "replacing",
            Self::Validating => "validating",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "draining" => Self::Draining,
            "replacing" => Self::Replacing,
            "validating" => Self::Validating,
            "done" => Self::Done,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
    /// Steps in which the node's pod may be drained and replaced.
    pub fn grants_replacement(self) -> bool {
        matches!(self, Self::Draining | Self::Replacing)
    }
    /// Steps that hold a slot of the unavailability budget.
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Draining | Self::Replacing | Self::Validating)
    }
}

/// How many nodes have applied one config digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DigestCount {
    pub digest: String,
    pub nodes: u32,
}

/// One rollout transition, for `kubectl describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStepRecord {
    pub node: String,
    pub step: RolloutStep,
    pub time: Time,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Observed state of a fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultityFleetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes that exist.
    #[serde(default)]
    pub replicas: u32,
    /// Nodes whose Ready condition is True.
    #[serde(default)]
    pub ready: u32,
    /// Nodes the network routes jobs to (NetworkRoutable True).
    #[serde(default)]
    pub routable: u32,
    /// Nodes whose pod runs the desired spec.
    #[serde(default)]
    pub updated: u32,
    /// Nodes not Ready, not routable, or in a rollout step (what `maxUnavailable` bounds).
    #[serde(default)]
    pub unavailable: u32,
    /// The network config the fleet rolls toward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_config_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_config_version: Option<u64>,
    /// Nodes per applied config digest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_digests: Vec<DigestCount>,
    /// The most recent rollout transitions, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_steps: Vec<RolloutStepRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::schema::conditions")]
    pub conditions: Vec<Condition>,
}

impl ResultityFleet {
    /// The stable name of the node with `ordinal`.
    pub fn node_name(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.metadata.name.as_deref().unwrap_or(""))
    }
    /// The ordinal of a node named by [`Self::node_name`], if `name` is one of ours.
    pub fn ordinal_of(&self, name: &str) -> Option<u32> {
        let prefix = format!("{}-", self.metadata.name.as_deref()?);
        let rest = name.strip_prefix(&prefix)?;
        // Reject `01`, `+1` and the like: exactly the spelling node_name produces.
        let n: u32 = rest.parse().ok()?;
        (n.to_string() == rest).then_some(n)
    }
}
