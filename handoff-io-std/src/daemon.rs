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
//! Every connection is checked before the machine hears of it: its uid (`SO_PEERCRED`)
//! against the [`PeerPolicy`], and, in a daemon started by a handoff supervisor, whether the
//! peer is that supervisor: the process holding the supervisor lock named in
//! `HANDOFF_SUPERVISOR_LOCK` (see [`crate::sys::supervisor_lock`]). Any other peer, even one of
//! the daemon's own uid, is logged and dropped unheard: it cannot take the listeners, drain
//! the daemon or disturb a handoff. A daemon started without that variable (by hand) admits
//! any peer of an admitted uid, and says so once at start. A control connection that sends a
//! descriptor is closed at once (the incumbent needs none). A peer that goes silent is dropped
//! by the machine after the silence limit; if it was running a handoff, the daemon takes its
//! lock back and resumes on its own.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use handoff_proto::{DrainReport, HandoffId, ListenerKind, SealReport, StateSnapshot, Timing};

use crate::drainable::Drainable;
use crate::engine::{wait_ready, IncumbentEngine, IncumbentEvent};
use crate::error::{Context, Error, Result};
use crate::held::{self, Held};
use crate::log::log;
use crate::sys::conn::Waker;
use crate::sys::lock::DataDirLock;
use crate::sys::peercred::{bind_unix_listener_0600, PeerPolicy};
use crate::sys::supervisor_lock::{Admission, LockId, ENV_SUPERVISOR_LOCK};

const ROLE: &str = "incumbent";

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
    pub(crate) control: UnixListener,
    pub(crate) socket_path: PathBuf,
    pub(crate) lock: Option<DataDirLock>,
    pub(crate) lock_dir: PathBuf,
    pub(crate) listeners: Vec<Held>,
    pub(crate) build_id: String,
    pub(crate) timing: Timing,
    pub(crate) policy: PeerPolicy,
    /// The supervisor lock whose holder alone may talk on the control socket; `None`: any
    /// peer the policy admits.
    pub(crate) supervisor: Option<Admission>,
    pub(crate) exit_on_retire: bool,
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

    /// An incumbent from its parts: for a driver that ran the successor's engine itself
    /// (`handoff-io-mio`), once committed. Binds the control socket as
    /// [`bind_cold_start`](Self::bind_cold_start) does.
    pub fn from_parts(
        socket_path: &Path,
        lock: DataDirLock,
        listeners: Vec<Held>,
    ) -> Result<Incumbent> {
        Incumbent::new(socket_path, lock, listeners)
    }

    pub(crate) fn new(
        socket_path: &Path,
        lock: DataDirLock,
        listeners: Vec<Held>,
    ) -> Result<Incumbent> {
        // Read before binding: a daemon that cannot tell its supervisor must not serve.
        let supervisor = LockId::from_env()
            .map_err(|detail| Error::invalid(ENV_SUPERVISOR_LOCK, detail))?
            .map(Admission::new);
        if supervisor.is_none() {
            log!(
                ROLE,
                "{ENV_SUPERVISOR_LOCK} is not set (not started by a handoff supervisor): any \
                 process of an admitted uid may drive handoffs on {}",
                socket_path.display()
            );
        }
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
            supervisor,
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

    /// Which uids may connect to the control socket (default: this process's uid, and root).
    /// Under a handoff supervisor, a peer must also hold the supervisor lock (see
    /// [`crate::sys::supervisor_lock`]); the policy cannot widen that.
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
        let mut engine = IncumbentEngine::new(self);
        loop {
            while let Some(ev) = engine.poll_event() {
                match ev {
                    IncumbentEvent::Drain { deadline, .. } => hooks.call(HookCall::Drain(deadline)),
                    IncumbentEvent::Seal { .. } => hooks.call(HookCall::Seal),
                    IncumbentEvent::Resume { .. } => hooks.call(HookCall::Resume),
                    IncumbentEvent::Retired { handoff } => {
                        if engine.exit_on_retire() {
                            log!(ROLE, "handoff {handoff} committed elsewhere; exiting");
                            std::process::exit(0);
                        }
                        return Ok(Retired { handoff });
                    }
                }
            }
            let until = engine.poll_timeout();
            let (ready, wake) = wait_ready(&engine.interests(), Some(waker.fd()), until)
                .context(|| "polling the control socket".into())?;
            let now = Instant::now();
            if wake {
                waker.clear();
            }
            while let Ok(done) = hooks.results.try_recv() {
                match done {
                    HookResult::Drained(r) => engine.drained(now, r),
                    HookResult::Sealed(r) => engine.sealed(now, r),
                    HookResult::Resumed(r) => engine.resumed(now, r),
                }
            }
            for (key, r, w) in ready {
                engine.ready(now, key, r, w);
            }
            if engine.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                engine.handle_timeout(Instant::now());
            }
        }
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
