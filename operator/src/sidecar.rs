//! Talking to a node's sidecar admin API: `GET /status` and `POST /drain`, both with the
//! node's bearer token and a short timeout. Behind a trait so reconcile tests inject answers.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use resultity_protocol::status::NodeStatus;

/// Admin API paths served by the sidecar.
pub mod paths {
    pub const STATUS: &str = "/status";
    /// Starts a drain (idempotent); `?deregister=true` also deregisters once drained.
    pub const DRAIN: &str = "/drain";
}

/// Largest `/status` body accepted; a real one is a few KiB.
const MAX_STATUS_BYTES: usize = 1 << 20;

/// Where and how to reach one sidecar.
#[derive(Clone, PartialEq, Eq)]
pub struct SidecarTarget {
    pub pod_ip: String,
    pub port: u16,
    pub token: String,
}

impl fmt::Debug for SidecarTarget {
    // Never log the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SidecarTarget")
            .field("pod_ip", &self.pod_ip)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl SidecarTarget {
    fn url(&self, path: &str) -> String {
        // IPv6 pod IPs need brackets in a URL.
        if self.pod_ip.contains(':') {
            format!("http://[{}]:{}{path}", self.pod_ip, self.port)
        } else {
            format!("http://{}:{}{path}", self.pod_ip, self.port)
        }
    }
}

/// Why the sidecar could not be asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SidecarError {
    #[error("sidecar unreachable: {0}")]
    Unreachable(String),
    #[error("sidecar did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("sidecar refused the admin token")]
    Unauthorized,
    #[error("sidecar answered HTTP {0}")]
    Status(u16),
    #[error("sidecar status document is malformed: {0}")]
    Malformed(String),
}

impl SidecarError {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable(_) | Self::Timeout(_) => "SidecarUnreachable",
            Self::Unauthorized => "SidecarUnauthorized",
            Self::Status(_) => "SidecarError",
            Self::Malformed(_) => "SidecarStatusMalformed",
        }
    }
}

/// The sidecar admin API as the reconciler uses it.
pub trait SidecarClient: Send + Sync + fmt::Debug {
    fn status<'a>(
        &'a self,
        target: &'a SidecarTarget,
    ) -> BoxFuture<'a, Result<NodeStatus, SidecarError>>;
    fn drain<'a>(
        &'a self,
        target: &'a SidecarTarget,
        deregister: bool,
    ) -> BoxFuture<'a, Result<(), SidecarError>>;
}

/// The real client over HTTP.
#[derive(Debug, Clone)]
pub struct HttpSidecarClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl HttpSidecarClient {
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self { http, timeout })
    }

    fn map_err(&self, e: &reqwest::Error) -> SidecarError {
        if e.is_timeout() {
            SidecarError::Timeout(self.timeout)
        } else {
            // reqwest's own message is generic; the cause (refused, reset) is in its chain.
            SidecarError::Unreachable(resultity_protocol::error_chain(e))
        }
    }

    fn check(status: reqwest::StatusCode) -> Result<(), SidecarError> {
        match status.as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(SidecarError::Unauthorized),
            code => Err(SidecarError::Status(code)),
        }
    }
}

impl SidecarClient for HttpSidecarClient {
    fn status<'a>(
        &'a self,
        target: &'a SidecarTarget,
    ) -> BoxFuture<'a, Result<NodeStatus, SidecarError>> {
        Box::pin(async move {
            let resp = self
                .http
                .get(target.url(paths::STATUS))
                .bearer_auth(&target.token)
                .send()
                .await
                .map_err(|e| self.map_err(&e))?;
            Self::check(resp.status())?;
            let body = read_limited(resp, MAX_STATUS_BYTES)
                .await
                .map_err(|e| match e {
                    LimitedError::TooLarge => SidecarError::Malformed("body too large".into()),
                    LimitedError::Http(e) => self.map_err(&e),
                })?;
            serde_json::from_slice(&body).map_err(|e| SidecarError::Malformed(e.to_string()))
        })
    }

    fn drain<'a>(
        &'a self,
        target: &'a SidecarTarget,
        deregister: bool,
    ) -> BoxFuture<'a, Result<(), SidecarError>> {
        Box::pin(async move {
            let url = format!("{}?deregister={deregister}", target.url(paths::DRAIN));
            let resp = self
                .http
                .post(url)
                .bearer_auth(&target.token)
                .send()
                .await
                .map_err(|e| self.map_err(&e))?;
            Self::check(resp.status())
        })
    }
}

/// Why [`read_limited`] stopped.
#[derive(Debug)]
pub(crate) enum LimitedError {
    TooLarge,
    Http(reqwest::Error),
}

/// Reads a response body chunk by chunk and stops past `max` bytes, so a peer cannot make
/// the operator buffer an unbounded body (a chunked response has no length to check first).
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, LimitedError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(LimitedError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(LimitedError::Http)? {
        if body.len() + chunk.len() > max {
            return Err(LimitedError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
