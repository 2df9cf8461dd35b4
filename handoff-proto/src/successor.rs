//! The successor: a new daemon spawned for one handoff. It answers the supervisor, receives the
//! listeners, waits for `Begin`, takes the lock, lets the application open the data, declares
//! ready and, once committed, becomes the incumbent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::incumbent::{DaemonConfig, LockResult};
use crate::timer::{TimerKey, Timers};
use crate::types::{
    AbortReason, HandoffId, ListenerInfo, ReadinessSnapshot, SealReport, MAX_FDS_PER_MESSAGE,
};
use crate::wire::{bounded_text, DaemonStatus, Frame, HelloAck, Message, PeerRole};

/// What the successor asks its driver (and through it, the application) to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "outputs are obligations: perform every one"]
pub enum SuccessorOutput {
    /// Write the frame to the supervisor.
    Send(Frame),
    /// The frame just decoded announced these listeners: pair them, in order, with the
    /// descriptors that arrived with it and check each one's kind. On a mismatch call
    /// [`Successor::handle_listener_error`].
    TakeListeners {
        /// Names and kinds, in descriptor order.
        batch: Vec<ListenerInfo>,
    },
    /// Take the data-directory lock (non-blocking), then feed [`Successor::handle_lock`].
    AcquireLock,
    /// The lock is ours: the application may open the data now, then call
    /// [`Successor::ready`].
    Begun {
        /// The handoff.
        handoff: HandoffId,
        /// What the incumbent sealed.
        seal: SealReport,
    },
    /// Mark the lock record committed for this handoff. Performed before the `CommitAck` that
    /// follows it, so an incumbent that lost the supervisor can learn the outcome.
    MarkCommitted {
        /// The handoff.
        handoff: HandoffId,
    },
    /// Committed: this process is now the incumbent. Bind the control socket and serve.
    Committed {
        /// The handoff.
        handoff: HandoffId,
    },
    /// The handoff failed for this process: exit (which releases the lock if held).
    Exit {
        /// Why.
        reason: AbortReason,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    AwaitHello,
    AwaitWelcome,
    Listeners {
        handoff: HandoffId,
        expected: u32,
        got: u32,
    },
    AwaitBegin {
        handoff: HandoffId,
    },
    Locking {
        handoff: HandoffId,
        seal: SealReport,
    },
    Opening {
        handoff: HandoffId,
    },
    AwaitCommit {
        handoff: HandoffId,
    },
    Committed {
        handoff: HandoffId,
    },
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum T {
    Heartbeat,
    Deadline,
}

impl TimerKey for T {
    type Slots = [Option<Instant>; 2];

    fn slot(self) -> usize {
        match self {
            T::Heartbeat => 0,
            T::Deadline => 1,
        }
    }
}

/// The successor's state machine.
///
/// # Driving contract
///
/// - getters: [`phase_name`](Self::phase_name), [`holds_lock`](Self::holds_lock),
///   [`is_committed`](Self::is_committed);
/// - `handle_*`: bytes from the supervisor's channel, its closing, the lock result, listener
///   check failures, and time;
/// - application command: [`ready`](Self::ready), once the data is open;
/// - `poll_*`: [`poll_output`](Self::poll_output), [`poll_timeout`](Self::poll_timeout).
///
/// **Rule:** after every `handle_*` or [`ready`](Self::ready) call, drain
/// [`poll_output`](Self::poll_output) until it returns `None`, performing each output in order,
/// then arm a timer for [`poll_timeout`](Self::poll_timeout). Time is an input.
///
/// There is no fixed limit between `Begin` and `Ready`: a successor that takes long to open its
/// data is aborted only by the handoff's overall deadline, and the machine sends the heartbeats
/// that keep the supervisor waiting until then.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Successor {
    cfg: DaemonConfig,
    phase: Phase,
    ch: Channel,
    timers: Timers<T>,
    out: VecDeque<SuccessorOutput>,
}

impl Successor {
    /// A successor just started, waiting for the supervisor's `Hello`.
    pub fn new(cfg: DaemonConfig, now: Instant) -> Self {
        let ch = Channel::new(cfg.versions, now);
        Self {
            cfg,
            phase: Phase::AwaitHello,
            ch,
            timers: Timers::new(),
            out: VecDeque::new(),
        }
    }

    // ---- getters ----

    /// Name of the current phase, for logs.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::AwaitHello => "awaiting hello",
            Phase::AwaitWelcome => "awaiting welcome",
            Phase::Listeners { .. } => "receiving listeners",
            Phase::AwaitBegin { .. } => "awaiting begin",
            Phase::Locking { .. } => "taking the lock",
            Phase::Opening { .. } => "opening the data",
            Phase::AwaitCommit { .. } => "awaiting commit",
            Phase::Committed { .. } => "committed",
            Phase::Failed => "failed",
        }
    }

    /// Whether, as far as the machine knows, this process holds the data-directory lock.
    pub fn holds_lock(&self) -> bool {
        matches!(
            self.phase,
            Phase::Opening { .. } | Phase::AwaitCommit { .. } | Phase::Committed { .. }
        )
    }

    /// Whether the handoff committed (this process is the incumbent now).
    pub fn is_committed(&self) -> bool {
        matches!(self.phase, Phase::Committed { .. })
    }

    /// Whether the machine gave up.
    pub fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Failed)
    }

    /// Whether every announced listener has arrived (the handshake is complete).
    pub fn listeners_received(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitBegin { .. }
                | Phase::Locking { .. }
                | Phase::Opening { .. }
                | Phase::AwaitCommit { .. }
                | Phase::Committed { .. }
        )
    }

    /// While the lock is being taken (after `Begin`): the handoff and what the incumbent
    /// sealed.
    pub fn begin(&self) -> Option<(HandoffId, &SealReport)> {
        match &self.phase {
            Phase::Locking { handoff, seal } => Some((*handoff, seal)),
            _ => None,
        }
    }

    /// The handoff this successor was started for, once known.
    pub fn handoff(&self) -> Option<HandoffId> {
        match self.phase {
            Phase::Listeners { handoff, .. }
            | Phase::AwaitBegin { handoff }
            | Phase::Locking { handoff, .. }
            | Phase::Opening { handoff }
            | Phase::AwaitCommit { handoff }
            | Phase::Committed { handoff } => Some(handoff),
            _ => None,
        }
    }

    // ---- poll ----

    /// The next output to perform.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<SuccessorOutput> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silence = self
            .waiting()
            .then(|| self.ch.last_heard + self.cfg.timing.peer_silence);
        self.timers.next().into_iter().chain(silence).min()
    }

    // ---- handle ----

    /// Bytes arrived from the supervisor.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) -> Result<(), Error> {
        self.ch.decoder.push(bytes);
        loop {
            if !self.waiting() {
                return Ok(());
            }
            match self.ch.decoder.next_message() {
                Ok(Some(msg)) => self.handle_message(now, msg)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.violation(e.into())),
            }
        }
    }

    /// A decoded message arrived from the supervisor.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), Error> {
        if !self.waiting() {
            // Committed or failed: the channel no longer matters.
            return Ok(());
        }
        self.ch.last_heard = now;
        if let Message::Hello(hello) = &msg {
            if self.phase != Phase::AwaitHello {
                return Err(self.unexpected("Hello"));
            }
            if hello.role != PeerRole::Supervisor {
                return Err(self.violation(PeerMisbehaved::WrongRole { got: hello.role }));
            }
            let version = match self.cfg.versions.negotiate(hello.versions) {
                Ok(v) => v,
                Err(e) => return Err(self.violation(e.into())),
            };
            self.ch.decoder.set_negotiated(version);
            self.send(Message::HelloAck(HelloAck {
                role: PeerRole::Successor,
                version,
                pid: self.cfg.pid,
                build_id: bounded_text(self.cfg.build_id.clone()),
                status: DaemonStatus::Successor,
            }));
            self.timers
                .set(T::Heartbeat, now + self.cfg.timing.heartbeat_interval);
            self.phase = Phase::AwaitWelcome;
            return Ok(());
        }
        if self.ch.version().is_none() {
            return Err(self.violation(PeerMisbehaved::NotNegotiated { kind: msg.kind() }));
        }
        if let (Some(got), Some(expected)) = (msg.handoff(), self.handoff()) {
            if got != expected {
                return Err(self.violation(PeerMisbehaved::WrongHandoff { expected, got }));
            }
        }
        match (msg, &mut self.phase) {
            (Message::Heartbeat, _) => {}
            (Message::Abort { reason, .. }, _) => self.fail(reason),
            (Message::Refused { reason }, _) => {
                self.fail(AbortReason::ProtocolViolation(bounded_text(reason)))
            }
            (
                Message::Welcome {
                    handoff,
                    deadline_ms,
                    listeners,
                },
                Phase::AwaitWelcome,
            ) => {
                let d = Duration::from_millis(deadline_ms) + self.cfg.timing.slack;
                self.timers.set(T::Deadline, now + d);
                self.phase = Phase::Listeners {
                    handoff,
                    expected: listeners,
                    got: 0,
                };
            }
            (
                Message::Listeners { batch },
                Phase::Listeners {
                    expected,
                    got,
                    handoff,
                },
            ) => {
                let n = batch.len() as u32;
                if batch.len() > MAX_FDS_PER_MESSAGE || *got + n > *expected {
                    let e = format!(
                        "batch of {n} after {got} of {expected} listeners (at most {MAX_FDS_PER_MESSAGE} a batch)"
                    );
                    return Err(self.violation(PeerMisbehaved::ListenerCount(e)));
                }
                *got += n;
                let (done, count, handoff) = (*got == *expected, *got, *handoff);
                self.out.push_back(SuccessorOutput::TakeListeners { batch });
                if done {
                    self.phase = Phase::AwaitBegin { handoff };
                    self.send(Message::ListenersAck { count });
                }
            }
            (Message::Begin { handoff, seal }, Phase::AwaitBegin { .. }) => {
                self.phase = Phase::Locking { handoff, seal };
                self.out.push_back(SuccessorOutput::AcquireLock);
            }
            (Message::Commit { handoff }, Phase::AwaitCommit { .. }) => {
                self.out
                    .push_back(SuccessorOutput::MarkCommitted { handoff });
                self.send(Message::CommitAck { handoff });
                self.out.push_back(SuccessorOutput::Committed { handoff });
                self.phase = Phase::Committed { handoff };
                self.timers = Timers::new();
            }
            (other, _) => return Err(self.unexpected(other.kind())),
        }
        Ok(())
    }

    /// The supervisor's channel closed. Before commit this ends the handoff for us.
    pub fn handle_closed(&mut self, _now: Instant) {
        if self.waiting() {
            self.fail(AbortReason::SupervisorLost);
        }
    }

    /// The lock attempt requested by [`SuccessorOutput::AcquireLock`] finished.
    pub fn handle_lock(&mut self, _now: Instant, result: LockResult) -> Result<(), Misuse> {
        let Phase::Locking { handoff, seal } = &self.phase else {
            return Err(Misuse::NoLockPending);
        };
        let (handoff, seal) = (*handoff, seal.clone());
        match result {
            LockResult::Acquired { .. } => {
                self.phase = Phase::Opening { handoff };
                self.out.push_back(SuccessorOutput::Begun { handoff, seal });
            }
            LockResult::Held(_) => self.fail(AbortReason::LockUnavailable),
        }
        Ok(())
    }

    /// The driver found that the received descriptors do not match the announced listeners.
    pub fn handle_listener_error(&mut self, _now: Instant, reason: String) {
        if self.waiting() {
            let reason = bounded_text(reason);
            self.send(Message::Refused {
                reason: reason.clone(),
            });
            self.fail(AbortReason::ListenerMismatch(reason));
        }
    }

    /// The application opened the data: declare ready. Only possible after
    /// [`SuccessorOutput::Begun`], that is, while this process holds the lock.
    pub fn ready(&mut self, _now: Instant, readiness: ReadinessSnapshot) -> Result<(), Misuse> {
        let Phase::Opening { handoff } = self.phase else {
            return Err(Misuse::WrongPhase {
                input: "ready",
                phase: self.phase_name(),
            });
        };
        self.send(Message::Ready { handoff, readiness });
        self.phase = Phase::AwaitCommit { handoff };
        Ok(())
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.waiting() {
            return;
        }
        if self.timers.expire(T::Deadline, now) {
            return self.fail(AbortReason::DeadlineExceeded);
        }
        if self.ch.last_heard + self.cfg.timing.peer_silence <= now {
            return self.fail(AbortReason::PeerSilent);
        }
        if self.timers.expire(T::Heartbeat, now) {
            self.send(Message::Heartbeat);
            self.timers
                .set(T::Heartbeat, now + self.cfg.timing.heartbeat_interval);
        }
    }

    // ---- internals ----

    /// Still in the handoff: neither committed nor failed.
    fn waiting(&self) -> bool {
        !matches!(self.phase, Phase::Committed { .. } | Phase::Failed)
    }

    fn send(&mut self, message: Message) {
        let frame = self.ch.frame(message);
        self.out.push_back(SuccessorOutput::Send(frame));
    }

    fn fail(&mut self, reason: AbortReason) {
        self.phase = Phase::Failed;
        self.timers = Timers::new();
        self.out.push_back(SuccessorOutput::Exit { reason });
    }

    fn unexpected(&mut self, kind: &'static str) -> Error {
        let phase = self.phase_name();
        self.violation(PeerMisbehaved::UnexpectedMessage { kind, phase })
    }

    fn violation(&mut self, e: PeerMisbehaved) -> Error {
        let reason = bounded_text(e.to_string());
        self.send(Message::Refused {
            reason: reason.clone(),
        });
        self.fail(AbortReason::ProtocolViolation(reason));
        e.into()
    }
}
