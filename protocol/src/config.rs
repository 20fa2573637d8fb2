//! Signed configuration snapshots (spec §8): what the network approves and dictates, with
//! TUF-style freshness and rollback rules.
//!
//! A snapshot travels as an envelope with purpose `net/config`, signed by a network key.
//! `config_digest = "sha256:" + hex(sha256(body bytes))` — the digest of the exact signed
//! snapshot bytes, so two parties holding the same digest hold the same signed content.

use serde::{Deserialize, Serialize};

pub use crate::digest::{ConfigDigest, sha256_text};
use crate::envelope::{self, RawEnvelope};
use crate::error::{ProtocolError, Result, RotationFault};
use crate::ids::{NetworkId, NetworkKeyId, NodeId};
use crate::keys::NetworkKeypair;
use crate::limits;
use crate::messages::common::{Environment, ModelRef, RuntimeKind, Timing};
use crate::purpose::Purpose;

/// A model the network approves, and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ApprovedModel {
    pub model: ModelRef,
    /// Runtimes allowed to serve it.
    pub runtimes: Vec<RuntimeKind>,
    /// GPU memory a node needs in total to be eligible for this model.
    #[serde(default)]
    pub min_gpu_memory_mib: u64,
    /// Subclouds that may serve it; empty means every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subclouds: Vec<String>,
    /// A request whose answer a node checks before it serves the model (and a fleet rollout
    /// before it calls a replaced node done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_answer: Option<crate::known_answer::KnownAnswer>,
}

/// Container images the network pins per runtime; a change rolls the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RuntimeImages {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vllm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triton: Option<String>,
}

impl RuntimeImages {
    pub fn for_kind(&self, kind: RuntimeKind) -> Option<&str> {
        match kind {
            RuntimeKind::Vllm => self.vllm.as_deref(),
            RuntimeKind::Triton => self.triton.as_deref(),
            // Generic OpenAI-compatible servers differ too much for one network-wide image:
            // the node's own spec names it.
            RuntimeKind::Openai => None,
        }
    }
}

/// A subcloud: a named subset of the network with its own admission policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SubcloudPolicy {
    pub name: String,
    /// Nodes admitted; `None` means open to any node that asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<NodeId>>,
    /// Minimum GPU memory of members.
    #[serde(default)]
    pub min_gpu_memory_mib: u64,
}

/// The payload of a snapshot: everything the network dictates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct NetworkConfig {
    pub environment: Environment,
    #[serde(default)]
    pub models: Vec<ApprovedModel>,
    #[serde(default)]
    pub runtime_images: RuntimeImages,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_image: Option<String>,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subclouds: Vec<SubcloudPolicy>,
    /// Keys trusted to sign the *next* snapshots. A new set takes effect once a snapshot signed
    /// by a key of the old set has been applied, so every rotation is signed by the old keys.
    pub network_keys: Vec<NetworkKeyId>,
    /// Keys being rotated out: still trusted, for snapshots and every network-signed message,
    /// until their `not_after_ms`, so nodes that have not fetched the rotation keep working.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring_keys: Vec<RetiringKey>,
    /// Node keys the network no longer accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_node_keys: Vec<NodeId>,
    /// Scheduler exclusion thresholds, overriding the network service's own settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalties: Option<PenaltySettings>,
}

/// A network key in its overlap window: trusted until `not_after_ms` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RetiringKey {
    pub key: NetworkKeyId,
    pub not_after_ms: u64,
}

/// When the network suspends a node: after `exclude_after_failures` failed incidents in a row
/// it is excluded for `exclusion_cooldown_ms`; failures of one cause within
/// `incident_window_ms` of the first are one incident. Absent fields keep the service's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PenaltySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_after_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusion_cooldown_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_window_ms: Option<u64>,
}

impl NetworkConfig {
    pub fn approved(&self, model: &ModelRef) -> Option<&ApprovedModel> {
        self.models.iter().find(|m| &m.model == model)
    }
}

/// A configuration snapshot (the signed body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ConfigSnapshot {
    pub network_id: NetworkId,
    /// Strictly increasing per network.
    pub version: u64,
    pub issued_at_ms: u64,
    /// After this instant the snapshot is refused, so a captured old snapshot cannot be fed to
    /// a node forever (freeze attack).
    pub expires_at_ms: u64,
    /// Digest of the previous version; `None` only for version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_digest: Option<ConfigDigest>,
    pub payload: NetworkConfig,
}

/// A snapshot in its signed wire form, with its digest. Not trusted by itself: pass it through
/// [`ConfigTrust::verify`].
#[derive(Debug, Clone)]
pub struct SignedConfig {
    text: String,
    raw: RawEnvelope,
    digest: ConfigDigest,
}

impl SignedConfig {
    /// Serializes and signs a snapshot with a network key.
    pub fn sign(key: &NetworkKeypair, snapshot: &ConfigSnapshot) -> Result<Self> {
        let text = envelope::seal(key, Purpose::NetConfig, snapshot)?;
        Self::decode(text.as_bytes())
    }

    /// Decodes the wire form (bounded size, purpose `net/config`).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let raw = RawEnvelope::decode(bytes, limits::MAX_CONFIG_BYTES)?;
        raw.expect_purpose(Purpose::NetConfig)?;
        let digest = ConfigDigest::of_body(raw.body_bytes());
        // Decode succeeded, so the input is valid UTF-8 JSON.
        let text = String::from_utf8_lossy(bytes).into_owned();
        Ok(Self { text, raw, digest })
    }

    /// The wire form, exactly as received or signed (what a node persists and the network
    /// serves).
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn digest(&self) -> &ConfigDigest {
        &self.digest
    }
    /// The signing key id claimed by the envelope.
    pub fn signer(&self) -> &str {
        self.raw.signer()
    }
    /// Parses the snapshot *without* verifying; for inspection tools only.
    pub fn parse_unverified(&self) -> Result<ConfigSnapshot> {
        self.raw.parse_body()
    }
}

/// The answer of `GET /v1/config?since=N` (spec §8.4): the snapshots a node at version `N`
/// needs to reach the one in force — every key rotation published after `N`, then the current
/// snapshot — in increasing version order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChain {
    pub network_id: NetworkId,
    /// Signed snapshots in their wire form, exactly as signed.
    pub snapshots: Vec<String>,
    pub server_time_ms: u64,
}

impl ConfigChain {
    pub fn new(network_id: NetworkId, links: &[&SignedConfig], server_time_ms: u64) -> Self {
        Self {
            network_id,
            snapshots: links.iter().map(|l| l.as_str().to_owned()).collect(),
            server_time_ms,
        }
    }

    /// Decodes an answer (bounded size and length) into its snapshots, unverified: pass them
    /// to [`ConfigTrust::verify_chain`].
    pub fn decode(bytes: &[u8]) -> Result<Vec<SignedConfig>> {
        if bytes.len() > limits::MAX_CONFIG_CHAIN_BYTES {
            return Err(ProtocolError::TooLarge {
                what: "config chain",
                size: bytes.len(),
                max: limits::MAX_CONFIG_CHAIN_BYTES,
            });
        }
        let chain: ConfigChain = serde_json::from_slice(bytes)
            .map_err(|e| ProtocolError::malformed("config chain", &e))?;
        if chain.snapshots.is_empty() || chain.snapshots.len() > limits::MAX_CONFIG_CHAIN_LINKS {
            return Err(ProtocolError::InvalidField {
                field: "config chain",
                reason: format!(
                    "holds {} snapshots, expected 1 to {}",
                    chain.snapshots.len(),
                    limits::MAX_CONFIG_CHAIN_LINKS
                ),
            });
        }
        chain
            .snapshots
            .iter()
            .map(|s| SignedConfig::decode(s.as_bytes()))
            .collect()
    }
}

/// A snapshot that passed every check of [`ConfigTrust::verify`].
#[derive(Debug, Clone)]
pub struct VerifiedConfig {
    pub snapshot: ConfigSnapshot,
    pub signed: SignedConfig,
}

impl VerifiedConfig {
    pub fn digest(&self) -> &ConfigDigest {
        self.signed.digest()
    }
    pub fn pointer(&self) -> crate::messages::ConfigPointer {
        crate::messages::ConfigPointer {
            version: self.snapshot.version,
            digest: self.digest().clone(),
        }
    }
}

/// Outcome of verifying an offered snapshot.
#[derive(Debug, Clone)]
pub enum ConfigVerdict {
    /// A newer snapshot, ready to persist and apply.
    New(Box<VerifiedConfig>),
    /// The same snapshot as the one in force (same version, same digest).
    Unchanged,
}

/// What a verifier trusts: the network, the keys allowed to sign the next snapshot, and the
/// snapshot in force. Serializable so a node can persist it atomically next to the config and
/// keep rotated keys across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigTrust {
    pub network_id: NetworkId,
    /// The active key set.
    pub keys: Vec<NetworkKeyId>,
    /// Keys of the previous set, each trusted until its `not_after_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<RetiringKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<crate::messages::ConfigPointer>,
}

/// Whether a snapshot is the one to apply or a step on the way to it (spec §8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Must be unexpired.
    Final,
    /// Only carries a key rotation forward: its own expiry does not matter (as TUF's
    /// intermediate root files), the freshness of the final snapshot does.
    Intermediate,
}

impl ConfigTrust {
    /// Trust rooted in pinned keys (node flags, `ResultityNetwork.spec.publicKeys`).
    pub fn pinned(network_id: NetworkId, keys: Vec<NetworkKeyId>) -> Self {
        Self {
            network_id,
            keys,
            retiring: Vec::new(),
            current: None,
        }
    }

    /// Every key trusted at `now_ms`: the active set and the retiring keys whose overlap window
    /// has not ended. Network-signed messages are checked against this set.
    pub fn keys_at(&self, now_ms: u64) -> Vec<NetworkKeyId> {
        let mut keys = self.keys.clone();
        for r in &self.retiring {
            if now_ms < r.not_after_ms && !keys.contains(&r.key) {
                keys.push(r.key.clone());
            }
        }
        keys
    }

    /// The next instant after `now_ms` at which [`ConfigTrust::keys_at`] shrinks, if any.
    pub fn next_retirement(&self, now_ms: u64) -> Option<u64> {
        self.retiring
            .iter()
            .map(|r| r.not_after_ms)
            .filter(|t| *t > now_ms)
            .min()
    }

    /// The trusted key `signer` names at `now_ms`.
    fn signer_key(&self, signer: &str, now_ms: u64) -> Result<&NetworkKeyId> {
        if let Some(k) = self.keys.iter().find(|k| k.as_str() == signer) {
            return Ok(k);
        }
        match self.retiring.iter().find(|r| r.key.as_str() == signer) {
            Some(r) if now_ms < r.not_after_ms => Ok(&r.key),
            Some(r) => Err(ProtocolError::KeyRetired {
                signer: envelope::truncate(signer),
                not_after_ms: r.not_after_ms,
                now_ms,
            }),
            None => Err(ProtocolError::UnknownSigner {
                signer: envelope::truncate(signer),
            }),
        }
    }

    /// Verifies an offered snapshot at `now_ms`. Checks, in order: signer trusted, signature
    /// (strict), audience, expiry, issue time (± [`limits::CONFIG_CLOCK_SKEW_MS`]), version
    /// monotonicity, equivocation, chain.
    pub fn verify(&self, signed: &SignedConfig, now_ms: u64) -> Result<ConfigVerdict> {
        self.verify_link(signed, now_ms, Link::Final)
    }

    /// Verifies a catch-up chain (spec §8.4): snapshots in increasing version order, each
    /// checked against the trust the previous ones establish; the verdict is the last one's.
    /// A link that is not for this node — signed by a key it does not (or no longer) trust, or
    /// older than the snapshot in force — is skipped and changes nothing; any other failure
    /// refuses the whole chain. The last link must pass every check. Nothing is applied here:
    /// pass the verdict to [`ConfigTrust::apply`], which yields the same trust as applying
    /// every verified link in turn.
    pub fn verify_chain(&self, links: &[SignedConfig], now_ms: u64) -> Result<ConfigVerdict> {
        let Some((last, steps)) = links.split_last() else {
            return Err(ProtocolError::InvalidField {
                field: "config chain",
                reason: "holds no snapshot".into(),
            });
        };
        if links.len() > limits::MAX_CONFIG_CHAIN_LINKS {
            return Err(ProtocolError::InvalidField {
                field: "config chain",
                reason: format!(
                    "holds {} snapshots, over the limit of {}",
                    links.len(),
                    limits::MAX_CONFIG_CHAIN_LINKS
                ),
            });
        }
        let mut walk = self.clone();
        for link in steps {
            match walk.verify_link(link, now_ms, Link::Intermediate) {
                Ok(ConfigVerdict::New(cfg)) => walk.apply(&cfg),
                Ok(ConfigVerdict::Unchanged)
                | Err(
                    ProtocolError::UnknownSigner { .. }
                    | ProtocolError::KeyRetired { .. }
                    | ProtocolError::Rollback { .. },
                ) => {}
                Err(e) => return Err(e),
            }
        }
        walk.verify_link(last, now_ms, Link::Final)
    }

    fn verify_link(&self, signed: &SignedConfig, now_ms: u64, link: Link) -> Result<ConfigVerdict> {
        let signer = self.signer_key(signed.raw.signer(), now_ms)?;
        signed.raw.verify(&signer.verifying_key()?)?;
        let snapshot: ConfigSnapshot = signed.raw.parse_body()?;
        if snapshot.network_id != self.network_id {
            return Err(ProtocolError::WrongAudience {
                expected: self.network_id.to_string(),
                found: snapshot.network_id.to_string(),
            });
        }
        if link == Link::Final && snapshot.expires_at_ms <= now_ms {
            return Err(ProtocolError::Expired {
                version: snapshot.version,
                expires_at_ms: snapshot.expires_at_ms,
                now_ms,
            });
        }
        if snapshot.issued_at_ms > now_ms.saturating_add(limits::CONFIG_CLOCK_SKEW_MS) {
            return Err(ProtocolError::NotYetValid {
                version: snapshot.version,
                issued_at_ms: snapshot.issued_at_ms,
                now_ms,
            });
        }
        if snapshot.payload.network_keys.is_empty() {
            return Err(ProtocolError::InvalidField {
                field: "network_keys",
                reason: "a snapshot must name at least one network key".into(),
            });
        }
        if let Some(cur) = &self.current {
            if snapshot.version < cur.version {
                return Err(ProtocolError::Rollback {
                    current: cur.version,
                    offered: snapshot.version,
                });
            }
            if snapshot.version == cur.version {
                if signed.digest() == &cur.digest {
                    return Ok(ConfigVerdict::Unchanged);
                }
                return Err(ProtocolError::Equivocation {
                    version: snapshot.version,
                    current: cur.digest.to_string(),
                    offered: signed.digest().to_string(),
                });
            }
            if snapshot.version == cur.version + 1
                && snapshot.prev_digest.as_ref() != Some(&cur.digest)
            {
                return Err(ProtocolError::ChainMismatch {
                    version: snapshot.version,
                    current: cur.digest.to_string(),
                    prev: snapshot.prev_digest.as_ref().map(|d| d.to_string()),
                });
            }
        }
        self.check_rotation(signer, &snapshot, now_ms)?;
        Ok(ConfigVerdict::New(Box::new(VerifiedConfig {
            snapshot,
            signed: signed.clone(),
        })))
    }

    /// The rotation rules (spec §8.4), so that a leaked retiring key can neither outlive nor
    /// undo the rotation that retired it:
    /// - a snapshot signed by a retiring key names the same active set (compared as a set):
    ///   only an active key may change it, so only an active key re-activates a retired one;
    /// - a retiring entry whose window is still open at `now_ms` names a key of the active set
    ///   (the snapshot retires it and fixes its window) or a retiring key whose window it does
    ///   not extend; an entry that already ended grants nothing and is allowed.
    fn check_rotation(
        &self,
        signer: &NetworkKeyId,
        snapshot: &ConfigSnapshot,
        now_ms: u64,
    ) -> Result<()> {
        let payload = &snapshot.payload;
        let conflict = |fault| ProtocolError::RotationConflict {
            version: snapshot.version,
            fault,
        };
        if !self.keys.contains(signer) && !same_set(&payload.network_keys, &self.keys) {
            return Err(conflict(RotationFault::RetiringSignerChangesKeys {
                signer: signer.to_string(),
            }));
        }
        for entry in &payload.retiring_keys {
            // Active again (apply drops the entry), retired by this very snapshot, or over.
            if payload.network_keys.contains(&entry.key)
                || self.keys.contains(&entry.key)
                || entry.not_after_ms <= now_ms
            {
                continue;
            }
            let end = self
                .retiring
                .iter()
                .filter(|r| r.key == entry.key && now_ms < r.not_after_ms)
                .map(|r| r.not_after_ms)
                .max();
            match end {
                Some(end) if entry.not_after_ms <= end => {}
                Some(end) => {
                    return Err(conflict(RotationFault::WindowExtended {
                        key: entry.key.to_string(),
                        not_after_ms: end,
                        offered_ms: entry.not_after_ms,
                    }));
                }
                None => {
                    return Err(conflict(RotationFault::NotTrusted {
                        key: entry.key.to_string(),
                    }));
                }
            }
        }
        Ok(())
    }

    /// Makes a verified snapshot the one in force and adopts its key set for the next one:
    /// `network_keys` become the active set, `retiring_keys` the overlap. A key of the old set
    /// that the snapshot lists in neither is dropped at once (emergency rotation); a retiring
    /// key is dropped when its window ends or when a later snapshot no longer lists it (the
    /// network confirmed the rotation).
    pub fn apply(&mut self, config: &VerifiedConfig) {
        let payload = &config.snapshot.payload;
        self.current = Some(config.pointer());
        self.keys = payload.network_keys.clone();
        self.retiring = payload
            .retiring_keys
            .iter()
            .filter(|r| !self.keys.contains(&r.key))
            .cloned()
            .collect();
    }
}

/// Whether `a` and `b` name the same keys, whatever their order and repetitions.
fn same_set(a: &[NetworkKeyId], b: &[NetworkKeyId]) -> bool {
    a.iter().all(|k| b.contains(k)) && b.iter().all(|k| a.contains(k))
}

#[cfg(test)]
mod tests {
    use super::rotation_fixture::keys_config;
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn net() -> NetworkId {
        NetworkId::parse("testnet").unwrap_or_else(|_| unreachable!())
    }

    fn snapshot(key: &NetworkKeypair, version: u64, prev: Option<ConfigDigest>) -> ConfigSnapshot {
        ConfigSnapshot {
            network_id: net(),
            version,
            issued_at_ms: NOW - 1000,
            expires_at_ms: NOW + 3_600_000,
            prev_digest: prev,
            payload: keys_config(&[key], &[]),
        }
    }

    fn new(v: Result<ConfigVerdict>) -> VerifiedConfig {
        match v {
            Ok(ConfigVerdict::New(c)) => *c,
            other => panic!("expected a new config, got {other:?}"),
        }
    }

    #[test]
    fn chain_of_versions_and_every_refusal() -> Result<()> {
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let mut trust = ConfigTrust::pinned(net(), vec![key.id().clone()]);
        let v1 = SignedConfig::sign(&key, &snapshot(&key, 1, None))?;
        let c1 = new(trust.verify(&v1, NOW));
        trust.apply(&c1);
        assert!(matches!(
            trust.verify(&v1, NOW),
            Ok(ConfigVerdict::Unchanged)
        ));

        // Same version, different content.
        let mut other = snapshot(&key, 1, None);
        other.payload.sidecar_image = Some("x".into());
        let v1b = SignedConfig::sign(&key, &other)?;
        assert!(matches!(
            trust.verify(&v1b, NOW),
            Err(ProtocolError::Equivocation { version: 1, .. })
        ));

        // Next version must chain.
        let bad_chain = SignedConfig::sign(&key, &snapshot(&key, 2, None))?;
        assert!(matches!(
            trust.verify(&bad_chain, NOW),
            Err(ProtocolError::ChainMismatch { .. })
        ));
        let v2 = SignedConfig::sign(&key, &snapshot(&key, 2, Some(v1.digest().clone())))?;
        let c2 = new(trust.verify(&v2, NOW));
        trust.apply(&c2);

        // Older version.
        assert!(matches!(
            trust.verify(&v1, NOW),
            Err(ProtocolError::Rollback {
                current: 2,
                offered: 1
            })
        ));

        // Expired.
        let mut exp = snapshot(&key, 3, Some(v2.digest().clone()));
        exp.expires_at_ms = NOW;
        let exp = SignedConfig::sign(&key, &exp)?;
        assert!(matches!(
            trust.verify(&exp, NOW),
            Err(ProtocolError::Expired { .. })
        ));

        // Wrong network.
        let mut wrong = snapshot(&key, 3, Some(v2.digest().clone()));
        wrong.network_id = NetworkId::parse("mainnet")?;
        let wrong = SignedConfig::sign(&key, &wrong)?;
        assert!(matches!(
            trust.verify(&wrong, NOW),
            Err(ProtocolError::WrongAudience { .. })
        ));

        // Wrong key.
        let stranger = NetworkKeypair::from_seed(&[2; 32]);
        let forged = SignedConfig::sign(&stranger, &snapshot(&key, 3, Some(v2.digest().clone())))?;
        assert!(matches!(
            trust.verify(&forged, NOW),
            Err(ProtocolError::UnknownSigner { .. })
        ));
        Ok(())
    }

    #[test]
    fn key_rotation_is_signed_by_the_old_key() -> Result<()> {
        let old = NetworkKeypair::from_seed(&[1; 32]);
        let new_key = NetworkKeypair::from_seed(&[2; 32]);
        let mut trust = ConfigTrust::pinned(net(), vec![old.id().clone()]);
        let mut s1 = snapshot(&old, 1, None);
        s1.payload.network_keys = vec![new_key.id().clone()];
        let v1 = SignedConfig::sign(&old, &s1)?;
        let c1 = new(trust.verify(&v1, NOW));
        trust.apply(&c1);
        // The old key is no longer trusted, the new one is.
        let by_old = SignedConfig::sign(&old, &snapshot(&old, 2, Some(v1.digest().clone())))?;
        assert!(matches!(
            trust.verify(&by_old, NOW),
            Err(ProtocolError::UnknownSigner { .. })
        ));
        let by_new =
            SignedConfig::sign(&new_key, &snapshot(&new_key, 2, Some(v1.digest().clone())))?;
        assert!(matches!(
            trust.verify(&by_new, NOW),
            Ok(ConfigVerdict::New(_))
        ));
        Ok(())
    }

    #[test]
    fn digest_is_sha256_of_body() -> Result<()> {
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let v1 = SignedConfig::sign(&key, &snapshot(&key, 1, None))?;
        let body = serde_json::to_string(&snapshot(&key, 1, None)).unwrap_or_default();
        assert_eq!(v1.digest().as_str(), sha256_text(body.as_bytes()));
        assert_eq!(v1.digest().short().len(), 12);
        assert!(ConfigDigest::parse(v1.digest().as_str()).is_ok());
        assert!(ConfigDigest::parse("sha256:ABC").is_err());
        Ok(())
    }
}

#[cfg(test)]
mod rotation_fixture;

#[cfg(test)]
mod rotation_tests {
    use super::rotation_fixture::rotation_snapshot;
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_000;
    const HOUR: u64 = 3_600_000;

    fn net() -> NetworkId {
        NetworkId::parse("testnet").unwrap_or_else(|_| unreachable!())
    }

    fn key(n: u8) -> NetworkKeypair {
        NetworkKeypair::from_seed(&[n; 32])
    }

    /// A rotation snapshot of the network [`net`] (see [`rotation_snapshot`]).
    fn snap(
        version: u64,
        prev: Option<&SignedConfig>,
        issued_at_ms: u64,
        keys: &[&NetworkKeypair],
        retiring: &[(&NetworkKeypair, u64)],
    ) -> ConfigSnapshot {
        rotation_snapshot(&net(), version, prev, issued_at_ms, keys, retiring)
    }

    fn sign(k: &NetworkKeypair, s: &ConfigSnapshot) -> SignedConfig {
        SignedConfig::sign(k, s).unwrap_or_else(|e| panic!("signing: {e}"))
    }

    fn applied(trust: &mut ConfigTrust, v: Result<ConfigVerdict>) {
        match v {
            Ok(ConfigVerdict::New(c)) => trust.apply(&c),
            other => panic!("expected a new config, got {other:?}"),
        }
    }

    /// Verifies `link` at `now_ms` and applies it; it must be a new config.
    fn accept(trust: &mut ConfigTrust, link: &SignedConfig, now_ms: u64) {
        let v = trust.verify(link, now_ms);
        applied(trust, v);
    }

    /// A k1 → k2 rotation: v1 (k1), v2 = rotation signed by k1 with k1 retiring until
    /// `NOW + 1 h`, v3 = confirmation signed by k2 after the window.
    fn rotation() -> (Vec<SignedConfig>, NetworkKeypair, NetworkKeypair) {
        let (k1, k2) = (key(1), key(2));
        let v1 = sign(&k1, &snap(1, None, NOW - HOUR, &[&k1], &[]));
        let v2 = sign(&k1, &snap(2, Some(&v1), NOW, &[&k2], &[(&k1, NOW + HOUR)]));
        let v3 = sign(&k2, &snap(3, Some(&v2), NOW + HOUR, &[&k2], &[]));
        (vec![v1, v2, v3], k1, k2)
    }

    #[test]
    fn both_keys_are_trusted_during_the_overlap_and_the_old_one_is_refused_after() {
        let (chain, k1, k2) = rotation();
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut trust, &chain[0], NOW);
        accept(&mut trust, &chain[1], NOW);
        assert_eq!(trust.keys_at(NOW), vec![k2.id().clone(), k1.id().clone()]);
        assert_eq!(trust.next_retirement(NOW), Some(NOW + HOUR));
        // During the overlap a snapshot signed by the retiring key is accepted…
        let by_old = sign(
            &k1,
            &snap(3, Some(&chain[1]), NOW, &[&k2], &[(&k1, NOW + HOUR)]),
        );
        assert!(matches!(
            trust.verify(&by_old, NOW + HOUR - 1),
            Ok(ConfigVerdict::New(_))
        ));
        // …and refused, with its own reason, from the end of the window on.
        let err = trust.verify(&by_old, NOW + HOUR).map(|_| ());
        assert!(
            matches!(err, Err(ProtocolError::KeyRetired { not_after_ms, .. }) if not_after_ms == NOW + HOUR),
            "{err:?}"
        );
        assert_eq!(trust.keys_at(NOW + HOUR), vec![k2.id().clone()]);
        assert_eq!(trust.next_retirement(NOW + HOUR), None);
        // The new key works throughout.
        assert!(matches!(
            trust.verify(&chain[2], NOW + HOUR),
            Ok(ConfigVerdict::New(_))
        ));
    }

    #[test]
    fn a_confirmation_drops_the_retiring_key_before_its_window_ends() {
        let (chain, k1, k2) = rotation();
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        for link in &chain[..2] {
            accept(&mut trust, link, NOW);
        }
        // Confirmed within the window (issued an hour later, within the clock tolerance).
        let at = NOW + HOUR - 2;
        accept(&mut trust, &chain[2], at);
        assert_eq!(trust.keys_at(at), vec![k2.id().clone()]);
        let late_old = sign(&k1, &snap(4, Some(&chain[2]), NOW, &[&k1], &[]));
        assert!(matches!(
            trust.verify(&late_old, NOW),
            Err(ProtocolError::UnknownSigner { .. })
        ));
    }

    fn conflict(v: Result<ConfigVerdict>) -> RotationFault {
        match v {
            Err(ProtocolError::RotationConflict { fault, .. }) => fault,
            other => panic!("expected a rotation conflict, got {other:?}"),
        }
    }

    /// The k1 → k2 rotation applied: k2 active, k1 retiring until `NOW + HOUR`.
    fn at_rotation() -> (ConfigTrust, SignedConfig, NetworkKeypair, NetworkKeypair) {
        let (chain, k1, k2) = rotation();
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut trust, &chain[0], NOW);
        accept(&mut trust, &chain[1], NOW);
        (trust, chain[1].clone(), k1, k2)
    }

    #[test]
    fn a_retiring_key_cannot_extend_its_window_then_reactivate_itself() {
        let (mut trust, v2, k1, k2) = at_rotation();
        let inside = NOW + HOUR / 2;
        // k1, leaked, re-lists itself as retiring for a day.
        let extend = sign(
            &k1,
            &snap(3, Some(&v2), inside, &[&k2], &[(&k1, NOW + 24 * HOUR)]),
        );
        assert_eq!(
            conflict(trust.verify(&extend, inside)),
            RotationFault::WindowExtended {
                key: k1.id().to_string(),
                not_after_ms: NOW + HOUR,
                offered_ms: NOW + 24 * HOUR,
            }
        );
        // The same extension signed by the active key is refused too: nobody extends.
        let by_active = sign(
            &k2,
            &snap(3, Some(&v2), inside, &[&k2], &[(&k1, NOW + 24 * HOUR)]),
        );
        assert!(matches!(
            conflict(trust.verify(&by_active, inside)),
            RotationFault::WindowExtended { .. }
        ));
        // Inside its window k1 cannot make itself active again…
        let reactivate = sign(&k1, &snap(3, Some(&v2), inside, &[&k1], &[]));
        assert_eq!(
            conflict(trust.verify(&reactivate, inside)),
            RotationFault::RetiringSignerChangesKeys {
                signer: k1.id().to_string()
            }
        );
        // …nor after it: the window is the one the rotation fixed.
        let after = NOW + HOUR;
        let late = sign(&k1, &snap(4, Some(&extend), after - 1, &[&k1], &[]));
        assert!(matches!(
            trust.verify(&late, after),
            Err(ProtocolError::KeyRetired { not_after_ms, .. }) if not_after_ms == NOW + HOUR
        ));
        assert_eq!(trust.keys_at(after), vec![k2.id().clone()]);
        // The same sequence as a catch-up chain is refused step by step.
        assert!(matches!(
            trust.verify_chain(&[extend.clone(), late.clone()], inside),
            Err(ProtocolError::RotationConflict { version: 3, .. })
        ));
        assert!(matches!(
            trust.verify_chain(&[extend, late], after),
            Err(ProtocolError::KeyRetired { .. })
        ));
        // What a retiring key may still sign: the same key lists, or a shorter window.
        let shorten = sign(
            &k1,
            &snap(3, Some(&v2), inside, &[&k2], &[(&k1, inside + 1)]),
        );
        accept(&mut trust, &shorten, inside);
        assert_eq!(trust.keys_at(inside + 1), vec![k2.id().clone()]);
    }

    #[test]
    fn only_an_active_key_reactivates_a_retired_one_or_adds_a_retiring_entry() {
        let (trust, v2, k1, k2) = at_rotation();
        let inside = NOW + HOUR / 2;
        // A key nobody trusts now cannot be smuggled in as retiring, by any signer.
        let k3 = key(3);
        let smuggle = sign(
            &k2,
            &snap(
                3,
                Some(&v2),
                inside,
                &[&k2],
                &[(&k1, NOW + HOUR), (&k3, NOW + HOUR)],
            ),
        );
        assert_eq!(
            conflict(trust.verify(&smuggle, inside)),
            RotationFault::NotTrusted {
                key: k3.id().to_string()
            }
        );
        // A retiring key cannot rotate to a key of its choosing either.
        let hijack = sign(
            &k1,
            &snap(3, Some(&v2), inside, &[&k3], &[(&k1, NOW + HOUR)]),
        );
        assert!(matches!(
            conflict(trust.verify(&hijack, inside)),
            RotationFault::RetiringSignerChangesKeys { .. }
        ));
        // The active key may re-activate k1 (a rotation called off), during the window or after.
        let mut undo = trust.clone();
        let back = sign(&k2, &snap(3, Some(&v2), inside, &[&k1, &k2], &[]));
        accept(&mut undo, &back, inside);
        assert_eq!(undo.keys_at(NOW + 2 * HOUR).len(), 2);
        let mut later = trust.clone();
        let back_later = sign(&k2, &snap(3, Some(&v2), NOW + 2 * HOUR, &[&k1], &[]));
        accept(&mut later, &back_later, NOW + 2 * HOUR);
        assert_eq!(later.keys_at(NOW + 2 * HOUR), vec![k1.id().clone()]);
        // A list a retiring key signs with the same set in another order changes nothing.
        let (k4, k5) = (key(4), key(5));
        let mut two = ConfigTrust::pinned(net(), vec![k4.id().clone(), k5.id().clone()]);
        let r = sign(&k4, &snap(1, None, NOW, &[&k2, &k3], &[(&k4, NOW + HOUR)]));
        accept(&mut two, &r, NOW);
        let same = sign(
            &k4,
            &snap(2, Some(&r), NOW, &[&k3, &k2, &k3], &[(&k4, NOW + HOUR)]),
        );
        accept(&mut two, &same, NOW);
        // A confirmation issued after the window may still list the ended entry: it grants
        // nothing.
        let (trust, v2, k1, k2) = at_rotation();
        let mut after = trust.clone();
        let stale = sign(
            &k2,
            &snap(3, Some(&v2), NOW + HOUR, &[&k2], &[(&k1, NOW + HOUR)]),
        );
        accept(&mut after, &stale, NOW + HOUR);
        assert_eq!(after.keys_at(NOW + HOUR), vec![k2.id().clone()]);
    }

    #[test]
    fn an_emergency_rotation_drops_the_old_key_at_once() {
        let (k1, k2) = (key(1), key(2));
        let v1 = sign(&k1, &snap(1, None, NOW, &[&k1], &[]));
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut trust, &v1, NOW);
        let emergency = sign(&k1, &snap(2, Some(&v1), NOW, &[&k2], &[]));
        accept(&mut trust, &emergency, NOW);
        assert_eq!(trust.keys_at(NOW), vec![k2.id().clone()]);
        let by_old = sign(&k1, &snap(3, Some(&emergency), NOW, &[&k1], &[]));
        assert!(matches!(
            trust.verify(&by_old, NOW),
            Err(ProtocolError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn a_node_that_missed_two_rotations_catches_up_through_the_chain() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let v1 = sign(&k1, &snap(1, None, NOW, &[&k1], &[]));
        let v2 = sign(&k1, &snap(2, Some(&v1), NOW, &[&k2], &[(&k1, NOW + HOUR)]));
        let v3 = sign(&k2, &snap(3, Some(&v2), NOW + HOUR, &[&k2], &[]));
        let v4 = sign(
            &k2,
            &snap(
                4,
                Some(&v3),
                NOW + 2 * HOUR,
                &[&k3],
                &[(&k2, NOW + 3 * HOUR)],
            ),
        );
        let v5 = sign(&k3, &snap(5, Some(&v4), NOW + 3 * HOUR, &[&k3], &[]));
        // Two days later: v2 and v4 have expired, both windows are over.
        let later = NOW + 48 * HOUR;
        let v6 = sign(&k3, &snap(6, Some(&v5), later - HOUR, &[&k3], &[]));
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut trust, &v1, NOW);
        // The current snapshot alone cannot be verified with k1…
        assert!(matches!(
            trust.verify(&v6, later),
            Err(ProtocolError::UnknownSigner { .. })
        ));
        // …the chain of rotations since v1 can.
        let chain = [v2.clone(), v4.clone(), v6.clone()];
        let verdict = trust.verify_chain(&chain, later);
        {
            let v = verdict;
            applied(&mut trust, v);
        }
        assert_eq!(trust.keys, vec![k3.id().clone()]);
        assert!(trust.retiring.is_empty());
        assert_eq!(trust.current.as_ref().map(|c| c.version), Some(6));
        // A node pinned with the newest key skips the rotations it cannot (and need not) verify.
        let fresh = ConfigTrust::pinned(net(), vec![k3.id().clone()]);
        assert!(matches!(
            fresh.verify_chain(&chain, later),
            Ok(ConfigVerdict::New(c)) if c.snapshot.version == 6
        ));
        // A node pinned with a key the network never used verifies nothing.
        let stranger = ConfigTrust::pinned(net(), vec![key(9).id().clone()]);
        assert!(matches!(
            stranger.verify_chain(&chain, later),
            Err(ProtocolError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn a_chain_does_not_excuse_rollback_equivocation_tampering_or_a_stale_end() {
        let (chain, k1, k2) = rotation();
        let mut trust = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut trust, &chain[0], NOW);
        accept(&mut trust, &chain[1], NOW);
        accept(&mut trust, &chain[2], NOW + HOUR);
        // Rollback: the chain ends below the version in force.
        let old_v2 = sign(&k2, &snap(2, Some(&chain[0]), NOW, &[&k2], &[]));
        assert!(matches!(
            trust.verify_chain(&[chain[1].clone(), old_v2], NOW + HOUR),
            Err(ProtocolError::Rollback {
                current: 3,
                offered: 2
            })
        ));
        // Equivocation: another v3 (signed by a trusted key) on the way.
        let other_v3 = sign(&k2, &snap(3, Some(&chain[1]), NOW + 2 * HOUR, &[&k2], &[]));
        let v4 = sign(&k2, &snap(4, Some(&other_v3), NOW + 2 * HOUR, &[&k2], &[]));
        assert!(matches!(
            trust.verify_chain(&[other_v3, v4], NOW + 2 * HOUR),
            Err(ProtocolError::Equivocation { version: 3, .. })
        ));
        // A tampered step refuses the whole chain.
        let mut fresh = ConfigTrust::pinned(net(), vec![k1.id().clone()]);
        accept(&mut fresh, &chain[0], NOW);
        let tampered = chain[1]
            .as_str()
            .replacen("\\\"version\\\":2", "\\\"version\\\":7", 1);
        let tampered = SignedConfig::decode(tampered.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            fresh.verify_chain(&[tampered, chain[2].clone()], NOW + HOUR),
            Err(ProtocolError::BadSignature { .. })
        ));
        // An expired final snapshot is refused even when the steps verify.
        assert!(matches!(
            fresh.verify_chain(&chain[1..], NOW + 48 * HOUR),
            Err(ProtocolError::Expired { version: 3, .. })
        ));
        // Empty and over-long chains.
        assert!(fresh.verify_chain(&[], NOW).is_err());
        let long = vec![chain[1].clone(); limits::MAX_CONFIG_CHAIN_LINKS + 1];
        assert!(matches!(
            fresh.verify_chain(&long, NOW),
            Err(ProtocolError::InvalidField { .. })
        ));
    }

    #[test]
    fn chain_answers_round_trip_and_are_bounded() -> Result<()> {
        let (chain, _, _) = rotation();
        let answer = ConfigChain::new(net(), &[&chain[1], &chain[2]], NOW);
        let bytes = serde_json::to_vec(&answer).unwrap_or_default();
        let decoded = ConfigChain::decode(&bytes)?;
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[1].digest(), chain[2].digest());
        assert!(matches!(
            ConfigChain::decode(&vec![b' '; limits::MAX_CONFIG_CHAIN_BYTES + 1]),
            Err(ProtocolError::TooLarge { .. })
        ));
        let empty = serde_json::to_vec(&ConfigChain::new(net(), &[], NOW)).unwrap_or_default();
        assert!(ConfigChain::decode(&empty).is_err());
        assert!(matches!(
            ConfigChain::decode(b"[1"),
            Err(ProtocolError::Malformed { .. })
        ));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// However many rotations a node missed (within the chain bound) and whatever key it
        /// was pinned with, the chain of rotations since its version brings it to the same
        /// trust as applying every snapshot in turn while online; a chain whose last snapshot
        /// is signed by a key nobody rotated to is refused.
        #[test]
        fn catch_up_equals_applying_in_order(rotations in 1usize..6, start in 0usize..6) {
            let start = start.min(rotations);
            let keys: Vec<NetworkKeypair> = (0..=rotations).map(|i| key(10 + i as u8)).collect();
            let mut snaps: Vec<SignedConfig> = Vec::new();
            let mut rotation_links = Vec::new();
            let v1 = sign(&keys[0], &snap(1, None, NOW, &[&keys[0]], &[]));
            snaps.push(v1);
            for r in 1..=rotations {
                let t = NOW + (r as u64) * 2 * HOUR;
                let prev = snaps.last().cloned();
                let rot = sign(
                    &keys[r - 1],
                    &snap(snaps.len() as u64 + 1, prev.as_ref(), t, &[&keys[r]], &[(&keys[r - 1], t + HOUR)]),
                );
                snaps.push(rot.clone());
                rotation_links.push((snaps.len(), rot.clone()));
                let confirm = sign(
                    &keys[r],
                    &snap(snaps.len() as u64 + 1, Some(&rot), t + HOUR, &[&keys[r]], &[]),
                );
                snaps.push(confirm);
            }
            let later = NOW + (rotations as u64 + 1) * 2 * HOUR;
            let last = snaps.last().cloned().unwrap_or_else(|| unreachable!());

            // Online all along.
            let mut online = ConfigTrust::pinned(net(), vec![keys[0].id().clone()]);
            for s in &snaps {
                let at = s.parse_unverified().map(|p| p.issued_at_ms).unwrap_or(NOW);
                accept(&mut online, s, at);
            }

            // Offline since the snapshot of rotation `start` (0 = since v1).
            let mut offline = ConfigTrust::pinned(net(), vec![keys[0].id().clone()]);
            let since = if start == 0 { 1 } else { rotation_links[start - 1].0 };
            for s in &snaps[..since] {
                let at = s.parse_unverified().map(|p| p.issued_at_ms).unwrap_or(NOW);
                accept(&mut offline, s, at);
            }
            let mut chain: Vec<SignedConfig> = rotation_links
                .iter()
                .filter(|(v, _)| *v > since)
                .map(|(_, s)| s.clone())
                .collect();
            chain.push(last.clone());
            { let v = offline.verify_chain(&chain, later); applied(&mut offline, v); }
            prop_assert_eq!(&offline, &online);

            let forged = sign(&key(99), &snap(snaps.len() as u64 + 1, Some(&last), later, &[&key(99)], &[]));
            let mut bad = chain.clone();
            bad.push(forged);
            prop_assert!(offline.verify_chain(&bad, later).is_err());
        }
    }
}
