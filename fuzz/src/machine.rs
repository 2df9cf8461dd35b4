//! What the three machine targets share: turning the fuzzer's bytes into ops, the byte
//! encoding of the ops a seed run uses, and panicking on a [`Violation`].
//!
//! The harnesses themselves (ops, the cooperating `Honest` environment, the invariant checks
//! on the drained outputs) are `handoff_proto::sim`, shared with the property tests in
//! `handoff-proto/tests/prop_machines.rs`; here the ops are decoded by `arbitrary` from the
//! fuzzer's bytes instead of drawn by proptest.

use arbitrary::{Arbitrary, Unstructured};
use handoff_proto::sim::Violation;

pub use handoff_proto::sim::{recording, Direction, Frames, Reached};

/// At most this many ops per input: longer inputs only slow the fuzzer down.
pub const MAX_OPS: usize = 256;

/// Decode ops from `data` until it runs out (or `MAX_OPS`), handing each to `apply`.
pub fn for_each_op<'a, T: Arbitrary<'a>>(data: &'a [u8], mut apply: impl FnMut(T)) {
    let mut u = Unstructured::new(data);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            return;
        }
        match T::arbitrary(&mut u) {
            Ok(op) => apply(op),
            Err(_) => return,
        }
    }
}

/// Decode `data` to ops (for the seed generator's round-trip check).
pub fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Vec<T> {
    let mut ops = Vec::new();
    for_each_op(data, |op| ops.push(op));
    ops
}

/// A target fails by panicking: a broken invariant becomes a panic with its message.
pub fn check<T>(r: Result<T, Violation>) -> T {
    r.unwrap_or_else(|v| panic!("{v}"))
}

/// Bytes that `arbitrary`'s derive decodes as variant `index` of an enum of `count`
/// variants (it reads a `u32` and scales it: `(x * count) >> 32`). The seed generator uses
/// it and checks the result by decoding it back, so a change in `arbitrary`'s encoding
/// fails there, not silently.
pub fn variant(index: u32, count: u32) -> [u8; 4] {
    assert!(index < count);
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    u32::try_from(x)
        .expect("index < count keeps x below 2^32")
        .to_le_bytes()
}

/// The bytes of an honest run of an op enum of `count` variants whose last two are
/// `AdvanceToTimer` and `Honest(u8)`: `Honest(sel)` for each `Some(sel)`, `AdvanceToTimer`
/// for each `None`.
pub fn honest_bytes(count: u32, steps: &[Option<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for step in steps {
        match step {
            Some(sel) => {
                out.extend(variant(count - 1, count));
                out.push(*sel);
            }
            None => out.extend(variant(count - 2, count)),
        }
    }
    out
}
