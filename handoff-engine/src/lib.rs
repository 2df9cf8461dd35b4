//! The engine both `handoff` drivers run on: the non-blocking cores of the three roles, the
//! operating-system layer they use, and the plain data they take and return.
//!
//! - Engines: [`IncumbentEngine`], [`SuccessorEngine`], [`SupervisorEngine`]. Each owns a
//!   role's `handoff-proto` machine and its descriptors and performs every output that needs
//!   no decision from the application; what it cannot do on its own comes out as an event.
//!   The driving contract is in [`interest`].
//! - [`sys`]: the system layer (SCM_RIGHTS, `flock`, `fsync`, `SO_PEERCRED`, pidfds, spawning).
//! - [`role`]: how this process was started ([`role::detect_role`]): cold, with the listeners
//!   of `LISTEN_FDS` ([`InheritedListeners`]), or as a successor, with its channel.
//! - Plain data: [`SpawnSpec`], [`HandoffOutcome`], [`Recovery`], [`ListenerSource`]
//!   ([`spec`]); the serving daemon's configuration, [`IncumbentConfig`] ([`config`]); the
//!   listeners this process holds for a restarted supervisor ([`Held`], [`held`]).
//! - [`error`]: the error type both drivers return; [`crash`]: the crash matrix's named crash
//!   points (feature `crash-points`); [`log`]: the diagnostics shim.
//!
//! The blocking driver and public API is `handoff-io-std` (re-exported by `handoff`); the mio
//! driver is `handoff-io-mio`. Neither depends on the other; both depend on this crate, and
//! this crate on neither. Linux only.
//!
//! `unsafe` is denied crate-wide. The exceptions, each with a SAFETY comment, are in two
//! modules. [`inherit`]: owning the descriptors a process inherits
//! ([`InheritedListeners::from_env`], the successor channel for [`role::detect_role`]), and
//! borrowing a raw descriptor number given as a [`ListenerSource`] to duplicate it.
//! `sys::spawn`: placing descriptors in a spawned child and executing the checked binary there
//! (`pre_exec`, `fexecve`), and reading `SO_PEERPIDFD` (`peer_pidfd`).

#![deny(unsafe_code)]

pub use handoff_proto as proto;

pub mod config;
pub mod crash;
pub mod error;
pub mod held;
mod incumbent;
pub mod inherit;
pub mod interest;
pub mod listener;
pub mod log;
pub mod role;
pub mod spec;
mod successor;
mod supervisor;
pub mod sys;

pub use config::IncumbentConfig;
pub use held::Held;
pub use incumbent::{IncumbentEngine, IncumbentEvent, IncumbentKey};
pub use inherit::InheritedListeners;
pub use interest::{wait_ready, Interest, Ready};
pub use listener::{Listener, ListenerSet};
pub use spec::{HandoffOutcome, ListenerSource, Recovery, SpawnSpec};
pub use successor::{SuccessorEngine, SuccessorEvent, EXIT_ABORTED};
pub use supervisor::{SupervisorEngine, SupervisorEvent, SupervisorKey};
pub use sys::lock::DataDirLock;
pub use sys::peercred::PeerPolicy;
