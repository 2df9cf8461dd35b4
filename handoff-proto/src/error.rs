//! Errors of the role machines.

use crate::types::{HandoffId, Pid};
use crate::wire::{DecodeError, NoCommonVersion, PeerRole};

/// What a role machine's `handle_*` call reports. The machine has already taken the safe action
/// (closed the session, aborted the handoff, resumed) before it returns one of these; the error
/// tells the driver what to log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke the protocol.
    #[error("peer misbehaved: {0}")]
    Peer(#[from] PeerMisbehaved),
    /// The driver or the application called the machine out of order.
    #[error("API misuse: {0}")]
    Misuse(#[from] Misuse),
}

/// Ways a peer can break the protocol. Each one ends the session it happened on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// Bytes that are not a valid frame.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// The versions do not overlap.
    #[error(transparent)]
    NoCommonVersion(#[from] NoCommonVersion),
    /// A message before the session was negotiated.
    #[error("{kind} received before Hello")]
    NotNegotiated {
        /// The message kind.
        kind: &'static str,
    },
    /// A message the current phase does not allow.
    #[error("{kind} is not allowed while {phase}")]
    UnexpectedMessage {
        /// The message kind.
        kind: &'static str,
        /// Where the receiver was.
        phase: &'static str,
    },
    /// A message about another handoff than the current one.
    #[error("message for handoff {got}, but handoff {expected} is in progress")]
    WrongHandoff {
        /// The current handoff.
        expected: HandoffId,
        /// The message's handoff.
        got: HandoffId,
    },
    /// A peer speaking a role it cannot have on this channel.
    #[error("a {got:?} cannot speak on this channel")]
    WrongRole {
        /// The role it claimed.
        got: PeerRole,
    },
    /// The successor's HelloAck names another pid than the one spawned.
    #[error("successor says it is pid {got}, but pid {expected} was spawned")]
    PidMismatch {
        /// The pid spawned.
        expected: Pid,
        /// The pid claimed.
        got: Pid,
    },
    /// The incumbent's HelloAck names another pid than the process that answers: the one the
    /// driver found at the other end of the control connection (`SO_PEERCRED`).
    #[error("the control socket is served by pid {peer}, but its HelloAck says pid {claimed}")]
    PeerPidMismatch {
        /// The pid of the process at the other end of the connection.
        peer: Pid,
        /// The pid the HelloAck claimed.
        claimed: Pid,
    },
    /// More listeners arrived than announced, or a batch was too large.
    #[error("listener batch does not match the announcement: {0}")]
    ListenerCount(String),
    /// The peer refused the session.
    #[error("peer refused: {0}")]
    Refused(String),
}

/// The driver or the application fed the machine something it did not ask for. This is a bug
/// in the caller (or a race an asynchronous driver must expect, such as a spawn finishing after
/// its handoff ended); the machine's state is unchanged, though it may ask to clean up (kill an
/// unwanted process).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Misuse {
    /// A connection id the machine does not know.
    #[error("unknown connection {0}")]
    UnknownConnection(u64),
    /// A connection id that is already open.
    #[error("connection {0} is already open")]
    DuplicateConnection(u64),
    /// A hook result when that hook was not called.
    #[error("{hook} result but no {hook} hook is pending")]
    NoHookPending {
        /// The hook.
        hook: &'static str,
    },
    /// A lock result when no lock was requested.
    #[error("lock result but no lock acquisition is pending")]
    NoLockPending,
    /// An input that only makes sense in another phase.
    #[error("{input} is not possible while {phase}")]
    WrongPhase {
        /// The input.
        input: &'static str,
        /// The machine's phase.
        phase: &'static str,
    },
}
