//! Wire error codes, their HTTP statuses, and WebSocket close codes (spec §9).

use serde::{Deserialize, Serialize};

/// Machine-readable reason carried in every error answer (`{"error":{"code":...}}`) and in
/// the `error` WebSocket message. Stable strings: peers and dashboards match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    TooLarge,
    UnsupportedVersion,
    BadSignature,
    WeakKey,
    UnknownSigner,
    Revoked,
    WrongPurpose,
    WrongAudience,
    WrongNode,
    Replayed,
    StaleTimestamp,
    ChallengeInvalid,
    NotRegistered,
    NotAssigned,
    StaleLease,
    ConfigExpired,
    ConfigRollback,
    ConfigEquivocation,
    RateLimited,
    QueueFull,
    NoEligibleNode,
    Excluded,
    NotFound,
    Timeout,
    Unavailable,
    Internal,
    /// A result whose signed body disagrees with its assignment (config digest, model, or
    /// output digest).
    ResultMismatch,
    /// The path exists but not for this HTTP method (answered 405 with an `Allow` header).
    MethodNotAllowed,
    /// A code this build does not know (a newer peer's): read as a generic refusal instead of
    /// failing the whole message.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, in spec order (used by metrics to pre-register label values).
    pub const ALL: [ErrorCode; 30] = [
        Self::Malformed,
        Self::TooLarge,
        Self::UnsupportedVersion,
        Self::BadSignature,
        Self::WeakKey,
        Self::UnknownSigner,
        Self::Revoked,
        Self::WrongPurpose,
        Self::WrongAudience,
        Self::WrongNode,
        Self::Replayed,
        Self::StaleTimestamp,
        Self::ChallengeInvalid,
        Self::NotRegistered,
        Self::NotAssigned,
        Self::StaleLease,
        Self::ConfigExpired,
        Self::ConfigRollback,
        Self::ConfigEquivocation,
        Self::RateLimited,
        Self::QueueFull,
        Self::NoEligibleNode,
        Self::Excluded,
        Self::NotFound,
        Self::Timeout,
        Self::Unavailable,
        Self::Internal,
        Self::ResultMismatch,
        Self::MethodNotAllowed,
        Self::Unknown,
    ];

    /// The stable snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::BadSignature => "bad_signature",
            Self::WeakKey => "weak_key",
            Self::UnknownSigner => "unknown_signer",
            Self::Revoked => "revoked",
            Self::WrongPurpose => "wrong_purpose",
            Self::WrongAudience => "wrong_audience",
            Self::WrongNode => "wrong_node",
            Self::Replayed => "replayed",
            Self::StaleTimestamp => "stale_timestamp",
            Self::ChallengeInvalid => "challenge_invalid",
            Self::NotRegistered => "not_registered",
            Self::NotAssigned => "not_assigned",
            Self::StaleLease => "stale_lease",
            Self::ConfigExpired => "config_expired",
            Self::ConfigRollback => "config_rollback",
            Self::ConfigEquivocation => "config_equivocation",
            Self::RateLimited => "rate_limited",
            Self::QueueFull => "queue_full",
            Self::NoEligibleNode => "no_eligible_node",
            Self::Excluded => "excluded",
            Self::NotFound => "not_found",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::ResultMismatch => "result_mismatch",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unknown => "unknown",
        }
    }

    /// The HTTP status an HTTP endpoint answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Malformed
            | Self::UnsupportedVersion
            | Self::WeakKey
            | Self::WrongPurpose
            | Self::WrongAudience
            | Self::WrongNode
            | Self::StaleTimestamp => 400,
            Self::BadSignature
            | Self::UnknownSigner
            | Self::ChallengeInvalid
            | Self::NotRegistered => 401,
            Self::Revoked | Self::Excluded => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Replayed
            | Self::NotAssigned
            | Self::StaleLease
            | Self::ConfigRollback
            | Self::ConfigEquivocation
            | Self::ResultMismatch => 409,
            Self::TooLarge => 413,
            Self::ConfigExpired => 422,
            Self::RateLimited | Self::QueueFull => 429,
            Self::Internal | Self::Unknown => 500,
            Self::NoEligibleNode | Self::Unavailable => 503,
            Self::Timeout => 504,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the network and node use (spec §9.2). 4000–4999 is the range RFC 6455
/// leaves to applications.
pub mod close {
    /// Orderly end (node drained, or network shutting down).
    pub const NORMAL: u16 = 1000;
    /// Peer is going away (process shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke the protocol (not text, not an envelope).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame was larger than the negotiated maximum.
    pub const TOO_BIG: u16 = 1009;
    /// `auth` failed: bad signature, unknown or revoked node, wrong challenge, wrong network.
    pub const AUTH_FAILED: u16 = 4001;
    /// Too many invalid signatures within one session.
    pub const TOO_MANY_INVALID: u16 = 4002;
    /// No `auth` arrived within the handshake timeout.
    pub const AUTH_TIMEOUT: u16 = 4003;
    /// A newer session for the same node replaced this one.
    pub const SUPERSEDED: u16 = 4004;
    /// Two ping intervals passed without a pong.
    pub const DEAD_PEER: u16 = 4005;
    /// No common protocol version.
    pub const UNSUPPORTED_VERSION: u16 = 4006;
    /// Node is excluded or deregistered; reconnecting will not help until the reason clears.
    pub const EXCLUDED: u16 = 4007;
    /// Too many open sessions on the network side; retry with backoff.
    pub const OVERLOADED: u16 = 4008;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!((400..600).contains(&code.http_status()));
        }
    }
}
