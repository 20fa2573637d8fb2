//! Whether the node can serve now, and why not: the single source for `/readyz` and the
//! status phase, and the log line written on every change of it (once per change, not once per
//! probe, so a flapping condition is visible without flooding the log).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use resultity_protocol::messages::ModelState;
use resultity_protocol::status::{ConnectionState, NodeStatus};

/// Most model reasons quoted in one problem line.
const MAX_MODELS_QUOTED: usize = 4;

/// Readiness rules that depend on configuration, and the last verdict (to log changes).
#[derive(Debug, Default)]
pub struct Readiness {
    /// Whether a node without a visible GPU is unready (false only with GPU checks off).
    gpu_required: AtomicBool,
    last: Mutex<Option<Vec<String>>>,
}

impl Readiness {
    pub fn set_gpu_required(&self, required: bool) {
        self.gpu_required.store(required, Ordering::SeqCst);
    }

    pub fn gpu_required(&self) -> bool {
        self.gpu_required.load(Ordering::SeqCst)
    }

    /// Why `s` is not ready to take jobs; empty when it is.
    pub fn problems(&self, s: &NodeStatus) -> Vec<String> {
        let mut p = Vec::new();
        if !s.registered {
            p.push("not registered with the network".to_owned());
        }
        if s.connection.state != ConnectionState::Connected {
            p.push(format!(
                "network session {}",
                connection_word(s.connection.state)
            ));
        }
        p.extend(self.serve_problems(s));
        if s.draining {
            p.push("draining".to_owned());
        }
        p
    }

    /// Why the node cannot serve jobs although it may be registered and in sync: the runtime
    /// is down, a GPU is faulty or missing, no model is servable, or the outbox cannot be
    /// written. These are the reasons the heartbeat carries to the network (it knows the
    /// session, registration and drain itself); empty when the node can serve.
    pub fn serve_problems(&self, s: &NodeStatus) -> Vec<String> {
        let mut p = Vec::new();
        if !s.runtime.ready {
            p.push(match &s.runtime.reason {
                Some(r) => format!("runtime not ready: {r}"),
                None => "runtime not ready".to_owned(),
            });
        }
        if let Some(g) = gpu_problem(s, self.gpu_required()) {
            p.push(g);
        }
        if let Some(m) = model_problem(s) {
            p.push(m);
        }
        if let Some(e) = &s.outbox_error {
            p.push(format!("results cannot be stored: {e}"));
        }
        p
    }

    /// Whether the node cannot serve jobs although it is registered and in sync (the
    /// `Degraded` phase).
    pub fn cannot_serve(&self, s: &NodeStatus) -> bool {
        !self.serve_problems(s).is_empty()
    }

    /// Logs the verdict for `problems` if it differs from the last one seen; returns whether
    /// it did.
    pub fn observe(&self, problems: &[String]) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(problems) {
            return false;
        }
        let was_ready = last.as_ref().map(Vec::is_empty);
        *last = Some(problems.to_vec());
        drop(last);
        if problems.is_empty() {
            tracing::info!("node is ready to take jobs");
        } else if was_ready == Some(true) || was_ready.is_none() {
            tracing::warn!(problems = %problems.join("; "), "node is not ready");
        } else {
            tracing::warn!(problems = %problems.join("; "), "node is still not ready; the reasons changed");
        }
        true
    }
}

fn connection_word(s: ConnectionState) -> &'static str {
    match s {
        ConnectionState::Connected => "connected",
        ConnectionState::Connecting => "connecting",
        ConnectionState::Backoff => "waiting to reconnect",
        ConnectionState::Disconnected => "disconnected",
    }
}

/// A GPU fault, or no GPU visible where one is required.
fn gpu_problem(s: &NodeStatus, gpu_required: bool) -> Option<String> {
    let sick: Vec<String> = s
        .gpu
        .devices
        .iter()
        .filter(|d| !d.healthy)
        .map(|d| {
            let mut why = Vec::new();
            if let Some(x) = d.last_xid.filter(|x| *x != 0) {
                why.push(format!("XID {x}"));
            }
            if let Some(e) = d.ecc_uncorrected.filter(|e| *e != 0) {
                why.push(format!("{e} uncorrected ECC errors"));
            }
            format!("GPU {} ({})", d.index, why.join(", "))
        })
        .collect();
    if !sick.is_empty() {
        return Some(format!("GPU fault: {}", sick.join("; ")));
    }
    if gpu_required && !s.gpu.present {
        return Some(format!(
            "no GPU visible to the sidecar: {}",
            s.gpu.reason.as_deref().unwrap_or("no device found")
        ));
    }
    None
}

/// No model can take jobs: say why for the first few.
fn model_problem(s: &NodeStatus) -> Option<String> {
    if s.models.iter().any(|m| m.state == ModelState::Active) {
        return None;
    }
    if s.models.is_empty() {
        return Some(if s.applied_config.is_none() {
            "no model is servable: no network config applied yet".to_owned()
        } else {
            "no model is servable: the network config approves none for this node".to_owned()
        });
    }
    let mut reasons: Vec<String> = s
        .models
        .iter()
        .take(MAX_MODELS_QUOTED)
        .map(|m| {
            let state = match m.state {
                ModelState::Pending => "pending",
                ModelState::Active => "active",
                ModelState::Failed => "failed",
                ModelState::Inactive => "inactive",
            };
            match &m.reason {
                Some(r) => format!("{} {state}: {r}", m.model.id),
                None => format!("{} {state}", m.model.id),
            }
        })
        .collect();
    if s.models.len() > MAX_MODELS_QUOTED {
        reasons.push(format!("and {} more", s.models.len() - MAX_MODELS_QUOTED));
    }
    Some(format!("no model is servable: {}", reasons.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_logged_once() {
        let r = Readiness::default();
        let down = vec!["runtime not ready: timed out".to_owned()];
        assert!(r.observe(&down), "first verdict");
        assert!(!r.observe(&down), "same verdict again: no line");
        assert!(r.observe(&[]), "became ready");
        assert!(!r.observe(&[]));
        assert!(r.observe(&down), "not ready again");
        let other = vec!["draining".to_owned()];
        assert!(r.observe(&other), "other reasons");
    }
}
