//! The supervisor: holds the listeners, runs one handoff at a time, journals before every
//! irreversible step, and recovers from its own restart.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::incumbent::listener_batches;
use crate::journal::{decide, Decision, JournalRecord, Observation, Resolution};
use crate::timer::Timers;
use crate::types::{AbortReason, HandoffId, ListenerInfo, Pid, SealReport, Timing};
use crate::wire::{
    bounded_text, DaemonStatus, Frame, Hello, HelloAck, Message, PeerRole, VersionRange,
};

/// The supervisor's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SupervisorConfig {
    /// The supervisor's own pid (sent in `Hello`).
    pub pid: Pid,
    /// The supervisor's build.
    pub build_id: String,
    /// Protocol versions spoken.
    pub versions: VersionRange,
    /// Heartbeat, silence and retry timings.
    pub timing: Timing,
    /// The listeners handed to every successor, in order.
    pub listeners: Vec<ListenerInfo>,
    /// How long a recovering supervisor waits for a process that is still resolving a handoff
    /// before it kills the leftovers and starts the daemon cold.
    pub recovery_wait: Duration,
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum AbortStep {
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Stage {
    Spawning,
    JournalInFlight,
    Greeting,
    PassingListeners,
    Connecting,
    GreetingIncumbent,
    Draining,
    Sealing,
    Begun,
    JournalCommitting,
    CommittingSuccessor,
    CommittingIncumbent,
    Aborting {
        reason: AbortReason,
        touched: bool,
        step: AbortStep,
    },
    Finishing(Verdict),
}

#[derive(Clone, Copy)]
enum Mark {
    Spawned,
    Hello,
    Listeners,
    Prepare,
    Drained,
    Sealed,
    Ready,
    Committed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Handoff {
    id: HandoffId,
    spec: HandoffSpec,
    started: Instant,
    deadline: Instant,
    incumbent: Pid,
    incumbent_alive: bool,
    successor: Option<Pid>,
    successor_alive: bool,
    seal: Option<SealReport>,
    stage: Stage,
    marks: [Option<Instant>; 8],
    /// Build ids the two daemons reported in `HelloAck`.
    incumbent_build: Option<String>,
    successor_build: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum RecStep {
    Connecting,
    Greeting,
    Reclaiming {
        pid: Pid,
        /// Listeners announced by the daemon so far.
        got: u32,
        /// Listeners the driver took and checked so far.
        taken: u32,
        resolution: Option<(HandoffId, Resolution)>,
    },
    RetryWait,
    ColdSpawning,
    Journaling {
        pid: Pid,
        resolution: Option<(HandoffId, Resolution)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Recovery {
    record: Option<JournalRecord>,
    alive: BTreeSet<Pid>,
    /// Pids reported exited while recovering: an answer from one of them is stale.
    exited: BTreeSet<Pid>,
    /// A daemon this recovery started cold, not yet serving. If another one turns out to serve
    /// (it was only slow to answer), this one is killed: it can never get the lock.
    cold_started: Option<Pid>,
    /// What the cold start concluded about the handoff the journal named, reported when the
    /// new daemon is adopted.
    resolution: Option<(HandoffId, Resolution)>,
    wait_until: Instant,
    step: RecStep,
    /// The last daemon that answered, with the build id it reported.
    answered: Option<(Pid, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum State {
    Idle,
    Handoff(Box<Handoff>),
    Recovering(Recovery),
}

#[derive(Clone, Copy)]
enum T {
    Deadline = 0,
    Heartbeat = 1,
    Retry = 2,
}

/// The supervisor's state machine.
///
/// # Driving contract
///
/// - getters: [`incumbent`](Self::incumbent), [`is_idle`](Self::is_idle),
///   [`holds_listeners`](Self::holds_listeners), [`phase_name`](Self::phase_name);
/// - `handle_*`: the channels ([`handle_bytes`](Self::handle_bytes),
///   [`handle_closed`](Self::handle_closed), [`handle_connected`](Self::handle_connected)),
///   process events ([`handle_spawned`](Self::handle_spawned),
///   [`handle_exited`](Self::handle_exited)), the journal
///   ([`handle_journal_written`](Self::handle_journal_written)) and time;
/// - application command: [`handle_trigger`](Self::handle_trigger) starts a handoff or
///   answers [`Busy`];
/// - `poll_*`: [`poll_output`](Self::poll_output), [`poll_timeout`](Self::poll_timeout).
///
/// **Rule:** after every call that takes `now`, drain [`poll_output`](Self::poll_output) until
/// it returns `None`, performing each output in order, then arm a timer for
/// [`poll_timeout`](Self::poll_timeout). Time is an input; the machine never reads a clock.
///
/// The successor is spawned and greeted, and has its listeners, before the incumbent is asked
/// to drain: the window in which nobody accepts new work is drain + seal + the successor's
/// open.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    state: State,
    incumbent: Option<Pid>,
    /// The build id the serving daemon reported.
    serving_build: Option<String>,
    holds_listeners: bool,
    last_handoff: HandoffId,
    inc: Option<Channel>,
    /// The pid of the process at the other end of `inc`, as the driver found it.
    inc_peer: Option<Pid>,
    succ: Option<Channel>,
    timers: Timers<3>,
    out: VecDeque<SupervisorOutput>,
}

impl Supervisor {
    /// A supervisor that holds the listeners and knows the serving daemon (for example one it
    /// just started cold and saw answer). It watches `incumbent`.
    pub fn with_incumbent(cfg: SupervisorConfig, incumbent: Pid, last_handoff: HandoffId) -> Self {
        let mut s = Self::blank(cfg, true, last_handoff);
        s.incumbent = Some(incumbent);
        s.out.push_back(SupervisorOutput::Watch { pid: incumbent });
        s
    }

    /// A supervisor starting up with what its journal says (`None`: no journal). It finds the
    /// serving daemon through the control socket, finishes or rolls back an interrupted
    /// handoff, takes the listeners back if it does not hold them, and starts the daemon cold
    /// if nobody serves.
    pub fn recover(
        cfg: SupervisorConfig,
        now: Instant,
        record: Option<JournalRecord>,
        holds_listeners: bool,
    ) -> Self {
        let last = record
            .as_ref()
            .map_or(HandoffId(0), JournalRecord::last_handoff);
        let mut s = Self::blank(cfg, holds_listeners, last);
        s.enter_recovery(now, record);
        s
    }

    fn blank(cfg: SupervisorConfig, holds_listeners: bool, last_handoff: HandoffId) -> Self {
        Self {
            cfg,
            state: State::Idle,
            incumbent: None,
            serving_build: None,
            holds_listeners,
            last_handoff,
            inc: None,
            inc_peer: None,
            succ: None,
            timers: Timers::new(),
            out: VecDeque::new(),
        }
    }

    // ---- getters ----

    /// The serving daemon, when idle.
    pub fn incumbent(&self) -> Option<Pid> {
        self.incumbent
    }

    /// The build id the serving daemon reported in its `HelloAck`, when known.
    pub fn serving_build(&self) -> Option<&str> {
        self.serving_build.as_deref()
    }

    /// Whether a trigger would start a handoff now.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Whether this process holds the listeners.
    pub fn holds_listeners(&self) -> bool {
        self.holds_listeners
    }

    /// The last handoff id used (the next handoff gets a larger one).
    pub fn last_handoff(&self) -> HandoffId {
        self.last_handoff
    }

    /// The handoff in progress.
    pub fn current_handoff(&self) -> Option<HandoffId> {
        match &self.state {
            State::Handoff(h) => Some(h.id),
            _ => None,
        }
    }

    /// Name of the current phase, for status and logs.
    pub fn phase_name(&self) -> &'static str {
        match &self.state {
            State::Idle => "idle",
            State::Recovering(_) => "recovering",
            State::Handoff(h) => match &h.stage {
                Stage::Spawning => "spawning",
                Stage::JournalInFlight => "journaling start",
                Stage::Greeting => "greeting successor",
                Stage::PassingListeners => "passing listeners",
                Stage::Connecting => "connecting to incumbent",
                Stage::GreetingIncumbent => "greeting incumbent",
                Stage::Draining => "draining",
                Stage::Sealing => "sealing",
                Stage::Begun => "awaiting ready",
                Stage::JournalCommitting => "journaling commit",
                Stage::CommittingSuccessor => "committing successor",
                Stage::CommittingIncumbent => "retiring incumbent",
                Stage::Aborting { .. } => "aborting",
                Stage::Finishing(_) => "finishing",
            },
        }
    }

    // ---- poll ----

    /// The next output to perform.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<SupervisorOutput> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silence = self.cfg.timing.peer_silence;
        let chans = [&self.inc, &self.succ]
            .into_iter()
            .flatten()
            .map(|c| c.last_heard + silence);
        self.timers.next().into_iter().chain(chans).min()
    }

    // ---- application command ----

    /// Start a handoff, or say why not.
    pub fn handle_trigger(&mut self, now: Instant, spec: HandoffSpec) -> Result<HandoffId, Busy> {
        let incumbent = match (&self.state, self.incumbent) {
            (State::Idle, Some(pid)) => pid,
            (State::Handoff(h), _) => {
                return Err(Busy {
                    what: format!("handoff {} is {}", h.id, self.phase_name()),
                    handoff: Some(h.id),
                })
            }
            _ => {
                return Err(Busy {
                    what: "recovering: no confirmed incumbent yet".into(),
                    handoff: None,
                })
            }
        };
        let id = HandoffId(self.last_handoff.0 + 1);
        self.last_handoff = id;
        self.state = State::Handoff(Box::new(Handoff {
            id,
            spec,
            started: now,
            deadline: now + spec.deadline,
            incumbent,
            incumbent_alive: true,
            successor: None,
            successor_alive: false,
            seal: None,
            stage: Stage::Spawning,
            marks: [None; 8],
            incumbent_build: None,
            successor_build: None,
        }));
        self.timers.set(T::Deadline as usize, now + spec.deadline);
        self.timers.set(
            T::Heartbeat as usize,
            now + self.cfg.timing.heartbeat_interval,
        );
        self.out
            .push_back(SupervisorOutput::SpawnSuccessor { handoff: id });
        Ok(id)
    }

    // ---- handle: processes and journal ----

    /// The process requested by `SpawnSuccessor` or `SpawnColdStart` started. A process
    /// reported when no spawn is pending (the handoff ended first) is unwanted: the machine
    /// asks to kill it and reports the misuse.
    pub fn handle_spawned(&mut self, now: Instant, pid: Pid) -> Result<(), Misuse> {
        match &mut self.state {
            State::Handoff(h) if h.stage == Stage::Spawning => {
                h.successor = Some(pid);
                h.successor_alive = true;
                h.marks[Mark::Spawned as usize] = Some(now);
                h.stage = Stage::JournalInFlight;
                let rec = JournalRecord::InFlight {
                    handoff: h.id,
                    incumbent: h.incumbent,
                    successor: pid,
                };
                self.out.push_back(SupervisorOutput::WriteJournal(rec));
                Ok(())
            }
            State::Recovering(r) if r.step == RecStep::ColdSpawning => {
                r.alive.insert(pid);
                r.cold_started = Some(pid);
                r.record = Some(JournalRecord::Idle {
                    serving: Some(pid),
                    last_handoff: self.last_handoff,
                });
                // It takes the lock and binds the control socket; ask again shortly.
                r.step = RecStep::RetryWait;
                r.wait_until = now + self.cfg.recovery_wait;
                self.timers
                    .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
                Ok(())
            }
            _ => {
                // Nobody wants this process any more (the handoff ended first).
                self.out.push_back(SupervisorOutput::Kill { pid });
                Err(Misuse::WrongPhase {
                    input: "spawned",
                    phase: self.phase_name(),
                })
            }
        }
    }

    /// Spawning failed (missing binary, exec error, resource limit).
    pub fn handle_spawn_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        match &mut self.state {
            State::Handoff(h) if h.stage == Stage::Spawning => {
                self.abort(now, AbortReason::SpawnFailed(bounded_text(reason)));
                Ok(())
            }
            State::Recovering(r) if r.step == RecStep::ColdSpawning => {
                r.step = RecStep::RetryWait;
                self.timers
                    .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
                Ok(())
            }
            _ => Err(Misuse::WrongPhase {
                input: "spawn failed",
                phase: self.phase_name(),
            }),
        }
    }

    /// A watched process exited.
    pub fn handle_exited(&mut self, now: Instant, pid: Pid) {
        match &mut self.state {
            State::Idle => {
                if self.incumbent == Some(pid) {
                    let record = JournalRecord::Idle {
                        serving: Some(pid),
                        last_handoff: self.last_handoff,
                    };
                    self.incumbent = None;
                    self.enter_recovery(now, Some(record));
                }
            }
            State::Recovering(r) => {
                r.alive.remove(&pid);
                r.exited.insert(pid);
                // The daemon handing the listeners back died: whatever it still sent is
                // stale, and adopting it would name a dead process as serving. Start over,
                // as when its connection ends first.
                if matches!(r.step, RecStep::Reclaiming { pid: p, .. } if p == pid) {
                    self.retry_recovery(now);
                }
            }
            State::Handoff(h) => {
                if h.successor == Some(pid) && h.successor_alive {
                    h.successor_alive = false;
                    match &h.stage {
                        Stage::Aborting {
                            step: AbortStep::KillingSuccessor,
                            ..
                        } => self.after_successor_gone(now),
                        Stage::Aborting { .. } | Stage::Finishing(_) => {}
                        Stage::CommittingIncumbent => {}
                        _ => self.abort(now, AbortReason::SuccessorExited),
                    }
                } else if h.incumbent == pid && h.incumbent_alive {
                    h.incumbent_alive = false;
                    match &h.stage {
                        // Sealed already: the successor can still take over.
                        Stage::Begun | Stage::JournalCommitting | Stage::CommittingSuccessor => {}
                        Stage::CommittingIncumbent => {
                            let successor = h.successor.expect("committing has a successor");
                            self.finish(Verdict::Committed { successor });
                        }
                        Stage::Aborting {
                            step: AbortStep::KillingSuccessor,
                            ..
                        }
                        | Stage::Finishing(_) => {}
                        Stage::Aborting { reason, .. } => {
                            let reason = reason.clone();
                            self.finish(Verdict::IncumbentLost { reason });
                        }
                        _ => self.abort(
                            now,
                            AbortReason::IncumbentUnreachable("incumbent exited".into()),
                        ),
                    }
                }
            }
        }
    }

    /// The journal record requested last is durable.
    pub fn handle_journal_written(&mut self, now: Instant) -> Result<(), Misuse> {
        match &mut self.state {
            State::Handoff(h) => match &h.stage {
                Stage::JournalInFlight => {
                    h.stage = Stage::Greeting;
                    self.succ = Some(Channel::new(self.cfg.versions, now));
                    let hello = self.hello();
                    self.send(Peer::Successor, hello);
                    Ok(())
                }
                Stage::JournalCommitting => {
                    h.stage = Stage::CommittingSuccessor;
                    let handoff = h.id;
                    self.send(Peer::Successor, Message::Commit { handoff });
                    Ok(())
                }
                Stage::Finishing(v) => {
                    let v = v.clone();
                    self.finish_written(now, v);
                    Ok(())
                }
                _ => Err(self.no_journal_pending()),
            },
            State::Recovering(r) => match &r.step {
                RecStep::Journaling { pid, resolution } => {
                    let (pid, resolution) = (*pid, *resolution);
                    self.state = State::Idle;
                    self.incumbent = Some(pid);
                    self.timers = Timers::new();
                    self.out.push_back(SupervisorOutput::Recovered {
                        serving: pid,
                        resolution,
                    });
                    Ok(())
                }
                _ => Err(self.no_journal_pending()),
            },
            State::Idle => Err(self.no_journal_pending()),
        }
    }

    /// The journal could not be written (full disk, I/O error). Before the commit point this
    /// aborts the handoff; the reason names the error.
    pub fn handle_journal_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        let reason = bounded_text(reason);
        match &mut self.state {
            State::Handoff(h) => match &h.stage {
                Stage::JournalInFlight | Stage::JournalCommitting => {
                    self.abort(now, AbortReason::JournalFailed(reason));
                    Ok(())
                }
                // The outcome stands; a stale record only makes a later recovery look.
                Stage::Finishing(v) => {
                    let v = v.clone();
                    self.finish_written(now, v);
                    Ok(())
                }
                _ => Err(self.no_journal_pending()),
            },
            State::Recovering(r) => match &r.step {
                RecStep::Journaling { .. } => self.handle_journal_written(now),
                _ => Err(self.no_journal_pending()),
            },
            State::Idle => Err(self.no_journal_pending()),
        }
    }

    // ---- handle: channels ----

    /// The control-socket connection requested by `Connect` is up, and `peer` is the pid of
    /// the process at its other end (`SO_PEERCRED`: the one that listens on the socket). The
    /// `HelloAck` must name that pid, or it is refused as a protocol violation
    /// ([`PeerMisbehaved::PeerPidMismatch`]): a daemon's word about who it is counts only when
    /// the kernel agrees. A connection nobody asked for is misuse; the driver closes it.
    pub fn handle_connected(&mut self, now: Instant, peer: Pid) -> Result<(), Misuse> {
        let ok = match &mut self.state {
            State::Handoff(h) => match &mut h.stage {
                Stage::Connecting => {
                    h.stage = Stage::GreetingIncumbent;
                    true
                }
                Stage::Aborting { step, .. } if *step == AbortStep::Connecting => {
                    *step = AbortStep::Confirming;
                    true
                }
                _ => false,
            },
            State::Recovering(r) if r.step == RecStep::Connecting => {
                r.step = RecStep::Greeting;
                true
            }
            _ => false,
        };
        if !ok {
            // Not asked for: the driver closes the socket it opened; any session the machine
            // has stays as it is.
            return Err(Misuse::WrongPhase {
                input: "connected",
                phase: self.phase_name(),
            });
        }
        self.inc = Some(Channel::new(self.cfg.versions, now));
        self.inc_peer = Some(peer);
        let hello = self.hello();
        self.send(Peer::Incumbent, hello);
        Ok(())
    }

    /// The control socket could not be reached.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        match &mut self.state {
            State::Handoff(h) => match &mut h.stage {
                Stage::Connecting => {
                    self.abort(now, AbortReason::IncumbentUnreachable(bounded_text(reason)));
                    Ok(())
                }
                Stage::Aborting { step, .. } if *step == AbortStep::Connecting => {
                    *step = AbortStep::RetryWait;
                    self.timers
                        .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
                    Ok(())
                }
                _ => Err(Misuse::WrongPhase {
                    input: "connect failed",
                    phase: self.phase_name(),
                }),
            },
            State::Recovering(r) if r.step == RecStep::Connecting => {
                self.observe(now, None);
                Ok(())
            }
            _ => Err(Misuse::WrongPhase {
                input: "connect failed",
                phase: self.phase_name(),
            }),
        }
    }

    /// Bytes arrived from a peer.
    pub fn handle_bytes(&mut self, now: Instant, peer: Peer, bytes: &[u8]) -> Result<(), Error> {
        let ch = self.chan_mut(peer).ok_or(Misuse::WrongPhase {
            input: "bytes on a closed channel",
            phase: "-",
        })?;
        ch.decoder.push(bytes);
        loop {
            let Some(ch) = self.chan_mut(peer) else {
                return Ok(());
            };
            match ch.decoder.next_message() {
                Ok(Some(msg)) => self.handle_message(now, peer, msg)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.violation(now, peer, e.into())),
            }
        }
    }

    /// A decoded message arrived from a peer.
    pub fn handle_message(&mut self, now: Instant, peer: Peer, msg: Message) -> Result<(), Error> {
        let ch = self.chan_mut(peer).ok_or(Misuse::WrongPhase {
            input: "message on a closed channel",
            phase: "-",
        })?;
        ch.last_heard = now;
        let negotiated = ch.version().is_some();
        match msg {
            Message::HelloAck(ack) if !negotiated => self.on_hello_ack(now, peer, ack),
            m if !negotiated => {
                Err(self.violation(now, peer, PeerMisbehaved::NotNegotiated { kind: m.kind() }))
            }
            Message::Heartbeat => Ok(()),
            Message::Refused { reason } => {
                self.handle_closed(now, peer);
                Err(PeerMisbehaved::Refused(reason).into())
            }
            m => match peer {
                Peer::Successor => self.on_successor_message(now, m),
                Peer::Incumbent => self.on_incumbent_message(now, m),
            },
        }
    }

    /// A channel closed (EOF or error).
    pub fn handle_closed(&mut self, now: Instant, peer: Peer) {
        let reason = match peer {
            Peer::Successor => AbortReason::SuccessorDisconnected,
            Peer::Incumbent => {
                AbortReason::IncumbentUnreachable("control connection closed".into())
            }
        };
        self.lose_channel(now, peer, reason);
    }

    /// The channel to `peer` is gone; `reason` says how (closed, or silent too long).
    fn lose_channel(&mut self, now: Instant, peer: Peer, reason: AbortReason) {
        if self.chan_mut(peer).is_none() {
            return;
        }
        self.drop_chan(peer);
        match peer {
            Peer::Successor => self.on_successor_closed(now, reason),
            Peer::Incumbent => self.on_incumbent_closed(now, reason),
        }
    }

    /// The driver took and checked the `count` listener descriptors of a
    /// [`SupervisorOutput::TakeListeners`]. When every configured listener is back, recovery
    /// acknowledges them and adopts the daemon that returned them.
    pub fn handle_listeners_taken(&mut self, _now: Instant, count: u32) {
        let want = self.cfg.listeners.len() as u32;
        let State::Recovering(r) = &mut self.state else {
            return;
        };
        let RecStep::Reclaiming {
            pid,
            got,
            taken,
            resolution,
        } = &mut r.step
        else {
            return;
        };
        *taken += count;
        if *taken < want || *taken > *got {
            return;
        }
        let (pid, resolution, count) = (*pid, *resolution, *taken);
        self.send(Peer::Incumbent, Message::ListenersAck { count });
        self.holds_listeners = true;
        self.adopt(pid, resolution);
    }

    /// Listener descriptors taken back during recovery did not match their announcement.
    pub fn handle_listener_error(&mut self, now: Instant, reason: String) {
        if let State::Recovering(r) = &mut self.state {
            if matches!(r.step, RecStep::Reclaiming { .. }) {
                let reason = bounded_text(reason);
                self.send(Peer::Incumbent, Message::Refused { reason });
                self.drop_chan(Peer::Incumbent);
                self.retry_recovery(now);
            }
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silence = self.cfg.timing.peer_silence;
        for peer in [Peer::Successor, Peer::Incumbent] {
            if let Some(ch) = self.chan_mut(peer) {
                if ch.last_heard + silence <= now {
                    self.lose_channel(now, peer, AbortReason::PeerSilent);
                }
            }
        }
        let in_handoff = matches!(self.state, State::Handoff(_));
        if self.timers.expire(T::Heartbeat as usize, now) && in_handoff {
            for peer in [Peer::Successor, Peer::Incumbent] {
                if self.chan_mut(peer).is_some_and(|c| c.version().is_some()) {
                    self.send(peer, Message::Heartbeat);
                }
            }
            let at = now + self.cfg.timing.heartbeat_interval;
            self.timers.set(T::Heartbeat as usize, at);
        }
        if self.timers.expire(T::Deadline as usize, now) {
            self.on_deadline(now);
        }
        if self.timers.expire(T::Retry as usize, now) {
            match &mut self.state {
                State::Handoff(h) => {
                    if let Stage::Aborting { step, .. } = &mut h.stage {
                        if *step == AbortStep::RetryWait {
                            *step = AbortStep::Connecting;
                            self.out.push_back(SupervisorOutput::Connect);
                        }
                    }
                }
                State::Recovering(r) if r.step == RecStep::RetryWait => {
                    r.step = RecStep::Connecting;
                    self.out.push_back(SupervisorOutput::Connect);
                }
                _ => {}
            }
        }
    }

    // ---- internals: handoff ----

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions: self.cfg.versions,
            pid: self.cfg.pid,
            build_id: bounded_text(self.cfg.build_id.clone()),
        })
    }

    fn on_hello_ack(&mut self, now: Instant, peer: Peer, ack: HelloAck) -> Result<(), Error> {
        if !self.cfg.versions.contains(ack.version) {
            let e = PeerMisbehaved::NoCommonVersion(crate::wire::NoCommonVersion {
                ours: self.cfg.versions,
                theirs: crate::wire::VersionRange {
                    min: ack.version,
                    max: ack.version,
                },
            });
            return Err(self.violation(now, peer, e));
        }
        let expected_role = match peer {
            Peer::Successor => PeerRole::Successor,
            Peer::Incumbent => PeerRole::Incumbent,
        };
        if ack.role != expected_role {
            return Err(self.violation(now, peer, PeerMisbehaved::WrongRole { got: ack.role }));
        }
        if peer == Peer::Incumbent {
            if let Some(p) = self.inc_peer.filter(|p| *p != ack.pid) {
                let e = PeerMisbehaved::PeerPidMismatch {
                    peer: p,
                    claimed: ack.pid,
                };
                return Err(self.refuse_incumbent_answer(now, e));
            }
        }
        if let Some(ch) = self.chan_mut(peer) {
            ch.decoder.set_negotiated(ack.version);
        }
        let n_listeners = self.cfg.listeners.len() as u32;
        match (&mut self.state, peer) {
            (State::Handoff(h), Peer::Successor) if h.stage == Stage::Greeting => {
                let expected = h.successor.expect("greeting has a successor");
                if ack.pid != expected {
                    let e = PeerMisbehaved::PidMismatch {
                        expected,
                        got: ack.pid,
                    };
                    return Err(self.violation(now, peer, e));
                }
                h.marks[Mark::Hello as usize] = Some(now);
                h.successor_build = Some(ack.build_id.clone());
                h.stage = Stage::PassingListeners;
                let welcome = Message::Welcome {
                    handoff: h.id,
                    deadline_ms: remaining_ms(h.deadline, now),
                    listeners: n_listeners,
                };
                self.send(Peer::Successor, welcome);
                for batch in listener_batches(&self.cfg.listeners) {
                    self.send(Peer::Successor, Message::Listeners { batch });
                }
                Ok(())
            }
            (State::Handoff(h), Peer::Incumbent) => match &mut h.stage {
                Stage::GreetingIncumbent => {
                    if ack.pid != h.incumbent || ack.status != DaemonStatus::Serving {
                        let why = format!(
                            "control socket answered by pid {} ({:?}), expected serving pid {}",
                            ack.pid, ack.status, h.incumbent
                        );
                        self.abort(now, AbortReason::IncumbentUnreachable(why));
                        return Ok(());
                    }
                    h.stage = Stage::Draining;
                    h.incumbent_build = Some(ack.build_id.clone());
                    h.marks[Mark::Prepare as usize] = Some(now);
                    let prepare = Message::Prepare {
                        handoff: h.id,
                        successor: h.successor.expect("greeted a successor"),
                        drain_grace_ms: h.spec.drain_grace.as_millis() as u64,
                        deadline_ms: remaining_ms(h.deadline, now),
                    };
                    self.send(Peer::Incumbent, prepare);
                    Ok(())
                }
                Stage::Aborting { step, reason, .. } if *step == AbortStep::Confirming => {
                    if ack.pid == h.incumbent && ack.status == DaemonStatus::Serving {
                        h.incumbent_build = Some(ack.build_id.clone());
                        let v = Verdict::RolledBack {
                            incumbent: h.incumbent,
                            reason: reason.clone(),
                            drained: true,
                        };
                        self.finish(v);
                    } else {
                        *step = AbortStep::RetryWait;
                        self.drop_chan(Peer::Incumbent);
                        self.timers
                            .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
                    }
                    Ok(())
                }
                // A greeting that raced with an abort is stale, not misbehaviour.
                Stage::Aborting { .. } | Stage::Finishing(_) => Ok(()),
                _ => Err(self.violation(now, peer, unexpected("HelloAck", "handoff"))),
            },
            (State::Recovering(r), Peer::Incumbent) if r.step == RecStep::Greeting => {
                r.answered = Some((ack.pid, ack.build_id.clone()));
                self.observe(now, Some((ack.pid, ack.status)));
                Ok(())
            }
            _ => Err(self.violation(now, peer, unexpected("HelloAck", "not greeting"))),
        }
    }

    fn on_successor_message(&mut self, now: Instant, m: Message) -> Result<(), Error> {
        let State::Handoff(h) = &mut self.state else {
            return Err(self.violation(now, Peer::Successor, unexpected(m.kind(), "idle")));
        };
        if let Some(got) = m.handoff() {
            if got != h.id {
                let e = PeerMisbehaved::WrongHandoff {
                    expected: h.id,
                    got,
                };
                return Err(self.violation(now, Peer::Successor, e));
            }
        }
        match (m, &h.stage) {
            (Message::ListenersAck { count }, Stage::PassingListeners) => {
                if count as usize != self.cfg.listeners.len() {
                    let e = PeerMisbehaved::ListenerCount(format!(
                        "successor acknowledged {count} of {} listeners",
                        self.cfg.listeners.len()
                    ));
                    return Err(self.violation(now, Peer::Successor, e));
                }
                h.marks[Mark::Listeners as usize] = Some(now);
                h.stage = Stage::Connecting;
                self.out.push_back(SupervisorOutput::Connect);
                Ok(())
            }
            (Message::Ready { readiness, .. }, Stage::Begun) => {
                let seal = h.seal.as_ref().expect("begun after sealed");
                if let Err(why) = seal.accepts(&readiness) {
                    self.abort(now, AbortReason::ReadinessRejected(bounded_text(why)));
                    return Ok(());
                }
                h.marks[Mark::Ready as usize] = Some(now);
                h.stage = Stage::JournalCommitting;
                let rec = JournalRecord::Committing {
                    handoff: h.id,
                    incumbent: h.incumbent,
                    successor: h.successor.expect("begun has a successor"),
                };
                self.out.push_back(SupervisorOutput::WriteJournal(rec));
                Ok(())
            }
            (Message::CommitAck { .. }, Stage::CommittingSuccessor) => {
                h.marks[Mark::Committed as usize] = Some(now);
                h.stage = Stage::CommittingIncumbent;
                let (handoff, alive) = (h.id, h.incumbent_alive);
                let successor = h.successor.expect("committing has a successor");
                if alive && self.inc.as_ref().is_some_and(|c| c.version().is_some()) {
                    self.send(Peer::Incumbent, Message::Commit { handoff });
                } else if !alive {
                    self.finish(Verdict::Committed { successor });
                }
                // Otherwise the incumbent lost its session; it learns the outcome from the
                // lock record and exits, and its exit finishes the handoff.
                Ok(())
            }
            // Messages that raced with an abort are stale, not misbehaviour.
            (_, Stage::Aborting { .. } | Stage::Finishing(_)) => Ok(()),
            (m, _) => {
                let phase = self.phase_name();
                Err(self.violation(now, Peer::Successor, unexpected(m.kind(), phase)))
            }
        }
    }

    fn on_incumbent_message(&mut self, now: Instant, m: Message) -> Result<(), Error> {
        if let State::Recovering(r) = &mut self.state {
            return match (m, &mut r.step) {
                (Message::Listeners { batch }, RecStep::Reclaiming { got, .. }) => {
                    *got += batch.len() as u32;
                    let got = *got;
                    let want = self.cfg.listeners.len() as u32;
                    if got > want {
                        let e = PeerMisbehaved::ListenerCount(format!(
                            "{got} listeners returned, {want} configured"
                        ));
                        return Err(self.violation(now, Peer::Incumbent, e));
                    }
                    // Adopted in `handle_listeners_taken`, once the driver has the descriptors
                    // and found them to be the configured listeners.
                    self.out
                        .push_back(SupervisorOutput::TakeListeners { batch });
                    Ok(())
                }
                (m, _) => {
                    Err(self.violation(now, Peer::Incumbent, unexpected(m.kind(), "recovering")))
                }
            };
        }
        let State::Handoff(h) = &mut self.state else {
            return Err(self.violation(now, Peer::Incumbent, unexpected(m.kind(), "idle")));
        };
        if let Some(got) = m.handoff() {
            if got != h.id {
                let e = PeerMisbehaved::WrongHandoff {
                    expected: h.id,
                    got,
                };
                return Err(self.violation(now, Peer::Incumbent, e));
            }
        }
        match (m, &mut h.stage) {
            (Message::Drained { .. }, Stage::Draining) => {
                h.marks[Mark::Drained as usize] = Some(now);
                h.stage = Stage::Sealing;
                let handoff = h.id;
                self.send(Peer::Incumbent, Message::Seal { handoff });
                Ok(())
            }
            (Message::DrainFailed { reason, .. }, Stage::Draining) => {
                self.abort(now, AbortReason::DrainFailed(bounded_text(reason)));
                Ok(())
            }
            (Message::Sealed { report, .. }, Stage::Sealing) => {
                h.marks[Mark::Sealed as usize] = Some(now);
                h.stage = Stage::Begun;
                h.seal = Some(report.clone());
                let handoff = h.id;
                self.send(
                    Peer::Successor,
                    Message::Begin {
                        handoff,
                        seal: report,
                    },
                );
                Ok(())
            }
            (Message::SealFailed { reason, .. }, Stage::Sealing) => {
                self.abort(now, AbortReason::SealFailed(bounded_text(reason)));
                Ok(())
            }
            (Message::CommitAck { .. }, Stage::CommittingIncumbent) => {
                let successor = h.successor.expect("committing has a successor");
                self.finish(Verdict::Committed { successor });
                Ok(())
            }
            (
                Message::Resumed { .. },
                Stage::Aborting {
                    step: AbortStep::Notifying,
                    reason,
                    ..
                },
            ) => {
                let v = Verdict::RolledBack {
                    incumbent: h.incumbent,
                    reason: reason.clone(),
                    drained: true,
                };
                self.finish(v);
                Ok(())
            }
            // The incumbent retries its resume hook; keep waiting until the deadline.
            (Message::ResumeFailed { .. }, Stage::Aborting { .. }) => Ok(()),
            // Messages that raced with an abort are stale, not misbehaviour.
            (_, Stage::Aborting { .. } | Stage::Finishing(_)) => Ok(()),
            (m, _) => {
                let phase = self.phase_name();
                Err(self.violation(now, Peer::Incumbent, unexpected(m.kind(), phase)))
            }
        }
    }

    fn on_successor_closed(&mut self, now: Instant, reason: AbortReason) {
        if let State::Handoff(h) = &self.state {
            let before_ack = matches!(
                h.stage,
                Stage::Spawning
                    | Stage::JournalInFlight
                    | Stage::Greeting
                    | Stage::PassingListeners
                    | Stage::Connecting
                    | Stage::GreetingIncumbent
                    | Stage::Draining
                    | Stage::Sealing
                    | Stage::Begun
                    | Stage::JournalCommitting
                    | Stage::CommittingSuccessor
            );
            if before_ack {
                self.abort(now, reason);
            }
        }
    }

    fn on_incumbent_closed(&mut self, now: Instant, reason: AbortReason) {
        match &mut self.state {
            State::Handoff(h) => match &mut h.stage {
                Stage::GreetingIncumbent | Stage::Draining | Stage::Sealing => {
                    self.abort(now, reason)
                }
                Stage::Aborting { step, .. }
                    if matches!(step, AbortStep::Notifying | AbortStep::Confirming) =>
                {
                    *step = AbortStep::RetryWait;
                    self.timers
                        .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
                }
                // After Sealed the incumbent decides from the lock record; its exit or a
                // reconnect tells us the rest.
                _ => {}
            },
            State::Recovering(r) => {
                if matches!(r.step, RecStep::Greeting | RecStep::Reclaiming { .. }) {
                    self.retry_recovery(now);
                }
            }
            State::Idle => {}
        }
    }

    fn on_deadline(&mut self, now: Instant) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        match &h.stage {
            // Never asked to drain: the incumbent serves whatever became of the successor.
            Stage::Aborting {
                reason,
                touched: false,
                ..
            } => {
                let v = Verdict::RolledBack {
                    incumbent: h.incumbent,
                    reason: reason.clone(),
                    drained: false,
                };
                self.finish(v);
            }
            Stage::Aborting { reason, .. } => {
                let reason = reason.clone();
                self.finish(Verdict::IncumbentLost { reason });
            }
            // Committing, but the successor has not acknowledged by the deadline plus slack:
            // stop waiting. `abort` kills it and waits for its exit before the incumbent takes
            // the lock back, so this is safe even if it did commit.
            Stage::CommittingSuccessor => {
                let hard = h.deadline + self.cfg.timing.slack;
                if now >= hard {
                    self.abort(now, AbortReason::DeadlineExceeded);
                } else {
                    self.timers.set(T::Deadline as usize, hard);
                }
            }
            // The successor serves; the old incumbent neither acknowledged nor exited by the
            // deadline plus slack: kill it (it no longer holds the lock).
            Stage::CommittingIncumbent => {
                let successor = h.successor.expect("committing has a successor");
                let hard = h.deadline + self.cfg.timing.slack;
                if now >= hard {
                    let pid = h.incumbent;
                    self.out.push_back(SupervisorOutput::Kill { pid });
                    self.finish(Verdict::Committed { successor });
                } else {
                    self.timers.set(T::Deadline as usize, hard);
                }
            }
            Stage::Finishing(_) => {}
            _ => self.abort(now, AbortReason::DeadlineExceeded),
        }
    }

    /// Abandon the handoff: stop the successor, wait until it is gone (so its lock is free),
    /// then have the incumbent take the lock back and confirm it serves.
    fn abort(&mut self, now: Instant, reason: AbortReason) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        // Once the successor acknowledged Commit it serves: nothing aborts the handoff any
        // more (a successor that misbehaves or dies after that is a daemon crash, which
        // recovery handles once the handoff is over).
        if matches!(
            h.stage,
            Stage::Aborting { .. } | Stage::Finishing(_) | Stage::CommittingIncumbent
        ) {
            return;
        }
        let touched = !matches!(
            h.stage,
            Stage::Spawning
                | Stage::JournalInFlight
                | Stage::Greeting
                | Stage::PassingListeners
                | Stage::Connecting
                | Stage::GreetingIncumbent
        );
        h.stage = Stage::Aborting {
            reason: reason.clone(),
            touched,
            step: AbortStep::KillingSuccessor,
        };
        let hard = h.deadline.max(now) + self.cfg.timing.slack;
        self.timers.set(T::Deadline as usize, hard);
        let (handoff, successor, alive) = (h.id, h.successor, h.successor_alive);
        if !touched {
            // The incumbent was never asked to do anything: end that session now.
            self.drop_chan(Peer::Incumbent);
        }
        if self.succ.as_ref().is_some_and(|c| c.version().is_some()) {
            self.send(Peer::Successor, Message::Abort { handoff, reason });
        }
        self.drop_chan(Peer::Successor);
        match successor {
            Some(pid) if alive => self.out.push_back(SupervisorOutput::Kill { pid }),
            _ => self.after_successor_gone(now),
        }
    }

    fn after_successor_gone(&mut self, _now: Instant) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        let Stage::Aborting {
            reason,
            touched,
            step,
        } = &mut h.stage
        else {
            return;
        };
        let reason = reason.clone();
        if !h.incumbent_alive {
            return self.finish(Verdict::IncumbentLost { reason });
        }
        if !*touched {
            let incumbent = h.incumbent;
            return self.finish(Verdict::RolledBack {
                incumbent,
                reason,
                drained: false,
            });
        }
        let handoff = h.id;
        if self.inc.as_ref().is_some_and(|c| c.version().is_some()) {
            *step = AbortStep::Notifying;
            self.send(Peer::Incumbent, Message::Abort { handoff, reason });
        } else {
            *step = AbortStep::Connecting;
            self.drop_chan(Peer::Incumbent);
            self.out.push_back(SupervisorOutput::Connect);
        }
    }

    /// Record the end in the journal; the outcome is reported once that is durable.
    fn finish(&mut self, verdict: Verdict) {
        self.drop_chan(Peer::Incumbent);
        // A committed successor's channel has served its purpose too.
        self.drop_chan(Peer::Successor);
        self.timers.stop(T::Heartbeat as usize);
        self.timers.stop(T::Retry as usize);
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        let serving = match &verdict {
            Verdict::Committed { successor } => Some(*successor),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent),
            Verdict::IncumbentLost { .. } => None,
        };
        self.serving_build = match &verdict {
            Verdict::Committed { .. } => h.successor_build.clone(),
            Verdict::RolledBack { .. } => h
                .incumbent_build
                .clone()
                .or_else(|| self.serving_build.take()),
            Verdict::IncumbentLost { .. } => None,
        };
        let rec = JournalRecord::Idle {
            serving,
            last_handoff: h.id,
        };
        h.stage = Stage::Finishing(verdict);
        self.out.push_back(SupervisorOutput::WriteJournal(rec));
    }

    fn finish_written(&mut self, now: Instant, verdict: Verdict) {
        let State::Handoff(h) = &self.state else {
            return;
        };
        let m = |k: Mark| h.marks[k as usize];
        let span = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a)),
            _ => None,
        };
        let times = PhaseTimes {
            spawn_to_hello: span(Some(h.started), m(Mark::Hello)),
            listeners: span(m(Mark::Hello), m(Mark::Listeners)),
            greet_incumbent: span(m(Mark::Listeners), m(Mark::Prepare)),
            drain: span(m(Mark::Prepare), m(Mark::Drained)),
            seal: span(m(Mark::Drained), m(Mark::Sealed)),
            begin_to_ready: span(m(Mark::Sealed), m(Mark::Ready)),
            commit: span(m(Mark::Ready), m(Mark::Committed)),
            to_commit: span(Some(h.started), m(Mark::Committed)),
            total: now.saturating_duration_since(h.started),
        };
        let (id, successor_alive, incumbent_alive) = (h.id, h.successor_alive, h.incumbent_alive);
        let serving = match &verdict {
            Verdict::Committed { successor } => Some(*successor).filter(|_| successor_alive),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent).filter(|_| incumbent_alive),
            Verdict::IncumbentLost { .. } => None,
        };
        // Recovery watches whoever may still serve: a process that died right after the
        // verdict, or the incumbent nobody could confirm.
        let suspect = match &verdict {
            Verdict::Committed { successor } => Some(*successor).filter(|_| !successor_alive),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent).filter(|_| !incumbent_alive),
            Verdict::IncumbentLost { .. } => Some(h.incumbent).filter(|_| incumbent_alive),
        };
        self.timers = Timers::new();
        self.state = State::Idle;
        self.incumbent = serving;
        self.out.push_back(SupervisorOutput::Outcome(Outcome {
            handoff: id,
            verdict,
            times,
        }));
        match serving {
            Some(_) => {}
            None => {
                let record = JournalRecord::Idle {
                    serving: suspect,
                    last_handoff: id,
                };
                self.enter_recovery(now, Some(record));
            }
        }
    }

    // ---- internals: recovery ----

    fn enter_recovery(&mut self, now: Instant, record: Option<JournalRecord>) {
        let pids = record.as_ref().map(JournalRecord::pids).unwrap_or_default();
        for &pid in &pids {
            self.out.push_back(SupervisorOutput::Watch { pid });
        }
        self.drop_chan(Peer::Incumbent);
        self.drop_chan(Peer::Successor);
        self.timers = Timers::new();
        self.state = State::Recovering(Recovery {
            record,
            alive: pids.into_iter().collect(),
            exited: BTreeSet::new(),
            cold_started: None,
            resolution: None,
            wait_until: now + self.cfg.recovery_wait,
            step: RecStep::Connecting,
            answered: None,
        });
        self.out.push_back(SupervisorOutput::Connect);
    }

    fn observe(&mut self, now: Instant, answer: Option<(Pid, DaemonStatus)>) {
        let State::Recovering(r) = &self.state else {
            return;
        };
        let obs = Observation {
            alive: r.alive.iter().copied().collect(),
            answer: answer.filter(|(pid, _)| !r.exited.contains(pid)),
            waited_out: now >= r.wait_until,
        };
        let decision = decide(r.record.as_ref(), &obs);
        match decision {
            Decision::Adopt { pid, resolution } => {
                let mut resolution = resolution;
                if let State::Recovering(r) = &mut self.state {
                    resolution = resolution.or(r.resolution.take());
                    if let Some(cold) = r.cold_started.take().filter(|c| *c != pid) {
                        self.out.push_back(SupervisorOutput::Kill { pid: cold });
                    }
                    if r.alive.insert(pid) {
                        self.out.push_back(SupervisorOutput::Watch { pid });
                    }
                }
                if self.holds_listeners {
                    self.adopt(pid, resolution);
                } else {
                    if let State::Recovering(r) = &mut self.state {
                        r.step = RecStep::Reclaiming {
                            pid,
                            got: 0,
                            taken: 0,
                            resolution,
                        };
                    }
                    self.send(Peer::Incumbent, Message::ReturnListeners);
                }
            }
            Decision::Wait => self.retry_recovery(now),
            Decision::ColdStart { kill, resolution } => {
                for k in kill {
                    self.out.push_back(SupervisorOutput::Kill { pid: k });
                }
                self.drop_chan(Peer::Incumbent);
                if let State::Recovering(r) = &mut self.state {
                    r.step = RecStep::ColdSpawning;
                    r.resolution = r.resolution.or(resolution);
                }
                self.out.push_back(SupervisorOutput::SpawnColdStart);
                // A cold start brings listeners with it (the driver binds them if we had none).
                self.holds_listeners = true;
            }
        }
    }

    fn retry_recovery(&mut self, now: Instant) {
        self.drop_chan(Peer::Incumbent);
        if let State::Recovering(r) = &mut self.state {
            r.step = RecStep::RetryWait;
            self.timers
                .set(T::Retry as usize, now + self.cfg.timing.retry_interval);
        }
    }

    fn adopt(&mut self, pid: Pid, resolution: Option<(HandoffId, Resolution)>) {
        self.drop_chan(Peer::Incumbent);
        if let State::Recovering(r) = &mut self.state {
            self.serving_build = match &r.answered {
                Some((p, build)) if *p == pid => Some(build.clone()),
                _ => None,
            };
            r.step = RecStep::Journaling { pid, resolution };
            let rec = JournalRecord::Idle {
                serving: Some(pid),
                last_handoff: self.last_handoff,
            };
            self.out.push_back(SupervisorOutput::WriteJournal(rec));
        }
    }

    // ---- internals: channels ----

    fn chan_mut(&mut self, peer: Peer) -> Option<&mut Channel> {
        match peer {
            Peer::Incumbent => self.inc.as_mut(),
            Peer::Successor => self.succ.as_mut(),
        }
    }

    fn drop_chan(&mut self, peer: Peer) {
        let slot = match peer {
            Peer::Incumbent => &mut self.inc,
            Peer::Successor => &mut self.succ,
        };
        if slot.take().is_some() {
            self.out.push_back(SupervisorOutput::Close { peer });
        }
        if peer == Peer::Incumbent {
            self.inc_peer = None;
        }
    }

    fn send(&mut self, to: Peer, message: Message) {
        let frame = match self.chan_mut(to) {
            Some(ch) => ch.frame(message),
            None => return,
        };
        self.out.push_back(SupervisorOutput::Send { to, frame });
    }

    fn no_journal_pending(&self) -> Misuse {
        Misuse::WrongPhase {
            input: "journal written",
            phase: self.phase_name(),
        }
    }

    /// The peer broke the protocol: tell it, close the channel, and let the closing take its
    /// course (abort the handoff, or retry the recovery).
    fn violation(&mut self, now: Instant, peer: Peer, e: PeerMisbehaved) -> Error {
        let reason = bounded_text(e.to_string());
        self.send(
            peer,
            Message::Refused {
                reason: reason.clone(),
            },
        );
        if let State::Handoff(h) = &self.state {
            if matches!(h.stage, Stage::CommittingIncumbent | Stage::Finishing(_)) {
                // The successor committed; its channel has served its purpose.
                self.drop_chan(peer);
                return e.into();
            }
        }
        if let State::Handoff(_) = self.state {
            if peer == Peer::Successor || self.pre_seal() {
                self.drop_chan(peer);
                self.abort(now, AbortReason::ProtocolViolation(reason));
                return e.into();
            }
        }
        self.handle_closed(now, peer);
        e.into()
    }

    /// The incumbent's answer cannot be believed (`e`). During a handoff this is a violation
    /// like any other. A recovery refuses it and decides as if nobody had answered: the
    /// process that sent it is not adopted, and, unlike a closed connection, it is not asked
    /// again and again while it holds the control socket (a cold-started daemon binds over it).
    fn refuse_incumbent_answer(&mut self, now: Instant, e: PeerMisbehaved) -> Error {
        if matches!(&self.state, State::Recovering(r) if r.step == RecStep::Greeting) {
            let reason = bounded_text(e.to_string());
            self.send(Peer::Incumbent, Message::Refused { reason });
            self.drop_chan(Peer::Incumbent);
            self.observe(now, None);
            return e.into();
        }
        self.violation(now, Peer::Incumbent, e)
    }

    fn pre_seal(&self) -> bool {
        matches!(&self.state, State::Handoff(h) if matches!(
            h.stage,
            Stage::GreetingIncumbent | Stage::Draining | Stage::Sealing
        ))
    }
}

fn remaining_ms(deadline: Instant, now: Instant) -> u64 {
    deadline.saturating_duration_since(now).as_millis() as u64
}

fn unexpected(kind: &'static str, phase: &'static str) -> PeerMisbehaved {
    PeerMisbehaved::UnexpectedMessage { kind, phase }
}
