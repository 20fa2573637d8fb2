//! The operator's pod and this binary agree: the sidecar arguments and the preStop command the
//! operator writes for `examples/node.yaml` parse and validate in `resultity-sidecar`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use resultity_operator::build::build_pod;
use resultity_operator::crd::{ConfigRef, ResultityNode};
use resultity_operator::validate::{Defaults, Resolved};
use resultity_protocol::{NetworkKeypair, NodeKeypair};

#[test]
fn operator_pod_arguments_parse_in_the_sidecar() {
    check_node_example(include_str!("../../../examples/node.yaml"), "dcgm");
}

/// The DRA example: the sidecar shares the runtime's claim and reads NVML.
#[test]
fn operator_dra_pod_arguments_parse_in_the_sidecar() {
    check_node_example(include_str!("../../../examples/node-dra.yaml"), "nvml");
}

fn check_node_example(yaml: &str, gpu_check: &str) {
    let mut node: ResultityNode = serde_norway::from_str(yaml).unwrap();
    node.metadata.uid = Some("0b6a4c1e-0000-4000-8000-000000000001".into());
    let network_key = NetworkKeypair::from_seed(&[3; 32]);
    let resolved = Resolved {
        network_id: "resultity-testnet".into(),
        io_endpoint: "https://io.testnet.resultity.com".into(),
        network_keys: vec![
            network_key.id().to_string(),
            NetworkKeypair::from_seed(&[4; 32]).id().to_string(),
        ],
        runtime_image: "vllm/vllm-openai:v0.11.0".into(),
        sidecar_image: "ghcr.io/resultity/resultity-sidecar:0.1.0".into(),
        network_config: ConfigRef {
            version: 1,
            digest: format!("sha256:{}", "0".repeat(64)),
        },
        model_memory_mib: 8192,
    };
    let node_id = NodeKeypair::from_seed(&[5; 32]).id().to_string();
    let pod = build_pod(&node, &resolved, &node_id, &Defaults::default()).unwrap();
    let spec = pod.spec.unwrap();
    let sidecar = spec
        .containers
        .iter()
        .find(|c| c.name == "sidecar")
        .unwrap();
    let args = sidecar.args.clone().unwrap();
    assert!(
        args.contains(&format!("--gpu-check={gpu_check}")),
        "{args:?}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_resultity-sidecar"))
        .arg("--dry-run")
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "args {args:?} refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("network resultity-testnet at https://io.testnet.resultity.com"),
        "{stdout}"
    );
    assert!(stdout.contains("2 pinned key(s)"), "{stdout}");
    assert!(
        stdout.contains("meta-llama/Llama-3.1-8B-Instruct@"),
        "{stdout}"
    );

    // The preStop hook: the image's binary with the `drain` subcommand.
    let pre_stop = sidecar
        .lifecycle
        .clone()
        .unwrap()
        .pre_stop
        .unwrap()
        .exec
        .unwrap()
        .command
        .unwrap();
    assert_eq!(pre_stop[0], "/resultity-sidecar");
    let out = Command::new(env!("CARGO_BIN_EXE_resultity-sidecar"))
        .arg("--dry-run")
        .args(&pre_stop[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "preStop {pre_stop:?} refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("wait: true"), "{said}");
    // It asks the port the sidecar listens on (the pod's `--listen`).
    let listen_port = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen=0.0.0.0:"))
        .unwrap();
    assert!(
        said.contains(&format!(
            "would ask http://127.0.0.1:{listen_port} to drain"
        )),
        "{said}"
    );
    assert!(said.contains("deregister: true"), "{said}");

    // And a wrong flag is refused (the check can fail).
    let mut bad = args.clone();
    bad.push("--no-such-flag".into());
    let out = Command::new(env!("CARGO_BIN_EXE_resultity-sidecar"))
        .arg("--dry-run")
        .args(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
