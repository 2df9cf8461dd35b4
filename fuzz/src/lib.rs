//! The bodies of the fuzz targets, one module per target, each with `run(data: &[u8])`.
//!
//! This is a plain library: no libFuzzer in it. The `fuzz_targets/*.rs` files are one line
//! each (`fuzz_target!(|data| handoff_fuzz::NAME::run(data))`), and the workspace test
//! `handoff-tests/tests/fuzz_corpus.rs` includes this file with `#[path]` to replay
//! `fuzz/corpus/<target>/` on stable, and to regenerate the seed corpus from honest runs.
//! So modules refer to each other with `super::`, never `crate::`.
//!
//! A target fails by panicking: bad input must come back as an error, and an invariant
//! broken on the outputs is an `assert!` with a message saying which.

pub mod config;
pub mod frame_decoder;
pub mod incumbent;
pub mod machine;
pub mod successor;
pub mod supervisor;
pub mod trigger_line;

/// A target's name (its directory under `fuzz/corpus/`) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("frame_decoder", frame_decoder::run),
    ("incumbent", incumbent::run),
    ("successor", successor::run),
    ("supervisor", supervisor::run),
    ("trigger_line", trigger_line::run),
    ("config", config::run),
];
