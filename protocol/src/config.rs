//! Signed configuration snapshots (spec §8): what the network approves and dictates, with
//! TUF-style freshness and rollback rules.
//!
//! A snapshot travels as an envelope with purpose `net/config`, signed by a network key.
//! `config_digest = "sha256:" + hex(sha256(body bytes))` — the digest of the exact signed
//! snapshot bytes, so two parties holding the same digest hold the same signed content.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::crypto::NetworkKeypair;
use crate::envelope::{self, RawEnvelope};
use crate::error::{ProtocolError, Result};
use crate::ids::{NetworkId, NetworkKeyId, NodeId};
use crate::limits;
use crate::messages::common::{Environment, ModelRef, RuntimeKind, Timing};
use crate::purpose::Purpose;

/// `sha256:` + lowercase hex of SHA-256 over `bytes`.
pub fn sha256_text(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    s
}

/// A config digest: `sha256:` followed by 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConfigDigest(String);

impl ConfigDigest {
    pub fn parse(text: &str) -> Result<Self> {
        let ok = text.len() == 71
            && text.starts_with("sha256:")
            && text[7..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(ProtocolError::InvalidField {
                field: "config_digest",
                reason: "must be \"sha256:\" followed by 64 lowercase hex digits".into(),
            });
        }
        Ok(Self(text.to_owned()))
    }
    /// Digest of snapshot body bytes.
    pub fn of_body(body: &[u8]) -> Self {
        Self(sha256_text(body))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The first 12 hex digits, for printer columns and logs.
    pub fn short(&self) -> &str {
        &self.0[7..19]
    }
}

impl fmt::Display for ConfigDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for ConfigDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfigDigest({})", self.0)
    }
}
impl FromStr for ConfigDigest {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
impl Serialize for ConfigDigest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> Deserialize<'de> for ConfigDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
impl proptest::arbitrary::Arbitrary for ConfigDigest {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<Self>;
    fn arbitrary_with(_: ()) -> Self::Strategy {
        use proptest::prelude::*;
        any::<Vec<u8>>()
            .prop_map(|b| ConfigDigest::of_body(&b))
            .boxed()
    }
}

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
    /// Node keys the network no longer accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_node_keys: Vec<NodeId>,
    /// Scheduler exclusion thresholds, overriding the network service's own settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalties: Option<PenaltySettings>,
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
    pub keys: Vec<NetworkKeyId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<crate::messages::ConfigPointer>,
}

impl ConfigTrust {
    /// Trust rooted in pinned keys (node flags, `ResultityNetwork.spec.publicKeys`).
    pub fn pinned(network_id: NetworkId, keys: Vec<NetworkKeyId>) -> Self {
        Self {
            network_id,
            keys,
            current: None,
        }
    }

    /// Verifies an offered snapshot at `now_ms`. Checks, in order: signer trusted, signature
    /// (strict), audience, expiry, issue time (± [`limits::CONFIG_CLOCK_SKEW_MS`]), version
    /// monotonicity, equivocation, chain.
    pub fn verify(&self, signed: &SignedConfig, now_ms: u64) -> Result<ConfigVerdict> {
        let signer = self
            .keys
            .iter()
            .find(|k| k.as_str() == signed.raw.signer())
            .ok_or_else(|| ProtocolError::UnknownSigner {
                signer: envelope::truncate(signed.raw.signer()),
            })?;
        signed.raw.verify(&signer.verifying_key()?)?;
        let snapshot: ConfigSnapshot = signed.raw.parse_body()?;
        if snapshot.network_id != self.network_id {
            return Err(ProtocolError::WrongAudience {
                expected: self.network_id.to_string(),
                found: snapshot.network_id.to_string(),
            });
        }
        if snapshot.expires_at_ms <= now_ms {
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
        Ok(ConfigVerdict::New(Box::new(VerifiedConfig {
            snapshot,
            signed: signed.clone(),
        })))
    }

    /// Makes a verified snapshot the one in force and adopts its key set for the next one.
    pub fn apply(&mut self, config: &VerifiedConfig) {
        self.current = Some(config.pointer());
        self.keys = config.snapshot.payload.network_keys.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::common::Environment;

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
            payload: NetworkConfig {
                environment: Environment::Testnet,
                models: vec![],
                runtime_images: RuntimeImages::default(),
                sidecar_image: None,
                timing: Timing::default(),
                subclouds: vec![],
                network_keys: vec![key.id().clone()],
                revoked_node_keys: vec![],
                penalties: None,
            },
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
