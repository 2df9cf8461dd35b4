//! The successor harness: the successor machine fed arbitrary op sequences (hostile supervisor
//! messages and bytes, lock results, listener errors, `ready` at any time, time), mixed with
//! `Honest` ops in which a cooperating supervisor and application perform one obligation.
//! Every output is drained after every op and checked: I3 (`Begun` only right after an
//! acquired lock, `Ready` only with the lock and only from `ready()`, the lock record marked
//! before `CommitAck`, `Committed` only after both), one handoff per successor, no output
//! after the end, `holds_lock` agrees.

use arbitrary::Arbitrary;

use super::{
    check_frame, daemon_config, frame_as_peer, listeners, trace, Clock, Id, Reached, Violation,
};
use crate::wire::{Hello, Message, PeerRole, SUPPORTED_VERSIONS};
use crate::{
    AbortReason, HandoffId, ListenerInfo, LockResult, ReadinessSnapshot, SealReport, Successor,
    SuccessorOutput, MAX_FDS_PER_MESSAGE,
};

/// One input, as the fuzzer chooses it.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum Op {
    /// A message from the supervisor, framed as a peer would or handed in decoded.
    Msg {
        /// What.
        msg: SupMsg,
        /// Through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// Raw bytes from the supervisor.
    Bytes(Vec<u8>),
    /// The channel closed.
    Closed,
    /// A lock attempt's result.
    Lock(LockResult),
    /// A received descriptor did not match its listener.
    ListenerError(String),
    /// The application calls `ready`.
    Ready(ReadinessSnapshot),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u16),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating environment performs one pending obligation.
    Honest(u8),
}

/// A message from a supervisor, mostly with a meaning for a successor.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum SupMsg {
    /// The supervisor's `Hello`.
    Hello,
    /// `Welcome`.
    Welcome {
        /// The handoff.
        handoff: Id,
        /// Deadline.
        deadline_ms: u16,
        /// Listener count.
        listeners: u32,
    },
    /// `Listeners` with `n % 4` listeners, or 250 + `n % 10` when `big`.
    Listeners {
        /// How many.
        n: u8,
        /// Around one SCM_RIGHTS batch.
        big: bool,
    },
    /// `Listeners` with an arbitrary batch.
    Batch(Vec<ListenerInfo>),
    /// `Begin`.
    Begin(Id, SealReport),
    /// `Commit`.
    Commit(Id),
    /// `Abort`.
    Abort(Id, AbortReason),
    /// Anything at all.
    Any(Message),
}

impl SupMsg {
    fn into_message(self) -> Message {
        match self {
            SupMsg::Hello => Message::Hello(Hello {
                role: PeerRole::Supervisor,
                versions: SUPPORTED_VERSIONS,
                pid: 1,
                build_id: "supervisor".into(),
            }),
            SupMsg::Welcome {
                handoff,
                deadline_ms,
                listeners,
            } => Message::Welcome {
                handoff: handoff.get(),
                deadline_ms: u64::from(deadline_ms),
                listeners,
            },
            SupMsg::Listeners { n, big } => Message::Listeners {
                batch: listeners(if big {
                    250 + usize::from(n % 10)
                } else {
                    usize::from(n % 4)
                }),
            },
            SupMsg::Batch(batch) => Message::Listeners { batch },
            SupMsg::Begin(h, seal) => Message::Begin {
                handoff: h.get(),
                seal,
            },
            SupMsg::Commit(h) => Message::Commit { handoff: h.get() },
            SupMsg::Abort(h, reason) => Message::Abort {
                handoff: h.get(),
                reason,
            },
            SupMsg::Any(m) => m,
        }
    }
}

/// Milestone names, by bit.
pub const MILESTONES: &[&str] = &["Begun", "Committed", "Exit after Begun", "two batches"];

/// The harness's input (property tests draw these; `Op` converts to it).
#[derive(Clone, Debug)]
pub enum SuccOp {
    /// A message from the supervisor.
    Msg {
        /// What.
        msg: Message,
        /// Framed as a peer would, through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// Raw bytes from the supervisor.
    Bytes(Vec<u8>),
    /// The driver saw the connection close.
    Closed,
    /// A lock attempt's result.
    Lock(LockResult),
    /// The driver could not take a listener.
    ListenerError(String),
    /// The application calls `ready`.
    Ready(ReadinessSnapshot),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u64),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating supervisor/application performs one pending obligation.
    Honest(u8),
}

/// The harness op a fuzzer's `Op` stands for.
pub fn internal(op: Op) -> SuccOp {
    match op {
        Op::Msg { msg, framed } => SuccOp::Msg {
            msg: msg.into_message(),
            framed,
        },
        Op::Bytes(b) => SuccOp::Bytes(b),
        Op::Closed => SuccOp::Closed,
        Op::Lock(r) => SuccOp::Lock(r),
        Op::ListenerError(s) => SuccOp::ListenerError(s),
        Op::Ready(r) => SuccOp::Ready(r),
        Op::Advance(ms) => SuccOp::Advance(u64::from(ms)),
        Op::AdvanceToTimer => SuccOp::AdvanceToTimer,
        Op::Honest(sel) => SuccOp::Honest(sel),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum SuccDuty {
    Hello,
    Welcome,
    Listeners(u32),
    Begin,
    Lock,
    Ready(SealReport),
    Commit(HandoffId),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SuccCtx {
    Other,
    /// `handle_lock(Acquired)` returned `Ok(())`.
    LockAcquired,
    /// `ready` returned `Ok(())`.
    ReadyOk,
}

const SUCC_BEGUN: u32 = 0;
const SUCC_COMMITTED: u32 = 1;
const SUCC_EXIT_AFTER_BEGUN: u32 = 2;
const SUCC_MULTI_BATCH: u32 = 3;

/// The successor machine, the model derived from its outputs, and the honest environment.
#[derive(Debug)]
pub struct SuccHarness {
    m: Successor,
    clock: Clock,
    negotiated: Option<u16>,
    acquire_requests: u32,
    acquire_outstanding: bool,
    lock_held: bool,
    begun: bool,
    opening: bool,
    ready_done: bool,
    marked: Option<HandoffId>,
    commit_acked: bool,
    committed: bool,
    exited: bool,
    handoff: Option<HandoffId>,
    taken: u64,
    batches: u32,
    // Cooperating supervisor.
    duties: Vec<SuccDuty>,
    welcome: HandoffId,
    reached: Reached,
}

impl SuccHarness {
    /// A fresh successor (pid 20), its first outputs drained and checked.
    pub fn start() -> Result<Self, Violation> {
        let mut h = Self::new();
        h.drain(SuccCtx::Other)?;
        Ok(h)
    }

    /// Start, then apply `ops` in order: the milestones reached, or the first violation.
    pub fn run(ops: impl IntoIterator<Item = SuccOp>) -> Result<Reached, Violation> {
        let mut h = Self::start()?;
        for op in ops {
            h.apply(op)?;
        }
        Ok(h.reached)
    }

    /// The milestones reached so far.
    pub fn reached(&self) -> Reached {
        self.reached
    }

    fn new() -> Self {
        let clock = Clock::new();
        Self {
            m: Successor::new(daemon_config(20, Vec::new()), clock.now()),
            clock,
            negotiated: None,
            acquire_requests: 0,
            acquire_outstanding: false,
            lock_held: false,
            begun: false,
            opening: false,
            ready_done: false,
            marked: None,
            commit_acked: false,
            committed: false,
            exited: false,
            handoff: None,
            taken: 0,
            batches: 0,
            duties: vec![SuccDuty::Hello],
            welcome: HandoffId(1),
            reached: Reached::default(),
        }
    }

    /// Feed one op, drain the outputs and check them.
    pub fn apply(&mut self, op: SuccOp) -> Result<(), Violation> {
        if trace() && !matches!(op, SuccOp::Honest(_)) {
            eprintln!("succ <- {op:?} [{}]", self.m.phase_name());
        }
        let now = self.clock.now();
        let mut ctx = SuccCtx::Other;
        match op {
            SuccOp::Msg { msg, framed } => {
                if framed {
                    let bytes = frame_as_peer(&msg, self.negotiated);
                    let _ = self.m.handle_bytes(now, &bytes);
                } else {
                    let _ = self.m.handle_message(now, msg);
                }
            }
            SuccOp::Bytes(b) => {
                let _ = self.m.handle_bytes(now, &b);
            }
            SuccOp::Closed => self.m.handle_closed(now),
            SuccOp::Lock(result) => {
                let r = self.m.handle_lock(now, result);
                if r.is_ok() {
                    ensure!(self.acquire_outstanding, "lock result accepted unrequested");
                    self.acquire_outstanding = false;
                    if matches!(result, LockResult::Acquired { .. }) {
                        self.lock_held = true;
                        ctx = SuccCtx::LockAcquired;
                    }
                }
            }
            SuccOp::ListenerError(reason) => self.m.handle_listener_error(now, reason),
            SuccOp::Ready(readiness) => {
                let r = self.m.ready(now, readiness);
                // `ready` is legal exactly between `Begun` and the first accepted `ready`.
                ensure_eq!(
                    r.is_ok(),
                    self.opening,
                    "ready() = {:?}, but Begun-and-not-ready is {}",
                    r,
                    self.opening
                );
                if r.is_ok() {
                    self.opening = false;
                    self.ready_done = true;
                    ctx = SuccCtx::ReadyOk;
                }
            }
            SuccOp::Advance(ms) => {
                self.clock.advance(ms);
                self.timeout()?;
            }
            SuccOp::AdvanceToTimer => {
                self.clock.advance_to(self.m.poll_timeout());
                self.timeout()?;
            }
            SuccOp::Honest(sel) => return self.honest(sel),
        }
        self.drain(ctx)
    }

    fn timeout(&mut self) -> Result<(), Violation> {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        if let Some(t) = self.m.poll_timeout() {
            ensure!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn same_handoff(&mut self, h: HandoffId) -> Result<(), Violation> {
        match self.handoff {
            None => self.handoff = Some(h),
            Some(x) => ensure_eq!(x, h, "successor mixes handoffs"),
        }
        Ok(())
    }

    fn drain(&mut self, ctx: SuccCtx) -> Result<(), Violation> {
        let mut may_begin = ctx == SuccCtx::LockAcquired;
        let mut may_ready = ctx == SuccCtx::ReadyOk;
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("succ -> {out:?}");
            }
            ensure!(
                !self.exited && !self.committed,
                "output {:?} after the successor finished",
                out
            );
            match out {
                SuccessorOutput::Send(frame) => {
                    check_frame(&frame)?;
                    if let Some(h) = frame.message.handoff() {
                        self.same_handoff(h)?;
                    }
                    match &frame.message {
                        Message::HelloAck(ack) => {
                            self.negotiated = Some(ack.version);
                            self.duties.push(SuccDuty::Welcome);
                        }
                        Message::ListenersAck { count } => {
                            ensure_eq!(u64::from(*count), self.taken);
                            self.duties.push(SuccDuty::Begin);
                        }
                        Message::Ready { handoff, .. } => {
                            ensure!(may_ready, "Ready not caused by ready()");
                            ensure!(self.lock_held, "Ready without the lock");
                            may_ready = false;
                            self.duties.push(SuccDuty::Commit(*handoff));
                        }
                        Message::CommitAck { handoff } => {
                            // The lock record is marked before the acknowledgement.
                            ensure_eq!(self.marked, Some(*handoff), "CommitAck before mark");
                            self.commit_acked = true;
                        }
                        _ => {}
                    }
                }
                SuccessorOutput::TakeListeners { batch } => {
                    ensure!(batch.len() <= MAX_FDS_PER_MESSAGE);
                    self.taken += batch.len() as u64;
                    self.batches += 1;
                    if self.batches >= 2 {
                        self.reached.set(SUCC_MULTI_BATCH);
                    }
                }
                SuccessorOutput::AcquireLock => {
                    ensure_eq!(self.acquire_requests, 0, "second AcquireLock");
                    ensure!(!self.lock_held);
                    self.acquire_requests += 1;
                    self.acquire_outstanding = true;
                    self.duties.push(SuccDuty::Lock);
                }
                SuccessorOutput::Begun { handoff, seal } => {
                    // I3: the data is opened only with the lock.
                    ensure!(may_begin, "Begun not caused by an acquired lock");
                    ensure!(self.lock_held && self.acquire_requests == 1);
                    may_begin = false;
                    self.same_handoff(handoff)?;
                    self.begun = true;
                    self.opening = true;
                    self.reached.set(SUCC_BEGUN);
                    self.duties.push(SuccDuty::Ready(seal));
                }
                SuccessorOutput::MarkCommitted { handoff } => {
                    ensure!(self.lock_held, "marks the lock record without the lock");
                    ensure!(self.ready_done, "committed before ready");
                    ensure!(self.marked.is_none(), "marked twice");
                    self.same_handoff(handoff)?;
                    self.marked = Some(handoff);
                }
                SuccessorOutput::Committed { handoff } => {
                    ensure_eq!(self.marked, Some(handoff), "Committed without mark");
                    ensure!(self.commit_acked, "Committed before CommitAck");
                    self.committed = true;
                    self.reached.set(SUCC_COMMITTED);
                }
                SuccessorOutput::Exit { .. } => {
                    self.exited = true;
                    self.opening = false;
                    self.lock_held = false; // the process exits
                    if self.begun {
                        self.reached.set(SUCC_EXIT_AFTER_BEGUN);
                    }
                }
            }
        }
        ensure_eq!(self.m.holds_lock(), self.lock_held, "holds_lock disagrees");
        ensure_eq!(self.m.is_committed(), self.committed);
        ensure_eq!(self.m.is_failed(), self.exited);
        Ok(())
    }

    fn send(&mut self, msg: Message) -> Result<(), Violation> {
        self.apply(SuccOp::Msg { msg, framed: true })
    }

    fn honest(&mut self, sel: u8) -> Result<(), Violation> {
        if self.duties.is_empty() {
            return self.apply(SuccOp::AdvanceToTimer);
        }
        let duty = self.duties.remove(sel as usize % self.duties.len());
        let variant = sel / 16;
        match duty {
            SuccDuty::Hello => self.send(Message::Hello(Hello {
                role: PeerRole::Supervisor,
                versions: SUPPORTED_VERSIONS,
                pid: 1,
                build_id: "supervisor".into(),
            })),
            SuccDuty::Welcome => {
                let n = [0u32, 1, 3, 300][usize::from(variant % 4)];
                self.welcome = HandoffId(1 + u64::from(variant % 3));
                self.duties.push(SuccDuty::Listeners(n));
                self.send(Message::Welcome {
                    handoff: self.welcome,
                    deadline_ms: 10_000,
                    listeners: n,
                })
            }
            SuccDuty::Listeners(left) => {
                let n = left.min(MAX_FDS_PER_MESSAGE as u32);
                if left > n {
                    self.duties.push(SuccDuty::Listeners(left - n));
                }
                self.send(Message::Listeners {
                    batch: listeners(n as usize),
                })
            }
            SuccDuty::Begin => self.send(Message::Begin {
                handoff: self.welcome,
                seal: SealReport {
                    last_revision_per_shard: vec![1],
                    data_dir_fingerprint: 5,
                },
            }),
            SuccDuty::Lock => self.apply(SuccOp::Lock(if variant == 0 {
                LockResult::Held(None)
            } else {
                LockResult::Acquired { previous: None }
            })),
            SuccDuty::Ready(seal) => self.apply(SuccOp::Ready(ReadinessSnapshot {
                listening_on: vec!["127.0.0.1:80".into()],
                healthz_ok: variant != 0,
                advertised_revision_per_shard: seal.last_revision_per_shard,
            })),
            SuccDuty::Commit(handoff) => self.send(Message::Commit { handoff }),
        }
    }
}
