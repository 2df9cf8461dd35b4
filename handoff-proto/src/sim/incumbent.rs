//! The incumbent harness: the incumbent machine fed arbitrary op sequences (hostile supervisors and
//! bytes, driver misuse, hook results, lock results, time), mixed with `Honest` ops in which
//! a cooperating supervisor and application perform one obligation the machine asked for,
//! so that runs reach the deep phases. Every output is drained after every op and checked:
//! I1 (drain, seal and resume only with the lock; `holds_lock` agrees with the outputs) and
//! I2 (`ReleaseLock` only right after a successful seal of the same handoff, once per
//! acquisition, and before `Sealed` is sent), plus retire, lock-attempt and timer rules.
use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;

use super::{
    check_frame, daemon_config, frame_as_peer, listeners, trace, Clock, Id, Reached, Violation,
};
use crate::wire::{Hello, Message, PeerRole, SUPPORTED_VERSIONS};
use crate::{
    AbortReason, ConnId, DrainReport, HandoffId, Incumbent, IncumbentOutput, LockRecord,
    LockResult, Pid, SealReport, StateSnapshot,
};

/// One input, as the fuzzer chooses it.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum Op {
    /// The driver accepted a connection.
    Connected(Conn),
    /// The driver saw a connection close.
    Closed(Conn),
    /// Raw bytes on a connection.
    Bytes(Conn, Vec<u8>),
    /// A message on a connection, framed as a peer would or handed in decoded.
    Msg {
        /// Where.
        conn: Conn,
        /// What.
        msg: SupMsg,
        /// Through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// The drain hook's result.
    Drained(Result<DrainReport, String>),
    /// The seal hook's result.
    Sealed(Result<SealReport, String>),
    /// The resume hook's result.
    Resumed(Result<StateSnapshot, String>),
    /// A lock attempt's result.
    Lock(LockResult),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u16),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating environment performs one pending obligation.
    Honest(u8),
}

/// A connection: 0..=3 below 128, the newest honest session from 128 on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub struct Conn(pub u8);

/// A message from a supervisor, mostly with a meaning for the incumbent.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum SupMsg {
    /// The supervisor's `Hello`.
    Hello,
    /// `Prepare` (the successor is pid 20 as in every honest `Prepare`).
    Prepare {
        /// The handoff.
        handoff: Id,
        /// Drain grace.
        drain_grace_ms: u16,
        /// Deadline.
        deadline_ms: u16,
    },
    /// `Seal`.
    Seal(Id),
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
            SupMsg::Hello => supervisor_hello(),
            SupMsg::Prepare {
                handoff,
                drain_grace_ms,
                deadline_ms,
            } => Message::Prepare {
                handoff: handoff.get(),
                successor: 20,
                drain_grace_ms: u64::from(drain_grace_ms),
                deadline_ms: u64::from(deadline_ms),
            },
            SupMsg::Seal(h) => Message::Seal { handoff: h.get() },
            SupMsg::Commit(h) => Message::Commit { handoff: h.get() },
            SupMsg::Abort(h, reason) => Message::Abort {
                handoff: h.get(),
                reason,
            },
            SupMsg::Any(m) => m,
        }
    }
}

fn supervisor_hello() -> Message {
    Message::Hello(Hello {
        role: PeerRole::Supervisor,
        versions: SUPPORTED_VERSIONS,
        pid: 1,
        build_id: "supervisor".into(),
    })
}

/// Milestone names, by bit.
pub const MILESTONES: &[&str] = &[
    "ReleaseLock",
    "Retire",
    "lock reacquired",
    "KillLockHolder",
    "resume after release",
];

/// The harness's input: `Op` with its connection resolved (property tests draw these).
#[derive(Clone, Debug)]
pub enum IncOp {
    /// The driver accepted a connection.
    Connected(u64),
    /// The driver saw a connection close.
    Closed(u64),
    /// Raw bytes on a connection.
    Bytes(u64, Vec<u8>),
    /// A message on a connection.
    Msg {
        /// Where.
        conn: u64,
        /// What.
        msg: Message,
        /// Framed as a peer would, through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// The drain hook's result.
    Drained(Result<DrainReport, String>),
    /// The seal hook's result.
    Sealed(Result<SealReport, String>),
    /// The resume hook's result.
    Resumed(Result<StateSnapshot, String>),
    /// A lock attempt's result.
    Lock(LockResult),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u64),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating supervisor/application performs one pending obligation.
    Honest(u8),
}
impl IncHarness {
    fn conn(&self, c: Conn) -> u64 {
        if c.0 < 128 {
            u64::from(c.0 % 4)
        } else {
            self.next_conn - 1
        }
    }

    /// `op` with its connection resolved against the sessions opened so far.
    pub fn internal(&self, op: Op) -> IncOp {
        match op {
            Op::Connected(c) => IncOp::Connected(self.conn(c)),
            Op::Closed(c) => IncOp::Closed(self.conn(c)),
            Op::Bytes(c, b) => IncOp::Bytes(self.conn(c), b),
            Op::Msg { conn, msg, framed } => IncOp::Msg {
                conn: self.conn(conn),
                msg: msg.into_message(),
                framed,
            },
            Op::Drained(r) => IncOp::Drained(r),
            Op::Sealed(r) => IncOp::Sealed(r),
            Op::Resumed(r) => IncOp::Resumed(r),
            Op::Lock(r) => IncOp::Lock(r),
            Op::Advance(ms) => IncOp::Advance(u64::from(ms)),
            Op::AdvanceToTimer => IncOp::AdvanceToTimer,
            Op::Honest(sel) => IncOp::Honest(sel),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum IncDuty {
    Drain,
    Seal,
    Resume,
    Lock,
    Prepare(u64),
    SealMsg(u64, HandoffId),
    Decide(u64, HandoffId),
    AbortMsg(u64, HandoffId),
}

impl IncDuty {
    fn conn(&self) -> Option<u64> {
        match self {
            IncDuty::Prepare(c)
            | IncDuty::SealMsg(c, _)
            | IncDuty::Decide(c, _)
            | IncDuty::AbortMsg(c, _) => Some(*c),
            _ => None,
        }
    }
}

/// What the op just performed was, for invariants that depend on it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum IncCtx {
    Other,
    /// `handle_sealed(Ok(_))` returned `Ok(())`.
    SealedOk,
}

// Milestones.
const INC_RELEASED: u32 = 0;
const INC_RETIRED: u32 = 1;
const INC_RECLAIMED: u32 = 2;
const INC_KILL: u32 = 3;
const INC_RESUMED_AFTER_RELEASE: u32 = 4;

/// The incumbent machine, the model of the lock and the driver derived from its outputs, and
/// the honest environment.
#[derive(Debug)]
pub struct IncHarness {
    m: Incumbent,
    clock: Clock,
    // Model of the lock and the driver, from outputs only.
    lock_held: bool,
    acquire_outstanding: bool,
    released_once: bool,
    last_call_seal: Option<HandoffId>,
    retired: bool,
    open: BTreeSet<u64>,
    negotiated: BTreeMap<u64, u16>,
    holders: BTreeSet<Pid>,
    current: Option<HandoffId>,
    /// The connection the driver reported closed in the op being drained.
    closed_by_driver: Option<u64>,
    /// The record found by a lock acquisition in the op being drained.
    acquired_with: Option<Option<LockRecord>>,
    // Cooperating environment.
    duties: Vec<IncDuty>,
    next_handoff: u64,
    next_conn: u64,
    reached: Reached,
}

impl IncHarness {
    /// A serving incumbent (pid 10, three listeners), its first outputs drained and checked.
    pub fn start() -> Result<Self, Violation> {
        let mut h = Self::new();
        h.drain(IncCtx::Other)?;
        Ok(h)
    }

    /// Start, then apply `ops` in order: the milestones reached, or the first violation.
    pub fn run(ops: impl IntoIterator<Item = IncOp>) -> Result<Reached, Violation> {
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
        Self {
            m: Incumbent::serving(daemon_config(10, listeners(3))),
            clock: Clock::new(),
            lock_held: true,
            acquire_outstanding: false,
            released_once: false,
            last_call_seal: None,
            retired: false,
            open: BTreeSet::new(),
            negotiated: BTreeMap::new(),
            holders: BTreeSet::new(),
            current: None,
            closed_by_driver: None,
            acquired_with: None,
            duties: Vec::new(),
            next_handoff: 1,
            next_conn: 10,
            reached: Reached::default(),
        }
    }

    /// Feed one op, drain the outputs and check them.
    pub fn apply(&mut self, op: IncOp) -> Result<(), Violation> {
        if trace() && !matches!(op, IncOp::Honest(_)) {
            eprintln!("inc <- {op:?} [{}]", self.m.phase_name());
        }
        let now = self.clock.now();
        let mut ctx = IncCtx::Other;
        match op {
            IncOp::Connected(c) => {
                if self.m.handle_connected(now, ConnId(c)).is_ok() {
                    ensure!(self.open.insert(c), "machine accepted a duplicate conn");
                    self.negotiated.remove(&c);
                }
            }
            IncOp::Closed(c) => {
                self.closed_by_driver = Some(c);
                let r = self.m.handle_closed(now, ConnId(c));
                // A close inside a frame is reported as the peer's fault, but it is a close.
                let known = !matches!(r, Err(crate::Error::Misuse(_)));
                ensure_eq!(known, self.open.remove(&c));
                self.negotiated.remove(&c);
                self.duties.retain(|d| d.conn() != Some(c));
            }
            IncOp::Bytes(c, bytes) => {
                let _ = self.m.handle_bytes(now, ConnId(c), &bytes);
            }
            IncOp::Msg { conn, msg, framed } => {
                if framed {
                    let bytes = frame_as_peer(&msg, self.negotiated.get(&conn).copied());
                    let _ = self.m.handle_bytes(now, ConnId(conn), &bytes);
                } else {
                    let _ = self.m.handle_message(now, ConnId(conn), msg);
                }
            }
            IncOp::Drained(r) => {
                let _ = self.m.handle_drained(now, r);
            }
            IncOp::Sealed(r) => {
                let ok = r.is_ok();
                if self.m.handle_sealed(now, r).is_ok() && ok {
                    ctx = IncCtx::SealedOk;
                }
            }
            IncOp::Resumed(r) => {
                let _ = self.m.handle_resumed(now, r);
            }
            IncOp::Lock(result) => {
                let r = self.m.handle_lock(now, result);
                // A lock result is accepted exactly when an attempt was requested.
                ensure_eq!(
                    r.is_ok(),
                    self.acquire_outstanding,
                    "handle_lock({:?}) = {:?} with an attempt outstanding: {}",
                    result,
                    r,
                    self.acquire_outstanding
                );
                if r.is_ok() {
                    self.acquire_outstanding = false;
                    match result {
                        LockResult::Acquired { previous } => {
                            ensure!(!self.lock_held, "acquired a lock already held");
                            self.lock_held = true;
                            self.acquired_with = Some(previous);
                            self.reached.set(INC_RECLAIMED);
                        }
                        LockResult::Held(Some(rec)) => {
                            self.holders.insert(rec.owner);
                        }
                        LockResult::Held(None) => {}
                    }
                }
            }
            IncOp::Advance(ms) => {
                self.clock.advance(ms);
                self.timeout()?;
            }
            IncOp::AdvanceToTimer => {
                self.clock.advance_to(self.m.poll_timeout());
                self.timeout()?;
            }
            IncOp::Honest(sel) => return self.honest(sel),
        }
        self.drain(ctx)
    }

    fn timeout(&mut self) -> Result<(), Violation> {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        // No busy loop: after handling time `now`, nothing is due at `now` any more.
        if let Some(t) = self.m.poll_timeout() {
            ensure!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn drain(&mut self, ctx: IncCtx) -> Result<(), Violation> {
        let mut may_release = ctx == IncCtx::SealedOk;
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("inc -> {out:?}");
            }
            match out {
                IncumbentOutput::Send { conn, frame } => {
                    ensure!(self.open.contains(&conn.0), "Send on closed {:?}", conn);
                    check_frame(&frame)?;
                    match &frame.message {
                        Message::HelloAck(ack) => {
                            self.negotiated.insert(conn.0, ack.version);
                            self.duties.push(IncDuty::Prepare(conn.0));
                        }
                        Message::Drained { handoff, .. } => {
                            self.duties.push(IncDuty::SealMsg(conn.0, *handoff))
                        }
                        Message::Sealed { handoff, .. } => {
                            // "Sealed, fsynced, lock released": the release comes first.
                            ensure!(!self.lock_held, "Sealed sent before ReleaseLock");
                            self.duties.push(IncDuty::Decide(conn.0, *handoff))
                        }
                        Message::Resumed { .. } => {
                            ensure!(self.lock_held, "Resumed sent without the lock");
                        }
                        Message::CommitAck { .. } => {
                            ensure!(!self.lock_held, "CommitAck while holding the lock");
                        }
                        Message::DrainFailed { handoff, .. }
                        | Message::SealFailed { handoff, .. } => {
                            self.duties.push(IncDuty::AbortMsg(conn.0, *handoff))
                        }
                        _ => {}
                    }
                }
                IncumbentOutput::Close { conn } => {
                    // Never a Close of a connection already closed (in particular not of the
                    // one the driver just reported closed).
                    ensure!(self.open.remove(&conn.0), "Close of closed {:?}", conn);
                    self.negotiated.remove(&conn.0);
                    self.duties.retain(|d| d.conn() != Some(conn.0));
                }
                IncumbentOutput::CallDrain { handoff, .. } => {
                    ensure!(!self.retired, "drain after retire");
                    ensure!(self.lock_held, "drain without the lock");
                    self.current = Some(handoff);
                    self.duties.push(IncDuty::Drain);
                }
                IncumbentOutput::CallSeal { handoff } => {
                    ensure!(!self.retired, "seal after retire");
                    ensure!(self.lock_held, "seal without the lock");
                    ensure_eq!(Some(handoff), self.current);
                    self.last_call_seal = Some(handoff);
                    self.duties.push(IncDuty::Seal);
                }
                IncumbentOutput::CallResume { handoff } => {
                    // I1: resume (serve again) only while holding the lock.
                    ensure!(!self.retired, "resume after retire");
                    ensure!(self.lock_held, "CallResume without the lock");
                    ensure_eq!(Some(handoff), self.current);
                    if self.released_once {
                        self.reached.set(INC_RESUMED_AFTER_RELEASE);
                    }
                    self.duties.push(IncDuty::Resume);
                }
                IncumbentOutput::ReleaseLock(proof) => {
                    // I2: only right after a successful seal of the same handoff, only once.
                    ensure!(
                        may_release,
                        "ReleaseLock not caused by a successful handle_sealed"
                    );
                    may_release = false;
                    ensure_eq!(Some(proof.handoff()), self.last_call_seal);
                    ensure!(self.lock_held, "ReleaseLock twice without reacquiring");
                    self.lock_held = false;
                    self.released_once = true;
                    self.reached.set(INC_RELEASED);
                }
                IncumbentOutput::AcquireLock => {
                    ensure!(!self.retired, "AcquireLock after retire");
                    ensure!(!self.lock_held, "AcquireLock while holding the lock");
                    ensure!(!self.acquire_outstanding, "two lock attempts at once");
                    self.acquire_outstanding = true;
                    self.duties.push(IncDuty::Lock);
                }
                IncumbentOutput::KillLockHolder { pid } => {
                    ensure!(!self.lock_held, "kills the holder of a lock it holds");
                    ensure!(self.holders.contains(&pid), "kills unknown pid {}", pid);
                    self.reached.set(INC_KILL);
                }
                IncumbentOutput::Retire { handoff } => {
                    // Only a lock just taken back may be held at Retire, and only when the
                    // record it found shows that someone else took over (the exit releases it).
                    if self.lock_held {
                        let superseded = matches!(
                            self.acquired_with,
                            Some(Some(rec)) if rec.committed == self.current
                                || (rec.owner != 20 && rec.owner != 10)
                        );
                        ensure!(superseded, "Retire while holding the lock");
                        self.lock_held = false;
                    }
                    ensure!(!self.retired, "Retire twice");
                    ensure_eq!(Some(handoff), self.current);
                    self.retired = true;
                    self.reached.set(INC_RETIRED);
                }
            }
        }
        self.closed_by_driver = None;
        self.acquired_with = None;
        // The machine's own view agrees with the one derived from its outputs.
        ensure_eq!(self.m.holds_lock(), self.lock_held, "holds_lock disagrees");
        ensure_eq!(self.m.is_retired(), self.retired);
        ensure!(!self.m.is_serving() || self.lock_held);
        Ok(())
    }

    fn send(&mut self, conn: u64, msg: Message) -> Result<(), Violation> {
        self.apply(IncOp::Msg {
            conn,
            msg,
            framed: true,
        })
    }

    fn honest(&mut self, sel: u8) -> Result<(), Violation> {
        if self.duties.is_empty() && sel % 2 == 1 {
            // Let time pass (retries, deadlines, silence).
            return self.apply(IncOp::Advance(u64::from(sel) * 40));
        }
        if self.duties.is_empty() {
            // Open a session: connect and say Hello.
            let conn = self.next_conn;
            self.next_conn += 1;
            self.apply(IncOp::Connected(conn))?;
            let hello = Message::Hello(Hello {
                role: PeerRole::Supervisor,
                versions: SUPPORTED_VERSIONS,
                pid: 1,
                build_id: "supervisor".into(),
            });
            return self.send(conn, hello);
        }
        let duty = self.duties.remove(sel as usize % self.duties.len());
        let variant = sel / 16;
        let fail = variant == 0;
        match duty {
            IncDuty::Drain => self.apply(IncOp::Drained(if fail {
                Err("drain hook failed".into())
            } else {
                Ok(DrainReport::default())
            })),
            IncDuty::Seal => self.apply(IncOp::Sealed(if fail {
                Err("seal hook failed".into())
            } else {
                Ok(SealReport {
                    last_revision_per_shard: vec![3, 4],
                    data_dir_fingerprint: 9,
                })
            })),
            IncDuty::Resume => self.apply(IncOp::Resumed(if fail {
                Err("resume hook failed".into())
            } else {
                Ok(StateSnapshot::default())
            })),
            IncDuty::Lock => {
                let result = match variant {
                    // Free; the record still names us (we released it when sealing).
                    0..=5 => LockResult::Acquired {
                        previous: Some(LockRecord {
                            owner: 10,
                            committed: None,
                        }),
                    },
                    // Our successor (pid 20 in every Prepare) holds it, uncommitted.
                    6..=11 => LockResult::Held(Some(LockRecord {
                        owner: 20,
                        committed: None,
                    })),
                    // A stranger (a replacement started by a recovering supervisor).
                    12 => LockResult::Held(Some(LockRecord {
                        owner: 77,
                        committed: None,
                    })),
                    13 => LockResult::Held(None),
                    _ => LockResult::Held(Some(LockRecord {
                        owner: 20,
                        committed: self.current,
                    })),
                };
                self.apply(IncOp::Lock(result))
            }
            IncDuty::Prepare(conn) => {
                let handoff = HandoffId(self.next_handoff);
                self.next_handoff += 1;
                self.send(
                    conn,
                    Message::Prepare {
                        handoff,
                        successor: 20,
                        drain_grace_ms: 1000,
                        deadline_ms: [0, 100, 1000, 10_000][usize::from(variant % 4)],
                    },
                )
            }
            IncDuty::SealMsg(conn, handoff) => self.send(conn, Message::Seal { handoff }),
            IncDuty::Decide(conn, handoff) => {
                let msg = if variant < 8 {
                    Message::Commit { handoff }
                } else {
                    Message::Abort {
                        handoff,
                        reason: AbortReason::SuccessorExited,
                    }
                };
                self.send(conn, msg)
            }
            IncDuty::AbortMsg(conn, handoff) => self.send(
                conn,
                Message::Abort {
                    handoff,
                    reason: AbortReason::DrainFailed("x".into()),
                },
            ),
        }
    }
}
