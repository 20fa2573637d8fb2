//! Signing keys: a node's and a network's ed25519 key, the id each determines, and the key-file
//! text form. Built on `crypto`'s primitives and `ids`, so neither of those depends on keys.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::crypto::{b64, random_bytes, signature_input, unb64};
use crate::error::{ProtocolError, Result};
use crate::ids::{NetworkKeyId, NodeId};

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
    use crate::crypto::verify;

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
