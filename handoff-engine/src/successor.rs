//! The successor's engine: the channel to the supervisor, the listeners it brings, the lock.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    AbortReason, DaemonConfig, HandoffId, ListenerInfo, LockResult, ReadinessSnapshot, SealReport,
    SuccessorOutput, Timing,
};

use super::Interest;
use crate::crash;
use crate::error::{Error, Result};
use crate::held::Held;
use crate::listener::ListenerSet;
use crate::log::log;
use crate::sys::conn::{Conn, ReadStatus};
use crate::sys::lock::DataDirLock;
use crate::sys::sockcheck;

const ROLE: &str = "successor";

/// Exit status of a successor whose handoff was aborted (`EX_TEMPFAIL`).
pub const EXIT_ABORTED: i32 = 75;

/// What the application must know about its takeover, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SuccessorEvent {
    /// Every listener arrived and was checked.
    ListenersReceived,
    /// The incumbent sealed and released the lock: take the lock, open the data, then
    /// [`SuccessorEngine::ready`].
    Begun {
        /// The handoff.
        handoff: HandoffId,
        /// What the incumbent sealed.
        seal: SealReport,
    },
    /// Committed, and marked so in the lock record: this process is the incumbent now
    /// ([`SuccessorEngine::into_parts`]).
    Committed {
        /// The handoff.
        handoff: HandoffId,
    },
    /// The handoff failed for this process: exit without touching the data (the exit frees
    /// the lock for the incumbent).
    Aborted {
        /// Why.
        reason: AbortReason,
    },
}

/// The successor's non-blocking core (see the [module docs](super)). Its one descriptor is
/// the channel; the interest key is `()`.
#[derive(Debug)]
pub struct SuccessorEngine {
    machine: handoff_proto::Successor,
    build_id: String,
    conn: Option<Conn>,
    received: Vec<Held>,
    lock: Option<DataDirLock>,
    events: VecDeque<SuccessorEvent>,
    buf: Vec<u8>,
    done: bool,
}

impl SuccessorEngine {
    /// The engine of a process started as a successor, on its channel (see
    /// [`detect_role`](crate::role::detect_role)).
    pub fn new(
        chan: UnixStream,
        build_id: String,
        timing: Timing,
        now: Instant,
    ) -> io::Result<SuccessorEngine> {
        let cfg = DaemonConfig {
            pid: std::process::id(),
            build_id: build_id.clone(),
            versions: SUPPORTED_VERSIONS,
            timing,
            listeners: Vec::new(),
        };
        Ok(SuccessorEngine {
            machine: handoff_proto::Successor::new(cfg, now),
            build_id,
            // The supervisor sends the listeners it announced, and nothing else.
            conn: Some(Conn::new(chan)?.with_fd_budget(announced_listeners())),
            received: Vec::new(),
            lock: None,
            events: VecDeque::new(),
            buf: Vec::new(),
            done: false,
        })
    }

    /// The descriptor to watch now (none once committed or aborted).
    pub fn interests(&self) -> Vec<Interest<'_, ()>> {
        match (&self.conn, self.done) {
            (Some(c), false) => vec![Interest {
                key: (),
                fd: c.fd(),
                read: true,
                write: c.wants_write(),
            }],
            _ => Vec::new(),
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        self.machine.poll_timeout()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SuccessorEvent> {
        self.events.pop_front()
    }

    /// The channel is ready.
    pub fn ready(&mut self, now: Instant, readable: bool, writable: bool) {
        if self.done {
            return;
        }
        if writable {
            if let Some(Err(e)) = self.conn.as_mut().map(Conn::flush) {
                log!(ROLE, "supervisor channel: {e}");
                self.machine.handle_closed(now);
            }
        }
        if readable {
            if let Some(conn) = self.conn.as_mut() {
                self.buf.clear();
                let status = conn.read_available(&mut self.buf);
                if !self.buf.is_empty() {
                    if let Err(e) = self.machine.handle_bytes(now, &self.buf) {
                        log!(ROLE, "supervisor channel: {e}");
                    }
                    self.perform(now);
                }
                match status {
                    Ok(ReadStatus::Open) => {}
                    Ok(ReadStatus::Closed) => self.machine.handle_closed(now),
                    Err(e) => {
                        log!(ROLE, "supervisor channel: {e}");
                        self.machine.handle_closed(now);
                    }
                }
            }
        }
        self.perform(now);
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.done {
            self.machine.handle_timeout(now);
            self.perform(now);
        }
    }

    /// The build id this successor answered with (the incumbent it becomes keeps it).
    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    /// The names of the listeners received so far, in order.
    pub fn listener_names(&self) -> Vec<String> {
        self.received.iter().map(|h| h.name.clone()).collect()
    }

    /// The listeners received, to take by name and type ([`ListenerSet::take`]): a new
    /// descriptor for each, in blocking mode; `None` before [`SuccessorEvent::Begun`] (the
    /// incumbent may still accept on them, and the mode is shared). The engine keeps its own
    /// copies for the incumbent this process becomes. A listener whose descriptor cannot be
    /// duplicated now (the descriptor limit) is left out.
    pub fn listeners(&self) -> Option<ListenerSet> {
        // Past `Begin` only: taking the lock (`begin`) or holding it.
        if self.machine.begin().is_none() && !self.machine.holds_lock() {
            return None;
        }
        let dup = |h: &Held| {
            let fd = rustix::io::fcntl_dupfd_cloexec(&h.fd, 3).ok()?;
            sockcheck::normalise(fd.as_fd()).ok()?;
            Some(Held {
                name: h.name.clone(),
                kind: h.kind,
                fd,
            })
        };
        Some(ListenerSet::from_held(self.received.iter().filter_map(dup)))
    }

    /// The application opened the data with `lock` held: declare ready. `lock` is what lets
    /// the protocol send `Ready`; the engine keeps it to mark the commit in the lock record.
    pub fn ready_with(
        &mut self,
        now: Instant,
        readiness: ReadinessSnapshot,
        lock: DataDirLock,
    ) -> Result<()> {
        // The lock is held and the application has opened the data; `Ready` is next.
        crash::point("successor.data_opened");
        let previous = lock.previous();
        self.lock = Some(lock);
        self.machine
            .handle_lock(now, LockResult::Acquired { previous })
            .map_err(|e| Error::Protocol(e.to_string()))?;
        self.perform(now);
        self.machine
            .ready(now, readiness)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        self.perform(now);
        Ok(())
    }

    /// After [`SuccessorEvent::Committed`]: the lock and the listeners, for the incumbent this
    /// process becomes. The channel closes.
    pub fn into_parts(mut self) -> Option<(DataDirLock, Vec<Held>)> {
        if !self.machine.is_committed() {
            return None;
        }
        let lock = self.lock.take()?;
        Some((lock, std::mem::take(&mut self.received)))
    }

    fn perform(&mut self, now: Instant) {
        while let Some(out) = self.machine.poll_output() {
            if self.done {
                continue;
            }
            match out {
                SuccessorOutput::Send(frame) => {
                    let Some(conn) = self.conn.as_mut() else {
                        continue;
                    };
                    let sent = frame
                        .encode()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                        .and_then(|b| conn.send(&b, &[]));
                    if let Err(e) = sent {
                        log!(ROLE, "sending {}: {e}", frame.message.kind());
                        self.machine.handle_closed(now);
                    } else if let Some(point) = sent_point(&frame.message) {
                        crash::point(point);
                    }
                }
                SuccessorOutput::TakeListeners { batch } => {
                    if let Err(why) = self.take_listeners(&batch) {
                        self.machine.handle_listener_error(now, why);
                    } else if self.machine.listeners_received() {
                        self.events.push_back(SuccessorEvent::ListenersReceived);
                    }
                }
                SuccessorOutput::AcquireLock => {
                    // `Begin` arrived. The application takes the lock and hands it to
                    // `ready_with`, which feeds the result.
                    if let Some((handoff, seal)) = self.machine.begin() {
                        crash::point("successor.begun");
                        let seal = seal.clone();
                        log!(
                            ROLE,
                            "handoff {handoff}: begun; the data directory is ours to open"
                        );
                        self.events
                            .push_back(SuccessorEvent::Begun { handoff, seal });
                    }
                }
                SuccessorOutput::Begun { .. } => {}
                SuccessorOutput::MarkCommitted { handoff } => {
                    let marked = match self.lock.as_mut() {
                        Some(l) => l.mark_committed(handoff),
                        None => Err(io::Error::other("no lock held")),
                    };
                    if let Err(e) = marked {
                        // Without the mark, an incumbent that lost the supervisor could take
                        // the data back: never acknowledge the commit.
                        let why = format!("cannot mark the lock record committed: {e}");
                        log!(ROLE, "handoff {handoff}: {why}");
                        self.abort(AbortReason::ProtocolViolation(why));
                    } else {
                        crash::point("successor.commit_marked");
                    }
                }
                SuccessorOutput::Committed { handoff } => {
                    log!(ROLE, "handoff {handoff}: committed");
                    self.done = true;
                    self.conn = None;
                    self.events.push_back(SuccessorEvent::Committed { handoff });
                }
                SuccessorOutput::Exit { reason } => {
                    log!(ROLE, "handoff aborted: {reason}");
                    self.abort(reason);
                }
            }
        }
    }

    fn abort(&mut self, reason: AbortReason) {
        self.done = true;
        self.conn = None;
        self.events.push_back(SuccessorEvent::Aborted { reason });
    }

    fn take_listeners(&mut self, batch: &[ListenerInfo]) -> std::result::Result<(), String> {
        let conn = self.conn.as_mut().ok_or("channel closed")?;
        let fds = conn.take_fds(batch.len()).ok_or_else(|| {
            format!(
                "{} listeners announced but fewer descriptors arrived",
                batch.len()
            )
        })?;
        for (info, fd) in batch.iter().zip(fds) {
            // Checked now, but left in whatever blocking mode it is: `O_NONBLOCK` lives on the
            // open file description, shared with the incumbent, which may still be serving.
            // `listeners` sets blocking mode once the incumbent has stopped (after `Begin`).
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

/// How many listeners the supervisor announced in `HANDOFF_LISTENER_COUNT`: the descriptors
/// the channel accepts. A supervisor that does not set it (an older build) is allowed as many
/// as a handoff can pass.
fn announced_listeners() -> usize {
    std::env::var(crate::sys::spawn::ENV_LISTENER_COUNT)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(crate::sys::conn::MAX_FD_BUDGET)
}

/// The crash point right after `message` went out, if there is one.
fn sent_point(message: &Message) -> Option<&'static str> {
    Some(match message {
        Message::HelloAck { .. } => "successor.hello_acked",
        Message::ListenersAck { .. } => "successor.listeners_received",
        Message::Ready { .. } => "successor.ready_sent",
        Message::CommitAck { .. } => "successor.commit_acked",
        _ => return None,
    })
}
