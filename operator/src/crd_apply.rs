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
