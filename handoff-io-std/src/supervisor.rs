//! The supervisor driver: holds the listeners, performs handoffs, and recovers from its own
//! restart.
//!
//! [`Supervisor`] runs the `handoff-proto` supervisor machine in a `poll(2)` loop inside each
//! call: [`resume_from_journal`](Supervisor::resume_from_journal) and
//! [`perform_handoff`](Supervisor::perform_handoff) return when the machine reports the
//! recovery or the outcome. The loop connects to the serving daemon's control socket
//! (checking with `SO_PEERCRED` that it runs as an admitted uid), spawns the successor with a
//! fresh socketpair as its channel, passes the listeners over `SCM_RIGHTS`, watches every
//! process through a pidfd, and writes the journal atomically before every irreversible
//! step.
//!
//! **Differences from the 0.1.2 API this follows.**
//! - `resume_from_journal` really recovers: it finds whoever serves (incumbent or successor),
//!   finishes or rolls back the handoff the journal names, and takes the listeners back from
//!   the serving daemon if this supervisor does not hold them
//!   ([`expect_listener`](Supervisor::expect_listener)). If nobody serves it starts the
//!   daemon cold when given a command ([`with_cold_start`](Supervisor::with_cold_start)), or
//!   says so.
//! - `perform_handoff` called while another runs returns [`Error::Busy`] at once.
//! - `with_listener` takes anything that lends a descriptor ([`ListenerSource`]: `&listener`,
//!   `BorrowedFd`, `OwnedFd`, or the raw number of 0.1.2, checked before it is borrowed),
//!   duplicates it at once (the caller keeps its own), and checks that it is a listener; a bad
//!   one is reported by the next call that needs it.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use handoff_engine::error::{Context, Error, Result};
use handoff_engine::sys::peercred::PeerPolicy;
use handoff_engine::{wait_ready, SupervisorEngine, SupervisorEvent};
use handoff_proto::{ListenerKind, Timing};

pub use handoff_engine::spec::{HandoffOutcome, ListenerSource, Recovery, SpawnSpec};
pub use handoff_proto::{Busy, PhaseTimes, Pid, Verdict};

/// Holds the listeners and performs handoffs. Calls take `&self`; one runs at a time.
#[derive(Debug)]
pub struct Supervisor {
    engine: Mutex<SupervisorEngine>,
    serving: AtomicU32,
}

impl Supervisor {
    /// A supervisor for the daemon whose control socket is at `control_socket`. The journal
    /// defaults to `<control_socket>.journal`.
    pub fn new(control_socket: &Path) -> Result<Supervisor> {
        Ok(Supervisor {
            engine: Mutex::new(SupervisorEngine::new(control_socket)?),
            serving: AtomicU32::new(0),
        })
    }

    fn map(self, f: impl FnOnce(SupervisorEngine) -> SupervisorEngine) -> Supervisor {
        let engine = self.engine.into_inner().unwrap_or_else(|p| p.into_inner());
        Supervisor {
            engine: Mutex::new(f(engine)),
            serving: self.serving,
        }
    }

    /// Hand `listener` to every successor under `name`. It is duplicated at once
    /// (close-on-exec; the caller keeps and may close its own) and checked to be a listener; an
    /// error is reported by the next call.
    ///
    /// `listener` is anything that lends a descriptor: `&TcpListener` (any `&impl AsFd`), a
    /// `BorrowedFd`, an `OwnedFd` (closed once duplicated), or a raw number as in the
    /// 0.1.2 API, `listener.as_raw_fd()`; see [`ListenerSource`] for what is checked before a
    /// raw number is touched.
    pub fn with_listener(self, name: &str, listener: impl ListenerSource) -> Supervisor {
        match listener.duplicate() {
            Ok(fd) => self.with_listener_fd(name, fd),
            Err(e) => self.map(|s| s.with_setup_error(format!("listener {name:?}: {e}"))),
        }
    }

    /// [`with_listener`](Self::with_listener) for a descriptor the type system vouches for.
    pub fn with_listener_fd(self, name: &str, fd: impl AsFd) -> Supervisor {
        self.map(|s| s.with_listener_fd(name, fd))
    }

    /// A listener this supervisor does not hold but the serving daemon does: after a restart,
    /// [`resume_from_journal`](Self::resume_from_journal) takes it back over `SCM_RIGHTS`.
    pub fn expect_listener(self, name: &str, kind: ListenerKind) -> Supervisor {
        self.map(|s| s.expect_listener(name, kind))
    }

    /// Where the journal lives (default `<control_socket>.journal`).
    pub fn with_journal(self, path: &Path) -> Supervisor {
        self.map(|s| s.with_journal(path))
    }

    /// How to start the daemon when nobody serves (first start, or after a crash).
    pub fn with_cold_start(self, spec: SpawnSpec) -> Supervisor {
        self.map(|s| s.with_cold_start(spec))
    }

    /// Every timing: heartbeats, silence, retries, the recovery wait and the crash backoff
    /// (default [`Timing::default`]).
    pub fn with_timing(self, timing: Timing) -> Supervisor {
        self.map(|s| s.with_timing(timing))
    }

    /// Which uids the serving daemon may run as (default: ours, and root).
    pub fn with_peer_policy(self, policy: PeerPolicy) -> Supervisor {
        self.map(|s| s.with_peer_policy(policy))
    }

    fn busy(&self) -> Result<MutexGuard<'_, SupervisorEngine>> {
        match self.engine.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(Error::Busy(Busy {
                what: "another call on this supervisor is running".into(),
                handoff: None,
            })),
        }
    }

    /// Find the serving daemon and settle whatever a previous supervisor left: read the
    /// journal, finish or roll back the handoff it names, take the listeners back if needed,
    /// start the daemon cold if nobody serves (with [`with_cold_start`](Self::with_cold_start)).
    ///
    /// A corrupt journal is an error that names the file; nothing is touched then.
    ///
    /// The first call takes the supervisor lock, `<journal>.lock`, and this supervisor holds
    /// it until it is dropped: a second supervisor on the same journal gets an error naming
    /// the first, and the daemons this one starts answer only the lock's holder.
    pub fn resume_from_journal(&self) -> Result<Recovery> {
        let mut engine = self.busy()?;
        let r = recover(&mut engine);
        self.publish(&engine);
        r
    }

    /// Replace the serving daemon with `spec.binary`. Returns when the handoff committed or
    /// was rolled back (the incumbent confirmed serving again), within `spec.deadline` plus
    /// twice the timing's slack.
    pub fn perform_handoff(&self, spec: SpawnSpec) -> Result<HandoffOutcome> {
        let mut engine = self.busy()?;
        let r = handoff(&mut engine, spec);
        self.publish(&engine);
        r
    }

    /// The serving daemon as of the end of the last call (`None` before the first, or when
    /// nobody could be confirmed). Does not wait for a call in progress.
    pub fn serving(&self) -> Option<Pid> {
        match self.serving.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    fn publish(&self, engine: &SupervisorEngine) {
        self.serving
            .store(engine.serving().unwrap_or(0), Ordering::SeqCst);
    }
}

fn recover(engine: &mut SupervisorEngine) -> Result<Recovery> {
    let now = Instant::now();
    engine.start_recovery(now)?;
    // The machine gives up waiting for a resolving process after `recovery_wait` and starts
    // the daemon cold; a daemon started cold gets another `recovery_wait` to answer. Each
    // of the two may overshoot by one crash backoff (its attempts are spaced by it).
    let t = engine.timing();
    let bound = now + 3 * t.recovery_wait + 4 * t.slack + 2 * t.backoff_max;
    match run(engine, bound)? {
        SupervisorEvent::Recovered(r) => Ok(r),
        SupervisorEvent::Failed(e) => Err(e),
        SupervisorEvent::Outcome(o) => Err(Error::Protocol(format!(
            "an outcome during a recovery: {o:?}"
        ))),
    }
}

fn handoff(engine: &mut SupervisorEngine, spec: SpawnSpec) -> Result<HandoffOutcome> {
    // Events that came in since the last call (the incumbent may have died).
    step(engine, Instant::now())?;
    while let Some(ev) = engine.poll_event() {
        if let SupervisorEvent::Failed(e) = ev {
            return Err(e);
        }
    }
    if engine.needs_recovery() {
        recover(engine)?;
    }
    let now = Instant::now();
    let bound = now + spec.deadline + 4 * engine.timing().slack + Duration::from_secs(10);
    engine.trigger(now, spec)?;
    match run(engine, bound)? {
        SupervisorEvent::Outcome(o) => Ok(o),
        SupervisorEvent::Failed(e) => Err(e),
        SupervisorEvent::Recovered(r) => Err(Error::Protocol(format!(
            "a recovery during a handoff: {r:?}"
        ))),
    }
}

/// Drive the engine until it reports something; an error if `bound` passes first.
fn run(engine: &mut SupervisorEngine, bound: Instant) -> Result<SupervisorEvent> {
    loop {
        if let Some(ev) = engine.poll_event() {
            return Ok(ev);
        }
        if Instant::now() >= bound {
            return Err(Error::io(
                format!(
                    "supervisor got no result in time (still {})",
                    engine.phase_name()
                ),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "bound passed"),
            ));
        }
        step(engine, bound)?;
    }
}

/// One `poll` (until the engine's next timer, or `bound`) and whatever it reports.
fn step(engine: &mut SupervisorEngine, bound: Instant) -> Result<()> {
    let until = engine.poll_timeout().map_or(bound, |t| t.min(bound));
    let (ready, _) =
        wait_ready(&engine.interests(), None, Some(until)).context(|| "supervisor poll".into())?;
    let now = Instant::now();
    for (key, r, w) in ready {
        engine.ready(now, key, r, w);
    }
    engine.handle_timeout(Instant::now());
    Ok(())
}
