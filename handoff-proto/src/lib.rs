//! Sans-io core of `handoff`.
pub mod types;
pub mod wire;
pub use types::*;
