//! Session liveness after a stall of the IO service shorter than the silence limit: frames the
//! node sent meanwhile are already waiting when the service resumes, and must count before the
//! ping timer decides. The service runs on this test's single-threaded runtime, which the test
//! blocks to stall it; the node runs on its own thread and keeps sending throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use resultity_protocol::messages::ws::NetworkMessage;
use resultity_protocol::{ErrorCode, codes::close};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

const PING_MS: u64 = 200;
/// 2.5 ping intervals: over the silence limit measured from the last frame *read*, under it
/// measured from the last frame *received*.
const STALL: Duration = Duration::from_millis(PING_MS * 5 / 2);
/// With the old unbiased select the timer won about half of the races after a stall; the
/// chance of passing all rounds by luck is 2⁻¹².
const ROUNDS: usize = 12;

#[derive(Debug, PartialEq)]
enum Probe {
    /// The service answered a frame sent after the stall: the session is alive.
    Answered,
    /// The service closed the session with this code.
    Closed(Option<u16>),
}

/// The node's side on its own runtime: a frame every 50 ms, and on request a non-envelope
/// frame the service must answer with `error{malformed}` on the same session.
fn spawn_node(
    node: TestNode,
) -> (
    oneshot::Receiver<()>,
    mpsc::UnboundedSender<()>,
    mpsc::UnboundedReceiver<Probe>,
) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<()>();
    let (result_tx, result_rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut ws = WsClient::connect(&node, 1).await;
            let _ = ready_tx.send(());
            let mut every = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        if ws.ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                            let _ = result_tx.send(Probe::Closed(None));
                            return;
                        }
                    }
                    p = probe_rx.recv() => {
                        if p.is_none() {
                            return;
                        }
                        if ws.ws.send(Message::text("probe: not an envelope")).await.is_err() {
                            let _ = result_tx.send(Probe::Closed(None));
                            return;
                        }
                        let outcome = loop {
                            match ws.recv().await {
                                Ok(NetworkMessage::Error { code: ErrorCode::Malformed, .. }) => break Probe::Answered,
                                Ok(_) => continue,
                                Err(code) => break Probe::Closed(code),
                            }
                        };
                        let closed = outcome != Probe::Answered;
                        let _ = result_tx.send(outcome);
                        if closed {
                            return;
                        }
                    }
                }
            }
        });
    });
    (ready_rx, probe_tx, result_rx)
}

#[tokio::test]
async fn frames_waiting_after_a_stall_below_the_limit_keep_the_session() {
    let io = start(|s| {
        s.network_config.timing.ping_interval_ms = PING_MS;
        // The stalls must not age heartbeats into an exclusion.
        s.network_config.timing.heartbeat_interval_ms = 10_000;
    })
    .await;
    let node = TestNode::new(&io, 1);
    node.register().await;
    node.heartbeat().await;
    let (ready, probe, mut result) = spawn_node(node);
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("node session within 10 s")
        .unwrap();
    for round in 0..ROUNDS {
        // Stall the whole service (GC pause, SIGSTOP, overload) while the node keeps sending.
        std::thread::sleep(STALL);
        probe.send(()).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), result.recv())
            .await
            .expect("probe answered within 10 s")
            .unwrap_or(Probe::Closed(None));
        assert_eq!(
            outcome,
            Probe::Answered,
            "round {round}: a healthy session was closed after a {STALL:?} stall (dead peer is {})",
            close::DEAD_PEER
        );
    }
}
