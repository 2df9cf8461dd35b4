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
//! `SO_PEERCRED`, pidfds, all in the engine crate `handoff-engine` (shared with
//! `handoff-io-mio`). Linux only.
//!
//! # Differences from the 0.1.2 API
//!
//! The shape of the earlier crate's API is kept (its README's programs are the `handoff`
//! crate's examples); where its behaviour was unsafe or left open, this one decides:
//!
//! - **A long successor start is never aborted for silence.** The successor's channel is
//!   serviced by a background thread from `handshake` to the commit, heartbeats included; only
//!   the handoff's deadline limits `Begin` → `Ready`. The incumbent's hooks run on a thread of
//!   their own for the same reason.
//! - **The lock is handed to `announce_and_bind`.** It proves to the protocol that the
//!   successor holds the lock before `Ready` goes out, and the commit is marked in the lock
//!   record through it before the commit is acknowledged.
//! - **An aborted successor exits at once** (status [`EXIT_ABORTED`]); it never touches the
//!   data. **A retired incumbent exits** (status 0) when `serve` learns that a successor took
//!   over, unless [`Incumbent::exit_on_retire`] is turned off.
//! - **`resume_from_journal` really recovers**, and `perform_handoff` recovers first when
//!   needed; `HandoffOutcome::committed == false` means the incumbent confirmed it serves again
//!   (or, with `serving: None`, that nobody could be confirmed and the next call recovers).
//! - **Control sockets are 0600 and every peer is checked** with `SO_PEERCRED`
//!   ([`PeerPolicy`]), in both directions; a daemon started by a supervisor also admits only
//!   the holder of that supervisor's lock (`sys::supervisor_lock`), so that no other process,
//!   even of its own uid, can take its listeners or steer a handoff.
//! - **Listeners of every kind** (TCP, UDP, Unix stream and datagram), any number of them,
//!   checked on receipt, close-on-exec; one typed `take::<L: Listener>(name)` for a cold
//!   start's and a successor's alike (`inherited.take("http")` infers `TcpListener` as before;
//!   `take_listener` stays as the successor's name for it).
//! - **`SpawnSpec` has `Default`** (25 s drain grace, 60 s deadline) and names its
//!   environment and arguments.
//!
//! `unsafe` is denied crate-wide, with no exception: the code that needs it (owning inherited
//! descriptors, placing descriptors in a spawned child, `fexecve`, `SO_PEERPIDFD`) is in
//! `handoff-engine`'s `inherit` and `sys::spawn` modules.

#![deny(unsafe_code)]

pub use handoff_proto as proto;

mod daemon;
pub mod drainable;
mod log;
mod role;
mod successor;
pub mod supervisor;

/// The error type of every call (the engine's, shared with `handoff-io-mio`).
pub mod error {
    pub use handoff_engine::error::{Error, Result};
    pub use handoff_engine::inherit::InheritError;
    pub use handoff_engine::sys::journal_file::JournalFileError;
    pub use handoff_engine::sys::lock::LockError;
    pub use handoff_engine::sys::supervisor_lock::SupervisorLockError;
}

pub use daemon::{Incumbent, Retired};
pub use drainable::{DrainReport, Drainable, ReadinessSnapshot, SealReport, StateSnapshot};
pub use handoff_engine::inherit::InheritedListeners;
pub use handoff_engine::{DataDirLock, IncumbentConfig, Listener, ListenerSet, PeerPolicy};
pub use handoff_proto::{AbortReason, HandoffId, ListenerKind, Timing};
pub use role::{detect_role, Role};
pub use successor::{BegunSuccessor, HandshookSuccessor, Successor, EXIT_ABORTED};
