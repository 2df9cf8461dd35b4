//! The supervisor's engine: the connection to the serving daemon, the successor's channel,
//! the pidfds of the processes it watches, the journal.
//!
//! # Which processes it signals
//!
//! Only processes it has proven ([`Proven`]), through their pidfds: the children it spawned
//! (stamped right after the spawn, while unreaped), the process at the other end of its
//! control connection (the kernel's `SO_PEERPIDFD`), and a pid named by the journal whose
//! recorded identity (boot id, start time, pidfs inode) matches the process that has the pid
//! now. The journal records the identity of every pid it names that was proven this way.
//!
//! A journal pid whose identity does not match is another process: it is reported to the
//! machine as exited and never touched. A journal pid with no identity (a format-1 journal,
//! or one its writer could not prove) is proven only if it turns out to be the process serving
//! the control socket at the next connect; otherwise it is reported as exited in the same
//! way. Reported as exited rather than watched without ever being killed: a stranger with that
//! pid would otherwise keep the recovery waiting its whole `recovery_wait` for a process that
//! is not ours, and the process the journal meant, if it is still alive and not serving,
//! resolves on its own (an uncommitted successor exits at its deadline, an incumbent that is
//! still reclaiming answers on the control socket and is proven there).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    HandoffId, HandoffSpec, JournalRecord, ListenerInfo, ListenerKind, Peer, Pid, ProcessIdentity,
    SupervisorConfig, SupervisorOutput, Timing, Verdict,
};

use super::Interest;
use crate::crash;
use crate::error::{Error, Result};
use crate::log::log;
use crate::spec::{HandoffOutcome, Recovery, SpawnSpec};
use crate::sys::conn::{Conn, ReadStatus};
use crate::sys::journal_file;
use crate::sys::peercred::{peer_credentials, PeerPolicy};
use crate::sys::proc::{Proven, Unproven};
use crate::sys::sockcheck;
use crate::sys::spawn;
use crate::sys::supervisor_lock::{self, SupervisorLock, ENV_SUPERVISOR_LOCK};

const ROLE: &str = "supervisor";

/// Which descriptor of a [`SupervisorEngine`] is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SupervisorKey {
    /// The connection to the serving daemon's control socket.
    Incumbent,
    /// The successor's channel.
    Successor,
    /// The pidfd of a watched process: readable once it exited.
    Process(Pid),
}

/// What a supervisor's engine reports.
// One event per handoff or recovery: the outcome's size (its phase times) costs nothing worth
// a box, and boxing would change the public type.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SupervisorEvent {
    /// The recovery started by [`SupervisorEngine::start_recovery`] found whoever serves.
    Recovered(Recovery),
    /// The handoff started by [`SupervisorEngine::trigger`] ended.
    Outcome(HandoffOutcome),
    /// The engine cannot go on (nobody serves and nobody can be started): the error says why.
    Failed(Error),
}

#[derive(Debug)]
struct Listener {
    name: String,
    kind: ListenerKind,
    fd: Option<OwnedFd>,
}

/// The supervisor's non-blocking core (see the [module docs](super)).
#[derive(Debug)]
pub struct SupervisorEngine {
    control_socket: PathBuf,
    journal: PathBuf,
    listeners: Vec<Listener>,
    /// Where each name is in `listeners`. Every handoff looks each listener up by name (to
    /// pair a batch's names with descriptors): a linear search there made passing N
    /// listeners O(N²), most of a handoff's time at 5,000 listeners.
    by_name: HashMap<String, usize>,
    setup_error: Option<String>,
    timing: Timing,
    policy: PeerPolicy,
    cold_start: Option<SpawnSpec>,
    machine: Option<handoff_proto::Supervisor>,
    inc: Option<Conn>,
    succ: Option<Conn>,
    /// Proven processes whose exit the machine waits for.
    watched: BTreeMap<Pid, Proven>,
    /// The process serving the control socket at the last connect, proven.
    peer: Option<Proven>,
    /// Identities the journal recorded, to check the pids it names against.
    claims: BTreeMap<Pid, ProcessIdentity>,
    /// Pids the machine asked to watch that have no identity to check: proven at the next
    /// connect if they serve the control socket, else reported as exited.
    unproven: Vec<Pid>,
    children: BTreeMap<Pid, Child>,
    statuses: BTreeMap<Pid, std::process::ExitStatus>,
    successor: Option<Pid>,
    spec: SpawnSpec,
    events: VecDeque<SupervisorEvent>,
    buf: Vec<u8>,
    /// The supervisor lock (`<journal>.lock`), taken by the first recovery and held for the
    /// engine's life: what the daemons it starts admit on their control sockets.
    lock: Option<SupervisorLock>,
}

impl SupervisorEngine {
    /// An engine for the daemon whose control socket is at `control_socket`; the journal
    /// defaults to `<control_socket>.journal`.
    pub fn new(control_socket: &Path) -> Result<SupervisorEngine> {
        if control_socket.file_name().is_none() {
            return Err(Error::invalid(
                format!("control socket path {}", control_socket.display()),
                "has no file name",
            ));
        }
        let mut journal = control_socket.as_os_str().to_os_string();
        journal.push(".journal");
        Ok(SupervisorEngine {
            control_socket: control_socket.to_path_buf(),
            journal: PathBuf::from(journal),
            listeners: Vec::new(),
            by_name: HashMap::new(),
            setup_error: None,
            timing: Timing::default(),
            policy: PeerPolicy::default(),
            cold_start: None,
            machine: None,
            inc: None,
            succ: None,
            watched: BTreeMap::new(),
            peer: None,
            claims: BTreeMap::new(),
            unproven: Vec::new(),
            children: BTreeMap::new(),
            statuses: BTreeMap::new(),
            successor: None,
            spec: SpawnSpec::default(),
            events: VecDeque::new(),
            buf: Vec::new(),
            lock: None,
        })
    }

    /// Hand the listener `fd` to every successor under `name` (a close-on-exec duplicate is
    /// kept; a bad one is reported by the next command).
    pub fn with_listener_fd(mut self, name: &str, fd: impl AsFd) -> SupervisorEngine {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd());
        let added = (|| -> std::result::Result<(ListenerKind, OwnedFd), String> {
            self.check_listener_name(name)?;
            let kind = sockcheck::inspect(fd.as_fd())
                .map_err(|e| format!("listener {name:?} (fd {raw}): {e}"))?;
            let dup = rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), 3)
                .map_err(|e| format!("listener {name:?} (fd {raw}): cannot duplicate: {e}"))?;
            Ok((ListenerKind::from(kind), dup))
        })();
        match added {
            Ok((kind, fd)) => self.add_listener(Listener {
                name: name.to_string(),
                kind,
                fd: Some(fd),
            }),
            Err(e) => {
                self.setup_error.get_or_insert(e);
            }
        }
        self
    }

    /// A listener the serving daemon holds and a recovery takes back.
    pub fn expect_listener(mut self, name: &str, kind: ListenerKind) -> SupervisorEngine {
        match self.check_listener_name(name) {
            Ok(()) => self.add_listener(Listener {
                name: name.to_string(),
                kind,
                fd: None,
            }),
            Err(e) => {
                self.setup_error.get_or_insert(e);
            }
        }
        self
    }

    fn add_listener(&mut self, l: Listener) {
        self.by_name.insert(l.name.clone(), self.listeners.len());
        self.listeners.push(l);
    }

    fn listener(&self, name: &str) -> Option<&Listener> {
        self.by_name.get(name).map(|&i| &self.listeners[i])
    }

    /// What is wrong with `name` for a new listener (see `held::name_problem`).
    fn check_listener_name(&self, name: &str) -> std::result::Result<(), String> {
        let taken = self.by_name.get_key_value(name).map(|(k, _)| k.as_str());
        match crate::held::name_problem(name, taken.into_iter()) {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Record an error found while configuring, reported by the next command.
    pub fn with_setup_error(mut self, error: String) -> SupervisorEngine {
        self.setup_error.get_or_insert(error);
        self
    }

    /// Where the journal lives.
    pub fn with_journal(mut self, path: &Path) -> SupervisorEngine {
        self.journal = path.to_path_buf();
        self
    }

    /// How to start the daemon when nobody serves.
    pub fn with_cold_start(mut self, spec: SpawnSpec) -> SupervisorEngine {
        self.cold_start = Some(spec);
        self
    }

    /// Every timing: heartbeats, silence, retries, the recovery wait and the crash backoff.
    pub fn with_timing(mut self, timing: Timing) -> SupervisorEngine {
        self.timing = timing;
        self
    }

    /// Which uids the serving daemon may run as.
    pub fn with_peer_policy(mut self, policy: PeerPolicy) -> SupervisorEngine {
        self.policy = policy;
        self
    }

    /// The timings in use.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The recovery wait in use.
    pub fn recovery_wait(&self) -> Duration {
        self.timing.recovery_wait
    }

    /// The serving daemon, when known and no handoff or recovery runs.
    pub fn serving(&self) -> Option<Pid> {
        self.machine.as_ref().and_then(|m| m.incumbent())
    }

    /// The serving daemon as a proven process (a second pidfd on it), when known: signal it
    /// through this, never through its pid.
    pub fn serving_process(&self) -> Option<Proven> {
        let pid = self.serving()?;
        self.watched.get(&pid)?.try_clone().ok()
    }

    /// Record that the daemon was stopped: the journal says `Idle { serving: None }` from now
    /// on, so that the next start has no pid to watch or kill (a pid another process may have
    /// by then). For a supervisor that stops its daemon and exits; call it once the daemon has
    /// exited and the engine is no longer driven. Before any recovery ran nothing is known, and
    /// the journal is left as it is.
    pub fn journal_stopped(&mut self) -> Result<()> {
        let Some(m) = self.machine.as_ref() else {
            return Ok(());
        };
        let rec = JournalRecord::Idle {
            serving: None,
            last_handoff: m.last_handoff(),
        };
        journal_file::write(&self.journal, &rec)?;
        log!(ROLE, "journal: the daemon was stopped; nobody serves");
        Ok(())
    }

    /// The build id the serving daemon reported in its `HelloAck`, when known.
    pub fn serving_build(&self) -> Option<&str> {
        self.machine.as_ref().and_then(|m| m.serving_build())
    }

    /// Whether a trigger would be refused until a recovery has found whoever serves (none has
    /// run, or the serving daemon was lost).
    pub fn needs_recovery(&self) -> bool {
        !self.machine.as_ref().is_some_and(|m| m.is_idle())
    }

    /// Whether a handoff or a recovery is in progress.
    pub fn is_busy(&self) -> bool {
        self.machine.as_ref().is_some_and(|m| !m.is_idle())
    }

    /// The machine's phase, for status lines.
    pub fn phase_name(&self) -> &'static str {
        self.machine
            .as_ref()
            .map_or("not started", |m| m.phase_name())
    }

    fn config(&self) -> SupervisorConfig {
        SupervisorConfig {
            pid: std::process::id(),
            build_id: crate::config::default_build_id(),
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
        }
    }

    fn check_setup(&self) -> Result<()> {
        match &self.setup_error {
            Some(e) => Err(Error::invalid("listener", e.clone())),
            None => Ok(()),
        }
    }

    /// Read the journal and start finding whoever serves; [`SupervisorEvent::Recovered`] (or
    /// `Failed`) follows. A damaged journal is an error here, and nothing is touched.
    ///
    /// The first call takes the supervisor lock, `<journal>.lock`, before it reads the
    /// journal, and the engine holds it from then on: another supervisor on this journal is
    /// an error naming it ([`Error::SupervisorLock`]). The daemons this engine starts admit
    /// only the lock's holder on their control sockets (see [`crate::sys::supervisor_lock`]).
    pub fn start_recovery(&mut self, now: Instant) -> Result<()> {
        self.check_setup()?;
        if self.lock.is_none() {
            self.lock = Some(SupervisorLock::acquire(&supervisor_lock::lock_path(
                &self.journal,
            ))?);
        }
        let journal = journal_file::read(&self.journal)?;
        let holds = self.listeners.iter().all(|l| l.fd.is_some());
        self.inc = None;
        self.succ = None;
        self.peer = None;
        self.unproven.clear();
        self.claims = journal
            .as_ref()
            .map(|j| j.identities.iter().copied().collect())
            .unwrap_or_default();
        if let Some(j) = journal.as_ref().filter(|j| j.format < 2) {
            log!(
                ROLE,
                "journal {} is of format {}, without process identities: the pids it names \
                 ({:?}) are trusted only if they serve the control socket",
                self.journal.display(),
                j.format,
                j.record.pids()
            );
        }
        let record = journal.map(|j| j.record);
        self.machine = Some(handoff_proto::Supervisor::recover(
            self.config(),
            now,
            record,
            holds,
        ));
        self.perform(now);
        Ok(())
    }

    /// Start a handoff to `spec.binary`; [`SupervisorEvent::Outcome`] follows. `Busy` while a
    /// handoff or a recovery runs.
    pub fn trigger(&mut self, now: Instant, spec: SpawnSpec) -> Result<HandoffId> {
        self.check_setup()?;
        let hspec = HandoffSpec {
            drain_grace: spec.drain_grace,
            deadline: spec.deadline,
        };
        let m = self.machine.as_mut().ok_or_else(|| {
            Error::Busy(handoff_proto::Busy {
                what: "no recovery has run yet".into(),
                handoff: None,
            })
        })?;
        let id = m.handle_trigger(now, hspec)?;
        self.spec = spec;
        self.successor = None;
        self.statuses.clear();
        log!(
            ROLE,
            "handoff {id}: starting {}",
            self.spec.binary.display()
        );
        self.perform(now);
        Ok(id)
    }

    /// The descriptors to watch now.
    pub fn interests(&self) -> Vec<Interest<'_, SupervisorKey>> {
        let mut v = Vec::new();
        for (key, c) in [
            (SupervisorKey::Incumbent, &self.inc),
            (SupervisorKey::Successor, &self.succ),
        ] {
            if let Some(c) = c {
                v.push(Interest {
                    key,
                    fd: c.fd(),
                    read: true,
                    write: c.wants_write(),
                });
            }
        }
        for (pid, w) in &self.watched {
            v.push(Interest {
                key: SupervisorKey::Process(*pid),
                fd: w.as_fd(),
                read: true,
                write: false,
            });
        }
        v
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.machine.as_ref().and_then(|m| m.poll_timeout())
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SupervisorEvent> {
        self.events.pop_front()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.machine_mut().handle_timeout(now);
        }
        self.perform(now);
    }

    /// A watched descriptor is ready.
    pub fn ready(&mut self, now: Instant, key: SupervisorKey, readable: bool, writable: bool) {
        match key {
            SupervisorKey::Incumbent | SupervisorKey::Successor => {
                let peer = if key == SupervisorKey::Incumbent {
                    Peer::Incumbent
                } else {
                    Peer::Successor
                };
                if writable {
                    if let Some(Err(e)) = self.conn(peer).as_mut().map(Conn::flush) {
                        log!(ROLE, "{peer:?} channel: {e}");
                        self.write_failed(now, peer);
                    }
                }
                if readable {
                    self.read(now, peer);
                }
            }
            SupervisorKey::Process(pid) if readable => {
                if self.watched.remove(&pid).is_none() {
                    return;
                }
                match self.children.get_mut(&pid).map(Child::try_wait) {
                    Some(Ok(Some(status))) => {
                        log!(ROLE, "pid {pid} exited: {status}");
                        self.children.remove(&pid);
                        self.statuses.insert(pid, status);
                    }
                    _ => log!(ROLE, "pid {pid} exited"),
                }
                if let Some(m) = self.machine.as_mut() {
                    m.handle_exited(now, pid);
                }
            }
            SupervisorKey::Process(_) => {}
        }
        self.perform(now);
    }

    fn outcome(&mut self, o: handoff_proto::Outcome) -> HandoffOutcome {
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
        HandoffOutcome {
            handoff_id: o.handoff,
            committed,
            child,
            serving,
            abort_reason,
            successor_status,
            verdict: o.verdict,
            times: o.times,
        }
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

    fn machine_mut(&mut self) -> &mut handoff_proto::Supervisor {
        self.machine.as_mut().expect("running a machine")
    }

    fn conn(&mut self, peer: Peer) -> &mut Option<Conn> {
        match peer {
            Peer::Incumbent => &mut self.inc,
            Peer::Successor => &mut self.succ,
        }
    }

    /// Writing to `peer` failed: it closed its end, or is gone. What it sent before that is
    /// still ours to read, and may decide the handoff (a successor sends `CommitAck` and
    /// closes its channel, possibly before our next heartbeat): read it, then close.
    fn write_failed(&mut self, now: Instant, peer: Peer) {
        self.read(now, peer);
        if self.conn(peer).take().is_some() {
            self.machine_mut().handle_closed(now, peer);
        }
    }

    fn read(&mut self, now: Instant, peer: Peer) {
        let mut buf = std::mem::take(&mut self.buf);
        let Some(conn) = self.conn(peer).as_mut() else {
            self.buf = buf;
            return;
        };
        buf.clear();
        let status = conn.read_available(&mut buf);
        if !buf.is_empty() {
            if let Err(e) = self.machine_mut().handle_bytes(now, peer, &buf) {
                log!(ROLE, "{peer:?} channel: {e}");
            }
            // Perform now: a `TakeListeners` must meet the descriptors read with its frame.
            self.perform(now);
        }
        self.buf = buf;
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
        loop {
            self.perform_outputs(now);
            // A pid to watch that no connect proved (the machine asks to watch before it
            // connects, so one would have): gone, as far as this supervisor can tell.
            if self.unproven.is_empty() {
                return;
            }
            self.settle_unproven(now, None);
        }
    }

    fn perform_outputs(&mut self, now: Instant) {
        while let Some(out) = self.machine.as_mut().and_then(|m| m.poll_output()) {
            match out {
                SupervisorOutput::Send { to, frame } => {
                    let fds: Vec<BorrowedFd<'_>> = match &frame.message {
                        Message::Listeners { batch } => batch
                            .iter()
                            .filter_map(|info| {
                                let (by_name, listeners) = (&self.by_name, &self.listeners);
                                by_name
                                    .get(&info.name)
                                    .and_then(|&i| listeners[i].fd.as_ref())
                                    .map(|fd| fd.as_fd())
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let conn = match to {
                        Peer::Incumbent => self.inc.as_mut(),
                        Peer::Successor => self.succ.as_mut(),
                    };
                    let Some(conn) = conn else { continue };
                    let sent = frame
                        .encode()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(|b| conn.send(&b, &fds));
                    if let Err(e) = sent {
                        log!(ROLE, "sending {} to {to:?}: {e}", frame.message.kind());
                        self.write_failed(now, to);
                    } else if let Some(point) = sent_point(to, &frame.message) {
                        crash::point(point);
                    }
                }
                SupervisorOutput::Close { peer } => {
                    self.conn(peer).take();
                }
                SupervisorOutput::TakeListeners { batch } => self.take_listeners(now, &batch),
                SupervisorOutput::SpawnSuccessor { handoff } => self.spawn_successor(now, handoff),
                SupervisorOutput::SpawnColdStart => self.spawn_cold_start(now),
                SupervisorOutput::Connect => self.connect(now),
                SupervisorOutput::Watch { pid } => self.watch(now, pid),
                SupervisorOutput::Kill { pid } => {
                    let proven = self
                        .watched
                        .get(&pid)
                        .or(self.peer.as_ref().filter(|p| p.pid() == pid));
                    match proven.map(Proven::kill) {
                        Some(Ok(())) => log!(ROLE, "killed pid {pid}"),
                        Some(Err(e)) => log!(ROLE, "kill pid {pid}: {e}"),
                        None => log!(
                            ROLE,
                            "not killing pid {pid}: it is not a process this supervisor has \
                             proven to be its own"
                        ),
                    }
                }
                SupervisorOutput::WriteJournal(rec) => {
                    let (tmp_point, done_point) = match rec {
                        JournalRecord::InFlight { .. } => (
                            Some("supervisor.inflight_tmp_written"),
                            "supervisor.inflight_journaled",
                        ),
                        JournalRecord::Committing { .. } => (
                            Some("supervisor.committing_tmp_written"),
                            "supervisor.committing_journaled",
                        ),
                        JournalRecord::Idle { .. } => (None, "supervisor.idle_journaled"),
                    };
                    let identities = self.identities(&rec);
                    let bytes = handoff_proto::journal::encode_journal(&rec, &identities);
                    let written = journal_file::write_atomic_with(&self.journal, &bytes, || {
                        if let Some(p) = tmp_point {
                            crash::point(p);
                        }
                    });
                    let r = match written {
                        Ok(()) => {
                            crash::point(done_point);
                            self.machine_mut().handle_journal_written(now)
                        }
                        Err(e) => {
                            log!(ROLE, "journal: {e}");
                            self.machine_mut().handle_journal_failed(now, e.to_string())
                        }
                    };
                    if let Err(e) = r {
                        log!(ROLE, "internal: {e}");
                    }
                }
                SupervisorOutput::Outcome(o) => {
                    let o = self.outcome(o);
                    self.events.push_back(SupervisorEvent::Outcome(o));
                }
                SupervisorOutput::Recovered {
                    serving,
                    resolution,
                } => {
                    // The journal's claims are settled: its pids are watched or gone.
                    self.claims.clear();
                    log!(ROLE, "recovered: pid {serving} serves ({resolution:?})");
                    self.events.push_back(SupervisorEvent::Recovered(Recovery {
                        serving,
                        resolution,
                    }))
                }
            }
        }
    }

    /// Watch `pid` for the machine if it is proven (see the module docs); otherwise report it
    /// as exited, now or at the next connect.
    ///
    /// A proven process that is dead but not yet reaped (a daemon adopted after a restart is
    /// not our child) is reported at once too, not watched: the machine asks again for a pid
    /// whose exit was just reported (an idle supervisor's recovery watches the dead
    /// incumbent), the new pidfd then often gets the number of the one just closed, under the
    /// same key, and a driver that registers by (key, number) never polls it (the mio driver
    /// did not: the recovery waited the whole recovery_wait before a cold start).
    fn watch(&mut self, now: Instant, pid: Pid) {
        if self.watched.contains_key(&pid) {
            return;
        }
        if let Some(p) = self.peer.as_ref().filter(|p| p.pid() == pid) {
            match p.try_clone() {
                Ok(p) if !p.has_exited().unwrap_or(true) => {
                    self.watched.insert(pid, p);
                }
                Ok(_) => self.machine_mut().handle_exited(now, pid),
                Err(e) => {
                    log!(ROLE, "cannot watch pid {pid}: {e}");
                    self.machine_mut().handle_exited(now, pid);
                }
            }
            return;
        }
        let Some(claim) = self.claims.get(&pid).copied() else {
            if !self.unproven.contains(&pid) {
                self.unproven.push(pid);
            }
            return;
        };
        match Proven::verify(pid, &claim) {
            // A zombie is `Gone` already (see above).
            Ok(p) => {
                self.watched.insert(pid, p);
            }
            Err(Unproven::Gone { .. }) => self.machine_mut().handle_exited(now, pid),
            Err(e @ Unproven::Other { .. }) => {
                log!(
                    ROLE,
                    "pid {pid} named by the journal is now another process: left alone ({e})"
                );
                self.machine_mut().handle_exited(now, pid);
            }
            Err(e) => {
                log!(
                    ROLE,
                    "pid {pid} named by the journal cannot be checked: left alone ({e})"
                );
                self.machine_mut().handle_exited(now, pid);
            }
        }
    }

    /// The pids waiting for a proof: the one `serving` the control socket is proven by the
    /// connection; the others are reported as exited and left alone.
    fn settle_unproven(&mut self, now: Instant, serving: Option<&Proven>) {
        for pid in std::mem::take(&mut self.unproven) {
            match serving.filter(|p| p.pid() == pid).map(Proven::try_clone) {
                Some(Ok(p)) => {
                    self.watched.insert(pid, p);
                }
                _ => {
                    log!(
                        ROLE,
                        "pid {pid} has no recorded identity and does not serve {}: treated \
                         as gone and left alone",
                        self.control_socket.display()
                    );
                    self.machine_mut().handle_exited(now, pid);
                }
            }
        }
    }

    /// The identities of the pids `rec` names that this supervisor has proven.
    fn identities(&self, rec: &JournalRecord) -> Vec<(Pid, ProcessIdentity)> {
        rec.pids()
            .into_iter()
            .filter_map(|pid| {
                self.watched
                    .get(&pid)
                    .or(self.peer.as_ref().filter(|p| p.pid() == pid))
                    .map(|p| (pid, p.identity()))
            })
            .collect()
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
                    .listener(&info.name)
                    .is_some_and(|l| l.kind == info.kind)
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
                    if let Some(&i) = self.by_name.get(&info.name) {
                        self.listeners[i].fd = Some(fd);
                    }
                }
                crash::point("supervisor.listeners_taken_back");
                self.machine_mut()
                    .handle_listeners_taken(now, batch.len() as u32);
            }
            Err(why) => {
                log!(ROLE, "listeners returned by the daemon: {why}");
                self.machine_mut().handle_listener_error(now, why.clone());
                // The machine tries again; the caller learns why this attempt failed.
                self.events
                    .push_back(SupervisorEvent::Failed(Error::Protocol(format!(
                        "the serving daemon returned listeners this supervisor does not have \
                     configured: {why}"
                    ))));
            }
        }
    }

    fn spawn_successor(&mut self, now: Instant, handoff: HandoffId) {
        let spawned = (|| -> io::Result<(Child, UnixStream)> {
            let (ours, theirs) = crate::sys::fdpass::socketpair_cloexec()?;
            let cmd = self
                .spec
                .command()
                .env(spawn::ENV_LISTENER_COUNT, self.listeners.len().to_string());
            let cmd = self.with_lock_env(cmd);
            let child = spawn::spawn_successor(&cmd, theirs.as_fd())?;
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
                let exited = self.watch_child(&child);
                self.children.insert(pid, child);
                self.successor = Some(pid);
                crash::point("supervisor.successor_spawned");
                if let Err(e) = self.machine_mut().handle_spawned(now, pid) {
                    log!(ROLE, "internal: {e}");
                }
                if exited {
                    self.machine_mut().handle_exited(now, pid);
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

    /// Prove and watch a child just spawned (not reaped yet, so its pid is its own); `true` if
    /// it has already exited.
    fn watch_child(&mut self, child: &Child) -> bool {
        let pid = child.id();
        match Proven::child(child) {
            Ok(p) => {
                self.watched.insert(pid, p);
                false
            }
            Err(Unproven::Gone { .. }) => true,
            Err(e) => {
                log!(ROLE, "cannot watch child {pid}: {e}");
                false
            }
        }
    }

    fn spawn_cold_start(&mut self, now: Instant) {
        let Some(spec) = self.cold_start.clone() else {
            self.events
                .push_back(SupervisorEvent::Failed(Error::NobodyServes {
                    path: self.control_socket.clone(),
                    detail: "no daemon answers and no cold-start command is configured".into(),
                }));
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
            self.events
                .push_back(SupervisorEvent::Failed(Error::NobodyServes {
                    path: self.control_socket.clone(),
                    detail: format!(
                        "no daemon answers, and the listeners {missing:?} are held by nobody"
                    ),
                }));
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
        let spawned = spawn::spawn_with_listeners(&self.with_lock_env(spec.command()), &fds);
        drop(fds);
        match spawned {
            Ok(child) => {
                let pid = child.id();
                log!(
                    ROLE,
                    "nobody serves: started {} cold as pid {pid}",
                    spec.binary.display()
                );
                let exited = self.watch_child(&child);
                self.children.insert(pid, child);
                if let Err(e) = self.machine_mut().handle_spawned(now, pid) {
                    log!(ROLE, "internal: {e}");
                }
                if exited {
                    self.machine_mut().handle_exited(now, pid);
                }
            }
            Err(e) => {
                let why = format!("{}: {e}", spec.binary.display());
                self.events
                    .push_back(SupervisorEvent::Failed(Error::NobodyServes {
                        path: self.control_socket.clone(),
                        detail: format!("cold start failed: {why}"),
                    }));
                let _ = self.machine_mut().handle_spawn_failed(now, why);
            }
        }
    }

    /// `cmd` with [`ENV_SUPERVISOR_LOCK`] naming this engine's lock, so that the daemon it
    /// starts admits this supervisor (and a restarted one) alone.
    fn with_lock_env(&self, cmd: spawn::Command) -> spawn::Command {
        match &self.lock {
            Some(l) => cmd.env(ENV_SUPERVISOR_LOCK, l.id().to_string()),
            None => cmd,
        }
    }

    fn connect(&mut self, now: Instant) {
        self.peer = None;
        let r = (|| -> std::result::Result<(Conn, Proven), String> {
            let sock = crate::sys::conn::connect_nonblocking(&self.control_socket)
                .map_err(|e| format!("{}: {e}", self.control_socket.display()))?;
            let (pid, uid, _) =
                peer_credentials(sock.as_fd()).map_err(|e| format!("peer credentials: {e}"))?;
            if !self.policy.admits(uid) {
                return Err(format!(
                    "{} is served by pid {pid} with uid {uid}, which is not allowed",
                    self.control_socket.display()
                ));
            }
            // The process that listens on the socket, proven by the kernel.
            let peer = Proven::peer(sock.as_fd()).map_err(|e| {
                format!(
                    "{} is served by pid {pid}, which cannot be proven: {e}",
                    self.control_socket.display()
                )
            })?;
            // The daemon sends descriptors only to return the listeners, never more than
            // are configured (more is a protocol violation).
            let conn = Conn::new(sock)
                .map(|c| c.with_fd_budget(self.listeners.len()))
                .map_err(|e| e.to_string())?;
            Ok((conn, peer))
        })();
        let (serving, r) = match r {
            Ok((c, peer)) => (Some(peer), Ok(c)),
            Err(why) => (None, Err(why)),
        };
        self.settle_unproven(now, serving.as_ref());
        self.peer = serving;
        let m = match r {
            Ok(c) => {
                self.inc = Some(c);
                let pid = self.peer.as_ref().map_or(0, Proven::pid);
                // The HelloAck must name this pid (the machine refuses it otherwise).
                self.machine_mut().handle_connected(now, pid)
            }
            Err(why) => self.machine_mut().handle_connect_failed(now, why),
        };
        if let Err(e) = m {
            log!(ROLE, "internal: {e}");
        }
    }
}

/// The crash point right after `message` went to `to`, if there is one.
fn sent_point(to: Peer, message: &Message) -> Option<&'static str> {
    Some(match (to, message) {
        (Peer::Successor, Message::Listeners { .. }) => "supervisor.listeners_sent",
        (Peer::Incumbent, Message::Prepare { .. }) => "supervisor.prepare_sent",
        (Peer::Incumbent, Message::Seal { .. }) => "supervisor.seal_sent",
        (Peer::Successor, Message::Begin { .. }) => "supervisor.begin_sent",
        (Peer::Successor, Message::Commit { .. }) => "supervisor.commit_sent_successor",
        (Peer::Incumbent, Message::Commit { .. }) => "supervisor.commit_sent_incumbent",
        (Peer::Incumbent, Message::Abort { .. }) => "supervisor.abort_sent_incumbent",
        _ => return None,
    })
}
