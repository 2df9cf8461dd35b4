//! `handoff`: replace the binary of a running, stateful daemon with zero downtime.
//!
//! This crate is the API daemons integrate with: the blocking driver, `handoff-io-std`, and
//! exactly what its three kinds of users need. See `ARCHITECTURE.md` for the design.
//!
//! - **A daemon author** implements [`Drainable`], calls [`detect_role`] once in `main`, and
//!   then either starts cold ([`Role::ColdStart`]: [`InheritedListeners`], [`DataDirLock`],
//!   [`Incumbent`]) or takes over ([`Role::Successor`]: [`Successor`] →
//!   [`HandshookSuccessor`] → [`BegunSuccessor`]); listeners are taken by name and type with
//!   [`Listener`].
//! - **An embedder of a supervisor** uses [`supervisor::Supervisor`] with a
//!   [`supervisor::SpawnSpec`] and reads [`supervisor::HandoffOutcome`].
//! - **An event-loop integrator** (mio) depends on `handoff-io-mio` instead: the same roles as
//!   non-blocking drivers for an application's own loop, re-exporting what it needs
//!   (`detect_role`, `IncumbentConfig`, `DataDirLock`, `SpawnSpec`, …).
//!
//! The engines and the operating-system layer they share (`handoff-engine`) are not part of
//! this API.
//!
//! ```no_run
//! use handoff::{detect_role, Role};
//! match detect_role()? {
//!     Role::ColdStart { inherited } => { /* take the lock, open the data, bind, serve */ }
//!     Role::Successor(s) => { /* handshake, wait_for_begin, take the lock, announce_and_bind */ }
//! }
//! # Ok::<(), handoff::error::Error>(())
//! ```

pub use handoff_io_std::{
    detect_role, AbortReason, BegunSuccessor, DataDirLock, DrainReport, Drainable, HandoffId,
    HandshookSuccessor, Incumbent, InheritedListeners, Listener, ListenerKind, ListenerSet,
    PeerPolicy, Retired, Role, SealReport, StateSnapshot, Successor, Timing, EXIT_ABORTED,
};

/// What a daemon implements for a handoff, and the reports its hooks return.
pub mod drainable {
    pub use handoff_io_std::drainable::{
        DrainReport, Drainable, ReadinessSnapshot, SealReport, StateSnapshot,
    };
}

/// The error type of every call, and the details some of its variants carry.
pub mod error {
    pub use handoff_io_std::error::{
        Error, InheritError, JournalFileError, LockError, Result, SupervisorLockError,
    };
}

/// Holding the listeners and performing handoffs from an application's own process.
pub mod supervisor {
    pub use handoff_io_std::supervisor::{
        Busy, HandoffOutcome, ListenerSource, PhaseTimes, Pid, Recovery, SpawnSpec, Supervisor,
        Verdict,
    };
}
