//! Blocking (`std`) driver for the `handoff` roles.
//!
//! The driver proper (running the `handoff-proto` machines over real sockets, processes and
//! timers) is still in progress. What exists is [`sys`]: the system layer both drivers (this
//! one and `handoff-io-mio`) share: descriptor passing, listener checks, the data-directory
//! lock, the journal file and peer credentials. Linux only.

pub use handoff_proto as proto;

pub mod sys;
