//! Known-answer self-tests (spec §8): the network's config may give an approved model a fixed
//! request and the part of the answer it must produce. A node runs it before it serves the
//! model, and a fleet rollout waits for it before it calls a replaced node done, so a new
//! runtime image or weights that answer differently stop the rollout instead of the network.
//!
//! The expected answer is matched by containment, not equality: runtimes add ids, timestamps and
//! usage that differ per call, so `expect` names only the members that must be there with the
//! given values (`{"choices": [{"text": " Paris"}]}`).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::messages::common::JobKind;

/// A fixed request for one model and what its answer must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct KnownAnswer {
    /// Which runtime endpoint the request is for.
    pub kind: JobKind,
    /// The runtime request body (OpenAI or KServe v2 JSON); the node sets `model` itself.
    /// Deterministic settings (`temperature: 0`, a `seed`) are the config author's job.
    #[cfg_attr(test, proptest(strategy = "crate::messages::arb::json_value()"))]
    pub request: Value,
    /// Members the answer must contain, by [`contains`].
    #[cfg_attr(test, proptest(strategy = "crate::messages::arb::json_value()"))]
    pub expect: Value,
}

/// Where an answer departs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// JSON path of the first difference (`choices[0].text`; empty for the whole answer).
    pub path: String,
    /// What was expected there, as compact JSON.
    pub expected: String,
    /// What the answer has there (compact JSON, cut to 200 bytes), or `None` when it is absent.
    pub actual: Option<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.path.is_empty() {
            "the answer".to_owned()
        } else {
            self.path.clone()
        };
        match &self.actual {
            Some(actual) => write!(f, "{at} is {actual}, expected {}", self.expected),
            None => write!(f, "{at} is missing, expected {}", self.expected),
        }
    }
}

/// Longest rendering of an actual value in a [`Mismatch`]: runtime answers can be megabytes.
const SHOWN_BYTES: usize = 200;

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= SHOWN_BYTES {
        return s;
    }
    let mut end = SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Whether `actual` contains `expected`: objects by the members `expected` names (more in
/// `actual` are fine), arrays element by element with equal length (the number of choices or
/// outputs is part of the answer), numbers by value (`1` matches `1.0`), everything else by
/// equality. The first difference comes back as a [`Mismatch`].
pub fn contains(actual: &Value, expected: &Value) -> Result<(), Mismatch> {
    let mut path = String::new();
    walk(actual, expected, &mut path)
}

fn walk(actual: &Value, expected: &Value, path: &mut String) -> Result<(), Mismatch> {
    let differ = |path: &str| Mismatch {
        path: path.to_owned(),
        expected: shown(expected),
        actual: Some(shown(actual)),
    };
    match (expected, actual) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, want_v) in want {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let outcome = match have.get(key) {
                    Some(have_v) => walk(have_v, want_v, path),
                    None => Err(Mismatch {
                        path: path.clone(),
                        expected: shown(want_v),
                        actual: None,
                    }),
                };
                path.truncate(len);
                outcome?;
            }
            Ok(())
        }
        (Value::Array(want), Value::Array(have)) => {
            if want.len() != have.len() {
                return Err(differ(path));
            }
            for (i, (want_v, have_v)) in want.iter().zip(have).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let outcome = walk(have_v, want_v, path);
                path.truncate(len);
                outcome?;
            }
            Ok(())
        }
        (Value::Number(want), Value::Number(have)) => {
            let same = match (want.as_i64(), have.as_i64(), want.as_u64(), have.as_u64()) {
                (Some(a), Some(b), _, _) => a == b,
                (_, _, Some(a), Some(b)) => a == b,
                _ => want.as_f64() == have.as_f64(),
            };
            if same { Ok(()) } else { Err(differ(path)) }
        }
        _ if expected == actual => Ok(()),
        _ => Err(differ(path)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn extra_members_are_fine_and_missing_ones_are_named() {
        let answer = json!({"id": "cmpl-1", "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop"}]});
        assert_eq!(
            contains(&answer, &json!({"choices": [{"text": " Paris"}]})),
            Ok(())
        );
        let e = contains(&answer, &json!({"choices": [{"text": " Lyon"}]})).unwrap_err();
        assert_eq!(e.path, "choices[0].text");
        assert_eq!(
            e.to_string(),
            r#"choices[0].text is " Paris", expected " Lyon""#
        );
        let e = contains(&answer, &json!({"usage": {"completion_tokens": 1}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"usage is missing, expected {"completion_tokens":1}"#
        );
    }

    #[test]
    fn array_lengths_are_part_of_the_answer() {
        let answer = json!({"choices": [{"text": "a"}, {"text": "b"}]});
        let e = contains(&answer, &json!({"choices": [{"text": "a"}]})).unwrap_err();
        assert_eq!(e.path, "choices");
        assert_eq!(
            contains(&answer, &json!({"choices": [{}, {"text": "b"}]})),
            Ok(())
        );
    }

    #[test]
    fn numbers_compare_by_value_and_types_do_not_mix() {
        assert_eq!(
            contains(&json!({"data": [1.0, 2]}), &json!({"data": [1, 2.0]})),
            Ok(())
        );
        assert!(contains(&json!({"data": [1]}), &json!({"data": [2]})).is_err());
        assert!(contains(&json!({"data": "1"}), &json!({"data": 1})).is_err());
        assert!(contains(&json!(null), &json!({})).is_err());
        // An empty expectation holds for any object, the whole answer for itself.
        assert_eq!(contains(&json!({"a": 1}), &json!({})), Ok(()));
    }

    #[test]
    fn a_huge_actual_value_is_shown_cut() {
        let long = "é".repeat(1000);
        let e = contains(&json!({"t": long}), &json!({"t": "x"})).unwrap_err();
        let actual = e.actual.unwrap_or_default();
        assert!(actual.len() <= SHOWN_BYTES + "…".len(), "{}", actual.len());
        assert!(actual.ends_with('…'));
    }

    proptest! {
        #[test]
        fn every_value_contains_itself(v in crate::messages::arb::json_value()) {
            prop_assert_eq!(contains(&v, &v), Ok(()));
        }

        #[test]
        fn changing_one_leaf_is_found_at_its_path(text in "[a-z]{1,8}", other in "[A-Z]{1,8}") {
            let answer = json!({"choices": [{"message": {"content": text}}]});
            let expect = json!({"choices": [{"message": {"content": other}}]});
            let e = contains(&answer, &expect).unwrap_err();
            prop_assert_eq!(e.path, "choices[0].message.content");
        }
    }
}
