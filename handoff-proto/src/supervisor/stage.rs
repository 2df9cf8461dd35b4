//! What a handoff knows, phase by phase: each [`Stage`] holds the data that stage has. The
//! successor exists from [`Stage::Spawned`] on (so no phase after the spawn can lack it), and
//! the seal report lives in [`Phase::Begun`], where the successor's readiness is checked
//! against it.

use std::time::Instant;

use super::types::{HandoffSpec, PhaseTimes, Verdict};
use crate::types::{AbortReason, HandoffId, Pid, SealReport};

/// A successor this handoff spawned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Child {
    pub(super) pid: Pid,
    /// Not reported exited yet.
    pub(super) alive: bool,
}

/// Where a handoff with a live successor process stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Phase {
    /// The `InFlight` record is being written.
    JournalInFlight,
    /// `Hello` sent to the successor.
    Greeting,
    /// `Welcome` and the listeners sent; waiting for `ListenersAck`.
    PassingListeners,
    /// Connecting to the incumbent's control socket.
    Connecting,
    /// `Hello` sent to the incumbent.
    GreetingIncumbent,
    /// `Prepare` sent; waiting for `Drained`.
    Draining,
    /// `Seal` sent; waiting for `Sealed`.
    Sealing,
    /// `Begin` sent with the seal; waiting for `Ready`, which must match the seal.
    Begun { seal: SealReport },
    /// The `Committing` record is being written (the commit point).
    JournalCommitting,
    /// `Commit` sent to the successor.
    CommittingSuccessor,
    /// The successor acknowledged: it serves. `Commit` sent to the retiring incumbent.
    CommittingIncumbent,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum AbortStep {
    /// Kill sent; waiting for the successor's exit (its lock is free after).
    KillingSuccessor,
    /// `Abort` sent; waiting for `Resumed`.
    Notifying,
    /// Reconnecting to ask the incumbent whether it serves.
    Connecting,
    /// `Hello` sent on the new connection.
    Confirming,
    /// Waiting to reconnect.
    RetryWait,
}

/// An abandoned handoff on its way to a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Abort {
    pub(super) reason: AbortReason,
    /// Whether the incumbent had been asked to drain.
    pub(super) touched: bool,
    pub(super) step: AbortStep,
    /// The successor, if one was spawned.
    pub(super) successor: Option<Child>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Stage {
    /// `SpawnSuccessor` asked for; no successor yet.
    Spawning,
    /// The successor runs (or ran: `alive` says) and the handoff moves forward.
    Spawned {
        successor: Child,
        phase: Phase,
    },
    Aborting(Abort),
    /// The verdict is being journaled.
    Finishing {
        verdict: Verdict,
        successor: Option<Child>,
    },
}

/// When each phase was reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct Marks {
    pub(super) spawned: Option<Instant>,
    pub(super) hello: Option<Instant>,
    pub(super) listeners: Option<Instant>,
    pub(super) prepare: Option<Instant>,
    pub(super) drained: Option<Instant>,
    pub(super) sealed: Option<Instant>,
    pub(super) ready: Option<Instant>,
    pub(super) committed: Option<Instant>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Handoff {
    pub(super) id: HandoffId,
    pub(super) spec: HandoffSpec,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) incumbent: Pid,
    pub(super) incumbent_alive: bool,
    pub(super) stage: Stage,
    pub(super) marks: Marks,
    /// Build ids the two daemons reported in `HelloAck`.
    pub(super) incumbent_build: Option<String>,
    pub(super) successor_build: Option<String>,
}

impl Handoff {
    pub(super) fn phase_name(&self) -> &'static str {
        match &self.stage {
            Stage::Spawning => "spawning",
            Stage::Spawned { phase, .. } => match phase {
                Phase::JournalInFlight => "journaling start",
                Phase::Greeting => "greeting successor",
                Phase::PassingListeners => "passing listeners",
                Phase::Connecting => "connecting to incumbent",
                Phase::GreetingIncumbent => "greeting incumbent",
                Phase::Draining => "draining",
                Phase::Sealing => "sealing",
                Phase::Begun { .. } => "awaiting ready",
                Phase::JournalCommitting => "journaling commit",
                Phase::CommittingSuccessor => "committing successor",
                Phase::CommittingIncumbent => "retiring incumbent",
            },
            Stage::Aborting(_) => "aborting",
            Stage::Finishing { .. } => "finishing",
        }
    }

    pub(super) fn spawning(&self) -> bool {
        matches!(self.stage, Stage::Spawning)
    }

    pub(super) fn phase(&self) -> Option<&Phase> {
        match &self.stage {
            Stage::Spawned { phase, .. } => Some(phase),
            _ => None,
        }
    }

    /// Move on to `next`; only called in a phase of [`Stage::Spawned`].
    pub(super) fn advance(&mut self, next: Phase) {
        if let Stage::Spawned { phase, .. } = &mut self.stage {
            *phase = next;
        }
    }

    pub(super) fn successor(&self) -> Option<Child> {
        match &self.stage {
            Stage::Spawning => None,
            Stage::Spawned { successor, .. } => Some(*successor),
            Stage::Aborting(a) => a.successor,
            Stage::Finishing { successor, .. } => *successor,
        }
    }

    pub(super) fn successor_mut(&mut self) -> Option<&mut Child> {
        match &mut self.stage {
            Stage::Spawning => None,
            Stage::Spawned { successor, .. } => Some(successor),
            Stage::Aborting(a) => a.successor.as_mut(),
            Stage::Finishing { successor, .. } => successor.as_mut(),
        }
    }

    /// The successor acknowledged `Commit`: nothing aborts the handoff any more.
    pub(super) fn committed(&self) -> bool {
        matches!(
            self.stage,
            Stage::Spawned {
                phase: Phase::CommittingIncumbent,
                ..
            } | Stage::Finishing { .. }
        )
    }

    /// The incumbent was asked to drain or seal, and has not sealed.
    pub(super) fn pre_seal(&self) -> bool {
        matches!(
            self.phase(),
            Some(Phase::GreetingIncumbent | Phase::Draining | Phase::Sealing)
        )
    }

    /// A `Connect` this handoff asked for succeeded; whether it was asked for.
    pub(super) fn connected(&mut self) -> bool {
        match &mut self.stage {
            Stage::Spawned { phase, .. } if *phase == Phase::Connecting => {
                *phase = Phase::GreetingIncumbent;
                true
            }
            Stage::Aborting(a) if a.step == AbortStep::Connecting => {
                a.step = AbortStep::Confirming;
                true
            }
            _ => false,
        }
    }

    /// The retry timer fired; whether to connect again.
    pub(super) fn retry_due(&mut self) -> bool {
        match &mut self.stage {
            Stage::Aborting(a) if a.step == AbortStep::RetryWait => {
                a.step = AbortStep::Connecting;
                true
            }
            _ => false,
        }
    }

    pub(super) fn times(&self, now: Instant) -> PhaseTimes {
        let m = &self.marks;
        let span = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a)),
            _ => None,
        };
        PhaseTimes {
            spawn_to_hello: span(Some(self.started), m.hello),
            listeners: span(m.hello, m.listeners),
            greet_incumbent: span(m.listeners, m.prepare),
            drain: span(m.prepare, m.drained),
            seal: span(m.drained, m.sealed),
            begin_to_ready: span(m.sealed, m.ready),
            commit: span(m.ready, m.committed),
            to_commit: span(Some(self.started), m.committed),
            total: now.saturating_duration_since(self.started),
        }
    }
}
