//! The error type of the public API.
//!
//! Every variant says what happened in words an operator can act on; none of them means that
//! anything was lost. A hook (`drain`, `seal`, `resume_after_abort`) that fails returns one of
//! these, usually through `?` on an [`io::Error`] or with [`Error::msg`], and the handoff
//! rolls back with the message as its reason.

use std::io;
use std::path::PathBuf;

use handoff_proto::{AbortReason, Busy};

use crate::inherit::InheritError;
use crate::sys::journal_file::JournalFileError;
use crate::sys::lock::LockError;
use crate::sys::supervisor_lock::SupervisorLockError;

/// `Result` with [`Error`], as used by every fallible call of the API and by the
/// drivers' `Drainable` hooks.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed; `context` says what the library was doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path or descriptor involved.
        context: String,
        /// The system error.
        source: io::Error,
    },
    /// The data-directory lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The supervisor lock could not be taken: another supervisor runs on this journal, or
    /// the lock file is unsafe.
    #[error(transparent)]
    SupervisorLock(#[from] SupervisorLockError),
    /// The inherited listeners (`LISTEN_FDS`) are unusable.
    #[error(transparent)]
    Inherit(#[from] InheritError),
    /// The supervisor's journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalFileError),
    /// The peer broke the protocol, or the two builds cannot talk.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The handoff was abandoned; for a successor this means: exit without touching the data.
    #[error("handoff aborted: {0}")]
    Aborted(AbortReason),
    /// A handoff or a recovery is already running.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The environment says this process is a successor, but its channel is unusable.
    #[error("successor channel {what}: {detail}")]
    Channel {
        /// Which part (`HANDOFF_CHANNEL_FD`, the descriptor).
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// Nothing serves at the control socket and the supervisor cannot start the daemon.
    #[error("nobody serves at {}: {detail}", path.display())]
    NobodyServes {
        /// The control socket.
        path: PathBuf,
        /// Why no daemon could be found or started.
        detail: String,
    },
    /// An argument or a configuration value is unusable.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// What was given.
        what: String,
        /// Why it cannot be used.
        detail: String,
    },
    /// An application hook failed, or any other error an application reports.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An error from application code, from anything printable:
    /// `Err(Error::msg(format!("shard {n} is corrupt")))`.
    pub fn msg(message: impl std::fmt::Display) -> Error {
        Error::Other(message.to_string())
    }

    /// A system error with what the library was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A value the library was given or read that it cannot use: `what`, and why.
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            context: "I/O".into(),
            source,
        }
    }
}

impl From<handoff_proto::Error> for Error {
    fn from(e: handoff_proto::Error) -> Error {
        Error::Protocol(e.to_string())
    }
}

/// Adds what was being done to an `io::Result`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
