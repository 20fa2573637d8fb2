//! `metav1.Condition` helpers with Kubernetes semantics: `lastTransitionTime` changes only when
//! `status` changes, and every condition carries the generation it was computed from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition status values.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// A condition as computed, before transition times are settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: &'static str,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
    pub fn is_true(&self) -> bool {
        self.status == TRUE
    }
}

/// Turns computed conditions into `metav1.Condition`s, keeping `lastTransitionTime` from
/// `previous` when the status did not change.
pub fn settle(
    computed: Vec<Cond>,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    computed
        .into_iter()
        .map(|c| {
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
                .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
            Condition {
                type_: c.type_.into(),
                status: c.status.into(),
                // The API requires a non-empty CamelCase reason.
                reason: if c.reason.is_empty() {
                    "Unknown".into()
                } else {
                    c.reason
                },
                message: truncate(&c.message, 1024),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The message limit of `metav1.Condition` is 32 KiB; keep ours short for `kubectl describe`.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
