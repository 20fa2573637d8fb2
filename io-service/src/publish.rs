//! Config snapshots: reading the payload source, signing the next version and keeping the one
//! that is served.
//!
//! Every publication signs `version + 1` with `prev_digest` set to the snapshot in force, so
//! nodes can check the chain; the old snapshot stops being served at the same instant.

use std::path::Path;

use resultity_protocol::config::{ConfigSnapshot, NetworkConfig, SignedConfig};
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
pub fn prepare_payload(
    mut payload: NetworkConfig,
    key: &NetworkKeypair,
) -> Result<NetworkConfig, IoError> {
    if payload.network_keys.is_empty() {
        payload.network_keys.push(key.id().clone());
    }
    if !payload.network_keys.contains(key.id()) {
        return Err(IoError::InvalidConfig {
            what: "network_keys".into(),
            reason: format!("does not contain this service's key {}", key.id()),
        });
    }
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
    key: &NetworkKeypair,
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
