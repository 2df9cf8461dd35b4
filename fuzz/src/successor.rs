//! `successor`: the successor machine fed arbitrary op sequences (hostile supervisor
//! messages and bytes, lock results, listener errors, `ready` at any time, time), mixed with
//! `Honest` ops in which a cooperating supervisor and application perform one obligation.
//! The harness and its invariants (I3, one handoff per successor, no output after the end,
//! `holds_lock` agrees) are `handoff_proto::sim::successor`, shared with
//! `successor_random_inputs_open_data_only_with_the_lock` in
//! `handoff-proto/tests/prop_machines.rs`.

use handoff_proto::sim::successor::{internal, SuccHarness};
pub use handoff_proto::sim::successor::{Op, MILESTONES};

use super::machine::{check, for_each_op, Reached};

/// The fuzz target.
pub fn run(data: &[u8]) {
    run_ops(data);
}

/// Run the ops in `data`; the milestones reached (for the seed generator).
pub fn run_ops(data: &[u8]) -> Reached {
    let mut h = check(SuccHarness::start());
    for_each_op(data, |op: Op| check(h.apply(internal(op))));
    h.reached()
}

/// The bytes of an honest run: `Honest(sel)` for each `Some(sel)`, `AdvanceToTimer` for
/// each `None`.
pub fn honest_bytes(steps: &[Option<u8>]) -> Vec<u8> {
    super::machine::honest_bytes(9, steps)
}

/// Decode `data` to ops (for the seed generator's round-trip check).
pub fn decode(data: &[u8]) -> Vec<Op> {
    super::machine::decode(data)
}
