//! `incumbent`: the incumbent machine fed arbitrary op sequences (hostile supervisors and
//! bytes, driver misuse, hook results, lock results, time), mixed with `Honest` ops in which
//! a cooperating supervisor and application perform one obligation the machine asked for.
//! The harness and its invariants (I1, I2, retire, lock-attempt and timer rules) are
//! `handoff_proto::sim::incumbent`, shared with `incumbent_random_inputs_keep_lock_invariants`
//! in `handoff-proto/tests/prop_machines.rs`.

use handoff_proto::sim::incumbent::IncHarness;
pub use handoff_proto::sim::incumbent::{Op, MILESTONES};

use super::machine::{check, for_each_op, Reached};

/// The fuzz target.
pub fn run(data: &[u8]) {
    run_ops(data);
}

/// Run the ops in `data`; the milestones reached (for the seed generator).
pub fn run_ops(data: &[u8]) -> Reached {
    let mut h = check(IncHarness::start());
    for_each_op(data, |op: Op| {
        let op = h.internal(op);
        check(h.apply(op));
    });
    h.reached()
}

/// The bytes of an honest run: `Honest(sel)` for each `Some(sel)`, `AdvanceToTimer` for
/// each `None`.
pub fn honest_bytes(steps: &[Option<u8>]) -> Vec<u8> {
    super::machine::honest_bytes(11, steps)
}

/// Decode `data` to ops (for the seed generator's round-trip check).
pub fn decode(data: &[u8]) -> Vec<Op> {
    super::machine::decode(data)
}
