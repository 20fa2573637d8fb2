//! The operator's error type: one variant per failure a reconcile acts on differently.

/// Why a reconcile step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed (transient, retried with backoff).
    #[error("kubernetes api {action} failed: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// An object the operator reads lacks a field the API server always sets.
    #[error("{0} is missing a required field")]
    MissingField(&'static str),
    /// The identity Secret exists but cannot be used; a person must fix or delete it.
    #[error("identity secret {name}: {reason}")]
    BadIdentity { name: String, reason: String },
    /// Random bytes or key generation failed.
    #[error("key generation failed: {0}")]
    Keygen(#[from] resultity_protocol::ProtocolError),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The sidecar is still draining; try again shortly (not a failure).
    #[error("waiting for the sidecar to drain")]
    Draining,
    /// Another replica holds the leader lease, or it could not be renewed in time.
    #[error("leader lease lost")]
    LeaseLost,
    /// Serializing a desired object failed (a bug, not an input problem).
    #[error("serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Short, bounded label for the `errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::MissingField(_) => "missing_field",
            Self::BadIdentity { .. } => "bad_identity",
            Self::Keygen(_) => "keygen",
            Self::Finalizer(_) => "finalizer",
            Self::Serialize { .. } => "serialize",
            Self::Draining => "draining",
            Self::LeaseLost => "lease_lost",
        }
    }

    pub(crate) fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { action, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
