//! The exact signature input, strict verification and the wire's byte encodings; the
//! signing keys built on them are in `keys`.
//!
//! Signature input (spec §4):
//! `"resultity/v1" 0x00 ‖ u32be(len(purpose)) ‖ purpose ‖ u32be(len(body)) ‖ body`.
//! The length prefixes make the encoding injective, so no (purpose, body) pair can be
//! re-split into another.

use data_encoding::BASE64URL_NOPAD;
use ed25519_dalek::{Signature, VerifyingKey};

use crate::error::{ProtocolError, Result};

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
}
