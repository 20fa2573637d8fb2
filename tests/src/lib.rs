//! End-to-end tests of the whole system and of the Helm chart live in `tests/`; this library is
//! empty on purpose (a package needs a target, and the tests share no code).
