//! Streamed jobs on the network side: what the core keeps per streamed job, and how chunks
//! reach the caller.
//!
//! A node sends a streamed job's output as `job.chunk` frames (sequenced in its session, so
//! they arrive in order) and then a signed `job.result` whose `stream` summary must equal the
//! digest the network computed over exactly the events it received for that lease. Events go
//! to the caller as they arrive, through a bounded channel: when the caller reads slower than
//! the node produces, the node's session waits (up to [`CALLER_SEND_TIMEOUT`]), which stops
//! reading the WebSocket and so slows the node down to the caller's pace.
//!
//! Until the first event reached the caller, a failed lease is reassigned like any other
//! (the caller notices nothing); after that, the job fails and the caller's stream ends with
//! an error event: a restart would repeat text the caller already has.

use std::time::Duration;

use resultity_protocol::limits::{MAX_EVENTS_PER_CHUNK, MAX_STREAM_EVENT_BYTES, MAX_STREAM_EVENTS};
use resultity_protocol::messages::ws::{StreamDigest, StreamSummary};
use resultity_protocol::{ErrorCode, JobId};
use tokio::sync::mpsc;

/// Chunks buffered towards one caller before the node's session waits.
pub const CALLER_BUFFER_CHUNKS: usize = 64;
/// A caller that takes no chunk for this long is treated as gone: its job is cancelled.
pub const CALLER_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of a caller's stream: batches of runtime events, in order.
pub type StreamSink = mpsc::Sender<Vec<String>>;

/// A new caller stream: the sink the core forwards to and the receiver the API handler reads.
pub fn caller_channel() -> (StreamSink, mpsc::Receiver<Vec<String>>) {
    mpsc::channel(CALLER_BUFFER_CHUNKS)
}

/// What the core keeps for one streamed job.
#[derive(Debug)]
pub struct StreamState {
    pub sink: StreamSink,
    /// Whether any event was handed to the caller: from then on, the job cannot restart.
    pub delivered: bool,
    /// Next chunk index expected on the current lease.
    next_index: u32,
    digest: StreamDigest,
}

impl StreamState {
    pub fn new(sink: StreamSink) -> Self {
        Self {
            sink,
            delivered: false,
            next_index: 0,
            digest: StreamDigest::new(),
        }
    }

    /// A new lease starts its chunks from index 0 and an empty digest.
    pub fn new_lease(&mut self) {
        self.next_index = 0;
        self.digest = StreamDigest::new();
    }

    /// Checks one chunk against the stream so far and the limits, and digests it. An error
    /// means the stream of this lease is broken (the job cannot complete from it).
    pub fn accept(
        &mut self,
        job: &JobId,
        index: u32,
        events: &[String],
        max_output_bytes: u32,
    ) -> Result<(), (ErrorCode, String)> {
        if index != self.next_index {
            return Err((
                ErrorCode::ResultMismatch,
                format!(
                    "chunk {index} of job {job} arrived where chunk {} was due",
                    self.next_index
                ),
            ));
        }
        if events.is_empty() {
            return Err((
                ErrorCode::Malformed,
                "a chunk carries at least one event".to_owned(),
            ));
        }
        // A listed limit (spec §10), so `too_large` like every other limit, not `malformed`.
        if events.len() > MAX_EVENTS_PER_CHUNK {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "a chunk carries at most {MAX_EVENTS_PER_CHUNK} events, not {}",
                    events.len()
                ),
            ));
        }
        if let Some(big) = events.iter().find(|e| e.len() > MAX_STREAM_EVENT_BYTES) {
            return Err((
                ErrorCode::TooLarge,
                format!(
                    "stream event of {} bytes exceeds {MAX_STREAM_EVENT_BYTES}",
                    big.len()
                ),
            ));
        }
        let n = u32::try_from(events.len()).unwrap_or(u32::MAX);
        if self.digest.events().saturating_add(n) > MAX_STREAM_EVENTS {
            return Err((
                ErrorCode::TooLarge,
                format!("job {job} streams more than {MAX_STREAM_EVENTS} events"),
            ));
        }
        let added: u64 = events.iter().map(|e| e.len() as u64).sum();
        if self.digest.bytes().saturating_add(added) > u64::from(max_output_bytes) {
            return Err((
                ErrorCode::TooLarge,
                format!("job {job} streams more than max_output_bytes {max_output_bytes}"),
            ));
        }
        for e in events {
            self.digest.push(e);
        }
        self.next_index += 1;
        Ok(())
    }

    /// The summary of everything received on the current lease.
    pub fn summary(&self) -> StreamSummary {
        self.digest.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobId {
        JobId::parse("j-1").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn chunks_must_come_in_order_within_limits() {
        let (tx, _rx) = caller_channel();
        let mut s = StreamState::new(tx);
        let ev = |t: &str| vec![t.to_owned()];
        assert!(s.accept(&job(), 0, &ev("a"), 100).is_ok());
        // A skipped or repeated index breaks the stream.
        assert_eq!(
            s.accept(&job(), 2, &ev("c"), 100).map_err(|e| e.0),
            Err(ErrorCode::ResultMismatch)
        );
        assert_eq!(
            s.accept(&job(), 0, &ev("a"), 100).map_err(|e| e.0),
            Err(ErrorCode::ResultMismatch)
        );
        assert!(s.accept(&job(), 1, &ev("b"), 100).is_ok());
        assert_eq!(
            s.accept(&job(), 2, &[], 100).map_err(|e| e.0),
            Err(ErrorCode::Malformed)
        );
        assert_eq!(
            s.accept(
                &job(),
                2,
                &vec!["e".to_owned(); MAX_EVENTS_PER_CHUNK + 1],
                100_000
            )
            .map_err(|e| e.0),
            Err(ErrorCode::TooLarge)
        );
        assert_eq!(
            s.accept(&job(), 2, &ev(&"x".repeat(200)), 100)
                .map_err(|e| e.0),
            Err(ErrorCode::TooLarge)
        );
        let mut d = StreamDigest::new();
        d.push("a");
        d.push("b");
        assert_eq!(s.summary(), d.summary());
        // A new lease starts over.
        s.new_lease();
        assert!(s.accept(&job(), 0, &ev("z"), 100).is_ok());
    }
}
