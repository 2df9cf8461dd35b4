//! The journal at the reference supervisor's start.
//!
//! The library's recovery refuses a journal that does not decode and touches nothing, which is
//! right for an embedding application that can ask its operator. Here, under systemd, refusing
//! would only make systemd restart the supervisor into the same refusal, with the daemon never
//! started. So before the first recovery:
//!
//! - a journal that does not decode (bad magic, checksum, truncated, unknown version) is moved
//!   aside to `<journal>.corrupt-<unix time>`, one line says what was wrong and where it went,
//!   and recovery proceeds as with no journal: it adopts whichever daemon answers the control
//!   socket, or starts one cold, which serves only once it holds the data-directory lock. The
//!   journal only says which handoff an answer resolves; who serves is decided by the control
//!   socket and the lock, so nothing is unsafe about going on without it;
//! - a journal that is not safe to trust (a link, a FIFO, a device, another uid's, writable by
//!   others, too large, in a directory others may write) stops the start with one line naming
//!   the problem and the fix, and exit status [`EX_CONFIG`] (78), which the systemd unit lists
//!   in `RestartPreventExitStatus=`: restarting cannot fix it, the operator must.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use handoff_engine::sys::journal_file::{self, JournalFileError};

use crate::config::Config;

/// The exit status of a start refused because of the journal's file: `EX_CONFIG` of
/// `sysexits.h`.
pub const EX_CONFIG: u8 = 78;

/// Why the supervisor must not start: the exit status and the one line to print.
#[derive(Debug)]
pub struct Refusal {
    /// The process's exit status.
    pub status: u8,
    /// What is wrong and what to do.
    pub message: String,
}

/// Check the journal before the first recovery (see the module's documentation). Does nothing
/// if another supervisor answers on the trigger socket: the journal is that one's, and
/// [`Server::start`](crate::server::Server::start) refuses to start.
pub fn prepare(cfg: &Config) -> Result<(), Refusal> {
    if another_supervisor(&cfg.trigger_socket) {
        return Ok(());
    }
    match journal_file::read(&cfg.journal) {
        Ok(_) => Ok(()),
        Err(JournalFileError::Decode { source, .. }) => {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside =
                journal_file::set_aside(&cfg.journal, &format!("corrupt-{secs}")).map_err(|e| {
                    Refusal {
                        status: 1,
                        message: format!("cannot move the corrupt journal aside: {e}"),
                    }
                })?;
            crate::server::log(format!(
                "journal {} is corrupt ({source}): moved it to {}; recovering without it: the \
                 daemon that answers on the control socket {} is adopted, else one is started \
                 cold, which serves once it holds the data-directory lock",
                cfg.journal.display(),
                aside.display(),
                cfg.control_socket.display()
            ));
            Ok(())
        }
        Err(JournalFileError::Unsafe(u)) => Err(Refusal {
            status: EX_CONFIG,
            message: format!("journal {u}"),
        }),
        Err(e) => Err(Refusal {
            status: 1,
            message: e.to_string(),
        }),
    }
}

/// Whether a process listens on `trigger` (connected, or its accept queue is full).
fn another_supervisor(trigger: &Path) -> bool {
    match handoff_engine::sys::conn::connect_nonblocking(trigger) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}
