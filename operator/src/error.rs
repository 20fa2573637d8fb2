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
    /// Reading what a node refers to failed (dereference step).
    #[error(transparent)]
    Dereference(#[from] DereferenceError),
    /// Writing a desired object failed for a reason that is worth retrying (apply step).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Writing the status failed (status step).
    #[error("writing the status of {object}: {source}")]
    Status {
        object: String,
        #[source]
        source: kube::Error,
    },
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
            Self::Dereference(_) => "dereference",
            Self::Apply(_) => "apply",
            Self::Status { .. } => "status",
        }
    }

    pub(crate) fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { action, source }
    }
}

/// Dereference step: reading the objects a ResultityNode names (network, identity Secret, pod).
#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating identity Secret {name}: {source}")]
    CreateIdentity {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("generating the node key: {0}")]
    Keygen(#[from] resultity_protocol::ProtocolError),
}

/// Apply step: writing a desired object or deleting an obsolete one.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{action} {kind} {name}: {source}")]
    Write {
        action: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The API server refused an object as invalid or forbidden (HTTP 400, 403, 422): retrying
/// the same object cannot succeed, so it is reported on the resource instead of retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: &'static str,
    pub name: String,
    pub code: u16,
    /// The API server's own message (which field, which value).
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the API server rejected {} {} (HTTP {}): {}",
            self.kind, self.name, self.code, self.message
        )
    }
}

impl Rejection {
    /// `Some` when `e` is a rejection of the object itself rather than a transient failure.
    pub fn from_kube(kind: &'static str, name: &str, e: &kube::Error) -> Option<Self> {
        match e {
            kube::Error::Api(s) if matches!(s.code, 400 | 403 | 422) => Some(Self {
                kind,
                name: name.to_owned(),
                code: s.code,
                message: s.message.clone(),
            }),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
