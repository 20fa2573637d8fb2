//! The running operator: admin server (`/livez`, `/readyz`, `/metrics`), both controllers,
//! optional leader election, and graceful shutdown.

use std::future::Future;
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
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::{PredicateConfig, WatchStreamExt};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use resultity_protocol::clock::SystemClock;

use crate::config_source::HttpConfigSource;
use crate::controller::{Context, meaningful_change, network, node};
use crate::crd::{LABEL_MANAGED_BY, MANAGER, ResultityNetwork, ResultityNode, all_crds};
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

/// Runs until `shutdown` resolves (or the leader lease is lost).
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

    let lease_lost = match cfg.leader.clone() {
        None => futures::future::pending().boxed(),
        Some((ns, lease_cfg)) => {
            let api: Api<Lease> = Api::namespaced(client.clone(), &ns);
            tracing::info!(lease = %lease_cfg.name, identity = %lease_cfg.identity, "waiting for leadership");
            tokio::select! {
                r = leader::acquire(&api, &lease_cfg) => r?,
                () = stop.clone() => return Ok(()),
            }
            tracing::info!("leader lease acquired");
            async move { leader::hold(&api, &lease_cfg).await }.boxed()
        }
    };

    wait_for_crds(&client).await;

    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(HttpSidecarClient::new(cfg.sidecar_timeout)?),
        Arc::new(HttpConfigSource::new(cfg.config_fetch_timeout)?),
        metrics.clone(),
        cfg.defaults.clone(),
        Arc::new(SystemClock),
    ));

    let (nodes, pods): (Api<DeserializeGuard<ResultityNode>>, Api<Pod>) = match &cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let networks: Api<DeserializeGuard<ResultityNetwork>> = Api::all(client.clone());
    let wc = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));

    // DeserializeGuard: one malformed object becomes a Warning event instead of failing the
    // whole list. The predicate keeps our own status writes from re-triggering reconciles.
    let (node_store, node_writer) = reflector::store();
    let node_stream = reflector(node_writer, watcher(nodes, wc.clone()))
        .applied_objects()
        .predicate_filter(meaningful_change, PredicateConfig::default());
    let mapper_store = node_store.clone();
    let node_controller = Controller::for_stream(node_stream, node_store.clone())
        .owns(pods, owned)
        // A network's new config can change every node that references it.
        .watches(
            networks.clone(),
            wc.clone(),
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
    let network_stream = reflector(network_writer, watcher(networks, wc))
        .applied_objects()
        .predicate_filter(meaningful_change, PredicateConfig::default());
    let network_controller = Controller::for_stream(network_stream, network_store.clone())
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

    let ready_flag = admin.clone();
    let readiness = async move {
        // Ready only once every watch has listed: before that, reconciles see partial state.
        let synced = node_store.wait_until_ready().await.is_ok()
            && network_store.wait_until_ready().await.is_ok();
        if synced {
            ready_flag.set_ready(true);
            tracing::info!("watches synced; ready");
        }
        futures::future::pending::<()>().await;
    };

    tracing::info!("controllers started");
    let result = tokio::select! {
        _ = futures::future::join(node_controller, network_controller) => Ok(()),
        e = lease_lost => Err(RunError::Operator(e)),
        () = readiness => Ok(()),
    };
    admin.set_ready(false);
    // The admin server stops with `stop`; after a lost lease it is simply dropped.
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    tracing::info!("stopped");
    result
}

/// Waits (bounded) for the CRDs to be established so the first watches do not error.
async fn wait_for_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all_crds() {
        let name = crd.name_any();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(crd = %name, error = %e, "waiting for CRD failed"),
            Err(_) => tracing::warn!(crd = %name, "CRD not established after 30s; starting anyway"),
        }
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

    #[tokio::test]
    async fn client_builds_with_tls() {
        // A TLS client needs a rustls crypto provider; a missing one panics at startup.
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(Client::try_from(config).is_ok());
    }
}
