//! The successor driver: a new daemon started by the supervisor to take over.
//!
//! The typestates make the order a compile-time fact:
//!
//! ```text
//! Successor ──handshake──▶ HandshookSuccessor ──wait_for_begin──▶ BegunSuccessor
//!                                                      take / announce_and_bind ──▶ Incumbent
//! ```
//!
//! From [`Successor::handshake`] on, a background thread ("handoff-successor") owns the
//! channel to the supervisor: it answers, receives and checks the listeners, and sends the
//! heartbeats that keep the supervisor waiting however long the application takes to open its
//! data. There is no fixed limit between `Begin` and `Ready`; only the handoff's deadline
//! bounds it.
//!
//! **Differences from the 0.1.2 API this follows.**
//! - `wait_for_begin` returns once the incumbent has sealed and released the lock; the
//!   application takes the lock itself ([`DataDirLock::acquire`]) and hands it to
//!   [`BegunSuccessor::announce_and_bind`], which proves to the protocol that the lock is
//!   held before `Ready` is sent. The lock record is marked committed through it.
//! - If the handoff is aborted while the application is still opening its data (the
//!   supervisor gave up, the deadline passed, the supervisor vanished), the background thread
//!   ends the process at once with status [`EXIT_ABORTED`]: an aborted successor must not
//!   touch the data, and its exit frees the lock for the incumbent.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use handoff_proto::{AbortReason, HandoffId, ReadinessSnapshot, SealReport, Timing};
use rustix::event::{PollFd, PollFlags};

use handoff_engine::config::default_build_id;
use handoff_engine::error::{Context, Error, Result};
use handoff_engine::sys::conn::{readable, wait, writable, Waker};
use handoff_engine::{
    crash, DataDirLock, IncumbentConfig, Listener, ListenerSet, SuccessorEngine, SuccessorEvent,
};

use crate::daemon::Incumbent;
use crate::log::log;

const ROLE: &str = "successor";

pub use handoff_engine::EXIT_ABORTED;

/// A process started as a successor, before it has spoken to the supervisor.
#[derive(Debug)]
pub struct Successor {
    chan: UnixStream,
    timing: Timing,
}

/// Greeted by the supervisor, listeners received; the incumbent may still be serving.
#[derive(Debug)]
pub struct HandshookSuccessor {
    shared: Arc<Shared>,
}

/// The incumbent has sealed its data and released the lock: take the listeners, take the
/// lock, open the data, then [`announce_and_bind`](Self::announce_and_bind).
#[derive(Debug)]
pub struct BegunSuccessor {
    shared: Arc<Shared>,
    seal: SealReport,
    handoff: HandoffId,
    /// The listeners received, new descriptors in blocking mode.
    listeners: ListenerSet,
}

impl Successor {
    pub(crate) fn new(chan: UnixStream) -> Successor {
        Successor {
            chan,
            timing: Timing::default(),
        }
    }

    /// Heartbeat, silence and retry timings (default [`Timing::default`]; the supervisor's
    /// must be compatible: its silence limit longer than our heartbeat interval).
    pub fn with_timing(mut self, timing: Timing) -> Successor {
        self.timing = timing;
        self
    }

    /// The channel to the supervisor, for a driver of its own (`handoff-io-mio`).
    pub fn into_channel(self) -> UnixStream {
        self.chan
    }

    /// Answer the supervisor's greeting with `build_id` and receive the listeners. Blocks
    /// until all listeners arrived (each checked to be the kind announced) or the handoff
    /// failed.
    pub fn handshake(self, build_id: impl Into<String>) -> Result<HandshookSuccessor> {
        let build_id: String = build_id.into();
        let build_id = if build_id.is_empty() {
            default_build_id()
        } else {
            build_id
        };
        let engine = SuccessorEngine::new(self.chan, build_id, self.timing, Instant::now())
            .context(|| "setting up the successor channel".into())?;
        let waker = Waker::new().context(|| "creating the successor's waker".into())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                engine: Some(engine),
                listeners_done: false,
                begun: None,
                committed: None,
                failed: None,
            }),
            changed: Condvar::new(),
            waker,
        });
        let pump = Arc::clone(&shared);
        thread::Builder::new()
            .name("handoff-successor".into())
            .spawn(move || pump.pump())
            .context(|| "starting the successor thread".into())?;
        drop(shared.wait_for(|s| s.listeners_done)?);
        Ok(HandshookSuccessor { shared })
    }
}

impl HandshookSuccessor {
    /// Block until the incumbent has drained, sealed and released the data-directory lock
    /// (`Begin`), or the handoff failed.
    pub fn wait_for_begin(self) -> Result<BegunSuccessor> {
        let (handoff, seal, listeners) = {
            let s = self.shared.wait_for(|s| s.begun.is_some())?;
            let (handoff, seal) = s.begun.clone().expect("waited for it");
            let listeners = s.engine.as_ref().and_then(SuccessorEngine::listeners);
            (handoff, seal, listeners.unwrap_or_default())
        };
        Ok(BegunSuccessor {
            shared: self.shared,
            seal,
            handoff,
            listeners,
        })
    }

    /// The names of the listeners received, in order.
    pub fn listener_names(&self) -> Vec<String> {
        let s = self.shared.lock();
        s.engine
            .as_ref()
            .map(SuccessorEngine::listener_names)
            .unwrap_or_default()
    }
}

impl BegunSuccessor {
    /// What the incumbent sealed: check it against what you open.
    pub fn seal_report(&self) -> &SealReport {
        &self.seal
    }

    /// The handoff.
    pub fn handoff(&self) -> HandoffId {
        self.handoff
    }

    /// The listener named `name`, of the type asked for (`take::<UdpSocket>("dns")`;
    /// `None`: no such listener, or another kind). In blocking mode.
    ///
    /// `O_NONBLOCK` is a property of the socket's open file description, shared by every
    /// process holding the listener (supervisor, incumbent, successor): set the mode your
    /// accept loop needs after taking it, as async runtimes do when they register a socket.
    pub fn take<L: Listener>(&mut self, name: &str) -> Option<L> {
        self.listeners.take(name)
    }

    /// The TCP listener named `name`: [`take::<TcpListener>`](Self::take), the 0.1.2 API's
    /// name for it.
    pub fn take_listener(&mut self, name: &str) -> Option<std::net::TcpListener> {
        self.take(name)
    }

    /// The names of the listeners not taken yet, in order.
    pub fn listener_names(&self) -> Vec<&str> {
        self.listeners.names()
    }

    /// Declare ready and, once the supervisor has committed, become the incumbent: bind the
    /// control socket at `socket_path` (replacing the old incumbent's atomically) with `lock`.
    ///
    /// `lock` must be this data directory's lock, taken after
    /// [`HandshookSuccessor::wait_for_begin`]: it is what lets the protocol send `Ready`.
    /// Before the commit is acknowledged, the lock record is marked committed through it.
    /// Blocks until the commit, or returns the reason the handoff was aborted (the process is
    /// then exiting, see the module docs).
    pub fn announce_and_bind(
        self,
        readiness: ReadinessSnapshot,
        socket_path: &Path,
        lock: DataDirLock,
    ) -> Result<Incumbent> {
        {
            let mut s = self.shared.lock();
            let now = Instant::now();
            let engine = s
                .engine
                .as_mut()
                .ok_or(Error::Protocol("no engine".into()))?;
            engine.ready_with(now, readiness, lock)?;
            s.absorb();
        }
        self.shared.waker.wake();
        let (lock, received, build) = {
            let mut s = self.shared.wait_for(|s| s.committed.is_some())?;
            let engine = s.engine.take().expect("the engine stays until commit");
            let build = engine.build_id().to_string();
            let (lock, received) = engine
                .into_parts()
                .ok_or(Error::Protocol("committed without the lock".into()))?;
            (lock, received, build)
        };
        log!(
            ROLE,
            "handoff {}: committed; binding {}",
            self.handoff,
            socket_path.display()
        );
        let incumbent = Incumbent::from_config(
            IncumbentConfig::from_parts(socket_path, lock, received)?.with_build_id(build),
        );
        crash::point("successor.control_bound");
        Ok(incumbent)
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    waker: Waker,
}

#[derive(Debug)]
struct State {
    /// `None` once `announce_and_bind` took the parts.
    engine: Option<SuccessorEngine>,
    listeners_done: bool,
    begun: Option<(HandoffId, SealReport)>,
    committed: Option<HandoffId>,
    failed: Option<AbortReason>,
}

impl State {
    /// Take in what the engine reports.
    fn absorb(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        while let Some(ev) = engine.poll_event() {
            match ev {
                SuccessorEvent::ListenersReceived => self.listeners_done = true,
                SuccessorEvent::Begun { handoff, seal } => self.begun = Some((handoff, seal)),
                SuccessorEvent::Committed { handoff } => self.committed = Some(handoff),
                SuccessorEvent::Aborted { reason } => {
                    log!(
                        ROLE,
                        "handoff aborted: {reason}; exiting with status {EXIT_ABORTED}"
                    );
                    self.failed = Some(reason);
                    std::process::exit(EXIT_ABORTED);
                }
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block until `ready` holds or the handoff failed.
    fn wait_for(&self, ready: impl Fn(&State) -> bool) -> Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        loop {
            if let Some(reason) = &s.failed {
                return Err(Error::Aborted(reason.clone()));
            }
            if ready(&s) {
                return Ok(s);
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The background thread: the engine's loop until the commit.
    fn pump(&self) {
        loop {
            let (deadline, fd, write) = {
                let s = self.lock();
                let Some(engine) = s.engine.as_ref() else {
                    return;
                };
                if s.committed.is_some() {
                    return;
                }
                let interest = engine.interests().into_iter().next();
                // Polled from this thread without the lock held: a duplicate, so the
                // engine may close its own meanwhile.
                let fd = interest
                    .as_ref()
                    .and_then(|i| rustix::io::fcntl_dupfd_cloexec(i.fd, 3).ok());
                (engine.poll_timeout(), fd, interest.is_some_and(|i| i.write))
            };
            let mut flags = PollFlags::IN;
            if write {
                flags |= PollFlags::OUT;
            }
            let (r, w, wake) = {
                let mut fds = vec![PollFd::from_borrowed_fd(self.waker.fd(), PollFlags::IN)];
                if let Some(fd) = &fd {
                    fds.push(PollFd::new(fd, flags));
                }
                if let Err(e) = wait(&mut fds, deadline) {
                    fatal(&format!("poll: {e}"));
                }
                let chan = fds.get(1);
                (
                    chan.is_some_and(readable),
                    chan.is_some_and(writable),
                    readable(&fds[0]),
                )
            };
            drop(fd);
            if wake {
                self.waker.clear();
            }
            let now = Instant::now();
            let mut s = self.lock();
            if let Some(engine) = s.engine.as_mut() {
                if r || w {
                    engine.ready(now, r, w);
                }
                if engine.poll_timeout().is_some_and(|t| t <= now) {
                    engine.handle_timeout(now);
                }
            }
            s.absorb();
            drop(s);
            self.changed.notify_all();
        }
    }
}

/// The successor cannot go on safely: exit without touching the data.
fn fatal(msg: &str) -> ! {
    log!(ROLE, "{msg}; exiting with status {EXIT_ABORTED}");
    std::process::exit(EXIT_ABORTED)
}
