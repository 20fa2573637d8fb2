//! Registry mirroring for air-gapped clusters: one registry prefix replaces the registry of
//! every image the operator chooses for a pod from the network's config or its own default.
//! Images a user names on a resource (`ResultityNode.spec.runtime.image`,
//! `ResultityNetwork.spec.sidecarImage`) are used as written.

/// `image` as pulled through `registry`: a leading registry host (a first path element with a
/// `.` or `:`, or `localhost`) is replaced, any other reference is prefixed
/// (`vllm/vllm-openai:v0.11.0` → `REGISTRY/vllm/vllm-openai:v0.11.0`). Idempotent: an image
/// already under `registry` is returned unchanged. The chart's `imageRegistry` value rewrites
/// the operator's own images the same way.
pub fn mirror(image: &str, registry: &str) -> String {
    let registry = registry.trim_end_matches('/');
    if registry.is_empty() || image.starts_with(&format!("{registry}/")) {
        return image.to_owned();
    }
    let path = match image.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            rest
        }
        _ => image,
    };
    format!("{registry}/{path}")
}

#[cfg(test)]
mod tests {
    use super::mirror;

    #[test]
    fn replaces_the_registry_and_keeps_path_tag_and_digest() {
        let r = "registry.example.com/mirror";
        for (from, to) in [
            (
                "ghcr.io/resultity/resultity-sidecar:0.1.0",
                "registry.example.com/mirror/resultity/resultity-sidecar:0.1.0",
            ),
            (
                "vllm/vllm-openai:v0.11.0",
                "registry.example.com/mirror/vllm/vllm-openai:v0.11.0",
            ),
            (
                "nvcr.io/nvidia/tritonserver@sha256:abc",
                "registry.example.com/mirror/nvidia/tritonserver@sha256:abc",
            ),
            ("localhost:5000/x:1", "registry.example.com/mirror/x:1"),
            ("localhost/x", "registry.example.com/mirror/x"),
            ("busybox", "registry.example.com/mirror/busybox"),
        ] {
            assert_eq!(mirror(from, r), to, "{from}");
            assert_eq!(mirror(to, r), to, "idempotent for {to}");
        }
        assert_eq!(
            mirror("vllm/vllm-openai", "reg.local/"),
            "reg.local/vllm/vllm-openai"
        );
        assert_eq!(mirror("vllm/vllm-openai", ""), "vllm/vllm-openai");
    }
}
