//! Config snapshots: reading the payload source, signing the next version and keeping the one
//! that is served.
//!
//! Every publication signs `version + 1` with `prev_digest` set to the snapshot in force, so
//! nodes can check the chain; the old snapshot stops being served at the same instant.
//!
//! Key rotation (spec §8.4) is driven by the snapshots themselves, so it survives restarts: a
//! rotation snapshot, signed by the old key, names the new key active and the old one retiring
//! until `now + overlap`; the service signs everything with the old key until then (nodes that
//! have not fetched the rotation trust only it), then with the new key, and publishes the
//! confirmation that drops the retiring key. Rotation snapshots are kept (bounded) so a node
//! that missed them can verify its way forward (`GET /v1/config?since=N`).

use std::path::Path;

use resultity_protocol::config::{
    ConfigSnapshot, ConfigTrust, NetworkConfig, RetiringKey, SignedConfig, VerifiedConfig,
};
use resultity_protocol::envelope::RawEnvelope;
use resultity_protocol::messages::ConfigPointer;
use resultity_protocol::{NetworkId, NetworkKeypair, Purpose, limits};

use crate::error::IoError;

/// The snapshot being served.
#[derive(Debug, Clone)]
pub struct Published {
    pub snapshot: ConfigSnapshot,
    pub signed: SignedConfig,
}

impl Published {
    pub fn pointer(&self) -> ConfigPointer {
        ConfigPointer {
            version: self.snapshot.version,
            digest: self.signed.digest().clone(),
        }
    }
}

/// Parses a payload: JSON for `.json` files, YAML otherwise (YAML also reads most JSON).
pub fn parse_payload(text: &str, what: &str, json: bool) -> Result<NetworkConfig, IoError> {
    let parsed = if json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    };
    parsed.map_err(|reason| IoError::InvalidConfig {
        what: what.to_owned(),
        reason,
    })
}

/// Reads a payload file (YAML or JSON by extension).
pub fn load_payload(path: &Path) -> Result<NetworkConfig, IoError> {
    let text = std::fs::read_to_string(path).map_err(|source| IoError::Read {
        path: path.to_owned(),
        source,
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse_payload(&text, &path.display().to_string(), json)
}

/// Makes a payload publishable by `key`: an empty key set becomes `[key]`; a set without
/// `key` is refused, because nodes would then reject every later snapshot this service signs.
/// Once a rotation to `next` is published, the service owns the key fields: they are carried
/// over from `published`, whatever the payload file still names.
pub fn prepare_payload(
    mut payload: NetworkConfig,
    key: &NetworkKeypair,
    next: Option<&NetworkKeypair>,
    published: Option<&NetworkConfig>,
) -> Result<NetworkConfig, IoError> {
    if let (Some(next), Some(p)) = (next, published)
        && p.network_keys.contains(next.id())
    {
        payload.network_keys = p.network_keys.clone();
        payload.retiring_keys = p.retiring_keys.clone();
        return check_models(payload);
    }
    if payload.network_keys.is_empty() {
        payload.network_keys.push(key.id().clone());
    }
    if !payload.network_keys.contains(key.id()) {
        return Err(IoError::InvalidConfig {
            what: "network_keys".into(),
            reason: format!("does not contain this service's key {}", key.id()),
        });
    }
    check_models(payload)
}

fn check_models(payload: NetworkConfig) -> Result<NetworkConfig, IoError> {
    for m in &payload.models {
        if m.runtimes.is_empty() {
            return Err(IoError::InvalidConfig {
                what: format!("model {}", m.model.id),
                reason: "no runtime may serve it".into(),
            });
        }
    }
    Ok(payload)
}

/// Signs the snapshot after `prev` (or version 1).
pub fn sign_next(
    key: &NetworkKeypair,
    network_id: &NetworkId,
    prev: Option<&Published>,
    payload: NetworkConfig,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Published, IoError> {
    let snapshot = ConfigSnapshot {
        network_id: network_id.clone(),
        version: prev.map_or(1, |p| p.snapshot.version + 1),
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        prev_digest: prev.map(|p| p.signed.digest().clone()),
        payload,
    };
    let signed = SignedConfig::sign(key, &snapshot)?;
    Ok(Published { snapshot, signed })
}

/// Loads the last published snapshot from the state file, if any. It must be signed by `key`
/// for `network_id`; anything else is an error rather than a silent restart at version 1,
/// which nodes would refuse as a rollback.
pub fn load_state(
    path: &Path,
    keys: &[&NetworkKeypair],
    network_id: &NetworkId,
) -> Result<Option<Published>, IoError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IoError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let raw = RawEnvelope::decode(&bytes, limits::MAX_CONFIG_BYTES)?;
    let Some(key) = keys.iter().find(|k| k.id().as_str() == raw.signer()) else {
        return Err(IoError::InvalidConfig {
            what: path.display().to_string(),
            reason: format!(
                "snapshot is signed by {}, which is not a key of this service",
                raw.signer()
            ),
        });
    };
    let snapshot: ConfigSnapshot = raw.open(Purpose::NetConfig, &key.verifying_key())?;
    if &snapshot.network_id != network_id {
        return Err(IoError::InvalidConfig {
            what: path.display().to_string(),
            reason: format!("snapshot is for network {}", snapshot.network_id),
        });
    }
    let signed = SignedConfig::decode(&bytes)?;
    Ok(Some(Published { snapshot, signed }))
}

/// Writes the published snapshot atomically (temporary file, then rename).
pub fn save_state(path: &Path, published: &Published) -> Result<(), IoError> {
    let tmp = path.with_extension("tmp");
    let write = |p: &Path| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(p)?;
        f.write_all(published.signed.as_str().as_bytes())?;
        f.sync_all()
    };
    write(&tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| IoError::Write {
            path: path.to_owned(),
            source,
        })
}

/// The snapshot to serve at start: the stored one when it still carries `payload` and has
/// more than half its lifetime left, else the next version chained to it (or version 1).
pub fn initial(
    stored: Option<Published>,
    key: &NetworkKeypair,
    network_id: &NetworkId,
    payload: NetworkConfig,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Published, IoError> {
    if let Some(p) = &stored
        && p.snapshot.payload == payload
        && p.snapshot.expires_at_ms > now_ms.saturating_add(ttl_ms / 2)
    {
        return Ok(p.clone());
    }
    sign_next(key, network_id, stored.as_ref(), payload, now_ms, ttl_ms)
}

/// The key to sign with at `now_ms` under the published `payload`: a held key in its overlap
/// window first (every node trusts it, also those that have not fetched the rotation), else a
/// held key of the active set, the newest first.
pub fn signing_key<'a>(
    held: &[&'a NetworkKeypair],
    payload: &NetworkConfig,
    now_ms: u64,
) -> Result<&'a NetworkKeypair, IoError> {
    let retiring = held.iter().find(|k| {
        payload
            .retiring_keys
            .iter()
            .any(|r| &r.key == k.id() && now_ms < r.not_after_ms)
    });
    let active = || {
        held.iter()
            .rev()
            .find(|k| payload.network_keys.contains(k.id()))
    };
    retiring
        .or_else(active)
        .copied()
        .ok_or_else(|| IoError::InvalidConfig {
            what: "network_keys".into(),
            reason: "the published config names none of this service's keys".into(),
        })
}

/// The key to sign `next` with after `prev`: as [`signing_key`], except that a snapshot that
/// changes the active set is signed by a held key of that set, since nodes refuse a key
/// change signed by a retiring key (spec §8.4).
pub fn signing_key_for<'a>(
    held: &[&'a NetworkKeypair],
    prev: &NetworkConfig,
    next: &NetworkConfig,
    now_ms: u64,
) -> Result<&'a NetworkKeypair, IoError> {
    if !is_rotation(prev, next) {
        return signing_key(held, prev, now_ms);
    }
    held.iter()
        .rev()
        .find(|k| prev.network_keys.contains(k.id()))
        .copied()
        .ok_or_else(|| IoError::InvalidConfig {
            what: "network_keys".into(),
            reason: "changing the active keys needs a held key of the active set".into(),
        })
}

/// Verifies `next` as a node holding `prev` does (spec §8.3 and the rotation rules of §8.4),
/// so the service never serves a snapshot every node would refuse — one that extends a
/// retiring key's window, for instance.
pub fn check_next(prev: &Published, next: &Published, now_ms: u64) -> Result<(), IoError> {
    let mut trust = ConfigTrust::pinned(
        prev.snapshot.network_id.clone(),
        prev.snapshot.payload.network_keys.clone(),
    );
    trust.apply(&VerifiedConfig {
        snapshot: prev.snapshot.clone(),
        signed: prev.signed.clone(),
    });
    trust
        .verify(&next.signed, now_ms)
        .map(|_| ())
        .map_err(|e| IoError::InvalidConfig {
            what: format!("config version {}", next.snapshot.version),
            reason: format!("nodes would refuse it: {e}"),
        })
}

/// The payload of a rotation from `old` to `new`: `new` replaces `old` in the active set and
/// `old` is retiring until `not_after_ms`.
pub fn rotation_payload(
    mut payload: NetworkConfig,
    old: &NetworkKeypair,
    new: &NetworkKeypair,
    not_after_ms: u64,
) -> NetworkConfig {
    payload
        .network_keys
        .retain(|k| k != old.id() && k != new.id());
    payload.network_keys.insert(0, new.id().clone());
    payload.retiring_keys.retain(|r| &r.key != old.id());
    payload.retiring_keys.push(RetiringKey {
        key: old.id().clone(),
        not_after_ms,
    });
    payload
}

/// The confirmation of a finished rotation: `payload` without the retiring keys whose window
/// ended by `now_ms`, or `None` when none did.
pub fn confirmation_payload(payload: &NetworkConfig, now_ms: u64) -> Option<NetworkConfig> {
    if !payload
        .retiring_keys
        .iter()
        .any(|r| r.not_after_ms <= now_ms)
    {
        return None;
    }
    let mut next = payload.clone();
    next.retiring_keys.retain(|r| r.not_after_ms > now_ms);
    Some(next)
}

/// Rotation snapshots kept for catch-up; with the current one a chain fits the protocol bound.
pub const KEPT_ROTATIONS: usize = limits::MAX_CONFIG_CHAIN_LINKS - 1;

/// Whether `next` changes the active key set of `prev`: such a snapshot is a step a node that
/// missed it needs to verify what follows.
pub fn is_rotation(prev: &NetworkConfig, next: &NetworkConfig) -> bool {
    prev.network_keys != next.network_keys
}

/// The chain a node at version `since` needs (spec §8.4): the kept rotations after `since`,
/// then the current snapshot.
pub fn chain_since<'a>(
    rotations: &'a [Published],
    current: &'a Published,
    since: u64,
) -> Vec<&'a SignedConfig> {
    let mut links: Vec<&SignedConfig> = rotations
        .iter()
        .filter(|r| r.snapshot.version > since && r.snapshot.version < current.snapshot.version)
        .map(|r| &r.signed)
        .collect();
    links.push(&current.signed);
    links
}

/// Where the rotation snapshots of a state file are kept.
pub fn rotations_path(state: &Path) -> std::path::PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".rotations");
    state.with_file_name(name)
}

/// Loads kept rotation snapshots (a JSON array of signed snapshots); none when absent. A
/// damaged file is an error naming it, never served: nodes verify what they get, but a broken
/// chain would only be refused by every node.
pub fn load_rotations(path: &Path) -> Result<Vec<Published>, IoError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(IoError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let invalid = |reason: String| IoError::InvalidConfig {
        what: path.display().to_string(),
        reason,
    };
    let texts: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    texts
        .iter()
        .rev()
        .take(KEPT_ROTATIONS)
        .rev()
        .map(|t| {
            let signed = SignedConfig::decode(t.as_bytes()).map_err(|e| invalid(e.to_string()))?;
            let snapshot = signed
                .parse_unverified()
                .map_err(|e| invalid(e.to_string()))?;
            Ok(Published { snapshot, signed })
        })
        .collect()
}

/// Writes the kept rotation snapshots atomically.
pub fn save_rotations(path: &Path, rotations: &[Published]) -> Result<(), IoError> {
    let texts: Vec<&str> = rotations.iter().map(|r| r.signed.as_str()).collect();
    let body = serde_json::to_vec(&texts).map_err(|e| IoError::InvalidConfig {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    let write = |p: &Path| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(p)?;
        f.write_all(&body)?;
        f.sync_all()
    };
    write(&tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| IoError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::messages::{Environment, Timing};

    const NOW: u64 = 1_767_225_600_000;

    fn payload(keys: &[&NetworkKeypair]) -> NetworkConfig {
        NetworkConfig {
            environment: Environment::Testnet,
            models: vec![],
            runtime_images: Default::default(),
            sidecar_image: None,
            timing: Timing::default(),
            subclouds: vec![],
            network_keys: keys.iter().map(|k| k.id().clone()).collect(),
            retiring_keys: vec![],
            revoked_node_keys: vec![],
            penalties: None,
        }
    }

    #[test]
    fn the_old_key_signs_through_the_overlap_then_the_new_one() {
        let (k1, k2) = (
            NetworkKeypair::from_seed(&[1; 32]),
            NetworkKeypair::from_seed(&[2; 32]),
        );
        let held = [&k1, &k2];
        let before = payload(&[&k1]);
        assert_eq!(signing_key(&held, &before, NOW).unwrap().id(), k1.id());
        let rotation = rotation_payload(before.clone(), &k1, &k2, NOW + 1_000);
        assert_eq!(rotation.network_keys, vec![k2.id().clone()]);
        assert!(is_rotation(&before, &rotation));
        assert_eq!(
            signing_key(&held, &rotation, NOW + 999).unwrap().id(),
            k1.id()
        );
        assert_eq!(
            signing_key(&held, &rotation, NOW + 1_000).unwrap().id(),
            k2.id()
        );
        // Only the new key held (promoted early): it signs, the service still works.
        assert_eq!(signing_key(&[&k2], &rotation, NOW).unwrap().id(), k2.id());
        // A key the config does not name cannot sign.
        assert!(signing_key(&[&k1], &payload(&[&k2]), NOW).is_err());

        assert_eq!(confirmation_payload(&rotation, NOW + 999), None);
        let confirmed = confirmation_payload(&rotation, NOW + 1_000).unwrap();
        assert!(confirmed.retiring_keys.is_empty());
        assert!(!is_rotation(&rotation, &confirmed));
    }

    #[test]
    fn the_service_never_signs_what_the_rotation_rules_refuse() {
        let (k1, k2, k3) = (
            NetworkKeypair::from_seed(&[1; 32]),
            NetworkKeypair::from_seed(&[2; 32]),
            NetworkKeypair::from_seed(&[3; 32]),
        );
        let net = NetworkId::parse("testnet").unwrap();
        let v1 = sign_next(&k1, &net, None, payload(&[&k1]), NOW, 60_000).unwrap();
        let rotation = rotation_payload(payload(&[&k1]), &k1, &k2, NOW + 1_000);
        let v2 = sign_next(&k1, &net, Some(&v1), rotation.clone(), NOW, 60_000).unwrap();
        check_next(&v1, &v2, NOW).unwrap();
        // During the overlap the retiring key signs, but a change of keys is signed by the
        // active one.
        let held = [&k1, &k2, &k3];
        assert_eq!(
            signing_key_for(&held, &rotation, &rotation, NOW)
                .unwrap()
                .id(),
            k1.id()
        );
        let onward = rotation_payload(rotation.clone(), &k2, &k3, NOW + 2_000);
        let key = signing_key_for(&held, &rotation, &onward, NOW).unwrap();
        assert_eq!(key.id(), k2.id());
        let v3 = sign_next(key, &net, Some(&v2), onward.clone(), NOW, 60_000).unwrap();
        check_next(&v2, &v3, NOW).unwrap();
        let by_retiring = sign_next(&k1, &net, Some(&v2), onward, NOW, 60_000).unwrap();
        assert!(check_next(&v2, &by_retiring, NOW).is_err());
        // Extending the retiring window is refused before it is published.
        let mut extended = rotation;
        extended.retiring_keys[0].not_after_ms = NOW + 86_400_000;
        let v3 = sign_next(&k1, &net, Some(&v2), extended, NOW, 60_000).unwrap();
        let err = check_next(&v2, &v3, NOW).unwrap_err().to_string();
        assert!(err.contains("may only be shortened"), "{err}");
    }

    #[test]
    fn a_stale_payload_file_cannot_undo_a_published_rotation() {
        let (k1, k2) = (
            NetworkKeypair::from_seed(&[1; 32]),
            NetworkKeypair::from_seed(&[2; 32]),
        );
        let rotation = rotation_payload(payload(&[&k1]), &k1, &k2, NOW + 1_000);
        // The file still names k1 only; once the rotation is published the service keeps it.
        let mut file = payload(&[&k1]);
        file.sidecar_image = Some("new".into());
        let prepared = prepare_payload(file.clone(), &k1, Some(&k2), Some(&rotation)).unwrap();
        assert_eq!(prepared.network_keys, rotation.network_keys);
        assert_eq!(prepared.retiring_keys, rotation.retiring_keys);
        assert_eq!(prepared.sidecar_image.as_deref(), Some("new"));
        // Before any rotation the file's keys must include the service's key.
        assert!(prepare_payload(payload(&[&k2]), &k1, None, None).is_err());
        assert_eq!(
            prepare_payload(payload(&[]), &k1, None, None)
                .unwrap()
                .network_keys,
            vec![k1.id().clone()]
        );
    }

    #[test]
    fn chains_hold_the_rotations_after_the_version_then_the_current() {
        let k1 = NetworkKeypair::from_seed(&[1; 32]);
        let net = NetworkId::parse("testnet").unwrap();
        let mut all = vec![sign_next(&k1, &net, None, payload(&[&k1]), NOW, 60_000).unwrap()];
        for _ in 0..5 {
            let prev = all.last().cloned();
            all.push(sign_next(&k1, &net, prev.as_ref(), payload(&[&k1]), NOW, 60_000).unwrap());
        }
        // Versions 2 and 4 were rotations; 6 is current.
        let rotations = vec![all[1].clone(), all[3].clone()];
        let versions = |since| {
            chain_since(&rotations, &all[5], since)
                .iter()
                .map(|s| s.parse_unverified().unwrap().version)
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(0), vec![2, 4, 6]);
        assert_eq!(versions(2), vec![4, 6]);
        assert_eq!(versions(4), vec![6]);
        assert_eq!(versions(6), vec![6]);
        assert_eq!(versions(9), vec![6]);
    }

    #[test]
    fn kept_rotations_round_trip_through_their_file() {
        let k1 = NetworkKeypair::from_seed(&[1; 32]);
        let net = NetworkId::parse("testnet").unwrap();
        let path = std::env::temp_dir().join(format!(
            "resultity-publish-test-{}.json",
            std::process::id()
        ));
        let rot = rotations_path(&path);
        assert!(rot.to_string_lossy().ends_with(".json.rotations"));
        assert!(load_rotations(&rot).unwrap().is_empty());
        let one = sign_next(&k1, &net, None, payload(&[&k1]), NOW, 60_000).unwrap();
        save_rotations(&rot, std::slice::from_ref(&one)).unwrap();
        let loaded = load_rotations(&rot).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].signed.digest(), one.signed.digest());
        std::fs::write(&rot, b"not json").unwrap();
        assert!(load_rotations(&rot).is_err());
        let _ = std::fs::remove_file(&rot);
    }
}
