//! The clients: the keep-alive (closed-loop) ones, and the workers of the open-loop schedule,
//! and what all of them share.

use crate::args::Opts;
use crate::conn::{request, Attempt, Conn, Rng};
use crate::outcome::{ErrKind, Failure, Log, Rec};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// What every thread shares.
#[derive(Debug)]
pub struct Shared {
    pub t0: Instant,
    /// Set once the load should stop.
    pub stop: AtomicBool,
    /// When the open-loop schedule ends (ns since `t0`; `u64::MAX` until known).
    pub stop_at: AtomicU64,
    /// The first few texts of `other` errors.
    pub other_texts: Mutex<Vec<String>>,
}

impl Shared {
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_nanos() as u64
    }

    pub fn note(&self, f: &Failure) {
        if f.0 == ErrKind::Other {
            let mut t = self.other_texts.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() < 8 {
                t.push(f.1.clone());
            }
        }
    }
}

/// After a failed connect, a closed-loop client waits this long before the next: a real
/// client backs off, and a refusing server would otherwise be counted thousands of times.
pub const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// A keep-alive client, until `stop`.
pub fn closed_loop(o: &Opts, sh: &Shared, id: u64) -> Log {
    let mut log = Log::default();
    let mut rng = Rng::new(id + 1);
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let req = request(o, true, n, &mut rng);
        n += 1;
        let start = Instant::now();
        let deadline = start + o.answer_timeout;
        let mut resent = 0u32;
        let outcome = loop {
            if conn.as_ref().is_some_and(|c| !c.usable()) {
                log.stale += 1;
                conn = None;
            }
            let c = match &mut conn {
                Some(c) => c,
                None => match Conn::open(o, deadline) {
                    Ok(c) => {
                        log.connects += 1;
                        conn.insert(c)
                    }
                    Err(f) => break Err(f),
                },
            };
            match c.exchange(&req, deadline) {
                Attempt::Answered { keep } => {
                    if !keep {
                        log.server_closed += 1;
                        conn = None;
                    }
                    break Ok(());
                }
                Attempt::Resend { conn_ended } => {
                    resent += 1;
                    if conn_ended {
                        conn = None;
                    }
                    if Instant::now() >= deadline {
                        break Err(Failure(ErrKind::AnswerTimeout, "resent until".into()));
                    }
                }
                Attempt::Failed(f) => {
                    conn = None;
                    break Err(f);
                }
            }
        };
        let end = Instant::now();
        let err = outcome.as_ref().err().map(|f| f.0);
        if let Err(f) = &outcome {
            sh.note(f);
        }
        log.recs.push(Rec {
            start: sh.ns(start),
            began: sh.ns(start),
            end: sh.ns(end),
            err,
            resent,
        });
        if matches!(
            err,
            Some(ErrKind::ConnectRefused | ErrKind::ConnectReset | ErrKind::ConnectTimeout)
        ) {
            thread::sleep(CONNECT_BACKOFF);
        }
    }
    log
}

/// One worker of the open-loop schedule: takes the next slot, waits for its time, runs it.
pub fn open_loop_worker(o: &Opts, sh: &Shared, next: &AtomicU64, id: u64) -> Log {
    let mut log = Log::default();
    let mut rng = Rng::new(1_000_003 + id);
    let period_ns = 1e9 / f64::from(o.open_rate);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let sched_ns = (i as f64 * period_ns) as u64;
        // Wait for the slot, in short steps so that a stop is seen.
        loop {
            if sched_ns >= sh.stop_at.load(Ordering::Relaxed) {
                return log;
            }
            let now = sh.ns(Instant::now());
            if now >= sched_ns {
                break;
            }
            thread::sleep(Duration::from_nanos(sched_ns - now).min(Duration::from_millis(20)));
        }
        let sched = sh.t0 + Duration::from_nanos(sched_ns);
        let began = sh.ns(Instant::now());
        let req = request(o, false, i, &mut rng);
        let deadline = Instant::now().max(sched) + o.answer_timeout;
        let mut resent = 0u32;
        let outcome = loop {
            let mut c = match Conn::open(o, deadline) {
                Ok(c) => c,
                Err(f) => break Err(f),
            };
            log.connects += 1;
            match c.exchange(&req, deadline) {
                Attempt::Answered { .. } => break Ok(()),
                Attempt::Resend { .. } => {
                    resent += 1;
                    if Instant::now() >= deadline {
                        break Err(Failure(ErrKind::AnswerTimeout, "resent until".into()));
                    }
                }
                Attempt::Failed(f) => break Err(f),
            }
        };
        let err = outcome.as_ref().err().map(|f| f.0);
        if let Err(f) = &outcome {
            sh.note(f);
        }
        log.recs.push(Rec {
            start: sched_ns,
            began,
            end: sh.ns(Instant::now()),
            err,
            resent,
        });
    }
}
