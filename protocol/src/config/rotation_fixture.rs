//! Snapshots of a key-rotation scenario, shared (as source, never as public API) by the
//! tests of `config` and the test-vector generator (`examples/gen_vectors.rs`, which
//! includes this file by path), so the vectors and the tests rotate keys the same way.
//!
//! The names below come from the including module, which imports them from this crate.

use super::{
    ConfigSnapshot, Environment, NetworkConfig, NetworkId, NetworkKeypair, RetiringKey,
    RuntimeImages, SignedConfig, Timing,
};

/// How long a rotation snapshot stays fresh after it is issued: a day.
const VALID_FOR_MS: u64 = 24 * 3_600_000;

/// `retiring` (key, not_after_ms) pairs as the keys a snapshot retires.
pub(super) fn retiring_keys(retiring: &[(&NetworkKeypair, u64)]) -> Vec<RetiringKey> {
    retiring
        .iter()
        .map(|(k, t)| RetiringKey {
            key: k.id().clone(),
            not_after_ms: *t,
        })
        .collect()
}

/// A snapshot naming `keys` as the active set and `retiring` (key, not_after) as the overlap,
/// chained to `prev` and valid for a day from `issued_at_ms`; no models.
pub(super) fn rotation_snapshot(
    network_id: &NetworkId,
    version: u64,
    prev: Option<&SignedConfig>,
    issued_at_ms: u64,
    keys: &[&NetworkKeypair],
    retiring: &[(&NetworkKeypair, u64)],
) -> ConfigSnapshot {
    ConfigSnapshot {
        network_id: network_id.clone(),
        version,
        issued_at_ms,
        expires_at_ms: issued_at_ms + VALID_FOR_MS,
        prev_digest: prev.map(|p| p.digest().clone()),
        payload: keys_config(keys, retiring),
    }
}

/// A testnet config with default timing and no models, naming `keys` as the active set and
/// `retiring` (key, not_after) as the overlap.
pub(super) fn keys_config(
    keys: &[&NetworkKeypair],
    retiring: &[(&NetworkKeypair, u64)],
) -> NetworkConfig {
    NetworkConfig {
        environment: Environment::Testnet,
        models: vec![],
        runtime_images: RuntimeImages::default(),
        sidecar_image: None,
        timing: Timing::default(),
        subclouds: vec![],
        network_keys: keys.iter().map(|k| k.id().clone()).collect(),
        retiring_keys: retiring_keys(retiring),
        revoked_node_keys: vec![],
        penalties: None,
    }
}
