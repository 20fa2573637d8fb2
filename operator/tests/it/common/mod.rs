//! Shared fixtures of the operator's integration tests.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

/// Reads `tests/fixtures/{name}`: JSON when the name ends in `.json`, YAML otherwise.
pub fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    if name.ends_with(".json") {
        serde_json::from_str(&text).unwrap()
    } else {
        serde_norway::from_str(&text).unwrap()
    }
}
