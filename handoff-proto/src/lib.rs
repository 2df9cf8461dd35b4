//! Sans-io core of `handoff`.
pub mod channel;
pub mod error;
pub mod incumbent;
pub mod journal;
pub mod successor;
pub mod supervisor;
mod timer;
pub mod types;
pub mod wire;

pub use channel::ConnId;
pub use error::{Error, Misuse, PeerMisbehaved};
pub use incumbent::{DaemonConfig, Incumbent, IncumbentOutput, LockResult, SealProof};
pub use journal::{JournalRecord, Resolution};
pub use successor::{Successor, SuccessorOutput};
pub use supervisor::{
    Busy, HandoffSpec, Outcome, Peer, PhaseTimes, Supervisor, SupervisorConfig, SupervisorOutput,
    Verdict,
};
pub use types::*;
