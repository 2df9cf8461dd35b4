//! The figures: each client kind's requests split into steady state and swap windows, their
//! errors by kind, latency distributions and longest stalls.

use crate::outcome::{Log, Rec, KINDS};
use handoff_bench::Stats;
use std::time::Duration;

/// Whether `[a, b]` overlaps one of `windows` (sorted, disjoint).
pub fn overlaps(windows: &[(u64, u64)], a: u64, b: u64) -> bool {
    // The last window starting at or before `b`; an earlier one ended before it started.
    let i = windows.partition_point(|w| w.0 <= b);
    i > 0 && windows[i - 1].1 >= a
}

/// The figures of one part (steady state or swap windows) of one client kind.
#[derive(Debug, Default)]
pub struct Part {
    pub n: u64,
    pub errors: [u64; KINDS.len()],
    pub resent: u64,
    pub latency: Vec<Duration>,
}

impl Part {
    pub fn add(&mut self, r: &Rec) {
        self.n += 1;
        self.resent += u64::from(r.resent);
        match r.err {
            None => self.latency.push(Duration::from_nanos(r.end - r.start)),
            Some(k) => self.errors[k.index()] += 1,
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// One client kind's figures.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    pub steady: Part,
    pub window: Part,
    pub steady_lat: Stats,
    pub window_lat: Stats,
    /// The longest time without a successful completion, and the longest one overlapping a
    /// swap window.
    pub stall: Duration,
    pub window_stall: Duration,
    pub connects: u64,
    pub stale: u64,
    pub server_closed: u64,
}

pub fn summarise(
    name: &'static str,
    logs: Vec<Log>,
    windows: &[(u64, u64)],
    from: u64,
    to: u64,
) -> Kind {
    let (mut steady, mut window) = (Part::default(), Part::default());
    let (mut connects, mut stale, mut server_closed) = (0, 0, 0);
    let mut done = Vec::new();
    for log in logs {
        connects += log.connects;
        stale += log.stale;
        server_closed += log.server_closed;
        for r in log.recs.iter().filter(|r| r.start >= from) {
            if overlaps(windows, r.start, r.end) {
                window.add(r);
            } else {
                steady.add(r);
            }
            if r.err.is_none() {
                done.push(r.end);
            }
        }
    }
    done.sort_unstable();
    let (mut stall, mut window_stall) = (0u64, 0u64);
    let mut last = from;
    for &t in done.iter().chain(std::iter::once(&to.max(from))) {
        let gap = t.saturating_sub(last);
        stall = stall.max(gap);
        if overlaps(windows, last, t) {
            window_stall = window_stall.max(gap);
        }
        last = last.max(t);
    }
    Kind {
        name,
        steady_lat: Stats::new(std::mem::take(&mut steady.latency)),
        window_lat: Stats::new(std::mem::take(&mut window.latency)),
        steady,
        window,
        stall: Duration::from_nanos(stall),
        window_stall: Duration::from_nanos(window_stall),
        connects,
        stale,
        server_closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::outcome::ErrKind;

    #[test]
    fn overlap_with_sorted_windows() {
        let w = [(10, 20), (40, 50)];
        assert!(!overlaps(&w, 0, 9));
        assert!(overlaps(&w, 0, 10));
        assert!(overlaps(&w, 15, 16));
        assert!(overlaps(&w, 20, 30));
        assert!(!overlaps(&w, 21, 39));
        assert!(overlaps(&w, 21, 60));
        assert!(!overlaps(&w, 51, 60));
        assert!(!overlaps(&[], 0, 100));
    }

    #[test]
    fn stalls_count_from_the_start_and_to_the_end() {
        let logs = vec![Log {
            recs: vec![
                Rec {
                    start: 100,
                    began: 100,
                    end: 110,
                    err: None,
                    resent: 0,
                },
                Rec {
                    start: 120,
                    began: 120,
                    end: 300,
                    err: Some(ErrKind::Reset),
                    resent: 0,
                },
                Rec {
                    start: 150,
                    began: 150,
                    end: 200,
                    err: None,
                    resent: 1,
                },
            ],
            ..Log::default()
        }];
        let k = summarise("x", logs, &[(140, 160)], 100, 400);
        assert_eq!(k.stall, Duration::from_nanos(200));
        assert_eq!(k.window_stall, Duration::from_nanos(90));
        assert_eq!(k.window.n, 2);
        assert_eq!(k.window.errors[ErrKind::Reset.index()], 1);
        assert_eq!(k.window.resent, 1);
        assert_eq!(k.steady.n, 1);
    }
}
