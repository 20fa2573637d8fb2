//! The signed envelope: the one wire form of every signed message, on HTTP and WebSocket.
//!
//! ```json
//! {"v":1,"purpose":"http/heartbeat","signer":"rn1…","sig":"<base64url>","body":"{…}"}
//! ```
//!
//! `body` is a JSON *string* holding the exact bytes that were signed. A receiver bounds the
//! size, parses only this small outer object, checks the purpose, verifies the signature over
//! the body bytes, and only then parses the body — so nothing a peer controls is interpreted
//! before it is authenticated.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::crypto;
use crate::error::{ProtocolError, Result};
use crate::ids::{NetworkKeyId, NodeId};
use crate::keys::{NetworkKeypair, NodeKeypair};
use crate::purpose::{Purpose, SignedBy};

/// Envelope format version this crate writes and accepts.
pub const ENVELOPE_VERSION: u32 = 1;

/// Anything that can sign an envelope: a node key or a network key.
pub trait EnvelopeSigner {
    /// Text written in the envelope's `signer` field (node id or network key id).
    fn signer_text(&self) -> &str;
    fn sign_bytes(&self, purpose: &str, body: &[u8]) -> Signature;
}

impl EnvelopeSigner for NodeKeypair {
    fn signer_text(&self) -> &str {
        self.id().as_str()
    }
    fn sign_bytes(&self, purpose: &str, body: &[u8]) -> Signature {
        self.sign(purpose, body)
    }
}

impl EnvelopeSigner for NetworkKeypair {
    fn signer_text(&self) -> &str {
        self.id().as_str()
    }
    fn sign_bytes(&self, purpose: &str, body: &[u8]) -> Signature {
        self.sign(purpose, body)
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    v: u32,
    purpose: &'a str,
    signer: &'a str,
    sig: &'a str,
    body: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn {
    v: u32,
    purpose: String,
    signer: String,
    sig: String,
    body: String,
}

/// Signs already-serialized body bytes and writes the envelope.
pub fn seal_bytes(signer: &impl EnvelopeSigner, purpose: Purpose, body: &str) -> String {
    let sig = crypto::b64(
        &signer
            .sign_bytes(purpose.as_str(), body.as_bytes())
            .to_bytes(),
    );
    let out = EnvelopeOut {
        v: ENVELOPE_VERSION,
        purpose: purpose.as_str(),
        signer: signer.signer_text(),
        sig: &sig,
        body,
    };
    // Serializing a struct of strings into a String cannot fail.
    serde_json::to_string(&out).unwrap_or_default()
}

/// Serializes `body`, signs it for `purpose` and writes the envelope.
pub fn seal<T: Serialize>(
    signer: &impl EnvelopeSigner,
    purpose: Purpose,
    body: &T,
) -> Result<String> {
    let body = serde_json::to_string(body).map_err(|e| ProtocolError::InvalidField {
        field: "body",
        reason: format!("cannot serialize: {e}"),
    })?;
    Ok(seal_bytes(signer, purpose, &body))
}

/// A decoded but not yet verified envelope. Its body must not be trusted until
/// [`RawEnvelope::verify`] succeeded.
#[derive(Debug, Clone)]
pub struct RawEnvelope {
    purpose: Purpose,
    signer: String,
    sig: Signature,
    body: String,
}

impl RawEnvelope {
    /// Bounds the size and parses the outer object. Purpose must be a known purpose string and
    /// the signature well-formed; nothing of the body is interpreted.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self> {
        if bytes.len() > max_bytes {
            return Err(ProtocolError::TooLarge {
                what: "envelope",
                size: bytes.len(),
                max: max_bytes,
            });
        }
        let env: EnvelopeIn =
            serde_json::from_slice(bytes).map_err(|e| ProtocolError::malformed("envelope", &e))?;
        if env.v != ENVELOPE_VERSION {
            return Err(ProtocolError::UnsupportedVersion(env.v));
        }
        let purpose = Purpose::parse(&env.purpose).ok_or_else(|| ProtocolError::WrongPurpose {
            expected: "a purpose defined by the spec".into(),
            found: truncate(&env.purpose),
        })?;
        if env.signer.len() > crate::ids::KEY_TEXT_LEN {
            return Err(ProtocolError::InvalidField {
                field: "signer",
                reason: "longer than any key id".into(),
            });
        }
        let sig = crypto::parse_signature(&env.sig)?;
        Ok(Self {
            purpose,
            signer: env.signer,
            sig,
            body: env.body,
        })
    }

    pub fn purpose(&self) -> Purpose {
        self.purpose
    }
    /// The claimed signer text (unverified until [`RawEnvelope::verify`]).
    pub fn signer(&self) -> &str {
        &self.signer
    }
    /// The signature, for callers that batch-verify.
    pub fn signature(&self) -> &Signature {
        &self.sig
    }
    /// The body bytes exactly as signed (unverified until [`RawEnvelope::verify`]).
    pub fn body_bytes(&self) -> &[u8] {
        self.body.as_bytes()
    }

    /// Refuses the envelope unless it was signed for `expected`.
    pub fn expect_purpose(&self, expected: Purpose) -> Result<()> {
        if self.purpose != expected {
            return Err(ProtocolError::WrongPurpose {
                expected: expected.as_str().into(),
                found: self.purpose.as_str().into(),
            });
        }
        Ok(())
    }

    /// Strictly verifies the signature over the exact body bytes with `key`, and that the
    /// envelope's `signer` names that very key (so a logged or forwarded envelope never shows
    /// a signer other than the one that signed).
    pub fn verify(&self, key: &VerifyingKey) -> Result<()> {
        let named = match self.purpose.signed_by() {
            SignedBy::Node => NodeId::from_key(key).as_str() == self.signer,
            SignedBy::Network => NetworkKeyId::from_key(key).as_str() == self.signer,
        };
        if !named {
            return Err(ProtocolError::UnknownSigner {
                signer: truncate(&self.signer),
            });
        }
        crypto::verify(
            key,
            self.purpose.as_str(),
            self.body.as_bytes(),
            &self.sig,
            &self.signer,
        )
    }

    /// Parses the body. Call only after [`RawEnvelope::verify`].
    pub fn parse_body<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.body).map_err(|e| ProtocolError::malformed("body", &e))
    }

    /// Expect `purpose`, verify with `key`, then parse: the usual path for one known message.
    pub fn open<T: DeserializeOwned>(&self, purpose: Purpose, key: &VerifyingKey) -> Result<T> {
        self.expect_purpose(purpose)?;
        self.verify(key)?;
        self.parse_body()
    }
}

/// Keeps error messages bounded when they echo peer input.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open() {
        let k = NodeKeypair::from_seed(&[5; 32]);
        let env = seal(&k, Purpose::HttpPing, &serde_json::json!({"a": 1})).unwrap_or_default();
        let raw = RawEnvelope::decode(env.as_bytes(), 4096);
        let body: Result<serde_json::Value> =
            raw.and_then(|r| r.open(Purpose::HttpPing, &k.verifying_key()));
        assert_eq!(body.ok(), Some(serde_json::json!({"a": 1})));
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let junk = vec![b'x'; 100];
        assert!(matches!(
            RawEnvelope::decode(&junk, 99),
            Err(ProtocolError::TooLarge {
                size: 100,
                max: 99,
                ..
            })
        ));
        assert!(matches!(
            RawEnvelope::decode(&junk, 100),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn unknown_fields_in_envelope_are_refused() {
        let k = NodeKeypair::from_seed(&[5; 32]);
        let env = seal_bytes(&k, Purpose::HttpPing, "{}");
        let extra = env.replacen('{', "{\"x\":1,", 1);
        assert!(RawEnvelope::decode(extra.as_bytes(), 4096).is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(100);
        assert!(truncate(&s).len() <= 68);
    }
}
