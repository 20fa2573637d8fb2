//! `resultity-operator crd --apply`, the chart's pre-install/pre-upgrade hook: server-side
//! applies every CRD as the operator's field manager with force, then waits until the API
//! server serves them. Force, because Helm 4 creates the chart's CRDs by server-side apply as
//! field manager `helm`, and any other manager's apply conflicts on `.spec.versions` without it.
//!
//! The only module that writes CRDs: the chart grants the hook's ServiceAccount exactly the
//! verbs used here (get, create, patch), and the operator itself only lists and watches them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::crd::{MANAGER, all_crds};

/// Pause between reads while a CRD is not yet established.
const POLL: Duration = Duration::from_millis(500);

/// Why the CRDs could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CrdApplyError {
    #[error("apply CRD {name}: {source}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("read CRD {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} is not established after {secs} s{}", last_reason(.reason))]
    NotEstablished {
        name: String,
        secs: u64,
        reason: Option<String>,
    },
}

fn last_reason(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default()
}

/// Whether the CRD is established, and the API server's message when it is not (yet).
fn established(crd: &CustomResourceDefinition) -> (bool, Option<String>) {
    let conds = crd.status.as_ref().and_then(|s| s.conditions.as_ref());
    let est = conds.and_then(|c| c.iter().find(|c| c.type_ == "Established"));
    match est {
        Some(c) if c.status == "True" => (true, None),
        Some(c) => (false, c.message.clone().filter(|m| !m.is_empty())),
        None => (false, None),
    }
}

/// Applies every CRD and waits, at most `wait` per CRD, until each is established. Returns the
/// names applied.
pub async fn apply_crds(client: Client, wait: Duration) -> Result<Vec<String>, CrdApplyError> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply(MANAGER).force();
    let mut names = Vec::new();
    for crd in all_crds() {
        let name = crd.name_any();
        let applied = api
            .patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|source| CrdApplyError::Apply {
                name: name.clone(),
                source,
            })?;
        wait_established(&api, &name, applied, wait).await?;
        names.push(name);
    }
    Ok(names)
}

async fn wait_established(
    api: &Api<CustomResourceDefinition>,
    name: &str,
    mut crd: CustomResourceDefinition,
    wait: Duration,
) -> Result<(), CrdApplyError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (done, reason) = established(&crd);
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CrdApplyError::NotEstablished {
                name: name.to_owned(),
                secs: wait.as_secs(),
                reason,
            });
        }
        tokio::time::sleep(POLL).await;
        crd = api.get(name).await.map_err(|source| CrdApplyError::Read {
            name: name.to_owned(),
            source,
        })?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_established(status: &str, message: &str) -> CustomResourceDefinition {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x.resultity.com"},
            "spec": {"group": "resultity.com", "scope": "Namespaced",
                "names": {"plural": "x", "kind": "X"}, "versions": []},
            "status": {"conditions": [{"type": "Established", "status": status,
                "message": message, "reason": "R", "lastTransitionTime": null}]}
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"))
    }

    /// Against a mocked API server: each CRD is one server-side apply as the operator's field
    /// manager with force (what takes fields over from Helm 4's `helm` manager), and a CRD that
    /// is not yet established is read again until it is.
    #[tokio::test]
    async fn applies_each_crd_with_force_and_waits_until_established() {
        use http::{Method, Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let names: Vec<String> = all_crds().iter().map(ResourceExt::name_any).collect();
        let expected = names.clone();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            // The first CRD answers "not yet" to its apply, then "established" to the read.
            for i in 0..=expected.len() {
                let Some((req, send)) = handle.next_request().await else {
                    panic!("fewer calls than expected: {seen:?}");
                };
                let (method, uri) = (req.method().clone(), req.uri().to_string());
                let ctype = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap_or_default().to_owned());
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                let mut crd: serde_json::Value = if method == Method::GET {
                    serde_json::to_value(with_established("False", "")).unwrap_or_default()
                } else {
                    serde_json::from_slice(&bytes).unwrap_or_default()
                };
                let established = if i == 0 { "False" } else { "True" };
                crd["status"] = serde_json::json!({"conditions": [{"type": "Established",
                    "status": established, "reason": "R", "message": "installing"}]});
                let body = serde_json::to_vec(&crd).unwrap_or_default();
                send.send_response(Response::new(Body::from(body)));
                seen.push((method, uri, ctype));
            }
            seen
        });
        let applied = apply_crds(client, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("apply: {e}"));
        assert_eq!(applied, names);
        let seen = server.await.unwrap_or_else(|e| panic!("server: {e}"));
        let base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        assert_eq!(seen[0].0, Method::PATCH);
        assert_eq!(seen[1].0, Method::GET, "the first CRD is read again");
        assert!(seen[1].1.starts_with(&format!("{base}/{}", names[0])));
        for (i, (method, uri, ctype)) in seen.iter().enumerate().filter(|(i, _)| *i != 1) {
            assert_eq!(*method, Method::PATCH, "{uri}");
            let name = &names[i.saturating_sub(1)];
            assert!(uri.starts_with(&format!("{base}/{name}?")), "{uri}");
            assert!(uri.contains("fieldManager=resultity-operator"), "{uri}");
            assert!(uri.contains("force=true"), "{uri}");
            assert_eq!(ctype.as_deref(), Some("application/apply-patch+yaml"));
        }
    }

    #[tokio::test]
    async fn a_crd_never_established_is_an_error_naming_the_reason() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        tokio::spawn(async move {
            while let Some((_req, send)) = handle.next_request().await {
                let crd = with_established("False", "spec.names.plural is taken");
                let body = serde_json::to_vec(&crd).unwrap_or_default();
                send.send_response(Response::new(Body::from(body)));
            }
        });
        // No wait: the first answer decides, without sleeping in the test.
        let err = apply_crds(client, Duration::ZERO)
            .await
            .err()
            .unwrap_or_else(|| panic!("a CRD that is not established was accepted"));
        assert!(
            err.to_string()
                .ends_with("is not established after 0 s (spec.names.plural is taken)"),
            "{err}"
        );
    }

    #[test]
    fn established_reads_the_condition_and_its_message() {
        assert_eq!(established(&with_established("True", "")), (true, None));
        assert_eq!(
            established(&with_established("False", "the names are not accepted")),
            (false, Some("the names are not accepted".into()))
        );
        let mut none = with_established("True", "");
        none.status = None;
        assert_eq!(established(&none), (false, None));
        let e = CrdApplyError::NotEstablished {
            name: "x.resultity.com".into(),
            secs: 60,
            reason: None,
        };
        assert_eq!(
            e.to_string(),
            "CRD x.resultity.com is not established after 60 s"
        );
    }
}
