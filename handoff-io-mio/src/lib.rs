//! mio event-loop driver for the handoff roles. Not implemented yet: see issue 4.
pub use handoff_proto as proto;
