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
//! `HANDOFF_SUPERVISOR_LOCK` (see `handoff_engine::sys::supervisor_lock`). Any other peer, even one of
//! the daemon's own uid, is logged and dropped unheard: it cannot take the listeners, drain
//! the daemon or disturb a handoff. A daemon started without that variable (by hand) admits
//! any peer of an admitted uid, and says so once at start. A control connection that sends a
//! descriptor is closed at once (the incumbent needs none). A peer that goes silent is dropped
//! by the machine after the silence limit; if it was running a handoff, the daemon takes its
//! lock back and resumes on its own.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use handoff_engine::error::{Context, Result};
use handoff_engine::sys::conn::Waker;
use handoff_engine::PeerPolicy;
use handoff_engine::{wait_ready, DataDirLock, IncumbentConfig, IncumbentEngine, IncumbentEvent};
use handoff_proto::{DrainReport, HandoffId, SealReport, StateSnapshot, Timing};

use crate::drainable::Drainable;
use crate::log::log;

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
    config: IncumbentConfig,
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
        Ok(Incumbent::from_config(IncumbentConfig::bind_cold_start(
            socket_path,
            lock,
        )?))
    }

    /// The incumbent of an engine-level configuration.
    pub(crate) fn from_config(config: IncumbentConfig) -> Incumbent {
        Incumbent { config }
    }

    /// Also hand `fd` (a listener this daemon bound itself) back to a restarted supervisor,
    /// under `name`. The library keeps a close-on-exec duplicate.
    pub fn with_listener(self, name: &str, fd: impl AsFd) -> Result<Incumbent> {
        Ok(Incumbent::from_config(self.config.with_listener(name, fd)?))
    }

    /// The build id reported to the supervisor (default: the executable's file name and the
    /// crate version).
    pub fn with_build_id(self, build_id: impl Into<String>) -> Incumbent {
        Incumbent::from_config(self.config.with_build_id(build_id))
    }

    /// Heartbeat, silence and retry timings (default [`Timing::default`]).
    pub fn with_timing(self, timing: Timing) -> Incumbent {
        Incumbent::from_config(self.config.with_timing(timing))
    }

    /// Which uids may connect to the control socket (default: this process's uid, and root).
    /// Under a handoff supervisor, a peer must also hold the supervisor lock; the policy
    /// cannot widen that.
    pub fn with_peer_policy(self, policy: PeerPolicy) -> Incumbent {
        Incumbent::from_config(self.config.with_peer_policy(policy))
    }

    /// Whether [`serve`](Self::serve) ends the process (status 0) when a successor has taken
    /// over (default: yes). The old binary must not touch the data after a commit, and old
    /// processes must not pile up; turn this off only to run your own shutdown, and exit
    /// promptly after `serve` returns.
    pub fn exit_on_retire(self, exit: bool) -> Incumbent {
        Incumbent::from_config(self.config.exit_on_retire(exit))
    }

    /// The control socket's path.
    pub fn socket_path(&self) -> &Path {
        self.config.socket_path()
    }

    /// Answer supervisors until a successor takes over: then exit the process (or return,
    /// see [`exit_on_retire`](Self::exit_on_retire)). Run it on a dedicated thread.
    ///
    /// Returns an error only if the loop itself cannot go on (polling fails); bad peers, bad
    /// frames and failed hooks are logged and handled by the protocol.
    pub fn serve<D: Drainable>(self, drainable: D) -> Result<Retired> {
        let waker = Arc::new(Waker::new().context(|| "creating the loop's waker".into())?);
        let hooks = HookThread::spawn(drainable, Arc::clone(&waker))?;
        let mut engine = IncumbentEngine::new(self.config);
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
