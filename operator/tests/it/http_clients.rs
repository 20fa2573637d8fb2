//! The two HTTP clients against a local server: bearer token, status mapping, size limits and
//! timeouts (the timeout test waits on a handler that never answers, bounded by the client).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use resultity_operator::config_source::{ConfigSource, FetchError, HttpConfigSource};
use resultity_operator::sidecar::{HttpSidecarClient, SidecarClient, SidecarError, SidecarTarget};

const TOKEN: &str = "test-admin-token-0123456789abcdef";

async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn target(addr: std::net::SocketAddr, token: &str) -> SidecarTarget {
    SidecarTarget {
        pod_ip: addr.ip().to_string(),
        port: addr.port(),
        token: token.into(),
    }
}

#[tokio::test]
async fn sidecar_status_drain_and_errors() {
    let report = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sidecar-ready.json"
    ))
    .unwrap();
    let router = Router::new()
        .route(
            "/status",
            get(move |h: HeaderMap| {
                let report = report.clone();
                async move {
                    if authorized(&h) {
                        (StatusCode::OK, report)
                    } else {
                        (StatusCode::UNAUTHORIZED, String::new())
                    }
                }
            }),
        )
        .route(
            "/drain",
            post(|h: HeaderMap, q: axum::extract::RawQuery| async move {
                if !authorized(&h) {
                    return StatusCode::UNAUTHORIZED;
                }
                if q.0.as_deref() == Some("deregister=true") {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::BAD_REQUEST
                }
            }),
        );
    let addr = serve(router).await;
    let client = HttpSidecarClient::new(Duration::from_secs(5)).unwrap();

    let status = client.status(&target(addr, TOKEN)).await.unwrap();
    assert_eq!(status.jobs.completed, 1289);
    assert_eq!(
        client.status(&target(addr, "wrong")).await,
        Err(SidecarError::Unauthorized)
    );
    client.drain(&target(addr, TOKEN), true).await.unwrap();
    assert_eq!(
        client.drain(&target(addr, TOKEN), false).await,
        Err(SidecarError::Status(400))
    );
}

#[tokio::test]
async fn sidecar_garbage_and_timeouts() {
    let router = Router::new()
        .route("/status", get(|| async { "{not json" }))
        .route("/drain", post(std::future::pending::<&'static str>));
    let addr = serve(router).await;
    let client = HttpSidecarClient::new(Duration::from_millis(200)).unwrap();
    assert!(matches!(
        client.status(&target(addr, TOKEN)).await,
        Err(SidecarError::Malformed(_))
    ));
    assert_eq!(
        client.drain(&target(addr, TOKEN), true).await,
        Err(SidecarError::Timeout(Duration::from_millis(200)))
    );
    // A chunked body has no length to check up front: reading stops past the limit.
    let endless =
        serve(Router::new().route(
            "/status",
            get(|| async {
                axum::body::Body::from_stream(futures::stream::iter((0..64).map(|_| {
                    Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 64 * 1024]))
                })))
            }),
        ))
        .await;
    assert_eq!(
        client.status(&target(endless, TOKEN)).await,
        Err(SidecarError::Malformed("body too large".into()))
    );
    // Nothing listens on a closed port.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = client.status(&target(closed, TOKEN)).await.unwrap_err();
    assert_eq!(err.reason(), "SidecarUnreachable");
}

#[tokio::test]
async fn config_source_fetches_and_bounds() {
    // The answer names the query it was asked, so the test sees the catch-up version sent.
    let router =
        Router::new().route(
            "/v1/config",
            get(|q: axum::extract::RawQuery| async move {
                format!("chain-{}", q.0.unwrap_or_default())
            }),
        );
    let addr = serve(router).await;
    let source = HttpConfigSource::new(Duration::from_secs(5)).unwrap();
    // A trailing slash on the endpoint does not double the path separator.
    let body = source.fetch(&format!("http://{addr}/"), 7).await.unwrap();
    assert_eq!(body, b"chain-since=7");

    let missing = serve(Router::new()).await;
    assert!(matches!(
        source.fetch(&format!("http://{missing}"), 0).await,
        Err(FetchError::Status { status: 404, .. })
    ));

    let huge = vec![b'x'; resultity_protocol::limits::MAX_CONFIG_CHAIN_BYTES + 1];
    let big =
        serve(Router::new().route("/v1/config", get(move || async move { huge.clone() }))).await;
    assert!(matches!(
        source.fetch(&format!("http://{big}"), 0).await,
        Err(FetchError::TooLarge { .. })
    ));

    let slow =
        serve(Router::new().route("/v1/config", get(std::future::pending::<&'static str>))).await;
    let quick = HttpConfigSource::new(Duration::from_millis(200)).unwrap();
    assert!(matches!(
        quick.fetch(&format!("http://{slow}"), 0).await,
        Err(FetchError::Timeout { .. })
    ));
}
