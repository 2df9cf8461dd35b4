//! The supervisor's plain data: how to start a daemon ([`SpawnSpec`]), how a handoff ended
//! ([`HandoffOutcome`]), what a recovery found ([`Recovery`]), and the forms a listener may be
//! handed in ([`ListenerSource`]). Both drivers' supervisors take and return these.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use handoff_proto::journal::Resolution;
use handoff_proto::{AbortReason, HandoffId, PhaseTimes, Pid, Timing, Verdict};

use crate::sys::spawn;

/// How to start a daemon binary, and the handoff's time limits.
///
/// **The binary** is opened once and checked, and the child executes that very file: a
/// regular file with an execute bit, it and its directory owned by root or by the supervisor's
/// effective user and writable by neither group nor others (after symlinks are resolved).
/// Anything else is refused before a process is started; the handoff then rolls back. A
/// script (`#!`) runs, with `$0` the `/dev/fd/N` its interpreter reads it through (that one
/// descriptor of the script is inherited).
///
/// **The environment** of a successor and of a daemon started cold is built, not inherited
/// whole. It holds exactly:
/// - from the supervisor's own environment, only [`PATH`, `LANG`, `LC_*`, `TZ` and
///   `HANDOFF_*`](spawn::DAEMON_ENV) (`HANDOFF_LOG`, and the crash points' variables);
/// - then [`env`](Self::env), in order: what the daemon needs besides (to pass on one of the
///   supervisor's own variables, copy it here from `std::env::var_os`);
/// - then the variables the spawn manages, which override both: for a successor
///   `HANDOFF_ROLE=successor`, `HANDOFF_CHANNEL_FD` and `HANDOFF_LISTENER_COUNT`, and no
///   `LISTEN_*`; for a cold start `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the
///   daemon's pid; removed when there are no listeners), and no `HANDOFF_ROLE`,
///   `HANDOFF_CHANNEL_FD` or `HANDOFF_LISTENER_COUNT`.
///
/// Nothing else of the supervisor's environment reaches the daemon: not `HOME` or `USER`, not
/// a secret the supervisor was started with, not systemd's `NOTIFY_SOCKET` (the supervisor
/// speaks `sd_notify` itself). Descriptors: stdin, stdout and stderr are the supervisor's; a
/// successor gets its channel, a cold start its listeners at 3, 4, …; nothing else the library
/// opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The executable. Empty (the default) is refused when spawning.
    pub binary: PathBuf,
    /// Its arguments (not including the program name).
    pub args: Vec<OsString>,
    /// Environment variables for the daemon, on top of the few it inherits from the
    /// supervisor (see above).
    pub env: Vec<(OsString, OsString)>,
    /// How long the incumbent's drain may take. Default [`Timing::drain_grace`].
    pub drain_grace: Duration,
    /// The whole handoff must commit within this, or it is rolled back. Default
    /// [`Timing::deadline`].
    pub deadline: Duration,
}

impl Default for SpawnSpec {
    fn default() -> Self {
        SpawnSpec {
            binary: PathBuf::new(),
            args: Vec::new(),
            env: Vec::new(),
            drain_grace: Timing::default().drain_grace,
            deadline: Timing::default().deadline,
        }
    }
}

impl SpawnSpec {
    pub(crate) fn command(&self) -> spawn::Command {
        spawn::Command {
            binary: self.binary.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            inherit_env: spawn::InheritEnv::Daemon,
            inherit_stdio: true,
        }
    }
}

/// How a handoff ended.
#[derive(Debug)]
pub struct HandoffOutcome {
    /// The handoff.
    pub handoff_id: HandoffId,
    /// Whether the successor took over.
    pub committed: bool,
    /// The successor process, when it took over (it is this supervisor's child: wait on it).
    pub child: Option<Child>,
    /// The daemon serving now: the successor after a commit, the incumbent after a rollback;
    /// `None` when nobody could be confirmed serving (the next call recovers).
    pub serving: Option<Pid>,
    /// Why the handoff did not commit.
    pub abort_reason: Option<AbortReason>,
    /// How the successor ended, if it exited (a failed build's exit status or signal).
    pub successor_status: Option<std::process::ExitStatus>,
    /// The machine's verdict, in full.
    pub verdict: Verdict,
    /// Where the time went.
    pub times: PhaseTimes,
}

/// What a supervisor's recovery (`Supervisor::resume_from_journal` of the drivers) found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The daemon serving now.
    pub serving: Pid,
    /// What became of the handoff the journal named, if it named one in flight.
    pub resolution: Option<(HandoffId, Resolution)>,
}

/// A listener for a supervisor's `with_listener` (the drivers' `Supervisor`): anything that lends a descriptor for the
/// duplicate the supervisor keeps.
///
/// - `&T` for any `T: AsFd` (`&TcpListener`, `&UnixListener`, `&UdpSocket`, `&OwnedFd`, …), a
///   [`BorrowedFd`], an [`OwnedFd`]: the type system vouches that the descriptor is open and
///   the caller's.
/// - A [`RawFd`], for code written against the 0.1.2 API
///   (`.with_listener("http", tcp_listener.as_raw_fd())`). A number is not a descriptor the
///   caller is known to hold, so it is read about first: `/proc/self/fd` must show an open
///   socket, and only then is the number borrowed, for one `fcntl(F_DUPFD_CLOEXEC)`; the
///   duplicate is then checked to be a listener like any other. Nothing is closed or changed
///   through the number (not its flags, not its open file description). What this cannot
///   rule out: an open number that is not the caller's listener (a bug in the caller) hands
///   whatever listening socket it is to the successors, and so does another thread closing
///   and reusing the number between the check and the duplicate. Prefer the other forms.
///
/// Sealed: the forms above are all.
pub trait ListenerSource: sealed::Sealed {
    /// A close-on-exec duplicate of the descriptor, or why there is none.
    #[doc(hidden)]
    fn duplicate(self) -> std::result::Result<OwnedFd, String>;
}

mod sealed {
    /// Implemented by the [`ListenerSource`](super::ListenerSource) forms only.
    pub trait Sealed {}
    impl<T: std::os::fd::AsFd + ?Sized> Sealed for &T {}
    impl Sealed for std::os::fd::BorrowedFd<'_> {}
    impl Sealed for std::os::fd::OwnedFd {}
    impl Sealed for std::os::fd::RawFd {}
}

/// A duplicate of `fd` for [`ListenerSource`], at 3 or more, close-on-exec.
fn duplicate(fd: BorrowedFd<'_>) -> std::result::Result<OwnedFd, String> {
    rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(|e| format!("cannot duplicate: {e}"))
}

impl<T: AsFd + ?Sized> ListenerSource for &T {
    fn duplicate(self) -> std::result::Result<OwnedFd, String> {
        duplicate(self.as_fd())
    }
}

impl ListenerSource for BorrowedFd<'_> {
    fn duplicate(self) -> std::result::Result<OwnedFd, String> {
        duplicate(self)
    }
}

impl ListenerSource for OwnedFd {
    fn duplicate(self) -> std::result::Result<OwnedFd, String> {
        Ok(self)
    }
}

impl ListenerSource for RawFd {
    fn duplicate(self) -> std::result::Result<OwnedFd, String> {
        crate::inherit::dup_raw_socket(self)
    }
}
