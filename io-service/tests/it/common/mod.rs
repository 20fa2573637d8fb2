//! Test support: a network fixture and a test node built only from the protocol crate
//! (NodeKeypair, NodeSession, envelopes) plus reqwest and tokio-tungstenite, with a fake
//! runtime that answers jobs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use resultity_io::{IoService, IoServiceHandle, Settings};
use resultity_protocol::clock::{Clock, SystemClock};
use resultity_protocol::config::{ApprovedModel, NetworkConfig};
use resultity_protocol::envelope;
use resultity_protocol::messages::http::*;
use resultity_protocol::messages::ws::*;
use resultity_protocol::messages::*;
use resultity_protocol::replay::new_nonce;
use resultity_protocol::session::{NetworkKeys, NodeSession};
use resultity_protocol::{JobId, NetworkId, NetworkKeypair, NodeKeypair, Purpose};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod fixture;
// Each test crate uses its own part of the fixture.
#[allow(unused_imports)]
pub use fixture::{MODEL, REVISION, model, report};

pub fn now_ms() -> u64 {
    SystemClock.now_ms()
}

pub fn payload() -> NetworkConfig {
    NetworkConfig {
        environment: Environment::Testnet,
        models: vec![ApprovedModel {
            model: model(),
            runtimes: vec![RuntimeKind::Vllm],
            min_gpu_memory_mib: 16_000,
            subclouds: vec![],
            known_answer: None,
        }],
        runtime_images: Default::default(),
        sidecar_image: None,
        timing: Timing {
            ack_timeout_ms: 300,
            ..Timing::default()
        },
        subclouds: vec![],
        network_keys: vec![],
        retiring_keys: vec![],
        revoked_node_keys: vec![],
        penalties: None,
    }
}

/// Settings with short timeouts so tests run in well under a second each.
pub fn settings() -> Settings {
    let key = NetworkKeypair::generate().unwrap();
    let mut s = Settings::new(NetworkId::parse("testnet-1").unwrap(), key, payload());
    s.scheduler.tick_ms = 20;
    s.scheduler.attempt_timeout_ms = 2_000;
    s.scheduler.request_timeout_ms = 5_000;
    s.limits.node_http_burst = 1000.0;
    s.limits.node_http_rate_per_s = 1000.0;
    s
}

pub async fn start(f: impl FnOnce(&mut Settings)) -> IoServiceHandle {
    let mut s = settings();
    f(&mut s);
    IoService::start(s).await.unwrap()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `cond` every 10 ms for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A node's HTTP side.
#[derive(Clone)]
pub struct TestNode {
    pub key: NodeKeypair,
    pub base: String,
    pub network_id: NetworkId,
    pub network_keys: NetworkKeys,
    pub http: reqwest::Client,
    pub max_concurrency: u32,
}

impl TestNode {
    pub fn new(io: &IoServiceHandle, max_concurrency: u32) -> Self {
        let st = io.state();
        Self {
            key: NodeKeypair::generate().unwrap(),
            base: io.base_url(),
            network_id: st.settings.network_id.clone(),
            network_keys: NetworkKeys::new(&[st.settings.network_key.id().clone()]).unwrap(),
            http: http(),
            max_concurrency,
        }
    }

    pub fn hdr(&self) -> RequestHeader {
        RequestHeader {
            network_id: self.network_id.clone(),
            node_id: self.key.id().clone(),
            ts_ms: now_ms(),
            nonce: new_nonce().unwrap(),
        }
    }

    /// POSTs raw bytes; returns status and body text.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    pub fn seal<T: serde::Serialize>(&self, purpose: Purpose, body: &T) -> String {
        envelope::seal(&self.key, purpose, body).unwrap()
    }

    pub async fn challenge(&self) -> ChallengeResponse {
        let req = ChallengeRequest {
            network_id: self.network_id.clone(),
            node_id: self.key.id().clone(),
        };
        let (status, text) = self
            .post_raw(paths::CHALLENGE, serde_json::to_string(&req).unwrap())
            .await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn register_request(&self, challenge: String) -> RegisterRequest {
        RegisterRequest {
            hdr: self.hdr(),
            challenge,
            protocol_versions: vec![1],
            software: Software::default(),
            capabilities: Capabilities {
                runtime: RuntimeKind::Vllm,
                max_concurrency: self.max_concurrency,
                participation: Participation::Both,
                subclouds: vec![],
                gpu: report(1).gpu,
                models_installed: vec![model()],
            },
        }
    }

    pub async fn register(&self) -> RegisterResponse {
        let ch = self.challenge().await;
        let env = self.seal(Purpose::HttpRegister, &self.register_request(ch.challenge));
        let (status, text) = self.post_raw(paths::REGISTER, env).await;
        assert_eq!(status, 200, "{text}");
        open_network_answer(
            text.as_bytes(),
            &self.network_keys,
            &self.network_id,
            self.key.id(),
        )
        .unwrap()
    }

    pub fn heartbeat_envelope(&self, report: NodeReport) -> String {
        self.seal(
            Purpose::HttpHeartbeat,
            &HeartbeatRequest {
                hdr: self.hdr(),
                report,
            },
        )
    }

    pub async fn heartbeat(&self) -> HeartbeatResponse {
        let env = self.heartbeat_envelope(report(self.max_concurrency));
        let (status, text) = self.post_raw(paths::HEARTBEAT, env).await;
        assert_eq!(status, 200, "{text}");
        open_network_answer(
            text.as_bytes(),
            &self.network_keys,
            &self.network_id,
            self.key.id(),
        )
        .unwrap()
    }

    /// Registered, heartbeat sent, session open.
    pub async fn join(&self) -> WsClient {
        self.register().await;
        self.heartbeat().await;
        WsClient::connect(self, self.max_concurrency).await
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An authenticated WebSocket session of a test node.
pub struct WsClient {
    pub ws: Ws,
    pub session: NodeSession,
    pub welcome: Welcome,
    pub node_id: resultity_protocol::NodeId,
}

impl WsClient {
    pub async fn connect(node: &TestNode, credits: u32) -> Self {
        let url = format!(
            "{}{}",
            node.base.replace("http://", "ws://"),
            paths::SESSION
        );
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .unwrap()
        .unwrap();
        let hello: Hello = node
            .network_keys
            .open(
                next_text(&mut ws).await.unwrap().as_bytes(),
                Purpose::WsHello,
            )
            .unwrap();
        let auth = Auth {
            network_id: node.network_id.clone(),
            node_id: node.key.id().clone(),
            challenge: hello.challenge,
            protocol_version: 1,
            ts_ms: now_ms(),
            max_concurrency: node.max_concurrency,
            credits,
            draining: false,
            outbox_len: 0,
        };
        ws.send(Message::Text(node.seal(Purpose::WsAuth, &auth).into()))
            .await
            .unwrap();
        let welcome: Welcome = node
            .network_keys
            .open(
                next_text(&mut ws).await.unwrap().as_bytes(),
                Purpose::WsWelcome,
            )
            .unwrap();
        let session = NodeSession::new(
            node.key.clone(),
            node.network_id.clone(),
            welcome.session_id.clone(),
            node.network_keys.clone(),
        );
        Self {
            ws,
            session,
            welcome,
            node_id: node.key.id().clone(),
        }
    }

    /// Seals and sends; returns the frame text (for replay tests).
    pub async fn send(&mut self, msg: NodeMessage) -> String {
        let text = self.session.seal(msg).unwrap();
        self.send_raw(text.clone()).await;
        text
    }

    pub async fn send_raw(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// Next network message (verified through the NodeSession); `Err(close code)` when the
    /// network closed the session.
    pub async fn recv(&mut self) -> Result<NetworkMessage, Option<u16>> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("no frame within 5 s");
            match frame {
                Some(Ok(Message::Text(t))) => {
                    return Ok(self.session.open(t.as_bytes()).unwrap().msg);
                }
                Some(Ok(Message::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                _ => return Err(None),
            }
        }
    }

    /// Next message that is not `config.available` or `credits`-like noise.
    pub async fn recv_job(&mut self) -> JobAssignment {
        loop {
            match self.recv().await {
                Ok(NetworkMessage::JobAssign(a)) => return a,
                Ok(_) => continue,
                Err(c) => panic!("session closed ({c:?}) while waiting for a job"),
            }
        }
    }

    pub async fn recv_error(&mut self) -> (resultity_protocol::ErrorCode, String) {
        loop {
            match self.recv().await {
                Ok(NetworkMessage::Error { code, message, .. }) => return (code, message),
                Ok(_) => continue,
                Err(c) => panic!("session closed ({c:?}) while waiting for an error"),
            }
        }
    }
}

async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Text(t)) => return Some(t.as_str().to_owned()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// The runtime's answer for a job: names the node so tests can see who served it.
pub fn answer_for(node: &resultity_protocol::NodeId, job: &JobAssignment) -> String {
    serde_json::json!({
        "id": format!("cmpl-{}", job.job_id.as_str()),
        "object": "chat.completion",
        "model": job.model.id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("hello from {}", node.as_str())}, "finish_reason": "stop"}],
    })
    .to_string()
}

pub fn result_for(node: &resultity_protocol::NodeId, job: &JobAssignment) -> JobResult {
    let output = answer_for(node, job);
    JobResult {
        job_id: job.job_id.clone(),
        lease_epoch: job.lease_epoch,
        config_digest: Some(job.config_digest.clone()),
        model: job.model.clone(),
        output_digest: JobResult::digest_output(&output),
        output,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        },
        runtime_ms: 1,
        completed_at_ms: now_ms(),
        stream: None,
    }
}

/// How a fake runtime behaves.
#[derive(Debug, Clone, Copy)]
pub struct Behavior {
    /// Never ack or answer (a node that stopped answering mid-job).
    pub silent: bool,
    pub latency_ms: u64,
}

#[derive(Debug, Default)]
pub struct RuntimeStats {
    pub assigned: Vec<JobId>,
    pub completed: u64,
    pub in_flight: u32,
    pub max_in_flight: u32,
    pub confirmed: u64,
    pub errors: Vec<String>,
}

/// A node session answering jobs in the background.
pub struct RunningNode {
    pub node_id: resultity_protocol::NodeId,
    pub stats: Arc<Mutex<RuntimeStats>>,
    pub silent: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    pub fn assigned(&self) -> usize {
        self.stats.lock().unwrap().assigned.len()
    }
    pub fn stop(self) {
        self.task.abort();
    }
}

pub fn spawn_runtime(mut client: WsClient, behavior: Behavior) -> RunningNode {
    let stats = Arc::new(Mutex::new(RuntimeStats::default()));
    let (silent_tx, silent_rx) = watch::channel(behavior.silent);
    let node_id = client.node_id.clone();
    let st = stats.clone();
    let task = tokio::spawn(async move {
        let (done_tx, mut done_rx) = mpsc::channel::<JobAssignment>(1024);
        let mut running: HashMap<JobId, ()> = HashMap::new();
        loop {
            tokio::select! {
                frame = client.ws.next() => {
                    let Some(Ok(frame)) = frame else { return };
                    let Message::Text(t) = frame else { continue };
                    let msg = match client.session.open(t.as_bytes()) {
                        Ok(m) => m.msg,
                        Err(e) => { st.lock().unwrap().errors.push(e.to_string()); continue; }
                    };
                    match msg {
                        NetworkMessage::JobAssign(job) => {
                            st.lock().unwrap().assigned.push(job.job_id.clone());
                            if *silent_rx.borrow() { continue; }
                            {
                                let mut s = st.lock().unwrap();
                                s.in_flight += 1;
                                s.max_in_flight = s.max_in_flight.max(s.in_flight);
                            }
                            running.insert(job.job_id.clone(), ());
                            client.send(NodeMessage::JobAck { job_id: job.job_id.clone(), lease_epoch: job.lease_epoch }).await;
                            let tx = done_tx.clone();
                            let latency = behavior.latency_ms;
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(latency)).await;
                                let _ = tx.send(job).await;
                            });
                        }
                        NetworkMessage::ResultConfirm { .. } => st.lock().unwrap().confirmed += 1,
                        NetworkMessage::Error { code, message, .. } => st.lock().unwrap().errors.push(format!("{code}: {message}")),
                        _ => {}
                    }
                }
                Some(job) = done_rx.recv() => {
                    if running.remove(&job.job_id).is_none() { continue; }
                    {
                        let mut s = st.lock().unwrap();
                        s.in_flight -= 1;
                        s.completed += 1;
                    }
                    client.send(NodeMessage::JobResult(result_for(&client.node_id, &job))).await;
                }
            }
        }
    });
    RunningNode {
        node_id,
        stats,
        silent: silent_tx,
        task,
    }
}

/// Chat completion request body.
pub fn chat_body() -> serde_json::Value {
    serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
}

pub async fn nodes_json(io: &IoServiceHandle) -> serde_json::Value {
    http()
        .get(format!("{}/v1/nodes", io.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn node_json(io: &IoServiceHandle, id: &resultity_protocol::NodeId) -> serde_json::Value {
    let all = nodes_json(io).await;
    all["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == id.as_str())
        .cloned()
        .unwrap()
}

/// Starts a caller's chat completion request in the background.
pub fn call(io: &IoServiceHandle) -> tokio::task::JoinHandle<reqwest::Response> {
    let base = io.base_url();
    tokio::spawn(async move {
        http()
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body())
            .send()
            .await
            .unwrap()
    })
}
