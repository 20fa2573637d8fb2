//! The applied network configuration, persisted atomically with the trust state that accepted
//! it (protocol §8.3), so the last good config — and rotated network keys — survive restarts.
//!
//! One file, `config-state.json`: `{trust, config}` where `config` is the signed snapshot text
//! exactly as received. Writing both in one atomic rename means a crash can never pair a new
//! config with an old trust state.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use resultity_protocol::ProtocolError;
use resultity_protocol::config::{
    ConfigSnapshot, ConfigTrust, ConfigVerdict, SignedConfig, VerifiedConfig,
};
use serde::{Deserialize, Serialize};

const FILE: &str = "config-state.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigStoreError {
    #[error("config store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored config state {path} is unusable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The data directory holds another network's state (wrong volume mounted?).
    #[error("stored config belongs to network {stored}, this node is configured for {configured}")]
    WrongNetwork { stored: String, configured: String },
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    trust: ConfigTrust,
    config: String,
}

/// The config in force and the trust that admits the next one.
#[derive(Debug)]
pub struct ConfigStore {
    path: PathBuf,
    trust: ConfigTrust,
    current: Option<VerifiedConfig>,
}

impl ConfigStore {
    /// Loads the persisted state from `dir`, or starts from `pinned` when there is none.
    pub fn open(dir: &Path, pinned: ConfigTrust) -> Result<Self, ConfigStoreError> {
        let path = dir.join(FILE);
        let io = |source| ConfigStoreError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path,
                    trust: pinned,
                    current: None,
                });
            }
            Err(e) => return Err(io(e)),
        };
        let corrupt = |reason: String| ConfigStoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if p.trust.network_id != pinned.network_id {
            return Err(ConfigStoreError::WrongNetwork {
                stored: p.trust.network_id.to_string(),
                configured: pinned.network_id.to_string(),
            });
        }
        let signed =
            SignedConfig::decode(p.config.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
        // The file was written only after full verification; the digest match proves it is
        // the snapshot that trust state accepted, unaltered.
        match &p.trust.current {
            Some(cur) if &cur.digest == signed.digest() => {}
            _ => {
                return Err(corrupt(
                    "config digest does not match the trust state".into(),
                ));
            }
        }
        let snapshot = signed
            .parse_unverified()
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            path,
            trust: p.trust,
            current: Some(VerifiedConfig { snapshot, signed }),
        })
    }

    /// The config in force.
    pub fn current(&self) -> Option<&VerifiedConfig> {
        self.current.as_ref()
    }

    pub fn snapshot(&self) -> Option<&ConfigSnapshot> {
        self.current.as_ref().map(|c| &c.snapshot)
    }

    pub fn trust(&self) -> &ConfigTrust {
        &self.trust
    }

    /// Verifies an offered snapshot and, if it is newer, persists and applies it. On any
    /// refusal nothing changes and the last good config stays in force.
    pub fn offer(
        &mut self,
        signed: &SignedConfig,
        now_ms: u64,
    ) -> Result<Option<&VerifiedConfig>, OfferError> {
        self.offer_chain(std::slice::from_ref(signed), now_ms)
    }

    /// Verifies a catch-up chain (the rotations this node missed, then the network's current
    /// snapshot) and, if its last snapshot is newer, persists and applies it with the trust
    /// the chain establishes. All or nothing: on any refusal nothing changes.
    pub fn offer_chain(
        &mut self,
        chain: &[SignedConfig],
        now_ms: u64,
    ) -> Result<Option<&VerifiedConfig>, OfferError> {
        match self.trust.verify_chain(chain, now_ms)? {
            ConfigVerdict::Unchanged => Ok(None),
            ConfigVerdict::New(cfg) => {
                let mut trust = self.trust.clone();
                trust.apply(&cfg);
                self.persist(&trust, cfg.signed.as_str())?;
                self.trust = trust;
                self.current = Some(*cfg);
                Ok(self.current.as_ref())
            }
        }
    }

    fn persist(&self, trust: &ConfigTrust, config: &str) -> Result<(), ConfigStoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ConfigStoreError::Io { path, source }
        };
        let body = serde_json::to_vec(&Persisted {
            trust: trust.clone(),
            config: config.to_owned(),
        })
        .map_err(|e| ConfigStoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        {
            let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&body).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        #[cfg(unix)]
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
    }
}

/// Why an offered config was not applied.
#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    /// Refused by verification (signature, network, expiry, rollback, equivocation…).
    #[error(transparent)]
    Refused(#[from] ProtocolError),
    /// Verified, but could not be persisted; not applied.
    #[error(transparent)]
    Store(#[from] ConfigStoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::config::{NetworkConfig, RuntimeImages};
    use resultity_protocol::messages::{Environment, Timing};
    use resultity_protocol::{NetworkId, NetworkKeypair};

    const NOW: u64 = 1_767_225_600_000;

    fn snap(key: &NetworkKeypair, version: u64, prev: Option<&SignedConfig>) -> ConfigSnapshot {
        ConfigSnapshot {
            network_id: NetworkId::parse("testnet").unwrap(),
            version,
            issued_at_ms: NOW,
            expires_at_ms: NOW + 3_600_000,
            prev_digest: prev.map(|p| p.digest().clone()),
            payload: NetworkConfig {
                environment: Environment::Testnet,
                models: vec![],
                runtime_images: RuntimeImages::default(),
                sidecar_image: None,
                timing: Timing::default(),
                subclouds: vec![],
                network_keys: vec![key.id().clone()],
                retiring_keys: vec![],
                revoked_node_keys: vec![],
                penalties: None,
            },
        }
    }

    fn pinned(key: &NetworkKeypair) -> ConfigTrust {
        ConfigTrust::pinned(NetworkId::parse("testnet").unwrap(), vec![key.id().clone()])
    }

    #[test]
    fn last_good_config_survives_refusals_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let mut store = ConfigStore::open(dir.path(), pinned(&key)).unwrap();
        let v1 = SignedConfig::sign(&key, &snap(&key, 1, None)).unwrap();
        assert!(store.offer(&v1, NOW).unwrap().is_some());
        let v2 = SignedConfig::sign(&key, &snap(&key, 2, Some(&v1))).unwrap();
        assert!(store.offer(&v2, NOW).unwrap().is_some());
        // Rollback and expired are refused; v2 stays.
        assert!(matches!(
            store.offer(&v1, NOW),
            Err(OfferError::Refused(ProtocolError::Rollback { .. }))
        ));
        let mut exp = snap(&key, 3, Some(&v2));
        exp.expires_at_ms = NOW - 1;
        let exp = SignedConfig::sign(&key, &exp).unwrap();
        assert!(store.offer(&exp, NOW).is_err());
        drop(store);
        let store = ConfigStore::open(dir.path(), pinned(&key)).unwrap();
        assert_eq!(store.snapshot().unwrap().version, 2);
        assert_eq!(store.current().unwrap().digest(), v2.digest());
        // After the restart a rollback is still refused.
        let mut store = store;
        assert!(store.offer(&v1, NOW).is_err());
    }

    #[test]
    fn tampered_and_wrong_network_configs_are_refused_and_v1_stays() {
        let dir = tempfile::tempdir().unwrap();
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let mut store = ConfigStore::open(dir.path(), pinned(&key)).unwrap();
        let v1 = SignedConfig::sign(&key, &snap(&key, 1, None)).unwrap();
        store.offer(&v1, NOW).unwrap();
        // Tampered: one byte of the signed body changed after signing.
        let v2 = SignedConfig::sign(&key, &snap(&key, 2, Some(&v1))).unwrap();
        let tampered = v2
            .as_str()
            .replacen("\\\"version\\\":2", "\\\"version\\\":3", 1);
        assert_ne!(tampered, v2.as_str(), "the tamper must change the bytes");
        let tampered = SignedConfig::decode(tampered.as_bytes()).unwrap();
        assert!(matches!(
            store.offer(&tampered, NOW),
            Err(OfferError::Refused(ProtocolError::BadSignature { .. }))
        ));
        // Wrong network.
        let mut other = snap(&key, 2, Some(&v1));
        other.network_id = NetworkId::parse("mainnet").unwrap();
        let other = SignedConfig::sign(&key, &other).unwrap();
        assert!(matches!(
            store.offer(&other, NOW),
            Err(OfferError::Refused(ProtocolError::WrongAudience { .. }))
        ));
        // Signed by a key the node does not trust.
        let stranger = NetworkKeypair::from_seed(&[9; 32]);
        let forged = SignedConfig::sign(&stranger, &snap(&stranger, 2, Some(&v1))).unwrap();
        assert!(matches!(
            store.offer(&forged, NOW),
            Err(OfferError::Refused(ProtocolError::UnknownSigner { .. }))
        ));
        assert_eq!(store.snapshot().unwrap().version, 1);
        drop(store);
        let store = ConfigStore::open(dir.path(), pinned(&key)).unwrap();
        assert_eq!(store.current().unwrap().digest(), v1.digest());
    }

    #[test]
    fn tampered_or_foreign_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let mut store = ConfigStore::open(dir.path(), pinned(&key)).unwrap();
        let v1 = SignedConfig::sign(&key, &snap(&key, 1, None)).unwrap();
        store.offer(&v1, NOW).unwrap();
        let other =
            ConfigTrust::pinned(NetworkId::parse("mainnet").unwrap(), vec![key.id().clone()]);
        assert!(matches!(
            ConfigStore::open(dir.path(), other),
            Err(ConfigStoreError::WrongNetwork { .. })
        ));
        let path = dir.path().join(FILE);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("testnet\\\\\\\"", "testnex\\\\\\\"");
        let text = text.replacen("\\\"version\\\":1", "\\\"version\\\":9", 1);
        fs::write(&path, text).unwrap();
        assert!(matches!(
            ConfigStore::open(dir.path(), pinned(&key)),
            Err(ConfigStoreError::Corrupt { .. })
        ));
    }
}
