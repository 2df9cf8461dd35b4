//! The incumbent: the serving daemon, which drains, seals, releases the lock, and either
//! retires (commit) or takes the lock back and resumes (abort).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::channel::{Channel, ConnId};
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::timer::{TimerKey, Timers};
use crate::types::{
    DrainReport, HandoffId, ListenerInfo, LockRecord, Pid, SealReport, StateSnapshot, Timing,
    MAX_FDS_PER_MESSAGE,
};
use crate::wire::{
    bounded_text, DaemonStatus, Frame, Hello, HelloAck, Message, PeerRole, VersionRange,
};

/// What a daemon (incumbent or successor) is configured with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DaemonConfig {
    /// This process's pid, reported in `HelloAck` and written in the lock record.
    pub pid: Pid,
    /// This build's id, reported in `HelloAck`.
    pub build_id: String,
    /// Protocol versions spoken.
    pub versions: VersionRange,
    /// Heartbeat, silence and retry timings.
    pub timing: Timing,
    /// The listeners this process holds, in the order a restarted supervisor gets them back.
    pub listeners: Vec<ListenerInfo>,
}

/// Proof that the seal hook of a handoff reported success.
///
/// Only the incumbent machine creates one, and only when it is fed a successful seal result;
/// [`IncumbentOutput::ReleaseLock`] carries it. So the lock cannot be released before the seal
/// finished (invariant I2) without changing this module.
/// It is `Clone` so that whole machines can be cloned by the model checker; a copy proves
/// nothing new, since it names the same handoff.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "the proof exists to release the lock"]
pub struct SealProof {
    handoff: HandoffId,
}

impl SealProof {
    /// The handoff whose seal finished.
    pub fn handoff(&self) -> HandoffId {
        self.handoff
    }
}

/// Result of a lock attempt, fed back by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum LockResult {
    /// The exclusive lock is ours. `previous` is the lock record as the last holder left it,
    /// read before this process writes its own.
    Acquired {
        /// The record found, if it could be read.
        previous: Option<LockRecord>,
    },
    /// Someone else holds it; the lock record says who, when it could be read.
    Held(Option<LockRecord>),
}

/// What the incumbent asks its driver to do. Perform every output in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "outputs are obligations: perform every one"]
pub enum IncumbentOutput {
    /// Write the frame on the connection. A `Listeners` frame carries the descriptors of the
    /// named listeners, in order, as SCM_RIGHTS.
    Send {
        /// Where.
        conn: ConnId,
        /// What.
        frame: Frame,
    },
    /// Close the connection.
    Close {
        /// Which.
        conn: ConnId,
    },
    /// Call the application's drain hook with a deadline of now + `grace`, then feed
    /// [`Incumbent::handle_drained`].
    CallDrain {
        /// The handoff.
        handoff: HandoffId,
        /// How long the drain may take.
        grace: Duration,
    },
    /// Call the seal hook, then feed [`Incumbent::handle_sealed`].
    CallSeal {
        /// The handoff.
        handoff: HandoffId,
    },
    /// Call the resume hook (and `snapshot_state`), then feed [`Incumbent::handle_resumed`].
    CallResume {
        /// The handoff.
        handoff: HandoffId,
    },
    /// Release the data-directory lock (unlock and close it). Needs no answer.
    ReleaseLock(SealProof),
    /// Try to take the data-directory lock without blocking, then feed
    /// [`Incumbent::handle_lock`].
    AcquireLock,
    /// Last resort after the hard deadline: our successor holds the lock, never committed, and
    /// the supervisor is gone. Kill it (SIGKILL) so the lock comes back, but only if that pid
    /// still holds a lock on the lock file, so that a reused pid is never hit. The std driver
    /// proves it by the process's own descriptors (`/proc/<pid>/fdinfo`, not `/proc/locks`,
    /// which names whoever took the lock, possibly long gone) and signals through a pidfd
    /// opened before that check.
    KillLockHolder {
        /// The holder named by the lock record.
        pid: Pid,
    },
    /// This process is done: the handoff committed, or another process took the data over.
    /// Stop serving and exit.
    Retire {
        /// The handoff.
        handoff: HandoffId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// Drain hook running.
    Draining,
    /// Drain done, waiting for `Seal`.
    Drained,
    /// Seal hook running.
    Sealing,
    /// Lock released, waiting for `Commit` or `Abort`.
    Sealed,
    /// Taking the lock back: an attempt is out (`acquiring`) or the retry timer runs. `late`
    /// counts hard-deadline firings: at 1 an uncommitted successor holding the lock is killed,
    /// once (`killed`); at 2 the incumbent gives up and exits.
    Reclaiming {
        acquiring: bool,
        late: u8,
        killed: bool,
    },
    /// Resume hook running (`running`) or waiting to be retried.
    Resuming { running: bool },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Handoff {
    id: HandoffId,
    /// The successor's pid, from `Prepare`.
    successor: Pid,
    /// The supervisor's session; `None` once the supervisor is lost.
    conn: Option<ConnId>,
    step: Step,
    /// An abort was decided while a hook ran; act on it when the hook returns.
    abort: bool,
    /// The supervisor asked for the abort and waits for `Resumed`.
    ack: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Cold start: waiting for the lock.
    Starting {
        acquiring: bool,
    },
    Serving,
    Handoff(Handoff),
    Retired,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum T {
    Heartbeat,
    Deadline,
    Retry,
}

impl TimerKey for T {
    type Slots = [Option<Instant>; 3];

    fn slot(self) -> usize {
        match self {
            T::Heartbeat => 0,
            T::Deadline => 1,
            T::Retry => 2,
        }
    }
}

/// The incumbent's state machine.
///
/// # Driving contract
///
/// The methods fall in four groups, as in quinn-proto:
/// - getters (`&self`): [`status`](Self::status), [`is_serving`](Self::is_serving),
///   [`holds_lock`](Self::holds_lock);
/// - `handle_*`: input from the control socket ([`handle_connected`](Self::handle_connected),
///   [`handle_bytes`](Self::handle_bytes), [`handle_closed`](Self::handle_closed)), from the
///   application's hooks ([`handle_drained`](Self::handle_drained),
///   [`handle_sealed`](Self::handle_sealed), [`handle_resumed`](Self::handle_resumed)), from
///   the lock ([`handle_lock`](Self::handle_lock)) and from time
///   ([`handle_timeout`](Self::handle_timeout));
/// - no application commands: the incumbent only reacts;
/// - `poll_*`: [`poll_output`](Self::poll_output) and [`poll_timeout`](Self::poll_timeout).
///
/// **Rule:** after every `handle_*` call, drain [`poll_output`](Self::poll_output) until it
/// returns `None` and perform each output in order; then ask
/// [`poll_timeout`](Self::poll_timeout) when to call [`handle_timeout`](Self::handle_timeout)
/// next. Time is an input: pass the current monotonic time to every call; the machine never
/// reads a clock. Hooks run outside the machine; keep calling `handle_timeout` while they run,
/// because the machine sends the heartbeats that keep the supervisor waiting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Incumbent {
    cfg: DaemonConfig,
    phase: Phase,
    conns: BTreeMap<ConnId, Channel>,
    timers: Timers<T>,
    out: VecDeque<IncumbentOutput>,
    /// The last handoff that ended in a resume, and the snapshot then: a repeated `Abort` for
    /// it is answered again.
    last_resumed: Option<(HandoffId, StateSnapshot)>,
}

impl Incumbent {
    /// A daemon that already holds the data-directory lock and serves.
    pub fn serving(cfg: DaemonConfig) -> Self {
        Self {
            cfg,
            phase: Phase::Serving,
            conns: BTreeMap::new(),
            timers: Timers::new(),
            out: VecDeque::new(),
            last_resumed: None,
        }
    }

    /// A daemon started cold that must take the lock first: it asks for it at once and retries
    /// until it gets it.
    pub fn starting(cfg: DaemonConfig) -> Self {
        let mut m = Self::serving(cfg);
        m.phase = Phase::Starting { acquiring: true };
        m.out.push_back(IncumbentOutput::AcquireLock);
        m
    }

    // ---- getters ----

    /// What this daemon reports about itself in `HelloAck`.
    pub fn status(&self) -> DaemonStatus {
        match &self.phase {
            Phase::Starting { .. } => DaemonStatus::Starting,
            Phase::Serving => DaemonStatus::Serving,
            Phase::Handoff(h) if matches!(h.step, Step::Reclaiming { .. }) => {
                DaemonStatus::Reclaiming(h.id)
            }
            Phase::Handoff(h) => DaemonStatus::InHandoff(h.id),
            Phase::Retired => DaemonStatus::Retired,
        }
    }

    /// Whether the application should accept work: serving, no handoff in progress.
    pub fn is_serving(&self) -> bool {
        matches!(self.phase, Phase::Serving)
    }

    /// Whether, as far as the machine knows, this process holds the data-directory lock.
    pub fn holds_lock(&self) -> bool {
        match &self.phase {
            Phase::Starting { .. } | Phase::Retired => false,
            Phase::Serving => true,
            Phase::Handoff(h) => !matches!(h.step, Step::Sealed | Step::Reclaiming { .. }),
        }
    }

    /// Whether the machine has retired (committed away).
    pub fn is_retired(&self) -> bool {
        matches!(self.phase, Phase::Retired)
    }

    /// Name of the current phase, for logs.
    pub fn phase_name(&self) -> &'static str {
        match &self.phase {
            Phase::Starting { .. } => "starting",
            Phase::Serving => "serving",
            Phase::Retired => "retired",
            Phase::Handoff(h) => match h.step {
                Step::Draining => "draining",
                Step::Drained => "drained",
                Step::Sealing => "sealing",
                Step::Sealed => "sealed",
                Step::Reclaiming { .. } => "reclaiming",
                Step::Resuming { .. } => "resuming",
            },
        }
    }

    // ---- poll ----

    /// The next output to perform.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<IncumbentOutput> {
        self.out.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let silence = self
            .conns
            .values()
            .map(|c| c.last_heard + self.cfg.timing.peer_silence);
        self.timers.next().into_iter().chain(silence).min()
    }

    // ---- handle ----

    /// The control socket accepted a connection (already checked with `SO_PEERCRED`).
    ///
    /// Connection ids must increase in accept order (a counter does): of two sessions, the
    /// one on the newer connection is the live one, whichever `Hello` is read first.
    pub fn handle_connected(&mut self, now: Instant, conn: ConnId) -> Result<(), Misuse> {
        if self.conns.contains_key(&conn) {
            return Err(Misuse::DuplicateConnection(conn.0));
        }
        self.conns
            .insert(conn, Channel::new(self.cfg.versions, now));
        Ok(())
    }

    /// The connection closed (EOF or error). If it carried a handoff, the supervisor is lost.
    ///
    /// A peer that stopped inside a frame is reported (as a [`PeerMisbehaved::Decode`] error)
    /// after the connection is dealt with like any other close.
    pub fn handle_closed(&mut self, _now: Instant, conn: ConnId) -> Result<(), Error> {
        let Some(ch) = self.conns.remove(&conn) else {
            return Err(Misuse::UnknownConnection(conn.0).into());
        };
        if self.handoff_conn() == Some(conn) {
            self.lose_supervisor();
        }
        ch.decoder
            .finish()
            .map_err(|e| PeerMisbehaved::Decode(e).into())
    }

    /// Bytes arrived on a connection.
    pub fn handle_bytes(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) -> Result<(), Error> {
        let ch = self
            .conns
            .get_mut(&conn)
            .ok_or(Misuse::UnknownConnection(conn.0))?;
        ch.decoder.push(bytes);
        loop {
            let Some(ch) = self.conns.get_mut(&conn) else {
                return Ok(()); // closed by the previous message
            };
            match ch.decoder.next_message() {
                Ok(Some(msg)) => self.handle_message(now, conn, msg)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.violation(conn, e.into())),
            }
        }
    }

    /// A decoded message arrived on a connection. [`handle_bytes`](Self::handle_bytes) calls
    /// this; a driver with its own framing may call it directly.
    pub fn handle_message(
        &mut self,
        now: Instant,
        conn: ConnId,
        msg: Message,
    ) -> Result<(), Error> {
        let ch = self
            .conns
            .get_mut(&conn)
            .ok_or(Misuse::UnknownConnection(conn.0))?;
        ch.last_heard = now;
        if ch.version().is_none() {
            return match msg {
                Message::Hello(hello) => self.on_hello(conn, hello),
                other => {
                    Err(self.violation(conn, PeerMisbehaved::NotNegotiated { kind: other.kind() }))
                }
            };
        }
        let on_handoff_conn = self.handoff_conn() == Some(conn);
        match msg {
            Message::Heartbeat | Message::ListenersAck { .. } => Ok(()),
            Message::Prepare {
                handoff,
                successor,
                drain_grace_ms,
                deadline_ms,
            } => match self.phase {
                Phase::Serving => {
                    let d = (drain_grace_ms, deadline_ms);
                    self.start_handoff(now, conn, handoff, successor, d);
                    Ok(())
                }
                Phase::Handoff(_) if !on_handoff_conn => {
                    self.refuse(conn, format!("busy: {}", self.phase_name()));
                    Ok(())
                }
                _ => Err(self.unexpected(conn, "Prepare")),
            },
            Message::Seal { handoff } => {
                self.check_handoff(conn, handoff, "Seal")?;
                match &mut self.phase {
                    Phase::Handoff(h) if h.step == Step::Drained => {
                        h.step = Step::Sealing;
                        self.out.push_back(IncumbentOutput::CallSeal { handoff });
                        Ok(())
                    }
                    _ => Err(self.unexpected(conn, "Seal")),
                }
            }
            Message::Commit { handoff } => {
                self.check_handoff(conn, handoff, "Commit")?;
                match &self.phase {
                    Phase::Handoff(h) if h.step == Step::Sealed => {
                        self.send(conn, Message::CommitAck { handoff });
                        self.retire(handoff);
                        Ok(())
                    }
                    _ => Err(self.unexpected(conn, "Commit")),
                }
            }
            Message::Abort { handoff, .. } => {
                if let (Phase::Serving, Some((last, snap))) = (&self.phase, &self.last_resumed) {
                    if *last == handoff {
                        let msg = Message::Resumed {
                            handoff,
                            snapshot: snap.clone(),
                        };
                        self.send(conn, msg);
                        return Ok(());
                    }
                }
                self.check_handoff(conn, handoff, "Abort")?;
                if let Phase::Handoff(h) = &mut self.phase {
                    h.ack = true;
                }
                self.abort_handoff();
                Ok(())
            }
            Message::ReturnListeners => {
                for batch in listener_batches(&self.cfg.listeners) {
                    self.send(conn, Message::Listeners { batch });
                }
                Ok(())
            }
            Message::Refused { reason } => {
                self.close(conn);
                Err(PeerMisbehaved::Refused(reason).into())
            }
            other => Err(self.unexpected(conn, other.kind())),
        }
    }

    /// The drain hook returned.
    pub fn handle_drained(
        &mut self,
        _now: Instant,
        result: Result<DrainReport, String>,
    ) -> Result<(), Misuse> {
        let h = match &mut self.phase {
            Phase::Handoff(h) if h.step == Step::Draining => h,
            _ => return Err(Misuse::NoHookPending { hook: "drain" }),
        };
        let (id, conn, abort) = (h.id, h.conn, h.abort);
        match result {
            Ok(report) if !abort => {
                h.step = Step::Drained;
                self.send_to_supervisor(
                    conn,
                    Message::Drained {
                        handoff: id,
                        report,
                    },
                );
            }
            Ok(_) => self.start_resume(),
            Err(reason) => {
                let reason = bounded_text(reason);
                self.send_to_supervisor(
                    conn,
                    Message::DrainFailed {
                        handoff: id,
                        reason,
                    },
                );
                self.start_resume();
            }
        }
        Ok(())
    }

    /// The seal hook returned. Only a success creates the [`SealProof`] that releases the
    /// lock.
    pub fn handle_sealed(
        &mut self,
        _now: Instant,
        result: Result<SealReport, String>,
    ) -> Result<(), Misuse> {
        let h = match &mut self.phase {
            Phase::Handoff(h) if h.step == Step::Sealing => h,
            _ => return Err(Misuse::NoHookPending { hook: "seal" }),
        };
        let (id, conn, abort) = (h.id, h.conn, h.abort);
        match result {
            Ok(report) if !abort => {
                h.step = Step::Sealed;
                let proof = SealProof { handoff: id };
                self.out.push_back(IncumbentOutput::ReleaseLock(proof));
                self.send_to_supervisor(
                    conn,
                    Message::Sealed {
                        handoff: id,
                        report,
                    },
                );
            }
            // Aborted while sealing: the lock was never released, resume in place.
            Ok(_) => self.start_resume(),
            Err(reason) => {
                let reason = bounded_text(reason);
                self.send_to_supervisor(
                    conn,
                    Message::SealFailed {
                        handoff: id,
                        reason,
                    },
                );
                self.start_resume();
            }
        }
        Ok(())
    }

    /// The resume hook returned (with the application's snapshot on success).
    pub fn handle_resumed(
        &mut self,
        now: Instant,
        result: Result<StateSnapshot, String>,
    ) -> Result<(), Misuse> {
        let h = match &mut self.phase {
            Phase::Handoff(h) if h.step == (Step::Resuming { running: true }) => h,
            _ => return Err(Misuse::NoHookPending { hook: "resume" }),
        };
        let (id, conn, ack) = (h.id, h.conn, h.ack);
        match result {
            Ok(snapshot) => {
                if let (Some(conn), true) = (conn, ack) {
                    let msg = Message::Resumed {
                        handoff: id,
                        snapshot: snapshot.clone(),
                    };
                    self.send(conn, msg);
                }
                self.last_resumed = Some((id, snapshot));
                self.phase = Phase::Serving;
                self.timers = Timers::new();
            }
            Err(reason) => {
                h.step = Step::Resuming { running: false };
                let reason = bounded_text(reason);
                self.send_to_supervisor(
                    conn,
                    Message::ResumeFailed {
                        handoff: id,
                        reason,
                    },
                );
                let at = now + self.cfg.timing.retry_interval;
                self.timers.set(T::Retry, at);
            }
        }
        Ok(())
    }

    /// A lock attempt finished.
    pub fn handle_lock(&mut self, now: Instant, result: LockResult) -> Result<(), Misuse> {
        let retry_at = now + self.cfg.timing.retry_interval;
        match &mut self.phase {
            Phase::Starting { acquiring: true } => {
                if matches!(result, LockResult::Acquired { .. }) {
                    self.phase = Phase::Serving;
                } else {
                    self.phase = Phase::Starting { acquiring: false };
                    self.timers.set(T::Retry, retry_at);
                }
                Ok(())
            }
            Phase::Handoff(h)
                if matches!(
                    h.step,
                    Step::Reclaiming {
                        acquiring: true,
                        ..
                    }
                ) =>
            {
                let Step::Reclaiming { late, killed, .. } = h.step else {
                    unreachable!("matched above")
                };
                match result {
                    // Free, and nobody took over: ours again.
                    LockResult::Acquired { previous }
                        if !previous.is_some_and(|rec| superseded(rec, h, self.cfg.pid)) =>
                    {
                        self.start_resume()
                    }
                    // The successor committed while we could not hear about it; or a process
                    // other than our successor (a replacement a recovering supervisor started)
                    // holds the data. Either way we have been superseded. (The record still
                    // naming us means the new holder has not written it yet: keep waiting.)
                    // Superseded (whether the lock is free now or not), or out of patience: exit.
                    // After the commit mark the old binary never touches the data again, even
                    // if the committed successor died since; the supervisor starts a new one.
                    LockResult::Acquired { .. } => {
                        let id = h.id;
                        self.retire(id);
                    }
                    LockResult::Held(rec)
                        if late >= 2 || rec.is_some_and(|rec| superseded(rec, h, self.cfg.pid)) =>
                    {
                        let id = h.id;
                        self.retire(id);
                    }
                    LockResult::Held(rec) => {
                        // Judged on this fresh reading of the record only: a holder that
                        // committed since an older reading must never be killed.
                        let kill = match rec {
                            Some(rec) if late >= 1 && !killed && rec.owner == h.successor => {
                                Some(rec.owner)
                            }
                            _ => None,
                        };
                        h.step = Step::Reclaiming {
                            acquiring: false,
                            late,
                            killed: killed || kill.is_some(),
                        };
                        if let Some(pid) = kill {
                            self.out.push_back(IncumbentOutput::KillLockHolder { pid });
                        }
                        self.timers.set(T::Retry, retry_at);
                    }
                }
                Ok(())
            }
            _ => Err(Misuse::NoLockPending),
        }
    }

    /// Time passed: fire every due timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_heard + self.cfg.timing.peer_silence <= now)
            .map(|(id, _)| *id)
            .collect();
        for conn in silent {
            self.close(conn);
        }
        if self.timers.expire(T::Heartbeat, now) {
            if let Some(conn) = self.handoff_conn() {
                self.send(conn, Message::Heartbeat);
                let at = now + self.cfg.timing.heartbeat_interval;
                self.timers.set(T::Heartbeat, at);
            }
        }
        if self.timers.expire(T::Deadline, now) {
            self.on_deadline(now);
        }
        if self.timers.expire(T::Retry, now) {
            match &mut self.phase {
                Phase::Starting { acquiring } => {
                    *acquiring = true;
                    self.out.push_back(IncumbentOutput::AcquireLock);
                }
                Phase::Handoff(h) => match h.step {
                    Step::Reclaiming { late, killed, .. } => {
                        h.step = Step::Reclaiming {
                            acquiring: true,
                            late,
                            killed,
                        };
                        self.out.push_back(IncumbentOutput::AcquireLock);
                    }
                    Step::Resuming { running: false } => {
                        h.step = Step::Resuming { running: true };
                        let handoff = h.id;
                        self.out.push_back(IncumbentOutput::CallResume { handoff });
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }

    // ---- internals ----

    fn handoff_conn(&self) -> Option<ConnId> {
        match &self.phase {
            Phase::Handoff(h) => h.conn,
            _ => None,
        }
    }

    fn on_hello(&mut self, conn: ConnId, hello: Hello) -> Result<(), Error> {
        if hello.role != PeerRole::Supervisor {
            self.refuse(conn, "only a supervisor may open a session here".into());
            return Err(PeerMisbehaved::WrongRole { got: hello.role }.into());
        }
        let version = match self.cfg.versions.negotiate(hello.versions) {
            Ok(v) => v,
            Err(e) => {
                self.refuse(conn, e.to_string());
                return Err(PeerMisbehaved::NoCommonVersion(e).into());
            }
        };
        // A `Hello` read on a connection older than a session already open is stale: its
        // supervisor abandoned that connection (an aborted handoff, a crash) before this
        // process read it, and has opened the newer one since. Connection ids increase in
        // accept order (see `handle_connected`), so the newer session stays.
        if let Some(newer) = self
            .conns
            .iter()
            .find(|(id, c)| **id > conn && c.version().is_some())
            .map(|(id, _)| *id)
        {
            self.refuse(
                conn,
                format!(
                    "stale session: a newer one (connection {}) is open",
                    newer.0
                ),
            );
            return Ok(());
        }
        // There is one supervisor: a new session supersedes every older one. Whatever is
        // still buffered on an older connection comes from a supervisor that is gone or has
        // moved on (a restarted supervisor racing its predecessor's last `Prepare`).
        let older: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, c)| **id != conn && c.version().is_some())
            .map(|(id, _)| *id)
            .collect();
        for old in older {
            self.close(old);
        }
        let status = self.status();
        let ch = self.conns.get_mut(&conn).expect("checked by caller");
        ch.decoder.set_negotiated(version);
        let ack = HelloAck {
            role: PeerRole::Incumbent,
            version,
            pid: self.cfg.pid,
            build_id: bounded_text(self.cfg.build_id.clone()),
            status,
        };
        self.send(conn, Message::HelloAck(ack));
        Ok(())
    }

    fn start_handoff(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: HandoffId,
        successor: Pid,
        (drain_grace_ms, deadline_ms): (u64, u64),
    ) {
        let t = self.cfg.timing;
        self.phase = Phase::Handoff(Handoff {
            id,
            successor,
            conn: Some(conn),
            step: Step::Draining,
            abort: false,
            ack: false,
        });
        let deadline = Duration::from_millis(deadline_ms);
        self.timers.set(T::Deadline, now + deadline + t.slack);
        self.timers.set(T::Heartbeat, now + t.heartbeat_interval);
        let grace = Duration::from_millis(drain_grace_ms).min(deadline);
        self.out
            .push_back(IncumbentOutput::CallDrain { handoff: id, grace });
    }

    /// `kind` (a message naming handoff `got`) belongs to the handoff in progress on `conn`.
    fn check_handoff(
        &mut self,
        conn: ConnId,
        got: HandoffId,
        kind: &'static str,
    ) -> Result<(), Error> {
        match &self.phase {
            Phase::Handoff(h) if h.conn == Some(conn) && h.id == got => Ok(()),
            Phase::Handoff(h) if h.conn == Some(conn) => Err(self.violation(
                conn,
                PeerMisbehaved::WrongHandoff {
                    expected: h.id,
                    got,
                },
            )),
            _ => Err(self.unexpected(conn, kind)),
        }
    }

    /// The supervisor went away (EOF, silence, protocol violation, deadline): abort on our own.
    fn lose_supervisor(&mut self) {
        if let Phase::Handoff(h) = &mut self.phase {
            if let Some(conn) = h.conn.take() {
                // Already gone if the driver reported it closed.
                if self.conns.remove(&conn).is_some() {
                    self.out.push_back(IncumbentOutput::Close { conn });
                }
            }
            self.timers.stop(T::Heartbeat);
            self.abort_handoff();
        }
    }

    fn abort_handoff(&mut self) {
        let Phase::Handoff(h) = &mut self.phase else {
            return;
        };
        match h.step {
            Step::Draining | Step::Sealing => h.abort = true,
            Step::Drained => self.start_resume(),
            Step::Sealed => {
                h.step = Step::Reclaiming {
                    acquiring: true,
                    late: 0,
                    killed: false,
                };
                self.out.push_back(IncumbentOutput::AcquireLock);
            }
            Step::Reclaiming { .. } | Step::Resuming { .. } => {}
        }
    }

    fn on_deadline(&mut self, now: Instant) {
        let slack = self.cfg.timing.slack;
        let Phase::Handoff(h) = &mut self.phase else {
            return;
        };
        match h.step {
            // Still without the lock a slack after giving up on the supervisor: the next
            // reading of the lock record decides whether our successor is stuck (kill it).
            // Another slack later, give up and exit at the next reading (or now, if none is
            // out), so old processes never pile up; a recovering supervisor starts a daemon
            // if nobody serves.
            Step::Reclaiming {
                acquiring,
                late,
                killed,
            } => {
                let late = (late + 1).min(2);
                h.step = Step::Reclaiming {
                    acquiring,
                    late,
                    killed,
                };
                if late < 2 {
                    self.timers.set(T::Deadline, now + slack);
                } else if !acquiring {
                    let id = h.id;
                    self.retire(id);
                }
            }
            _ => {
                self.lose_supervisor();
                // Check again after another slack: if we are still reclaiming then, the lock
                // holder is stuck.
                self.timers.set(T::Deadline, now + slack);
            }
        }
    }

    fn start_resume(&mut self) {
        if let Phase::Handoff(h) = &mut self.phase {
            h.step = Step::Resuming { running: true };
            let handoff = h.id;
            self.out.push_back(IncumbentOutput::CallResume { handoff });
        }
    }

    /// This process is done with the data: end the handoff's session and ask to exit.
    fn retire(&mut self, handoff: HandoffId) {
        if let Some(conn) = self.handoff_conn() {
            if self.conns.remove(&conn).is_some() {
                self.out.push_back(IncumbentOutput::Close { conn });
            }
        }
        self.phase = Phase::Retired;
        self.timers = Timers::new();
        self.out.push_back(IncumbentOutput::Retire { handoff });
    }

    /// Send on the handoff's connection, if the supervisor is still there.
    fn send_to_supervisor(&mut self, conn: Option<ConnId>, message: Message) {
        if let Some(conn) = conn {
            self.send(conn, message);
        }
    }

    fn send(&mut self, conn: ConnId, message: Message) {
        if let Some(ch) = self.conns.get(&conn) {
            let frame = ch.frame(message);
            self.out.push_back(IncumbentOutput::Send { conn, frame });
        }
    }

    fn close(&mut self, conn: ConnId) {
        if self.handoff_conn() == Some(conn) {
            self.lose_supervisor();
        } else if self.conns.remove(&conn).is_some() {
            self.out.push_back(IncumbentOutput::Close { conn });
        }
    }

    fn refuse(&mut self, conn: ConnId, reason: String) {
        let reason = bounded_text(reason);
        self.send(conn, Message::Refused { reason });
        if self.conns.remove(&conn).is_some() {
            self.out.push_back(IncumbentOutput::Close { conn });
        }
    }

    fn unexpected(&mut self, conn: ConnId, kind: &'static str) -> Error {
        let phase = self.phase_name();
        self.violation(conn, PeerMisbehaved::UnexpectedMessage { kind, phase })
    }

    /// The peer on `conn` broke the protocol: tell it why, close, and if it was our
    /// supervisor, abort the handoff on our own.
    fn violation(&mut self, conn: ConnId, e: PeerMisbehaved) -> Error {
        let reason = bounded_text(e.to_string());
        self.send(conn, Message::Refused { reason });
        self.close(conn);
        e.into()
    }
}

/// Split listeners in batches that fit one `sendmsg` each. An empty list is one empty batch,
/// so the receiver always learns that the transfer is complete.
pub(crate) fn listener_batches(listeners: &[ListenerInfo]) -> Vec<Vec<ListenerInfo>> {
    if listeners.is_empty() {
        return vec![Vec::new()];
    }
    listeners
        .chunks(MAX_FDS_PER_MESSAGE)
        .map(<[ListenerInfo]>::to_vec)
        .collect()
}

/// Whether the lock record shows that this incumbent was superseded during handoff `h`: the
/// successor committed it, or a process other than its successor took the data over (a
/// replacement a recovering supervisor started). A record still naming this process means the
/// new holder has not written its own yet.
fn superseded(rec: LockRecord, h: &Handoff, me: Pid) -> bool {
    rec.committed == Some(h.id) || (rec.owner != h.successor && rec.owner != me)
}
