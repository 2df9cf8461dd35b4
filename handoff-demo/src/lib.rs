//! The live demo of `handoff`, and `kvd`, the stateful example daemon it hands off.
//!
//! `kvd` is a module so that the demo binary can run itself as the daemon (`handoff-demo kvd
//! …`, or a copy of itself named `kvd-v2`): one `cargo run` builds everything the demo needs.
//! The `kvd` binary is the same code, for tests and for running it by hand.

pub mod kvd;
