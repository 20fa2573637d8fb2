//! Content digests: `sha256:` + lowercase hex, and the config digest that names a signed
//! snapshot. Below `config` and `messages`, which both name snapshots by digest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{ProtocolError, Result};

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
