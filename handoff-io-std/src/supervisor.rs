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
//! - `with_listener` duplicates the descriptor at once (the caller keeps its own), and checks
//!   that it is a listener; a bad one is reported by the next call that needs it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use handoff_proto::journal::Resolution;
use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    AbortReason, Busy, HandoffId, HandoffSpec, ListenerInfo, ListenerKind, Peer, PhaseTimes, Pid,
    SupervisorConfig, SupervisorOutput, Timing, Verdict,
};
use rustix::event::{PollFd, PollFlags};

use crate::conn::{readable, wait, Conn, ReadStatus};
use crate::error::{Context, Error, Result};
use crate::log::log;
use crate::sys::journal_file;
use crate::sys::peercred::{peer_credentials, PeerPolicy};
use crate::sys::sockcheck;
use crate::sys::spawn::{self, Watched};

const ROLE: &str = "supervisor";

/// How to start a daemon binary, and the handoff's time limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The executable. Empty (the default) is refused when spawning.
    pub binary: PathBuf,
    /// Its arguments (not including the program name).
    pub args: Vec<OsString>,
    /// Extra environment variables, on top of the supervisor's own.
    pub env: Vec<(OsString, OsString)>,
    /// How long the incumbent's drain may take. Default 25 s.
    pub drain_grace: Duration,
    /// The whole handoff must commit within this, or it is rolled back. Default 60 s.
    pub deadline: Duration,
}

impl Default for SpawnSpec {
    fn default() -> Self {
        SpawnSpec {
            binary: PathBuf::new(),
            args: Vec::new(),
            env: Vec::new(),
            drain_grace: Duration::from_secs(25),
            deadline: Duration::from_secs(60),
        }
    }
}

impl SpawnSpec {
    fn command(&self) -> spawn::Command {
        spawn::Command {
            binary: self.binary.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            inherit_stdio: true,
        }
    }
}

/// How a handoff ended.
#[derive(Debug)]
pub struct HandoffOutcome {
    /// The handoff.
    pub handoff_id: HandoffId,
    /// Whether the successor took over.
    pub committed: bool,
    /// The successor process, when it took over (it is this supervisor's child: wait on it).
    pub child: Option<Child>,
    /// The daemon serving now: the successor after a commit, the incumbent after a rollback;
    /// `None` when nobody could be confirmed serving (the next call recovers).
    pub serving: Option<Pid>,
    /// Why the handoff did not commit.
    pub abort_reason: Option<AbortReason>,
    /// How the successor ended, if it exited (a failed build's exit status or signal).
    pub successor_status: Option<std::process::ExitStatus>,
    /// The machine's verdict, in full.
    pub verdict: Verdict,
    /// Where the time went.
    pub times: PhaseTimes,
}

/// What [`Supervisor::resume_from_journal`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The daemon serving now.
    pub serving: Pid,
    /// What became of the handoff the journal named, if it named one in flight.
    pub resolution: Option<(HandoffId, Resolution)>,
}

#[derive(Debug)]
struct Listener {
    name: String,
    kind: ListenerKind,
    fd: Option<OwnedFd>,
}

/// Holds the listeners and performs handoffs. Calls take `&self`; one runs at a time.
#[derive(Debug)]
pub struct Supervisor {
    inner: Mutex<Inner>,
    serving: std::sync::atomic::AtomicU32,
}

#[derive(Debug)]
struct Inner {
    control_socket: PathBuf,
    journal: PathBuf,
    listeners: Vec<Listener>,
    setup_error: Option<String>,
    timing: Timing,
    policy: PeerPolicy,
    recovery_wait: Duration,
    cold_start: Option<SpawnSpec>,
    machine: Option<handoff_proto::Supervisor>,
    inc: Option<Conn>,
    succ: Option<Conn>,
    watched: BTreeMap<Pid, Watched>,
    children: BTreeMap<Pid, Child>,
    statuses: BTreeMap<Pid, std::process::ExitStatus>,
    successor: Option<Pid>,
    spec: SpawnSpec,
    outcome: Option<handoff_proto::Outcome>,
    recovered: Option<Recovery>,
    failure: Option<Error>,
}

impl Supervisor {
    /// A supervisor for the daemon whose control socket is at `control_socket`. The journal
    /// defaults to `<control_socket>.journal`.
    pub fn new(control_socket: &Path) -> Result<Supervisor> {
        if control_socket.file_name().is_none() {
            return Err(Error::invalid(
                format!("control socket path {}", control_socket.display()),
                "has no file name",
            ));
        }
        let mut journal = control_socket.as_os_str().to_os_string();
        journal.push(".journal");
        Ok(Supervisor {
            serving: std::sync::atomic::AtomicU32::new(0),
            inner: Mutex::new(Inner {
                control_socket: control_socket.to_path_buf(),
                journal: PathBuf::from(journal),
                listeners: Vec::new(),
                setup_error: None,
                timing: Timing::default(),
                policy: PeerPolicy::default(),
                recovery_wait: Duration::from_secs(30),
                cold_start: None,
                machine: None,
                inc: None,
                succ: None,
                watched: BTreeMap::new(),
                children: BTreeMap::new(),
                statuses: BTreeMap::new(),
                successor: None,
                spec: SpawnSpec::default(),
                outcome: None,
                recovered: None,
                failure: None,
            }),
        })
    }

    fn inner_mut(&mut self) -> &mut Inner {
        self.inner.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand the listener `fd` to every successor under `name`. The descriptor is duplicated
    /// at once (close-on-exec; the caller keeps and may close its own) and checked to be a
    /// listener; an error is reported by the next call.
    ///
    /// `fd` must be an open descriptor for the duration of this call, as
    /// `listener.as_raw_fd()` is. Prefer [`with_listener_fd`](Self::with_listener_fd).
    #[allow(unsafe_code)]
    pub fn with_listener(self, name: &str, fd: RawFd) -> Supervisor {
        if fd < 0 {
            let mut s = self;
            s.inner_mut().setup_error =
                Some(format!("listener {name:?}: {fd} is not a descriptor"));
            return s;
        }
        // SAFETY: the caller passes a descriptor it holds open for this call (documented
        // above); it is only borrowed for the `fcntl(F_DUPFD_CLOEXEC)` below, which fails
        // cleanly with EBADF if it is not open.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        self.with_listener_fd(name, borrowed)
    }

    /// [`with_listener`](Self::with_listener) for a descriptor the type system vouches for.
    pub fn with_listener_fd(mut self, name: &str, fd: impl AsFd) -> Supervisor {
        let raw = fd.as_fd().as_raw_fd();
        let added = (|| -> std::result::Result<(ListenerKind, OwnedFd), String> {
            check_listener_name(name, &self.inner_mut().listeners)?;
            let kind = sockcheck::inspect(fd.as_fd())
                .map_err(|e| format!("listener {name:?} (fd {raw}): {e}"))?;
            let dup = rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), 3)
                .map_err(|e| format!("listener {name:?} (fd {raw}): cannot duplicate: {e}"))?;
            Ok((ListenerKind::from(kind), dup))
        })();
        let inner = self.inner_mut();
        match added {
            Ok((kind, fd)) => inner.listeners.push(Listener {
                name: name.to_string(),
                kind,
                fd: Some(fd),
            }),
            Err(e) => {
                inner.setup_error.get_or_insert(e);
            }
        }
        self
    }

    /// A listener this supervisor does not hold but the serving daemon does: after a restart,
    /// [`resume_from_journal`](Self::resume_from_journal) takes it back over `SCM_RIGHTS`.
    pub fn expect_listener(mut self, name: &str, kind: ListenerKind) -> Supervisor {
        let inner = self.inner_mut();
        match check_listener_name(name, &inner.listeners) {
            Ok(()) => inner.listeners.push(Listener {
                name: name.to_string(),
                kind,
                fd: None,
            }),
            Err(e) => {
                inner.setup_error.get_or_insert(e);
            }
        }
        self
    }

    /// Where the journal lives (default `<control_socket>.journal`).
    pub fn with_journal(mut self, path: &Path) -> Supervisor {
        self.inner_mut().journal = path.to_path_buf();
        self
    }

    /// How to start the daemon when nobody serves (first start, or after a crash).
    pub fn with_cold_start(mut self, spec: SpawnSpec) -> Supervisor {
        self.inner_mut().cold_start = Some(spec);
        self
    }

    /// Heartbeat, silence and retry timings (default [`Timing::default`]).
    pub fn with_timing(mut self, timing: Timing) -> Supervisor {
        self.inner_mut().timing = timing;
        self
    }

    /// Which uids the serving daemon may run as (default: ours, and root).
    pub fn with_peer_policy(mut self, policy: PeerPolicy) -> Supervisor {
        self.inner_mut().policy = policy;
        self
    }

    /// How long a recovery waits for a process still resolving a handoff, or for a daemon it
    /// started cold to answer (default 30 s).
    pub fn with_recovery_wait(mut self, wait: Duration) -> Supervisor {
        self.inner_mut().recovery_wait = wait;
        self
    }

    fn busy(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
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
    pub fn resume_from_journal(&self) -> Result<Recovery> {
        let mut inner = self.busy()?;
        let r = inner.recover();
        self.publish(&inner);
        r
    }

    /// Replace the serving daemon with `spec.binary`. Returns when the handoff committed or
    /// was rolled back (the incumbent confirmed serving again), within `spec.deadline` plus
    /// twice the timing's slack.
    pub fn perform_handoff(&self, spec: SpawnSpec) -> Result<HandoffOutcome> {
        let mut inner = self.busy()?;
        let r = inner.handoff(spec);
        self.publish(&inner);
        r
    }

    /// The serving daemon as of the end of the last call (`None` before the first, or when
    /// nobody could be confirmed). Does not wait for a call in progress.
    pub fn serving(&self) -> Option<Pid> {
        match self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    fn publish(&self, inner: &Inner) {
        let pid = inner
            .machine
            .as_ref()
            .and_then(|m| m.incumbent())
            .unwrap_or(0);
        self.serving.store(pid, std::sync::atomic::Ordering::SeqCst);
    }
}

fn check_listener_name(name: &str, existing: &[Listener]) -> std::result::Result<(), String> {
    if name.is_empty() || name.contains(':') || name.contains('\0') {
        return Err(format!(
            "listener name {name:?} must be non-empty and contain no ':' or NUL"
        ));
    }
    if existing.iter().any(|l| l.name == name) {
        return Err(format!("listener name {name:?} is used twice"));
    }
    Ok(())
}

impl Inner {
    fn config(&self) -> SupervisorConfig {
        SupervisorConfig {
            pid: std::process::id(),
            build_id: crate::daemon::default_build_id(),
            versions: SUPPORTED_VERSIONS,
            timing: self.timing,
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerInfo {
                    name: l.name.clone(),
                    kind: l.kind,
                })
                .collect(),
            recovery_wait: self.recovery_wait,
        }
    }

    fn check_setup(&self) -> Result<()> {
        match &self.setup_error {
            Some(e) => Err(Error::invalid("listener", e.clone())),
            None => Ok(()),
        }
    }

    fn recover(&mut self) -> Result<Recovery> {
        self.check_setup()?;
        let record = journal_file::read(&self.journal)?;
        let holds = self.listeners.iter().all(|l| l.fd.is_some());
        let now = Instant::now();
        self.inc = None;
        self.succ = None;
        self.recovered = None;
        self.failure = None;
        self.machine = Some(handoff_proto::Supervisor::recover(
            self.config(),
            now,
            record,
            holds,
        ));
        // The machine gives up waiting for a resolving process after `recovery_wait` and
        // starts the daemon cold; a daemon started cold gets another `recovery_wait` to answer.
        let bound = now + 3 * self.recovery_wait + 4 * self.timing.slack;
        self.run(bound, |i| i.recovered.is_some())?;
        let r = self.recovered.take().expect("run stops on it");
        log!(
            ROLE,
            "recovered: pid {} serves ({:?})",
            r.serving,
            r.resolution
        );
        Ok(r)
    }

    fn handoff(&mut self, spec: SpawnSpec) -> Result<HandoffOutcome> {
        self.check_setup()?;
        if self.machine.is_none() {
            self.recover()?;
        }
        // Events that came in since the last call (the incumbent may have died).
        self.poll_pending()?;
        if !self.machine.as_ref().is_some_and(|m| m.is_idle()) {
            self.recover()?;
        }
        let now = Instant::now();
        let hspec = HandoffSpec {
            drain_grace: spec.drain_grace,
            deadline: spec.deadline,
        };
        let deadline = spec.deadline;
        self.spec = spec;
        self.outcome = None;
        self.successor = None;
        self.statuses.clear();
        let m = self.machine.as_mut().expect("recovered above");
        let id = m.handle_trigger(now, hspec)?;
        log!(
            ROLE,
            "handoff {id}: starting {}",
            self.spec.binary.display()
        );
        let bound = now + deadline + 4 * self.timing.slack + Duration::from_secs(10);
        self.run(bound, |i| i.outcome.is_some())?;
        let o = self.outcome.take().expect("run stops on it");
        let (committed, serving, abort_reason) = match &o.verdict {
            Verdict::Committed { successor } => (true, Some(*successor), None),
            Verdict::RolledBack {
                incumbent, reason, ..
            } => (false, Some(*incumbent), Some(reason.clone())),
            Verdict::IncumbentLost { reason } => (false, None, Some(reason.clone())),
        };
        let child = match &o.verdict {
            Verdict::Committed { successor } => self.children.remove(successor),
            _ => None,
        };
        // Any other child of this handoff (a failed successor) has exited or was killed:
        // reap it.
        self.reap();
        let successor_status = self.successor.and_then(|p| self.statuses.get(&p).copied());
        log!(
            ROLE,
            "handoff {}: {:?} in {:?}",
            o.handoff,
            o.verdict,
            o.times.total
        );
        Ok(HandoffOutcome {
            handoff_id: o.handoff,
            committed,
            child,
            serving,
            abort_reason,
            successor_status,
            verdict: o.verdict,
            times: o.times,
        })
    }

    /// Reap children that have exited.
    fn reap(&mut self) {
        let statuses = &mut self.statuses;
        self.children.retain(|pid, c| match c.try_wait() {
            Ok(Some(status)) => {
                statuses.insert(*pid, status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
    }

    /// Drive the machine until `done`; an error if `bound` passes first.
    fn run(&mut self, bound: Instant, done: impl Fn(&Inner) -> bool) -> Result<()> {
        let mut buf = Vec::new();
        loop {
            self.perform(Instant::now());
            if let Some(e) = self.failure.take() {
                return Err(e);
            }
            if done(self) {
                return Ok(());
            }
            if Instant::now() >= bound {
                let phase = self.machine.as_ref().map_or("-", |m| m.phase_name());
                return Err(Error::io(
                    format!("supervisor got no result in time (still {phase})"),
                    io::Error::new(io::ErrorKind::TimedOut, "bound passed"),
                ));
            }
            self.step(bound, &mut buf)?;
        }
    }

    /// Handle what happened since the last call, without waiting.
    fn poll_pending(&mut self) -> Result<()> {
        self.step(Instant::now(), &mut Vec::new())?;
        self.perform(Instant::now());
        Ok(())
    }

    /// One `poll` (until the machine's next timer, or `bound`) and whatever it reports.
    fn step(&mut self, bound: Instant, buf: &mut Vec<u8>) -> Result<()> {
        let m = self.machine.as_ref().expect("running a machine");
        let until = m.poll_timeout().map_or(bound, |t| t.min(bound));
        let pids: Vec<Pid> = self.watched.keys().copied().collect();
        let (inc_ready, succ_ready, exited) = {
            let mut fds = Vec::new();
            let inc_at = self.inc.as_ref().map(|c| {
                fds.push(PollFd::from_borrowed_fd(c.fd(), PollFlags::IN));
                fds.len() - 1
            });
            let succ_at = self.succ.as_ref().map(|c| {
                fds.push(PollFd::from_borrowed_fd(c.fd(), PollFlags::IN));
                fds.len() - 1
            });
            let first_pid = fds.len();
            for pid in &pids {
                fds.push(PollFd::from_borrowed_fd(
                    self.watched[pid].as_fd(),
                    PollFlags::IN,
                ));
            }
            wait(&mut fds, Some(until)).context(|| "supervisor poll".into())?;
            let exited: Vec<Pid> = pids
                .iter()
                .zip(&fds[first_pid..])
                .filter(|(_, p)| readable(p))
                .map(|(pid, _)| *pid)
                .collect();
            (
                inc_at.is_some_and(|i| readable(&fds[i])),
                succ_at.is_some_and(|i| readable(&fds[i])),
                exited,
            )
        };
        let now = Instant::now();
        if inc_ready {
            self.read(now, Peer::Incumbent, buf);
            self.perform(now);
        }
        if succ_ready {
            self.read(now, Peer::Successor, buf);
            self.perform(now);
        }
        for pid in exited {
            self.watched.remove(&pid);
            match self.children.get_mut(&pid).map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    log!(ROLE, "pid {pid} exited: {status}");
                    self.children.remove(&pid);
                    self.statuses.insert(pid, status);
                }
                _ => log!(ROLE, "pid {pid} exited"),
            }
            self.machine_mut().handle_exited(now, pid);
            self.perform(now);
        }
        let now = Instant::now();
        if self
            .machine
            .as_ref()
            .and_then(|m| m.poll_timeout())
            .is_some_and(|t| t <= now)
        {
            self.machine_mut().handle_timeout(now);
        }
        Ok(())
    }

    fn machine_mut(&mut self) -> &mut handoff_proto::Supervisor {
        self.machine.as_mut().expect("running a machine")
    }

    fn conn(&mut self, peer: Peer) -> &mut Option<Conn> {
        match peer {
            Peer::Incumbent => &mut self.inc,
            Peer::Successor => &mut self.succ,
        }
    }

    fn read(&mut self, now: Instant, peer: Peer, buf: &mut Vec<u8>) {
        let Some(conn) = self.conn(peer).as_mut() else {
            return;
        };
        buf.clear();
        let status = conn.read_available(buf);
        if !buf.is_empty() {
            if let Err(e) = self.machine_mut().handle_bytes(now, peer, buf) {
                log!(ROLE, "{peer:?} channel: {e}");
            }
            // Perform now: a `TakeListeners` must meet the descriptors read with its frame.
            self.perform(now);
        }
        let closed = match status {
            Ok(ReadStatus::Open) => false,
            Ok(ReadStatus::Closed) => true,
            Err(e) => {
                log!(ROLE, "{peer:?} channel: {e}");
                true
            }
        };
        if closed && self.conn(peer).take().is_some() {
            self.machine_mut().handle_closed(now, peer);
        }
    }

    fn perform(&mut self, now: Instant) {
        while let Some(out) = self.machine.as_mut().and_then(|m| m.poll_output()) {
            match out {
                SupervisorOutput::Send { to, frame } => {
                    let fds: Vec<BorrowedFd<'_>> = match &frame.message {
                        Message::Listeners { batch } => batch
                            .iter()
                            .filter_map(|info| {
                                self.listeners
                                    .iter()
                                    .find(|l| l.name == info.name)
                                    .and_then(|l| l.fd.as_ref())
                                    .map(|fd| fd.as_fd())
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let silence = self.timing.peer_silence;
                    let conn = match to {
                        Peer::Incumbent => self.inc.as_ref(),
                        Peer::Successor => self.succ.as_ref(),
                    };
                    let Some(conn) = conn else { continue };
                    let sent = frame
                        .encode()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(|b| conn.send(&b, &fds, silence));
                    drop(fds);
                    if let Err(e) = sent {
                        log!(ROLE, "sending {} to {to:?}: {e}", frame.message.kind());
                        if self.conn(to).take().is_some() {
                            self.machine_mut().handle_closed(now, to);
                        }
                    }
                }
                SupervisorOutput::Close { peer } => {
                    self.conn(peer).take();
                }
                SupervisorOutput::TakeListeners { batch } => self.take_listeners(now, &batch),
                SupervisorOutput::SpawnSuccessor { handoff } => self.spawn_successor(now, handoff),
                SupervisorOutput::SpawnColdStart => self.spawn_cold_start(now),
                SupervisorOutput::Connect => self.connect(now),
                SupervisorOutput::Watch { pid } => match Watched::open(pid) {
                    Ok(w) => {
                        self.watched.insert(pid, w);
                    }
                    Err(_) => self.machine_mut().handle_exited(now, pid),
                },
                SupervisorOutput::Kill { pid } => {
                    let r = match self.watched.get(&pid) {
                        Some(w) => w.kill(),
                        None => Watched::open(pid).and_then(|w| w.kill()),
                    };
                    match r {
                        Ok(()) => log!(ROLE, "killed pid {pid}"),
                        Err(e) => log!(ROLE, "kill pid {pid}: {e}"),
                    }
                }
                SupervisorOutput::WriteJournal(rec) => {
                    let r = match journal_file::write(&self.journal, &rec) {
                        Ok(()) => self.machine_mut().handle_journal_written(now),
                        Err(e) => {
                            log!(ROLE, "journal: {e}");
                            self.machine_mut().handle_journal_failed(now, e.to_string())
                        }
                    };
                    if let Err(e) = r {
                        log!(ROLE, "internal: {e}");
                    }
                }
                SupervisorOutput::Outcome(o) => self.outcome = Some(o),
                SupervisorOutput::Recovered {
                    serving,
                    resolution,
                } => {
                    self.recovered = Some(Recovery {
                        serving,
                        resolution,
                    })
                }
            }
        }
    }

    fn take_listeners(&mut self, now: Instant, batch: &[ListenerInfo]) {
        let checked = (|| -> std::result::Result<Vec<OwnedFd>, String> {
            let conn = self.inc.as_mut().ok_or("control connection gone")?;
            let fds = conn.take_fds(batch.len()).ok_or_else(|| {
                format!(
                    "{} listeners announced, fewer descriptors arrived",
                    batch.len()
                )
            })?;
            for (info, fd) in batch.iter().zip(&fds) {
                if !self
                    .listeners
                    .iter()
                    .any(|l| l.name == info.name && l.kind == info.kind)
                {
                    return Err(format!(
                        "listener {:?} ({:?}) is not configured",
                        info.name, info.kind
                    ));
                }
                sockcheck::check(fd.as_fd(), info.kind)
                    .map_err(|e| format!("listener {:?}: {e}", info.name))?;
            }
            Ok(fds)
        })();
        match checked {
            Ok(fds) => {
                for (info, fd) in batch.iter().zip(fds) {
                    if let Some(l) = self.listeners.iter_mut().find(|l| l.name == info.name) {
                        l.fd = Some(fd);
                    }
                }
            }
            Err(why) => {
                log!(ROLE, "listeners returned by the daemon: {why}");
                self.machine_mut().handle_listener_error(now, why);
            }
        }
    }

    fn spawn_successor(&mut self, now: Instant, handoff: HandoffId) {
        let spawned = (|| -> io::Result<(Child, UnixStream)> {
            let (ours, theirs) = crate::sys::fdpass::socketpair_cloexec()?;
            let child = spawn::spawn_successor(&self.spec.command(), theirs.as_fd())?;
            Ok((child, ours))
        })();
        match spawned {
            Ok((child, ours)) => {
                let pid = child.id();
                log!(ROLE, "handoff {handoff}: successor pid {pid} started");
                match Conn::new(ours) {
                    Ok(c) => self.succ = Some(c),
                    Err(e) => log!(ROLE, "successor channel: {e}"),
                }
                match Watched::open(pid) {
                    Ok(w) => {
                        self.watched.insert(pid, w);
                    }
                    Err(e) => log!(ROLE, "cannot watch successor {pid}: {e}"),
                }
                self.children.insert(pid, child);
                self.successor = Some(pid);
                if let Err(e) = self.machine_mut().handle_spawned(now, pid) {
                    log!(ROLE, "internal: {e}");
                }
            }
            Err(e) => {
                let why = format!("{}: {e}", self.spec.binary.display());
                log!(ROLE, "handoff {handoff}: cannot start successor: {why}");
                if let Err(e) = self.machine_mut().handle_spawn_failed(now, why) {
                    log!(ROLE, "internal: {e}");
                }
            }
        }
    }

    fn spawn_cold_start(&mut self, now: Instant) {
        let Some(spec) = self.cold_start.clone() else {
            self.failure = Some(Error::NobodyServes {
                path: self.control_socket.clone(),
                detail: "no daemon answers and no cold-start command is configured".into(),
            });
            let _ = self
                .machine_mut()
                .handle_spawn_failed(now, "no cold-start command".into());
            return;
        };
        let missing: Vec<&str> = self
            .listeners
            .iter()
            .filter(|l| l.fd.is_none())
            .map(|l| l.name.as_str())
            .collect();
        if !missing.is_empty() {
            self.failure = Some(Error::NobodyServes {
                path: self.control_socket.clone(),
                detail: format!(
                    "no daemon answers, and the listeners {missing:?} are held by nobody"
                ),
            });
            let _ = self
                .machine_mut()
                .handle_spawn_failed(now, "listeners lost".into());
            return;
        }
        let fds: Vec<(&str, BorrowedFd<'_>)> = self
            .listeners
            .iter()
            .filter_map(|l| l.fd.as_ref().map(|fd| (l.name.as_str(), fd.as_fd())))
            .collect();
        let spawned = spawn::spawn_with_listeners(&spec.command(), &fds);
        drop(fds);
        match spawned {
            Ok(child) => {
                let pid = child.id();
                log!(
                    ROLE,
                    "nobody serves: started {} cold as pid {pid}",
                    spec.binary.display()
                );
                self.children.insert(pid, child);
                if let Ok(w) = Watched::open(pid) {
                    self.watched.insert(pid, w);
                }
                if let Err(e) = self.machine_mut().handle_spawned(now, pid) {
                    log!(ROLE, "internal: {e}");
                }
            }
            Err(e) => {
                let why = format!("{}: {e}", spec.binary.display());
                self.failure = Some(Error::NobodyServes {
                    path: self.control_socket.clone(),
                    detail: format!("cold start failed: {why}"),
                });
                let _ = self.machine_mut().handle_spawn_failed(now, why);
            }
        }
    }

    fn connect(&mut self, now: Instant) {
        let r = (|| -> std::result::Result<Conn, String> {
            let sock = UnixStream::connect(&self.control_socket)
                .map_err(|e| format!("{}: {e}", self.control_socket.display()))?;
            let (pid, uid, _) =
                peer_credentials(sock.as_fd()).map_err(|e| format!("peer credentials: {e}"))?;
            if !self.policy.admits(uid) {
                return Err(format!(
                    "{} is served by pid {pid} with uid {uid}, which is not allowed",
                    self.control_socket.display()
                ));
            }
            Conn::new(sock).map_err(|e| e.to_string())
        })();
        let m = match r {
            Ok(c) => {
                self.inc = Some(c);
                self.machine_mut().handle_connected(now)
            }
            Err(why) => self.machine_mut().handle_connect_failed(now, why),
        };
        if let Err(e) = m {
            log!(ROLE, "internal: {e}");
        }
    }
}
