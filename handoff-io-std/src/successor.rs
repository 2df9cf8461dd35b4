//! The successor driver: a new daemon started by the supervisor to take over.
//!
//! The typestates make the order a compile-time fact:
//!
//! ```text
//! Successor ──handshake──▶ HandshookSuccessor ──wait_for_begin──▶ BegunSuccessor
//!                                                      take_listener / announce_and_bind ──▶ Incumbent
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

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use handoff_proto::wire::SUPPORTED_VERSIONS;
use handoff_proto::{
    AbortReason, DaemonConfig, HandoffId, ListenerKind, LockResult, ReadinessSnapshot, SealReport,
    SuccessorOutput, Timing,
};
use rustix::event::{PollFd, PollFlags};

use crate::conn::{readable, wait, Conn, ReadStatus, Waker};
use crate::daemon::{default_build_id, Incumbent};
use crate::error::{Context, Error, Result};
use crate::held::Held;
use crate::log::log;
use crate::sys::lock::DataDirLock;
use crate::sys::sockcheck;

const ROLE: &str = "successor";

/// Exit status of a successor whose handoff was aborted (`EX_TEMPFAIL`).
pub const EXIT_ABORTED: i32 = 75;

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

    /// Answer the supervisor's greeting with `build_id` and receive the listeners. Blocks
    /// until all listeners arrived (each checked to be the kind announced) or the handoff
    /// failed.
    pub fn handshake(self, build_id: impl Into<String>) -> Result<HandshookSuccessor> {
        let now = Instant::now();
        let cfg = DaemonConfig {
            pid: std::process::id(),
            build_id: {
                let b: String = build_id.into();
                if b.is_empty() {
                    default_build_id()
                } else {
                    b
                }
            },
            versions: SUPPORTED_VERSIONS,
            timing: self.timing,
            listeners: Vec::new(),
        };
        let conn = Conn::new(self.chan).context(|| "setting up the successor channel".into())?;
        let waker = Waker::new().context(|| "creating the successor's waker".into())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                machine: handoff_proto::Successor::new(cfg, now),
                conn,
                timing: self.timing,
                received: Vec::new(),
                lock: None,
                listeners_done: false,
                begun: None,
                committed: None,
                failed: None,
            }),
            changed: Condvar::new(),
            waker,
        });
        let pump = Arc::clone(&shared);
        let poll_fd = rustix::io::fcntl_dupfd_cloexec(shared.lock().conn.fd(), 3)
            .map_err(std::io::Error::from)
            .context(|| "duplicating the successor channel".into())?;
        thread::Builder::new()
            .name("handoff-successor".into())
            .spawn(move || pump.pump(poll_fd))
            .context(|| "starting the successor thread".into())?;
        drop(shared.wait_for(|s| s.listeners_done)?);
        Ok(HandshookSuccessor { shared })
    }
}

impl HandshookSuccessor {
    /// Block until the incumbent has drained, sealed and released the data-directory lock
    /// (`Begin`), or the handoff failed.
    pub fn wait_for_begin(self) -> Result<BegunSuccessor> {
        let (handoff, seal) = {
            let s = self.shared.wait_for(|s| s.begun.is_some())?;
            s.begun.clone().expect("waited for it")
        };
        log!(
            ROLE,
            "handoff {handoff}: begun; the data directory is ours to open"
        );
        Ok(BegunSuccessor {
            shared: self.shared,
            seal,
            handoff,
        })
    }

    /// The names of the listeners received, in order.
    pub fn listener_names(&self) -> Vec<String> {
        self.shared
            .lock()
            .received
            .iter()
            .map(|h| h.name.clone())
            .collect()
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

    fn take_kind(&mut self, name: &str, kind: ListenerKind) -> Option<OwnedFd> {
        let s = self.shared.lock();
        let h = s
            .received
            .iter()
            .find(|h| h.name == name && h.kind == kind)?;
        // The library keeps its own copy for the incumbent this process becomes.
        let fd = rustix::io::fcntl_dupfd_cloexec(&h.fd, 3).ok()?;
        // Blocking, as std's types expect. The incumbent has drained and sealed by now (this
        // is after `Begin`); if the handoff still rolls back, an incumbent that wants
        // non-blocking accepts sets it again in `resume_after_abort` (the mode is shared).
        sockcheck::normalise(fd.as_fd()).ok()?;
        Some(fd)
    }

    /// The TCP listener named `name` (`None`: no such listener, or not TCP). Each call gives
    /// a new descriptor for the same socket, in blocking mode.
    ///
    /// `O_NONBLOCK` is a property of the socket's open file description, shared by every
    /// process holding the listener (supervisor, incumbent, successor): set the mode your
    /// accept loop needs after taking it, as async runtimes do when they register a socket.
    pub fn take_listener(&mut self, name: &str) -> Option<std::net::TcpListener> {
        self.take_kind(name, ListenerKind::Tcp).map(Into::into)
    }

    /// The UDP socket named `name`.
    pub fn take_udp(&mut self, name: &str) -> Option<std::net::UdpSocket> {
        self.take_kind(name, ListenerKind::Udp).map(Into::into)
    }

    /// The Unix stream listener named `name`.
    pub fn take_unix(&mut self, name: &str) -> Option<std::os::unix::net::UnixListener> {
        self.take_kind(name, ListenerKind::UnixStream)
            .map(Into::into)
    }

    /// The Unix datagram socket named `name`.
    pub fn take_unix_datagram(&mut self, name: &str) -> Option<std::os::unix::net::UnixDatagram> {
        self.take_kind(name, ListenerKind::UnixDatagram)
            .map(Into::into)
    }

    /// Declare ready and, once the supervisor has committed, become the incumbent: bind the
    /// control socket at `socket_path` (replacing the old incumbent's atomically) with `lock`.
    ///
    /// `lock` must be this data directory's lock, taken after [`HandshookSuccessor::wait_for_begin`]:
    /// it is what lets the protocol send `Ready`. Before the commit is acknowledged, the lock
    /// record is marked committed through it. Blocks until the commit, or returns the reason
    /// the handoff was aborted (the process is then exiting, see the module docs).
    pub fn announce_and_bind(
        self,
        readiness: ReadinessSnapshot,
        socket_path: &Path,
        lock: DataDirLock,
    ) -> Result<Incumbent> {
        let now = Instant::now();
        {
            let mut s = self.shared.lock();
            let previous = lock.previous();
            s.lock = Some(lock);
            s.machine
                .handle_lock(now, LockResult::Acquired { previous })
                .map_err(|e| Error::Protocol(e.to_string()))?;
            s.drive(now);
            s.machine
                .ready(now, readiness)
                .map_err(|e| Error::Protocol(e.to_string()))?;
            s.drive(now);
        }
        self.shared.waker.wake();
        let (lock, received, handoff) = {
            let mut s = self.shared.wait_for(|s| s.committed.is_some())?;
            let handoff = s.committed.expect("waited for it");
            let lock = s
                .lock
                .take()
                .expect("the lock stays with the state until commit");
            (lock, std::mem::take(&mut s.received), handoff)
        };
        log!(
            ROLE,
            "handoff {handoff}: committed; binding {}",
            socket_path.display()
        );
        Incumbent::new(socket_path, lock, received)
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
    machine: handoff_proto::Successor,
    conn: Conn,
    timing: Timing,
    received: Vec<Held>,
    lock: Option<DataDirLock>,
    listeners_done: bool,
    begun: Option<(HandoffId, SealReport)>,
    committed: Option<HandoffId>,
    failed: Option<AbortReason>,
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

    /// The background thread: read the channel, keep time, perform the machine's outputs,
    /// until committed.
    fn pump(&self, fd: OwnedFd) {
        let mut buf = Vec::new();
        loop {
            let deadline = {
                let s = self.lock();
                if s.committed.is_some() {
                    return;
                }
                s.machine.poll_timeout()
            };
            let mut fds = [
                PollFd::new(&fd, PollFlags::IN),
                PollFd::from_borrowed_fd(self.waker.fd(), PollFlags::IN),
            ];
            if let Err(e) = wait(&mut fds, deadline) {
                fatal(&format!("poll: {e}"));
            }
            let (chan_ready, wake_ready) = (readable(&fds[0]), readable(&fds[1]));
            if wake_ready {
                self.waker.clear();
            }
            let now = Instant::now();
            let mut s = self.lock();
            if chan_ready {
                buf.clear();
                let status = s.conn.read_available(&mut buf);
                if !buf.is_empty() {
                    if let Err(e) = s.machine.handle_bytes(now, &buf) {
                        log!(ROLE, "supervisor channel: {e}");
                    }
                    s.drive(now);
                }
                match status {
                    Ok(ReadStatus::Open) => {}
                    Ok(ReadStatus::Closed) => s.machine.handle_closed(now),
                    Err(e) => {
                        log!(ROLE, "supervisor channel: {e}");
                        s.machine.handle_closed(now);
                    }
                }
            }
            if deadline.is_some_and(|d| d <= now) || chan_ready {
                s.machine.handle_timeout(now);
            }
            s.drive(now);
            drop(s);
            self.changed.notify_all();
        }
    }
}

impl State {
    /// Perform every output the machine has, in order.
    fn drive(&mut self, now: Instant) {
        while let Some(out) = self.machine.poll_output() {
            match out {
                SuccessorOutput::Send(frame) => {
                    let sent = frame
                        .encode()
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                        .and_then(|b| self.conn.send(&b, &[], self.timing.peer_silence));
                    if let Err(e) = sent {
                        log!(ROLE, "sending {}: {e}", frame.message.kind());
                        self.machine.handle_closed(now);
                    }
                }
                SuccessorOutput::TakeListeners { batch } => {
                    if let Err(why) = self.take_listeners(&batch) {
                        self.machine.handle_listener_error(now, why);
                    } else if self.machine.listeners_received() {
                        self.listeners_done = true;
                    }
                }
                SuccessorOutput::AcquireLock => {
                    // `Begin` arrived. The application takes the lock (after `wait_for_begin`)
                    // and hands it to `announce_and_bind`, which feeds the result.
                    if let Some((h, seal)) = self.machine.begin() {
                        self.begun = Some((h, seal.clone()));
                    }
                }
                SuccessorOutput::Begun { handoff, seal } => {
                    // Fed from `announce_and_bind`; `begun` was recorded at `Begin`.
                    let _ = (handoff, seal);
                }
                SuccessorOutput::MarkCommitted { handoff } => {
                    let marked = match self.lock.as_mut() {
                        Some(l) => l.mark_committed(handoff),
                        None => Err(std::io::Error::other("no lock held")),
                    };
                    if let Err(e) = marked {
                        // Without the mark an incumbent that lost the supervisor could take
                        // the data back: never acknowledge the commit.
                        fatal(&format!(
                            "handoff {handoff}: cannot mark the lock record committed: {e}"
                        ));
                    }
                }
                SuccessorOutput::Committed { handoff } => {
                    self.committed = Some(handoff);
                }
                SuccessorOutput::Exit { reason } => {
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

    fn take_listeners(
        &mut self,
        batch: &[handoff_proto::ListenerInfo],
    ) -> std::result::Result<(), String> {
        let fds = self.conn.take_fds(batch.len()).ok_or_else(|| {
            format!(
                "{} listeners announced but fewer descriptors arrived",
                batch.len()
            )
        })?;
        for (info, fd) in batch.iter().zip(fds) {
            // Checked now, but left in whatever blocking mode it is: `O_NONBLOCK` lives on the
            // open file description, shared with the incumbent, which may still be serving.
            // `take_*` sets blocking mode once the incumbent has stopped (after `Begin`).
            sockcheck::check(fd.as_fd(), info.kind)
                .map_err(|e| format!("listener {:?}: {e}", info.name))?;
            self.received.push(Held {
                name: info.name.clone(),
                kind: info.kind,
                fd,
            });
        }
        Ok(())
    }
}

/// The successor cannot go on safely: exit without touching the data.
fn fatal(msg: &str) -> ! {
    log!(ROLE, "{msg}; exiting with status {EXIT_ABORTED}");
    std::process::exit(EXIT_ABORTED)
}
