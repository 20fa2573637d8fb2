//! `resultity-operator` binary: `crd` prints (or applies) the CRDs, `run` runs the controllers.
//! Thin on purpose: everything testable lives in the library.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use resultity_operator::leader::LeaseConfig;
use resultity_operator::runtime::{RunConfig, run};
use resultity_operator::validate::Defaults;

#[derive(Debug, Parser)]
#[command(
    name = "resultity-operator",
    version,
    about = "Kubernetes operator for Resultity GPU nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: resultity_logging::LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print every CRD as multi-document YAML (identical to `crds/resultity.yaml`), or apply them.
    Crd(CrdArgs),
    /// Run the controllers (kubeconfig from KUBECONFIG/~/.kube/config, else in-cluster).
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
struct CrdArgs {
    /// Server-side apply the CRDs as the operator's field manager, with force (taking over
    /// fields another manager such as Helm 4 applied), and wait until they are established.
    #[arg(long)]
    apply: bool,
    /// With --apply: seconds to wait for each CRD to be established.
    #[arg(long, default_value_t = 60, requires = "apply")]
    wait_seconds: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "RESULTITY_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// Sidecar image when neither the network config nor the ResultityNetwork names one.
    #[arg(
        long,
        env = "RESULTITY_DEFAULT_SIDECAR_IMAGE",
        default_value = "ghcr.io/resultity/resultity-sidecar:0.1.0"
    )]
    default_sidecar_image: String,
    /// Registry mirroring every image the network's config names, and the default sidecar image
    /// (air-gapped clusters), e.g. `registry.example.com/mirror`. Images named on a resource are
    /// used as written.
    #[arg(long, env = "RESULTITY_IMAGE_REGISTRY")]
    image_registry: Option<String>,
    /// Port of the sidecar admin API inside node pods.
    #[arg(long, env = "RESULTITY_SIDECAR_PORT", default_value_t = 9090)]
    sidecar_port: u16,
    /// Port the runtime listens on inside node pods.
    #[arg(long, env = "RESULTITY_RUNTIME_PORT", default_value_t = 8000)]
    runtime_port: u16,
    /// Timeout of each sidecar call (status pull, drain request), in milliseconds.
    #[arg(long, env = "RESULTITY_SIDECAR_TIMEOUT_MS", default_value_t = 3000)]
    sidecar_timeout_ms: u64,
    /// Timeout of each network config fetch, in milliseconds.
    #[arg(
        long,
        env = "RESULTITY_CONFIG_FETCH_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    config_fetch_timeout_ms: u64,
    /// Watch ResultityNodes in this namespace only (default: all namespaces).
    #[arg(long, env = "RESULTITY_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// The RBAC grants access to the watched namespace only (Roles, not a ClusterRole): refuse
    /// to start without --namespace instead of failing every cluster-wide watch.
    #[arg(long, env = "RESULTITY_NAMESPACED_RBAC", default_value_t = false)]
    namespaced_rbac: bool,
    /// Elect a leader through a coordination.k8s.io Lease before writing.
    #[arg(long, env = "RESULTITY_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Namespace of the leader Lease.
    #[arg(
        long,
        env = "RESULTITY_LEASE_NAMESPACE",
        default_value = "resultity-system"
    )]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "RESULTITY_LEASE_NAME",
        default_value = "resultity-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (usually the pod name).
    #[arg(long, env = "POD_NAME")]
    lease_identity: Option<String>,
    /// Lease duration in seconds; the leader stops when it could not renew for two thirds
    /// of it.
    #[arg(long, env = "RESULTITY_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Most reconciles running at once, per controller.
    #[arg(long, env = "RESULTITY_RECONCILE_CONCURRENCY", default_value_t = 16)]
    reconcile_concurrency: u16,
    /// Seconds to wait for the CRDs to be established before giving up.
    #[arg(long, env = "RESULTITY_CRD_WAIT_SECONDS", default_value_t = 60)]
    crd_wait_seconds: u64,
    /// Seconds running reconciles may take to finish after SIGTERM/Ctrl-C.
    #[arg(long, env = "RESULTITY_SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    shutdown_grace_seconds: u64,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// The namespace to watch; an error when namespaced RBAC is declared without one.
fn watch_namespace(args: &RunArgs) -> anyhow::Result<Option<String>> {
    let ns = args.namespace.clone().filter(|n| !n.trim().is_empty());
    if args.namespaced_rbac && ns.is_none() {
        anyhow::bail!(
            "--namespaced-rbac (chart value rbac.namespaced) grants access to one namespace only, \
             so the operator cannot watch the whole cluster: set --namespace \
             (RESULTITY_WATCH_NAMESPACE, chart value watchNamespace)"
        );
    }
    Ok(ns)
}

async fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let namespace = watch_namespace(&args)?;
    let config = kube::Config::infer()
        .await
        .context("find the Kubernetes API server (kubeconfig or in-cluster)")?;
    let api_url = config.cluster_url.to_string();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        api_server = %api_url,
        "resultity-operator starting"
    );
    let client = kube::Client::try_from(config)
        .with_context(|| format!("build a client for the API server {api_url}"))?;
    let leader = if args.leader_election {
        let identity = match args.lease_identity {
            Some(id) => id,
            None => hostname()?,
        };
        let duration = Duration::from_secs(args.lease_seconds.max(3));
        Some((
            args.lease_namespace,
            LeaseConfig::new(args.lease_name, identity, duration),
        ))
    } else {
        None
    };
    let cfg = RunConfig {
        admin_listen: args.admin_listen,
        defaults: Defaults {
            sidecar_image: args.default_sidecar_image,
            sidecar_port: args.sidecar_port,
            runtime_port: args.runtime_port,
            image_registry: args.image_registry.filter(|r| !r.trim().is_empty()),
        },
        sidecar_timeout: Duration::from_millis(args.sidecar_timeout_ms),
        config_fetch_timeout: Duration::from_millis(args.config_fetch_timeout_ms),
        namespace,
        leader,
        api_url,
        concurrency: args.reconcile_concurrency.max(1),
        crd_wait: Duration::from_secs(args.crd_wait_seconds),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
    };
    run(client, cfg, shutdown_signal()).await?;
    Ok(())
}

fn hostname() -> anyhow::Result<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .context("--lease-identity (or POD_NAME/HOSTNAME) is required with --leader-election")
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Each cause once, on one line (anyhow's `Caused by:` list repeats quoted causes), in the
    // log format.
    resultity_logging::exit_code(run_cli().await)
}

async fn run_cli() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init("info")?;
    match cli.command {
        Command::Crd(CrdArgs {
            apply: true,
            wait_seconds,
        }) => {
            let client = kube::Client::try_default()
                .await
                .context("find the Kubernetes API server (kubeconfig or in-cluster)")?;
            let wait = Duration::from_secs(wait_seconds);
            for name in resultity_operator::crd_apply::apply_crds(client, wait).await? {
                println!("applied and established: {name}");
            }
            Ok(())
        }
        Command::Crd(CrdArgs { apply: false, .. }) => {
            let yaml = resultity_operator::crd::crds_yaml().context("render CRDs")?;
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .context("write CRDs")?;
            Ok(())
        }
        Command::Run(args) => run_command(*args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command, watch_namespace};

    fn run_args(argv: &[&str]) -> Box<super::RunArgs> {
        let argv = ["resultity-operator", "run"].iter().chain(argv);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => args,
            Command::Crd(_) => panic!("parsed as crd"),
        }
    }

    /// A chart installed with namespaced RBAC but no watch namespace would fail every
    /// cluster-wide list with 403 forever; the operator refuses to start instead.
    #[test]
    fn namespaced_rbac_without_a_namespace_refuses_to_start() {
        let err = watch_namespace(&run_args(&["--namespaced-rbac"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--namespaced-rbac"), "{msg}");
        assert!(msg.contains("RESULTITY_WATCH_NAMESPACE"), "{msg}");
        let err = watch_namespace(&run_args(&["--namespaced-rbac", "--namespace= "]));
        assert!(err.is_err(), "a blank namespace is no namespace");
        assert_eq!(
            watch_namespace(&run_args(&["--namespaced-rbac", "--namespace=gpu"])).unwrap(),
            Some("gpu".to_owned())
        );
        assert_eq!(watch_namespace(&run_args(&[])).unwrap(), None);
    }

    #[test]
    fn crd_apply_is_opt_in() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).map(|c| c.command);
        assert!(matches!(
            parse(&["resultity-operator", "crd"]),
            Ok(Command::Crd(super::CrdArgs { apply: false, .. }))
        ));
        assert!(matches!(
            parse(&["resultity-operator", "crd", "--apply", "--wait-seconds=5"]),
            Ok(Command::Crd(super::CrdArgs {
                apply: true,
                wait_seconds: 5
            }))
        ));
        assert!(parse(&["resultity-operator", "crd", "--wait-seconds=5"]).is_err());
    }

    #[test]
    fn cli_is_consistent_and_every_run_flag_reads_the_environment() {
        Cli::command().debug_assert();
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        // The global log flags are declared on the top-level command.
        for arg in run.get_arguments().chain(cmd.get_arguments()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(
                arg.get_env().is_some(),
                "--{id} has no environment variable"
            );
            assert!(arg.get_help().is_some(), "--{id} is undocumented");
        }
    }
}
