//! One step of each role machine: one input (`handle_*`), then the complete drain of
//! `poll_output` and the `poll_timeout` that the driving rule asks for after it. The outputs
//! are dropped inside the measurement, as a driver drops them once performed.
//!
//! Each machine is prepared outside the measurement by running a real handoff in `support::Sim`
//! up to the frame that the step takes, so it is in the exact state a handoff reaches it in;
//! every iteration steps a fresh clone (`iter_batched`; the clone and the drop of the machine
//! are not timed). Before measuring, each step is run once and its outputs are checked, so the
//! benchmark cannot drift onto another path.
//!
//! Run: `cargo bench -p handoff-proto --bench step`.

// `criterion_group!` defines a public function without documentation.
#![allow(missing_docs)]

mod support;

use std::fmt::Debug;
use std::hint::black_box;
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion};
use handoff_proto::incumbent::IncumbentOutput;
use handoff_proto::successor::SuccessorOutput;
use handoff_proto::supervisor::{Peer, SupervisorOutput};
use handoff_proto::wire::{encode, Message};
use handoff_proto::{Incumbent, Successor, Supervisor, MAX_FDS_PER_MESSAGE};
use support::{Dest, Sim, SPEC, TICK};

/// What the benchmarks need of a role machine.
trait Machine: Clone {
    type Output: Debug;
    fn poll_output(&mut self) -> Option<Self::Output>;
    fn poll_timeout(&self) -> Option<Instant>;
    /// A short name for an output: its variant, and the message kind of a send.
    fn label(o: &Self::Output) -> String;
}

/// The variant name from an output's `Debug` form.
fn variant(o: &impl Debug) -> String {
    let s = format!("{o:?}");
    let end = s.find(['(', ' ', '{']).unwrap_or(s.len());
    s[..end].to_string()
}

impl Machine for Supervisor {
    type Output = SupervisorOutput;
    fn poll_output(&mut self) -> Option<SupervisorOutput> {
        Supervisor::poll_output(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Supervisor::poll_timeout(self)
    }
    fn label(o: &SupervisorOutput) -> String {
        match o {
            SupervisorOutput::Send { to, frame } => {
                format!("send {to:?} {}", frame.message.kind())
            }
            o => variant(o),
        }
    }
}

impl Machine for Incumbent {
    type Output = IncumbentOutput;
    fn poll_output(&mut self) -> Option<IncumbentOutput> {
        Incumbent::poll_output(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Incumbent::poll_timeout(self)
    }
    fn label(o: &IncumbentOutput) -> String {
        match o {
            IncumbentOutput::Send { frame, .. } => format!("send {}", frame.message.kind()),
            o => variant(o),
        }
    }
}

impl Machine for Successor {
    type Output = SuccessorOutput;
    fn poll_output(&mut self) -> Option<SuccessorOutput> {
        Successor::poll_output(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Successor::poll_timeout(self)
    }
    fn label(o: &SuccessorOutput) -> String {
        match o {
            SuccessorOutput::Send(frame) => format!("send {}", frame.message.kind()),
            o => variant(o),
        }
    }
}

/// Benchmark `input` applied to a clone of `machine`, plus the drain; check once first that
/// the step produces exactly `expect`.
fn bench_step<M: Machine>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    machine: M,
    expect: &[&str],
    input: impl Fn(&mut M),
) {
    let mut m = machine.clone();
    input(&mut m);
    let got: Vec<String> = std::iter::from_fn(|| m.poll_output())
        .map(|o| M::label(&o))
        .collect();
    assert_eq!(got, expect, "{name}: the step's outputs");
    g.bench_function(name, |b| {
        b.iter_batched(
            || machine.clone(),
            |mut m| {
                input(&mut m);
                while let Some(o) = m.poll_output() {
                    black_box(o);
                }
                black_box(m.poll_timeout());
                m // dropped outside the measurement
            },
            BatchSize::SmallInput,
        )
    });
}

/// A handoff with `n` listeners, run up to the next frame of `kind` for `to`: that frame's
/// bytes, and the time of its delivery.
fn at_frame(n: usize, to: Dest, kind: &str) -> (Sim, Vec<u8>, Instant) {
    let mut sim = Sim::new(n, true);
    sim.trigger();
    let bytes = sim.advance_to(to, kind);
    let now = sim.now + TICK;
    (sim, bytes, now)
}

fn supervisor(c: &mut Criterion) {
    let mut g = c.benchmark_group("supervisor");

    let sim = Sim::new(1, true);
    let now = sim.now;
    bench_step(&mut g, "trigger", sim.sup, &["SpawnSuccessor"], |m| {
        m.handle_trigger(now, SPEC).expect("idle");
    });

    // The successor's HelloAck: the supervisor sends Welcome and every listener batch.
    for n in [1, 1000] {
        let (sim, bytes, now) = at_frame(n, Dest::Sup(Peer::Successor), "HelloAck");
        let batches = n.div_ceil(MAX_FDS_PER_MESSAGE);
        let mut expect = vec!["send Successor Welcome"];
        expect.extend(std::iter::repeat_n("send Successor Listeners", batches));
        let name = format!("hello_ack_successor/{n}");
        bench_step(&mut g, &name, sim.sup, &expect, |m| {
            m.handle_bytes(now, Peer::Successor, &bytes).expect("valid");
        });
    }

    let (sim, bytes, now) = at_frame(1, Dest::Sup(Peer::Incumbent), "Sealed");
    let expect = ["send Successor Begin"];
    bench_step(&mut g, "sealed", sim.sup, &expect, |m| {
        m.handle_bytes(now, Peer::Incumbent, &bytes).expect("valid");
    });

    let (sim, bytes, now) = at_frame(1, Dest::Sup(Peer::Successor), "Ready");
    bench_step(&mut g, "ready", sim.sup, &["WriteJournal"], |m| {
        m.handle_bytes(now, Peer::Successor, &bytes).expect("valid");
    });

    // While the incumbent drains, the heartbeat timer falls due: a heartbeat to each peer.
    let (sim, _, _) = at_frame(1, Dest::Sup(Peer::Incumbent), "Drained");
    let due = sim.sup.poll_timeout().expect("a handoff has timers");
    let expect = ["send Successor Heartbeat", "send Incumbent Heartbeat"];
    bench_step(&mut g, "heartbeat_timer", sim.sup, &expect, |m| {
        m.handle_timeout(due)
    });

    g.finish();
}

fn incumbent(c: &mut Criterion) {
    let mut g = c.benchmark_group("incumbent");

    let (sim, bytes, now) = at_frame(1, Dest::Inc, "Hello");
    let conn = sim.inc_conn.expect("connected");
    bench_step(&mut g, "hello", sim.inc, &["send HelloAck"], |m| {
        m.handle_bytes(now, conn, &bytes).expect("valid");
    });

    // A heartbeat on the negotiated session: the floor of any message.
    let (sim, _, now) = at_frame(1, Dest::Inc, "Prepare");
    let conn = sim.inc_conn.expect("connected");
    let hb = encode(1, &Message::Heartbeat).expect("encodes");
    bench_step(&mut g, "heartbeat", sim.inc.clone(), &[], |m| {
        m.handle_bytes(now, conn, &hb).expect("valid");
    });

    let (sim, bytes, now) = at_frame(1, Dest::Inc, "Prepare");
    bench_step(&mut g, "prepare", sim.inc, &["CallDrain"], |m| {
        m.handle_bytes(now, conn, &bytes).expect("valid");
    });

    let (sim, bytes, now) = at_frame(1, Dest::Inc, "Commit");
    let expect = ["send CommitAck", "Close", "Retire"];
    bench_step(&mut g, "commit", sim.inc, &expect, |m| {
        m.handle_bytes(now, conn, &bytes).expect("valid");
    });

    g.finish();
}

fn successor(c: &mut Criterion) {
    let mut g = c.benchmark_group("successor");
    let succ = |sim: Sim| sim.succ.expect("spawned");

    let (sim, bytes, now) = at_frame(1, Dest::Succ, "Hello");
    bench_step(&mut g, "hello", succ(sim), &["send HelloAck"], |m| {
        m.handle_bytes(now, &bytes).expect("valid");
    });

    // The largest frame of a handoff: a full batch of listeners, which completes the set.
    let n = MAX_FDS_PER_MESSAGE;
    let (sim, bytes, now) = at_frame(n, Dest::Succ, "Listeners");
    let expect = ["TakeListeners", "send ListenersAck"];
    bench_step(&mut g, &format!("listeners/{n}"), succ(sim), &expect, |m| {
        m.handle_bytes(now, &bytes).expect("valid");
    });

    let (sim, bytes, now) = at_frame(1, Dest::Succ, "Begin");
    bench_step(&mut g, "begin", succ(sim), &["AcquireLock"], |m| {
        m.handle_bytes(now, &bytes).expect("valid");
    });

    let (sim, bytes, now) = at_frame(1, Dest::Succ, "Commit");
    let expect = ["MarkCommitted", "send CommitAck", "Committed"];
    bench_step(&mut g, "commit", succ(sim), &expect, |m| {
        m.handle_bytes(now, &bytes).expect("valid");
    });

    g.finish();
}

criterion_group! {
    name = benches;
    config = support::criterion();
    targets = supervisor, incumbent, successor
}
criterion_main!(benches);
