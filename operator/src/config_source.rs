//! Fetching a network's signed config (`GET {ioEndpoint}/v1/config?since=N`). Behind a trait so the
//! network reconciler is tested with offered snapshots instead of a server.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use resultity_protocol::limits::MAX_CONFIG_CHAIN_BYTES;
use resultity_protocol::messages::http::paths;

use crate::sidecar::{LimitedError, read_limited};

/// Why the config could not be fetched (verification errors are separate).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {url} failed: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("fetching {url} timed out after {} ms", timeout.as_millis())]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered more than {max} bytes")]
    TooLarge { url: String, max: usize },
}

/// Source of signed config envelopes.
pub trait ConfigSource: Send + Sync + fmt::Debug {
    /// The network's answer at `io_endpoint` for a holder of config version `since` (0 for
    /// none): a catch-up chain, or from a network that predates chains, the snapshot itself.
    fn fetch<'a>(
        &'a self,
        io_endpoint: &'a str,
        since: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>>;
}

/// The real source over HTTP(S).
#[derive(Debug, Clone)]
pub struct HttpConfigSource {
    http: reqwest::Client,
    timeout: Duration,
}

impl HttpConfigSource {
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self { http, timeout })
    }
}

/// `{endpoint}/v1/config?since=N` without a doubled slash.
pub fn config_url(io_endpoint: &str, since: u64) -> String {
    format!(
        "{}{}?since={since}",
        io_endpoint.trim_end_matches('/'),
        paths::CONFIG
    )
}

impl ConfigSource for HttpConfigSource {
    fn fetch<'a>(
        &'a self,
        io_endpoint: &'a str,
        since: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, FetchError>> {
        Box::pin(async move {
            let url = config_url(io_endpoint, since);
            let err = |e: reqwest::Error| {
                if e.is_timeout() {
                    FetchError::Timeout {
                        url: url.clone(),
                        timeout: self.timeout,
                    }
                } else {
                    // reqwest's own message is generic and repeats the URL; the cause
                    // (refused, DNS, TLS) is in its chain.
                    FetchError::Unreachable {
                        url: url.clone(),
                        reason: resultity_protocol::error_chain(&e.without_url()),
                    }
                }
            };
            let resp = self.http.get(&url).send().await.map_err(err)?;
            let status = resp.status().as_u16();
            if !(200..300).contains(&status) {
                return Err(FetchError::Status { url, status });
            }
            read_limited(resp, MAX_CONFIG_CHAIN_BYTES)
                .await
                .map_err(|e| match e {
                    LimitedError::TooLarge => FetchError::TooLarge {
                        url: url.clone(),
                        max: MAX_CONFIG_CHAIN_BYTES,
                    },
                    LimitedError::Http(e) => err(e),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_network_says_why_once() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let source = HttpConfigSource::new(Duration::from_secs(5)).unwrap();
        match source.fetch(&base, 0).await {
            Err(FetchError::Unreachable { url, reason }) => {
                assert_eq!(url, config_url(&base, 0));
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
                assert!(
                    !reason.contains("127.0.0.1"),
                    "the URL is said once: {reason}"
                );
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
    }
}
