//! `supervisor`: the supervisor machine fed arbitrary op sequences (triggers, spawn and
//! connect results, messages and bytes from either daemon, exits, journal results, time),
//! mixed with `Honest` ops in which cooperating daemons and a driver perform one obligation.
//! The harness and its invariants (the commit order, I3 from the supervisor's side, one
//! journaled outcome per handoff, ...) are `handoff_proto::sim::supervisor`, shared with
//! `supervisor_random_inputs_keep_commit_order` in `handoff-proto/tests/prop_machines.rs`.
//!
//! Input layout: one byte choosing the listener count (0, 2 or 300), then the ops.

use handoff_proto::sim::supervisor::{internal, SupHarness};
pub use handoff_proto::sim::supervisor::{Op, MILESTONES};

use super::machine::{check, for_each_op, Reached};

/// The fuzz target.
pub fn run(data: &[u8]) {
    run_ops(data);
}

/// The listener count the first byte chooses.
fn n_listeners(b: u8) -> usize {
    match b % 8 {
        0 | 1 => 0,
        7 => 300,
        _ => 2,
    }
}

/// Run the ops in `data`; the milestones reached (for the seed generator).
pub fn run_ops(data: &[u8]) -> Reached {
    let Some((first, ops)) = data.split_first() else {
        return Reached::default();
    };
    let mut h = check(SupHarness::start(n_listeners(*first)));
    for_each_op(ops, |op: Op| check(h.apply(internal(op))));
    h.reached()
}

/// The bytes of an honest run with `n` listeners (0, 2 or 300): `Honest(sel)` for each
/// `Some(sel)`, `AdvanceToTimer` for each `None`.
pub fn honest_bytes(n: usize, steps: &[Option<u8>]) -> Vec<u8> {
    let first = match n {
        0 => 0,
        300 => 7,
        _ => 2,
    };
    let mut out = vec![first];
    out.extend(super::machine::honest_bytes(18, steps));
    out
}

/// Decode `data` to ops (for the seed generator's round-trip check).
pub fn decode(data: &[u8]) -> Vec<Op> {
    data.split_first()
        .map(|(_, rest)| super::machine::decode(rest))
        .unwrap_or_default()
}
