//! The WebSocket job session (protocol §7): handshake, credits, concurrent jobs, durable
//! results, resume after reconnect, keepalive and drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use resultity_protocol::codes::close;
use resultity_protocol::envelope;
use resultity_protocol::messages::FailCode;
use resultity_protocol::messages::Usage;
use resultity_protocol::messages::http::paths;
use resultity_protocol::messages::ws::{
    Auth, Hello, JobAssignment, JobResult, NetworkMessage, NodeMessage, RuntimeRefusal,
    StreamDigest, StreamSummary, Welcome,
};
use resultity_protocol::session::{NodeSession, check_addressing};
use resultity_protocol::status::ConnectionState;
use resultity_protocol::{Purpose, limits};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use super::{Agent, Exit, lock, set_connection};
use crate::backoff::Backoff;
use crate::runtime::{Runtime, RuntimeError};

/// Stream events buffered between the runtime reader and the session before the reader
/// waits (and with it, the runtime's socket).
const STREAM_BUFFER_EVENTS: usize = 64;
/// Raw event bytes one `job.chunk` frame carries at most (plus one event of at most
/// `MAX_STREAM_EVENT_BYTES`): even fully escaped twice, the frame stays under 1 MiB.
const CHUNK_FRAME_BUDGET: usize = 128 * 1024;

/// How one session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Drained and told the network.
    Drained,
    /// Connection lost or refused; reconnect after backoff.
    Lost(String),
    /// The network closed with a code that needs re-registration first.
    Unauthorized(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(base: &str) -> String {
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| base.to_owned());
    format!("{rest}{}", paths::SESSION)
}

/// Frees a job's slot exactly once, however its task ends. A job that ends normally is
/// released *before* its result or failure is sent, so the network never sees a free slot the
/// node does not have yet; the network counts that slot free on receipt, so no `credits`
/// message is needed (except after a failure that withholds the slot, see
/// `FailCode::withholds_slot`). Only an aborted job (cancel, drain grace ended) ends without a message,
/// and then the node advertises its credits to prove the slot free.
struct InFlight {
    agent: Arc<Agent>,
    key: (resultity_protocol::JobId, u64),
    released: bool,
}

impl InFlight {
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let a = &self.agent;
        let n = a.in_flight.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        lock(&a.jobs).remove(&self.key);
        a.api.update(|s| s.jobs.in_flight = n);
        a.api.metrics.in_flight.set(i64::from(n));
        a.progress.notify_one();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.released {
            self.release();
            self.agent.advertise_credits();
        }
    }
}

impl Agent {
    pub(super) async fn session_loop(self: Arc<Self>) -> Exit {
        let t = self.timing();
        let mut backoff = Backoff::random(t.backoff_base_ms, t.backoff_cap_ms);
        loop {
            if let Some(deadline) = self.drain_deadline()
                && tokio::time::Instant::now() >= deadline
            {
                return self.abandon_drain().await;
            }
            set_connection(
                &self.api,
                ConnectionState::Connecting,
                self.clock.now_ms(),
                None,
            );
            let started = Instant::now();
            let end = self.clone().run_session().await;
            *lock(&self.sender) = None;
            match end {
                SessionEnd::Drained => {
                    self.set_disconnected();
                    return self.finish_drain().await;
                }
                SessionEnd::Lost(reason) | SessionEnd::Unauthorized(reason) => {
                    tracing::warn!(%reason, "network session ended");
                    self.api.metrics.reconnects.inc();
                    self.api.update(|s| s.connection.reconnects += 1);
                    set_connection(
                        &self.api,
                        ConnectionState::Backoff,
                        self.clock.now_ms(),
                        Some(reason),
                    );
                    // A session that stayed up a full ping interval was healthy.
                    if started.elapsed() >= Duration::from_millis(self.timing().ping_interval_ms) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    let drain_deadline = self.drain_deadline();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.progress.notified(), if self.draining.load(Ordering::SeqCst) => {}
                        // The drain's deadline is not moved by a backoff.
                        _ = sleep_until_some(drain_deadline) => {}
                    }
                    if self.draining.load(Ordering::SeqCst) && self.drained() {
                        // Nothing to tell the network that it cannot learn from heartbeats.
                        self.set_disconnected();
                        return self.finish_drain().await;
                    }
                }
            }
            if !self.registered.load(Ordering::SeqCst)
                && let Err(e) = self.register().await
            {
                tracing::warn!(error = %e, "re-registration failed");
            }
        }
    }

    fn set_disconnected(&self) {
        set_connection(
            &self.api,
            ConnectionState::Disconnected,
            self.clock.now_ms(),
            None,
        );
    }

    /// Stops every running job and hands it back to the network (no penalty: the network
    /// assigns it again). On a live session the failures go out at once; without one they
    /// wait for the next session (drain timeout, GPU fault). Returns how many were handed back.
    pub(super) fn hand_back_running(&self, reason: &str) -> usize {
        let handles: Vec<_> = lock(&self.jobs).drain().collect();
        let n = handles.len();
        for ((job_id, lease_epoch), h) in handles {
            h.abort();
            // A result the job stored just before the abort is void: the network fences the
            // lease it hands on, so it need not wait for this one's confirmation.
            if let Err(e) = lock(&self.outbox).confirm(&job_id, lease_epoch) {
                tracing::error!(error = %e, "cannot drop a handed-back job's result");
            }
            self.send(NodeMessage::JobFail {
                job_id,
                lease_epoch,
                code: FailCode::HandedBack,
                reason: reason.to_owned(),
                refusal: None,
            });
            self.api.update(|s| s.jobs.handed_back += 1);
            self.api.metrics.job("handed_back");
        }
        n
    }

    /// Drain grace ran out without a session: hand back what still runs, keep unconfirmed
    /// results on disk.
    async fn abandon_drain(&self) -> Exit {
        let n = self.hand_back_running("drain timeout reached");
        if n > 0 {
            tracing::warn!(jobs = n, "drain timeout reached: running jobs handed back");
        }
        self.set_disconnected();
        if lock(&self.outbox).is_empty() {
            self.finish_drain().await
        } else {
            tracing::warn!(
                pending = self.outbox_len(),
                "drain grace ended with unconfirmed results; they stay in the outbox"
            );
            Exit::DrainIncomplete
        }
    }

    async fn connect(&self) -> Result<(Ws, NodeSession), SessionEnd> {
        let url = ws_url(self.net.base());
        let timeout = Duration::from_millis(self.timing().http_timeout_ms.max(100));
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(limits::MAX_FRAME_BYTES))
            .max_frame_size(Some(limits::MAX_FRAME_BYTES));
        // Nagle off: `job.ack` and `job.result` are small frames written back to back; with
        // Nagle the result waits for the network's delayed ACK of the ack frame (~40 ms on
        // Linux), which resultity-bench measured as +33 ms on every job.
        let (mut ws, _) = tokio::time::timeout(
            timeout,
            tokio_tungstenite::connect_async_with_config(&url, Some(cfg), true),
        )
        .await
        .map_err(|_| SessionEnd::Lost(format!("connecting to {url} timed out")))?
        .map_err(|e| SessionEnd::Lost(format!("connecting to {url}: {e}")))?;
        let keys = self.net.keys();
        let network_id = self.settings.network_id.clone();
        let hello_bytes =
            next_text(&mut ws, Duration::from_millis(limits::AUTH_TIMEOUT_MS)).await?;
        let hello: Hello = keys.open(&hello_bytes, Purpose::WsHello).map_err(|e| {
            self.catch_up_if_untrusted(&e);
            SessionEnd::Lost(format!("hello refused: {e}"))
        })?;
        if hello.network_id != network_id {
            return Err(SessionEnd::Lost(format!(
                "hello from network {}, expected {network_id}",
                hello.network_id
            )));
        }
        let Some(version) =
            limits::negotiate_version(limits::PROTOCOL_VERSIONS, &hello.protocol_versions)
        else {
            return Err(SessionEnd::Lost("no common protocol version".into()));
        };
        let auth = Auth {
            network_id: network_id.clone(),
            node_id: self.key.id().clone(),
            challenge: hello.challenge,
            protocol_version: version,
            ts_ms: self.clock.now_ms(),
            max_concurrency: self.max_concurrency(),
            credits: self.credits(),
            draining: self.draining.load(Ordering::SeqCst),
            outbox_len: self.outbox_len(),
        };
        let frame = envelope::seal(&self.key, Purpose::WsAuth, &auth)
            .map_err(|e| SessionEnd::Lost(format!("cannot sign auth: {e}")))?;
        ws.send(Message::text(frame))
            .await
            .map_err(|e| SessionEnd::Lost(format!("sending auth: {e}")))?;
        let welcome_bytes = next_text(&mut ws, timeout).await?;
        let welcome: Welcome = keys
            .open(&welcome_bytes, Purpose::WsWelcome)
            .map_err(|e| SessionEnd::Lost(format!("welcome refused: {e}")))?;
        check_addressing(
            &welcome.network_id,
            &welcome.node_id,
            &network_id,
            self.key.id(),
        )
        .map_err(|e| SessionEnd::Lost(format!("welcome misaddressed: {e}")))?;
        tracing::info!(session = %welcome.session_id, resumed_jobs = welcome.resumed_jobs, "network session established");
        let session = NodeSession::new(self.key.clone(), network_id, welcome.session_id, keys);
        Ok((ws, session))
    }

    async fn run_session(self: Arc<Self>) -> SessionEnd {
        // Read before connecting, so a key change during the handshake is caught below.
        let mut keys_generation = self.net.keys_generation();
        let mut keys_shrink_at = self.net.keys_now().1;
        let (mut ws, mut session) = match self.connect().await {
            Ok(x) => x,
            Err(e) => return e,
        };
        set_connection(
            &self.api,
            ConnectionState::Connected,
            self.clock.now_ms(),
            None,
        );
        let (tx, mut rx) = mpsc::channel::<NodeMessage>(1024);
        *lock(&self.sender) = Some(tx.clone());
        // Resume: resend every unconfirmed result and undelivered failure.
        let pending: Vec<JobResult> = lock(&self.outbox).pending().cloned().collect();
        let fails: Vec<NodeMessage> = lock(&self.pending_fails).drain(..).collect();
        let mut backlog: Vec<NodeMessage> =
            pending.into_iter().map(NodeMessage::JobResult).collect();
        backlog.extend(fails);
        let mut drain_announced = false;
        // Whether this session already handed the running jobs back at the drain deadline.
        let mut handed_back = false;
        let ping_every = Duration::from_millis(self.timing().ping_interval_ms.max(50));
        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_rx = Instant::now();
        let mut drain_rx = self.api.drain.subscribe();
        // Credits may have changed since `auth` was signed (runtime became ready meanwhile).
        backlog.push(NodeMessage::Credits {
            credits: self.credits(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
        });
        for msg in backlog {
            if let Err(e) = send_msg(&mut ws, &mut session, msg).await {
                return e;
            }
        }
        loop {
            if self.draining.load(Ordering::SeqCst) && !drain_announced {
                drain_announced = true;
                let in_flight = self.in_flight.load(Ordering::SeqCst);
                let expected_ms = self
                    .drain_deadline()
                    .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
                    .unwrap_or(self.settings.drain_grace)
                    .as_millis();
                let msg = NodeMessage::Draining {
                    reason: "node is draining".into(),
                    in_flight,
                    expected_ms: u64::try_from(expected_ms).unwrap_or(u64::MAX),
                };
                if let Err(e) = send_msg(&mut ws, &mut session, msg).await {
                    return e;
                }
                if let Err(e) = send_msg(
                    &mut ws,
                    &mut session,
                    NodeMessage::Credits {
                        credits: 0,
                        in_flight,
                    },
                )
                .await
                {
                    return e;
                }
            }
            if drain_announced && self.drained() {
                // Hand-backs queued for this session go out before `drained`.
                while let Ok(msg) = rx.try_recv() {
                    if let Err(e) = send_msg(&mut ws, &mut session, msg).await {
                        return e;
                    }
                }
                let _ = send_msg(&mut ws, &mut session, NodeMessage::Drained {}).await;
                let _ = ws
                    .close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "drained".into(),
                    }))
                    .await;
                return SessionEnd::Drained;
            }
            // At the deadline the running jobs go back to the network; then the last results
            // get a short bound to be confirmed before the drain gives up on them.
            let drain_timer =
                sleep_until_some(self.drain_deadline().filter(|_| drain_announced).map(|d| {
                    if handed_back {
                        d + super::DRAIN_HAND_BACK_BOUND
                    } else {
                        d
                    }
                }));
            // Biased, socket first: frames that arrived during a stall are read before the
            // ping timer may call the network dead.
            tokio::select! {
                biased;
                frame = ws.next() => {
                    last_rx = Instant::now();
                    match frame {
                        None => return SessionEnd::Lost("network closed the connection".into()),
                        Some(Err(e)) => return SessionEnd::Lost(format!("receive: {e}")),
                        Some(Ok(Message::Text(t))) => {
                            // A config applied meanwhile may have rotated the keys, or a
                            // retiring key's window may have ended.
                            if self.net.keys_generation() != keys_generation
                                || keys_shrink_at.is_some_and(|t| self.clock.now_ms() >= t)
                            {
                                keys_generation = self.net.keys_generation();
                                let (keys, shrink_at) = self.net.keys_now();
                                keys_shrink_at = shrink_at;
                                session.set_network_keys(keys);
                            }
                            match session.open(t.as_bytes()) {
                                Ok(body) => self.clone().handle(body.msg),
                                Err(e) => {
                                    self.api.metrics.messages_rejected.inc();
                                    self.catch_up_if_untrusted(&e);
                                    tracing::warn!(error = %e, "network message refused");
                                }
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(close::NORMAL);
                            let reason = format!("network closed the session ({code})");
                            return if code == close::AUTH_FAILED {
                                self.registered.store(false, Ordering::SeqCst);
                                self.api.update(|s| s.registered = false);
                                SessionEnd::Unauthorized(reason)
                            } else {
                                SessionEnd::Lost(reason)
                            };
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let _ = ws.close(Some(CloseFrame { code: CloseCode::Protocol, reason: "binary frames are not part of the protocol".into() })).await;
                            return SessionEnd::Lost("network sent a binary frame".into());
                        }
                        Some(Ok(_)) => {} // ping/pong: liveness only
                    }
                }
                Some(msg) = rx.recv() => {
                    if let Err(e) = send_msg(&mut ws, &mut session, msg).await {
                        return e;
                    }
                }
                _ = ping.tick() => {
                    if last_rx.elapsed() > 2 * ping_every {
                        let _ = ws.close(Some(CloseFrame { code: CloseCode::from(close::DEAD_PEER), reason: "no traffic for two ping intervals".into() })).await;
                        return SessionEnd::Lost("network silent for two ping intervals".into());
                    }
                    if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                        return SessionEnd::Lost(format!("ping: {e}"));
                    }
                }
                _ = drain_rx.changed() => {}
                _ = self.progress.notified() => {}
                _ = drain_timer => {
                    if handed_back {
                        return SessionEnd::Lost("drain timeout reached with unconfirmed results".into());
                    }
                    handed_back = true;
                    let n = self.hand_back_running("drain timeout reached");
                    tracing::warn!(jobs = n, "drain timeout reached: running jobs handed back");
                }
            }
        }
    }

    /// Acts on one verified network message.
    fn handle(self: Arc<Self>, msg: NetworkMessage) {
        match msg {
            NetworkMessage::JobAssign(a) => self.assign(a),
            NetworkMessage::ResultConfirm {
                job_id,
                lease_epoch,
            } => {
                let confirmed = lock(&self.outbox).confirm(&job_id, lease_epoch);
                match confirmed {
                    Ok(_) => {
                        let len = self.outbox_len();
                        self.api.update(|s| s.jobs.outbox = len);
                        self.api.metrics.outbox.set(i64::from(len));
                        self.progress.notify_one();
                    }
                    Err(e) => tracing::error!(error = %e, "cannot delete a confirmed result"),
                }
            }
            NetworkMessage::JobCancel {
                job_id,
                lease_epoch,
                reason,
            } => {
                if let Some(h) = lock(&self.jobs).remove(&(job_id.clone(), lease_epoch)) {
                    tracing::info!(job = %job_id, %reason, "job cancelled by the network");
                    h.abort();
                }
                // The network wants this lease no more: a result for it need not be resent.
                if let Err(e) = lock(&self.outbox).confirm(&job_id, lease_epoch) {
                    tracing::error!(error = %e, "cannot drop a cancelled job's result");
                }
                self.progress.notify_one();
            }
            NetworkMessage::DrainAck {} => {
                tracing::info!("network stopped dispatching to this node")
            }
            NetworkMessage::ConfigAvailable(p) => {
                if self.applied_pointer().map(|a| a.digest).as_ref() != Some(&p.digest)
                    && self.should_fetch_config(&p.digest)
                {
                    self.config_changed.notify_one();
                }
            }
            NetworkMessage::Error { code, message, seq } => {
                tracing::warn!(%code, %message, seq, "network refused a message");
            }
        }
    }

    fn fail(&self, a: &JobAssignment, code: FailCode, reason: String) {
        self.api.update(|s| s.jobs.rejected += 1);
        self.api.metrics.job("rejected");
        self.send(NodeMessage::JobFail {
            job_id: a.job_id.clone(),
            lease_epoch: a.lease_epoch,
            code,
            reason,
            refusal: None,
        });
        // The network frees no slot for such a refusal; this says how many are free.
        if code.withholds_slot() {
            self.advertise_credits();
        }
    }

    fn assign(self: Arc<Self>, a: JobAssignment) {
        let key = (a.job_id.clone(), a.lease_epoch);
        // Duplicates from a resend: ack a running job again, resend a finished one.
        if lock(&self.jobs).contains_key(&key) {
            self.send(NodeMessage::JobAck {
                job_id: a.job_id,
                lease_epoch: a.lease_epoch,
            });
            return;
        }
        if let Some(r) = lock(&self.outbox).get(&a.job_id, a.lease_epoch).cloned() {
            self.send(NodeMessage::JobResult(r));
            return;
        }
        if self.draining.load(Ordering::SeqCst) {
            return self.fail(&a, FailCode::HandedBack, "node is draining".into());
        }
        if !self.gpu_healthy.load(Ordering::SeqCst) {
            return self.fail(
                &a,
                FailCode::HandedBack,
                "GPU fault: this node takes no jobs".into(),
            );
        }
        if !self.outbox_writable.load(Ordering::SeqCst) {
            // Sent before the network saw zero credits: its result could not be stored.
            return self.fail(
                &a,
                FailCode::HandedBack,
                "outbox cannot be written: this node takes no jobs".into(),
            );
        }
        if a.deadline_ms <= self.clock.now_ms() {
            return self.fail(
                &a,
                FailCode::DeadlineExceeded,
                "deadline passed before the job started".into(),
            );
        }
        let applied = self.applied_pointer().map(|p| p.digest);
        if applied.as_ref() != Some(&a.config_digest) {
            // The network dictates the config a job runs under; a node still syncing hands the
            // job back (no penalty) and fetches the config now, unless it refused that one.
            if self.should_fetch_config(&a.config_digest) {
                self.config_changed.notify_one();
            }
            let running = applied.map_or_else(|| "no config".to_owned(), |d| d.to_string());
            return self.fail(
                &a,
                FailCode::ConfigMismatch,
                format!(
                    "job must run under config {}; this node runs {running}",
                    a.config_digest
                ),
            );
        }
        let inactive = {
            let m = self.models.read().unwrap_or_else(|p| p.into_inner());
            (!m.is_active(&a.model)).then(|| m.inactive_reason(&a.model))
        };
        if let Some(reason) = inactive {
            return self.fail(&a, FailCode::ModelInactive, reason);
        }
        let prev = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slots = self.max_concurrency();
        if prev >= slots {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return self.fail(
                &a,
                FailCode::OverCapacity,
                format!("all {slots} slots busy"),
            );
        }
        self.send(NodeMessage::JobAck {
            job_id: a.job_id.clone(),
            lease_epoch: a.lease_epoch,
        });
        let n = prev + 1;
        self.api.update(|s| s.jobs.in_flight = n);
        self.api.metrics.in_flight.set(i64::from(n));
        let agent = self.clone();
        let mut jobs = lock(&self.jobs);
        let task = tokio::spawn(async move {
            let mut slot = InFlight {
                agent: agent.clone(),
                key: (a.job_id.clone(), a.lease_epoch),
                released: false,
            };
            let started = Instant::now();
            let msg = agent.run_job(a).await;
            agent.api.metrics.job_latency(&msg, started.elapsed());
            slot.release();
            // Waits for room rather than dropping the message when the session's queue is
            // full (a streamed job's chunks may just have filled it); without a session,
            // `send` keeps a failure for the next one (results are in the outbox).
            // The network frees a credit for every job that ends, except one given back
            // because the node cannot take it: after those, and whenever the node takes no
            // jobs (or has no free slot), it says how many are free, after the job's message.
            let withheld =
                matches!(&msg, NodeMessage::JobFail { code, .. } if code.withholds_slot());
            if !agent.send_wait(msg.clone()).await {
                agent.send(msg);
            }
            if withheld || agent.credits() == 0 {
                agent.advertise_credits();
            }
        });
        jobs.insert(key, task.abort_handle());
    }

    /// Streams one job: runtime events are coalesced into `job.chunk` frames (whatever is
    /// ready when the session can take the next frame) and digested in order. Returns the
    /// usage the stream reported and the summary the result binds.
    async fn stream_job(
        &self,
        a: &JobAssignment,
        left: Duration,
    ) -> Result<(Usage, StreamSummary), RuntimeError> {
        let (tx, mut rx) = mpsc::channel::<String>(STREAM_BUFFER_EVENTS);
        let runtime = self
            .runtime
            .infer_stream(a.kind, &a.model.id, &a.request, left, tx);
        let forward = async {
            let mut digest = StreamDigest::new();
            let mut index = 0u32;
            let mut carry: Option<String> = None;
            loop {
                let first = match carry.take() {
                    Some(e) => e,
                    None => match rx.recv().await {
                        Some(e) => e,
                        None => break,
                    },
                };
                let mut size = first.len();
                let mut events = vec![first];
                while events.len() < limits::MAX_EVENTS_PER_CHUNK {
                    match rx.try_recv() {
                        Ok(e) if size + e.len() > CHUNK_FRAME_BUDGET => {
                            carry = Some(e);
                            break;
                        }
                        Ok(e) => {
                            size += e.len();
                            events.push(e);
                        }
                        Err(_) => break,
                    }
                }
                for e in &events {
                    digest.push(e);
                }
                if digest.bytes() > u64::from(a.max_output_bytes) {
                    return Err(RuntimeError::TooLarge {
                        size: usize::try_from(digest.bytes()).unwrap_or(usize::MAX),
                        max: a.max_output_bytes as usize,
                    });
                }
                let chunk = NodeMessage::JobChunk {
                    job_id: a.job_id.clone(),
                    lease_epoch: a.lease_epoch,
                    index,
                    events,
                };
                if !self.send_wait(chunk).await {
                    return Err(RuntimeError::StreamAbandoned);
                }
                index += 1;
            }
            Ok(digest)
        };
        let (usage, digest) = tokio::join!(runtime, forward);
        // The forwarder's error is the cause when both failed: the runtime only saw its
        // reader stop.
        let digest = digest?;
        Ok((usage?, digest.summary()))
    }

    /// Runs one job and returns the message that reports it (result or failure).
    async fn run_job(&self, a: JobAssignment) -> NodeMessage {
        let started = Instant::now();
        let left = Duration::from_millis(a.deadline_ms.saturating_sub(self.clock.now_ms()));
        let out = if a.stream {
            self.stream_job(&a, left).await.map(|(usage, summary)| {
                (
                    crate::runtime::RuntimeOutput {
                        body: String::new(),
                        usage,
                    },
                    Some(summary),
                )
            })
        } else {
            self.runtime
                .infer(a.kind, &a.model.id, &a.request, left)
                .await
                .map(|o| (o, None))
        };
        let (code, reason, refusal) = match out {
            Ok((o, _)) if o.body.len() > a.max_output_bytes as usize => (
                FailCode::OutputTooLarge,
                format!(
                    "output of {} bytes exceeds the job's limit of {}",
                    o.body.len(),
                    a.max_output_bytes
                ),
                None,
            ),
            Ok((o, stream)) => {
                let result = JobResult {
                    job_id: a.job_id.clone(),
                    lease_epoch: a.lease_epoch,
                    // Echo what the assignment dictated (checked against the applied config
                    // before the job started): the network refuses any other digest.
                    config_digest: Some(a.config_digest.clone()),
                    model: a.model.clone(),
                    output_digest: JobResult::digest_output(&o.body),
                    output: o.body,
                    usage: o.usage,
                    runtime_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    completed_at_ms: self.clock.now_ms(),
                    stream,
                };
                // Durable before sent: a crash after this point resends it on restart.
                match self.persist_result(result.clone()).await {
                    Ok(()) => {
                        self.api.update(|s| s.jobs.completed += 1);
                        self.api.metrics.job("completed");
                        return NodeMessage::JobResult(result);
                    }
                    Err(e) => (
                        FailCode::OutboxUnavailable,
                        format!("cannot persist the result: {e}"),
                        None,
                    ),
                }
            }
            Err(e) => {
                let code = match &e {
                    RuntimeError::Rejected { .. }
                    | RuntimeError::Unsupported { .. }
                    | RuntimeError::StreamUnsupported { .. } => FailCode::RuntimeRejected,
                    RuntimeError::TooLarge { .. } => FailCode::OutputTooLarge,
                    RuntimeError::Timeout(_) if a.deadline_ms <= self.clock.now_ms() => {
                        FailCode::DeadlineExceeded
                    }
                    RuntimeError::Unavailable(_) => FailCode::RuntimeUnavailable,
                    // The session ended under the stream: the network decides what its caller
                    // sees (nothing sent yet: another node runs it).
                    RuntimeError::StreamAbandoned => FailCode::HandedBack,
                    RuntimeError::Timeout(_) | RuntimeError::Failed(_) => FailCode::RuntimeError,
                };
                let refusal = match &e {
                    // Without an OpenAI error object, the runtime's message is still the
                    // caller's answer (the network never shows its own job text).
                    RuntimeError::Rejected {
                        refusal,
                        status,
                        reason,
                    } => Some(refusal.as_deref().cloned().unwrap_or(RuntimeRefusal {
                        status: *status,
                        message: reason.clone(),
                        kind: None,
                        param: None,
                        code: None,
                    })),
                    RuntimeError::Unsupported { .. } => Some(RuntimeRefusal {
                        status: 400,
                        message: e.to_string(),
                        kind: Some("invalid_request_error".into()),
                        param: Some("model".into()),
                        code: None,
                    }),
                    RuntimeError::StreamUnsupported { .. } => Some(RuntimeRefusal {
                        status: 400,
                        message: e.to_string(),
                        kind: Some("invalid_request_error".into()),
                        param: Some("stream".into()),
                        code: Some(serde_json::Value::String("stream_unsupported".into())),
                    }),
                    _ => None,
                };
                (code, e.to_string(), refusal)
            }
        };
        if matches!(code, FailCode::HandedBack | FailCode::RuntimeUnavailable) {
            self.api.update(|s| s.jobs.handed_back += 1);
            self.api.metrics.job("handed_back");
        } else {
            self.api.update(|s| s.jobs.failed += 1);
            self.api.metrics.job("failed");
        }
        NodeMessage::JobFail {
            job_id: a.job_id,
            lease_epoch: a.lease_epoch,
            code,
            reason,
            refusal,
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_text(ws: &mut Ws, timeout: Duration) -> Result<Vec<u8>, SessionEnd> {
    loop {
        let frame = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| SessionEnd::Lost("handshake timed out".into()))?;
        match frame {
            Some(Ok(Message::Text(t))) => return Ok(t.as_bytes().to_vec()),
            Some(Ok(Message::Close(f))) => {
                let code = f
                    .as_ref()
                    .map(|f| u16::from(f.code))
                    .unwrap_or(close::NORMAL);
                let reason = format!(
                    "network closed the handshake ({code}: {})",
                    f.map(|f| f.reason.to_string()).unwrap_or_default()
                );
                return Err(if code == close::AUTH_FAILED {
                    SessionEnd::Unauthorized(reason)
                } else {
                    SessionEnd::Lost(reason)
                });
            }
            Some(Ok(Message::Binary(_))) => {
                return Err(SessionEnd::Lost("binary frame in handshake".into()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(SessionEnd::Lost(format!("handshake: {e}"))),
            None => {
                return Err(SessionEnd::Lost(
                    "connection closed during handshake".into(),
                ));
            }
        }
    }
}

async fn send_msg(
    ws: &mut Ws,
    session: &mut NodeSession,
    msg: NodeMessage,
) -> Result<(), SessionEnd> {
    let frame = session
        .seal(msg)
        .map_err(|e| SessionEnd::Lost(format!("cannot sign a message: {e}")))?;
    ws.send(Message::text(frame))
        .await
        .map_err(|e| SessionEnd::Lost(format!("send: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_url_from_base() {
        assert_eq!(
            ws_url("http://127.0.0.1:9000"),
            "ws://127.0.0.1:9000/v1/node/session"
        );
        assert_eq!(
            ws_url("https://io.example"),
            "wss://io.example/v1/node/session"
        );
    }
}
