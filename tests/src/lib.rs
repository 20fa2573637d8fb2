//! End-to-end tests of the whole system live in `tests/`; this library is empty on purpose
//! (a package needs a target, and the tests need nothing shared beyond the devnet crate).
