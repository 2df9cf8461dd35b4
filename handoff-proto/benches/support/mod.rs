//! What the benchmarks share: criterion's settings, and the honest in-memory handoff of
//! `handoff_proto::sim::handoff` (`Sim`, listener sets, the handoff they run).

// Each bench target uses a different part of this module.
#![allow(dead_code)]

use std::time::Duration;

use criterion::Criterion;
pub use handoff_proto::sim::handoff::*;

/// Criterion's settings for every benchmark here: short, because the machine has two cores
/// shared with other builds; the default 100 samples.
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}
