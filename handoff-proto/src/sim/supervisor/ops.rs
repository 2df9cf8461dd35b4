//! The supervisor harness's ops: `Op`, decoded by `arbitrary` from a fuzzer's bytes (the
//! committed corpus is in this encoding: do not reorder variants), and `SupOp`, the
//! harness's own input, which property tests draw with proptest strategies.

use std::time::Duration;

use arbitrary::Arbitrary;

use super::super::Id;
use super::{INCUMBENT, SUCCESSORS};
use crate::wire::{DaemonStatus, HelloAck, Message, PeerRole};
use crate::{
    DrainReport, HandoffSpec, ListenerInfo, Peer, Pid, ReadinessSnapshot, SealReport, StateSnapshot,
};

/// One input, as the fuzzer chooses it.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum Op {
    /// A handoff is triggered.
    Trigger {
        /// Drain grace.
        drain_grace_ms: u16,
        /// Deadline.
        deadline_ms: u16,
    },
    /// A spawn report for a process never seen before.
    SpawnedFresh,
    /// A spawn failed.
    SpawnFailed(String),
    /// The connect to the control socket succeeded.
    Connected,
    /// It failed.
    ConnectFailed(String),
    /// A message from the successor.
    FromSuccessor {
        /// What.
        msg: SuccMsg,
        /// Through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// A message from the incumbent.
    FromIncumbent {
        /// What.
        msg: IncMsg,
        /// Through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// Any message from either.
    Msg {
        /// From.
        peer: Peer,
        /// What.
        msg: Message,
        /// Through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// Raw bytes from either.
    Bytes(Peer, Vec<u8>),
    /// A channel closed.
    Closed(Peer),
    /// One of the pids messages name exited.
    Exited(PidSel),
    /// One of the pids the harness has seen exited.
    ExitedKnown(u8),
    /// The journal record is durable.
    JournalWritten,
    /// The journal write failed.
    JournalFailed(String),
    /// A listener check failed.
    ListenerError(String),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u16),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating environment performs one pending obligation.
    Honest(u8),
}

/// One of the pids random messages name: the incumbent, a successor, or a stranger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub struct PidSel(pub u8);

impl PidSel {
    /// The pid.
    pub fn get(self) -> Pid {
        match self.0 % 5 {
            0 => INCUMBENT,
            4 => 300,
            i => SUCCESSORS[usize::from(i - 1)],
        }
    }
}

/// A message from a successor, mostly with a meaning for the supervisor.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum SuccMsg {
    /// `HelloAck` from one of the successor pids, version 1 unless `version` is given.
    HelloAck {
        /// Which successor pid.
        pid: u8,
        /// Another version.
        version: Option<u16>,
    },
    /// `ListenersAck` of `n % 4`, or of 300 when `n % 5 == 4`.
    ListenersAck(u8),
    /// `Ready`.
    Ready(Id, ReadinessSnapshot),
    /// `CommitAck`.
    CommitAck(Id),
    /// Anything at all.
    Any(Message),
}

/// A message from an incumbent, mostly with a meaning for the supervisor.
#[derive(Clone, Debug, PartialEq, Arbitrary)]
pub enum IncMsg {
    /// `HelloAck` (status `Serving` unless given).
    HelloAck(PidSel, Option<DaemonStatus>),
    /// `Drained`.
    Drained(Id, DrainReport),
    /// `DrainFailed`.
    DrainFailed(Id, String),
    /// `Sealed`.
    Sealed(Id, SealReport),
    /// `SealFailed`.
    SealFailed(Id, String),
    /// `CommitAck`.
    CommitAck(Id),
    /// `Resumed`.
    Resumed(Id, StateSnapshot),
    /// `ResumeFailed`.
    ResumeFailed(Id, String),
    /// `Listeners`.
    Listeners(Vec<ListenerInfo>),
    /// Anything at all.
    Any(Message),
}

impl SuccMsg {
    fn into_message(self) -> Message {
        match self {
            SuccMsg::HelloAck { pid, version } => Message::HelloAck(HelloAck {
                role: PeerRole::Successor,
                version: version.unwrap_or(1),
                pid: SUCCESSORS[usize::from(pid % 3)],
                build_id: "new".into(),
                status: DaemonStatus::Successor,
            }),
            SuccMsg::ListenersAck(n) => Message::ListenersAck {
                count: if n % 5 == 4 { 300 } else { u32::from(n % 4) },
            },
            SuccMsg::Ready(h, readiness) => Message::Ready {
                handoff: h.get(),
                readiness,
            },
            SuccMsg::CommitAck(h) => Message::CommitAck { handoff: h.get() },
            SuccMsg::Any(m) => m,
        }
    }
}

impl IncMsg {
    fn into_message(self) -> Message {
        match self {
            IncMsg::HelloAck(pid, status) => Message::HelloAck(HelloAck {
                role: PeerRole::Incumbent,
                version: 1,
                pid: pid.get(),
                build_id: "old".into(),
                status: status.unwrap_or(DaemonStatus::Serving),
            }),
            IncMsg::Drained(h, report) => Message::Drained {
                handoff: h.get(),
                report,
            },
            IncMsg::DrainFailed(h, reason) => Message::DrainFailed {
                handoff: h.get(),
                reason,
            },
            IncMsg::Sealed(h, report) => Message::Sealed {
                handoff: h.get(),
                report,
            },
            IncMsg::SealFailed(h, reason) => Message::SealFailed {
                handoff: h.get(),
                reason,
            },
            IncMsg::CommitAck(h) => Message::CommitAck { handoff: h.get() },
            IncMsg::Resumed(h, snapshot) => Message::Resumed {
                handoff: h.get(),
                snapshot,
            },
            IncMsg::ResumeFailed(h, reason) => Message::ResumeFailed {
                handoff: h.get(),
                reason,
            },
            IncMsg::Listeners(batch) => Message::Listeners { batch },
            IncMsg::Any(m) => m,
        }
    }
}

/// The harness's input (property tests draw these; `Op` converts to it).
#[derive(Clone, Debug)]
pub enum SupOp {
    /// A handoff is triggered.
    Trigger(HandoffSpec),
    /// The successor was spawned with this pid.
    Spawned(Pid),
    /// The successor was spawned with a fresh pid.
    SpawnedFresh,
    /// The spawn failed.
    SpawnFailed(String),
    /// The connection the machine asked for is up.
    Connected,
    /// The connection failed.
    ConnectFailed(String),
    /// A message from a daemon.
    Msg {
        /// From whom.
        peer: Peer,
        /// What.
        msg: Message,
        /// Framed as a peer would, through `handle_bytes` (else `handle_message`).
        framed: bool,
    },
    /// Raw bytes from a daemon.
    Bytes(Peer, Vec<u8>),
    /// The driver saw a daemon's connection close.
    Closed(Peer),
    /// A process exited.
    Exited(Pid),
    /// A known process exited (index into the known pids, modulo their number).
    ExitedKnown(usize),
    /// The journal write the machine asked for is durable.
    JournalWritten,
    /// The journal write failed.
    JournalFailed(String),
    /// The driver could not pass a listener.
    ListenerError(String),
    /// Let this many milliseconds pass, then `handle_timeout`.
    Advance(u64),
    /// Jump to the machine's next timeout.
    AdvanceToTimer,
    /// The cooperating daemons/driver perform one pending obligation.
    Honest(u8),
}

/// The harness op a fuzzer's `Op` stands for.
pub fn internal(op: Op) -> SupOp {
    match op {
        Op::Trigger {
            drain_grace_ms,
            deadline_ms,
        } => SupOp::Trigger(HandoffSpec {
            drain_grace: Duration::from_millis(u64::from(drain_grace_ms)),
            deadline: Duration::from_millis(u64::from(deadline_ms)),
        }),
        Op::SpawnedFresh => SupOp::SpawnedFresh,
        Op::SpawnFailed(s) => SupOp::SpawnFailed(s),
        Op::Connected => SupOp::Connected,
        Op::ConnectFailed(s) => SupOp::ConnectFailed(s),
        Op::FromSuccessor { msg, framed } => SupOp::Msg {
            peer: Peer::Successor,
            msg: msg.into_message(),
            framed,
        },
        Op::FromIncumbent { msg, framed } => SupOp::Msg {
            peer: Peer::Incumbent,
            msg: msg.into_message(),
            framed,
        },
        Op::Msg { peer, msg, framed } => SupOp::Msg { peer, msg, framed },
        Op::Bytes(p, b) => SupOp::Bytes(p, b),
        Op::Closed(p) => SupOp::Closed(p),
        Op::Exited(p) => SupOp::Exited(p.get()),
        Op::ExitedKnown(i) => SupOp::ExitedKnown(usize::from(i)),
        Op::JournalWritten => SupOp::JournalWritten,
        Op::JournalFailed(s) => SupOp::JournalFailed(s),
        Op::ListenerError(s) => SupOp::ListenerError(s),
        Op::Advance(ms) => SupOp::Advance(u64::from(ms)),
        Op::AdvanceToTimer => SupOp::AdvanceToTimer,
        Op::Honest(sel) => SupOp::Honest(sel),
    }
}
