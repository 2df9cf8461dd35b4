//! The supervisor: holds the listeners, runs one handoff at a time, journals before every
//! irreversible step, and recovers from its own restart.
//!
//! The machine has two halves: `handoff` runs a handoff (spawn, greet, pass the listeners,
//! drain, seal, begin, commit or abort), and `recovery` finds whoever serves after a restart
//! or a crash (journal decision, listener reclaim, cold start with backoff). This module holds
//! the state they share, the public inputs, and the channels.

mod handoff;
mod recovery;
mod stage;
mod types;

use std::collections::VecDeque;
use std::time::Instant;

use crate::channel::Channel;
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::journal::JournalRecord;
use crate::timer::{TimerKey, Timers};
use crate::types::{AbortReason, HandoffId, Pid};
use crate::wire::{bounded_text, Hello, HelloAck, Message, PeerRole};

use recovery::{Backoff, Recovery};
use stage::Handoff;
pub use types::{
    Busy, HandoffSpec, Outcome, Peer, PhaseTimes, SupervisorConfig, SupervisorOutput, Verdict,
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum State {
    /// A confirmed daemon serves; a trigger starts a handoff.
    Idle {
        serving: Pid,
    },
    Handoff(Box<Handoff>),
    Recovering(Recovery),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum T {
    Deadline,
    Heartbeat,
    Retry,
}

impl TimerKey for T {
    type Slots = [Option<Instant>; 3];

    fn slot(self) -> usize {
        match self {
            T::Deadline => 0,
            T::Heartbeat => 1,
            T::Retry => 2,
        }
    }
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
/// Nothing has to withhold time from it: the crash backoff between recovery attempts and cold
/// starts is its own (see [`Timing::backoff_min`](crate::Timing::backoff_min)).
///
/// The successor is spawned and greeted, and has its listeners, before the incumbent is asked
/// to drain: the window in which nobody accepts new work is drain + seal + the successor's
/// open.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    state: State,
    /// The build id the serving daemon reported.
    serving_build: Option<String>,
    holds_listeners: bool,
    last_handoff: HandoffId,
    inc: Option<Channel>,
    /// The pid of the process at the other end of `inc`, as the driver found it.
    inc_peer: Option<Pid>,
    succ: Option<Channel>,
    timers: Timers<T>,
    /// The wait before the next recovery attempt or cold start.
    backoff: Backoff,
    out: VecDeque<SupervisorOutput>,
}

impl Supervisor {
    /// A supervisor that holds the listeners and knows the serving daemon (for example one it
    /// just started cold and saw answer). It watches `incumbent`.
    pub fn with_incumbent(cfg: SupervisorConfig, incumbent: Pid, last_handoff: HandoffId) -> Self {
        let state = State::Idle { serving: incumbent };
        let mut s = Self::blank(cfg, state, true, last_handoff);
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
        let state = State::Recovering(Recovery::new(None, now + cfg.timing.recovery_wait));
        let mut s = Self::blank(cfg, state, holds_listeners, last);
        s.enter_recovery(now, record);
        s
    }

    fn blank(
        cfg: SupervisorConfig,
        state: State,
        holds_listeners: bool,
        last_handoff: HandoffId,
    ) -> Self {
        Self {
            backoff: Backoff::new(&cfg.timing),
            cfg,
            state,
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

    /// The serving daemon: the confirmed one when idle, the incumbent during a handoff, `None`
    /// while recovering.
    pub fn incumbent(&self) -> Option<Pid> {
        match &self.state {
            State::Idle { serving } => Some(*serving),
            State::Handoff(h) => Some(h.incumbent),
            State::Recovering(_) => None,
        }
    }

    /// The build id the serving daemon reported in its `HelloAck`, when known.
    pub fn serving_build(&self) -> Option<&str> {
        self.serving_build.as_deref()
    }

    /// Whether a trigger would start a handoff now.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle { .. })
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
            State::Idle { .. } => "idle",
            State::Recovering(_) => "recovering",
            State::Handoff(h) => h.phase_name(),
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

    // ---- handle: processes and journal ----

    /// The process requested by `SpawnSuccessor` or `SpawnColdStart` started. A process
    /// reported when no spawn is pending (the handoff ended first) is unwanted: the machine
    /// asks to kill it and reports the misuse.
    pub fn handle_spawned(&mut self, now: Instant, pid: Pid) -> Result<(), Misuse> {
        match &self.state {
            State::Handoff(h) if h.spawning() => self.successor_spawned(now, pid),
            State::Recovering(r) if r.cold_spawning() => self.cold_spawned(now, pid),
            _ => {
                // Nobody wants this process any more (the handoff ended first).
                self.out.push_back(SupervisorOutput::Kill { pid });
                return Err(self.wrong_phase("spawned"));
            }
        }
        Ok(())
    }

    /// Spawning failed (missing binary, exec error, resource limit).
    pub fn handle_spawn_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        match &self.state {
            State::Handoff(h) if h.spawning() => {
                self.abort(now, AbortReason::SpawnFailed(bounded_text(reason)));
            }
            State::Recovering(r) if r.cold_spawning() => self.retry_recovery(now),
            _ => return Err(self.wrong_phase("spawn failed")),
        }
        Ok(())
    }

    /// A watched process exited.
    pub fn handle_exited(&mut self, now: Instant, pid: Pid) {
        match &self.state {
            State::Idle { serving } => {
                if *serving == pid {
                    let record = JournalRecord::Idle {
                        serving: Some(pid),
                        last_handoff: self.last_handoff,
                    };
                    self.enter_recovery(now, Some(record));
                }
            }
            State::Recovering(_) => self.recovering_exited(now, pid),
            State::Handoff(_) => self.handoff_exited(now, pid),
        }
    }

    /// The journal record requested last is durable.
    pub fn handle_journal_written(&mut self, now: Instant) -> Result<(), Misuse> {
        match &self.state {
            State::Handoff(_) => self.handoff_journal_written(now),
            State::Recovering(_) => self.recovery_journal_written(now),
            State::Idle { .. } => Err(self.no_journal_pending()),
        }
    }

    /// The journal could not be written (full disk, I/O error). Before the commit point this
    /// aborts the handoff; the reason names the error.
    pub fn handle_journal_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        match &self.state {
            State::Handoff(_) => self.handoff_journal_failed(now, bounded_text(reason)),
            // A stale record only makes a later recovery look.
            State::Recovering(_) => self.recovery_journal_written(now),
            State::Idle { .. } => Err(self.no_journal_pending()),
        }
    }

    // ---- handle: channels ----

    /// The control-socket connection requested by `Connect` is up, and `peer` is the pid of
    /// the process at its other end (`SO_PEERCRED`: the one that listens on the socket). The
    /// `HelloAck` must name that pid, or it is refused as a protocol violation
    /// ([`PeerMisbehaved::PeerPidMismatch`]): a daemon's word about who it is counts only when
    /// the kernel agrees. A connection nobody asked for is misuse; the driver closes it.
    pub fn handle_connected(&mut self, now: Instant, peer: Pid) -> Result<(), Misuse> {
        let asked = match &mut self.state {
            State::Handoff(h) => h.connected(),
            State::Recovering(r) => r.connected(),
            State::Idle { .. } => false,
        };
        if !asked {
            // Not asked for: the driver closes the socket it opened; any session the machine
            // has stays as it is.
            return Err(self.wrong_phase("connected"));
        }
        self.inc = Some(Channel::new(self.cfg.versions, now));
        self.inc_peer = Some(peer);
        let hello = self.hello();
        self.send(Peer::Incumbent, hello);
        Ok(())
    }

    /// The control socket could not be reached.
    pub fn handle_connect_failed(&mut self, now: Instant, reason: String) -> Result<(), Misuse> {
        match &self.state {
            State::Handoff(_) => self.handoff_connect_failed(now, reason),
            State::Recovering(r) if r.connecting() => {
                self.observe(now, None);
                Ok(())
            }
            _ => Err(self.wrong_phase("connect failed")),
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
            m => match (&self.state, peer) {
                (State::Recovering(_), Peer::Incumbent) => self.on_recovery_message(now, m),
                (State::Handoff(_), Peer::Successor) => self.on_successor_message(now, m),
                (State::Handoff(_), Peer::Incumbent) => self.on_incumbent_message(now, m),
                _ => Err(self.violation(now, peer, unexpected(m.kind(), "idle"))),
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
        match (&self.state, peer) {
            (State::Handoff(_), Peer::Successor) => self.on_successor_closed(now, reason),
            (State::Handoff(_), Peer::Incumbent) => self.on_incumbent_closed(now, reason),
            (State::Recovering(_), Peer::Incumbent) => self.on_recovery_closed(now),
            _ => {}
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
        if self.timers.expire(T::Heartbeat, now) && in_handoff {
            for peer in [Peer::Successor, Peer::Incumbent] {
                if self.chan_mut(peer).is_some_and(|c| c.version().is_some()) {
                    self.send(peer, Message::Heartbeat);
                }
            }
            let at = now + self.cfg.timing.heartbeat_interval;
            self.timers.set(T::Heartbeat, at);
        }
        if self.timers.expire(T::Deadline, now) {
            self.on_deadline(now);
        }
        if self.timers.expire(T::Retry, now) {
            let reconnect = match &mut self.state {
                State::Handoff(h) => h.retry_due(),
                State::Recovering(r) => r.retry_due(),
                State::Idle { .. } => false,
            };
            if reconnect {
                self.out.push_back(SupervisorOutput::Connect);
            }
        }
    }

    // ---- internals: greeting ----

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
        match (&self.state, peer) {
            (State::Handoff(_), Peer::Successor) => self.successor_hello_ack(now, ack),
            (State::Handoff(_), Peer::Incumbent) => self.incumbent_hello_ack(now, ack),
            (State::Recovering(r), Peer::Incumbent) if r.greeting() => {
                self.recovery_hello_ack(now, ack);
                Ok(())
            }
            _ => Err(self.violation(now, peer, unexpected("HelloAck", "not greeting"))),
        }
    }

    // ---- internals: channels ----

    fn chan_mut(&mut self, peer: Peer) -> Option<&mut Channel> {
        match peer {
            Peer::Incumbent => self.inc.as_mut(),
            Peer::Successor => self.succ.as_mut(),
        }
    }

    /// Whether the channel to `peer` is open and has negotiated a version.
    fn negotiated(&self, peer: Peer) -> bool {
        let ch = match peer {
            Peer::Incumbent => &self.inc,
            Peer::Successor => &self.succ,
        };
        ch.as_ref().is_some_and(|c| c.version().is_some())
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

    fn wrong_phase(&self, input: &'static str) -> Misuse {
        Misuse::WrongPhase {
            input,
            phase: self.phase_name(),
        }
    }

    fn no_journal_pending(&self) -> Misuse {
        self.wrong_phase("journal written")
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
            if h.committed() {
                // The successor committed; its channel has served its purpose.
                self.drop_chan(peer);
                return e.into();
            }
            if peer == Peer::Successor || h.pre_seal() {
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
        if matches!(&self.state, State::Recovering(r) if r.greeting()) {
            let reason = bounded_text(e.to_string());
            self.send(Peer::Incumbent, Message::Refused { reason });
            self.drop_chan(Peer::Incumbent);
            self.observe(now, None);
            return e.into();
        }
        self.violation(now, Peer::Incumbent, e)
    }
}

fn unexpected(kind: &'static str, phase: &'static str) -> PeerMisbehaved {
    PeerMisbehaved::UnexpectedMessage { kind, phase }
}
