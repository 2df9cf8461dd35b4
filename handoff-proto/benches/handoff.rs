//! A whole handoff in the sans-io core, with no I/O: the supervisor, the incumbent and the
//! successor exchange encoded frames in memory (`support::Sim`) from the trigger to the
//! supervisor's outcome, with every driver obligation (spawn, journal, hooks, lock) performed
//! at once. What is left is the protocol's own CPU cost: encoding, decoding and the three
//! machines' steps.
//!
//! - `handoff/commit/{1,1000}`: a handoff that commits, with 1 and 1,000 listeners.
//! - `handoff/rollback/1`: the successor's readiness is rejected after the incumbent sealed;
//!   the supervisor kills the successor, the incumbent takes the lock back and resumes.
//!
//! Run: `cargo bench -p handoff-proto --bench handoff`.

// `criterion_group!` defines a public function without documentation.
#![allow(missing_docs)]

mod support;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use handoff_proto::supervisor::Verdict;
use handoff_proto::AbortReason;
use support::{Sim, INC, SUCC};

/// Run one handoff outside the benchmark and check everything it should have done, so a
/// broken wiring cannot be measured as a fast handoff.
fn check_commit(n: usize) {
    let mut sim = Sim::new(n, true);
    let outcome = sim.run().clone();
    assert_eq!(outcome.verdict, Verdict::Committed { successor: SUCC });
    assert!(sim.incumbent_retired && sim.successor_committed);
    assert!(sim.successor().is_committed());
    assert_eq!(sim.lock, Some(SUCC));
    assert_eq!(
        sim.lock_record.and_then(|r| r.committed),
        Some(outcome.handoff)
    );
    assert_eq!(sim.taken, n, "every listener reached the successor");
    assert!(sim.sup.is_idle());
    assert_eq!(sim.sup.incumbent(), Some(SUCC));
}

fn check_rollback() {
    let mut sim = Sim::new(1, false);
    let outcome = sim.run().clone();
    assert!(
        matches!(
            outcome.verdict,
            Verdict::RolledBack {
                incumbent: INC,
                reason: AbortReason::ReadinessRejected(_),
                drained: true,
            }
        ),
        "{:?}",
        outcome.verdict
    );
    assert!(sim.inc.is_serving() && sim.succ.is_none());
    assert_eq!(sim.lock, Some(INC));
    assert_eq!(sim.sup.incumbent(), Some(INC));
}

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    for n in [1, 1000] {
        check_commit(n);
        g.bench_with_input(BenchmarkId::new("commit", n), &n, |b, &n| {
            b.iter_batched(
                || Sim::new(n, true),
                |mut sim| {
                    // The cheap check inside the loop: a failed path cannot pass for a fast one.
                    assert!(black_box(sim.run()).committed());
                    sim // dropped outside the measurement
                },
                BatchSize::SmallInput,
            )
        });
    }
    check_rollback();
    g.bench_function(BenchmarkId::new("rollback", 1), |b| {
        b.iter_batched(
            || Sim::new(1, false),
            |mut sim| {
                let verdict = &black_box(sim.run()).verdict;
                assert!(matches!(verdict, Verdict::RolledBack { drained: true, .. }));
                sim
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = support::criterion();
    targets = handoff
}
criterion_main!(benches);
