//! Identifiers: node ids and network key ids (self-certifying public-key text), network ids and
//! job ids.
//!
//! A node id *is* the node's ed25519 public key in text form, so any message can be checked
//! against the id it claims without a lookup, and nobody can squat another node's id. The text
//! form `rn1` + base32(key) + 6-character checksum is 61 characters: it fits a Kubernetes label
//! value (≤ 63, `[a-z0-9]` at both ends) and a typo is caught by the checksum with probability
//! 1 − 2⁻³⁰. Network signing keys use the same form with prefix `rk1`.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{ProtocolError, Result};

/// Lowercase RFC 4648 base32 alphabet: label-safe and unambiguous when read aloud.
const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const KEY_CHARS: usize = 52; // ceil(256 / 5)
const CHECKSUM_CHARS: usize = 6; // 30 bits
const PREFIX_CHARS: usize = 3;
/// Length of every public-key text (node id or network key id).
pub const KEY_TEXT_LEN: usize = PREFIX_CHARS + KEY_CHARS + CHECKSUM_CHARS;

/// Which kind of key a text form names; the prefix and checksum domain differ so a network key
/// can never be pasted where a node id belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Node,
    Network,
}

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Node => "rn1",
            Self::Network => "rk1",
        }
    }
    fn field(self) -> &'static str {
        match self {
            Self::Node => "node_id",
            Self::Network => "network key id",
        }
    }
}

fn checksum(kind: KeyKind, key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"resultity/key-text\x00");
    h.update(kind.prefix().as_bytes());
    h.update(key);
    let d = h.finalize();
    let bits = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) >> 2;
    (0..CHECKSUM_CHARS)
        .map(|i| B32[((bits >> (25 - 5 * i)) & 31) as usize] as char)
        .collect()
}

fn encode_key(kind: KeyKind, key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(KEY_TEXT_LEN);
    s.push_str(kind.prefix());
    s.push_str(&BASE32_NOPAD.encode(key).to_ascii_lowercase());
    s.push_str(&checksum(kind, key));
    s
}

/// The node-id text form of any 32 bytes, valid point or not. Parsing such a text applies every
/// check; this exists to build refusal vectors (weak keys, invalid points).
pub fn node_id_text_unchecked(key: &[u8; 32]) -> String {
    encode_key(KeyKind::Node, key)
}

fn decode_key(kind: KeyKind, text: &str) -> Result<[u8; 32]> {
    let invalid = |reason: String| ProtocolError::InvalidField {
        field: kind.field(),
        reason,
    };
    if text.len() != KEY_TEXT_LEN {
        return Err(invalid(format!(
            "expected {KEY_TEXT_LEN} characters, got {}",
            text.len()
        )));
    }
    if !text.starts_with(kind.prefix()) {
        return Err(invalid(format!("must start with {:?}", kind.prefix())));
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b) || b == b'1')
    {
        return Err(invalid(
            "only lowercase base32 characters are allowed".into(),
        ));
    }
    let body = &text[PREFIX_CHARS..PREFIX_CHARS + KEY_CHARS];
    let decoded = BASE32_NOPAD
        .decode(body.to_ascii_uppercase().as_bytes())
        .map_err(|e| invalid(format!("bad base32: {e}")))?;
    let key: [u8; 32] = decoded
        .try_into()
        .map_err(|_| invalid("key is not 32 bytes".into()))?;
    if text[PREFIX_CHARS + KEY_CHARS..] != checksum(kind, &key) {
        return Err(invalid("checksum mismatch (typo?)".into()));
    }
    Ok(key)
}

/// Parses 32 bytes as an ed25519 public key, refusing invalid encodings and weak keys.
pub fn parse_public_key(bytes: &[u8; 32]) -> Result<VerifyingKey> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| ProtocolError::InvalidField {
        field: "public key",
        reason: "not a valid ed25519 point".into(),
    })?;
    if key.is_weak() {
        return Err(ProtocolError::WeakKey);
    }
    Ok(key)
}

/// Display (the text form), Debug, FromStr and serde (as the text form, parsed on the way
/// in) for a text newtype with a `parse` constructor.
macro_rules! plain_text_type {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
        impl FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self> {
                Self::parse(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! key_text_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The text form of a verifying key.
            pub fn from_key(key: &VerifyingKey) -> Self {
                Self(encode_key($kind, key.as_bytes()))
            }
            /// Parses the text form, checking prefix, alphabet, checksum, point validity and
            /// weakness.
            pub fn parse(text: &str) -> Result<Self> {
                let bytes = decode_key($kind, text)?;
                parse_public_key(&bytes)?;
                Ok(Self(text.to_owned()))
            }
            /// The verifying key this id names. Parsing already proved it valid and not weak.
            pub fn verifying_key(&self) -> Result<VerifyingKey> {
                parse_public_key(&decode_key($kind, &self.0)?)
            }
            /// The text form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        plain_text_type!($name);
    };
}

key_text_type!(
    /// A node's identity: the text form of its ed25519 public key (`rn1…`, 61 characters).
    NodeId,
    KeyKind::Node
);
key_text_type!(
    /// A network signing key's identity: the text form of its public key (`rk1…`, 61 characters).
    NetworkKeyId,
    KeyKind::Network
);

/// The network's name, e.g. `resultity-testnet`: a DNS label (`[a-z0-9-]`, 1–63 characters,
/// alphanumeric at both ends) so it can be a label value and part of a host name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkId(String);

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl NetworkId {
    pub fn parse(text: &str) -> Result<Self> {
        if !is_dns_label(text) {
            return Err(ProtocolError::InvalidField {
                field: "network_id",
                reason: format!(
                    "{text:?} is not a DNS label ([a-z0-9-], 1-63 chars, alphanumeric ends)"
                ),
            });
        }
        Ok(Self(text.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A job's identifier, chosen by the network: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    pub fn parse(text: &str) -> Result<Self> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !ok {
            return Err(ProtocolError::InvalidField {
                field: "job_id",
                reason: format!("{text:?} must be 1-64 characters of [A-Za-z0-9._-]"),
            });
        }
        Ok(Self(text.to_owned()))
    }
    /// A fresh random job id (`j-` + 26 base32 characters, 128 bits).
    pub fn random() -> Result<Self> {
        let bytes: [u8; 16] = crate::crypto::random_bytes()?;
        Ok(Self(format!(
            "j-{}",
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        )))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

plain_text_type!(NetworkId);
plain_text_type!(JobId);

#[cfg(test)]
pub(crate) mod arb {
    //! proptest strategies for identifier types (used by the round-trip properties).
    use super::*;
    use proptest::prelude::*;

    fn key_from_seed(seed: [u8; 32]) -> VerifyingKey {
        ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key()
    }

    impl Arbitrary for NodeId {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            any::<[u8; 32]>()
                .prop_map(|s| NodeId::from_key(&key_from_seed(s)))
                .boxed()
        }
    }
    impl Arbitrary for NetworkKeyId {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            any::<[u8; 32]>()
                .prop_map(|s| NetworkKeyId::from_key(&key_from_seed(s)))
                .boxed()
        }
    }
    impl Arbitrary for NetworkId {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
                .prop_map(NetworkId)
                .boxed()
        }
    }
    impl Arbitrary for JobId {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            "[A-Za-z0-9._-]{1,64}".prop_map(JobId).boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(seed: u8) -> NodeId {
        NodeId::from_key(&ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key())
    }

    #[test]
    fn node_id_is_a_label_value() {
        let id = node(7);
        let s = id.as_str();
        assert_eq!(s.len(), KEY_TEXT_LEN);
        assert!(s.len() <= 63);
        assert!(s.starts_with("rn1"));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_eq!(NodeId::parse(s).ok(), Some(id));
    }

    #[test]
    fn network_key_text_is_not_a_node_id() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let net = NetworkKeyId::from_key(&key);
        assert!(NodeId::parse(net.as_str()).is_err());
        // Even with the prefix swapped, the checksum domain differs.
        let swapped = format!("rn1{}", &net.as_str()[3..]);
        assert!(NodeId::parse(&swapped).is_err());
    }

    #[test]
    fn weak_key_is_refused() {
        // The identity point (y = 1) has small order.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert_eq!(parse_public_key(&weak), Err(ProtocolError::WeakKey));
        let text = encode_key(KeyKind::Node, &weak);
        assert_eq!(NodeId::parse(&text), Err(ProtocolError::WeakKey));
    }

    #[test]
    fn network_id_rules() {
        assert!(NetworkId::parse("resultity-testnet").is_ok());
        for bad in ["", "-a", "a-", "Upper", "a_b", &"a".repeat(64)] {
            assert!(NetworkId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn job_id_rules() {
        assert!(JobId::parse("j-abc.1_2").is_ok());
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse("a b").is_err());
        assert!(JobId::parse(&"x".repeat(65)).is_err());
        let r = JobId::random().map(|j| j.0.len()).unwrap_or(0);
        assert_eq!(r, 28);
    }

    proptest! {
        #[test]
        fn any_single_char_typo_is_caught(seed in any::<[u8; 32]>(), pos in 0usize..KEY_TEXT_LEN, c in 0usize..32) {
            let id = NodeId::from_key(&ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key());
            let mut bytes = id.as_str().as_bytes().to_vec();
            let replacement = B32[c];
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            let typo = String::from_utf8(bytes).unwrap_or_default();
            prop_assert!(NodeId::parse(&typo).is_err());
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = NodeId::parse(&s);
            let _ = NetworkKeyId::parse(&s);
            let _ = NetworkId::parse(&s);
            let _ = JobId::parse(&s);
        }
    }
}
