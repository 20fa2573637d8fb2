//! One error type for every way a peer's bytes can be refused.
//!
//! Each variant is a reason a caller acts on differently (drop and count, ask the peer to
//! re-sync its clock, close the session, keep the last good config), and each maps to one wire
//! [`ErrorCode`] so both ends name a rejection the same way.

use crate::codes::ErrorCode;

/// Why a message, key, identifier or config snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The input is larger than the limit for its channel; nothing of it was parsed.
    #[error("{what} is {size} bytes, over the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    /// The input is not the JSON shape the spec requires.
    #[error("malformed {what} at line {line} column {column}: {reason}")]
    Malformed {
        what: &'static str,
        line: usize,
        column: usize,
        reason: String,
    },
    /// A field failed a syntactic rule (identifier text, base64, lengths).
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// The envelope format version is not one this implementation speaks.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    /// The signature does not verify (strictly) over the exact signed bytes.
    #[error("signature does not verify for signer {signer}")]
    BadSignature { signer: String },
    /// The public key is a small-order ("weak") point and could sign for many messages.
    #[error("public key is weak (small order) and is refused")]
    WeakKey,
    /// The signer is not a key this verifier trusts for this message.
    #[error("signer {signer} is not trusted here")]
    UnknownSigner { signer: String },
    /// The signer is a retiring network key whose overlap window has ended.
    #[error("signer {signer} was retired at {not_after_ms} (now {now_ms})")]
    KeyRetired {
        signer: String,
        not_after_ms: u64,
        now_ms: u64,
    },
    /// The signer's key has been revoked by the network.
    #[error("signer {signer} is revoked")]
    Revoked { signer: String },
    /// The message was signed for another purpose (channel or kind) than the one it arrived on.
    #[error("message signed for purpose {found:?}, expected {expected:?}")]
    WrongPurpose { expected: String, found: String },
    /// The body names a different network than this one.
    #[error("message addressed to network {found:?}, this is {expected:?}")]
    WrongAudience { expected: String, found: String },
    /// The body names a different node than the signer or the session.
    #[error("message names node {found:?}, but comes from {expected:?}")]
    WrongNode { expected: String, found: String },
    /// The message was seen before (nonce or sequence number reused).
    #[error("replayed message: {0}")]
    Replayed(String),
    /// The HTTP timestamp is outside the accepted skew window around server time.
    #[error("timestamp {ts_ms} is outside ±{skew_ms} ms of server time {now_ms}")]
    StaleTimestamp {
        ts_ms: u64,
        now_ms: u64,
        skew_ms: u64,
    },
    /// The config snapshot's `expires_at` has passed.
    #[error("config version {version} expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        version: u64,
        expires_at_ms: u64,
        now_ms: u64,
    },
    /// The config snapshot was issued in the future beyond the tolerated skew.
    #[error("config version {version} is issued at {issued_at_ms}, in the future (now {now_ms})")]
    NotYetValid {
        version: u64,
        issued_at_ms: u64,
        now_ms: u64,
    },
    /// The config snapshot's version is lower than the one in force.
    #[error("config rollback refused: offered version {offered}, current {current}")]
    Rollback { current: u64, offered: u64 },
    /// Same version as the one in force but different bytes: the network equivocated.
    #[error("config version {version} offered with digest {offered}, but {current} is in force")]
    Equivocation {
        version: u64,
        current: String,
        offered: String,
    },
    /// The next version does not chain to the digest in force (`prev_digest` mismatch).
    #[error(
        "config version {version} chains to {}, but {current} is in force",
        .prev.as_deref().unwrap_or("no previous version")
    )]
    ChainMismatch {
        version: u64,
        current: String,
        prev: Option<String>,
    },
    /// The snapshot breaks a key-rotation rule (spec §8.4) of the trust in force: a leaked
    /// retiring key must not be able to outlive or undo the rotation that retired it.
    #[error("config version {version} contradicts the key rotation in force: {fault}")]
    RotationConflict { version: u64, fault: RotationFault },
    /// No common protocol version between node and network.
    #[error(
        "no common protocol version (offered {}, supported {})",
        versions(.offered),
        versions(.supported)
    )]
    NoCommonVersion {
        offered: Vec<u32>,
        supported: Vec<u32>,
    },
}

/// Which key-rotation rule (spec §8.4) a snapshot breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationFault {
    /// Signed by a retiring key, yet names another active key set: only an active key may
    /// change the active set (and so re-activate a retired key).
    #[error("it is signed by the retiring key {signer}, which may not change the active keys")]
    RetiringSignerChangesKeys { signer: String },
    /// Moves a retiring key's window end later than the snapshot in force allows.
    #[error(
        "it moves the end of retiring key {key}'s window from {not_after_ms} to {offered_ms}; a window may only be shortened"
    )]
    WindowExtended {
        key: String,
        not_after_ms: u64,
        offered_ms: u64,
    },
    /// Lists as retiring a key that is neither active nor retiring now.
    #[error("it lists {key} as retiring, but that key is not trusted now")]
    NotTrusted { key: String },
}

/// `e` and its causes on one line, each said once: a cause whose text an outer message
/// already quotes (`"cannot bind {addr}: {source}"`) is not repeated, and one an outer
/// message leaves out (reqwest's generic "error sending request") is appended. Binaries print
/// their final error with this instead of anyhow's `Caused by:` list, which repeats the first.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// A binary's exit status for `result`: success, or failure with the error printed to stderr
/// as [`error_chain`] writes it.
pub fn exit_code<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Protocol versions as a person writes them: `1, 2`.
fn versions(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

impl ProtocolError {
    /// The wire error code for this rejection (spec §9).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge { .. } => ErrorCode::TooLarge,
            Self::Malformed { .. } | Self::InvalidField { .. } => ErrorCode::Malformed,
            Self::UnsupportedVersion(_) | Self::NoCommonVersion { .. } => {
                ErrorCode::UnsupportedVersion
            }
            Self::BadSignature { .. } => ErrorCode::BadSignature,
            Self::WeakKey => ErrorCode::WeakKey,
            Self::UnknownSigner { .. } | Self::KeyRetired { .. } => ErrorCode::UnknownSigner,
            Self::Revoked { .. } => ErrorCode::Revoked,
            Self::WrongPurpose { .. } => ErrorCode::WrongPurpose,
            Self::WrongAudience { .. } => ErrorCode::WrongAudience,
            Self::WrongNode { .. } => ErrorCode::WrongNode,
            Self::Replayed(_) => ErrorCode::Replayed,
            Self::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
            Self::Expired { .. } | Self::NotYetValid { .. } => ErrorCode::ConfigExpired,
            Self::Rollback { .. } => ErrorCode::ConfigRollback,
            // The snapshot contradicts the rotation in force as an equivocating one contradicts
            // the version in force: the same 409, and a catch-up chain holding it is refused.
            Self::Equivocation { .. }
            | Self::ChainMismatch { .. }
            | Self::RotationConflict { .. } => ErrorCode::ConfigEquivocation,
        }
    }

    /// Builds a [`ProtocolError::Malformed`] from a serde_json error, keeping its position.
    pub fn malformed(what: &'static str, err: &serde_json::Error) -> Self {
        Self::Malformed {
            what,
            line: err.line(),
            column: err.column(),
            reason: err.to_string(),
        }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = ProtocolError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("disk full")]
    struct Root;

    /// Quotes its cause and exposes it, as most of our error types do.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot write /data/x: {source}")]
    struct Quoting {
        source: Root,
    }

    /// Hides its cause's text, as reqwest's top-level errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Hiding {
        source: Quoting,
    }

    #[test]
    fn a_chain_says_each_cause_once() {
        assert_eq!(
            error_chain(&Quoting { source: Root }),
            "cannot write /data/x: disk full"
        );
        assert_eq!(
            error_chain(&Hiding {
                source: Quoting { source: Root }
            }),
            "error sending request: cannot write /data/x: disk full"
        );
    }

    #[test]
    fn messages_name_values_as_a_person_writes_them() {
        let orphan = ProtocolError::ChainMismatch {
            version: 3,
            current: "sha256:aa".into(),
            prev: None,
        };
        assert_eq!(
            orphan.to_string(),
            "config version 3 chains to no previous version, but sha256:aa is in force"
        );
        let chained = ProtocolError::ChainMismatch {
            version: 3,
            current: "sha256:aa".into(),
            prev: Some("sha256:bb".into()),
        };
        assert_eq!(
            chained.to_string(),
            "config version 3 chains to sha256:bb, but sha256:aa is in force"
        );
        let versions = ProtocolError::NoCommonVersion {
            offered: vec![3],
            supported: vec![1, 2],
        };
        assert_eq!(
            versions.to_string(),
            "no common protocol version (offered 3, supported 1, 2)"
        );
    }
}
