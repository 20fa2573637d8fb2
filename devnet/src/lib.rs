//! `resultity-devnet`: a whole Resultity network on loopback, in one process.
//!
//! * [`network`] — starts the reference IO service, N sidecar agents and N runtime simulators,
//!   waits until every node serves, and can kill a node or restart the IO service (tests);
//! * [`load`] — submits jobs through the caller-facing entry points at a fixed concurrency,
//!   checks each answer against the simulator's deterministic output and its signature verdict,
//!   and summarizes (the `--json` contract in the README).
//!
//! The binary `resultity-devnet` is a thin shell over both; the end-to-end tests and
//! `resultity-bench` use the library directly.

pub mod load;
pub mod network;

pub use load::{LoadConfig, LoadError, Progress, Summary, run_load};
pub use network::{Devnet, DevnetConfig, DevnetError, MODEL, RuntimeChoice};
