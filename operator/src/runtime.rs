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
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use resultity_protocol::clock::SystemClock;

use crate::config_source::HttpConfigSource;
use crate::controller::{Context, network, node};
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

#[derive(Debug)]
struct AdminState {
    ready: AtomicBool,
    registry: Registry,
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

fn admin_router(state: Arc<AdminState>) -> Router {
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
    let admin = Arc::new(AdminState {
        ready: AtomicBool::new(false),
        registry,
    });
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

    let (nodes, pods): (Api<ResultityNode>, Api<Pod>) = match &cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let networks: Api<ResultityNetwork> = Api::all(client.clone());
    let wc = watcher::Config::default().any_semantic();
    let owned = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));

    let node_controller = Controller::new(nodes, wc.clone()).owns(pods, owned);
    let node_store = node_controller.store();
    let mapper_store = node_store.clone();
    let node_controller = node_controller
        // A network's new config can change every node that references it.
        .watches(
            networks.clone(),
            wc.clone(),
            move |net: ResultityNetwork| {
                let name = net.name_any();
                mapper_store
                    .state()
                    .into_iter()
                    .filter(|n| n.spec.network_ref.name == name)
                    .map(|n| ObjectRef::from_obj(&*n))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stop.clone())
        .run(node::reconcile, node::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "node controller event");
            }
        });

    let network_controller = Controller::new(networks, wc);
    let network_store = network_controller.store();
    let network_controller = network_controller
        .graceful_shutdown_on(stop.clone())
        .run(network::reconcile, network::error_policy, ctx.clone())
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
            ready_flag.ready.store(true, Ordering::SeqCst);
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
    admin.ready.store(false, Ordering::SeqCst);
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
