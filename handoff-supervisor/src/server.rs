//! The supervisor process: one single-threaded mio loop over the handoff engine, the
//! trigger socket and its clients, and the signals.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use handoff_engine::error::Error as HandoffError;
use handoff_engine::sys::conn::connect_nonblocking;
use handoff_engine::sys::peercred::{
    bind_unix_listener_0600, bind_unix_listener_unless_live, peer_credentials,
};
use handoff_engine::sys::proc::Proven;
use handoff_engine::sys::spawn::{wait_any, Watched};
use handoff_engine::SpawnSpec;
use handoff_engine::SupervisorEngine;
use handoff_engine::{proto::ListenerKind, InheritedListeners};
use handoff_io_mio::{Supervisor, SupervisorEvent, Tokens};
use handoff_proto::{HandoffId, Verdict};
use mio::net::{UnixListener as MioUnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::{Addr, Config, Kind};
use crate::notify::{self, Notifier};
use crate::report::{self, Ending, Last, Snapshot, Stats};
use crate::trigger::{self, Command, LineBuf, LineError};

/// A client sending nothing for this long (while no answer is pending) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A line must be complete this long after its first byte arrived, however the bytes trickle
/// in (they do not extend it); a client still sending it then is told so and closed.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);
pub use crate::trigger::MAX_LINE;
/// Unanswered input a client may pipeline.
const MAX_INPUT: usize = 4 * MAX_LINE;
/// Answers a client has not read yet; beyond this it is cut off.
const MAX_OUTPUT: usize = 1 << 20;
/// Clients served at once. When all places are taken, a new client takes the place of the
/// one idle the longest, or else of the one whose unfinished line started first; only if
/// every client waits for a handoff or is being closed is it refused
/// (`error: too many clients`).
pub const MAX_CLIENTS: usize = 64;

const TRIGGER: Token = Token(0);
const SIGNALS: Token = Token(1);
const ENGINE: Tokens = Tokens {
    start: 16,
    len: 1024,
};
const CLIENT_BASE: usize = 4096;

pub(crate) fn log(msg: impl std::fmt::Display) {
    eprintln!("handoff-supervisor[{}]: {msg}", std::process::id());
}

/// A fatal start-up or loop error.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

fn fatal(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Fatal {
    move |e| Fatal(format!("{what}: {e}"))
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    inbuf: LineBuf,
    outbuf: Vec<u8>,
    last_active: Instant,
    /// When the first byte of the unfinished line (the bytes after the last newline) arrived;
    /// `None` when there is none. The line must be complete [`LINE_TIMEOUT`] later.
    line_started: Option<Instant>,
    /// A `handoff` of this client runs: its answer comes with the outcome.
    waiting: bool,
    read_closed: bool,
    /// Close once the output is written (an error ended the conversation).
    closing: bool,
    writable_registered: bool,
}

#[derive(Debug)]
struct Current {
    id: HandoffId,
    waiter: Option<usize>,
    binary: PathBuf,
}

/// The supervisor.
pub struct Server {
    cfg: Config,
    poll: Poll,
    sup: Option<Supervisor>,
    trigger: MioUnixListener,
    trigger_id: (u64, u64),
    signals: Signals,
    clients: BTreeMap<usize, Client>,
    notifier: Notifier,
    stats: Stats,
    current: Option<Current>,
    /// The binary of the last commit (for `status` when /proc cannot tell).
    serving_binary: Option<PathBuf>,
    last_error: Option<String>,
    recovering: bool,
    recovered_at: Option<Instant>,
    ready_sent: bool,
    /// SIGTERM/SIGINT arrived: stop once the running handoff (if any) has ended.
    stopping: bool,
    /// Committed successors: our children, reaped on SIGCHLD.
    children: Vec<Child>,
}

/// Bind (or take from systemd) the configured listeners and configure the engine.
fn listeners(
    cfg: &Config,
    mut engine: SupervisorEngine,
    inherited: &mut InheritedListeners,
) -> Result<SupervisorEngine, Fatal> {
    for l in &cfg.listeners {
        let taken: Option<OwnedFd> = match l.kind {
            Kind::Tcp => inherited.take::<TcpListener>(&l.name).map(OwnedFd::from),
            Kind::Udp => inherited.take::<UdpSocket>(&l.name).map(OwnedFd::from),
            Kind::Unix => inherited.take::<UnixListener>(&l.name).map(OwnedFd::from),
        };
        if let Some(fd) = taken {
            log(format!("listener {:?}: inherited from systemd", l.name));
            engine = engine.with_listener_fd(&l.name, fd.as_fd());
            continue;
        }
        let bound: io::Result<OwnedFd> = match (&l.addr, l.kind) {
            (Addr::Inet(a), Kind::Tcp) => TcpListener::bind(a).map(OwnedFd::from),
            (Addr::Inet(a), Kind::Udp) => UdpSocket::bind(a).map(OwnedFd::from),
            (Addr::Path(p), Kind::Unix) => bind_unix(p).map(OwnedFd::from),
            _ => unreachable!("config checks the address against the kind"),
        };
        match bound {
            Ok(fd) => engine = engine.with_listener_fd(&l.name, fd.as_fd()),
            // Held by the serving daemon after our own restart: take it back from it.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                log(format!(
                    "listener {:?} ({:?}): address in use; expecting it from the serving daemon",
                    l.name, l.addr
                ));
                let kind = match l.kind {
                    Kind::Tcp => ListenerKind::Tcp,
                    Kind::Udp => ListenerKind::Udp,
                    Kind::Unix => ListenerKind::UnixStream,
                };
                engine = engine.expect_listener(&l.name, kind);
            }
            Err(e) => {
                return Err(Fatal(format!(
                    "listener {:?}: cannot bind {:?}: {e}",
                    l.name, l.addr
                )))
            }
        }
    }
    Ok(engine)
}

/// Bind a Unix listener at `p`. A socket file nobody listens on is stale and replaced; one
/// somebody listens on is `AddrInUse`; anything else there (a regular file, a link) is refused
/// and kept, as is a directory others may write (`bind_unix_listener_unless_live`).
fn bind_unix(p: &Path) -> io::Result<UnixListener> {
    bind_unix_listener_unless_live(p)
}

/// Give the trigger socket just bound (ours, mode 0600) its configured group and mode; its
/// `(device, inode)`. The file is opened without following a symlink (`O_PATH|O_NOFOLLOW`)
/// and checked (a socket, ours, mode 0600) before anything is changed, and the changes go
/// through that descriptor: whatever replaced the path meanwhile is refused, never changed.
fn trigger_access(path: &Path, group: Option<u32>, mode: u32) -> io::Result<(u64, u64)> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    let me = rustix::process::geteuid().as_raw();
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::Socket || st.st_uid != me || st.st_mode & 0o7777 != 0o600 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "not the socket just bound: a {kind:?} of uid {} with mode {:#o} (expected a \
                 socket of uid {me} with mode 0o600)",
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    if let Some(gid) = group {
        rustix::fs::chownat(
            &fd,
            "",
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH,
        )?;
    }
    if mode != 0o600 {
        // An O_PATH descriptor takes no fchmod; its /proc link names exactly its inode.
        rustix::fs::chmod(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)).as_str(),
            Mode::from_raw_mode(mode),
        )?;
    }
    if group.is_some() || mode != 0o600 {
        log(format!(
            "trigger socket {}: group {}, mode {mode:#o}",
            path.display(),
            group.map_or("ours".to_string(), |g| g.to_string())
        ));
    }
    Ok((st.st_dev, st.st_ino))
}

/// Raise the soft limit on open descriptors to the hard limit. The supervisor holds every
/// configured listener (and passes them on in batches), and trigger clients come on top; the
/// usual soft limit of 1,024 is below what a daemon with many listeners needs. The daemons it
/// starts inherit the raised limit.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    // An unlimited soft limit has nothing to raise.
    let (Some(soft), Some(hard)) = (l.current, l.maximum) else {
        return;
    };
    if soft < hard {
        l.current = Some(hard);
        match setrlimit(Resource::Nofile, l) {
            Ok(()) => log(format!(
                "RLIMIT_NOFILE: soft limit raised from {soft} to {hard}"
            )),
            Err(e) => log(format!(
                "RLIMIT_NOFILE: cannot raise the soft limit {soft} to {hard}: {e}"
            )),
        }
    }
}

impl Server {
    /// Set everything up and start the first recovery (which cold-starts the daemon if
    /// nobody serves). `inherited`: what systemd passed us (socket activation).
    pub fn start(
        cfg: Config,
        mut inherited: InheritedListeners,
        notifier: Notifier,
    ) -> Result<Server, Fatal> {
        raise_nofile_limit();
        // Another supervisor listening on the trigger socket: do not steal it. Never a
        // blocking connect: one that does not accept (its queue full) would hang us here.
        match connect_nonblocking(&cfg.trigger_socket) {
            Ok(_) => {
                return Err(Fatal(format!(
                    "trigger socket {} is in use by a running supervisor",
                    cfg.trigger_socket.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(Fatal(format!(
                    "trigger socket {} is in use by a supervisor that does not answer: {e}",
                    cfg.trigger_socket.display()
                )))
            }
            Err(_) => {}
        }
        let spec = cold_spec(&cfg, cfg.binary.clone());
        let engine = SupervisorEngine::new(&cfg.control_socket)
            .map_err(|e| Fatal(e.to_string()))?
            .with_journal(&cfg.journal)
            .with_timing(cfg.timing)
            .with_cold_start(spec);
        let engine = listeners(&cfg, engine, &mut inherited)?;
        for name in inherited.names() {
            log(format!(
                "inherited listener {name:?} is not configured; closed"
            ));
        }
        drop(inherited);

        let std_trigger = bind_unix_listener_0600(&cfg.trigger_socket).map_err(fatal(format!(
            "trigger socket {}",
            cfg.trigger_socket.display()
        )))?;
        std_trigger
            .set_nonblocking(true)
            .map_err(fatal("trigger socket"))?;
        let trigger_id =
            trigger_access(&cfg.trigger_socket, cfg.trigger_group, cfg.trigger_mode).map_err(
                fatal(format!("trigger socket {}", cfg.trigger_socket.display())),
            )?;
        let mut trigger = MioUnixListener::from_std(std_trigger);
        let poll = Poll::new().map_err(fatal("epoll"))?;
        poll.registry()
            .register(&mut trigger, TRIGGER, Interest::READABLE)
            .map_err(fatal("register"))?;
        let mut signals =
            Signals::new([SIGHUP, SIGTERM, SIGINT, SIGCHLD]).map_err(fatal("signals"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(fatal("register"))?;
        let mut sup = Supervisor::new(engine, poll.registry(), ENGINE).map_err(fatal("engine"))?;
        sup.start_recovery()
            .map_err(|e| Fatal(format!("recovery: {e}")))?;
        let me = Server {
            cfg,
            poll,
            sup: Some(sup),
            trigger,
            trigger_id,
            signals,
            clients: BTreeMap::new(),
            notifier,
            stats: Stats::default(),
            current: None,
            serving_binary: None,
            last_error: None,
            // The first recovery runs (start_recovery above).
            recovering: true,
            recovered_at: None,
            ready_sent: false,
            stopping: false,
            children: Vec::new(),
        };
        me.notify(&notify::status(
            "recovering: looking for the serving daemon",
        ));
        log(format!(
            "trigger socket {}; control socket {}",
            me.cfg.trigger_socket.display(),
            me.cfg.control_socket.display()
        ));
        Ok(me)
    }

    fn sup(&mut self) -> &mut Supervisor {
        self.sup.as_mut().expect("the engine runs until the stop")
    }

    fn notify(&self, state: &str) {
        if let Err(e) = self.notifier.send(state) {
            log(format!("sd_notify: {e}"));
        }
    }

    /// Run until SIGTERM/SIGINT, then stop the daemon.
    pub fn run(mut self) -> Result<(), Fatal> {
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(now));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fatal(format!("poll: {e}"))),
            }
            for ev in events.iter() {
                match ev.token() {
                    TRIGGER => self.accept(),
                    SIGNALS => self.signals(),
                    t if t.0 >= CLIENT_BASE => self.client_ready(t.0, ev.is_writable()),
                    _ => {
                        if let Err(e) = self.sup().handle_event(ev) {
                            log(format!("engine registration: {e}"));
                        }
                    }
                }
            }
            self.engine_time();
            self.engine_events();
            self.client_timeouts();
            if self.stopping && self.current.is_none() {
                return self.stop();
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let sup = self.sup.as_ref()?;
        let t = sup.poll_timeout();
        let clients = self
            .clients
            .values()
            .filter(|c| !c.waiting)
            .map(|c| match c.line_started {
                Some(l) if !c.closing => (c.last_active + IDLE_TIMEOUT).min(l + LINE_TIMEOUT),
                _ => c.last_active + IDLE_TIMEOUT,
            })
            .min();
        [t, clients].into_iter().flatten().min()
    }

    /// Let time pass for the engine. The crash backoff between recovery attempts and cold
    /// starts is the machine's own (`Timing::backoff_min` and after): nothing is withheld.
    fn engine_time(&mut self) {
        if let Err(e) = self.sup().handle_timeout() {
            log(format!("engine registration: {e}"));
        }
    }

    fn engine_events(&mut self) {
        while let Some(ev) = self.sup.as_mut().and_then(Supervisor::poll_event) {
            match ev {
                SupervisorEvent::Recovered(r) => {
                    self.stats.recoveries += 1;
                    self.last_error = None;
                    self.recovered_at = Some(Instant::now());
                    log(format!(
                        "recovered: pid {} serves ({:?})",
                        r.serving, r.resolution
                    ));
                    if !self.ready_sent {
                        self.ready_sent = true;
                        self.notify(&format!(
                            "READY=1\nMAINPID={}\n{}",
                            std::process::id(),
                            notify::status(&format!("serving: pid {}", r.serving))
                        ));
                    } else {
                        self.notify(&notify::status(&format!(
                            "serving: pid {} (recovered)",
                            r.serving
                        )));
                    }
                }
                SupervisorEvent::Outcome(o) => self.outcome(o),
                SupervisorEvent::Failed(e) => {
                    let msg = e.to_string();
                    // The machine has scheduled its next attempt, after its backoff.
                    let next = self
                        .sup
                        .as_ref()
                        .and_then(Supervisor::poll_timeout)
                        .map_or(Duration::ZERO, |t| {
                            t.saturating_duration_since(Instant::now())
                        });
                    log(format!("recovery: {msg} (next attempt in {next:?})"));
                    self.notify(&notify::status(&format!("recovering: {msg}")));
                    self.last_error = Some(msg);
                }
            }
        }
        let Some(sup) = self.sup.as_ref() else { return };
        let recovering = sup.needs_recovery() && self.current.is_none();
        if recovering && !self.recovering && self.recovered_at.is_some() {
            log("the serving daemon is gone: recovering");
            self.notify(&notify::status("recovering: the serving daemon is gone"));
        }
        self.recovering = recovering;
    }

    fn outcome(&mut self, o: handoff_engine::HandoffOutcome) {
        let ending = match o.verdict {
            Verdict::Committed { .. } => Ending::Committed,
            Verdict::RolledBack { .. } => Ending::RolledBack,
            Verdict::IncumbentLost { .. } => Ending::Lost,
        };
        let line = report::handoff_line(o.handoff_id, o.committed, &o.abort_reason);
        log(format!(
            "handoff {}: {:?} in {:?} ({:?})",
            o.handoff_id, ending, o.times.total, o.abort_reason
        ));
        self.stats.ended(Last {
            id: o.handoff_id,
            ending,
            abort_reason: o.abort_reason.clone(),
            times: o.times,
        });
        let current = self.current.take();
        if let Some(c) = &current {
            if o.committed {
                self.serving_binary = Some(c.binary.clone());
            }
            if let Some(k) = c.waiter {
                if let Some(cl) = self.clients.get_mut(&k) {
                    cl.waiting = false;
                    cl.last_active = Instant::now();
                    // Its unfinished line had no deadline while it waited.
                    if cl.line_started.is_some() {
                        cl.line_started = Some(cl.last_active);
                    }
                    queue(cl, &line);
                }
                // Go on with what it sent meanwhile, and flush the answer.
                self.process(k);
            }
        }
        if let Some(child) = o.child {
            self.children.push(child);
        }
        let status = match ending {
            Ending::Committed => format!("serving: pid {:?} (handoff committed)", o.serving),
            Ending::RolledBack => format!("serving: pid {:?} (handoff rolled back)", o.serving),
            Ending::Lost => "recovering: the handoff lost the daemon".to_string(),
        };
        self.notify(&format!("READY=1\n{}", notify::status(&status)));
    }

    fn state(&self) -> &'static str {
        if self.current.is_some() {
            "handoff"
        } else if self.stopping {
            "stopping"
        } else if self.recovering || self.sup.as_ref().is_some_and(Supervisor::needs_recovery) {
            // The engine starts a recovery on its own when the daemon dies outside a handoff.
            "recovering"
        } else {
            "idle"
        }
    }

    fn snapshot(&self) -> (Option<u32>, Option<String>) {
        let pid = self.sup.as_ref().and_then(Supervisor::serving);
        let binary = pid.map(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .ok()
                .or_else(|| self.serving_binary.clone())
                .unwrap_or_else(|| self.cfg.binary.clone())
                .display()
                .to_string()
        });
        (pid, binary)
    }

    fn status_line(&self) -> String {
        let (serving_pid, binary) = self.snapshot();
        report::status_line(
            &Snapshot {
                state: self.state(),
                serving_pid,
                binary,
                current: self.current.as_ref().map(|c| c.id),
                error: self.last_error.as_deref(),
                build: self.sup.as_ref().and_then(Supervisor::serving_build),
            },
            &self.stats,
        )
    }

    fn metrics(&self) -> String {
        let (serving_pid, binary) = self.snapshot();
        report::metrics(
            &Snapshot {
                state: self.state(),
                serving_pid,
                binary,
                current: self.current.as_ref().map(|c| c.id),
                error: self.last_error.as_deref(),
                build: self.sup.as_ref().and_then(Supervisor::serving_build),
            },
            &self.stats,
        )
    }

    /// Start a handoff to `target` (`None`: the configured binary): the answer line now, or
    /// `None` when the answer comes with the outcome.
    fn start_handoff(&mut self, target: Option<&Path>, waiter: Option<usize>) -> Option<String> {
        if self.stopping {
            return Some("error: shutting down".into());
        }
        if let Some(c) = &self.current {
            self.stats.busy += 1;
            return Some(format!("busy: handoff {} in progress", c.id));
        }
        let binary = match self.cfg.resolve_target(target) {
            Ok(b) => b,
            Err(e) => return Some(format!("error: {e}")),
        };
        let mut spec = cold_spec(&self.cfg, binary.clone());
        spec.drain_grace = self.cfg.timing.drain_grace;
        spec.deadline = self.cfg.timing.deadline;
        match self.sup().trigger(spec) {
            Ok(id) => {
                self.stats.handoffs += 1;
                log(format!("handoff {id}: to {}", binary.display()));
                self.current = Some(Current { id, waiter, binary });
                self.notify(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={}\n{}",
                    notify::monotonic_usec(),
                    notify::status(&format!("handoff {id} in progress"))
                ));
                None
            }
            Err(HandoffError::Busy(b)) => {
                self.stats.busy += 1;
                Some(match b.handoff {
                    Some(h) => format!("busy: handoff {h} in progress"),
                    None => "busy: recovering".to_string(),
                })
            }
            Err(e) => Some(format!("error: {}", one_line(&e.to_string()))),
        }
    }

    // ---- signals ----

    fn signals(&mut self) {
        let got: Vec<i32> = self.signals.pending().collect();
        for sig in got {
            match sig {
                SIGHUP => {
                    log("SIGHUP: handoff to the configured binary");
                    if let Some(answer) = self.start_handoff(None, None) {
                        log(format!("SIGHUP: {answer}"));
                    }
                }
                SIGTERM | SIGINT => {
                    if self.stopping {
                        log("second stop signal: stopping now");
                        self.current = None;
                    } else {
                        self.stopping = true;
                        self.notify(&format!(
                            "STOPPING=1\n{}",
                            notify::status("stopping the daemon")
                        ));
                        if let Some(c) = &self.current {
                            log(format!(
                                "stop requested: waiting for handoff {} to end",
                                c.id
                            ));
                        }
                    }
                }
                SIGCHLD => self.reap(),
                _ => {}
            }
        }
    }

    fn reap(&mut self) {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// Stop the daemon: SIGTERM, up to `drain_grace_secs` for it to exit, then SIGKILL. Then
    /// journal that nobody serves, so that the next start has no pid to watch or kill.
    fn stop(mut self) -> Result<(), Fatal> {
        // The serving daemon as the engine proved it: it may not be our child (adopted after a
        // restart), and its pid alone may name another process by now.
        let serving = self.sup.as_ref().and_then(Supervisor::serving_process);
        // From here on the engine is not driven, so nobody restarts the daemon when it exits;
        // it is kept to write the journal.
        let mut sup = self.sup.take();
        let mut watched: Vec<Watched> = serving.map(Proven::into_watched).into_iter().collect();
        // Our children cannot have been reaped and their pids reused: only this thread reaps.
        for p in our_children() {
            if !watched.iter().any(|w| w.pid() == p) {
                watched.extend(Watched::open(p).ok());
            }
        }
        for w in &watched {
            log(format!("stopping pid {} (SIGTERM)", w.pid()));
            let _ = w.signal(rustix::process::Signal::TERM);
        }
        let all: Vec<&Watched> = watched.iter().collect();
        let left = wait_all(&all, self.cfg.timing.drain_grace);
        for w in &left {
            log(format!(
                "pid {} still runs after {:?}: SIGKILL",
                w.pid(),
                self.cfg.timing.drain_grace
            ));
            let _ = w.kill();
        }
        let _ = wait_all(&left, Duration::from_secs(5));
        self.reap();
        if let Some(sup) = sup.as_mut() {
            if let Err(e) = sup.journal_stopped() {
                log(format!("journal: {e}"));
            }
        }
        drop(sup);
        // Remove the trigger socket if it is still ours.
        if std::fs::metadata(&self.cfg.trigger_socket)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.trigger_id)
        {
            let _ = std::fs::remove_file(&self.cfg.trigger_socket);
        }
        log("stopped");
        Ok(())
    }

    // ---- the trigger socket ----

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.trigger.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the connection stays queued; try at the next event.
                    log(format!("trigger socket accept: {e}"));
                    return;
                }
            };
            let admitted = match peer_credentials(stream.as_fd()) {
                Ok((pid, uid, _)) if self.cfg.trigger_uids.contains(&uid) => {
                    let _ = pid;
                    Ok(())
                }
                Ok((pid, uid, _)) => Err(format!("pid {pid} uid {uid} not allowed")),
                Err(e) => Err(format!("peer credentials: {e}")),
            };
            if let Err(why) = admitted {
                log(format!("trigger client refused: {why}"));
                refuse(&mut stream, "error: not allowed\n");
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS && !self.evict_idle() {
                refuse(&mut stream, "error: too many clients\n");
                continue;
            }
            let key = (CLIENT_BASE..)
                .find(|k| !self.clients.contains_key(k))
                .expect("fewer clients than tokens");
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut stream, Token(key), Interest::READABLE)
            {
                log(format!("register client: {e}"));
                continue;
            }
            self.clients.insert(
                key,
                Client {
                    stream,
                    inbuf: LineBuf::new(),
                    outbuf: Vec::new(),
                    last_active: Instant::now(),
                    line_started: None,
                    waiting: false,
                    read_closed: false,
                    closing: false,
                    writable_registered: false,
                },
            );
            // Edge-triggered: what arrived before the registration is read now.
            self.client_ready(key, false);
        }
    }

    fn client_ready(&mut self, key: usize, _writable: bool) {
        let Some(c) = self.clients.get_mut(&key) else {
            return;
        };
        // Read what is there (edge-triggered: until WouldBlock).
        let mut buf = [0u8; 4096];
        while !c.read_closed && !c.closing {
            match c.stream.read(&mut buf) {
                Ok(0) => c.read_closed = true,
                Ok(n) => {
                    c.inbuf.push(&buf[..n]);
                    let now = Instant::now();
                    c.last_active = now;
                    // A newline ends the unfinished line; what follows the last one starts a
                    // new line now. More bytes of the same line do not move its start.
                    if buf[..n].contains(&b'\n') {
                        c.line_started = (buf[n - 1] != b'\n').then_some(now);
                    } else {
                        c.line_started.get_or_insert(now);
                    }
                    if c.inbuf.len() > MAX_INPUT {
                        queue(c, "error: too much input");
                        c.closing = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
        self.process(key);
    }

    /// Answer the complete lines a client sent (one at a time: a `handoff` holds the rest
    /// until its answer), write what is queued, close when done.
    fn process(&mut self, key: usize) {
        loop {
            let Some(c) = self.clients.get_mut(&key) else {
                return;
            };
            if c.waiting || c.closing {
                break;
            }
            // At a close, what is left without a newline is the last line.
            let text = match c.inbuf.next_line(c.read_closed) {
                None => break,
                Some(Ok(text)) => text,
                Some(Err(e @ LineError::TooLong)) => {
                    queue(c, &format!("error: {e}"));
                    c.closing = true;
                    break;
                }
                Some(Err(e)) => {
                    queue(c, &format!("error: {e}"));
                    continue;
                }
            };
            if let Some(answer) = self.command(key, &text) {
                if let Some(c) = self.clients.get_mut(&key) {
                    queue(c, &answer);
                }
            }
        }
        if let Some(c) = self.clients.get_mut(&key) {
            // The last line, taken without a newline at the close: no line is unfinished.
            if c.inbuf.is_empty() {
                c.line_started = None;
            }
        }
        self.flush(key);
    }

    /// One command; `None` when the answer comes later.
    fn command(&mut self, key: usize, line: &str) -> Option<String> {
        match trigger::parse(line) {
            Ok(Command::Empty) => None,
            Ok(Command::Status) => Some(self.status_line()),
            Ok(Command::Metrics) => Some(self.metrics()),
            Ok(Command::Handoff(target)) => {
                let answer = self.start_handoff(target.as_deref(), Some(key));
                if answer.is_none() {
                    if let Some(c) = self.clients.get_mut(&key) {
                        c.waiting = true;
                    }
                }
                answer
            }
            Err(e) => Some(format!("error: {e}")),
        }
    }

    fn flush(&mut self, key: usize) {
        let Some(c) = self.clients.get_mut(&key) else {
            return;
        };
        while !c.outbuf.is_empty() {
            match c.stream.write(&c.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbuf.drain(..n);
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
        let done = c.outbuf.is_empty()
            && (c.closing || (c.read_closed && !c.waiting && c.inbuf.is_empty()));
        if done || c.outbuf.len() > MAX_OUTPUT {
            self.close(key);
            return;
        }
        let want_write = !c.outbuf.is_empty();
        if want_write != c.writable_registered {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if self
                .poll
                .registry()
                .reregister(&mut c.stream, Token(key), interest)
                .is_err()
            {
                self.close(key);
                return;
            }
            c.writable_registered = want_write;
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut c) = self.clients.remove(&key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Some(cur) = self.current.as_mut() {
                if cur.waiter == Some(key) {
                    // The handoff goes on; its answer has nobody to go to.
                    cur.waiter = None;
                }
            }
        }
    }

    /// Make room for a new client: close the one idle the longest (nothing to read, nothing
    /// to write, no handoff waiting), or else the one whose unfinished line started first,
    /// telling it why. Connections that send nothing, or a line a byte at a time, thus hold a
    /// place only until a new client needs it, not for [`IDLE_TIMEOUT`] or [`LINE_TIMEOUT`].
    /// A candidate's socket is read first: a client whose command arrived while we were
    /// accepting others is answered, and is not idle if more of it is pending. Whether one
    /// was closed.
    fn evict_idle(&mut self) -> bool {
        // Neither waiting for a handoff, nor closing, nor holding an answer not yet written.
        let evictable = |c: &Client| !c.waiting && !c.closing && c.outbuf.is_empty();
        let idle = |c: &Client| evictable(c) && c.inbuf.is_empty();
        let partial = |c: &Client| evictable(c) && !c.inbuf.is_empty();
        let mut idle_ones: Vec<(Instant, usize)> = self
            .clients
            .iter()
            .filter(|(_, c)| idle(c))
            .map(|(k, c)| (c.last_active, *k))
            .collect();
        idle_ones.sort_unstable();
        for (_, key) in idle_ones {
            self.client_ready(key, false);
            let Some(c) = self.clients.get(&key) else {
                return true; // It was done (or broken) and is closed: its place is free.
            };
            if idle(c) {
                self.evict(key, "closed the longest idle connection");
                return true;
            }
        }
        let mut partial_ones: Vec<(Instant, usize)> = self
            .clients
            .iter()
            .filter(|(_, c)| partial(c))
            .map(|(k, c)| (c.line_started.unwrap_or(c.last_active), *k))
            .collect();
        partial_ones.sort_unstable();
        for (_, key) in partial_ones {
            self.client_ready(key, false);
            let Some(c) = self.clients.get(&key) else {
                return true;
            };
            if evictable(c) {
                self.evict(key, "closed the connection with the oldest unfinished line");
                return true;
            }
        }
        false
    }

    /// Close client `key` to make room, with a line saying why (best effort: its socket may
    /// not take it).
    fn evict(&mut self, key: usize, why: &str) {
        if let Some(c) = self.clients.get_mut(&key) {
            let _ = c
                .stream
                .write(format!("error: too many clients: {why}\n").as_bytes());
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        self.close(key);
    }

    /// Close the clients idle for [`IDLE_TIMEOUT`], and tell those whose line is not
    /// complete [`LINE_TIMEOUT`] after its first byte, then close them.
    fn client_timeouts(&mut self) {
        let now = Instant::now();
        let idle: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| !c.waiting && now >= c.last_active + IDLE_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.close(k);
        }
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                !c.waiting && !c.closing && c.line_started.is_some_and(|t| now >= t + LINE_TIMEOUT)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(c) = self.clients.get_mut(&k) {
                queue(
                    c,
                    &format!("error: line not completed within {LINE_TIMEOUT:?}"),
                );
                c.closing = true;
            }
            self.flush(k);
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("state", &self.state())
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

fn queue(c: &mut Client, line: &str) {
    c.outbuf.extend_from_slice(line.as_bytes());
    if !line.ends_with('\n') {
        c.outbuf.push(b'\n');
    }
}

/// Answer a client we do not serve with one line and close. What it sent is read first,
/// so the close does not reset the connection before it read the line.
fn refuse(stream: &mut UnixStream, line: &str) {
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf);
    let _ = stream.write(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn cold_spec(cfg: &Config, binary: PathBuf) -> SpawnSpec {
    SpawnSpec {
        binary,
        args: cfg.args.iter().map(OsString::from).collect(),
        env: cfg
            .env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect(),
        drain_grace: cfg.timing.drain_grace,
        deadline: cfg.timing.deadline,
    }
}

/// Wait until every process in `watched` exited or `limit` passed; those still running.
fn wait_all<'a>(watched: &[&'a Watched], limit: Duration) -> Vec<&'a Watched> {
    let end = Instant::now() + limit;
    let mut left: Vec<&Watched> = watched.to_vec();
    loop {
        left.retain(|w| !w.has_exited().unwrap_or(true));
        let now = Instant::now();
        if left.is_empty() || now >= end {
            return left;
        }
        let _ = wait_any(&left, end - now);
    }
}

/// Our direct children, from `/proc/*/stat`.
fn our_children() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect()
}
