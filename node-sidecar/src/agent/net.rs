//! HTTP calls to the network (protocol §6): every request signed with the node key and a
//! fresh timestamp/nonce, every signed answer verified with the trusted network keys before it
//! is believed, every call bounded by the network-dictated timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use resultity_protocol::clock::Clock;
use resultity_protocol::config::{ConfigChain, ConfigTrust, SignedConfig};
use resultity_protocol::envelope;
use resultity_protocol::messages::http::{
    ChallengeRequest, ChallengeResponse, ErrorResponse, NetworkAnswer, NodeRequest, RequestHeader,
    open_network_answer, paths,
};
use resultity_protocol::replay::new_nonce;
use resultity_protocol::session::NetworkKeys;
use resultity_protocol::{ErrorCode, NetworkId, NodeKeypair, ProtocolError, limits};

/// Why a call to the network did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("network call to {url} timed out")]
    Timeout { url: String },
    /// The network answered with an error code.
    #[error("network refused {url}: {code} ({message})")]
    Refused {
        url: String,
        status: u16,
        code: ErrorCode,
        message: String,
        server_time_ms: Option<u64>,
    },
    /// The answer did not verify or parse: never acted upon.
    #[error("network answer from {url} rejected: {source}")]
    BadAnswer { url: String, source: ProtocolError },
    #[error("network answer from {url} is {size} bytes, over {max}")]
    TooLarge {
        url: String,
        size: usize,
        max: usize,
    },
    #[error("cannot build a request: {0}")]
    Local(String),
}

impl NetError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The answer is signed by a key this node does not (or no longer) trust: the network
    /// has rotated its keys past this node's config, which a catch-up sync repairs.
    pub fn is_untrusted_signer(&self) -> bool {
        matches!(
            self,
            Self::BadAnswer {
                source: ProtocolError::UnknownSigner { .. } | ProtocolError::KeyRetired { .. },
                ..
            }
        )
    }
}

/// The node's HTTP client for one network.
#[derive(Debug)]
pub struct NetClient {
    http: reqwest::Client,
    base: String,
    network_id: NetworkId,
    key: NodeKeypair,
    /// The trust state whose keys verify network answers and session frames.
    trust: RwLock<ConfigTrust>,
    /// Bumped whenever `trust` changes, so open sessions know to refresh their keys.
    generation: AtomicU64,
    clock: Arc<dyn Clock>,
    timeout: RwLock<Duration>,
}

impl NetClient {
    pub fn new(
        base: &str,
        network_id: NetworkId,
        key: NodeKeypair,
        trust: ConfigTrust,
        clock: Arc<dyn Clock>,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| NetError::Local(e.to_string()))?;
        NetworkKeys::new(&trust.keys_at(clock.now_ms()))
            .map_err(|e| NetError::Local(format!("network keys: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            network_id,
            key,
            trust: RwLock::new(trust),
            generation: AtomicU64::new(0),
            clock,
            timeout: RwLock::new(timeout),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Trust the keys of a newly applied config (a rotation, or the confirmation of one).
    pub fn set_trust(&self, trust: &ConfigTrust) {
        if let Ok(mut t) = self.trust.write() {
            *t = trust.clone();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Changes whenever the trusted keys change by a config.
    pub fn keys_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The keys trusted now: the active set and retiring keys within their window. Also
    /// returns when that set next shrinks (a retiring key's window ends).
    pub fn keys_now(&self) -> (NetworkKeys, Option<u64>) {
        let now = self.clock.now_ms();
        let Ok(trust) = self.trust.read() else {
            return (NetworkKeys::default(), None);
        };
        // A key id is a valid, non-weak point by construction (its parser checks), so
        // this cannot fail for a verified config.
        (
            NetworkKeys::new(&trust.keys_at(now)).unwrap_or_default(),
            trust.next_retirement(now),
        )
    }

    pub fn keys(&self) -> NetworkKeys {
        self.keys_now().0
    }

    /// Apply the network-dictated HTTP timeout.
    pub fn set_timeout(&self, t: Duration) {
        if let Ok(mut cur) = self.timeout.write() {
            *cur = t.max(Duration::from_millis(100));
        }
    }

    fn timeout(&self) -> Duration {
        self.timeout
            .read()
            .map(|t| *t)
            .unwrap_or(Duration::from_secs(10))
    }

    /// A fresh replay header.
    pub fn header(&self, clock: &dyn Clock) -> Result<RequestHeader, NetError> {
        Ok(RequestHeader {
            network_id: self.network_id.clone(),
            node_id: self.key.id().clone(),
            ts_ms: clock.now_ms(),
            nonce: new_nonce().map_err(|e| NetError::Local(e.to_string()))?,
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Vec<u8>, NetError> {
        self.call_bounded(req, url, limits::MAX_CONFIG_BYTES).await
    }

    async fn call_bounded(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
        max: usize,
    ) -> Result<Vec<u8>, NetError> {
        let timeout = self.timeout();
        let mut resp = req.timeout(timeout).send().await.map_err(|e| {
            if e.is_timeout() {
                NetError::Timeout { url: url.into() }
            } else {
                NetError::Unreachable {
                    url: url.into(),
                    reason: unreachable_reason(e),
                }
            }
        })?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if body.len() + c.len() > max {
                        return Err(NetError::TooLarge {
                            url: url.into(),
                            size: body.len() + c.len(),
                            max,
                        });
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(if e.is_timeout() {
                        NetError::Timeout { url: url.into() }
                    } else {
                        NetError::Unreachable {
                            url: url.into(),
                            reason: unreachable_reason(e),
                        }
                    });
                }
            }
        }
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let (code, message, server_time_ms) = match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(e) => (e.error.code, e.error.message, Some(e.server_time_ms)),
            Err(_) => (
                ErrorCode::Internal,
                String::from_utf8_lossy(&body).chars().take(256).collect(),
                None,
            ),
        };
        Err(NetError::Refused {
            url: url.into(),
            status,
            code,
            message,
            server_time_ms,
        })
    }

    /// Signs and posts `body`, then verifies and returns the network's signed answer.
    pub async fn signed<Req: NodeRequest, Ans: NetworkAnswer>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Ans, NetError> {
        let url = format!("{}{path}", self.base);
        let env = envelope::seal(&self.key, Req::PURPOSE, body)
            .map_err(|e| NetError::Local(e.to_string()))?;
        let bytes = self
            .call(
                self.http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(env),
                &url,
            )
            .await?;
        open_network_answer::<Ans>(&bytes, &self.keys(), &self.network_id, self.key.id())
            .map_err(|source| NetError::BadAnswer { url, source })
    }

    pub async fn challenge(&self) -> Result<ChallengeResponse, NetError> {
        let url = format!("{}{}", self.base, paths::CHALLENGE);
        let body = ChallengeRequest {
            network_id: self.network_id.clone(),
            node_id: self.key.id().clone(),
        };
        let bytes = self.call(self.http.post(&url).json(&body), &url).await?;
        serde_json::from_slice(&bytes).map_err(|e| NetError::BadAnswer {
            url,
            source: ProtocolError::malformed("challenge answer", &e),
        })
    }

    /// Fetches the chain from config version `since` to the network's current snapshot
    /// (spec §8.4; verification is the caller's).
    pub async fn fetch_config(&self, since: u64) -> Result<Vec<SignedConfig>, NetError> {
        let url = format!("{}{}?since={since}", self.base, paths::CONFIG);
        let bytes = self
            .call_bounded(self.http.get(&url), &url, limits::MAX_CONFIG_CHAIN_BYTES)
            .await?;
        // A network that predates catch-up chains ignores the query and serves the snapshot
        // itself; it is verified all the same.
        ConfigChain::decode(&bytes)
            .or_else(|e| SignedConfig::decode(&bytes).map(|s| vec![s]).map_err(|_| e))
            .map_err(|source| NetError::BadAnswer { url, source })
    }
}

/// Why a call failed in transport: reqwest's own message is generic ("error sending request
/// for url (…)"), the cause (refused, reset, DNS, TLS) is in its chain. The URL is said once,
/// by the error that carries this reason.
fn unreachable_reason(e: reqwest::Error) -> String {
    resultity_protocol::error_chain(&e.without_url())
}

// The canned-answer server the integration tests use too (shared as source: they cannot see
// this crate's test-only items).
#[cfg(test)]
#[path = "../../tests/it/common/canned_http.rs"]
mod canned_http;

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::NetworkKeypair;
    use resultity_protocol::clock::ManualClock;
    use resultity_protocol::config::RetiringKey;

    const NOW: u64 = 1_767_225_600_000;

    fn client(trust: ConfigTrust, clock: &ManualClock) -> NetClient {
        client_at("http://127.0.0.1:9", trust, clock)
    }

    fn client_at(base: &str, trust: ConfigTrust, clock: &ManualClock) -> NetClient {
        NetClient::new(
            base,
            trust.network_id.clone(),
            NodeKeypair::from_seed(&[7; 32]),
            trust,
            Arc::new(clock.clone()),
            Duration::from_secs(1),
        )
        .unwrap()
    }

    fn ids(keys: &NetworkKeys) -> Vec<String> {
        keys.ids().map(|k| k.to_string()).collect()
    }

    #[test]
    fn trusted_keys_follow_the_overlap_window_and_new_configs() {
        let (k1, k2) = (
            NetworkKeypair::from_seed(&[1; 32]),
            NetworkKeypair::from_seed(&[2; 32]),
        );
        let clock = ManualClock::new(NOW);
        let net_id = NetworkId::parse("testnet").unwrap();
        let net = client(
            ConfigTrust::pinned(net_id.clone(), vec![k1.id().clone()]),
            &clock,
        );
        assert_eq!(ids(&net.keys()), vec![k1.id().to_string()]);
        assert_eq!(net.keys_now().1, None);
        let before = net.keys_generation();

        // A rotation applied: both keys until the window ends, and sessions are told.
        let mut rotated = ConfigTrust::pinned(net_id, vec![k2.id().clone()]);
        rotated.retiring = vec![RetiringKey {
            key: k1.id().clone(),
            not_after_ms: NOW + 1_000,
        }];
        net.set_trust(&rotated);
        assert_ne!(net.keys_generation(), before);
        let (keys, shrink_at) = net.keys_now();
        assert_eq!(ids(&keys), vec![k2.id().to_string(), k1.id().to_string()]);
        assert_eq!(shrink_at, Some(NOW + 1_000));
        // An answer signed by the retiring key verifies within the window…
        let answer = resultity_protocol::envelope::seal_bytes(
            &k1,
            resultity_protocol::Purpose::HttpPingOk,
            "{}",
        );
        assert!(
            keys.open::<serde_json::Value>(
                answer.as_bytes(),
                resultity_protocol::Purpose::HttpPingOk
            )
            .is_ok()
        );
        // …and not once it ended.
        clock.set(NOW + 1_000);
        let (keys, shrink_at) = net.keys_now();
        assert_eq!(ids(&keys), vec![k2.id().to_string()]);
        assert_eq!(shrink_at, None);
        assert!(matches!(
            keys.open::<serde_json::Value>(
                answer.as_bytes(),
                resultity_protocol::Purpose::HttpPingOk
            ),
            Err(ProtocolError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn untrusted_signer_answers_are_recognised_for_catch_up() {
        let bad = |source| NetError::BadAnswer {
            url: "u".into(),
            source,
        };
        assert!(bad(ProtocolError::UnknownSigner { signer: "x".into() }).is_untrusted_signer());
        assert!(
            bad(ProtocolError::KeyRetired {
                signer: "x".into(),
                not_after_ms: 1,
                now_ms: 2
            })
            .is_untrusted_signer()
        );
        assert!(!bad(ProtocolError::BadSignature { signer: "x".into() }).is_untrusted_signer());
        assert!(!NetError::Timeout { url: "u".into() }.is_untrusted_signer());
    }

    #[tokio::test]
    async fn an_unreachable_network_says_why_once() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let clock = ManualClock::new(NOW);
        let key = NetworkKeypair::from_seed(&[1; 32]);
        let trust =
            ConfigTrust::pinned(NetworkId::parse("testnet").unwrap(), vec![key.id().clone()]);
        let net = client_at(&base, trust, &clock);
        match net.challenge().await {
            Err(NetError::Unreachable { url, reason }) => {
                assert!(url.starts_with(&base), "{url}");
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
                assert!(
                    !reason.contains("127.0.0.1"),
                    "the URL is said once: {reason}"
                );
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
    }

    use super::canned_http::serve_answers as serve;

    #[tokio::test]
    async fn chains_and_bare_snapshots_from_older_networks_are_both_read() {
        use resultity_protocol::config::{ConfigSnapshot, NetworkConfig};
        use resultity_protocol::messages::{Environment, Timing};
        let k1 = NetworkKeypair::from_seed(&[1; 32]);
        let net_id = NetworkId::parse("testnet").unwrap();
        let snapshot = ConfigSnapshot {
            network_id: net_id.clone(),
            version: 1,
            issued_at_ms: NOW,
            expires_at_ms: NOW + 60_000,
            prev_digest: None,
            payload: NetworkConfig {
                environment: Environment::Testnet,
                models: vec![],
                runtime_images: Default::default(),
                sidecar_image: None,
                timing: Timing::default(),
                subclouds: vec![],
                network_keys: vec![k1.id().clone()],
                retiring_keys: vec![],
                revoked_node_keys: vec![],
                penalties: None,
            },
        };
        let signed = SignedConfig::sign(&k1, &snapshot).unwrap();
        let chain =
            serde_json::to_string(&ConfigChain::new(net_id.clone(), &[&signed], NOW)).unwrap();
        let base = serve(vec![
            chain,
            signed.as_str().to_owned(),
            "not a config".into(),
        ])
        .await;
        let clock = ManualClock::new(NOW);
        let net = client_at(
            &base,
            ConfigTrust::pinned(net_id, vec![k1.id().clone()]),
            &clock,
        );
        for _ in 0..2 {
            let got = net.fetch_config(0).await.unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].digest(), signed.digest());
        }
        // Neither form: the chain's own refusal is reported.
        assert!(matches!(
            net.fetch_config(0).await,
            Err(NetError::BadAnswer {
                source: ProtocolError::Malformed { .. },
                ..
            })
        ));
    }
}
