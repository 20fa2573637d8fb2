//! One integration-test binary for the crate: every file here is a module, so the
//! dependency tree is linked once instead of once per file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod sim;
