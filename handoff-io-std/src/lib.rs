//! Blocking (`std`) driver for the `handoff` roles.
//!
//! The driver proper (running the `handoff-proto` machines over real sockets, processes and
//! timers) is still in progress. What exists is [`sys`]: the system layer both drivers (this
//! one and `handoff-io-mio`) share: descriptor passing, listener checks, the data-directory
//! lock, the journal file and peer credentials. Linux only. [`inherit`] reads systemd-style
//! inherited listeners (`LISTEN_FDS`) for a cold start.
//!
//! `unsafe` is denied crate-wide. The one exception is [`inherit::InheritedListeners::from_env`],
//! which must turn the inherited descriptor numbers 3, 4, … into owned descriptors (no safe
//! API can); `sys` forbids `unsafe` outright.

#![deny(unsafe_code)]

pub use handoff_proto as proto;

pub mod inherit;
pub mod sys;
