//! Property tests of the three role machines: random input sequences (hostile peers, driver
//! misuse, hook failures, lock contention, time jumps) never panic, and the outputs never break
//! the lock and commit invariants.
//!
//! Every harness mixes random inputs with `Honest` steps, in which a cooperating environment
//! performs one obligation the machine has asked for (answer a hook, a lock attempt, a
//! message), so that random sequences also reach the deep phases (sealed, committing,
//! reclaiming) and not only the first message.
//!
//! The invariants are checked from the outputs alone (plus what the harness fed in), after
//! every input, with `poll_output` drained completely.

mod prop_support;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use handoff_proto::wire::{
    decode_body, encode, DaemonStatus, Decoder, Frame, Hello, HelloAck, Message, PeerRole,
    VersionRange, HANDSHAKE_VERSION, MAX_FRAME_LEN, SUPPORTED_VERSIONS,
};
use handoff_proto::{
    AbortReason, ConnId, DaemonConfig, DrainReport, HandoffId, HandoffSpec, Incumbent,
    IncumbentOutput, JournalRecord, ListenerInfo, ListenerKind, LockRecord, LockResult, Peer, Pid,
    ReadinessSnapshot, SealReport, StateSnapshot, Successor, SuccessorOutput, Supervisor,
    SupervisorConfig, SupervisorOutput, Timing, Verdict, MAX_FDS_PER_MESSAGE,
};
use prop_support::*;
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};

type TestResult = Result<(), TestCaseError>;

/// `PROP_TRACE=1 cargo test ...` prints every input and output of the failing run (and of
/// all others: use it with a single replayed case).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("PROP_TRACE").is_some())
}

const MAX_OPS: usize = 60;

// ------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------

/// Monotonic time: a fixed base plus an offset that only grows.
struct Clock {
    base: Instant,
    offset: Duration,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            offset: Duration::ZERO,
        }
    }

    fn now(&self) -> Instant {
        self.base + self.offset
    }

    fn advance(&mut self, ms: u64) {
        self.offset += Duration::from_millis(ms);
    }

    /// Jump to `at` if it lies ahead.
    fn advance_to(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            if at > self.now() {
                self.offset = at - self.base;
            }
        }
    }
}

/// A frame a machine emits must be encodable and decodable by its peer: under the handshake
/// version only a handshake message may travel (the peer's decoder rejects anything else).
fn check_frame(frame: &Frame) -> TestResult {
    let bytes = frame
        .encode()
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert!(
        frame.version != HANDSHAKE_VERSION || frame.message.is_handshake(),
        "{} sent under the handshake version: the peer cannot decode it",
        frame.message.kind()
    );
    let mut d = Decoder::new(VersionRange {
        min: 1,
        max: u16::MAX,
    });
    if frame.version != HANDSHAKE_VERSION {
        d.set_negotiated(frame.version);
    }
    d.push(&bytes);
    prop_assert_eq!(d.next_message(), Ok(Some(frame.message.clone())));
    Ok(())
}

/// Frame `msg` the way a well-behaved peer does: `Hello`/`HelloAck` and anything before
/// negotiation under the handshake version, the rest under the negotiated one.
fn frame_as_peer(msg: &Message, negotiated: Option<u16>) -> Vec<u8> {
    let version = match (msg, negotiated) {
        (Message::Hello(_) | Message::HelloAck(_), _) | (_, None) => HANDSHAKE_VERSION,
        (_, Some(v)) => v,
    };
    encode(version, msg).expect("test messages encode")
}

/// A sequence of inputs: a third of the runs are mostly cooperative (they get deep into the
/// protocol and then go wrong), the rest are chaotic.
fn op_sequence<T: std::fmt::Debug + Clone + 'static>(
    op: fn(u32) -> BoxedStrategy<T>,
) -> BoxedStrategy<Vec<T>> {
    prop_oneof![
        1 => prop::collection::vec(op(80), 1..MAX_OPS),
        2 => prop::collection::vec(op(12), 1..MAX_OPS),
    ]
    .boxed()
}

fn advance_ms() -> BoxedStrategy<u64> {
    prop_oneof![
        4 => 0u64..100,
        3 => 0u64..1000,
        2 => 0u64..10_000,
    ]
    .boxed()
}

fn hook_result<T: Clone + std::fmt::Debug + 'static>(
    ok: BoxedStrategy<T>,
) -> BoxedStrategy<Result<T, String>> {
    prop_oneof![3 => ok.prop_map(Ok), 1 => text().prop_map(Err)].boxed()
}

fn lock_result() -> BoxedStrategy<LockResult> {
    prop_oneof![
        2 => Just(LockResult::Acquired { previous: None }),
        1 => lock_record().prop_map(|r| LockResult::Acquired { previous: Some(r) }),
        1 => Just(LockResult::Held(None)),
        2 => lock_record().prop_map(|r| LockResult::Held(Some(r))),
    ]
    .boxed()
}

fn supervisor_hello() -> BoxedStrategy<Message> {
    prop_oneof![
        6 => Just(Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions: SUPPORTED_VERSIONS,
            pid: 1,
            build_id: "supervisor".into(),
        })),
        1 => hello().prop_map(Message::Hello),
    ]
    .boxed()
}

fn daemon_config(pid: Pid, listeners: Vec<ListenerInfo>) -> DaemonConfig {
    DaemonConfig {
        pid,
        build_id: "build".into(),
        versions: SUPPORTED_VERSIONS,
        timing: Timing::default(),
        listeners,
    }
}

fn listeners(n: usize) -> Vec<ListenerInfo> {
    (0..n)
        .map(|i| ListenerInfo {
            name: format!("l{i}"),
            kind: [
                ListenerKind::Tcp,
                ListenerKind::Udp,
                ListenerKind::UnixStream,
                ListenerKind::UnixDatagram,
            ][i % 4],
        })
        .collect()
}

/// Milestones a run reached; the coverage tests check that random runs get deep.
#[derive(Clone, Copy, Debug, Default)]
struct Reached(u32);

impl Reached {
    fn set(&mut self, bit: u32) {
        self.0 |= 1 << bit;
    }
}

/// Run `strategy` through `check` for `cases` cases and return the union of what was reached.
fn coverage<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<Reached, TestCaseError>,
) -> u32 {
    let acc = RefCell::new(0u32);
    let counts = RefCell::new([0u32; 32]);
    // A fixed seed: coverage must not depend on luck.
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    runner
        .run(&strategy, |v| {
            let r = check(v)?;
            *acc.borrow_mut() |= r.0;
            for (i, c) in counts.borrow_mut().iter_mut().enumerate() {
                *c += (r.0 >> i) & 1;
            }
            Ok(())
        })
        .expect("properties hold");
    eprintln!(
        "milestone counts over {cases} runs: {:?}",
        &counts.borrow()[..8]
    );
    acc.into_inner()
}

fn assert_reached(got: u32, names: &[&str]) {
    let missing: Vec<&str> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| got & (1 << i) == 0)
        .map(|(_, n)| *n)
        .collect();
    assert!(missing.is_empty(), "random runs never reached: {missing:?}");
}

// ------------------------------------------------------------------------------------------
// Incumbent
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum IncOp {
    Connected(u64),
    Closed(u64),
    Bytes(u64, Vec<u8>),
    Msg {
        conn: u64,
        msg: Message,
        framed: bool,
    },
    Drained(Result<DrainReport, String>),
    Sealed(Result<SealReport, String>),
    Resumed(Result<StateSnapshot, String>),
    Lock(LockResult),
    Advance(u64),
    AdvanceToTimer,
    /// The cooperating supervisor/application performs one pending obligation.
    Honest(u8),
}

fn inc_message() -> BoxedStrategy<Message> {
    let id = small_handoff_id;
    prop_oneof![
        4 => supervisor_hello(),
        3 => (id(), 0u64..3000, 0u64..20_000).prop_map(|(handoff, drain_grace_ms, deadline_ms)| {
            Message::Prepare { handoff, successor: 20, drain_grace_ms, deadline_ms }
        }),
        3 => id().prop_map(|handoff| Message::Seal { handoff }),
        3 => id().prop_map(|handoff| Message::Commit { handoff }),
        3 => (id(), abort_reason()).prop_map(|(handoff, reason)| Message::Abort { handoff, reason }),
        1 => Just(Message::Heartbeat),
        1 => Just(Message::ReturnListeners),
        1 => text().prop_map(|reason| Message::Refused { reason }),
        3 => message_with(small_handoff_id()),
    ]
    .boxed()
}

fn inc_op(honest: u32) -> BoxedStrategy<IncOp> {
    let conn = || 0u64..3;
    prop_oneof![
        2 => conn().prop_map(IncOp::Connected),
        1 => conn().prop_map(IncOp::Closed),
        1 => (conn(), hostile_bytes()).prop_map(|(c, b)| IncOp::Bytes(c, b)),
        6 => (conn(), inc_message(), any::<bool>())
            .prop_map(|(conn, msg, framed)| IncOp::Msg { conn, msg, framed }),
        1 => hook_result(drain_report()).prop_map(IncOp::Drained),
        1 => hook_result(seal_report()).prop_map(IncOp::Sealed),
        1 => hook_result(state_snapshot()).prop_map(IncOp::Resumed),
        1 => lock_result().prop_map(IncOp::Lock),
        2 => advance_ms().prop_map(IncOp::Advance),
        1 => Just(IncOp::AdvanceToTimer),
        honest => any::<u8>().prop_map(IncOp::Honest),
    ]
    .boxed()
}

/// Obligations of the cooperating environment, derived from the incumbent's outputs.
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
const INC_MILESTONES: &[&str] = &[
    "ReleaseLock",
    "Retire",
    "lock reacquired",
    "KillLockHolder",
    "resume after release",
];

struct IncHarness {
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

    fn run(ops: Vec<IncOp>) -> Result<Reached, TestCaseError> {
        let mut h = Self::new();
        h.drain(IncCtx::Other)?;
        for op in ops {
            h.apply(op)?;
        }
        Ok(h.reached)
    }

    fn apply(&mut self, op: IncOp) -> TestResult {
        if trace() && !matches!(op, IncOp::Honest(_)) {
            eprintln!("inc <- {op:?} [{}]", self.m.phase_name());
        }
        let now = self.clock.now();
        let mut ctx = IncCtx::Other;
        match op {
            IncOp::Connected(c) => {
                if self.m.handle_connected(now, ConnId(c)).is_ok() {
                    prop_assert!(self.open.insert(c), "machine accepted a duplicate conn");
                    self.negotiated.remove(&c);
                }
            }
            IncOp::Closed(c) => {
                self.closed_by_driver = Some(c);
                let r = self.m.handle_closed(now, ConnId(c));
                // A close inside a frame is reported as the peer's fault, but it is a close.
                let known = !matches!(r, Err(handoff_proto::Error::Misuse(_)));
                prop_assert_eq!(known, self.open.remove(&c));
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
                prop_assert_eq!(
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
                            prop_assert!(!self.lock_held, "acquired a lock already held");
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

    fn timeout(&mut self) -> TestResult {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        // No busy loop: after handling time `now`, nothing is due at `now` any more.
        if let Some(t) = self.m.poll_timeout() {
            prop_assert!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn drain(&mut self, ctx: IncCtx) -> TestResult {
        let mut may_release = ctx == IncCtx::SealedOk;
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("inc -> {out:?}");
            }
            match out {
                IncumbentOutput::Send { conn, frame } => {
                    prop_assert!(self.open.contains(&conn.0), "Send on closed {:?}", conn);
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
                            prop_assert!(!self.lock_held, "Sealed sent before ReleaseLock");
                            self.duties.push(IncDuty::Decide(conn.0, *handoff))
                        }
                        Message::Resumed { .. } => {
                            prop_assert!(self.lock_held, "Resumed sent without the lock");
                        }
                        Message::CommitAck { .. } => {
                            prop_assert!(!self.lock_held, "CommitAck while holding the lock");
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
                    prop_assert!(self.open.remove(&conn.0), "Close of closed {:?}", conn);
                    self.negotiated.remove(&conn.0);
                    self.duties.retain(|d| d.conn() != Some(conn.0));
                }
                IncumbentOutput::CallDrain { handoff, .. } => {
                    prop_assert!(!self.retired, "drain after retire");
                    prop_assert!(self.lock_held, "drain without the lock");
                    self.current = Some(handoff);
                    self.duties.push(IncDuty::Drain);
                }
                IncumbentOutput::CallSeal { handoff } => {
                    prop_assert!(!self.retired, "seal after retire");
                    prop_assert!(self.lock_held, "seal without the lock");
                    prop_assert_eq!(Some(handoff), self.current);
                    self.last_call_seal = Some(handoff);
                    self.duties.push(IncDuty::Seal);
                }
                IncumbentOutput::CallResume { handoff } => {
                    // I1: resume (serve again) only while holding the lock.
                    prop_assert!(!self.retired, "resume after retire");
                    prop_assert!(self.lock_held, "CallResume without the lock");
                    prop_assert_eq!(Some(handoff), self.current);
                    if self.released_once {
                        self.reached.set(INC_RESUMED_AFTER_RELEASE);
                    }
                    self.duties.push(IncDuty::Resume);
                }
                IncumbentOutput::ReleaseLock(proof) => {
                    // I2: only right after a successful seal of the same handoff, only once.
                    prop_assert!(
                        may_release,
                        "ReleaseLock not caused by a successful handle_sealed"
                    );
                    may_release = false;
                    prop_assert_eq!(Some(proof.handoff()), self.last_call_seal);
                    prop_assert!(self.lock_held, "ReleaseLock twice without reacquiring");
                    self.lock_held = false;
                    self.released_once = true;
                    self.reached.set(INC_RELEASED);
                }
                IncumbentOutput::AcquireLock => {
                    prop_assert!(!self.retired, "AcquireLock after retire");
                    prop_assert!(!self.lock_held, "AcquireLock while holding the lock");
                    prop_assert!(!self.acquire_outstanding, "two lock attempts at once");
                    self.acquire_outstanding = true;
                    self.duties.push(IncDuty::Lock);
                }
                IncumbentOutput::KillLockHolder { pid } => {
                    prop_assert!(!self.lock_held, "kills the holder of a lock it holds");
                    prop_assert!(self.holders.contains(&pid), "kills unknown pid {}", pid);
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
                        prop_assert!(superseded, "Retire while holding the lock");
                        self.lock_held = false;
                    }
                    prop_assert!(!self.retired, "Retire twice");
                    prop_assert_eq!(Some(handoff), self.current);
                    self.retired = true;
                    self.reached.set(INC_RETIRED);
                }
            }
        }
        self.closed_by_driver = None;
        self.acquired_with = None;
        // The machine's own view agrees with the one derived from its outputs.
        prop_assert_eq!(self.m.holds_lock(), self.lock_held, "holds_lock disagrees");
        prop_assert_eq!(self.m.is_retired(), self.retired);
        prop_assert!(!self.m.is_serving() || self.lock_held);
        Ok(())
    }

    fn send(&mut self, conn: u64, msg: Message) -> TestResult {
        self.apply(IncOp::Msg {
            conn,
            msg,
            framed: true,
        })
    }

    fn honest(&mut self, sel: u8) -> TestResult {
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3000)))]

    /// Random inputs never panic the incumbent, and its outputs keep I1/I2: the lock is
    /// released only by a successful seal of the same handoff and never twice without a
    /// reacquire; drain/seal/resume run only with the lock; retire only without it; a lock
    /// result is accepted exactly when an attempt is outstanding; `holds_lock` agrees.
    #[test]
    fn incumbent_random_inputs_keep_lock_invariants(
        ops in op_sequence(inc_op),
    ) {
        IncHarness::run(ops)?;
    }
}

#[test]
fn incumbent_random_runs_reach_every_phase() {
    let got = coverage(300, op_sequence(inc_op), IncHarness::run);
    assert_reached(got, INC_MILESTONES);
}

// ------------------------------------------------------------------------------------------
// Successor
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum SuccOp {
    Msg { msg: Message, framed: bool },
    Bytes(Vec<u8>),
    Closed,
    Lock(LockResult),
    ListenerError(String),
    Ready(ReadinessSnapshot),
    Advance(u64),
    AdvanceToTimer,
    Honest(u8),
}

fn succ_message() -> BoxedStrategy<Message> {
    let id = small_handoff_id;
    let batch = prop_oneof![
        4 => prop::collection::vec(listener_info_short(), 0..4),
        1 => prop::collection::vec(listener_info_short(), 250..260),
    ];
    prop_oneof![
        3 => supervisor_hello(),
        3 => (id(), 0u64..20_000, prop_oneof![0u32..4, Just(300), any::<u32>()])
            .prop_map(|(handoff, deadline_ms, listeners)| Message::Welcome {
                handoff, deadline_ms, listeners
            }),
        3 => batch.prop_map(|batch| Message::Listeners { batch }),
        3 => (id(), seal_report()).prop_map(|(handoff, seal)| Message::Begin { handoff, seal }),
        3 => id().prop_map(|handoff| Message::Commit { handoff }),
        2 => (id(), abort_reason()).prop_map(|(handoff, reason)| Message::Abort { handoff, reason }),
        1 => Just(Message::Heartbeat),
        1 => text().prop_map(|reason| Message::Refused { reason }),
        3 => message_with(small_handoff_id()),
    ]
    .boxed()
}

fn succ_op(honest: u32) -> BoxedStrategy<SuccOp> {
    prop_oneof![
        6 => (succ_message(), any::<bool>()).prop_map(|(msg, framed)| SuccOp::Msg { msg, framed }),
        1 => hostile_bytes().prop_map(SuccOp::Bytes),
        1 => Just(SuccOp::Closed),
        1 => lock_result().prop_map(SuccOp::Lock),
        1 => text().prop_map(SuccOp::ListenerError),
        2 => readiness().prop_map(SuccOp::Ready),
        2 => advance_ms().prop_map(SuccOp::Advance),
        1 => Just(SuccOp::AdvanceToTimer),
        honest => any::<u8>().prop_map(SuccOp::Honest),
    ]
    .boxed()
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
const SUCC_MILESTONES: &[&str] = &["Begun", "Committed", "Exit after Begun", "two batches"];

struct SuccHarness {
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

    fn run(ops: Vec<SuccOp>) -> Result<Reached, TestCaseError> {
        let mut h = Self::new();
        h.drain(SuccCtx::Other)?;
        for op in ops {
            h.apply(op)?;
        }
        Ok(h.reached)
    }

    fn apply(&mut self, op: SuccOp) -> TestResult {
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
                    prop_assert!(self.acquire_outstanding, "lock result accepted unrequested");
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
                prop_assert_eq!(
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

    fn timeout(&mut self) -> TestResult {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        if let Some(t) = self.m.poll_timeout() {
            prop_assert!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn same_handoff(&mut self, h: HandoffId) -> TestResult {
        match self.handoff {
            None => self.handoff = Some(h),
            Some(x) => prop_assert_eq!(x, h, "successor mixes handoffs"),
        }
        Ok(())
    }

    fn drain(&mut self, ctx: SuccCtx) -> TestResult {
        let mut may_begin = ctx == SuccCtx::LockAcquired;
        let mut may_ready = ctx == SuccCtx::ReadyOk;
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("succ -> {out:?}");
            }
            prop_assert!(
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
                            prop_assert_eq!(u64::from(*count), self.taken);
                            self.duties.push(SuccDuty::Begin);
                        }
                        Message::Ready { handoff, .. } => {
                            prop_assert!(may_ready, "Ready not caused by ready()");
                            prop_assert!(self.lock_held, "Ready without the lock");
                            may_ready = false;
                            self.duties.push(SuccDuty::Commit(*handoff));
                        }
                        Message::CommitAck { handoff } => {
                            // The lock record is marked before the acknowledgement.
                            prop_assert_eq!(self.marked, Some(*handoff), "CommitAck before mark");
                            self.commit_acked = true;
                        }
                        _ => {}
                    }
                }
                SuccessorOutput::TakeListeners { batch } => {
                    prop_assert!(batch.len() <= MAX_FDS_PER_MESSAGE);
                    self.taken += batch.len() as u64;
                    self.batches += 1;
                    if self.batches >= 2 {
                        self.reached.set(SUCC_MULTI_BATCH);
                    }
                }
                SuccessorOutput::AcquireLock => {
                    prop_assert_eq!(self.acquire_requests, 0, "second AcquireLock");
                    prop_assert!(!self.lock_held);
                    self.acquire_requests += 1;
                    self.acquire_outstanding = true;
                    self.duties.push(SuccDuty::Lock);
                }
                SuccessorOutput::Begun { handoff, seal } => {
                    // I3: the data is opened only with the lock.
                    prop_assert!(may_begin, "Begun not caused by an acquired lock");
                    prop_assert!(self.lock_held && self.acquire_requests == 1);
                    may_begin = false;
                    self.same_handoff(handoff)?;
                    self.begun = true;
                    self.opening = true;
                    self.reached.set(SUCC_BEGUN);
                    self.duties.push(SuccDuty::Ready(seal));
                }
                SuccessorOutput::MarkCommitted { handoff } => {
                    prop_assert!(self.lock_held, "marks the lock record without the lock");
                    prop_assert!(self.ready_done, "committed before ready");
                    prop_assert!(self.marked.is_none(), "marked twice");
                    self.same_handoff(handoff)?;
                    self.marked = Some(handoff);
                }
                SuccessorOutput::Committed { handoff } => {
                    prop_assert_eq!(self.marked, Some(handoff), "Committed without mark");
                    prop_assert!(self.commit_acked, "Committed before CommitAck");
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
        prop_assert_eq!(self.m.holds_lock(), self.lock_held, "holds_lock disagrees");
        prop_assert_eq!(self.m.is_committed(), self.committed);
        prop_assert_eq!(self.m.is_failed(), self.exited);
        Ok(())
    }

    fn send(&mut self, msg: Message) -> TestResult {
        self.apply(SuccOp::Msg { msg, framed: true })
    }

    fn honest(&mut self, sel: u8) -> TestResult {
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3000)))]

    /// Random inputs never panic the successor, and its outputs keep I3: `Begun` only right
    /// after an acquired lock it asked for (once); the lock record is marked, with the lock and
    /// after ready, before `CommitAck` and `Committed`; `ready` is accepted exactly between
    /// `Begun` and the first accepted `ready`; nothing follows `Exit` or `Committed`; one
    /// handoff id throughout; listener batches add up to the count acknowledged.
    #[test]
    fn successor_random_inputs_open_data_only_with_the_lock(
        ops in op_sequence(succ_op),
    ) {
        SuccHarness::run(ops)?;
    }
}

#[test]
fn successor_random_runs_reach_every_phase() {
    let got = coverage(300, op_sequence(succ_op), SuccHarness::run);
    assert_reached(got, SUCC_MILESTONES);
}

// ------------------------------------------------------------------------------------------
// Supervisor
// ------------------------------------------------------------------------------------------

const INCUMBENT: Pid = 100;
const SUCCESSORS: [Pid; 3] = [200, 201, 202];

#[derive(Clone, Debug)]
enum SupOp {
    Trigger(HandoffSpec),
    Spawned(Pid),
    /// A spawn report at a random moment, for a process never seen before (a late report of
    /// a real spawn). Reporting a pid twice is driver misuse the machine answers by killing
    /// that pid, whoever it is (see the report); not generated.
    SpawnedFresh,
    SpawnFailed(String),
    Connected,
    ConnectFailed(String),
    Msg {
        peer: Peer,
        msg: Message,
        framed: bool,
    },
    Bytes(Peer, Vec<u8>),
    Closed(Peer),
    Exited(Pid),
    /// One of the pids the harness has seen (spawned, incumbent, or named in a HelloAck).
    ExitedKnown(proptest::sample::Index),
    JournalWritten,
    JournalFailed(String),
    ListenerError(String),
    Advance(u64),
    AdvanceToTimer,
    Honest(u8),
}

fn spec() -> BoxedStrategy<HandoffSpec> {
    (0u64..5000, 0u64..30_000)
        .prop_map(|(g, d)| HandoffSpec {
            drain_grace: Duration::from_millis(g),
            deadline: Duration::from_millis(d),
        })
        .boxed()
}

fn any_pid() -> BoxedStrategy<Pid> {
    prop_oneof![
        Just(INCUMBENT),
        prop::sample::select(SUCCESSORS.to_vec()),
        Just(300u32)
    ]
    .boxed()
}

fn from_successor() -> BoxedStrategy<Message> {
    let id = small_handoff_id;
    prop_oneof![
        3 => (prop::sample::select(SUCCESSORS.to_vec()), prop_oneof![4 => Just(1u16), 1 => any::<u16>()])
            .prop_map(|(pid, version)| Message::HelloAck(HelloAck {
                role: PeerRole::Successor,
                version,
                pid,
                build_id: "new".into(),
                status: DaemonStatus::Successor,
            })),
        2 => prop_oneof![0u32..4, Just(300)].prop_map(|count| Message::ListenersAck { count }),
        3 => (id(), readiness()).prop_map(|(handoff, readiness)| Message::Ready { handoff, readiness }),
        3 => id().prop_map(|handoff| Message::CommitAck { handoff }),
        1 => Just(Message::Heartbeat),
        1 => text().prop_map(|reason| Message::Refused { reason }),
        2 => message_with(small_handoff_id()),
    ]
    .boxed()
}

fn from_incumbent() -> BoxedStrategy<Message> {
    let id = small_handoff_id;
    let status = prop_oneof![4 => Just(DaemonStatus::Serving), 1 => daemon_status()];
    prop_oneof![
        3 => (any_pid(), status).prop_map(|(pid, status)| Message::HelloAck(HelloAck {
            role: PeerRole::Incumbent,
            version: 1,
            pid,
            build_id: "old".into(),
            status,
        })),
        3 => (id(), drain_report()).prop_map(|(handoff, report)| Message::Drained { handoff, report }),
        1 => (id(), text()).prop_map(|(handoff, reason)| Message::DrainFailed { handoff, reason }),
        3 => (id(), seal_report()).prop_map(|(handoff, report)| Message::Sealed { handoff, report }),
        1 => (id(), text()).prop_map(|(handoff, reason)| Message::SealFailed { handoff, reason }),
        3 => id().prop_map(|handoff| Message::CommitAck { handoff }),
        2 => (id(), state_snapshot()).prop_map(|(handoff, snapshot)| Message::Resumed { handoff, snapshot }),
        1 => (id(), text()).prop_map(|(handoff, reason)| Message::ResumeFailed { handoff, reason }),
        2 => prop::collection::vec(listener_info_short(), 0..4)
            .prop_map(|batch| Message::Listeners { batch }),
        1 => Just(Message::Heartbeat),
        1 => text().prop_map(|reason| Message::Refused { reason }),
        2 => message_with(small_handoff_id()),
    ]
    .boxed()
}

fn sup_op(honest: u32) -> BoxedStrategy<SupOp> {
    let peer = || prop_oneof![Just(Peer::Incumbent), Just(Peer::Successor)];
    prop_oneof![
        2 => spec().prop_map(SupOp::Trigger),
        1 => Just(SupOp::SpawnedFresh),
        1 => text().prop_map(SupOp::SpawnFailed),
        1 => Just(SupOp::Connected),
        1 => text().prop_map(SupOp::ConnectFailed),
        3 => (from_successor(), any::<bool>())
            .prop_map(|(msg, framed)| SupOp::Msg { peer: Peer::Successor, msg, framed }),
        3 => (from_incumbent(), any::<bool>())
            .prop_map(|(msg, framed)| SupOp::Msg { peer: Peer::Incumbent, msg, framed }),
        1 => (peer(), message_with(small_handoff_id()), any::<bool>())
            .prop_map(|(peer, msg, framed)| SupOp::Msg { peer, msg, framed }),
        1 => (peer(), hostile_bytes()).prop_map(|(p, b)| SupOp::Bytes(p, b)),
        1 => peer().prop_map(SupOp::Closed),
        1 => any_pid().prop_map(SupOp::Exited),
        1 => any::<proptest::sample::Index>().prop_map(SupOp::ExitedKnown),
        1 => Just(SupOp::JournalWritten),
        1 => text().prop_map(SupOp::JournalFailed),
        1 => text().prop_map(SupOp::ListenerError),
        2 => advance_ms().prop_map(SupOp::Advance),
        1 => Just(SupOp::AdvanceToTimer),
        honest => any::<u8>().prop_map(SupOp::Honest),
    ]
    .boxed()
}

#[derive(Clone, Debug, PartialEq)]
enum SupDuty {
    Spawn,
    ColdSpawn,
    Journal,
    SuccHelloAck,
    SuccListenersAck(u32),
    Connect,
    IncHelloAck,
    Drained(HandoffId),
    Sealed(HandoffId),
    Ready(HandoffId, SealReport),
    SuccCommitAck(HandoffId),
    IncCommitAck(HandoffId),
    Resumed(HandoffId),
    ReturnListeners,
    Exit(Pid),
}

impl SupDuty {
    fn peer(&self) -> Option<Peer> {
        match self {
            SupDuty::SuccHelloAck
            | SupDuty::SuccListenersAck(_)
            | SupDuty::Ready(..)
            | SupDuty::SuccCommitAck(_) => Some(Peer::Successor),
            SupDuty::IncHelloAck
            | SupDuty::Drained(_)
            | SupDuty::Sealed(_)
            | SupDuty::IncCommitAck(_)
            | SupDuty::Resumed(_)
            | SupDuty::ReturnListeners => Some(Peer::Incumbent),
            _ => None,
        }
    }
}

fn peer_ix(p: Peer) -> usize {
    match p {
        Peer::Incumbent => 0,
        Peer::Successor => 1,
    }
}

/// The frames a channel could have delivered, found by length alone (ignoring the version
/// checks, which only ever reject more). A superset of what the machine decoded, so facts
/// "X was received" derived from it are never missing something the machine saw.
#[derive(Default)]
struct Scan {
    buf: Vec<u8>,
    dead: bool,
}

impl Scan {
    fn push(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        if self.dead {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= 4 {
            let len = u32::from_le_bytes(self.buf[0..4].try_into().unwrap());
            if !(2..=MAX_FRAME_LEN).contains(&len) {
                self.dead = true;
                break;
            }
            let total = 4 + len as usize;
            if self.buf.len() < total {
                break;
            }
            match decode_body(&self.buf[6..total]) {
                Ok(m) => out.push(m),
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
            self.buf.drain(..total);
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SupCtx {
    Other,
    TriggerOk(HandoffId),
}

const SUP_BEGIN: u32 = 0;
const SUP_COMMIT: u32 = 1;
const SUP_COMMITTED: u32 = 2;
const SUP_ROLLED_BACK_DRAINED: u32 = 3;
const SUP_LOST: u32 = 4;
const SUP_RECOVERED: u32 = 5;
const SUP_SECOND_HANDOFF: u32 = 6;
const SUP_MILESTONES: &[&str] = &[
    "Begin",
    "Commit",
    "Verdict::Committed",
    "Verdict::RolledBack drained",
    "Verdict::IncumbentLost",
    "Recovered",
    "second handoff",
];

struct SupHarness {
    m: Supervisor,
    clock: Clock,
    n_listeners: usize,
    // Facts from inputs.
    scans: [Scan; 2],
    peer_version: [Option<u16>; 2],
    sealed_from_inc: BTreeMap<HandoffId, Vec<SealReport>>,
    succ_commit_ack: BTreeSet<HandoffId>,
    resumed_from_inc: BTreeSet<HandoffId>,
    /// Daemons that said `Serving` on a (re)connection after the incumbent was asked to drain.
    serving_after_prepare: BTreeSet<(HandoffId, Pid)>,
    known_pids: BTreeSet<Pid>,
    // Facts from outputs.
    current: Option<HandoffId>,
    ids: BTreeSet<HandoffId>,
    journal_pending: Option<JournalRecord>,
    journal_max: HandoffId,
    commit_durable: BTreeSet<HandoffId>,
    in_flight_successor: BTreeMap<HandoffId, Pid>,
    in_flight_incumbent: BTreeMap<HandoffId, Pid>,
    prepare_sent: BTreeSet<HandoffId>,
    /// Pids killed while the current handoff ran.
    killed: BTreeSet<Pid>,
    idle_journaled: BTreeSet<HandoffId>,
    begin_sent: BTreeSet<HandoffId>,
    commit_sent_succ: BTreeSet<HandoffId>,
    commit_sent_inc: BTreeSet<HandoffId>,
    outcomes: BTreeSet<HandoffId>,
    // Cooperating environment.
    duties: Vec<SupDuty>,
    succ_pid: Pid,
    spawns: u32,
    serving: Pid,
    reached: Reached,
}

impl SupHarness {
    fn new(n_listeners: usize) -> Self {
        let cfg = SupervisorConfig {
            pid: 1,
            build_id: "supervisor".into(),
            versions: SUPPORTED_VERSIONS,
            timing: Timing {
                recovery_wait: Duration::from_secs(2),
                ..Timing::default()
            },
            listeners: listeners(n_listeners),
        };
        Self {
            m: Supervisor::with_incumbent(cfg, INCUMBENT, HandoffId(0)),
            clock: Clock::new(),
            n_listeners,
            scans: Default::default(),
            peer_version: [None, None],
            sealed_from_inc: BTreeMap::new(),
            succ_commit_ack: BTreeSet::new(),
            resumed_from_inc: BTreeSet::new(),
            serving_after_prepare: BTreeSet::new(),
            known_pids: [INCUMBENT].into_iter().collect(),
            current: None,
            ids: BTreeSet::new(),
            journal_pending: None,
            journal_max: HandoffId(0),
            commit_durable: BTreeSet::new(),
            in_flight_successor: BTreeMap::new(),
            in_flight_incumbent: BTreeMap::new(),
            prepare_sent: BTreeSet::new(),
            killed: BTreeSet::new(),
            idle_journaled: BTreeSet::new(),
            begin_sent: BTreeSet::new(),
            commit_sent_succ: BTreeSet::new(),
            commit_sent_inc: BTreeSet::new(),
            outcomes: BTreeSet::new(),
            duties: Vec::new(),
            succ_pid: 0,
            spawns: 0,
            serving: INCUMBENT,
            reached: Reached::default(),
        }
    }

    fn run((n_listeners, ops): (usize, Vec<SupOp>)) -> Result<Reached, TestCaseError> {
        let mut h = Self::new(n_listeners);
        h.drain(SupCtx::Other)?;
        for op in ops {
            h.apply(op)?;
        }
        Ok(h.reached)
    }

    /// A message that reached (or may have reached) the machine from `peer`.
    fn note_received(&mut self, peer: Peer, msg: &Message) {
        match (peer, msg) {
            (Peer::Incumbent, Message::Sealed { handoff, report }) => self
                .sealed_from_inc
                .entry(*handoff)
                .or_default()
                .push(report.clone()),
            (Peer::Successor, Message::CommitAck { handoff }) => {
                self.succ_commit_ack.insert(*handoff);
            }
            (Peer::Incumbent, Message::Resumed { handoff, .. }) => {
                self.resumed_from_inc.insert(*handoff);
            }
            (_, Message::HelloAck(ack)) => {
                self.known_pids.insert(ack.pid);
                if let Some(h) = self.current {
                    if peer == Peer::Incumbent
                        && ack.status == DaemonStatus::Serving
                        && self.prepare_sent.contains(&h)
                    {
                        self.serving_after_prepare.insert((h, ack.pid));
                    }
                }
            }
            _ => {}
        }
    }

    fn push_bytes(&mut self, peer: Peer, bytes: &[u8]) -> TestResult {
        let now = self.clock.now();
        for m in self.scans[peer_ix(peer)].push(bytes) {
            self.note_received(peer, &m);
        }
        let _ = self.m.handle_bytes(now, peer, bytes);
        Ok(())
    }

    fn apply(&mut self, op: SupOp) -> TestResult {
        if trace() && !matches!(op, SupOp::Honest(_)) {
            eprintln!("sup <- {op:?} [{}]", self.m.phase_name());
        }
        let now = self.clock.now();
        let mut ctx = SupCtx::Other;
        match op {
            SupOp::Trigger(spec) => {
                let idle = self.m.is_idle();
                if idle {
                    prop_assert!(self.m.incumbent().is_some(), "idle without an incumbent");
                }
                let in_handoff = self.m.current_handoff();
                match self.m.handle_trigger(now, spec) {
                    Ok(id) => {
                        prop_assert!(idle, "trigger accepted while not idle");
                        prop_assert!(
                            self.ids.iter().all(|old| *old < id),
                            "handoff id {} reused",
                            id
                        );
                        self.ids.insert(id);
                        self.current = Some(id);
                        self.killed.clear();
                        if self.ids.len() >= 2 {
                            self.reached.set(SUP_SECOND_HANDOFF);
                        }
                        ctx = SupCtx::TriggerOk(id);
                    }
                    Err(busy) => {
                        prop_assert!(!idle, "Busy while idle: {}", busy);
                        prop_assert_eq!(busy.handoff, in_handoff);
                    }
                }
            }
            SupOp::SpawnedFresh => {
                let pid = self.fresh_pid();
                return self.apply(SupOp::Spawned(pid));
            }
            SupOp::Spawned(pid) => {
                self.known_pids.insert(pid);
                self.succ_pid = pid;
                let _ = self.m.handle_spawned(now, pid);
            }
            SupOp::SpawnFailed(reason) => {
                let _ = self.m.handle_spawn_failed(now, reason);
            }
            SupOp::Connected => {
                let _ = self.m.handle_connected(now, self.serving);
            }
            SupOp::ConnectFailed(reason) => {
                let _ = self.m.handle_connect_failed(now, reason);
            }
            SupOp::Msg { peer, msg, framed } => {
                let ack_version = match &msg {
                    Message::HelloAck(ack) => Some(ack.version),
                    _ => None,
                };
                let r = if framed {
                    let bytes = frame_as_peer(&msg, self.peer_version[peer_ix(peer)]);
                    for m in self.scans[peer_ix(peer)].push(&bytes) {
                        self.note_received(peer, &m);
                    }
                    self.m.handle_bytes(now, peer, &bytes)
                } else {
                    self.note_received(peer, &msg);
                    self.m.handle_message(now, peer, msg)
                };
                if let (Some(v), Ok(())) = (ack_version, &r) {
                    self.peer_version[peer_ix(peer)] = Some(v);
                }
            }
            SupOp::Bytes(peer, bytes) => self.push_bytes(peer, &bytes)?,
            SupOp::Closed(peer) => self.m.handle_closed(now, peer),
            SupOp::Exited(pid) => self.m.handle_exited(now, pid),
            SupOp::ExitedKnown(i) => {
                let pids: Vec<Pid> = self.known_pids.iter().copied().collect();
                let pid = pids[i.index(pids.len())];
                return self.apply(SupOp::Exited(pid));
            }
            SupOp::JournalWritten => {
                let pending = self.journal_pending.clone();
                if self.m.handle_journal_written(now).is_ok() {
                    if let Some(JournalRecord::Committing { handoff, .. }) = pending {
                        self.commit_durable.insert(handoff);
                    }
                    self.journal_pending = None;
                }
            }
            SupOp::JournalFailed(reason) => {
                if self.m.handle_journal_failed(now, reason).is_ok() {
                    self.journal_pending = None;
                }
            }
            SupOp::ListenerError(reason) => self.m.handle_listener_error(now, reason),
            SupOp::Advance(ms) => {
                self.clock.advance(ms);
                self.timeout()?;
            }
            SupOp::AdvanceToTimer => {
                self.clock.advance_to(self.m.poll_timeout());
                self.timeout()?;
            }
            SupOp::Honest(sel) => return self.honest(sel),
        }
        self.drain(ctx)
    }

    fn timeout(&mut self) -> TestResult {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        if let Some(t) = self.m.poll_timeout() {
            prop_assert!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn drain(&mut self, ctx: SupCtx) -> TestResult {
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("sup -> {out:?}");
            }
            match out {
                SupervisorOutput::Send { to, frame } => {
                    check_frame(&frame)?;
                    self.on_send(to, &frame.message)?;
                }
                SupervisorOutput::Close { peer } => {
                    self.peer_version[peer_ix(peer)] = None;
                    self.duties.retain(|d| d.peer() != Some(peer));
                }
                SupervisorOutput::TakeListeners { batch } => {
                    prop_assert!(batch.len() <= self.n_listeners);
                    // An honest driver: the descriptors arrived and are the configured ones.
                    let now = self.clock.now();
                    self.m.handle_listeners_taken(now, batch.len() as u32);
                }
                SupervisorOutput::SpawnSuccessor { handoff } => {
                    prop_assert_eq!(ctx, SupCtx::TriggerOk(handoff), "spawn without trigger");
                    self.duties.push(SupDuty::Spawn);
                }
                SupervisorOutput::SpawnColdStart => self.duties.push(SupDuty::ColdSpawn),
                SupervisorOutput::Connect => self.duties.push(SupDuty::Connect),
                SupervisorOutput::Watch { pid } => {
                    prop_assert!(
                        self.known_pids.contains(&pid),
                        "watches unknown pid {}",
                        pid
                    );
                }
                SupervisorOutput::Kill { pid } => {
                    prop_assert!(self.known_pids.contains(&pid), "kills unknown pid {}", pid);
                    if let Some(h) = self.m.current_handoff() {
                        // During a handoff the incumbent is killed only once the successor
                        // committed (it ignored Commit past deadline + slack).
                        if self.in_flight_incumbent.get(&h) == Some(&pid) {
                            prop_assert!(
                                self.succ_commit_ack.contains(&h),
                                "kills the incumbent of {} before the successor committed",
                                h
                            );
                        }
                        self.killed.insert(pid);
                    }
                    self.duties.push(SupDuty::Exit(pid));
                }
                SupervisorOutput::WriteJournal(rec) => {
                    prop_assert!(
                        rec.last_handoff() >= self.journal_max,
                        "journal goes back from {} to {:?}",
                        self.journal_max,
                        rec
                    );
                    self.journal_max = rec.last_handoff();
                    match &rec {
                        JournalRecord::InFlight {
                            handoff,
                            incumbent,
                            successor,
                        } => {
                            prop_assert_eq!(Some(*handoff), self.current);
                            prop_assert!(self.known_pids.contains(incumbent));
                            self.in_flight_successor.insert(*handoff, *successor);
                            self.in_flight_incumbent.insert(*handoff, *incumbent);
                        }
                        JournalRecord::Committing {
                            handoff, successor, ..
                        } => {
                            prop_assert_eq!(Some(*handoff), self.current);
                            prop_assert_eq!(
                                self.in_flight_successor.get(handoff),
                                Some(successor),
                                "committing another successor than journaled in flight"
                            );
                        }
                        JournalRecord::Idle { last_handoff, .. } => {
                            self.idle_journaled.insert(*last_handoff);
                        }
                    }
                    self.journal_pending = Some(rec);
                    self.duties.push(SupDuty::Journal);
                }
                SupervisorOutput::Outcome(o) => {
                    let h = o.handoff;
                    prop_assert_eq!(Some(h), self.current);
                    prop_assert!(self.outcomes.insert(h), "second outcome for {}", h);
                    prop_assert!(self.idle_journaled.contains(&h), "outcome not journaled");
                    match &o.verdict {
                        Verdict::Committed { successor } => {
                            prop_assert!(
                                self.succ_commit_ack.contains(&h),
                                "Committed without the successor's CommitAck"
                            );
                            prop_assert!(self.commit_sent_succ.contains(&h));
                            prop_assert_eq!(self.in_flight_successor.get(&h), Some(successor));
                            prop_assert!(
                                !self.killed.contains(successor),
                                "Committed, but the successor was killed"
                            );
                            self.serving = *successor;
                            self.reached.set(SUP_COMMITTED);
                        }
                        Verdict::RolledBack {
                            incumbent, drained, ..
                        } => {
                            prop_assert!(
                                !self.commit_sent_inc.contains(&h),
                                "rolled back after the incumbent was told to commit"
                            );
                            prop_assert!(self.known_pids.contains(incumbent));
                            // "The incumbent serves" must rest on something it said.
                            if *drained {
                                prop_assert!(
                                    self.resumed_from_inc.contains(&h)
                                        || self.serving_after_prepare.contains(&(h, *incumbent)),
                                    "RolledBack(drained) without Resumed or a Serving HelloAck"
                                );
                                self.reached.set(SUP_ROLLED_BACK_DRAINED);
                            } else {
                                prop_assert!(
                                    !self.prepare_sent.contains(&h),
                                    "RolledBack(drained: false) after Prepare"
                                );
                            }
                        }
                        Verdict::IncumbentLost { .. } => {
                            prop_assert!(!self.commit_sent_inc.contains(&h));
                            self.reached.set(SUP_LOST);
                        }
                    }
                }
                SupervisorOutput::Recovered { serving, .. } => {
                    prop_assert!(self.known_pids.contains(&serving));
                    self.serving = serving;
                    self.reached.set(SUP_RECOVERED);
                }
            }
        }
        if let Some(h) = self.m.current_handoff() {
            prop_assert_eq!(Some(h), self.current);
        }
        prop_assert!(!self.m.is_idle() || self.m.current_handoff().is_none());
        Ok(())
    }

    fn on_send(&mut self, to: Peer, msg: &Message) -> TestResult {
        if let Some(h) = msg.handoff() {
            prop_assert_eq!(
                Some(h),
                self.current,
                "{} about another handoff",
                msg.kind()
            );
        }
        match (to, msg) {
            (_, Message::Hello(_)) => {
                // A fresh channel: its bytes start anew.
                self.scans[peer_ix(to)] = Scan::default();
                self.peer_version[peer_ix(to)] = None;
                self.duties.push(match to {
                    Peer::Incumbent => SupDuty::IncHelloAck,
                    Peer::Successor => SupDuty::SuccHelloAck,
                });
            }
            (Peer::Successor, Message::Welcome { listeners, .. }) => {
                prop_assert_eq!(*listeners as usize, self.n_listeners);
                self.duties.push(SupDuty::SuccListenersAck(*listeners));
            }
            (Peer::Successor, Message::Listeners { batch }) => {
                prop_assert!(batch.len() <= MAX_FDS_PER_MESSAGE);
            }
            (Peer::Incumbent, Message::Prepare { handoff, .. }) => {
                self.prepare_sent.insert(*handoff);
                self.duties.push(SupDuty::Drained(*handoff))
            }
            (Peer::Incumbent, Message::Seal { handoff }) => {
                self.duties.push(SupDuty::Sealed(*handoff))
            }
            (Peer::Successor, Message::Begin { handoff, seal }) => {
                // The successor may take the lock only after the incumbent sealed (and
                // released it) in this very handoff, and it opens what was sealed.
                let sealed = self.sealed_from_inc.get(handoff);
                prop_assert!(
                    sealed.is_some_and(|s| s.contains(seal)),
                    "Begin for {} without a Sealed from the incumbent",
                    handoff
                );
                prop_assert!(self.begin_sent.insert(*handoff), "Begin twice");
                self.reached.set(SUP_BEGIN);
                self.duties.push(SupDuty::Ready(*handoff, seal.clone()));
            }
            (_, Message::Commit { handoff }) => {
                prop_assert!(
                    self.commit_durable.contains(handoff),
                    "Commit for {} before the Committing record was durable",
                    handoff
                );
                self.reached.set(SUP_COMMIT);
                match to {
                    Peer::Successor => {
                        prop_assert!(self.commit_sent_succ.insert(*handoff), "Commit twice");
                        self.duties.push(SupDuty::SuccCommitAck(*handoff));
                    }
                    Peer::Incumbent => {
                        prop_assert!(
                            self.succ_commit_ack.contains(handoff),
                            "incumbent told to commit before the successor acknowledged"
                        );
                        prop_assert!(self.commit_sent_inc.insert(*handoff), "Commit twice");
                        self.duties.push(SupDuty::IncCommitAck(*handoff));
                    }
                }
            }
            (Peer::Incumbent, Message::Abort { handoff, .. }) => {
                prop_assert!(
                    !self.commit_sent_inc.contains(handoff),
                    "Abort after Commit to the incumbent"
                );
                self.duties.push(SupDuty::Resumed(*handoff));
            }
            (Peer::Incumbent, Message::ReturnListeners) => {
                self.duties.push(SupDuty::ReturnListeners)
            }
            _ => {}
        }
        Ok(())
    }

    /// Pids are never reused while a test runs: a spawn names a new process, never one of
    /// the pids random messages name (`INCUMBENT`, `SUCCESSORS`, 300).
    fn fresh_pid(&mut self) -> Pid {
        self.spawns += 1;
        1000 + self.spawns
    }

    fn send(&mut self, peer: Peer, msg: Message) -> TestResult {
        self.apply(SupOp::Msg {
            peer,
            msg,
            framed: true,
        })
    }

    fn honest(&mut self, sel: u8) -> TestResult {
        if self.duties.is_empty() {
            return self.apply(SupOp::Trigger(HandoffSpec {
                drain_grace: Duration::from_secs(1),
                deadline: Duration::from_secs(20),
            }));
        }
        let duty = self.duties.remove(sel as usize % self.duties.len());
        let variant = sel / 16;
        let fail = variant == 0;
        match duty {
            SupDuty::Spawn => {
                if fail {
                    self.apply(SupOp::SpawnFailed("no such binary".into()))
                } else {
                    let pid = self.fresh_pid();
                    self.apply(SupOp::Spawned(pid))
                }
            }
            SupDuty::ColdSpawn => {
                let pid = self.fresh_pid();
                self.serving = pid;
                self.apply(SupOp::Spawned(pid))
            }
            SupDuty::Journal => self.apply(if fail {
                SupOp::JournalFailed("disk full".into())
            } else {
                SupOp::JournalWritten
            }),
            SupDuty::SuccHelloAck => self.send(
                Peer::Successor,
                Message::HelloAck(HelloAck {
                    role: PeerRole::Successor,
                    version: 1,
                    pid: self.succ_pid,
                    build_id: "new".into(),
                    status: DaemonStatus::Successor,
                }),
            ),
            SupDuty::SuccListenersAck(count) => {
                self.send(Peer::Successor, Message::ListenersAck { count })
            }
            SupDuty::Connect => self.apply(if fail {
                SupOp::ConnectFailed("refused".into())
            } else {
                SupOp::Connected
            }),
            SupDuty::IncHelloAck => {
                let status = match (fail, self.current) {
                    (true, Some(h)) => DaemonStatus::Reclaiming(h),
                    _ => DaemonStatus::Serving,
                };
                self.send(
                    Peer::Incumbent,
                    Message::HelloAck(HelloAck {
                        role: PeerRole::Incumbent,
                        version: 1,
                        pid: self.serving,
                        build_id: "old".into(),
                        status,
                    }),
                )
            }
            SupDuty::Drained(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::DrainFailed {
                        handoff,
                        reason: "busy".into(),
                    }
                } else {
                    Message::Drained {
                        handoff,
                        report: DrainReport::default(),
                    }
                },
            ),
            SupDuty::Sealed(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::SealFailed {
                        handoff,
                        reason: "io".into(),
                    }
                } else {
                    Message::Sealed {
                        handoff,
                        report: SealReport {
                            last_revision_per_shard: vec![7, 8],
                            data_dir_fingerprint: 1,
                        },
                    }
                },
            ),
            SupDuty::Ready(handoff, seal) => self.send(
                Peer::Successor,
                Message::Ready {
                    handoff,
                    readiness: ReadinessSnapshot {
                        listening_on: Vec::new(),
                        healthz_ok: !fail,
                        advertised_revision_per_shard: seal.last_revision_per_shard,
                    },
                },
            ),
            SupDuty::SuccCommitAck(handoff) => {
                self.send(Peer::Successor, Message::CommitAck { handoff })
            }
            SupDuty::IncCommitAck(handoff) => {
                self.send(Peer::Incumbent, Message::CommitAck { handoff })
            }
            SupDuty::Resumed(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::ResumeFailed {
                        handoff,
                        reason: "hook".into(),
                    }
                } else {
                    Message::Resumed {
                        handoff,
                        snapshot: StateSnapshot::default(),
                    }
                },
            ),
            SupDuty::ReturnListeners => {
                let all = listeners(self.n_listeners);
                if all.is_empty() {
                    return self.send(Peer::Incumbent, Message::Listeners { batch: all });
                }
                for batch in all.chunks(MAX_FDS_PER_MESSAGE) {
                    self.send(
                        Peer::Incumbent,
                        Message::Listeners {
                            batch: batch.to_vec(),
                        },
                    )?;
                }
                Ok(())
            }
            SupDuty::Exit(pid) => self.apply(SupOp::Exited(pid)),
        }
    }
}

fn sup_case() -> BoxedStrategy<(usize, Vec<SupOp>)> {
    (
        prop_oneof![2 => Just(0usize), 4 => Just(2), 1 => Just(300)],
        op_sequence(sup_op),
    )
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(3000)))]

    /// Random inputs never panic the supervisor, and its outputs keep the handoff order:
    /// `Begin` only after the incumbent's `Sealed` of the current handoff (with that seal);
    /// `Commit` only once the `Committing` record is durable, and to the incumbent only after
    /// the successor's `CommitAck`; `Verdict::Committed` only after that `CommitAck`; no
    /// rollback after the incumbent was told to commit; one outcome per handoff, journaled
    /// first; `handle_trigger` is `Busy` exactly when not idle, and ids never repeat.
    #[test]
    fn supervisor_random_inputs_keep_commit_order(case in sup_case()) {
        SupHarness::run(case)?;
    }
}

#[test]
fn supervisor_random_runs_reach_every_phase() {
    let got = coverage(300, sup_case(), SupHarness::run);
    assert_reached(got, SUP_MILESTONES);
}

// ------------------------------------------------------------------------------------------
// Regression tests for bugs these property tests found in src (all fixed), as minimal
// reproductions.
// ------------------------------------------------------------------------------------------

/// Drive a supervisor (no listeners, incumbent 100) through a cooperative handoff until it has
/// sent `Commit` to the successor (pid 200); `successor_acks` also feeds the successor's
/// `CommitAck`, after which `Commit` goes to the incumbent. Returns the outputs of the last step.
fn supervisor_at_commit(now: Instant, successor_acks: bool) -> (Supervisor, Vec<SupervisorOutput>) {
    let cfg = plain_cfg();
    let h = HandoffId(1);
    let mut s = Supervisor::with_incumbent(cfg, INCUMBENT, HandoffId(0));
    let spec = HandoffSpec {
        drain_grace: Duration::from_secs(1),
        deadline: Duration::from_secs(20),
    };
    assert_eq!(s.handle_trigger(now, spec), Ok(h));
    s.handle_spawned(now, 200).unwrap();
    s.handle_journal_written(now).unwrap(); // InFlight
    let ack = |role, pid| {
        Message::HelloAck(HelloAck {
            role,
            version: 1,
            pid,
            build_id: "b".into(),
            status: if role == PeerRole::Incumbent {
                DaemonStatus::Serving
            } else {
                DaemonStatus::Successor
            },
        })
    };
    s.handle_message(now, Peer::Successor, ack(PeerRole::Successor, 200))
        .unwrap();
    s.handle_message(now, Peer::Successor, Message::ListenersAck { count: 0 })
        .unwrap();
    s.handle_connected(now, INCUMBENT).unwrap();
    s.handle_message(now, Peer::Incumbent, ack(PeerRole::Incumbent, INCUMBENT))
        .unwrap();
    let report = DrainReport::default();
    s.handle_message(
        now,
        Peer::Incumbent,
        Message::Drained { handoff: h, report },
    )
    .unwrap();
    let seal = SealReport {
        last_revision_per_shard: vec![1],
        data_dir_fingerprint: 2,
    };
    let report = seal.clone();
    s.handle_message(now, Peer::Incumbent, Message::Sealed { handoff: h, report })
        .unwrap();
    let readiness = ReadinessSnapshot {
        listening_on: Vec::new(),
        healthz_ok: true,
        advertised_revision_per_shard: vec![1],
    };
    s.handle_message(
        now,
        Peer::Successor,
        Message::Ready {
            handoff: h,
            readiness,
        },
    )
    .unwrap();
    s.handle_journal_written(now).unwrap(); // Committing: Commit goes to the successor
    if successor_acks {
        while s.poll_output().is_some() {}
        s.handle_message(now, Peer::Successor, Message::CommitAck { handoff: h })
            .unwrap();
    }
    let outs = std::iter::from_fn(|| s.poll_output()).collect();
    (s, outs)
}

/// Regression (found by the random supervisor test). After the successor acknowledged `Commit` (it marked the lock record committed and
/// serves) and the supervisor told the incumbent to commit (it retires), any unexpected input
/// from the successor (here a duplicated `CommitAck`; equally any undecodable bytes) makes
/// the supervisor treat it as a pre-commit protocol violation: it kills the committed
/// successor and then sends `Abort` to the incumbent it already told to commit. Nobody
/// serves. Cause: `Supervisor::violation` calls `abort` for every successor violation, and
/// `abort` only refuses in `Aborting`/`Finishing`, not in `CommittingIncumbent`.
#[test]
fn supervisor_never_aborts_after_the_successor_acknowledged_commit() {
    let now = Instant::now();
    let (mut s, outs) = supervisor_at_commit(now, true);
    assert!(outs.iter().any(|o| matches!(
        o,
        SupervisorOutput::Send { to: Peer::Incumbent, frame } if matches!(frame.message, Message::Commit { .. })
    )));
    assert_eq!(s.phase_name(), "retiring incumbent");
    // A late duplicate from the committed successor.
    let _ = s.handle_message(
        now,
        Peer::Successor,
        Message::CommitAck {
            handoff: HandoffId(1),
        },
    );
    let outs: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    s.handle_exited(now, 200);
    let outs2: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, SupervisorOutput::Kill { pid: 200 })),
        "killed the committed successor: {outs:?}"
    );
    assert!(
        !outs2.iter().any(|o| matches!(
            o,
            SupervisorOutput::Send { frame, .. } if matches!(frame.message, Message::Abort { .. })
        )),
        "aborted a committed handoff: {outs2:?}"
    );
}

/// Regression (I5). The deadline used to do nothing while the supervisor waits for the successor's
/// `CommitAck` (`on_deadline` ignores `CommittingSuccessor` and does not re-arm), so a
/// successor that keeps its channel alive (heartbeats) without acknowledging keeps the
/// handoff open forever, far past `deadline + slack`.
#[test]
fn supervisor_stops_waiting_for_commit_ack_at_deadline_plus_slack() {
    let start = Instant::now();
    let (mut s, _) = supervisor_at_commit(start, false);
    assert_eq!(s.phase_name(), "committing successor");
    let slack = Timing::default().slack;
    let mut now = start;
    // Deadline 20 s; watch for a minute while the successor heartbeats every second.
    for _ in 0..60 {
        now += Duration::from_secs(1);
        // Once the supervisor gives up, it closes the channels: feeding them is then misuse.
        let _ = s.handle_message(now, Peer::Successor, Message::Heartbeat);
        let _ = s.handle_message(now, Peer::Incumbent, Message::Heartbeat);
        s.handle_timeout(now);
        while s.poll_output().is_some() {}
    }
    assert!(now > start + Duration::from_secs(20) + slack);
    assert_ne!(
        s.phase_name(),
        "committing successor",
        "handoff still open {:?} after its deadline + slack",
        now - start - Duration::from_secs(20) - slack
    );
}

/// Regression (not a safety bug, but an easy double close in a driver that
/// names connections by fd number, as the `ConnId` docs suggest). `handle_closed` of an idle
/// connection emits nothing, but `handle_closed` of the handoff's connection emits
/// `Close { conn }` for the connection the driver just reported closed
/// (`lose_supervisor` pushes `Close` unconditionally).
#[test]
fn incumbent_does_not_close_a_connection_reported_closed() {
    let now = Instant::now();
    let mut m = Incumbent::serving(daemon_config(10, Vec::new()));
    m.handle_connected(now, ConnId(1)).unwrap();
    let hello = Message::Hello(Hello {
        role: PeerRole::Supervisor,
        versions: SUPPORTED_VERSIONS,
        pid: 1,
        build_id: "s".into(),
    });
    m.handle_message(now, ConnId(1), hello).unwrap();
    let prepare = Message::Prepare {
        handoff: HandoffId(1),
        successor: 20,
        drain_grace_ms: 1000,
        deadline_ms: 10_000,
    };
    m.handle_message(now, ConnId(1), prepare).unwrap();
    while m.poll_output().is_some() {}
    m.handle_closed(now, ConnId(1)).unwrap();
    let outs: Vec<_> = std::iter::from_fn(|| m.poll_output()).collect();
    assert!(
        !outs.contains(&IncumbentOutput::Close { conn: ConnId(1) }),
        "asked to close the connection the driver reported closed: {outs:?}"
    );
}

// ------------------------------------------------------------------------------------------
// The incumbent's HelloAck must name the process at the other end of the control connection.
// ------------------------------------------------------------------------------------------

fn serving_ack(pid: Pid) -> Message {
    Message::HelloAck(HelloAck {
        role: PeerRole::Incumbent,
        version: 1,
        pid,
        build_id: "b".into(),
        status: DaemonStatus::Serving,
    })
}

fn plain_cfg() -> SupervisorConfig {
    SupervisorConfig {
        pid: 1,
        build_id: "s".into(),
        versions: SUPPORTED_VERSIONS,
        timing: Timing {
            recovery_wait: Duration::from_secs(2),
            ..Timing::default()
        },
        listeners: Vec::new(),
    }
}

/// A recovering supervisor is answered by pid 7 (`SO_PEERCRED`) whose HelloAck names pid 3,
/// the pid the journal names: the answer is refused, pid 3 is not adopted (no `Recovered`, no
/// journal naming it), and, nobody else being alive, the daemon is started cold at once.
#[test]
fn recovery_refuses_a_helloack_naming_another_pid_than_the_peer() {
    let now = Instant::now();
    let record = JournalRecord::Idle {
        serving: Some(3),
        last_handoff: HandoffId(4),
    };
    let mut s = Supervisor::recover(plain_cfg(), now, Some(record), true);
    s.handle_exited(now, 3);
    while s.poll_output().is_some() {}
    s.handle_connected(now, 7).unwrap();
    while s.poll_output().is_some() {}
    let e = s
        .handle_message(now, Peer::Incumbent, serving_ack(3))
        .unwrap_err();
    assert_eq!(
        e,
        handoff_proto::Error::Peer(handoff_proto::PeerMisbehaved::PeerPidMismatch {
            peer: 7,
            claimed: 3
        })
    );
    assert_eq!(
        e.to_string(),
        "peer misbehaved: the control socket is served by pid 7, but its HelloAck says pid 3"
    );
    let outs: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(
        matches!(&outs[..], [
            SupervisorOutput::Send { frame, .. },
            SupervisorOutput::Close { peer: Peer::Incumbent },
            SupervisorOutput::SpawnColdStart,
        ] if matches!(frame.message, Message::Refused { .. })),
        "{outs:?}"
    );
    // The same pid, when the kernel agrees, is adopted.
    let mut s = Supervisor::recover(plain_cfg(), now, None, true);
    while s.poll_output().is_some() {}
    s.handle_connected(now, 3).unwrap();
    s.handle_message(now, Peer::Incumbent, serving_ack(3))
        .unwrap();
    let outs: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(
        outs.iter().any(|o| matches!(
            o,
            SupervisorOutput::WriteJournal(JournalRecord::Idle {
                serving: Some(3),
                ..
            })
        )),
        "{outs:?}"
    );
}

/// During a handoff, an incumbent answer whose pid disagrees with the peer's is a protocol
/// violation before `Prepare`: the handoff rolls back untouched.
#[test]
fn handoff_aborts_on_a_helloack_naming_another_pid_than_the_peer() {
    let now = Instant::now();
    let mut s = Supervisor::with_incumbent(plain_cfg(), INCUMBENT, HandoffId(0));
    let spec = HandoffSpec {
        drain_grace: Duration::from_secs(1),
        deadline: Duration::from_secs(20),
    };
    s.handle_trigger(now, spec).unwrap();
    s.handle_spawned(now, 200).unwrap();
    s.handle_journal_written(now).unwrap();
    s.handle_message(
        now,
        Peer::Successor,
        Message::HelloAck(HelloAck {
            role: PeerRole::Successor,
            version: 1,
            pid: 200,
            build_id: "n".into(),
            status: DaemonStatus::Successor,
        }),
    )
    .unwrap();
    s.handle_message(now, Peer::Successor, Message::ListenersAck { count: 0 })
        .unwrap();
    while s.poll_output().is_some() {}
    s.handle_connected(now, INCUMBENT + 1).unwrap();
    let e = s
        .handle_message(now, Peer::Incumbent, serving_ack(INCUMBENT))
        .unwrap_err();
    assert!(
        matches!(
            e,
            handoff_proto::Error::Peer(handoff_proto::PeerMisbehaved::PeerPidMismatch { .. })
        ),
        "{e:?}"
    );
    let outs: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, SupervisorOutput::Send { frame, .. } if matches!(frame.message, Message::Prepare { .. }))),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, SupervisorOutput::Kill { pid: 200 })),
        "{outs:?}"
    );
}
