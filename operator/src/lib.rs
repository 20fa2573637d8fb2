//! `resultity-operator`: reconciles `ResultityNetwork` and `ResultityNode` resources into
//! verified network configs and GPU pods (runtime + Resultity sidecar), and reports each
//! node's state from its sidecar.
//!
//! The node reconcile is a pipeline whose middle is pure and tested from fixtures:
//! [`validate`] → [`build`] → server-side apply → read back → [`status`] → apply status.
//! [`controller`] holds the I/O around it; [`sidecar`] and [`config_source`] are the two
//! outside services, each behind a trait so tests inject answers.

pub mod build;
pub mod conditions;
pub mod config_source;
pub mod controller;
pub mod crd;
pub mod crd_apply;
pub mod decide;
pub mod error;
pub mod fleet;
pub mod images;
pub mod leader;
pub mod metrics;
pub mod model_cache;
pub mod pod_contract;
pub mod rollout;
pub mod runtime;
pub mod sidecar;
pub mod status;
pub mod validate;

pub use error::{Error, Result};
