//! `resultity-sidecar`: the node agent that runs beside every GPU runtime in a fleet.
//!
//! Modules follow the data flow: [`runtime`] drives the co-located vLLM or Triton server,
//! [`gpu`] reads NVML, [`outbox`] keeps signed results durable until the network confirms them,
//! [`config_store`] persists the network's signed configuration atomically.

pub mod agent;
pub mod api;
pub mod backoff;
pub mod config_refusal;
pub mod config_store;
pub mod dcgm;
pub mod doctor;
pub mod drain_state;
pub mod gpu;
pub mod identity;
pub mod models;
pub mod outbox;
pub mod readiness;
pub mod runtime;
