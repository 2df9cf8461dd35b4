//! The supervisor's public plain data: its configuration, the per-handoff spec, the outputs it
//! asks its driver to perform, and how a handoff ended.

use std::time::Duration;

#[cfg(doc)]
use super::Supervisor;
use crate::journal::{JournalRecord, Resolution};
use crate::types::{AbortReason, HandoffId, ListenerInfo, Pid, Timing};
use crate::wire::{Frame, VersionRange};

/// The supervisor's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SupervisorConfig {
    /// The supervisor's own pid (sent in `Hello`).
    pub pid: Pid,
    /// The supervisor's build.
    pub build_id: String,
    /// Protocol versions spoken.
    pub versions: VersionRange,
    /// Every timing: heartbeats, silence, retries, the recovery wait and the crash backoff.
    pub timing: Timing,
    /// The listeners handed to every successor, in order.
    pub listeners: Vec<ListenerInfo>,
}

/// Per-handoff parameters, given with the trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandoffSpec {
    /// How long the incumbent's drain may take.
    pub drain_grace: Duration,
    /// The whole handoff, trigger to commit, must fit in this; aborting and acknowledging add
    /// at most two of the timing's `slack` (see [`Timing::slack`]).
    pub deadline: Duration,
}

/// The two channels a supervisor speaks on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Peer {
    /// The connection to the control socket (the incumbent, or whoever serves).
    Incumbent,
    /// The socketpair inherited by the successor.
    Successor,
}

/// How a handoff ended, as far as the supervisor can prove.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The successor acknowledged `Commit` and serves; the incumbent acknowledged or exited.
    Committed {
        /// The new daemon.
        successor: Pid,
    },
    /// The handoff was abandoned and the incumbent serves: it acknowledged with `Resumed`
    /// (or said `Serving` when asked), or was never asked to drain (`drained` is false).
    RolledBack {
        /// The daemon still serving.
        incumbent: Pid,
        /// Why the handoff was abandoned.
        reason: AbortReason,
        /// Whether the incumbent had been asked to drain.
        drained: bool,
    },
    /// Nobody could be confirmed serving within the deadline plus slack; the supervisor
    /// recovers (and starts the daemon cold if needed).
    IncumbentLost {
        /// Why the handoff was abandoned.
        reason: AbortReason,
    },
}

/// Time spent in each phase of a handoff; `None` for phases not reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PhaseTimes {
    /// Trigger to the successor's `HelloAck` (spawn, exec, start-up).
    pub spawn_to_hello: Option<Duration>,
    /// `Welcome` to `ListenersAck`.
    pub listeners: Option<Duration>,
    /// `ListenersAck` to the incumbent's `HelloAck`: connecting to its control socket and
    /// greeting it, up to `Prepare`.
    pub greet_incumbent: Option<Duration>,
    /// `Prepare` to `Drained`.
    pub drain: Option<Duration>,
    /// `Seal` to `Sealed`.
    pub seal: Option<Duration>,
    /// `Begin` to `Ready`.
    pub begin_to_ready: Option<Duration>,
    /// `Ready` to the successor's `CommitAck` (journal write included).
    pub commit: Option<Duration>,
    /// Trigger to the successor's `CommitAck`: the handoff committed, the successor serves.
    /// The phases above add up to it.
    pub to_commit: Option<Duration>,
    /// Trigger to outcome: after a commit, also `Commit` to the retiring incumbent and the
    /// journal's idle record.
    pub total: Duration,
}

/// The end of a handoff.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// The handoff.
    pub handoff: HandoffId,
    /// What became of it.
    pub verdict: Verdict,
    /// Where the time went.
    pub times: PhaseTimes,
}

impl Outcome {
    /// Whether the handoff committed.
    pub fn committed(&self) -> bool {
        matches!(self.verdict, Verdict::Committed { .. })
    }
}

/// A trigger arrived while a handoff or a recovery runs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("busy: {what}")]
pub struct Busy {
    /// What is running.
    pub what: String,
    /// The handoff in progress, if one is.
    pub handoff: Option<HandoffId>,
}

/// What the supervisor asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "outputs are obligations: perform every one"]
pub enum SupervisorOutput {
    /// Write the frame to the peer. A `Listeners` frame to the successor carries the named
    /// listeners' descriptors, in order, as SCM_RIGHTS.
    Send {
        /// Where.
        to: Peer,
        /// What.
        frame: Frame,
    },
    /// Close the channel to the peer.
    Close {
        /// Which.
        peer: Peer,
    },
    /// The frame just decoded from the incumbent carried these listeners: take the
    /// descriptors that came with it (recovery) and check them, then call
    /// [`Supervisor::handle_listeners_taken`], or [`Supervisor::handle_listener_error`] on a
    /// mismatch. Recovery adopts the daemon only once every listener is taken and checked.
    TakeListeners {
        /// Names and kinds, in descriptor order.
        batch: Vec<ListenerInfo>,
    },
    /// Spawn the successor binary with a fresh socketpair as its channel, then feed
    /// [`Supervisor::handle_spawned`] or [`Supervisor::handle_spawn_failed`]. Watch its exit.
    SpawnSuccessor {
        /// The handoff.
        handoff: HandoffId,
    },
    /// Nobody serves: start the configured binary cold, with the listeners (binding them anew
    /// if the supervisor lost them), then feed `handle_spawned`. Watch its exit.
    SpawnColdStart,
    /// Connect to the control socket, then feed [`Supervisor::handle_connected`] or
    /// [`Supervisor::handle_connect_failed`].
    Connect,
    /// Report this pid's exit through [`Supervisor::handle_exited`] (at once if it is gone).
    ///
    /// A pid is only a number: one read back from the journal may name another process by
    /// now. The driver watches only a process it has proven to be the one meant (its own
    /// child, the peer of the control connection, or a process matching the identity the
    /// journal recorded, see [`crate::journal`]) and reports any other pid as exited.
    Watch {
        /// Whom.
        pid: Pid,
    },
    /// Kill the process (SIGKILL). Its exit arrives through `handle_exited`. The driver signals
    /// only through a pidfd on a process it has proven (as for [`SupervisorOutput::Watch`]),
    /// never by the bare pid; a pid it cannot prove is left alone.
    Kill {
        /// Whom.
        pid: Pid,
    },
    /// Replace the journal atomically (an exclusive tmp, fsync, rename; [`crate::journal`] says
    /// why the directory is not fsynced), then feed [`Supervisor::handle_journal_written`].
    WriteJournal(JournalRecord),
    /// A handoff ended.
    Outcome(Outcome),
    /// Recovery found the serving daemon and holds the listeners again.
    Recovered {
        /// The serving daemon.
        serving: Pid,
        /// What became of a handoff the journal named.
        resolution: Option<(HandoffId, Resolution)>,
    },
}
