//! A small table of named deadlines, one per timer kind (after quinn's `TimerTable`).

use std::time::Instant;

/// Deadlines indexed by a machine's own timer enum.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Timers<const N: usize> {
    at: [Option<Instant>; N],
}

impl<const N: usize> Timers<N> {
    pub(crate) fn new() -> Self {
        Self { at: [None; N] }
    }

    pub(crate) fn set(&mut self, timer: usize, at: Instant) {
        self.at[timer] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: usize) {
        self.at[timer] = None;
    }

    /// Whether `timer` is set and due at `now`; a due timer is cleared.
    pub(crate) fn expire(&mut self, timer: usize, now: Instant) -> bool {
        match self.at[timer] {
            Some(t) if t <= now => {
                self.at[timer] = None;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }
}
