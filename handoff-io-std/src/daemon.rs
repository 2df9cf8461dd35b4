//! The incumbent driver: the serving daemon's side of a handoff, run by
//! [`Incumbent::serve`] on a thread of its own.
//!
//! One loop, one thread, plus one thread for the application's hooks:
//!
//! - the loop `poll`s the control socket, its connections and a waker, feeds what happened to
//!   the `handoff-proto` incumbent machine, and performs every output it asks for (send a
//!   frame, take or release the lock, call a hook, exit);
//! - hooks ([`Drainable`]) run on the hook thread, so the loop keeps sending heartbeats while
//!   a drain takes its time; their results come back through a channel and the waker.
//!
//! Every connection is checked with `SO_PEERCRED` before the machine hears of it: a peer whose
//! uid the [`PeerPolicy`] does not admit is logged and dropped, and cannot make the daemon do
//! anything. A peer that goes silent is dropped by the machine after the silence limit; if it
//! was running a handoff, the daemon takes its lock back and resumes on its own.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    ConnId, DaemonConfig, DrainReport, HandoffId, IncumbentOutput, ListenerKind, LockResult,
    SealReport, StateSnapshot, Timing,
};
use rustix::event::{PollFd, PollFlags};

use crate::conn::{readable, wait, Conn, ReadStatus, Waker};
use crate::drainable::Drainable;
use crate::error::{Context, Error, Result};
use crate::held::{self, Held};
use crate::log::log;
use crate::sys::lock::{self, DataDirLock, LockError};
use crate::sys::peercred::{bind_unix_listener_0600, peer_credentials, PeerPolicy};

const ROLE: &str = "incumbent";

/// Most control connections open at once; more are refused until some close.
const MAX_CONNS: usize = 64;

/// How a [`serve`](Incumbent::serve) loop ended (only returned when
/// [`exit_on_retire`](Incumbent::exit_on_retire) is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retired {
    /// The handoff that replaced this process.
    pub handoff: HandoffId,
}

/// The serving daemon's handoff endpoint: its control socket, its data-directory lock and the
/// listeners it serves on. Made by [`Incumbent::bind_cold_start`] or, for a successor, by
/// [`BegunSuccessor::announce_and_bind`](crate::BegunSuccessor::announce_and_bind); run with
/// [`serve`](Incumbent::serve) on a dedicated thread.
#[derive(Debug)]
pub struct Incumbent {
    control: UnixListener,
    socket_path: PathBuf,
    lock: Option<DataDirLock>,
    lock_dir: PathBuf,
    listeners: Vec<Held>,
    build_id: String,
    timing: Timing,
    policy: PeerPolicy,
    exit_on_retire: bool,
}

impl Incumbent {
    /// A daemon that started cold and holds the data-directory lock: bind the control socket
    /// at `socket_path` (mode 0600, replacing atomically whatever socket was there) and keep
    /// the lock. The listeners [`detect_role`](crate::detect_role) inherited are kept for a
    /// restarted supervisor; add the ones the daemon bound itself with
    /// [`with_listener`](Self::with_listener).
    ///
    /// Bind only after taking the lock, as the seed example does: a daemon that answers on the
    /// control socket is taken by a recovering supervisor to be the one serving.
    pub fn bind_cold_start(socket_path: &Path, lock: DataDirLock) -> Result<Incumbent> {
        Incumbent::new(socket_path, lock, held::take_all())
    }

    pub(crate) fn new(
        socket_path: &Path,
        lock: DataDirLock,
        listeners: Vec<Held>,
    ) -> Result<Incumbent> {
        let control = bind_unix_listener_0600(socket_path)
            .context(|| format!("binding control socket {}", socket_path.display()))?;
        control
            .set_nonblocking(true)
            .context(|| "making the control socket non-blocking".into())?;
        let lock_dir = lock
            .path()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(Incumbent {
            control,
            socket_path: socket_path.to_path_buf(),
            lock: Some(lock),
            lock_dir,
            listeners,
            build_id: default_build_id(),
            timing: Timing::default(),
            policy: PeerPolicy::default(),
            exit_on_retire: true,
        })
    }

    /// Also hand `fd` (a listener this daemon bound itself) back to a restarted supervisor,
    /// under `name`. The library keeps a close-on-exec duplicate.
    pub fn with_listener(mut self, name: &str, fd: impl AsFd) -> Result<Incumbent> {
        held::check_name(name, &self.listeners)?;
        let kind = crate::sys::sockcheck::inspect(fd.as_fd())
            .map_err(|e| Error::invalid(format!("listener {name:?}"), e.to_string()))?;
        held::keep(name, ListenerKind::from(kind), fd)?;
        self.listeners.extend(held::take_all());
        Ok(self)
    }

    /// The build id reported to the supervisor (default: the executable's file name and the
    /// crate version).
    pub fn with_build_id(mut self, build_id: impl Into<String>) -> Incumbent {
        self.build_id = build_id.into();
        self
    }

    /// Heartbeat, silence and retry timings (default [`Timing::default`]).
    pub fn with_timing(mut self, timing: Timing) -> Incumbent {
        self.timing = timing;
        self
    }

    /// Who may connect to the control socket (default: this process's uid, and root).
    pub fn with_peer_policy(mut self, policy: PeerPolicy) -> Incumbent {
        self.policy = policy;
        self
    }

    /// Whether [`serve`](Self::serve) ends the process (status 0) when a successor has taken
    /// over (default: yes). The old binary must not touch the data after a commit, and old
    /// processes must not pile up; turn this off only to run your own shutdown, and exit
    /// promptly after `serve` returns.
    pub fn exit_on_retire(mut self, exit: bool) -> Incumbent {
        self.exit_on_retire = exit;
        self
    }

    /// The control socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Answer supervisors until a successor takes over: then exit the process (or return,
    /// see [`exit_on_retire`](Self::exit_on_retire)). Run it on a dedicated thread.
    ///
    /// Returns an error only if the loop itself cannot go on (polling fails); bad peers, bad
    /// frames and failed hooks are logged and handled by the protocol.
    pub fn serve<D: Drainable>(self, drainable: D) -> Result<Retired> {
        let waker = Arc::new(Waker::new().context(|| "creating the loop's waker".into())?);
        let hooks = HookThread::spawn(drainable, Arc::clone(&waker))?;
        let cfg = DaemonConfig {
            pid: std::process::id(),
            build_id: self.build_id.clone(),
            versions: SUPPORTED_VERSIONS,
            timing: self.timing,
            listeners: self.listeners.iter().map(Held::info).collect(),
        };
        let machine = handoff_proto::Incumbent::serving(cfg);
        let mut lp = Loop {
            inc: self,
            machine,
            conns: BTreeMap::new(),
            next_conn: 0,
            hooks,
            retired: None,
            accept_paused_until: None,
        };
        let retired = lp.run(&waker)?;
        if lp.inc.exit_on_retire {
            log!(ROLE, "handoff {retired} committed elsewhere; exiting");
            std::process::exit(0);
        }
        Ok(Retired { handoff: retired })
    }
}

/// `<executable file name> <crate version>`.
pub(crate) fn default_build_id() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into());
    format!("{exe} {}", env!("CARGO_PKG_VERSION"))
}

struct Loop {
    inc: Incumbent,
    machine: handoff_proto::Incumbent,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    hooks: HookThread,
    retired: Option<HandoffId>,
    /// After an `accept` error such as `EMFILE` the pending connection stays queued and the
    /// socket stays readable: stop polling it for a while instead of spinning.
    accept_paused_until: Option<Instant>,
}

/// How long the control socket is left alone after an `accept` error.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

impl Loop {
    fn run(&mut self, waker: &Waker) -> Result<HandoffId> {
        let mut buf = Vec::new();
        loop {
            self.perform(Instant::now());
            if let Some(h) = self.retired {
                return Ok(h);
            }
            let deadline = self.machine.poll_timeout();
            let paused = self
                .accept_paused_until
                .filter(|until| *until > Instant::now());
            self.accept_paused_until = paused;
            let wake_at = match (deadline, paused) {
                (Some(d), Some(p)) => Some(d.min(p)),
                (d, p) => d.or(p),
            };
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            let (control_ready, wake_ready, ready_conns) = {
                let mut fds = Vec::with_capacity(ids.len() + 2);
                let interest = if paused.is_some() {
                    PollFlags::empty()
                } else {
                    PollFlags::IN
                };
                fds.push(PollFd::new(&self.inc.control, interest));
                fds.push(PollFd::from_borrowed_fd(waker.fd(), PollFlags::IN));
                for id in &ids {
                    fds.push(PollFd::from_borrowed_fd(self.conns[id].fd(), PollFlags::IN));
                }
                wait(&mut fds, wake_at).context(|| "polling the control socket".into())?;
                let ready: Vec<ConnId> = ids
                    .iter()
                    .zip(&fds[2..])
                    .filter(|(_, p)| readable(p))
                    .map(|(id, _)| *id)
                    .collect();
                (
                    paused.is_none() && readable(&fds[0]),
                    readable(&fds[1]),
                    ready,
                )
            };
            let now = Instant::now();
            if wake_ready {
                waker.clear();
            }
            while let Ok(done) = self.hooks.results.try_recv() {
                self.hook_done(now, done);
                self.perform(now);
            }
            for id in ready_conns {
                self.read(now, id, &mut buf);
                self.perform(now);
            }
            if control_ready {
                self.accept(now);
                self.perform(now);
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                self.machine.handle_timeout(Instant::now());
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let sock = match self.inc.control.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the loop goes on, and tries again shortly.
                    log!(
                        ROLE,
                        "accept on the control socket failed: {e}; retrying in {ACCEPT_PAUSE:?}"
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            };
            if let Err(why) = self.admit(&sock) {
                log!(ROLE, "refused control connection: {why}");
                continue;
            }
            let conn = match Conn::new(sock) {
                Ok(c) => c,
                Err(e) => {
                    log!(ROLE, "cannot set up control connection: {e}");
                    continue;
                }
            };
            let id = ConnId(self.next_conn);
            self.next_conn += 1;
            self.conns.insert(id, conn);
            if let Err(e) = self.machine.handle_connected(now, id) {
                log!(ROLE, "internal: {e}");
            }
        }
    }

    /// Whether this peer may talk to us.
    fn admit(&self, sock: &UnixStream) -> std::result::Result<(), String> {
        if self.conns.len() >= MAX_CONNS {
            return Err(format!("{MAX_CONNS} connections already open"));
        }
        let (pid, uid, _) =
            peer_credentials(sock.as_fd()).map_err(|e| format!("no peer credentials: {e}"))?;
        if !self.inc.policy.admits(uid) {
            return Err(format!(
                "peer pid {pid} has uid {uid}, which is not allowed"
            ));
        }
        Ok(())
    }

    fn read(&mut self, now: Instant, id: ConnId, buf: &mut Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        buf.clear();
        let status = conn.read_available(buf);
        if !buf.is_empty() {
            if let Err(e) = self.machine.handle_bytes(now, id, buf) {
                log!(ROLE, "control connection {}: {e}", id.0);
            }
        }
        match status {
            Ok(ReadStatus::Open) => {}
            Ok(ReadStatus::Closed) => self.closed(now, id),
            Err(e) => {
                log!(ROLE, "control connection {}: {e}", id.0);
                self.closed(now, id);
            }
        }
    }

    fn closed(&mut self, now: Instant, id: ConnId) {
        if self.conns.remove(&id).is_some() {
            // The machine may have closed it already (after a Refused): then it is unknown.
            let _ = self.machine.handle_closed(now, id);
        }
    }

    fn hook_done(&mut self, now: Instant, done: HookResult) {
        let r = match done {
            HookResult::Drained(r) => self.machine.handle_drained(now, r),
            HookResult::Sealed(r) => self.machine.handle_sealed(now, r),
            HookResult::Resumed(r) => self.machine.handle_resumed(now, r),
        };
        if let Err(e) = r {
            log!(ROLE, "internal: {e}");
        }
    }

    /// Perform every output the machine has, in order.
    fn perform(&mut self, now: Instant) {
        while let Some(out) = self.machine.poll_output() {
            match out {
                IncumbentOutput::Send { conn, frame } => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    let fds: Vec<BorrowedFd<'_>> = match &frame.message {
                        Message::Listeners { batch } => batch
                            .iter()
                            .filter_map(|info| {
                                self.inc
                                    .listeners
                                    .iter()
                                    .find(|h| h.name == info.name && h.kind == info.kind)
                                    .map(|h| h.fd.as_fd())
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let sent = frame
                        .encode()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(|bytes| c.send(&bytes, &fds, self.inc.timing.peer_silence));
                    if let Err(e) = sent {
                        log!(ROLE, "sending {} failed: {e}", frame.message.kind());
                        self.closed(now, conn);
                    }
                }
                IncumbentOutput::Close { conn } => {
                    self.conns.remove(&conn);
                }
                IncumbentOutput::CallDrain { handoff, grace } => {
                    log!(ROLE, "handoff {handoff}: draining (grace {grace:?})");
                    self.hooks.call(HookCall::Drain(now + grace));
                }
                IncumbentOutput::CallSeal { handoff } => {
                    log!(ROLE, "handoff {handoff}: sealing");
                    self.hooks.call(HookCall::Seal);
                }
                IncumbentOutput::CallResume { handoff } => {
                    log!(ROLE, "handoff {handoff}: resuming");
                    self.hooks.call(HookCall::Resume);
                }
                IncumbentOutput::ReleaseLock(proof) => {
                    if let Some(l) = self.inc.lock.take() {
                        if let Err(e) = l.release() {
                            // Closing the descriptor (done by `release` in any case) unlocks.
                            log!(ROLE, "handoff {}: unlock: {e}", proof.handoff());
                        }
                    }
                }
                IncumbentOutput::AcquireLock => {
                    let result = match lock::try_acquire(&self.inc.lock_dir) {
                        Ok(acquired) => {
                            let r = acquired.lock_result();
                            self.inc.lock = Some(acquired.lock);
                            r
                        }
                        Err(LockError::Held { record }) => LockResult::Held(record),
                        Err(e) => {
                            // Cannot tell: try again at the next retry.
                            log!(ROLE, "taking the lock back: {e}");
                            LockResult::Held(None)
                        }
                    };
                    if let Err(e) = self.machine.handle_lock(now, result) {
                        log!(ROLE, "internal: {e}");
                    }
                }
                IncumbentOutput::KillLockHolder { pid } => self.kill_lock_holder(pid),
                IncumbentOutput::Retire { handoff } => {
                    self.retired = Some(handoff);
                }
            }
        }
    }

    fn kill_lock_holder(&self, pid: u32) {
        let path = lock::lock_file_path(&self.inc.lock_dir);
        match lock::holds_lock(pid, &path) {
            Ok(true) => {
                log!(
                    ROLE,
                    "successor {pid} holds the lock past the deadline; killing it"
                );
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    if let Err(e) = rustix::process::kill_process(p, rustix::process::Signal::KILL)
                    {
                        log!(ROLE, "kill {pid}: {e}");
                    }
                }
            }
            Ok(false) => log!(ROLE, "pid {pid} no longer holds the lock; not killing it"),
            Err(e) => log!(ROLE, "cannot read /proc/locks, not killing {pid}: {e}"),
        }
    }
}

enum HookCall {
    Drain(Instant),
    Seal,
    Resume,
}

enum HookResult {
    Drained(std::result::Result<DrainReport, String>),
    Sealed(std::result::Result<SealReport, String>),
    Resumed(std::result::Result<StateSnapshot, String>),
}

/// The thread the application's hooks run on.
struct HookThread {
    calls: mpsc::Sender<HookCall>,
    results: mpsc::Receiver<HookResult>,
}

impl HookThread {
    fn spawn<D: Drainable>(d: D, waker: Arc<Waker>) -> Result<HookThread> {
        let (calls, call_rx) = mpsc::channel::<HookCall>();
        let (result_tx, results) = mpsc::channel();
        thread::Builder::new()
            .name("handoff-hooks".into())
            .spawn(move || {
                for call in call_rx {
                    let r = match call {
                        HookCall::Drain(deadline) => {
                            HookResult::Drained(guarded("drain", || d.drain(deadline)))
                        }
                        HookCall::Seal => HookResult::Sealed(guarded("seal", || d.seal())),
                        HookCall::Resume => {
                            HookResult::Resumed(guarded("resume_after_abort", || {
                                d.resume_after_abort()?;
                                Ok(d.snapshot_state())
                            }))
                        }
                    };
                    if result_tx.send(r).is_err() {
                        return;
                    }
                    waker.wake();
                }
            })
            .context(|| "starting the hook thread".into())?;
        Ok(HookThread { calls, results })
    }

    fn call(&self, call: HookCall) {
        // The hook thread lives as long as the loop; a send can only fail if it panicked
        // outside a hook, which `guarded` prevents.
        let _ = self.calls.send(call);
    }
}

/// Run a hook, turning an error or a panic into the reason the protocol reports.
fn guarded<T>(name: &str, f: impl FnOnce() -> Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("{name} panicked: {msg}"))
        }
    }
}
