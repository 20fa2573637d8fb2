//! `resultity-io`: the reference network side of Resultity.
//!
//! One axum listener serves the node protocol (registration, heartbeats, the signed WebSocket
//! job session, signed configs), the caller-facing job entry points (OpenAI-compatible and a
//! generic KServe-v2-style job API) and the operational endpoints (`/healthz`, `/metrics`,
//! `/v1/nodes`, `/v1/jobs/{id}`).
//!
//! The data flow follows the modules:
//! * [`settings`] — everything the service is started with (limits, scheduler tuning);
//! * [`node_http`] — signed node HTTP requests: open, replay-check, apply, sign the answer;
//! * [`session`] — the WebSocket handshake and the per-node session loop;
//! * [`core`] — node registry, job table and scheduler (eligibility, scoring, credits,
//!   timeouts, reassignment, penalties), one state machine behind one lock;
//! * [`stream`] — streamed jobs: chunk order, limits and digest, the caller's channel;
//! * [`api`] — job entry points and JSON views for people and tests;
//! * [`publish`] — signing and publishing config snapshots;
//! * [`listener`] — the TCP listener with a connection bound;
//! * [`server`] — wiring: [`IoService::start`] returns a handle with the bound address.
//!
//! The library is embeddable: the devnet, the sidecar's tests and the benchmarks start it
//! in-process with [`IoService::start`].

pub mod api;
pub mod core;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod node_http;
pub mod publish;
pub mod server;
pub mod session;
pub mod settings;
pub mod state;
pub mod stream;

pub use error::{ApiError, IoError};
pub use server::{IoService, IoServiceHandle};
pub use settings::{Limits, SchedulerSettings, Settings};
