//! Replay guards with constant-size state (spec §4.4).
//!
//! * HTTP: a request's `ts_ms` must lie within ±[`HTTP_SKEW_MS`](crate::limits::HTTP_SKEW_MS)
//!   of server time and its nonce must not have been seen from that node within the window.
//!   Memory is bounded by `max_nodes × per_node` entries; when a bound forces an entry out, a
//!   *floor* timestamp rises to the evicted entry's time and anything not newer than the floor
//!   is refused. Eviction can therefore refuse a late legitimate request, but can never admit a
//!   replay.
//! * WebSocket: per-direction sequence numbers checked by a 64-wide sliding bitmap window
//!   (the IPsec/DTLS anti-replay scheme): constant size per session.

use std::collections::{HashMap, VecDeque};

use crate::crypto::unb64;
use crate::error::{ProtocolError, Result};
use crate::limits;

#[derive(Debug, Default)]
struct NodeNonces {
    /// `(ts_ms, first 64 bits of nonce)` in arrival order.
    entries: VecDeque<(u64, u64)>,
    floor_ms: u64,
    newest_ms: u64,
}

/// Bounded HTTP replay guard (timestamp window + per-node nonce sets).
#[derive(Debug)]
pub struct NonceStore {
    skew_ms: u64,
    per_node: usize,
    max_nodes: usize,
    nodes: HashMap<String, NodeNonces>,
    global_floor_ms: u64,
    entries: usize,
}

impl Default for NonceStore {
    fn default() -> Self {
        Self::new(
            limits::HTTP_SKEW_MS,
            limits::NONCES_PER_NODE,
            limits::NONCE_MAX_NODES,
        )
    }
}

impl NonceStore {
    /// `per_node` and `max_nodes` are clamped to at least 1.
    pub fn new(skew_ms: u64, per_node: usize, max_nodes: usize) -> Self {
        Self {
            skew_ms,
            per_node: per_node.max(1),
            max_nodes: max_nodes.max(1),
            nodes: HashMap::new(),
            global_floor_ms: 0,
            entries: 0,
        }
    }

    /// Checks `ts_ms` against `now_ms` and records the nonce; refuses replays.
    /// `node` is the authenticated signer (check the signature first, so only registered keys
    /// can occupy the store).
    pub fn check(&mut self, node: &str, ts_ms: u64, nonce: &str, now_ms: u64) -> Result<()> {
        if ts_ms.abs_diff(now_ms) > self.skew_ms {
            return Err(ProtocolError::StaleTimestamp {
                ts_ms,
                now_ms,
                skew_ms: self.skew_ms,
            });
        }
        let raw: [u8; 16] = unb64("nonce", nonce)?;
        let mut first = [0u8; 8];
        first.copy_from_slice(&raw[..8]);
        let n = u64::from_le_bytes(first);
        if ts_ms <= self.global_floor_ms {
            return Err(ProtocolError::Replayed(
                "timestamp not newer than the replay floor".into(),
            ));
        }
        if !self.nodes.contains_key(node) && self.nodes.len() >= self.max_nodes {
            self.make_room(now_ms);
        }
        let cutoff = now_ms.saturating_sub(self.skew_ms);
        let entry = self.nodes.entry(node.to_owned()).or_default();
        if ts_ms <= entry.floor_ms {
            return Err(ProtocolError::Replayed(
                "timestamp not newer than this node's replay floor".into(),
            ));
        }
        // Entries older than the window can go: their replays fail the timestamp check.
        while entry.entries.front().is_some_and(|(t, _)| *t < cutoff) {
            entry.entries.pop_front();
            self.entries -= 1;
        }
        if entry.entries.iter().any(|(_, seen)| *seen == n) {
            return Err(ProtocolError::Replayed("nonce already used".into()));
        }
        if entry.entries.len() >= self.per_node
            && let Some((t, _)) = entry.entries.pop_front()
        {
            entry.floor_ms = entry.floor_ms.max(t);
            self.entries -= 1;
        }
        entry.entries.push_back((ts_ms, n));
        entry.newest_ms = entry.newest_ms.max(ts_ms);
        self.entries += 1;
        Ok(())
    }

    /// Frees a node slot: drop nodes whose entries are all outside the window, else evict the
    /// node heard from least recently and fence its entries with the global floor.
    fn make_room(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.skew_ms);
        let before = self.nodes.len();
        let mut freed = 0;
        self.nodes.retain(|_, n| {
            let keep = n.newest_ms >= cutoff;
            if !keep {
                freed += n.entries.len();
            }
            keep
        });
        self.entries -= freed;
        if self.nodes.len() < before {
            return;
        }
        let stalest = self
            .nodes
            .iter()
            .min_by_key(|(_, n)| n.newest_ms)
            .map(|(k, n)| (k.clone(), n.newest_ms, n.entries.len()));
        if let Some((key, newest, count)) = stalest {
            self.nodes.remove(&key);
            self.entries -= count;
            self.global_floor_ms = self.global_floor_ms.max(newest);
        }
    }

    /// Nonces held.
    pub fn len(&self) -> usize {
        self.entries
    }
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
    /// Nodes tracked.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }
    /// Most nonces this store can ever hold.
    pub fn capacity(&self) -> usize {
        self.per_node * self.max_nodes
    }
    /// Upper estimate of heap bytes held (keys, per-node headers, entries).
    pub fn approx_memory_bytes(&self) -> usize {
        let per_node = std::mem::size_of::<(String, NodeNonces)>() + crate::ids::KEY_TEXT_LEN;
        let per_entry = std::mem::size_of::<(u64, u64)>();
        let entry_slots: usize = self.nodes.values().map(|n| n.entries.capacity()).sum();
        self.nodes.capacity() * per_node + entry_slots * per_entry
    }
}

/// Sliding-window replay guard for one direction of one WebSocket session.
#[derive(Debug, Clone, Default)]
pub struct SeqWindow {
    highest: u64,
    /// Bit `i` set: `highest - i` was seen.
    seen: u64,
}

impl SeqWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts each sequence number (≥ 1) once, within [`limits::SEQ_WINDOW`] of the highest.
    pub fn check(&mut self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Err(ProtocolError::InvalidField {
                field: "seq",
                reason: "sequence numbers start at 1".into(),
            });
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= limits::SEQ_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = seq;
            return Ok(());
        }
        let back = self.highest - seq;
        if back >= limits::SEQ_WINDOW {
            return Err(ProtocolError::Replayed(format!(
                "seq {seq} is older than the window (highest {})",
                self.highest
            )));
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            return Err(ProtocolError::Replayed(format!("seq {seq} already seen")));
        }
        self.seen |= bit;
        Ok(())
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }
}

/// Hands out outgoing sequence numbers 1, 2, 3, …
#[derive(Debug, Clone, Default)]
pub struct SeqCounter(u64);

impl SeqCounter {
    pub fn next_seq(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A fresh random nonce for an HTTP request header.
pub fn new_nonce() -> Result<String> {
    Ok(crate::crypto::b64(&crate::crypto::random_bytes::<16>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn nonce(i: u64) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&i.to_le_bytes());
        crate::crypto::b64(&b)
    }

    #[test]
    fn replayed_nonce_is_refused() {
        let mut s = NonceStore::default();
        assert!(s.check("n", NOW, &nonce(1), NOW).is_ok());
        assert!(matches!(
            s.check("n", NOW, &nonce(1), NOW),
            Err(ProtocolError::Replayed(_))
        ));
        // Another node may use the same nonce.
        assert!(s.check("m", NOW, &nonce(1), NOW).is_ok());
    }

    #[test]
    fn timestamps_outside_the_window_are_refused() {
        let mut s = NonceStore::default();
        let skew = limits::HTTP_SKEW_MS;
        assert!(s.check("n", NOW - skew, &nonce(1), NOW).is_ok());
        assert!(s.check("n", NOW + skew, &nonce(2), NOW).is_ok());
        for ts in [NOW - skew - 1, NOW + skew + 1, 0] {
            assert!(matches!(
                s.check("n", ts, &nonce(3), NOW),
                Err(ProtocolError::StaleTimestamp { .. })
            ));
        }
    }

    #[test]
    fn replay_after_window_passes_fails_on_time() {
        let mut s = NonceStore::default();
        assert!(s.check("n", NOW, &nonce(1), NOW).is_ok());
        let later = NOW + limits::HTTP_SKEW_MS + 1;
        assert!(matches!(
            s.check("n", NOW, &nonce(1), later),
            Err(ProtocolError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn flood_stays_within_bound_and_never_admits_a_replay() {
        let (per_node, max_nodes) = (8, 100);
        let mut s = NonceStore::new(limits::HTTP_SKEW_MS, per_node, max_nodes);
        let mut accepted = Vec::new();
        // 1000 nodes × 50 requests each, all inside one window.
        for i in 0..50_000u64 {
            let node = format!("node-{}", i % 1000);
            let ts = NOW + i / 100;
            if s.check(&node, ts, &nonce(i), NOW + 100).is_ok() {
                accepted.push((node, ts, i));
            }
            assert!(s.len() <= per_node * max_nodes);
            assert!(s.nodes() <= max_nodes);
        }
        assert!(s.len() <= s.capacity());
        assert!(
            s.approx_memory_bytes() < 64 * 1024,
            "{}",
            s.approx_memory_bytes()
        );
        // Every accepted request, replayed, is refused — evicted or not.
        for (node, ts, i) in accepted {
            assert!(s.check(&node, ts, &nonce(i), NOW + 100).is_err());
        }
    }

    #[test]
    fn single_node_flood_raises_only_its_own_floor() {
        let mut s = NonceStore::new(limits::HTTP_SKEW_MS, 4, 16);
        for i in 0..100 {
            assert!(s.check("flooder", NOW + i, &nonce(i), NOW).is_ok());
        }
        assert_eq!(s.len(), 4);
        // Another node's slightly older request still passes.
        assert!(s.check("honest", NOW - 10, &nonce(1), NOW).is_ok());
        // The flooder's own old timestamps are fenced.
        assert!(s.check("flooder", NOW + 1, &nonce(1000), NOW).is_err());
    }

    #[test]
    fn nonce_must_be_16_bytes() {
        let mut s = NonceStore::default();
        assert!(matches!(
            s.check("n", NOW, "abc", NOW),
            Err(ProtocolError::InvalidField { .. })
        ));
    }

    #[test]
    fn seq_window() {
        let mut w = SeqWindow::new();
        assert!(w.check(0).is_err());
        for i in 1..=10 {
            assert!(w.check(i).is_ok());
        }
        assert!(w.check(5).is_err());
        assert!(w.check(12).is_ok());
        assert!(w.check(11).is_ok(), "out of order within the window");
        assert!(w.check(11).is_err());
        assert!(w.check(1000).is_ok());
        assert!(w.check(1000 - limits::SEQ_WINDOW).is_err(), "too old");
        assert!(w.check(1000 - limits::SEQ_WINDOW + 1).is_ok());
        assert_eq!(w.highest(), 1000);
    }
}
