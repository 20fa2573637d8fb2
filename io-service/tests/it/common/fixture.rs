//! A healthy node's report and the model it serves, shared by the integration tests and the
//! core's unit tests (`src/core/testkit.rs` includes this file), so both describe the same
//! node.

use resultity_protocol::messages::http::NodeReport;
use resultity_protocol::messages::{
    GpuDevice, GpuReport, ModelRef, ModelState, ModelStatus, NodePhase, Participation, RuntimeKind,
    RuntimeReport, Software,
};

pub const MODEL: &str = "acme/tiny-chat";
pub const REVISION: &str = "r1";

pub fn model() -> ModelRef {
    ModelRef {
        id: MODEL.into(),
        revision: REVISION.into(),
    }
}

/// A ready node serving [`model`] on one healthy GPU, every slot free.
pub fn report(max_concurrency: u32) -> NodeReport {
    NodeReport {
        phase: NodePhase::Ready,
        config: None,
        draining: false,
        max_concurrency,
        in_flight: 0,
        credits: max_concurrency,
        outbox_len: 0,
        participation: Participation::Both,
        subclouds: vec![],
        models: vec![ModelStatus {
            model: model(),
            state: ModelState::Active,
            reason: None,
            self_test: None,
        }],
        gpu: GpuReport {
            present: true,
            reason: None,
            driver_version: None,
            cuda_version: None,
            devices: vec![GpuDevice {
                index: 0,
                uuid: "GPU-0".into(),
                name: "Test GPU".into(),
                memory_total_mib: 24_000,
                memory_used_mib: 0,
                utilization_pct: None,
                temperature_c: None,
                ecc_uncorrected: None,
                last_xid: None,
                mig_devices: vec![],
                healthy: true,
            }],
        },
        runtime: RuntimeReport {
            kind: RuntimeKind::Vllm,
            ready: true,
            reason: None,
            running: None,
            waiting: None,
            kv_cache_usage_permille: None,
            generation_tokens_total: None,
        },
        software: Software::default(),
        not_ready: vec![],
    }
}
