//! Numbers the spec fixes (spec §10). Both ends use these defaults; the network may announce
//! smaller frame limits in `hello`.

/// Largest signed envelope on HTTP or WebSocket (job requests and results included).
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// Largest WebSocket frame/message; equals the envelope limit.
pub const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES;
/// Largest signed config snapshot.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// Snapshots in one catch-up chain (`GET /v1/config?since=N`).
pub const MAX_CONFIG_CHAIN_LINKS: usize = 16;
/// Largest catch-up chain answer.
pub const MAX_CONFIG_CHAIN_BYTES: usize = 2 * MAX_CONFIG_BYTES;
/// HTTP timestamps must lie within ± this of server time.
pub const HTTP_SKEW_MS: u64 = 30_000;
/// Nonces are remembered for the whole window a timestamp can be accepted in.
pub const NONCE_TTL_MS: u64 = 2 * HTTP_SKEW_MS;
/// Nonces remembered per node within the TTL; older ones are evicted and fenced by a floor.
pub const NONCES_PER_NODE: usize = 64;
/// Nodes whose nonces are tracked at once.
pub const NONCE_MAX_NODES: usize = 65_536;
/// WebSocket sequence numbers accepted out of order within this many of the highest seen.
pub const SEQ_WINDOW: u64 = 64;
/// A config may claim an issue time this far in the future (clock skew between parties).
pub const CONFIG_CLOCK_SKEW_MS: u64 = 5 * 60_000;
/// Registration challenges expire after this.
pub const CHALLENGE_TTL_MS: u64 = 60_000;
/// A node must send `auth` within this after `hello`.
pub const AUTH_TIMEOUT_MS: u64 = 10_000;
/// Protocol versions this crate implements.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];

/// Largest single stream event (one runtime SSE `data:` payload) in a `job.chunk`.
pub const MAX_STREAM_EVENT_BYTES: usize = 64 * 1024;
/// Most events one `job.chunk` frame carries (a node coalesces what is ready into one frame).
pub const MAX_EVENTS_PER_CHUNK: usize = 256;
/// Most stream events one job may produce (its bytes are bounded by `max_output_bytes`).
pub const MAX_STREAM_EVENTS: u32 = 65_536;

/// Longest piece of peer-supplied text quoted in an error message.
pub const QUOTE_MAX_CHARS: usize = 128;

/// `text` cut to [`QUOTE_MAX_CHARS`] characters (on a character boundary, marked with `…`),
/// so a peer cannot make our error messages arbitrarily long.
pub fn clip_text(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Highest version both sides support, if any.
pub fn negotiate_version(offered: &[u32], supported: &[u32]) -> Option<u32> {
    offered
        .iter()
        .copied()
        .filter(|v| supported.contains(v))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common() {
        assert_eq!(negotiate_version(&[1, 2, 3], &[1, 2]), Some(2));
        assert_eq!(negotiate_version(&[3], &[1, 2]), None);
        assert_eq!(negotiate_version(&[], &[1]), None);
    }
}
