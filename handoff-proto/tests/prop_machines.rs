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
//!
//! The harnesses (ops, honest environment, invariant checkers) are `handoff_proto::sim`,
//! shared with the fuzz targets; this file draws their ops with proptest strategies (so
//! failures shrink) and turns a `Violation` into a failed case.

mod prop_support;

use std::cell::RefCell;
use std::time::{Duration, Instant};

use handoff_proto::sim::incumbent::{self, IncHarness, IncOp};
use handoff_proto::sim::successor::{self, SuccHarness, SuccOp};
use handoff_proto::sim::supervisor::{self, SupHarness, SupOp, INCUMBENT, SUCCESSORS};
use handoff_proto::sim::{daemon_config, Reached, Violation};
use handoff_proto::wire::{DaemonStatus, Hello, HelloAck, Message, PeerRole, SUPPORTED_VERSIONS};
use handoff_proto::{
    ConnId, DrainReport, HandoffId, HandoffSpec, Incumbent, IncumbentOutput, JournalRecord,
    LockResult, Peer, Pid, ReadinessSnapshot, SealReport, Supervisor, SupervisorConfig,
    SupervisorOutput, Timing,
};
use prop_support::*;
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};

const MAX_OPS: usize = 60;

/// A broken invariant fails the case, with the violation's message.
fn prop<T>(r: Result<T, Violation>) -> Result<T, TestCaseError> {
    r.map_err(|v| TestCaseError::fail(v.to_string()))
}

// ------------------------------------------------------------------------------------------
// Shared pieces
// ------------------------------------------------------------------------------------------

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
        prop(IncHarness::run(ops))?;
    }
}

#[test]
fn incumbent_random_runs_reach_every_phase() {
    let got = coverage(300, op_sequence(inc_op), |ops| prop(IncHarness::run(ops)));
    assert_reached(got, incumbent::MILESTONES);
}

// ------------------------------------------------------------------------------------------
// Successor
// ------------------------------------------------------------------------------------------

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
        prop(SuccHarness::run(ops))?;
    }
}

#[test]
fn successor_random_runs_reach_every_phase() {
    let got = coverage(300, op_sequence(succ_op), |ops| prop(SuccHarness::run(ops)));
    assert_reached(got, successor::MILESTONES);
}

// ------------------------------------------------------------------------------------------
// Supervisor
// ------------------------------------------------------------------------------------------

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
        1 => any::<usize>().prop_map(SupOp::ExitedKnown),
        1 => Just(SupOp::JournalWritten),
        1 => text().prop_map(SupOp::JournalFailed),
        1 => text().prop_map(SupOp::ListenerError),
        2 => advance_ms().prop_map(SupOp::Advance),
        1 => Just(SupOp::AdvanceToTimer),
        honest => any::<u8>().prop_map(SupOp::Honest),
    ]
    .boxed()
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
        let (n_listeners, ops) = case;
        prop(SupHarness::run(n_listeners, ops))?;
    }
}

#[test]
fn supervisor_random_runs_reach_every_phase() {
    let got = coverage(300, sup_case(), |(n, ops)| prop(SupHarness::run(n, ops)));
    assert_reached(got, supervisor::MILESTONES);
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
