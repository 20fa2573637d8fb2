//! Signing keys, the exact signature input, and strict verification.
//!
//! Signature input (spec §4):
//! `"resultity/v1" 0x00 ‖ u32be(len(purpose)) ‖ purpose ‖ u32be(len(body)) ‖ body`.
//! The length prefixes make the encoding injective, so no (purpose, body) pair can be
//! re-split into another.

use data_encoding::BASE64URL_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::error::{ProtocolError, Result};
use crate::ids::{NetworkKeyId, NodeId};

/// Domain separation tag, first bytes of every signature input.
pub const DOMAIN_TAG: &[u8] = b"resultity/v1";

/// Builds the exact bytes that are signed for `purpose` and `body`.
pub fn signature_input(purpose: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN_TAG.len() + 9 + purpose.len() + body.len());
    out.extend_from_slice(DOMAIN_TAG);
    out.push(0);
    // Purposes are short constants and bodies are bounded far below 4 GiB by the size limits,
    // checked before anything is signed or verified; saturate rather than wrap regardless.
    out.extend_from_slice(
        &u32::try_from(purpose.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(purpose.as_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// `verify_strict` over the signature input. Strict verification refuses non-canonical
/// signatures and small-order components, so a signature cannot be malleated into another valid
/// one.
pub fn verify(
    key: &VerifyingKey,
    purpose: &str,
    body: &[u8],
    sig: &Signature,
    signer: &str,
) -> Result<()> {
    key.verify_strict(&signature_input(purpose, body), sig)
        .map_err(|_| ProtocolError::BadSignature {
            signer: signer.to_owned(),
        })
}

/// Fills an array from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ProtocolError::InvalidField {
        field: "randomness",
        reason: format!("operating system RNG failed: {e}"),
    })?;
    Ok(b)
}

/// Encodes bytes as unpadded base64url, the encoding of every binary field on the wire.
pub fn b64(bytes: &[u8]) -> String {
    BASE64URL_NOPAD.encode(bytes)
}

/// Decodes unpadded base64url into exactly `N` bytes.
pub fn unb64<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N]> {
    let invalid = |reason: String| ProtocolError::InvalidField { field, reason };
    // Bound the work before decoding: N bytes need ceil(4N/3) characters.
    if text.len() != (4 * N).div_ceil(3) {
        return Err(invalid(format!(
            "expected {} base64url characters for {N} bytes, got {}",
            (4 * N).div_ceil(3),
            text.len()
        )));
    }
    // Strict: non-zero trailing bits (a second spelling of the same bytes) and padding are refused.
    let v = BASE64URL_NOPAD
        .decode(text.as_bytes())
        .map_err(|e| invalid(format!("bad base64url: {e}")))?;
    v.try_into()
        .map_err(|_| invalid(format!("expected {N} bytes")))
}

/// Parses a base64url signature.
pub fn parse_signature(text: &str) -> Result<Signature> {
    Ok(Signature::from_bytes(&unb64::<64>("sig", text)?))
}

const NODE_KEY_PREFIX: &str = "resultity-node-key-v1:";
const NETWORK_KEY_PREFIX: &str = "resultity-network-key-v1:";

fn parse_seed_text(prefix: &str, text: &str) -> Result<SigningKey> {
    let t = text.trim();
    let rest = t
        .strip_prefix(prefix)
        .ok_or_else(|| ProtocolError::InvalidField {
            field: "key file",
            reason: format!("must start with {prefix:?}"),
        })?;
    let seed = Zeroizing::new(unb64::<32>("key file", rest)?);
    let key = SigningKey::from_bytes(&seed);
    crate::ids::parse_public_key(key.verifying_key().as_bytes())?;
    Ok(key)
}

macro_rules! keypair_type {
    ($(#[$doc:meta])* $name:ident, $id:ident, $prefix:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            key: SigningKey,
            id: $id,
        }

        impl $name {
            /// A fresh key from the operating system's CSPRNG.
            pub fn generate() -> Result<Self> {
                let seed = Zeroizing::new(random_bytes::<32>()?);
                Ok(Self::from_seed(&seed))
            }
            /// The key for a 32-byte seed (test vectors, key files).
            pub fn from_seed(seed: &[u8; 32]) -> Self {
                let key = SigningKey::from_bytes(seed);
                let id = $id::from_key(&key.verifying_key());
                Self { key, id }
            }
            /// Parses the key-file text form (`<prefix><base64url seed>`).
            pub fn from_key_file_text(text: &str) -> Result<Self> {
                let key = parse_seed_text($prefix, text)?;
                let id = $id::from_key(&key.verifying_key());
                Ok(Self { key, id })
            }
            /// The key-file text form. Secret: write it only to 0600 files or Secrets.
            pub fn to_key_file_text(&self) -> Zeroizing<String> {
                Zeroizing::new(format!("{}{}\n", $prefix, b64(self.key.as_bytes())))
            }
            pub fn id(&self) -> &$id {
                &self.id
            }
            pub fn verifying_key(&self) -> VerifyingKey {
                self.key.verifying_key()
            }
            /// Signs `body` for `purpose`, returning the signature.
            pub fn sign(&self, purpose: &str, body: &[u8]) -> Signature {
                self.key.sign(&signature_input(purpose, body))
            }
        }

        impl std::fmt::Debug for $name {
            // Never print the secret.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).field("id", &self.id).finish_non_exhaustive()
            }
        }
    };
}

keypair_type!(
    /// A node's signing key and the node id it determines.
    NodeKeypair,
    NodeId,
    NODE_KEY_PREFIX
);
keypair_type!(
    /// A network signing key (jobs, answers, configs) and its key id.
    NetworkKeypair,
    NetworkKeyId,
    NETWORK_KEY_PREFIX
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_has_one_spelling_per_value() {
        let text = b64(&[0xff; 32]);
        assert_eq!(unb64::<32>("f", &text).unwrap(), [0xff; 32]);
        // 32 bytes leave 2 unused bits in the last character: "8" (…111100) is the only
        // spelling; "_" (…111111) sets them and must not decode to the same key.
        assert!(text.ends_with('8'), "{text}");
        let mut other = text[..text.len() - 1].to_owned();
        other.push('_');
        let err = unb64::<32>("f", &other).unwrap_err().to_string();
        assert!(err.contains("bad base64url"), "{err}");
        // Standard-alphabet characters and padding are not base64url.
        assert!(unb64::<32>("f", &text.replacen('_', "+", 1)).is_err());
        assert!(unb64::<32>("f", &format!("{}=", &text[..text.len() - 1])).is_err());
    }

    #[test]
    fn signature_input_layout() {
        let got = signature_input("ws/x", b"{}");
        let mut want = b"resultity/v1\x00".to_vec();
        want.extend_from_slice(&[0, 0, 0, 4]);
        want.extend_from_slice(b"ws/x");
        want.extend_from_slice(&[0, 0, 0, 2]);
        want.extend_from_slice(b"{}");
        assert_eq!(got, want);
    }

    #[test]
    fn key_file_round_trip_and_errors() {
        let k = NodeKeypair::from_seed(&[9; 32]);
        let text = k.to_key_file_text();
        let back = NodeKeypair::from_key_file_text(&text).map(|b| b.id().clone());
        assert_eq!(back.ok().as_ref(), Some(k.id()));
        assert!(NetworkKeypair::from_key_file_text(&text).is_err());
        assert!(NodeKeypair::from_key_file_text("resultity-node-key-v1:short").is_err());
        assert!(format!("{k:?}").contains("rn1"));
        assert!(!format!("{k:?}").contains(&text[22..40]));
    }

    #[test]
    fn strict_verification_rejects_other_purpose() {
        let k = NodeKeypair::from_seed(&[1; 32]);
        let sig = k.sign("http/ping", b"body");
        let vk = k.verifying_key();
        assert!(verify(&vk, "http/ping", b"body", &sig, "n").is_ok());
        assert!(verify(&vk, "http/heartbeat", b"body", &sig, "n").is_err());
        assert!(verify(&vk, "http/ping", b"body ", &sig, "n").is_err());
    }
}
