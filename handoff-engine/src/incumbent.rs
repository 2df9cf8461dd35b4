//! The incumbent's engine: the control socket, its connections, the lock.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    ConnId, DaemonConfig, DrainReport, HandoffId, IncumbentOutput, LockResult, SealReport,
    StateSnapshot,
};

use super::Interest;
use crate::config::IncumbentConfig;
use crate::crash;
use crate::held::Held;
use crate::log::log;
use crate::sys::conn::{Conn, ReadStatus};
use crate::sys::lock::{self, LockError};
use crate::sys::peercred::peer_credentials;

const ROLE: &str = "incumbent";

/// Most control connections open at once; more are refused until some close.
const MAX_CONNS: usize = 64;

/// How long the control socket is left alone after an `accept` error such as `EMFILE` (the
/// pending connection stays queued and the socket readable: polling it would spin).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Which descriptor of an [`IncumbentEngine`] is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IncumbentKey {
    /// The listening control socket.
    Control,
    /// An accepted control connection.
    Conn(ConnId),
}

/// What the application must do for the incumbent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncumbentEvent {
    /// Call the drain hook (stop accepting, finish in-flight work, fsync) by `deadline`, then
    /// [`IncumbentEngine::drained`].
    Drain {
        /// The handoff.
        handoff: HandoffId,
        /// When the drain grace ends.
        deadline: Instant,
    },
    /// Call the seal hook, then [`IncumbentEngine::sealed`]. The lock is released right after
    /// a successful seal: write nothing after it.
    Seal {
        /// The handoff.
        handoff: HandoffId,
    },
    /// The handoff was abandoned and the lock is ours again: reopen the writer, accept again,
    /// then [`IncumbentEngine::resumed`] with the state snapshot.
    Resume {
        /// The handoff.
        handoff: HandoffId,
    },
    /// A successor took over: stop serving and exit.
    Retired {
        /// The handoff.
        handoff: HandoffId,
    },
}

/// The incumbent's non-blocking core (see the [module docs](super)).
#[derive(Debug)]
pub struct IncumbentEngine {
    inc: IncumbentConfig,
    machine: handoff_proto::Incumbent,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    accept_paused_until: Option<Instant>,
    events: VecDeque<IncumbentEvent>,
    buf: Vec<u8>,
}

impl IncumbentEngine {
    /// The engine of a daemon that serves and holds the lock.
    pub fn new(inc: IncumbentConfig) -> IncumbentEngine {
        let cfg = DaemonConfig {
            pid: std::process::id(),
            build_id: inc.build_id.clone(),
            versions: SUPPORTED_VERSIONS,
            timing: inc.timing,
            listeners: inc.listeners.iter().map(Held::info).collect(),
        };
        IncumbentEngine {
            inc,
            machine: handoff_proto::Incumbent::serving(cfg),
            conns: BTreeMap::new(),
            next_conn: 0,
            accept_paused_until: None,
            events: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// Whether the application should exit when [`IncumbentEvent::Retired`] comes.
    pub fn exit_on_retire(&self) -> bool {
        self.inc.exit_on_retire
    }

    /// Whether the daemon serves normally (no handoff in progress).
    pub fn is_serving(&self) -> bool {
        self.machine.is_serving()
    }

    /// The descriptors to watch now.
    pub fn interests(&self) -> Vec<Interest<'_, IncumbentKey>> {
        let mut v = Vec::with_capacity(self.conns.len() + 1);
        if !self.accept_paused() {
            v.push(Interest {
                key: IncumbentKey::Control,
                fd: self.inc.control.as_fd(),
                read: true,
                write: false,
            });
        }
        for (id, c) in &self.conns {
            v.push(Interest {
                key: IncumbentKey::Conn(*id),
                fd: c.fd(),
                read: true,
                write: c.wants_write(),
            });
        }
        v
    }

    fn accept_paused(&self) -> bool {
        self.accept_paused_until.is_some_and(|t| t > Instant::now())
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let m = self.machine.poll_timeout();
        match (m, self.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing the application must do.
    pub fn poll_event(&mut self) -> Option<IncumbentEvent> {
        self.events.pop_front()
    }

    /// A watched descriptor is ready.
    pub fn ready(&mut self, now: Instant, key: IncumbentKey, readable: bool, writable: bool) {
        match key {
            IncumbentKey::Control if readable => self.accept(now),
            IncumbentKey::Control => {}
            IncumbentKey::Conn(id) => {
                if writable {
                    self.flush(now, id);
                }
                if readable {
                    self.read(now, id);
                }
            }
        }
        self.perform(now);
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        if self.machine.poll_timeout().is_some_and(|t| t <= now) {
            self.machine.handle_timeout(now);
        }
        self.perform(now);
    }

    /// The drain hook finished (`Err`: its message).
    pub fn drained(&mut self, now: Instant, result: Result<DrainReport, String>) {
        if let Err(e) = self.machine.handle_drained(now, result) {
            log!(ROLE, "internal: {e}");
        }
        self.perform(now);
    }

    /// The seal hook finished.
    pub fn sealed(&mut self, now: Instant, result: Result<SealReport, String>) {
        if result.is_ok() {
            // Sealed and fsynced by the hook; the lock is still held.
            crash::point("incumbent.sealed");
        }
        if let Err(e) = self.machine.handle_sealed(now, result) {
            log!(ROLE, "internal: {e}");
        }
        self.perform(now);
    }

    /// The resume hook finished, with the state snapshot on success.
    pub fn resumed(&mut self, now: Instant, result: Result<StateSnapshot, String>) {
        if let Err(e) = self.machine.handle_resumed(now, result) {
            log!(ROLE, "internal: {e}");
        }
        self.perform(now);
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let sock = match self.inc.control.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log!(
                        ROLE,
                        "accept on the control socket failed: {e}; retrying in {ACCEPT_PAUSE:?}"
                    );
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            };
            if let Err(why) = self.admit(&sock) {
                log!(ROLE, "refused control connection: {why}");
                continue;
            }
            // No descriptor budget: the incumbent needs none from a peer, and a connection
            // that sends one is closed at once (`read`).
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

    /// Whether this peer may talk to us: a uid the policy admits and, under a handoff
    /// supervisor, the holder of its supervisor lock.
    fn admit(&mut self, sock: &UnixStream) -> Result<(), String> {
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
        if let Some(admission) = self.inc.supervisor.as_mut() {
            admission
                .admit(sock.as_fd(), pid)
                .map_err(|why| format!("{why}: not the supervisor (uid {uid})"))?;
        }
        Ok(())
    }

    fn read(&mut self, now: Instant, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        self.buf.clear();
        let status = conn.read_available(&mut self.buf);
        if !self.buf.is_empty() {
            if let Err(e) = self.machine.handle_bytes(now, id, &self.buf) {
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

    fn flush(&mut self, now: Instant, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            if let Err(e) = c.flush() {
                log!(ROLE, "control connection {}: {e}", id.0);
                self.write_failed(now, id);
            }
        }
    }

    /// Writing to `id` failed: the peer closed its end, or is gone. What it sent before that
    /// is still ours to read (a last `Commit` or `Abort`): read it, then close.
    fn write_failed(&mut self, now: Instant, id: ConnId) {
        self.read(now, id);
        self.closed(now, id);
    }

    fn closed(&mut self, now: Instant, id: ConnId) {
        if self.conns.remove(&id).is_some() {
            // The machine may have closed it already (after a Refused): then it is unknown.
            if let Err(handoff_proto::Error::Peer(e)) = self.machine.handle_closed(now, id) {
                log!(ROLE, "control connection {}: peer misbehaved: {e}", id.0);
            }
        }
    }

    /// Perform every output the machine has, in order.
    fn perform(&mut self, now: Instant) {
        while let Some(out) = self.machine.poll_output() {
            match out {
                IncumbentOutput::Send { conn, frame } => {
                    let Some(c) = self.conns.get_mut(&conn) else {
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
                        .and_then(|bytes| c.send(&bytes, &fds));
                    if let Err(e) = sent {
                        log!(ROLE, "sending {} failed: {e}", frame.message.kind());
                        self.write_failed(now, conn);
                    } else if let Some(point) = sent_point(&frame.message) {
                        crash::point(point);
                    }
                }
                IncumbentOutput::Close { conn } => {
                    self.conns.remove(&conn);
                }
                IncumbentOutput::CallDrain { handoff, grace } => {
                    log!(ROLE, "handoff {handoff}: draining (grace {grace:?})");
                    crash::point("incumbent.drain_started");
                    self.events.push_back(IncumbentEvent::Drain {
                        handoff,
                        deadline: now + grace,
                    });
                }
                IncumbentOutput::CallSeal { handoff } => {
                    log!(ROLE, "handoff {handoff}: sealing");
                    self.events.push_back(IncumbentEvent::Seal { handoff });
                }
                IncumbentOutput::CallResume { handoff } => {
                    log!(ROLE, "handoff {handoff}: resuming");
                    self.events.push_back(IncumbentEvent::Resume { handoff });
                }
                IncumbentOutput::ReleaseLock(proof) => {
                    if let Some(l) = self.inc.lock.take() {
                        if let Err(e) = l.release() {
                            // Closing the descriptor (done by `release` in any case) unlocks.
                            log!(ROLE, "handoff {}: unlock: {e}", proof.handoff());
                        }
                    }
                    crash::point("incumbent.lock_released");
                }
                IncumbentOutput::AcquireLock => {
                    let result = match lock::try_acquire(&self.inc.lock_dir) {
                        Ok(acquired) => {
                            let r = acquired.lock_result();
                            self.inc.lock = Some(acquired.lock);
                            crash::point("incumbent.lock_reacquired");
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
                IncumbentOutput::KillLockHolder { pid } => {
                    let path = lock::lock_file_path(&self.inc.lock_dir);
                    match lock::kill_if_holder(pid, &path) {
                        Ok(true) => log!(
                            ROLE,
                            "successor {pid} held the lock past the deadline; killed it"
                        ),
                        Ok(false) => {
                            log!(ROLE, "pid {pid} no longer holds the lock; not killing it")
                        }
                        Err(e) => log!(ROLE, "not killing {pid}: {e}"),
                    }
                }
                IncumbentOutput::Retire { handoff } => {
                    log!(ROLE, "handoff {handoff} committed elsewhere; retiring");
                    self.events.push_back(IncumbentEvent::Retired { handoff });
                }
            }
        }
    }
}

/// The crash point right after `message` went out, if there is one.
fn sent_point(message: &Message) -> Option<&'static str> {
    Some(match message {
        Message::HelloAck { .. } => "incumbent.hello_acked",
        Message::Drained { .. } => "incumbent.drained_sent",
        Message::Sealed { .. } => "incumbent.sealed_sent",
        Message::CommitAck { .. } => "incumbent.commit_acked",
        Message::Resumed { .. } => "incumbent.resumed_sent",
        Message::Listeners { .. } => "incumbent.listeners_returned",
        _ => return None,
    })
}
