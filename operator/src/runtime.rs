//! The running operator: admin server (`/livez`, `/readyz`, `/metrics`), both controllers,
//! optional leader election, and graceful shutdown.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::{PredicateConfig, WatchStreamExt};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use resultity_protocol::clock::SystemClock;

use crate::config_source::HttpConfigSource;
use crate::controller::{Context, fleet, meaningful_change, network, node};
use crate::crd::{
    LABEL_MANAGED_BY, MANAGER, ResultityFleet, ResultityNetwork, ResultityNode, all_crds,
};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::sidecar::HttpSidecarClient;
use crate::validate::Defaults;

/// Why the operator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("building an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Operator(#[from] crate::Error),
    #[error("API server {url}: CRD {name}: {reason}")]
    Crd {
        url: String,
        name: String,
        reason: String,
    },
}

/// Settings of `resultity-operator run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub admin_listen: SocketAddr,
    pub defaults: Defaults,
    pub sidecar_timeout: Duration,
    pub config_fetch_timeout: Duration,
    /// Watch one namespace instead of the whole cluster.
    pub namespace: Option<String>,
    /// Leader election (lease namespace and settings); `None` runs unconditionally.
    pub leader: Option<(String, LeaseConfig)>,
    /// The API server's URL, for error messages.
    pub api_url: String,
    /// Most reconciles running at once per controller.
    pub concurrency: u16,
    /// How long to wait for the CRDs before giving up.
    pub crd_wait: Duration,
    /// How long running reconciles may take to finish after the shutdown signal.
    pub shutdown_grace: Duration,
}

/// What the admin server serves: readiness and the metrics registry.
#[derive(Debug)]
pub struct AdminState {
    ready: AtomicBool,
    registry: Registry,
}

impl AdminState {
    pub fn new(registry: Registry) -> Self {
        Self {
            ready: AtomicBool::new(false),
            registry,
        }
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `/livez` (process up), `/readyz` (watches synced, not shutting down), `/metrics`.
pub fn admin_router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Watcher retry delays: 250 ms doubling to at most 5 s, so changes made after an API outage
/// are seen within seconds of recovery (kube's default waits up to 30 s, plus jitter).
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    pub const INITIAL: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self {
            next: Self::INITIAL,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::INITIAL;
    }
}

/// Per-watch health: a watch whose last answer was an error makes `/readyz` fail, so an API
/// outage is visible, and it recovers with the next good answer.
#[derive(Debug, Default)]
pub struct WatchHealth {
    failing: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl WatchHealth {
    pub fn record(&self, watch: &'static str, ok: bool) {
        let mut f = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ok {
            if f.remove(watch) {
                tracing::info!(watch, "watch recovered");
            }
        } else if f.insert(watch) {
            tracing::warn!(watch, "watch failing; not ready until it recovers");
        }
    }
    pub fn healthy(&self) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

/// A namespaced kind, in one namespace or all.
fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Records each answer of a watch in `health`.
fn watch_probe<T>(
    health: &Arc<WatchHealth>,
    name: &'static str,
) -> impl FnMut(&Result<T, watcher::Error>) + Send + 'static {
    let health = health.clone();
    move |e| health.record(name, e.is_ok())
}

/// Predicate for the network watch of the node controller: only what changes the nodes' pods
/// or status (spec, the config in force, images, keys, approved models) fans out; the
/// network's own status bookkeeping (`lastFetchTime` at every poll) does not.
pub fn network_config_change(net: &DeserializeGuard<ResultityNetwork>) -> Option<u64> {
    let mut h = DefaultHasher::new();
    match &net.0 {
        Ok(n) => {
            n.metadata.generation.hash(&mut h);
            n.metadata.deletion_timestamp.is_some().hash(&mut h);
            if let Some(s) = &n.status {
                s.config_digest.hash(&mut h);
                s.trusted_keys.hash(&mut h);
                s.sidecar_image.hash(&mut h);
                s.runtime_images
                    .as_ref()
                    .map(|m| (&m.vllm, &m.triton))
                    .hash(&mut h);
                for m in &s.approved_models {
                    (&m.id, &m.revision, &m.runtimes, m.min_gpu_memory_mib).hash(&mut h);
                }
            }
        }
        Err(invalid) => invalid.metadata.resource_version.hash(&mut h),
    }
    Some(h.finish())
}

/// Runs until `shutdown` resolves (or the leader lease is lost). After the signal, running
/// reconciles get `cfg.shutdown_grace` to finish; then the process stops regardless, so an
/// unreachable API server cannot keep it alive.
pub async fn run(
    client: Client,
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let admin = Arc::new(AdminState::new(registry));
    let stop = shutdown.boxed().shared();

    let listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| RunError::Admin {
            addr: cfg.admin_listen,
            source,
        })?;
    let server =
        axum::serve(listener, admin_router(admin.clone())).with_graceful_shutdown(stop.clone());
    let server = tokio::spawn(async move { server.await });

    let lease = cfg.leader.clone().map(|(ns, lease_cfg)| {
        let api: Api<Lease> = Api::namespaced(client.clone(), &ns);
        (api, lease_cfg)
    });
    let lease_lost = match &lease {
        None => futures::future::pending().boxed(),
        Some((api, lease_cfg)) => {
            tracing::info!(lease = %lease_cfg.name, identity = %lease_cfg.identity, "waiting for leadership");
            tokio::select! {
                r = leader::acquire(api, lease_cfg) => r?,
                () = stop.clone() => return Ok(()),
            }
            tracing::info!("leader lease acquired");
            let (api, lease_cfg) = (api.clone(), lease_cfg.clone());
            async move { leader::hold(&api, &lease_cfg).await }.boxed()
        }
    };

    // Controllers start only once their CRDs are served: watching an absent kind fails in a
    // loop and would look like progress.
    tokio::select! {
        r = wait_for_crds(&client, &cfg.api_url, cfg.crd_wait) => r?,
        () = stop.clone() => {
            release_lease(lease.as_ref()).await;
            return Ok(());
        }
    }

    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(HttpSidecarClient::new(cfg.sidecar_timeout)?),
        Arc::new(HttpConfigSource::new(cfg.config_fetch_timeout)?),
        metrics.clone(),
        cfg.defaults.clone(),
        Arc::new(SystemClock),
    ));

    let ns = cfg.namespace.as_deref();
    let nodes: Api<DeserializeGuard<ResultityNode>> = scoped(&client, ns);
    let pods: Api<Pod> = scoped(&client, ns);
    let fleets: Api<DeserializeGuard<ResultityFleet>> = scoped(&client, ns);
    let fleet_nodes: Api<ResultityNode> = scoped(&client, ns);
    let networks: Api<DeserializeGuard<ResultityNetwork>> = Api::all(client.clone());
    let wc = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let health = Arc::new(WatchHealth::default());
    // Bounded concurrency: a fleet of hundreds of nodes must not open hundreds of
    // connections to the API server at once.
    let controller_cfg = ControllerConfig::default().concurrency(cfg.concurrency);

    // DeserializeGuard: one malformed object becomes a Warning event instead of failing the
    // whole list. The predicate keeps our own status writes from re-triggering reconciles.
    let (node_store, node_writer) = reflector::store();
    let node_stream = reflector(
        node_writer,
        watcher(nodes, wc.clone())
            .backoff(WatchBackoff::default())
            .inspect(watch_probe(&health, "resultitynodes")),
    )
    .applied_objects()
    .predicate_filter(meaningful_change, PredicateConfig::default());
    let mapper_store = node_store.clone();
    let pod_stream = watcher(pods, owned.clone())
        .backoff(WatchBackoff::default())
        .inspect(watch_probe(&health, "pods"))
        .touched_objects();
    let network_changes = watcher(networks.clone(), wc.clone())
        .backoff(WatchBackoff::default())
        .inspect(watch_probe(&health, "resultitynetworks (nodes)"))
        .touched_objects()
        .predicate_filter(network_config_change, PredicateConfig::default());
    let node_controller = Controller::for_stream(node_stream, node_store.clone())
        .with_config(controller_cfg.clone())
        .owns_stream(pod_stream)
        // A network's new config can change every node that references it.
        .watches_stream(
            network_changes,
            move |net: DeserializeGuard<ResultityNetwork>| {
                nodes_of_network(&mapper_store.state(), &net.name_any())
            },
        )
        .graceful_shutdown_on(stop.clone())
        .run(
            node::reconcile_guarded,
            node::error_policy_guarded,
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "node controller event");
            }
        });

    let (network_store, network_writer) = reflector::store();
    let network_stream = reflector(
        network_writer,
        watcher(networks, wc.clone())
            .backoff(WatchBackoff::default())
            .inspect(watch_probe(&health, "resultitynetworks")),
    )
    .applied_objects()
    .predicate_filter(meaningful_change, PredicateConfig::default());
    let network_controller = Controller::for_stream(network_stream, network_store.clone())
        .with_config(controller_cfg.clone())
        .graceful_shutdown_on(stop.clone())
        .run(
            network::reconcile_guarded,
            network::error_policy_guarded,
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "network controller event");
            }
        });

    // Fleets own their nodes: a node's status change (Ready, its pod replaced) moves the
    // rollout on.
    let (fleet_store, fleet_writer) = reflector::store();
    let fleet_stream = reflector(
        fleet_writer,
        watcher(fleets, wc)
            .backoff(WatchBackoff::default())
            .inspect(watch_probe(&health, "resultityfleets")),
    )
    .applied_objects()
    .predicate_filter(meaningful_change, PredicateConfig::default());
    let fleet_node_stream = watcher(fleet_nodes, owned)
        .backoff(WatchBackoff::default())
        .inspect(watch_probe(&health, "resultitynodes (fleets)"))
        .touched_objects();
    let fleet_controller = Controller::for_stream(fleet_stream, fleet_store.clone())
        .with_config(controller_cfg)
        .owns_stream(fleet_node_stream)
        .graceful_shutdown_on(stop.clone())
        .run(
            fleet::reconcile_guarded,
            fleet::error_policy_guarded,
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "fleet controller event");
            }
        });

    let ready_flag = admin.clone();
    let readiness = async move {
        // Ready only once every watch has listed: before that, reconciles see partial state.
        let synced = node_store.wait_until_ready().await.is_ok()
            && network_store.wait_until_ready().await.is_ok()
            && fleet_store.wait_until_ready().await.is_ok();
        if !synced {
            return futures::future::pending::<()>().await;
        }
        tracing::info!("watches synced");
        // Then ready while every watch answers: an API outage shows on /readyz.
        loop {
            ready_flag.set_ready(health.healthy());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };

    tracing::info!("controllers started");
    let controllers = futures::future::join3(node_controller, network_controller, fleet_controller);
    let grace = cfg.shutdown_grace;
    let stopping = stop.clone();
    let result = tokio::select! {
        _ = controllers => Ok(()),
        e = lease_lost => Err(RunError::Operator(e)),
        () = readiness => Ok(()),
        // The controllers stop on the same signal once their running reconciles finish; an
        // API server that does not answer must not hold the process past the grace period.
        () = async move { stopping.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_seconds = grace.as_secs(), "reconciles did not finish within the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    admin.set_ready(false);
    // Let the standby take over at once instead of waiting out the lease.
    if result.is_ok() {
        release_lease(lease.as_ref()).await;
    }
    // The admin server stops with `stop`; after a lost lease it is simply dropped.
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    tracing::info!("stopped");
    result
}

async fn release_lease(lease: Option<&(Api<Lease>, LeaseConfig)>) {
    if let Some((api, lease_cfg)) = lease {
        match tokio::time::timeout(Duration::from_secs(3), leader::release(api, lease_cfg)).await {
            Ok(Ok(true)) => tracing::info!("leader lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the leader lease failed"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    }
}

/// Waits for the CRDs to be established, at most `limit` in all. The error names the API
/// server, so a wrong kubeconfig or an unreachable server is obvious.
async fn wait_for_crds(client: &Client, api_url: &str, limit: Duration) -> Result<(), RunError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let all = async {
        for crd in all_crds() {
            let name = crd.name_any();
            await_condition(api.clone(), &name, conditions::is_crd_established())
                .await
                .map_err(|e| RunError::Crd {
                    url: api_url.to_owned(),
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    };
    match tokio::time::timeout(limit, all).await {
        Ok(r) => r,
        Err(_) => Err(RunError::Crd {
            url: api_url.to_owned(),
            name: all_crds()
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
                .join(", "),
            reason: format!(
                "not established within {}s (are the CRDs applied, is the API server reachable?)",
                limit.as_secs()
            ),
        }),
    }
}

/// The nodes to reconcile when network `name` changes: every (well-formed) node that
/// references it.
pub fn nodes_of_network(
    nodes: &[Arc<DeserializeGuard<ResultityNode>>],
    name: &str,
) -> Vec<ObjectRef<DeserializeGuard<ResultityNode>>> {
    nodes
        .iter()
        .filter(|n| n.0.as_ref().is_ok_and(|n| n.spec.network_ref.name == name))
        .map(|n| ObjectRef::from_obj(&**n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_change_maps_to_the_nodes_that_reference_it() {
        let node = |name: &str, net: &str| -> Arc<DeserializeGuard<ResultityNode>> {
            let mut n: ResultityNode =
                serde_norway::from_str(include_str!("../tests/fixtures/node-vllm.yaml")).unwrap();
            n.metadata.name = Some(name.into());
            n.spec.network_ref.name = net.into();
            Arc::new(DeserializeGuard(Ok(n)))
        };
        let malformed = Arc::new(DeserializeGuard(Err(
            kube::core::error_boundary::InvalidObject {
                error: "spec.gpu: invalid type".into(),
                metadata: kube::api::ObjectMeta {
                    name: Some("broken".into()),
                    namespace: Some("fleet".into()),
                    ..Default::default()
                },
            },
        )));
        let nodes = vec![
            node("a", "testnet"),
            node("b", "mainnet"),
            node("c", "testnet"),
            malformed,
        ];
        let mut names: Vec<String> = nodes_of_network(&nodes, "testnet")
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
        assert!(nodes_of_network(&nodes, "devnet").is_empty());
    }
    use crate::controller::meaningful_change;
    use crate::crd::{NodePhase, ResultityNodeStatus};

    #[tokio::test]
    async fn admin_endpoints() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.observe("node", Duration::from_millis(12));
        metrics.failure("node", "kube");
        let state = Arc::new(AdminState::new(registry));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            axum::serve(listener, admin_router(state.clone()))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let get = |path: &'static str| {
            let http = http.clone();
            async move {
                let r = http
                    .get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/livez").await.0, 200);
        assert_eq!(
            get("/readyz").await.0,
            503,
            "not ready before the watches synced"
        );
        state.set_ready(true);
        assert_eq!(get("/readyz").await.0, 200);
        let (code, body) = get("/metrics").await;
        assert_eq!(code, 200);
        assert!(
            body.contains("resultity_operator_reconciles_total{controller=\"node\"} 1"),
            "{body}"
        );
        assert!(
            body.contains(
                "resultity_operator_reconcile_failures_total{controller=\"node\",error=\"kube\"} 1"
            ),
            "{body}"
        );
        assert!(
            body.contains("resultity_operator_reconcile_duration_seconds_bucket"),
            "{body}"
        );
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn own_status_writes_do_not_retrigger() {
        let mut node: ResultityNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "resultity.com/v1alpha1", "kind": "ResultityNode",
            "metadata": {"name": "n", "namespace": "ns", "generation": 1},
            "spec": {"networkRef": {"name": "net"}, "runtime": {"kind": "vllm"},
                     "models": [{"id": "m", "revision": "r"}]}
        }))
        .unwrap();
        let before = meaningful_change(&node);
        node.status = Some(ResultityNodeStatus {
            phase: NodePhase::Ready,
            ..ResultityNodeStatus::default()
        });
        node.metadata.resource_version = Some("42".into());
        assert_eq!(
            meaningful_change(&node),
            before,
            "status and resourceVersion ignored"
        );
        node.metadata.generation = Some(2);
        assert_ne!(meaningful_change(&node), before, "spec change triggers");
        let gen2 = meaningful_change(&node);
        node.metadata.finalizers = Some(vec!["resultity.com/drain".into()]);
        assert_ne!(meaningful_change(&node), gen2, "finalizer change triggers");
    }

    #[test]
    fn only_config_changes_of_a_network_fan_out() {
        let mut net: ResultityNetwork =
            serde_norway::from_str(include_str!("../tests/fixtures/network.yaml")).unwrap();
        let guard = |n: &ResultityNetwork| DeserializeGuard(Ok(n.clone()));
        let before = network_config_change(&guard(&net));
        let status = net.status.as_mut().unwrap();
        status.last_fetch_time = None;
        status.last_verified_time = None;
        status.conditions.clear();
        assert_eq!(
            network_config_change(&guard(&net)),
            before,
            "poll bookkeeping does not fan out"
        );
        net.status.as_mut().unwrap().config_digest = Some("ff".repeat(32));
        assert_ne!(
            network_config_change(&guard(&net)),
            before,
            "a new config does"
        );
    }

    #[test]
    fn watch_backoff_is_short_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = b.by_ref().take(7).collect();
        assert_eq!(delays[0], WatchBackoff::INITIAL);
        assert_eq!(*delays.last().unwrap(), WatchBackoff::MAX);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        b.reset();
        assert_eq!(b.next(), Some(WatchBackoff::INITIAL));
    }

    #[test]
    fn a_failing_watch_makes_the_operator_unready_until_it_recovers() {
        let h = WatchHealth::default();
        assert!(h.healthy());
        h.record("pods", false);
        h.record("resultitynodes", true);
        assert!(!h.healthy());
        h.record("pods", true);
        assert!(h.healthy());
    }

    #[tokio::test]
    async fn client_builds_with_tls() {
        // A TLS client needs a rustls crypto provider; a missing one panics at startup.
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(Client::try_from(config).is_ok());
    }
}
