//! The Helm chart against the code it installs: every rendered document parses into its
//! Kubernetes type (no field silently dropped), the RBAC grants exactly the verbs the
//! operator's API calls need, the chart's CRDs are the generated ones, and the dashboard and
//! alerts query only metrics the binaries export.
//!
//! Helm: `$HELM`, else `ci-tools/bin/helm` (installed by `.ci/install-helm.sh`), else `helm` on
//! `PATH`. Without helm the checks that need a render are reported as skipped on stderr —
//! unless `CI=true`, where a missing helm fails the test (CI must never pass unchecked).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("charts/resultity-operator")
}

// ---------------------------------------------------------------------------------------
// Helm

fn helm() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("HELM").map(PathBuf::from),
        Some(root().join("ci-tools/bin/helm")),
    ];
    for c in candidates.into_iter().flatten() {
        if c.is_file() {
            return Some(c);
        }
    }
    if Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("helm"));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "helm is required when CI=true: run .ci/install-helm.sh (installs into ci-tools/bin)"
    );
    eprintln!(
        "SKIPPED: helm not found (set HELM, run .ci/install-helm.sh, or put helm on PATH); \
         the chart render checks did not run"
    );
    None
}

/// The value sets CI renders: the defaults, each `ci/*-values.yaml`, and all of them at once.
fn value_sets() -> Vec<(String, Vec<PathBuf>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected the CI value sets in ci/");
    let mut sets = vec![("default".to_owned(), vec![])];
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        sets.push((name, vec![f.clone()]));
    }
    sets.push(("all".to_owned(), files));
    sets
}

fn render(helm: &Path, values: &[PathBuf]) -> Vec<Value> {
    render_with(helm, values, &[])
}

/// Renders with value files and `--set-json` overrides (`key=json`).
fn render_with(helm: &Path, values: &[PathBuf], sets: &[&str]) -> Vec<Value> {
    let out = helm_template(helm, values, sets);
    assert!(
        out.status.success(),
        "helm template {values:?} {sets:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(&String::from_utf8(out.stdout).unwrap())
}

fn helm_template(helm: &Path, values: &[PathBuf], sets: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "resultity", "--namespace", "resultity-system"])
        .arg(chart());
    for v in values {
        cmd.arg("--values").arg(v);
    }
    for s in sets {
        cmd.arg("--set-json").arg(s);
    }
    cmd.output().unwrap()
}

fn parse_documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// Typed parsing: a field the type does not know (a typo in a template) would be dropped
// silently by serde, so each document must survive a round trip through its type unchanged.

/// prometheus-operator kinds, reduced to the fields the chart uses; unknown fields fail.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MonitoringObject<S> {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: S,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    endpoints: Vec<ScrapeEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    pod_metrics_endpoints: Vec<ScrapeEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    any: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    match_names: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ScrapeEndpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relabelings: Vec<Relabeling>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertRule>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// Paths present in `orig` that the typed round trip lost or changed.
fn lost_fields(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &format!("{path}.{k}"), out),
                    // An explicit null (clearing a field on upgrade) is an absent field.
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        // YAML renders an integer-valued quantity or an IntOrString as a number or a string;
        // the typed value must still say the same thing.
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n))
            if n.to_string() == *s => {}
        _ => out.push(format!("{path} ({orig} became {back})")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!("fields unknown to the type: {}", lost.join(", ")))
    }
}

fn parse_typed(doc: &Value) -> Result<(), String> {
    match (doc["apiVersion"].as_str().unwrap_or(""), kind(doc)) {
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Pod") => round_trip::<Pod>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("batch/v1", "Job") => round_trip::<Job>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(doc),
        ("resultity.com/v1alpha1", "ResultityNetwork") => {
            round_trip::<resultity_operator::crd::ResultityNetwork>(doc)
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            round_trip::<MonitoringObject<ServiceMonitorSpec>>(doc)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => {
            round_trip::<MonitoringObject<PodMonitorSpec>>(doc)
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            round_trip::<MonitoringObject<PrometheusRuleSpec>>(doc)
        }
        (api, kind) => Err(format!(
            "no type known for {api} {kind}: add it to parse_typed"
        )),
    }
}

#[test]
fn every_rendered_document_parses_into_its_type() {
    let Some(helm) = helm() else { return };
    let mut kinds = BTreeSet::new();
    for (name, values) in value_sets() {
        let docs = render(&helm, &values);
        assert!(!docs.is_empty(), "{name}: nothing rendered");
        for doc in &docs {
            let id = format!("{name}: {} {}", kind(doc), doc["metadata"]["name"]);
            if let Err(e) = parse_typed(doc) {
                panic!("{id}: {e}");
            }
            kinds.insert(kind(doc).to_owned());
        }
        let deploy = docs
            .iter()
            .find(|d| kind(d) == "Deployment")
            .unwrap_or_else(|| panic!("{name}: no Deployment"));
        let c = &deploy["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez", "{name}");
    }
    // The value sets together exercise every template.
    for k in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ResultityNetwork",
        "Pod",
        "Job",
    ] {
        assert!(kinds.contains(k), "no value set renders a {k}: {kinds:?}");
    }
}

#[test]
fn registry_override_reaches_every_image_and_pull_secrets_apply() {
    let Some(helm) = helm() else { return };
    let values = vec![
        chart().join("ci/private-registry-values.yaml"),
        chart().join("ci/network-values.yaml"),
    ];
    check_registry_override(&render(&helm, &values));
    // An umbrella chart's `global.imageRegistry` does the same, and wins over the chart's own.
    let network = vec![chart().join("ci/network-values.yaml")];
    let global = r#"global={"imageRegistry":"registry.example.com/mirror"}"#;
    let pull = r#"imagePullSecrets=[{"name":"regcred"}]"#;
    check_registry_override(&render_with(&helm, &network, &[global, pull]));
    let both = [
        global,
        pull,
        r#"imageRegistry="registry.example.com/other""#,
    ];
    check_registry_override(&render_with(&helm, &network, &both));
}

fn check_registry_override(docs: &[Value]) {
    let mut images = Vec::new();
    for d in docs {
        let spec = match kind(d) {
            "Deployment" | "Job" => &d["spec"]["template"]["spec"],
            "Pod" => &d["spec"],
            _ => continue,
        };
        assert_eq!(
            spec["imagePullSecrets"][0]["name"],
            "regcred",
            "{}",
            kind(d)
        );
        for c in spec["containers"].as_array().unwrap() {
            images.push(c["image"].as_str().unwrap().to_owned());
            for e in c["env"].as_array().into_iter().flatten() {
                if e["name"] == "RESULTITY_DEFAULT_SIDECAR_IMAGE" {
                    images.push(e["value"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert_eq!(
        images.len(),
        4,
        "operator, default sidecar, doctor, CRD upgrade hook: {images:?}"
    );
    for i in &images {
        assert!(
            i.starts_with("registry.example.com/mirror/resultity/"),
            "{i} ignores imageRegistry"
        );
    }
    // The chart rewrites its images exactly as the operator rewrites the network's.
    let sidecar = format!(
        "{}:{}",
        helm_values()["sidecarImage"]["repository"]
            .as_str()
            .unwrap(),
        chart_app_version()
    );
    let expected = resultity_operator::images::mirror(&sidecar, "registry.example.com/mirror");
    assert!(images.contains(&expected), "{expected} not in {images:?}");
    let deploy = docs.iter().find(|d| kind(d) == "Deployment").unwrap();
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "RESULTITY_IMAGE_REGISTRY"
            && e["value"] == "registry.example.com/mirror"),
        "the operator is not told the registry: {env:?}"
    );
}

// ---------------------------------------------------------------------------------------
// NetworkPolicies

/// The NetworkPolicy in namespace `ns` (the chart renders at most one per namespace).
fn policy<'a>(docs: &'a [Value], ns: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == "NetworkPolicy" && d["metadata"]["namespace"] == ns)
        .unwrap_or_else(|| panic!("no NetworkPolicy in {ns}"))
}

fn egress_rules(policy: &Value) -> &Vec<Value> {
    policy["spec"]["egress"].as_array().unwrap()
}

/// The TCP ports of an egress rule.
fn rule_ports(rule: &Value) -> Vec<u64> {
    rule["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"] == "TCP")
        .map(|p| p["port"].as_u64().unwrap())
        .collect()
}

/// The IO rule: the one whose peers are `networkPolicy.ioCIDRs` of the value set.
fn io_ports(policy: &Value) -> Vec<u64> {
    let io = egress_rules(policy)
        .iter()
        .find(|r| r["to"][0]["ipBlock"]["cidr"] == "203.0.113.0/24")
        .unwrap_or_else(|| panic!("no IO egress rule in {policy}"));
    rule_ports(io)
}

/// The operator (and the `helm test` pod, which shares its labels) and node pods may reach the
/// IO service on the port its URL names, not a fixed 443.
#[test]
fn io_egress_ports_follow_the_io_endpoint() {
    let Some(helm) = helm() else { return };
    let values = vec![chart().join("ci/private-registry-values.yaml")];
    let cases: [(&[&str], &[u64]); 6] = [
        (&[], &[443]),
        (
            &[r#"network.ioEndpoint="http://io.resultity:8080""#],
            &[8080],
        ),
        (&[r#"network.ioEndpoint="http://io.resultity""#], &[80]),
        (
            &[r#"network.ioEndpoint="https://[fd00::1]:8443/api""#],
            &[8443],
        ),
        (
            &[
                r#"network.ioEndpoint="https://io.resultity""#,
                r#"tests.ioEndpoint="http://io-staging:8080""#,
            ],
            &[443, 8080],
        ),
        (
            &[
                r#"network.ioEndpoint="http://io.resultity:8080""#,
                r#"networkPolicy.ioPorts=[9000,9001]"#,
            ],
            &[9000, 9001],
        ),
    ];
    for (sets, want) in cases {
        let docs = render_with(&helm, &values, sets);
        for ns in ["resultity-system", "resultity", "resultity-b"] {
            assert_eq!(io_ports(policy(&docs, ns)), want, "{ns} with {sets:?}");
        }
    }
}

/// Node pods default to `gpu.visibility: devicePlugin`, where the sidecar reads dcgm-exporter
/// on port 9400 of the node: the node policy must let it through, or no GPU is ever visible.
#[test]
fn node_pods_may_reach_dcgm_exporter() {
    let Some(helm) = helm() else { return };
    let values = vec![chart().join("ci/private-registry-values.yaml")];
    let dcgm_rules = |docs: &[Value]| -> Vec<Value> {
        egress_rules(policy(docs, "resultity"))
            .iter()
            .filter(|r| r["ports"].as_array().is_some_and(|p| p.len() == 1))
            .filter(|r| matches!(rule_ports(r)[..], [9400 | 9500]))
            .cloned()
            .collect()
    };
    let default = render(&helm, &values);
    let rules = dcgm_rules(&default);
    assert_eq!(rules.len(), 1, "no dcgm-exporter egress by default");
    // The default URL is the node's host IP: only "anywhere" (or an ipBlock) reaches it.
    assert!(rules[0].get("to").is_none(), "{}", rules[0]);
    assert!(
        egress_rules(policy(&default, "resultity-system"))
            .iter()
            .all(|r| !rule_ports(r).contains(&9400)),
        "the operator does not read dcgm-exporter"
    );

    let narrowed = render_with(
        &helm,
        &values,
        &[
            "networkPolicy.dcgmExporter.port=9500",
            r#"networkPolicy.dcgmExporter.to=[{"ipBlock":{"cidr":"10.20.0.0/16"}}]"#,
        ],
    );
    let rules = dcgm_rules(&narrowed);
    assert_eq!(rule_ports(&rules[0]), [9500]);
    assert_eq!(rules[0]["to"][0]["ipBlock"]["cidr"], "10.20.0.0/16");

    let off = render_with(
        &helm,
        &values,
        &["networkPolicy.dcgmExporter.enabled=false"],
    );
    assert!(dcgm_rules(&off).is_empty(), "dcgm egress when disabled");
}

// ---------------------------------------------------------------------------------------
// Upgrades between value sets

/// A merge of `new` over `live` as an upgrade applies it, both by Helm 3's three-way merge and
/// by server-side apply: fields the previous manifest set and the new one drops are removed,
/// an explicit null removes, everything else the new manifest sets wins, and fields the API
/// server defaulted (never in a manifest) stay.
fn upgrade(live: &Value, old: &Value, new: &Value) -> Value {
    let Value::Object(n) = new else {
        return new.clone();
    };
    // Creating: nothing live yet (an explicit null then just means absent).
    let mut out = match live {
        Value::Object(l) => l.clone(),
        _ => serde_json::Map::new(),
    };
    if let Value::Object(o) = old {
        for k in o.keys().filter(|k| !n.contains_key(*k)) {
            out.remove(k);
        }
    }
    for (k, v) in n {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = match out.get(k) {
                Some(lv) => upgrade(lv, &old[k], v),
                None => upgrade(&Value::Null, &old[k], v),
            };
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

/// The API server's defaulting and validation of `spec.strategy` (apps/v1 Deployment).
fn default_strategy(strategy: &Value) -> Value {
    let mut s = strategy.clone();
    if s.get("type").is_none() {
        s["type"] = "RollingUpdate".into();
    }
    if s["type"] == "RollingUpdate" && s.get("rollingUpdate").is_none() {
        s["rollingUpdate"] = serde_json::json!({"maxSurge": "25%", "maxUnavailable": "25%"});
    }
    s
}

fn strategy_problem(strategy: &Value) -> Option<String> {
    (strategy["type"] == "Recreate" && strategy.get("rollingUpdate").is_some()).then(|| {
        format!("spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy type is 'Recreate' ({strategy})")
    })
}

/// `helm upgrade --set leaderElection.enabled=false` from an install with it on (and back)
/// leaves a Deployment the API server accepts.
#[test]
fn toggling_leader_election_keeps_the_deployment_strategy_valid() {
    let Some(helm) = helm() else { return };
    let strategy = |enabled: bool| {
        let docs = render_with(&helm, &[], &[&format!("leaderElection.enabled={enabled}")]);
        let d = docs.iter().find(|d| kind(d) == "Deployment").unwrap();
        d["spec"]["strategy"].clone()
    };
    let (on, off) = (strategy(true), strategy(false));
    assert_eq!(on["type"], "RollingUpdate");
    assert_eq!(off["type"], "Recreate");
    for (from, to, name) in [(&on, &off, "on -> off"), (&off, &on, "off -> on")] {
        let installed = default_strategy(&upgrade(&Value::Null, &Value::Null, from));
        assert_eq!(strategy_problem(&installed), None, "install ({name})");
        let upgraded = default_strategy(&upgrade(&installed, from, to));
        assert_eq!(strategy_problem(&upgraded), None, "upgrade {name}");
        assert_eq!(upgraded["type"], to["type"], "upgrade {name}");
    }
}

fn helm_values() -> Value {
    serde_norway::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap()
}

fn chart_app_version() -> String {
    let c: Value =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    c["appVersion"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// RBAC derived from the operator's code

/// (API group, resource or resource/subresource, verb).
type Grant = (String, String, String);

/// Kubernetes types the operator may use, by kind: group and plural from k8s-openapi itself.
fn builtin_kinds() -> BTreeMap<&'static str, (&'static str, &'static str)> {
    use k8s_openapi::Resource;
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            BTreeMap::from([$((<$t>::KIND, (<$t>::GROUP, <$t>::URL_PATH_SEGMENT))),*])
        };
    }
    kinds![
        k8s_openapi::api::core::v1::Pod,
        k8s_openapi::api::core::v1::Secret,
        k8s_openapi::api::core::v1::ConfigMap,
        k8s_openapi::api::core::v1::Service,
        k8s_openapi::api::core::v1::ServiceAccount,
        k8s_openapi::api::core::v1::Namespace,
        k8s_openapi::api::core::v1::Node,
        k8s_openapi::api::core::v1::PersistentVolumeClaim,
        k8s_openapi::api::apps::v1::Deployment,
        k8s_openapi::api::apps::v1::StatefulSet,
        k8s_openapi::api::apps::v1::DaemonSet,
        k8s_openapi::api::coordination::v1::Lease,
        k8s_openapi::api::events::v1::Event,
        k8s_openapi::api::policy::v1::PodDisruptionBudget,
        k8s_openapi::api::networking::v1::NetworkPolicy,
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ]
}

/// Our CRDs' kinds, from the generated manifests.
fn crd_kinds() -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for (_, text) in crd_files(&root().join("crds")) {
        for d in parse_documents(&text) {
            let spec = &d["spec"];
            out.insert(
                spec["names"]["kind"].as_str().unwrap().to_owned(),
                (
                    spec["group"].as_str().unwrap().to_owned(),
                    spec["names"]["plural"].as_str().unwrap().to_owned(),
                ),
            );
        }
    }
    out
}

/// `Api` methods and the verbs they use.
fn method_verbs(method: &str) -> Option<(&'static [&'static str], Option<&'static str>)> {
    Some(match method {
        "get" | "get_opt" | "get_metadata" | "get_metadata_opt" => (&["get"], None),
        "list" | "list_metadata" => (&["list"], None),
        "watch" | "watch_metadata" => (&["watch"], None),
        "create" => (&["create"], None),
        "replace" => (&["update"], None),
        "patch" | "patch_metadata" => (&["patch"], None),
        "delete" => (&["delete"], None),
        "delete_collection" => (&["deletecollection"], None),
        "get_status" => (&["get"], Some("status")),
        "patch_status" => (&["patch"], Some("status")),
        "replace_status" => (&["update"], Some("status")),
        // Not API calls.
        "clone" | "resource_url" | "into_client" => (&[], None),
        _ => return None,
    })
}

/// kube-runtime functions that take an `Api` and the verbs they use with it.
const API_CONSUMERS: &[(&str, &[&str])] = &[
    ("watcher", &["list", "watch"]),
    ("metadata_watcher", &["list", "watch"]),
    ("await_condition", &["list", "watch"]),
    ("Controller::new", &["list", "watch"]),
    (".owns", &["list", "watch"]),
    (".watches", &["list", "watch"]),
    // kube's finalizer helper adds and removes its finalizer with a JSON patch.
    ("finalizer", &["patch"]),
];

/// The source with `#[cfg(test)]` items removed and line comments blanked.
fn production_source(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            // Keep URLs inside string literals ("http://…") intact.
            Some(i) if !line[..i].ends_with(':') => &line[..i],
            _ => line,
        };
        s.push_str(code);
        s.push('\n');
    }
    while let Some(start) = s.find("#[cfg(test)]") {
        let Some(open) = s[start..].find('{').map(|o| start + o) else {
            s.truncate(start);
            break;
        };
        // A `#[cfg(test)] use …;` has its `;` before any `{`.
        if let Some(semi) = s[start..open].find(';') {
            s.replace_range(start..start + semi + 1, "");
            continue;
        }
        let mut depth = 0usize;
        let mut end = s.len();
        for (i, ch) in s[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s.replace_range(start..end, "");
    }
    s
}

/// Strips wrappers that do not change the resource: `DeserializeGuard<T>`,
/// `PartialObjectMeta<T>`, paths.
fn base_type(t: &str) -> String {
    let mut t = t.trim().trim_start_matches('&').trim().to_owned();
    for w in ["DeserializeGuard<", "PartialObjectMeta<"] {
        if let Some(i) = t.find(w) {
            t = t[i + w.len()..].trim_end_matches('>').to_owned();
        }
    }
    t.rsplit("::").next().unwrap().trim().to_owned()
}

/// Splits `A, B<C, D>, E` at top-level commas.
fn split_top(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0i32;
    for ch in s.chars() {
        match ch {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(ch);
    }
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The text of the call whose `(` is at `open`, up to its matching `)`.
fn call_args(s: &str, open: usize) -> &str {
    let mut depth = 0i32;
    for (i, ch) in s[open..].char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &s[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    &s[open..]
}

/// Every grant the Rust source in `files` needs, or the places the scan cannot read.
fn derive_grants(
    files: &[(String, String)],
    kinds: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<BTreeSet<Grant>, Vec<String>> {
    let typed =
        regex::Regex::new(r"\b(\w+)\s*:\s*&?\s*(?:mut\s+)?Api<((?:[^<>]|<[^<>]*>)+)>").unwrap();
    let tuple =
        regex::Regex::new(r"let\s*\(([^)]*)\)\s*:\s*\(((?:[^()]|\([^()]*\))*)\)\s*=").unwrap();
    let turbofish =
        regex::Regex::new(r"let\s+(?:mut\s+)?(\w+)\s*=\s*Api::<((?:[^<>]|<[^<>]*>)+)>::").unwrap();
    let ctor = regex::Regex::new(r"Api::(?:<[^>]*>::)?(?:all|namespaced|default_namespaced|all_with|namespaced_with|default_namespaced_with)\s*\(").unwrap();
    let fn_start = regex::Regex::new(r"\bfn\s+\w+").unwrap();
    let raw_request =
        regex::Regex::new(r"\.request(?:_text|_stream|_events)?\s*(?:::<[^>]*>)?\s*\(").unwrap();
    // `use path::{Event as KubeEvent}`: the scan sees the alias, the kinds table the type.
    let alias = regex::Regex::new(r"\b(\w+)\s+as\s+(\w+)\b").unwrap();
    let aliases: BTreeMap<String, String> = files
        .iter()
        .flat_map(|(_, text)| text.lines().filter(|l| l.trim_start().starts_with("use ")))
        .flat_map(|l| alias.captures_iter(l).collect::<Vec<_>>())
        .map(|c| (c[2].to_owned(), c[1].to_owned()))
        .collect();
    let mut grants = BTreeSet::new();
    let mut problems = Vec::new();
    let add = |grants: &mut BTreeSet<Grant>,
               t: &str,
               verbs: &[&str],
               sub: Option<&str>,
               at: &str,
               problems: &mut Vec<String>| {
        let base = base_type(t);
        let base = aliases.get(&base).cloned().unwrap_or(base);
        let Some((group, plural)) = kinds(&base) else {
            problems.push(format!(
                "{at}: unknown resource type {t}: add it to builtin_kinds"
            ));
            return;
        };
        let resource = match sub {
            Some(s) => format!("{plural}/{s}"),
            None => plural,
        };
        for v in verbs {
            grants.insert((group.clone(), resource.clone(), (*v).to_owned()));
        }
    };

    let sources: Vec<(&String, String)> = files
        .iter()
        .map(|(path, text)| (path, production_source(text)))
        .collect();
    // Struct fields typed `Api<T>` (a declaration alone on its line), reachable as `x.field`
    // from any file of the crate.
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for (_, src) in &sources {
        for c in typed.captures_iter(src) {
            let before = &src[..c.get(0).unwrap().start()];
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let prefix = before[line_start..].trim();
            if prefix.is_empty() || prefix == "pub" || prefix.starts_with("pub(") {
                fields.insert(c[1].to_owned(), c[2].to_owned());
            }
        }
    }
    for (path, src) in &sources {
        let src = src.as_str();
        let starts: Vec<usize> = fn_start
            .find_iter(src)
            .map(|m| m.start())
            .chain([src.len()])
            .collect();
        let mut chunks = vec![(0usize, starts[0])];
        chunks.extend(starts.windows(2).map(|w| (w[0], w[1])));
        for (from, to) in chunks {
            let body = &src[from..to];
            let line = |off: usize| src[..from + off].lines().count() + 1;
            let mut locals: Vec<(String, String)> = Vec::new();
            for c in typed.captures_iter(body) {
                locals.push((c[1].to_owned(), c[2].to_owned()));
            }
            for c in tuple.captures_iter(body) {
                let names = split_top(&c[1]);
                let types = split_top(&c[2]);
                for (n, t) in names.iter().zip(types) {
                    if let Some(inner) = t.strip_prefix("Api<").and_then(|t| t.strip_suffix('>')) {
                        locals.push((n.trim_start_matches("mut ").to_owned(), inner.to_owned()));
                    }
                }
            }
            for c in turbofish.captures_iter(body) {
                locals.push((c[1].to_owned(), c[2].to_owned()));
            }
            // Every constructed Api must have a type the scan can see.
            for m in ctor.find_iter(body) {
                // The binding must be the statement this constructor is in (no `;` between).
                let stmt_start = body[..m.start()]
                    .rfind("let ")
                    .filter(|s| !body[*s..m.start()].contains(';'));
                let ok = stmt_start.is_some_and(|s| {
                    let pat_end = body[s..].find('=').map_or(body.len(), |e| s + e);
                    body[s..pat_end].contains("Api<")
                        || (m.as_str().contains("::<")
                            && turbofish.find(&body[s..]).is_some_and(|t| t.start() == 0))
                });
                let in_fn_returning_api = body
                    .find('{')
                    .is_some_and(|b| body[..b].contains("-> Api<"));
                if !ok && !in_fn_returning_api {
                    problems.push(format!(
                        "{path}:{}: an Api is constructed without a visible type; write `let x: Api<T> = …`",
                        line(m.start())
                    ));
                }
            }
            // Calls on each binding (`x.m(`, `x.clone().m(`, `self.x.m(`).
            let mut bindings: Vec<(String, String, bool)> = locals
                .iter()
                .map(|(n, t)| (n.clone(), t.clone(), false))
                .collect();
            bindings.extend(fields.iter().map(|(n, t)| (n.clone(), t.clone(), true)));
            for (name, ty, is_field) in &bindings {
                let call = regex::Regex::new(&format!(
                    r"(^|[^\w.])({}{name})\s*(?:\.\s*clone\s*\(\s*\))?\s*\.\s*(\w+)\s*\(",
                    if *is_field { r"\w+\s*\.\s*" } else { "" }
                ))
                .unwrap();
                for c in call.captures_iter(body) {
                    let method = &c[3];
                    let at = format!("{path}:{}", line(c.get(3).unwrap().start()));
                    let Some((verbs, sub)) = method_verbs(method) else {
                        problems.push(format!(
                            "{at}: Api method {method} on {name}: add its verbs to method_verbs"
                        ));
                        continue;
                    };
                    add(&mut grants, ty, verbs, sub, &at, &mut problems);
                    if method == "patch" {
                        let open = c.get(0).unwrap().end() - 1;
                        let args = call_args(body, open);
                        // Server-side apply creates the object when it does not exist yet.
                        if args.contains("PatchParams::apply") || args.contains("Patch::Apply") {
                            add(&mut grants, ty, &["create"], None, &at, &mut problems);
                        }
                    }
                }
                for (func, verbs) in API_CONSUMERS {
                    let pat = regex::Regex::new(&format!(
                        r"{}\s*\(\s*&?\s*{}{name}\b",
                        regex::escape(func),
                        if *is_field { r"\w+\s*\.\s*" } else { "" }
                    ))
                    .unwrap();
                    for m in pat.find_iter(body) {
                        let at = format!("{path}:{}", line(m.start()));
                        add(&mut grants, ty, verbs, None, &at, &mut problems);
                    }
                }
            }
        }
        // Raw requests bypass `Api`: their verbs cannot be read from the code.
        for m in raw_request.find_iter(src) {
            problems.push(format!(
                "{path}:{}: raw API request; use a typed Api<T> so RBAC can be derived",
                src[..m.start()].lines().count()
            ));
        }
        // kube's event Recorder creates events.k8s.io Events and patches them into series.
        if src.contains("Recorder::new(") {
            for v in ["create", "patch"] {
                grants.insert(("events.k8s.io".into(), "events".into(), v.into()));
            }
        }
    }
    if problems.is_empty() {
        Ok(grants)
    } else {
        Err(problems)
    }
}

fn rust_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(root()).unwrap().display().to_string();
            out.push((rel, std::fs::read_to_string(&p).unwrap()));
        }
    }
}

fn operator_kinds() -> impl Fn(&str) -> Option<(String, String)> {
    let builtin = builtin_kinds();
    let crds = crd_kinds();
    move |k: &str| {
        builtin
            .get(k)
            .map(|(g, p)| ((*g).to_owned(), (*p).to_owned()))
            .or_else(|| crds.get(k).cloned())
    }
}

/// The module behind `resultity-operator crd --apply`, run by the chart's CRD upgrade hook
/// Job under its own ServiceAccount, never by the operator Deployment.
const CRD_APPLY_SOURCE: &str = "operator/src/crd_apply.rs";

/// Grants the operator's code needs: the Deployment's (`hook == false`), or the CRD upgrade
/// hook's (`hook == true`).
fn code_grants(hook: bool) -> BTreeSet<Grant> {
    let mut files = Vec::new();
    rust_files(&root().join("operator/src"), &mut files);
    files.retain(|(path, _)| (path == CRD_APPLY_SOURCE) == hook);
    files.sort();
    assert!(!files.is_empty(), "{CRD_APPLY_SOURCE} moved?");
    match derive_grants(&files, &operator_kinds()) {
        Ok(g) => g,
        Err(p) => panic!("cannot derive the operator's RBAC:\n{}", p.join("\n")),
    }
}

fn operator_grants() -> BTreeSet<Grant> {
    code_grants(false)
}

fn is_hook(doc: &Value) -> bool {
    doc["metadata"]["annotations"]["helm.sh/hook"].is_string()
}

fn grants_of(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(
                        g != "*" && res != "*" && v != "*",
                        "wildcard in a rule: {r:?}"
                    );
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

/// Grants of the operator's roles (hooks excluded).
fn rendered_grants(docs: &[Value]) -> BTreeSet<Grant> {
    let docs: Vec<Value> = docs.iter().filter(|d| !is_hook(d)).cloned().collect();
    roles_grants(&docs)
}

fn roles_grants(docs: &[Value]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for d in docs {
        let rules = match kind(d) {
            "ClusterRole" => serde_json::from_value::<ClusterRole>(d.clone())
                .unwrap()
                .rules
                .unwrap_or_default(),
            "Role" => serde_json::from_value::<Role>(d.clone())
                .unwrap()
                .rules
                .unwrap_or_default(),
            _ => continue,
        };
        out.extend(grants_of(&rules));
    }
    out
}

fn show(set: &BTreeSet<Grant>) -> String {
    set.iter()
        .map(|(g, r, v)| format!("  {}/{r}: {v}", if g.is_empty() { "core" } else { g }))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rbac_scan_reads_the_patterns_it_claims_to() {
    let code = r#"
        async fn a(client: Client) {
            let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
            pods.patch("p", &PatchParams::apply("m").force(), &Patch::Apply(&x)).await;
            let (nodes, s): (Api<DeserializeGuard<ResultityNode>>, Api<Secret>) = (Api::all(c), Api::all(c));
            let w = watcher(nodes, cfg);
            s
                .get_opt("x")
                .await;
            // s.delete("commented out") must not count
        }
        fn b(api: &Api<Lease>) { api.replace("n", &pp, &l); }
        #[cfg(test)]
        mod tests { fn c(secrets: Api<Secret>) { secrets.delete("x", &dp); } }
    "#;
    let g = derive_grants(&[("x.rs".into(), code.into())], &operator_kinds()).unwrap();
    let want: BTreeSet<Grant> = [
        ("", "pods", "create"),
        ("", "pods", "patch"),
        ("resultity.com", "resultitynodes", "list"),
        ("resultity.com", "resultitynodes", "watch"),
        ("", "secrets", "get"),
        ("coordination.k8s.io", "leases", "update"),
    ]
    .into_iter()
    .map(|(a, b, c)| (a.into(), b.into(), c.into()))
    .collect();
    assert_eq!(g, want, "derived:\n{}", show(&g));

    let untyped = "fn d(c: Client) { let p = Api::all(c); p.list(&lp); }";
    let err = derive_grants(&[("y.rs".into(), untyped.into())], &operator_kinds()).unwrap_err();
    assert!(err[0].contains("without a visible type"), "{err:?}");
    let ctx = "pub struct Ctx {\n    pub nodes: Api<ResultityNode>,\n}\n";
    let user = "fn e(ctx: &Ctx) { ctx.nodes.patch_status(\"n\", &pp, &p); }";
    let g = derive_grants(
        &[
            ("ctx.rs".into(), ctx.into()),
            ("use.rs".into(), user.into()),
        ],
        &operator_kinds(),
    )
    .unwrap();
    assert!(
        g.contains(&(
            "resultity.com".into(),
            "resultitynodes/status".into(),
            "patch".into()
        )),
        "a field declared in another file: {}",
        show(&g)
    );
    let inline = "fn d(c: Client) { let x: Api<Pod> = Api::all(c); let w = watcher(Api::<Secret>::all(c), cfg); }";
    let err = derive_grants(&[("i.rs".into(), inline.into())], &operator_kinds()).unwrap_err();
    assert!(err[0].contains("without a visible type"), "{err:?}");
    let raw = "fn d(c: Client) { c.request::<Pod>(req).await; }";
    let err = derive_grants(&[("r.rs".into(), raw.into())], &operator_kinds()).unwrap_err();
    assert!(err[0].contains("raw API request"), "{err:?}");
    let unknown = "fn d(p: Api<Pod>) { p.evict(\"x\"); }";
    let err = derive_grants(&[("z.rs".into(), unknown.into())], &operator_kinds()).unwrap_err();
    assert!(err[0].contains("evict"), "{err:?}");
}

#[test]
fn rbac_grants_exactly_what_the_operator_code_uses() {
    let needed = operator_grants();
    // The regression this chart exists for: server-side apply of a new pod needs `create`.
    assert!(
        needed.contains(&("".into(), "pods".into(), "create".into())),
        "derived:\n{}",
        show(&needed)
    );
    let Some(helm) = helm() else { return };
    let lease = |g: &Grant| g.0 == "coordination.k8s.io";
    let with_leader = rendered_grants(&render(
        &helm,
        &[chart().join("ci/leader-election-values.yaml")],
    ));
    let default = rendered_grants(&render(&helm, &[]));
    let namespaced_docs = render(&helm, &[chart().join("ci/namespaced-rbac-values.yaml")]);
    let namespaced = rendered_grants(&namespaced_docs);
    let expected_default: BTreeSet<Grant> = needed.iter().filter(|g| !lease(g)).cloned().collect();
    for (name, have, want) in [
        ("leader election on", &with_leader, &needed),
        ("default values", &default, &expected_default),
        ("rbac.namespaced", &namespaced, &expected_default),
    ] {
        let missing: BTreeSet<Grant> = want.difference(have).cloned().collect();
        let extra: BTreeSet<Grant> = have.difference(want).cloned().collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "chart RBAC ({name}) differs from the operator's API calls\nmissing:\n{}\nextra:\n{}",
            show(&missing),
            show(&extra)
        );
    }
}

/// With `rbac.namespaced` nothing namespaced is granted cluster-wide: the ClusterRole holds
/// only cluster-scoped kinds, the rest is a Role in `watchNamespace` (and events of the
/// cluster-scoped networks in `default`), and the operator is told to refuse a cluster-wide
/// watch.
#[test]
fn namespaced_rbac_grants_namespaced_kinds_in_the_watched_namespace_only() {
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[chart().join("ci/namespaced-rbac-values.yaml")]);
    let docs: Vec<Value> = docs.into_iter().filter(|d| !is_hook(d)).collect();
    let cluster_scoped: BTreeSet<&str> = [
        "resultitynetworks",
        "resultitynetworks/status",
        "customresourcedefinitions",
    ]
    .into();
    let of_kind = |k: &str| -> Vec<&Value> { docs.iter().filter(|d| kind(d) == k).collect() };
    let cluster_roles = of_kind("ClusterRole");
    assert_eq!(cluster_roles.len(), 1, "one ClusterRole");
    let cluster = roles_grants(&[cluster_roles[0].clone()]);
    for (_, res, verb) in &cluster {
        assert!(
            cluster_scoped.contains(res.as_str()),
            "rbac.namespaced grants {verb} on {res} cluster-wide"
        );
    }
    let needed = operator_grants();
    let sa = &of_kind("Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"];
    for ns in ["resultity", "default"] {
        let roles: Vec<Value> = of_kind("Role")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == ns)
            .cloned()
            .collect();
        assert!(!roles.is_empty(), "no Role in {ns}");
        let bound = of_kind("RoleBinding").into_iter().any(|b| {
            b["metadata"]["namespace"] == ns
                && b["subjects"][0]["name"] == *sa
                && b["subjects"][0]["namespace"] == "resultity-system"
        });
        assert!(bound, "no RoleBinding of the operator in {ns}");
    }
    let in_watched = roles_grants(
        &of_kind("Role")
            .into_iter()
            .filter(|r| r["metadata"]["namespace"] == "resultity")
            .cloned()
            .collect::<Vec<_>>(),
    );
    let namespaced_needed: BTreeSet<Grant> = needed
        .iter()
        .filter(|g| !cluster_scoped.contains(g.1.as_str()) && g.0 != "coordination.k8s.io")
        .cloned()
        .collect();
    assert_eq!(in_watched, namespaced_needed, "the Role in watchNamespace");
    let env = &of_kind("Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "RESULTITY_NAMESPACED_RBAC" && e["value"] == "true"),
        "the operator is not told its RBAC is namespaced: {env}"
    );
    // A Role cannot cover "every namespace": the chart refuses the combination.
    let out = helm_template(&helm, &[], &["rbac.namespaced=true"]);
    assert!(
        !out.status.success(),
        "rbac.namespaced without watchNamespace rendered"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs watchNamespace"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The CRD upgrade hook: a pre-install/pre-upgrade Job running `resultity-operator crd --apply`
/// from the operator image, under a ServiceAccount created before it with exactly the verbs
/// that code uses, on this chart's CRDs.
#[test]
fn crd_upgrade_hook_applies_the_crds_with_exactly_the_verbs_it_uses() {
    let needed = code_grants(true);
    assert_eq!(
        needed,
        [
            (
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                "create"
            ),
            ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
            ("apiextensions.k8s.io", "customresourcedefinitions", "patch"),
        ]
        .into_iter()
        .map(|(a, b, c)| (a.into(), b.into(), c.into()))
        .collect(),
        "derived:\n{}",
        show(&needed)
    );
    let operator_main = std::fs::read_to_string(root().join("operator/src/main.rs")).unwrap();
    let crd_flags = clap_flags(&operator_main, "CrdArgs");
    let Some(helm) = helm() else { return };
    let docs = render(&helm, &[]);
    let hooks: Vec<&Value> = docs.iter().filter(|d| is_hook(d)).collect();
    let weight = |d: &Value| -> i64 {
        d["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .unwrap_or("0")
            .parse()
            .unwrap()
    };
    let job = hooks
        .iter()
        .find(|d| kind(d) == "Job")
        .expect("a CRD upgrade hook Job");
    let phases = job["metadata"]["annotations"]["helm.sh/hook"]
        .as_str()
        .unwrap();
    assert!(
        phases.split(',').any(|p| p == "pre-upgrade")
            && phases.split(',').any(|p| p == "pre-install"),
        "{phases}"
    );
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let deploy = docs.iter().find(|d| kind(d) == "Deployment").unwrap();
    assert_eq!(
        c["image"], deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        "the hook applies the CRDs of the operator being installed"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["crd", "--apply"]);
    for a in &args[1..] {
        let flag = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            crd_flags.contains(flag),
            "`crd` has no --{flag}: {crd_flags:?}"
        );
    }
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let sa = pod["serviceAccountName"].as_str().unwrap();
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        let d = hooks
            .iter()
            .find(|d| kind(d) == k)
            .unwrap_or_else(|| panic!("no hook {k}"));
        assert!(
            weight(d) < weight(job),
            "{k} must exist before the Job runs"
        );
        assert_eq!(d["metadata"]["annotations"]["helm.sh/hook"], phases, "{k}");
    }
    let binding = hooks
        .iter()
        .find(|d| kind(d) == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["subjects"][0]["name"], sa);
    let role: Vec<Value> = hooks
        .iter()
        .filter(|d| kind(d) == "ClusterRole")
        .map(|d| (*d).clone())
        .collect();
    assert_eq!(role[0]["metadata"]["name"], binding["roleRef"]["name"]);
    assert_eq!(roles_grants(&role), needed, "hook ClusterRole");
    // get and patch name this chart's CRDs.
    let crds: BTreeSet<String> = crd_files(&root().join("crds"))
        .iter()
        .flat_map(|(_, t)| parse_documents(t))
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    for rule in role[0]["rules"].as_array().unwrap() {
        if rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "create")
        {
            continue; // create cannot be limited by name
        }
        let names: BTreeSet<String> = rule["resourceNames"]
            .as_array()
            .unwrap_or_else(|| panic!("unrestricted rule {rule}"))
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, crds, "{rule}");
    }
    // Off: no hook at all.
    let off = render_with(&helm, &[], &["crdUpgrade.enabled=false"]);
    assert!(!off.iter().any(is_hook), "crdUpgrade.enabled=false");
}

// ---------------------------------------------------------------------------------------
// CRDs

fn crd_files(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let top = crd_files(&root().join("crds"));
    let chart_crds = crd_files(&chart().join("crds"));
    assert!(!top.is_empty());
    assert_eq!(
        chart_crds, top,
        "charts/resultity-operator/crds differs from crds/ (it is a symlink to ../../crds; restore it)"
    );
    let Some(helm) = helm() else { return };
    // What helm installs, not only what the file system shows.
    let out = Command::new(&helm)
        .args(["show", "crds"])
        .arg(chart())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = parse_documents(&String::from_utf8(out.stdout).unwrap());
    let generated: Vec<Value> = top.iter().flat_map(|(_, t)| parse_documents(t)).collect();
    assert_eq!(shown, generated, "helm show crds differs from crds/");
}

// ---------------------------------------------------------------------------------------
// Dashboard and alerts against the metrics the binaries export

/// Sample names of a Prometheus text exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// A sidecar status with every optional figure present, so every labelled series exists.
fn full_status() -> resultity_protocol::status::NodeStatus {
    let node = resultity_protocol::NodeKeypair::from_seed(&[7; 32]);
    serde_json::from_value(serde_json::json!({
        "format": resultity_protocol::status::STATUS_FORMAT,
        "node_id": node.id().as_str(),
        "network_id": "testnet",
        "phase": "Ready",
        "registered": true,
        "connection": {"state": "Connected", "reconnects": 0},
        "applied_config": {"version": 3, "digest": format!("sha256:{}", "a".repeat(64))},
        "network_config": {"version": 4, "digest": format!("sha256:{}", "b".repeat(64))},
        "models": [{"model": {"id": "m", "revision": "r"}, "state": "active"}],
        "gpu": {"present": true, "driver_version": "550.1", "devices": [{
            "index": 0, "uuid": "GPU-1", "name": "H100", "memory_total_mib": 81_000,
            "memory_used_mib": 1_000, "utilization_pct": 50, "temperature_c": 60,
            "ecc_uncorrected": 0, "healthy": true}]},
        "runtime": {"kind": "vllm", "ready": true, "running": 3, "waiting": 1,
            "kv_cache_usage_permille": 250, "generation_tokens_total": 1000},
        "jobs": {"completed": 1, "failed": 0, "rejected": 0, "handed_back": 0,
            "in_flight": 0, "outbox": 0},
        "verdict": {"eligible": true, "score": 900, "penalty": 0, "suspended_until_ms": 1},
        "draining": false,
        "drained": false,
        "software": {"sidecar_version": "0.1.0"}
    }))
    .unwrap()
}

async fn sidecar_metric_names() -> BTreeSet<String> {
    use resultity_protocol::messages::ws::NodeMessage;
    use resultity_sidecar::api::{ApiState, router};
    let state = ApiState::new(full_status(), "token".into());
    state.metrics.job("completed");
    state.metrics.job_latency(
        &NodeMessage::JobFail {
            job_id: resultity_protocol::JobId::parse("j-1").unwrap(),
            lease_epoch: 1,
            code: resultity_protocol::messages::FailCode::HandedBack,
            reason: "runtime unavailable".into(),
            refusal: None,
        },
        std::time::Duration::from_millis(20),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    sample_names(&body)
}

fn operator_metric_names() -> BTreeSet<String> {
    let m = resultity_operator::metrics::Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    m.register(&mut registry);
    m.observe("node", std::time::Duration::from_millis(5));
    m.failure("node", "kube");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    sample_names(&text)
}

fn queried_metrics(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bresultity_(?:sidecar|operator)_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let mut exported = sidecar_metric_names().await;
    exported.extend(operator_metric_names());

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/resultity-fleet.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if let (true, Some(s)) = (k == "expr" || k == "query", v.as_str()) {
                        out.push(s.to_owned());
                    }
                    collect(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 20,
        "the dashboard has {} queries",
        exprs.len()
    );
    let rules = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    for (source, text) in [("dashboard", exprs.join("\n")), ("alerts", rules)] {
        let queried = queried_metrics(&text);
        assert!(!queried.is_empty(), "{source} queries nothing");
        let unknown: Vec<&String> = queried.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{source} queries metrics no binary exports: {unknown:?}\nexported: {exported:?}"
        );
    }
    // The dashboard shows what a fleet operator asks about first.
    let queried = queried_metrics(&exprs.join("\n"));
    for m in [
        "resultity_sidecar_job_duration_seconds_bucket",
        "resultity_sidecar_jobs_total",
        "resultity_sidecar_jobs_in_flight",
        "resultity_sidecar_credits",
        "resultity_sidecar_network_score",
        "resultity_sidecar_network_suspended",
        "resultity_sidecar_config_version",
        "resultity_sidecar_models",
        "resultity_sidecar_gpu_utilization_ratio",
        "resultity_sidecar_runtime_waiting_requests",
    ] {
        assert!(queried.contains(m), "the dashboard does not show {m}");
    }
}

/// promtool: `$PROMTOOL`, else `promtool` on `PATH` (Debian's `prometheus` package). Missing
/// outside CI: skipped with a note; with `CI=true`: a failure.
fn promtool() -> Option<PathBuf> {
    let candidate =
        std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    if Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(candidate);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is required when CI=true: apt-get install prometheus"
    );
    eprintln!("SKIPPED: promtool not found (set PROMTOOL or install Debian's prometheus package)");
    None
}

/// The alerts' own unit tests (`charts/resultity-operator/tests/alerts_test.yaml`) against the
/// rules the chart renders: what each alert says, and when it fires.
#[test]
fn alerts_pass_their_promtool_unit_tests() {
    let Some(helm) = helm() else { return };
    let Some(promtool) = promtool() else { return };
    let docs = render(&helm, &[chart().join("ci/monitoring-values.yaml")]);
    let rule = docs
        .iter()
        .find(|d| kind(d) == "PrometheusRule")
        .expect("monitoring values render a PrometheusRule");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chart-promtool");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("rules.yaml"),
        serde_norway::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        chart().join("tests/alerts_test.yaml"),
        dir.join("alerts_test.yaml"),
    )
    .unwrap();
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(dir.join("alerts_test.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Image names

#[test]
fn one_image_name_per_component_everywhere() {
    let allowed = [
        "ghcr.io/resultity/resultity-operator",
        "ghcr.io/resultity/resultity-sidecar",
    ];
    let re = regex::Regex::new(r"ghcr\.io/resultity/[A-Za-z0-9._-]+").unwrap();
    let mut files = Vec::new();
    for dir in [
        "docs",
        "examples",
        "charts",
        "operator/src",
        "node-sidecar/src",
        "docker",
    ] {
        collect_text(&root().join(dir), &mut files);
    }
    collect_text(&root().join("README.md"), &mut files);
    assert!(files.len() > 10);
    let mut seen = BTreeSet::new();
    for (path, text) in &files {
        for m in re.find_iter(text) {
            assert!(
                allowed.contains(&m.as_str()),
                "{path} names image {}; use one of {allowed:?}",
                m.as_str()
            );
            seen.insert(m.as_str().to_owned());
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

fn collect_text(p: &Path, out: &mut Vec<(String, String)>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            collect_text(&e.unwrap().path(), out);
        }
    } else if let Ok(text) = std::fs::read_to_string(p) {
        out.push((p.display().to_string(), text));
    }
}

/// The images run as the uid the pods declare, and the sidecar binary sits where the
/// operator's preStop hook calls it.
#[test]
fn dockerfiles_match_what_the_pods_expect() {
    let sidecar = std::fs::read_to_string(root().join("docker/sidecar.Dockerfile")).unwrap();
    let operator = std::fs::read_to_string(root().join("docker/operator.Dockerfile")).unwrap();
    let build = std::fs::read_to_string(root().join("operator/src/build.rs")).unwrap();
    let pre_stop = regex::Regex::new(r#""(/[^"]+)"\.to_owned\(\),\s*"drain""#)
        .unwrap()
        .captures(&build)
        .expect("the operator's preStop hook runs `<sidecar binary> drain`")[1]
        .to_owned();
    assert!(
        sidecar.contains(&format!("ENTRYPOINT [\"{pre_stop}\"]")),
        "sidecar image entrypoint is not {pre_stop}"
    );
    let uid = resultity_operator::pod_contract::SIDECAR_UID;
    for (name, text) in [("sidecar", &sidecar), ("operator", &operator)] {
        assert!(
            text.contains(&format!("USER {uid}:{uid}")),
            "{name} image must run as the pod's uid {uid}"
        );
        assert!(
            text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
            "{name} image must be multi-stage"
        );
        assert!(
            text.contains("distroless"),
            "{name} runtime base must be distroless"
        );
    }
}

/// The long flags (and visible aliases) clap derives for `struct_name` in `src`, following
/// `#[command(flatten)]` fields into the structs they name.
fn clap_flags(src: &str, struct_name: &str) -> BTreeSet<String> {
    let body = src
        .split(&format!("struct {struct_name} {{"))
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .unwrap_or_else(|| panic!("struct {struct_name} in the sidecar's main.rs"));
    let field_re = regex::Regex::new(r"^\s*(\w+)\s*:\s*(\w+)").unwrap();
    let alias_re = regex::Regex::new(r#"visible_alias\s*=\s*"([a-z-]+)""#).unwrap();
    let mut flags = BTreeSet::new();
    let mut flatten = false;
    for line in body.lines() {
        let line = line.trim();
        if line.starts_with("#[command(flatten)]") {
            flatten = true;
        } else if let Some(c) = field_re.captures(line).filter(|_| !line.starts_with("//")) {
            if flatten {
                flags.extend(clap_flags(src, &c[2]));
            } else {
                flags.insert(c[1].replace('_', "-"));
            }
            flatten = false;
        }
        flags.extend(alias_re.captures_iter(line).map(|c| c[1].to_owned()));
    }
    flags
}

/// Every environment variable the Deployment sets is one the operator's command line reads
/// (a renamed flag would otherwise be ignored silently), and every flag the test pod passes
/// is one `resultity-sidecar doctor` declares.
#[test]
fn rendered_settings_are_ones_the_binaries_read() {
    let Some(helm) = helm() else { return };
    // The log flags are the shared logging crate's, flattened into the operator's command.
    let operator_main = std::fs::read_to_string(root().join("operator/src/main.rs")).unwrap();
    assert!(operator_main.contains("log: resultity_logging::LogArgs"));
    let operator_main =
        operator_main + &std::fs::read_to_string(root().join("logging/src/lib.rs")).unwrap();
    let env_re = regex::Regex::new(r#"env\s*=\s*"([A-Z_]+)""#).unwrap();
    let declared: BTreeSet<&str> = env_re
        .captures_iter(&operator_main)
        .map(|c| c.get(1).unwrap().as_str())
        .collect();
    let sidecar_main = std::fs::read_to_string(root().join("node-sidecar/src/main.rs")).unwrap();
    let flags = clap_flags(&sidecar_main, "DoctorArgs");
    assert!(
        flags.contains("io-url") && flags.contains("gpu-check"),
        "flattened argument groups are read: {flags:?}"
    );

    for (name, values) in value_sets() {
        for d in render(&helm, &values) {
            match kind(&d) {
                "Deployment" => {
                    let c = &d["spec"]["template"]["spec"]["containers"][0];
                    for e in c["env"].as_array().unwrap() {
                        let var = e["name"].as_str().unwrap();
                        assert!(
                            declared.contains(var),
                            "{name}: the Deployment sets {var}, which resultity-operator does not read"
                        );
                    }
                    // `logFormat` reaches the operator (the monitoring set asks for JSON).
                    let format = c["env"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|e| e["name"] == "RESULTITY_LOG_FORMAT")
                        .map(|e| e["value"].as_str().unwrap());
                    let expected = if name == "monitoring-values" || name == "all" {
                        "json"
                    } else {
                        "text"
                    };
                    assert_eq!(format, Some(expected), "{name}: RESULTITY_LOG_FORMAT");
                }
                "Pod" => {
                    let args = d["spec"]["containers"][0]["args"].as_array().unwrap();
                    assert_eq!(args[0], "doctor", "{name}");
                    for a in &args[1..] {
                        let flag = a.as_str().unwrap().trim_start_matches("--");
                        let flag = flag.split('=').next().unwrap();
                        assert!(
                            flags.contains(flag),
                            "{name}: the test pod passes --{flag}, which doctor does not declare: {flags:?}"
                        );
                    }
                }
                _ => {}
            }
        }
    }
}
