//! A small table of named deadlines, one per timer kind (after quinn's `TimerTable`).

use core::fmt::Debug;
use core::hash::Hash;
use std::time::Instant;

/// A machine's timer enum: each kind names its own slot in the table.
pub(crate) trait TimerKey: Copy {
    /// One slot per kind, e.g. `[Option<Instant>; 3]`.
    type Slots: AsRef<[Option<Instant>]>
        + AsMut<[Option<Instant>]>
        + Default
        + Clone
        + Debug
        + PartialEq
        + Eq
        + Hash;

    /// This kind's slot.
    fn slot(self) -> usize;
}

/// Deadlines indexed by a machine's own timer enum.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Timers<K: TimerKey> {
    at: K::Slots,
}

impl<K: TimerKey> Timers<K> {
    pub(crate) fn new() -> Self {
        Self {
            at: K::Slots::default(),
        }
    }

    pub(crate) fn set(&mut self, timer: K, at: Instant) {
        self.at.as_mut()[timer.slot()] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: K) {
        self.at.as_mut()[timer.slot()] = None;
    }

    /// Whether `timer` is set and due at `now`; a due timer is cleared.
    pub(crate) fn expire(&mut self, timer: K, now: Instant) -> bool {
        let slot = &mut self.at.as_mut()[timer.slot()];
        match *slot {
            Some(t) if t <= now => {
                *slot = None;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.at.as_ref().iter().flatten().min().copied()
    }
}
