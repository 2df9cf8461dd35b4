//! Blocking driver for the handoff roles. Not implemented yet: see issue 3.
pub use handoff_proto as proto;
