//! The operator's registry override (`--image-registry`): images the network's config names
//! and the default sidecar image are pulled through the mirror; images a user names on a
//! resource are used as written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use resultity_operator::crd::{ResultityNetwork, ResultityNode};
use resultity_operator::validate::{Defaults, validate_node};

use crate::common;
use common::fixture;

fn mirrored() -> Defaults {
    Defaults {
        image_registry: Some("registry.example.com/mirror".into()),
        ..Defaults::default()
    }
}

#[test]
fn config_images_go_through_the_mirror() {
    let node: ResultityNode = fixture("node-vllm.yaml");
    let net: ResultityNetwork = fixture("network.yaml");
    let plain = validate_node(&node, Some(&net), &Defaults::default()).unwrap();
    let r = validate_node(&node, Some(&net), &mirrored()).unwrap();
    assert_eq!(
        r.runtime_image,
        resultity_operator::images::mirror(&plain.runtime_image, "registry.example.com/mirror")
    );
    assert!(r.runtime_image.starts_with("registry.example.com/mirror/"));
    assert!(
        r.sidecar_image
            .starts_with("registry.example.com/mirror/resultity/resultity-sidecar:"),
        "{}",
        r.sidecar_image
    );
}

#[test]
fn images_named_on_resources_are_used_as_written() {
    let mut node: ResultityNode = fixture("node-vllm.yaml");
    node.spec.runtime.image = Some("my.registry/vllm:pinned".into());
    let mut net: ResultityNetwork = fixture("network.yaml");
    if let Some(s) = net.status.as_mut() {
        s.sidecar_image = None;
    }
    net.spec.sidecar_image = Some("my.registry/sidecar:pinned".into());
    let r = validate_node(&node, Some(&net), &mirrored()).unwrap();
    assert_eq!(r.runtime_image, "my.registry/vllm:pinned");
    assert_eq!(r.sidecar_image, "my.registry/sidecar:pinned");

    // Neither the config nor the network names a sidecar: the default is mirrored.
    net.spec.sidecar_image = None;
    let r = validate_node(&node, Some(&net), &mirrored()).unwrap();
    assert_eq!(
        r.sidecar_image,
        "registry.example.com/mirror/resultity/resultity-sidecar:0.1.0"
    );
}
