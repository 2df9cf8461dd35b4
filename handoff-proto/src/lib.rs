//! Sans-io core of `handoff`: every phase of the supervisor, the incumbent and the successor as
//! pure state machines over messages and time, the wire format, and the supervisor's journal
//! with its recovery decision.
//!
//! Nothing in this crate performs I/O: no sockets, files, descriptors, clocks, pids or
//! environment. Drivers (`handoff-io-std`, `handoff-io-mio`) move bytes and descriptors, take
//! flocks, fsync and spawn processes, and feed what happened back in. That is what lets the
//! protocol be model-checked (`tests/model.rs`) and fuzzed on its own.
//!
//! # Driving a machine
//!
//! [`Incumbent`], [`Successor`] and [`Supervisor`] share one contract, after quinn-proto and
//! str0m:
//!
//! - `handle_*(now, input)` feeds an input: bytes or a closed channel from a peer, a hook's
//!   result, a lock attempt's result, a spawned or exited process, a durable journal write.
//! - `poll_output()` returns the next obligation: send a frame (with descriptors for a
//!   `Listeners` frame), call a hook, release or take the lock, write the journal, spawn or kill
//!   a process, report an outcome.
//! - `poll_timeout()` says when to call `handle_timeout(now)` next.
//!
//! **Rule:** after every `handle_*` call, drain `poll_output()` until it returns `None` and
//! perform each output in order; then arm a timer for `poll_timeout()`. Time is an input: pass
//! the current monotonic time to every call. Outputs are `#[must_use]`; feeding an input the
//! machine did not ask for is a [`Misuse`] error, never a silent no-op, and bad input from a
//! peer is a [`PeerMisbehaved`] error after the machine has already taken the safe action.
//!
//! See `ARCHITECTURE.md` for the protocol, the invariants and the tests that check them.

pub mod channel;
pub mod error;
pub mod incumbent;
pub mod journal;
#[cfg(feature = "sim")]
pub mod sim;
pub mod successor;
pub mod supervisor;
mod timer;
pub mod types;
pub mod wire;

pub use channel::ConnId;
pub use error::{Error, Misuse, PeerMisbehaved};
pub use incumbent::{DaemonConfig, Incumbent, IncumbentOutput, LockResult, SealProof};
pub use journal::{JournalRecord, ProcessIdentity, Resolution};
pub use successor::{Successor, SuccessorOutput};
pub use supervisor::{
    Busy, HandoffSpec, Outcome, Peer, PhaseTimes, Supervisor, SupervisorConfig, SupervisorOutput,
    Verdict,
};
pub use types::*;
