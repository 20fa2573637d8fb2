//! Admission: who may talk to the network at all. Registration challenges (single use, bounded,
//! rate limited per client IP), the replay check of signed HTTP requests, revoked node keys and
//! the per-node HTTP rate limit.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use resultity_protocol::config::NetworkConfig;
use resultity_protocol::replay::NonceStore;
use resultity_protocol::{ErrorCode, NodeId, ProtocolError};

use super::{Core, RateLimiter, Refusal, not_registered};

/// Replay and challenge state, and the revocation list of the config in force.
#[derive(Debug)]
pub(super) struct Admission {
    nonces: NonceStore,
    /// challenge → (node it was issued to, expiry).
    challenges: HashMap<String, (NodeId, u64)>,
    /// Challenge rate limit per client IP.
    challenge_ips: HashMap<IpAddr, RateLimiter>,
    revoked: HashSet<NodeId>,
}

impl Admission {
    pub(super) fn new(config: &NetworkConfig) -> Self {
        Self {
            nonces: NonceStore::default(),
            challenges: HashMap::new(),
            challenge_ips: HashMap::new(),
            revoked: config.revoked_node_keys.iter().cloned().collect(),
        }
    }

    /// Takes the revocation list of a newly published config.
    pub(super) fn set_revoked(&mut self, config: &NetworkConfig) {
        self.revoked = config.revoked_node_keys.iter().cloned().collect();
    }
}

impl Core {
    /// One challenge request from `ip`; false when its bucket is empty. Memory is bounded:
    /// when the table is full, buckets that refilled (idle addresses) are dropped, and if that
    /// frees nothing the table starts over.
    pub fn allow_challenge(&mut self, ip: IpAddr, now: u64) -> bool {
        let (rate, burst) = (
            self.limits.challenge_rate_per_ip_per_s,
            self.limits.challenge_burst_per_ip,
        );
        if !self.admission.challenge_ips.contains_key(&ip)
            && self.admission.challenge_ips.len() >= self.limits.max_tracked_ips
        {
            self.admission
                .challenge_ips
                .retain(|_, b| b.clone().refilled_by(now) < burst);
            if self.admission.challenge_ips.len() >= self.limits.max_tracked_ips {
                self.admission.challenge_ips.clear();
            }
        }
        self.admission
            .challenge_ips
            .entry(ip)
            .or_insert_with(|| RateLimiter::new(rate, burst, now))
            .allow(now)
    }

    /// Issues a single-use registration challenge bound to `node`.
    pub fn issue_challenge(
        &mut self,
        node: &NodeId,
        challenge: String,
        ttl_ms: u64,
        now: u64,
    ) -> Result<u64, Refusal> {
        if self.admission.challenges.len() >= self.limits.max_challenges {
            self.admission.challenges.retain(|_, (_, exp)| *exp > now);
        }
        if self.admission.challenges.len() >= self.limits.max_challenges {
            return Err((
                ErrorCode::RateLimited,
                "too many outstanding challenges".into(),
            ));
        }
        let expires = now.saturating_add(ttl_ms);
        self.admission
            .challenges
            .insert(challenge, (node.clone(), expires));
        Ok(expires)
    }

    /// Consumes a challenge; true only if it was issued to `node` and has not expired.
    pub fn take_challenge(&mut self, challenge: &str, node: &NodeId, now: u64) -> bool {
        match self.admission.challenges.remove(challenge) {
            Some((owner, exp)) => &owner == node && exp > now,
            None => false,
        }
    }

    /// Replay check of a signed HTTP request (after its signature verified).
    pub fn check_nonce(
        &mut self,
        node: &NodeId,
        ts_ms: u64,
        nonce: &str,
        now: u64,
    ) -> Result<(), ProtocolError> {
        self.admission
            .nonces
            .check(node.as_str(), ts_ms, nonce, now)
    }

    /// Whether the network config revokes `node`'s key.
    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.admission.revoked.contains(node)
    }

    /// Per-node HTTP rate limit; `NotRegistered` for unknown nodes.
    pub fn http_admit(&mut self, node: &NodeId, now: u64) -> Result<(), Refusal> {
        let rec = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| not_registered(node))?;
        if !rec.http_rate.allow(now) {
            return Err((
                ErrorCode::RateLimited,
                "too many requests from this node".into(),
            ));
        }
        Ok(())
    }
}
