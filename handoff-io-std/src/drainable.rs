//! The application's side of a handoff: the [`Drainable`] hooks and the reports they return.

use std::time::Instant;

pub use handoff_proto::{DrainReport, ReadinessSnapshot, SealReport, StateSnapshot};

use handoff_engine::error::Result;

/// What a daemon implements so it can be handed off.
///
/// The incumbent driver ([`Incumbent::serve`](crate::Incumbent::serve)) calls the hooks on a
/// thread of its own, one at a time, while it keeps answering the supervisor (heartbeats are
/// the driver's job, so a hook may take as long as its deadline allows). A hook that returns
/// an error, or panics, rolls the handoff back; its message becomes the abort reason.
///
/// The order is always `drain` → `seal` → (the successor takes over, or `resume_after_abort`).
/// After a failed `drain` or `seal`, `resume_after_abort` is called too: the daemon must go
/// back to serving from whatever state the failed hook left.
pub trait Drainable: Send + 'static {
    /// Stop accepting new connections and writes, finish in-flight requests, fsync. Return
    /// by `deadline` (the handoff's drain grace); what is still open then is reported.
    fn drain(&self, deadline: Instant) -> Result<DrainReport>;

    /// Make the data directory complete and closed: flush, write footers, fsync, close the
    /// writer. The library releases the data-directory lock right after this returns `Ok`,
    /// and the successor may open the data from then on: nothing may be written after.
    fn seal(&self) -> Result<SealReport>;

    /// The handoff failed after `drain` (and maybe `seal`): reopen the writer from what is on
    /// disk and accept work again. The library holds the lock again before calling this.
    fn resume_after_abort(&self) -> Result<()>;

    /// What the daemon holds now; reported to the supervisor after a resume.
    fn snapshot_state(&self) -> StateSnapshot;
}
