//! HTTP calls to the network (protocol §6): every request signed with the node key and a
//! fresh timestamp/nonce, every signed answer verified with the trusted network keys before it
//! is believed, every call bounded by the network-dictated timeout.

use std::sync::RwLock;
use std::time::Duration;

use resultity_protocol::clock::Clock;
use resultity_protocol::config::SignedConfig;
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
}

/// The node's HTTP client for one network.
#[derive(Debug)]
pub struct NetClient {
    http: reqwest::Client,
    base: String,
    network_id: NetworkId,
    key: NodeKeypair,
    keys: RwLock<NetworkKeys>,
    timeout: RwLock<Duration>,
}

impl NetClient {
    pub fn new(
        base: &str,
        network_id: NetworkId,
        key: NodeKeypair,
        keys: NetworkKeys,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| NetError::Local(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            network_id,
            key,
            keys: RwLock::new(keys),
            timeout: RwLock::new(timeout),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Trust new network keys (after a config rotated them).
    pub fn set_keys(&self, keys: NetworkKeys) {
        if let Ok(mut k) = self.keys.write() {
            *k = keys;
        }
    }

    pub fn keys(&self) -> NetworkKeys {
        self.keys.read().map(|k| k.clone()).unwrap_or_default()
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
        let timeout = self.timeout();
        let mut resp = req.timeout(timeout).send().await.map_err(|e| {
            if e.is_timeout() {
                NetError::Timeout { url: url.into() }
            } else {
                NetError::Unreachable {
                    url: url.into(),
                    reason: e.to_string(),
                }
            }
        })?;
        let status = resp.status().as_u16();
        let max = limits::MAX_CONFIG_BYTES;
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
                            reason: e.to_string(),
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

    /// Fetches the network's current signed config (verification is the caller's).
    pub async fn fetch_config(&self) -> Result<SignedConfig, NetError> {
        let url = format!("{}{}", self.base, paths::CONFIG);
        let bytes = self.call(self.http.get(&url), &url).await?;
        SignedConfig::decode(&bytes).map_err(|source| NetError::BadAnswer { url, source })
    }
}
