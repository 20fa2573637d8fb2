//! Memory of the last refused config snapshot, so a node does not download the same refused
//! snapshot again at every heartbeat (the network keeps announcing its digest). The same digest
//! is retried with exponential backoff (the refusal may have been local: a full disk, a clock
//! that was wrong); another digest is fetched at once.

use resultity_protocol::config::ConfigDigest;

/// First retry of a refused digest after this; doubled per refusal.
pub const RETRY_BASE_MS: u64 = 10_000;
/// Retries of a refused digest are at most this far apart.
pub const RETRY_CAP_MS: u64 = 600_000;

/// The refused digest, how often it was refused in a row, and when it may be fetched again.
#[derive(Debug, Clone, Default)]
pub struct ConfigRefusal {
    refused: Option<(ConfigDigest, u32, u64)>,
}

impl ConfigRefusal {
    /// Whether a snapshot announced with `digest` should be fetched at `now_ms`.
    pub fn should_fetch(&self, digest: &ConfigDigest, now_ms: u64) -> bool {
        match &self.refused {
            Some((d, _, retry_at)) if d == digest => now_ms >= *retry_at,
            _ => true,
        }
    }

    /// Whether a refused snapshot is still in its backoff at `now_ms` (for fetches whose
    /// digest is not known beforehand: a catch-up after an untrusted signature).
    pub fn backing_off(&self, now_ms: u64) -> bool {
        matches!(&self.refused, Some((_, _, retry_at)) if now_ms < *retry_at)
    }

    /// `digest` was refused at `now_ms`; returns when it may be fetched again.
    pub fn record(&mut self, digest: &ConfigDigest, now_ms: u64) -> u64 {
        let times = match &self.refused {
            Some((d, n, _)) if d == digest => n.saturating_add(1),
            _ => 1,
        };
        let delay = RETRY_BASE_MS
            .saturating_mul(1u64 << (times - 1).min(16))
            .min(RETRY_CAP_MS);
        let retry_at = now_ms.saturating_add(delay);
        self.refused = Some((digest.clone(), times, retry_at));
        retry_at
    }

    /// A snapshot was applied or is already in force: nothing is refused any more.
    pub fn clear(&mut self) {
        self.refused = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_digest_backs_off_and_another_is_fetched_at_once() {
        let bad = ConfigDigest::of_body(b"bad");
        let good = ConfigDigest::of_body(b"good");
        let mut r = ConfigRefusal::default();
        assert!(r.should_fetch(&bad, 0));
        assert_eq!(r.record(&bad, 1_000), 1_000 + RETRY_BASE_MS);
        // Heartbeats every second keep announcing it: no fetch until the backoff ends.
        let fetches = (1..=30u64)
            .filter(|s| r.should_fetch(&bad, 1_000 + s * 1_000))
            .count();
        assert_eq!(fetches, 21, "fetched again only from the retry time on");
        assert!(r.should_fetch(&good, 2_000));
        // Refused again: the wait doubles, up to the cap.
        assert_eq!(r.record(&bad, 20_000), 20_000 + 2 * RETRY_BASE_MS);
        for _ in 0..20 {
            r.record(&bad, 20_000);
        }
        assert!(!r.should_fetch(&bad, 20_000 + RETRY_CAP_MS - 1));
        assert!(r.should_fetch(&bad, 20_000 + RETRY_CAP_MS));
        r.clear();
        assert!(r.should_fetch(&bad, 0));
    }
}
