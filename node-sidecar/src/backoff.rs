//! Reconnect backoff: exponential with *full jitter* (protocol §7.1), so a fleet that lost the
//! network at the same instant does not reconnect at the same instant.

use std::time::Duration;

/// Backoff state for one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// `seed` makes the jitter reproducible in tests; use [`Backoff::random`] in production.
    pub fn new(base_ms: u64, cap_ms: u64, seed: u64) -> Self {
        Self {
            base_ms: base_ms.max(1),
            cap_ms: cap_ms.max(1),
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// Seeded from the OS RNG so nodes do not share a jitter sequence.
    pub fn random(base_ms: u64, cap_ms: u64) -> Self {
        let seed = resultity_protocol::crypto::random_bytes::<8>()
            .map(u64::from_le_bytes)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Self::new(base_ms, cap_ms, seed)
    }

    /// Upper bound of the next delay: `min(cap, base × 2^attempt)`.
    pub fn ceiling_ms(&self) -> u64 {
        let exp = 1u64.checked_shl(self.attempt.min(40)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(exp).min(self.cap_ms)
    }

    /// The next delay, uniform in `[0, ceiling]`, and advances the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling_ms();
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        // The cap comes from the network's timing and may be u64::MAX.
        Duration::from_millis(self.rng % ceiling.saturating_add(1))
    }

    /// Call after a session stayed up long enough to count as healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbounded_cap_from_the_network_does_not_overflow() {
        let mut b = Backoff::new(u64::MAX, u64::MAX, 7);
        assert_eq!(b.ceiling_ms(), u64::MAX);
        b.next_delay();
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn ceiling_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(500, 30_000, 7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling_ms());
            let d = b.next_delay();
            assert!(d.as_millis() <= u128::from(*ceilings.last().unwrap()));
        }
        assert_eq!(&ceilings[..4], &[500, 1000, 2000, 4000]);
        assert_eq!(*ceilings.last().unwrap(), 30_000);
        b.reset();
        assert_eq!(b.ceiling_ms(), 500);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling_ms(), 30_000, "no overflow after many attempts");
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        // 1000 nodes at the cap: delays cover the whole window instead of bunching.
        let delays: Vec<u64> = (0..1000u64)
            .map(|seed| {
                let mut b = Backoff::new(500, 30_000, seed.wrapping_mul(0x9e37_79b9) + 1);
                for _ in 0..20 {
                    b.next_delay();
                }
                u64::try_from(b.next_delay().as_millis()).unwrap()
            })
            .collect();
        let buckets = delays.iter().fold([0u32; 10], |mut acc, d| {
            acc[usize::try_from(d / 3001).unwrap().min(9)] += 1;
            acc
        });
        assert!(buckets.iter().all(|&n| n > 50), "uneven spread {buckets:?}");
    }
}
