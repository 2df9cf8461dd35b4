//! Blocking (`std`) driver for the `handoff` roles, and the public API daemons integrate
//! with (re-exported by the `handoff` crate).
//!
//! - [`Drainable`]: the hooks a daemon implements (drain, seal, resume, snapshot).
//! - [`detect_role`] → [`Role::ColdStart`] (with [`InheritedListeners`]) or
//!   [`Role::Successor`].
//! - [`DataDirLock`]: the data directory's exclusive `flock`.
//! - [`Incumbent`]: the serving daemon's control socket; [`Incumbent::serve`] answers
//!   supervisors on a thread of its own.
//! - [`Successor`] → [`HandshookSuccessor`] → [`BegunSuccessor`]: taking over.
//! - [`supervisor::Supervisor`]: holds the listeners and performs handoffs.
//!
//! Each role runs the matching `handoff-proto` machine over real I/O: `poll(2)` loops over
//! non-blocking Unix sockets, listener descriptors over `SCM_RIGHTS`, `flock`, `fsync`,
//! `SO_PEERCRED`, pidfds. [`sys`] is the system layer shared with `handoff-io-mio`.
//! Linux only.
//!
//! `unsafe` is denied crate-wide. The exceptions, each with a SAFETY comment: owning the
//! descriptors a process inherits ([`inherit::InheritedListeners::from_env`], the successor
//! channel in [`detect_role`]), placing descriptors in a spawned child (`sys::spawn`), and
//! duplicating a raw descriptor number given to [`supervisor::Supervisor::with_listener`].

#![deny(unsafe_code)]

pub use handoff_proto as proto;

mod conn;
mod daemon;
pub mod drainable;
pub mod error;
mod held;
pub mod inherit;
mod log;
mod role;
mod successor;
pub mod supervisor;
pub mod sys;

pub use daemon::{Incumbent, Retired};
pub use drainable::{DrainReport, Drainable, ReadinessSnapshot, SealReport, StateSnapshot};
pub use handoff_proto::{AbortReason, HandoffId, ListenerKind, Timing};
pub use inherit::InheritedListeners;
pub use role::{detect_role, Role};
pub use successor::{BegunSuccessor, HandshookSuccessor, Successor, EXIT_ABORTED};
pub use sys::lock::DataDirLock;
pub use sys::peercred::PeerPolicy;
