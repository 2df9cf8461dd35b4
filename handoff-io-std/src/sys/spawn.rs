//! Spawning daemon processes with descriptors placed for them, and watching and killing
//! processes through pidfds.
//!
//! - [`spawn_successor`]: start the new binary as a successor. Its control channel (one end of
//!   a socketpair) is inherited at the number named in [`ENV_CHANNEL_FD`], with
//!   [`ENV_ROLE`]` = `[`ROLE_SUCCESSOR`].
//! - [`spawn_with_listeners`]: start a daemon cold, socket-activation style
//!   (`sd_listen_fds(3)`): its listeners at descriptors 3, 4, … with `LISTEN_FDS`,
//!   `LISTEN_FDNAMES` and `LISTEN_PID` set for it. [`crate::inherit`] is the reading side.
//! - [`Watched`] and [`wait_any`]: a process watched through a pidfd, which works for
//!   processes that are not this process's children (after a supervisor restart) and never
//!   signals a process that reused the pid.
//!
//! Only the descriptors named above (and stdin, stdout, stderr) are given to the child:
//! everything this crate opens is close-on-exec, the channel and the listeners are made
//! inheritable in the child only (between `fork` and `exec`), and the parent's own descriptors
//! never lose `FD_CLOEXEC`. So other threads spawning processes at the same time never inherit
//! them, and no lock is needed. A descriptor this process holds *without* `FD_CLOEXEC` (one it
//! inherited from whatever started it, say) is inherited by every child, as with any
//! `std::process::Command`; nothing here closes it.
//!
//! This is the one file of [`crate::sys`] with `unsafe` code: [`CommandExt::pre_exec`], and,
//! in the child, owning a descriptor number for `dup2`. The code that runs in the child makes
//! only async-signal-safe system calls (`fcntl`, `dup2`, `close`) and does not allocate;
//! everything it needs is prepared in the parent. Also here, for the same reason: the
//! `getsockopt(SO_PEERPIDFD)` that `rustix` does not wrap (`peer_pidfd`).

#![allow(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::{fcntl_dupfd_cloexec, fcntl_setfd, Errno, FdFlags};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use crate::inherit::{MAX_INHERITED_FDS, SD_LISTEN_FDS_START};

/// The environment variable that tells a process its role; [`ROLE_SUCCESSOR`] for a
/// successor. [`spawn_with_listeners`] removes it.
pub const ENV_ROLE: &str = "HANDOFF_ROLE";

/// The environment variable naming a successor's control channel: the decimal number of the
/// inherited descriptor. [`spawn_with_listeners`] removes it.
pub const ENV_CHANNEL_FD: &str = "HANDOFF_CHANNEL_FD";

/// The environment variable telling a successor how many listeners it will receive, so that
/// [`detect_role`](crate::detect_role) can size its descriptor table while the process is still
/// single-threaded. [`spawn_with_listeners`] removes it.
pub const ENV_LISTENER_COUNT: &str = "HANDOFF_LISTENER_COUNT";

/// The value of [`ENV_ROLE`] for a successor.
pub const ROLE_SUCCESSOR: &str = "successor";

/// `sd_listen_fds(3)`: the pid the listeners are meant for.
const LISTEN_PID: &str = "LISTEN_PID";
/// `sd_listen_fds(3)`: how many listeners, from fd 3 on.
const LISTEN_FDS: &str = "LISTEN_FDS";
/// `sd_listen_fds(3)`: their names, colon-separated.
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The shell that sets `LISTEN_PID` (see [`spawn_with_listeners`]).
const SHELL: &str = "/bin/sh";

/// Run by [`SHELL`] with `$0` the daemon's binary and `$@` its arguments. `$$` is the shell's
/// pid, which the exec'd binary keeps. No `--` after `exec`: dash would try to run it.
const LISTEN_PID_SCRIPT: &str = "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"";

/// The search path for a bare binary name when `PATH` is unset (glibc's `_CS_PATH`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// What to run: a binary, its arguments and environment, and what to do with stdio.
///
/// The child inherits this process's environment, with [`env`](Self::env) applied on top,
/// in order (a later entry for the same name wins). The spawn functions then set or remove
/// the variables they manage (`HANDOFF_*`, `LISTEN_*`), which override anything in `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The program. A bare name (no `/`) is searched in `PATH`: the `PATH` of
    /// [`env`](Self::env) if it sets one, else this process's.
    pub binary: PathBuf,
    /// The arguments, after `argv[0]`.
    pub args: Vec<OsString>,
    /// Environment variables set for the child, applied in order over the inherited
    /// environment.
    pub env: Vec<(OsString, OsString)>,
    /// `true`: the child inherits this process's stdin, stdout and stderr. `false`: all three
    /// are `/dev/null` (a daemon that logs elsewhere, or a test).
    pub inherit_stdio: bool,
}

impl Command {
    /// Run `binary` with no arguments, no extra environment, and stdio inherited.
    pub fn new(binary: impl Into<PathBuf>) -> Command {
        Command {
            binary: binary.into(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_stdio: true,
        }
    }

    /// Append an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Command {
        self.args.push(arg.into());
        self
    }

    /// Append arguments.
    pub fn args<I, S>(mut self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable for the child (appended to [`env`](Self::env)).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Command {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Set [`inherit_stdio`](Self::inherit_stdio).
    pub fn inherit_stdio(mut self, inherit: bool) -> Command {
        self.inherit_stdio = inherit;
        self
    }

    /// A `std` command running `program` with this command's environment and stdio, and no
    /// arguments yet.
    fn std_command(&self, program: &OsStr) -> std::process::Command {
        let mut c = std::process::Command::new(program);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if !self.inherit_stdio {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        c
    }

    /// The last value [`env`](Self::env) gives `key`, else this process's.
    fn child_var(&self, key: &str) -> Option<OsString> {
        match self.env.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => Some(v.clone()),
            None => std::env::var_os(key),
        }
    }
}

/// A spawn error naming what could not be spawned, of the same kind as `e`.
fn spawn_error(what: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot spawn {}: {e}", what.display()))
}

/// Spawn `cmd` as a successor whose control channel is `channel`, one end of a socketpair.
///
/// The child gets a duplicate of `channel` (at a number of 3 or more) that is inheritable in
/// the child only: the duplicate is made close-on-exec in this process and `FD_CLOEXEC` is
/// cleared after the `fork`, in the child. Its number is passed in [`ENV_CHANNEL_FD`], with
/// [`ENV_ROLE`]` = `[`ROLE_SUCCESSOR`]. The duplicate is closed in this process before this
/// returns; `channel` itself stays the caller's (drop it after the spawn, so that the child
/// holds the only copy of that end).
///
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the child's environment,
/// so it never mistakes itself for socket-activated, even if this process was, or `cmd.env`
/// sets them (removal is applied after `cmd.env`).
///
/// A binary that cannot be executed is an error of the kind the system reports (`NotFound`,
/// `PermissionDenied`) whose message names the binary.
pub fn spawn_successor(cmd: &Command, channel: BorrowedFd<'_>) -> io::Result<Child> {
    // At 3 or more: std's stdio set-up in the child (dup2 onto 0, 1, 2) runs before our
    // pre_exec and must not replace it.
    let chan = fcntl_dupfd_cloexec(channel, SD_LISTEN_FDS_START)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot duplicate the channel: {e}")))?;
    let number = chan.as_raw_fd();
    let mut c = cmd.std_command(cmd.binary.as_os_str());
    c.args(&cmd.args);
    for key in [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES] {
        c.env_remove(key);
    }
    c.env(ENV_ROLE, ROLE_SUCCESSOR)
        .env(ENV_CHANNEL_FD, number.to_string());
    let hook = move || -> io::Result<()> {
        // The child's copy of `chan`: descriptor flags belong to the descriptor table, which
        // the child has its own copy of, so this process's `chan` stays close-on-exec.
        fcntl_setfd(&chan, FdFlags::empty())?;
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec. It makes one fcntl(F_SETFD)
    // system call (async-signal-safe), does not allocate (an error is a raw OS error), takes
    // no lock and cannot panic. It only changes the flags of the child's copy of `chan`, a
    // descriptor this code owns and nothing else in the child uses.
    unsafe {
        c.pre_exec(hook);
    }
    let child = c.spawn().map_err(|e| spawn_error(&cmd.binary, e));
    // Closes this process's `chan` (owned by the hook).
    drop(c);
    child
}

/// Spawn `cmd` cold, socket-activation style (`sd_listen_fds(3)`): the listeners at
/// descriptors 3, 4, … in the order given, `LISTEN_FDS` their count, `LISTEN_FDNAMES` their
/// names joined by `:`, and `LISTEN_PID` the child's own pid.
///
/// `LISTEN_PID`: std cannot set a variable to the pid of the child it forks, so the binary is
/// started through `/bin/sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'`: `$$` is
/// the shell's pid, which the exec'd binary keeps. The returned [`Child`] is that process.
/// Before spawning, `cmd.binary` is checked to be an executable file (searched in `PATH` if a
/// bare name, and then passed to the shell as found): a missing binary is a `NotFound` error
/// naming it rather than a shell exiting 127. With no listeners the binary is spawned
/// directly, with the `LISTEN_*` variables removed.
///
/// Placement: each listener is first duplicated in this process to a number of `3 + n` or
/// more (close-on-exec), so that no source lies in the target range `3..3 + n`; in the child,
/// between `fork` and `exec`, each duplicate is `dup2`ed onto `3 + i`, which clears
/// `FD_CLOEXEC` on the target there only. The duplicates are closed in this process before
/// this returns; the listeners themselves stay the caller's and stay close-on-exec.
///
/// The free numbers below `3 + n` are also held (with close-on-exec duplicates) during the
/// spawn. Otherwise std's internal pipe, which reports a failed `exec` to this process, could
/// get a number in the target range and be replaced in the child, and a failure would go
/// unreported. Only another thread closing a descriptor below `3 + n` during the spawn can
/// still free a number there.
///
/// [`ENV_ROLE`] and [`ENV_CHANNEL_FD`] are removed from the child's environment. The `LISTEN_*`
/// and `HANDOFF_*` variables are set or removed after `cmd.env` is applied, so they win.
///
/// Errors (`InvalidInput`, before anything is spawned): an empty name or one containing `:`,
/// more than [`MAX_INHERITED_FDS`] listeners.
pub fn spawn_with_listeners(
    cmd: &Command,
    listeners: &[(&str, BorrowedFd<'_>)],
) -> io::Result<Child> {
    let names = listen_fdnames(listeners)?;
    let n = listeners.len();
    if n == 0 {
        let mut c = cmd.std_command(cmd.binary.as_os_str());
        c.args(&cmd.args);
        for key in [
            LISTEN_PID,
            LISTEN_FDS,
            LISTEN_FDNAMES,
            ENV_ROLE,
            ENV_CHANNEL_FD,
        ] {
            c.env_remove(key);
        }
        return c.spawn().map_err(|e| spawn_error(&cmd.binary, e));
    }
    let binary = resolve_binary(cmd)?;
    // n <= MAX_INHERITED_FDS, so the numbers fit in a RawFd.
    let end = SD_LISTEN_FDS_START + n as RawFd;
    let reserved = reserve_below(listeners[0].1, end)?;
    let sources = listeners
        .iter()
        .map(|(name, fd)| {
            fcntl_dupfd_cloexec(fd, end).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot duplicate listener {name:?} above descriptor {end}: {e}"),
                )
            })
        })
        .collect::<io::Result<Vec<OwnedFd>>>()?;

    let mut c = cmd.std_command(OsStr::new(SHELL));
    c.arg("-c")
        .arg(LISTEN_PID_SCRIPT)
        .arg(&binary)
        .args(&cmd.args);
    for key in [LISTEN_PID, ENV_ROLE, ENV_CHANNEL_FD, ENV_LISTENER_COUNT] {
        c.env_remove(key);
    }
    c.env(LISTEN_FDS, n.to_string()).env(LISTEN_FDNAMES, names);
    let hook = move || place(&sources);
    // SAFETY: the hook runs in the child between fork and exec. `place` makes only
    // async-signal-safe system calls (fcntl, dup2, close), does not allocate (errors are raw
    // OS errors, the sources were collected in the parent), takes no lock and cannot panic.
    // The descriptors it replaces are argued for in `place_at`.
    unsafe {
        c.pre_exec(hook);
    }
    let child = c
        .spawn()
        .map_err(|e| spawn_error(Path::new(SHELL), e))
        .map_err(|e| io::Error::new(e.kind(), format!("{e} (to start {})", binary.display())));
    // Closes this process's duplicates (owned by the hook), then the reserved numbers.
    drop(c);
    drop(reserved);
    child
}

/// The value of `LISTEN_FDNAMES` for `listeners`, after checking the count and the names.
fn listen_fdnames(listeners: &[(&str, BorrowedFd<'_>)]) -> io::Result<String> {
    if listeners.len() > MAX_INHERITED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} listeners; at most {MAX_INHERITED_FDS} can be passed",
                listeners.len()
            ),
        ));
    }
    for (name, _) in listeners {
        if name.is_empty() || name.contains(':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listener name {name:?} is empty or contains ':' (LISTEN_FDNAMES)"),
            ));
        }
    }
    Ok(listeners
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(":"))
}

/// Check that `path` is a regular file this process may execute.
fn check_executable(path: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| spawn_error(path, e))?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cannot spawn {}: not a regular file", path.display()),
        ));
    }
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK).map_err(|e| spawn_error(path, e.into()))
}

/// The path the shell is to exec for `cmd`: `cmd.binary` if it has a `/`, else the first
/// executable file of that name in the child's `PATH`; checked to be executable. A path
/// starting with `-` gets a `./` prefix so that no shell reads it as an option of `exec`.
fn resolve_binary(cmd: &Command) -> io::Result<PathBuf> {
    let binary = &cmd.binary;
    if binary.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot spawn an empty binary path",
        ));
    }
    let found = if binary.as_os_str().as_bytes().contains(&b'/') {
        check_executable(binary)?;
        binary.clone()
    } else {
        let path = cmd.child_var("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
        std::env::split_paths(&path)
            .map(|dir| {
                // An empty entry is the current directory.
                if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                }
                .join(binary)
            })
            .find(|candidate| check_executable(candidate).is_ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "cannot spawn {}: no executable of that name in PATH={}",
                        binary.display(),
                        path.to_string_lossy()
                    ),
                )
            })?
    };
    if found.as_os_str().as_bytes().starts_with(b"-") {
        return Ok(Path::new(".").join(found));
    }
    Ok(found)
}

/// Hold every free descriptor number in `3..end` with a close-on-exec duplicate of `fd`, so
/// that descriptors opened meanwhile (by std's spawn) get numbers of `end` or more. A number
/// below `end` that is in use is left alone. Returns the holders; drop them to free the
/// numbers.
fn reserve_below(fd: BorrowedFd<'_>, end: RawFd) -> io::Result<Vec<OwnedFd>> {
    let mut held = Vec::new();
    loop {
        // The lowest free number of 3 or more.
        let d = fcntl_dupfd_cloexec(fd, SD_LISTEN_FDS_START)?;
        if d.as_raw_fd() >= end {
            return Ok(held);
        }
        held.push(d);
    }
}

/// In the child, between fork and exec: put `sources[i]` at descriptor `3 + i`, inheritable.
///
/// Every source is at `3 + sources.len()` or more (see [`spawn_with_listeners`]), so placing
/// one never replaces another. No allocation, no lock, no panic.
fn place(sources: &[OwnedFd]) -> io::Result<()> {
    for (target, src) in (SD_LISTEN_FDS_START..).zip(sources) {
        place_at(src.as_fd(), target)?;
    }
    Ok(())
}

/// In the child, between fork and exec: make descriptor number `target` a duplicate of `src`
/// without `FD_CLOEXEC`. `src` is not `target`.
fn place_at(src: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // The lowest free number of `target` or more: `target` itself if it is free.
    let dup = fcntl_dupfd_cloexec(src, target)?;
    if dup.as_raw_fd() == target {
        fcntl_setfd(&dup, FdFlags::empty())?;
        // Left open, for the exec'd program.
        let _ = dup.into_raw_fd();
        return Ok(());
    }
    // `target` is in use (a close-on-exec descriptor of the parent, copied by fork), or the
    // duplicate would have been put there.
    //
    // SAFETY: `from_raw_fd` needs `target` open and not owned elsewhere. It is open: fcntl
    // just found it in use, and the child is single-threaded between fork and exec, so
    // nothing has closed it since. Whatever object of the parent owned it is only a copy in
    // the child's memory that nothing drops before exec (std runs this hook and then execs,
    // or `_exit`s on error without running destructors). The one such object std still uses
    // after the hook is its exec-error pipe, which `spawn_with_listeners` keeps out of the
    // target range by reserving the free numbers; were it replaced anyway (a race with
    // another thread closing a low descriptor), std's report of a failed exec would fail to
    // be written and the child would abort: a lost error report, not memory unsafety. The
    // number is only passed to dup2 below, which replaces the open file atomically.
    // `ManuallyDrop` makes sure this code never closes it: after dup2 it is the listener,
    // for the exec'd program.
    let mut target_fd = ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(target) });
    rustix::io::dup2(src, &mut target_fd)?;
    // The spare duplicate is closed here (close is async-signal-safe).
    drop(dup);
    Ok(())
}

/// A process watched through a pidfd (`pidfd_open(2)`).
///
/// Unlike a pid, a pidfd always refers to the process it was opened for: it never signals a
/// process that reused the number. It works for any process this one can see, not only its
/// children (a restarted supervisor watches the daemons its predecessor started). It does not
/// reap: a child of this process must still be waited for (`Child::wait`). For a child, open
/// the pidfd before reaping it; after that the pid may already name another process.
#[derive(Debug)]
pub struct Watched {
    pid: u32,
    pidfd: OwnedFd,
}

impl Watched {
    /// Watch the process `pid`. No such process (`ESRCH`): an [`io::ErrorKind::NotFound`]
    /// error naming the pid. Pid 0, or a pid above `i32::MAX`: `InvalidInput`.
    ///
    /// The pidfd refers to whoever has `pid` now: for a child not yet reaped, that is the
    /// child; for a pid read from a file, it may be anybody (see [`crate::sys::proc::Proven`]
    /// for opening one on a process proven to be the one meant).
    pub fn open(pid: u32) -> io::Result<Watched> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{pid} is not a process id"),
                )
            })?;
        match pidfd_open(raw, PidfdFlags::empty()) {
            // pidfd_open always sets close-on-exec.
            Ok(pidfd) => Ok(Watched { pid, pidfd }),
            Err(Errno::SRCH) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no process with pid {pid} (pidfd_open: ESRCH)"),
            )),
            Err(e) => Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("pidfd_open({pid}): {e}"),
            )),
        }
    }

    /// A pidfd the kernel handed out (`SO_PEERPIDFD`), for the process with pid `pid`.
    pub(crate) fn from_pidfd(pid: u32, pidfd: OwnedFd) -> Watched {
        Watched { pid, pidfd }
    }

    /// A second handle on the same process (a close-on-exec duplicate of the pidfd).
    pub fn try_clone(&self) -> io::Result<Watched> {
        Ok(Watched {
            pid: self.pid,
            pidfd: fcntl_dupfd_cloexec(&self.pidfd, 0)?,
        })
    }

    /// The pid this watches (the number it was opened with).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd: readable (`POLLIN`) once the process has exited, for a caller's own poll
    /// loop.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the process has exited (a zombie not reaped yet counts as exited). Does not
    /// block.
    pub fn has_exited(&self) -> io::Result<bool> {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            match poll(&mut fds, Some(&zero)) {
                Ok(_) => return Ok(exited(&fds[0])),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Kill the process (`SIGKILL`) through the pidfd. A process that has already exited (or
    /// been reaped) is no error.
    pub fn kill(&self) -> io::Result<()> {
        match pidfd_send_signal(&self.pidfd, Signal::KILL) {
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(e) => Err(self.signal_error(Signal::KILL, e)),
        }
    }

    /// Send `sig` to the process through the pidfd. A process that has been reaped is an
    /// [`io::ErrorKind::NotFound`] error (the kernel still delivers to an unreaped zombie,
    /// which ignores it).
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, sig).map_err(|e| self.signal_error(sig, e))
    }

    fn signal_error(&self, sig: Signal, e: Errno) -> io::Error {
        let pid = self.pid;
        if e == Errno::SRCH {
            return io::Error::new(
                io::ErrorKind::NotFound,
                format!("cannot signal process {pid} ({sig:?}): it has exited"),
            );
        }
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot signal process {pid} ({sig:?}): {e}"),
        )
    }
}

impl AsFd for Watched {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

/// `getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD)`: a pidfd (close-on-exec) on the process at the
/// other end of the connected Unix socket `sock`, the same process `SO_PEERCRED` names (for a
/// connecting end, the one that called `listen`). The kernel takes it from the socket, so it
/// cannot refer to a process that reused the pid. Linux 6.5 or later: `Ok(None)` where the
/// kernel does not know the option, or where this build does not know its number.
pub(crate) fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    // `SOL_SOCKET` and `SO_PEERPIDFD` as in asm-generic/socket.h; alpha, mips, parisc and
    // sparc number them differently and fall back.
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "s390x",
        target_arch = "powerpc64",
        target_arch = "powerpc"
    ))]
    {
        const SOL_SOCKET: i32 = 1;
        const SO_PEERPIDFD: i32 = 77;
        // rustix 1.1 does not wrap this option; the C library std links provides the call.
        extern "C" {
            fn getsockopt(
                fd: i32,
                level: i32,
                name: i32,
                value: *mut std::ffi::c_void,
                len: *mut u32,
            ) -> i32;
        }
        let mut fd: i32 = -1;
        let mut len = std::mem::size_of::<i32>() as u32;
        // SAFETY: `sock` is a descriptor borrowed for this call. `value` points to `fd`, an
        // `i32` that lives through the call, and `len` holds its size, so the kernel writes at
        // most 4 bytes there; it writes the actual size back to `len`, a live `u32`. The call
        // has no other effect on memory.
        let r = unsafe {
            getsockopt(
                sock.as_raw_fd(),
                SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut i32).cast(),
                &mut len,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match Errno::from_io_error(&e) {
                Some(Errno::NOPROTOOPT) => Ok(None),
                _ => Err(io::Error::new(
                    e.kind(),
                    format!("getsockopt(SO_PEERPIDFD): {e}"),
                )),
            };
        }
        if len as usize != std::mem::size_of::<i32>() || fd < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("getsockopt(SO_PEERPIDFD) returned {fd} ({len} bytes)"),
            ));
        }
        // SAFETY: the kernel just installed `fd` in this process's table for this caller; no
        // other object owns it, so owning (and later closing) it here is sound.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "s390x",
        target_arch = "powerpc64",
        target_arch = "powerpc"
    )))]
    {
        let _ = sock;
        Ok(None)
    }
}

/// Whether a polled pidfd says its process exited: `POLLIN`, or `POLLHUP` once it is reaped
/// (newer kernels).
fn exited(fd: &PollFd<'_>) -> bool {
    fd.revents()
        .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

/// `d` as a `Timespec`, saturating at the largest one.
fn timespec(d: Duration) -> Timespec {
    Timespec::try_from(d).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 999_999_999,
    })
}

/// Wait until at least one of `watched` has exited, or `timeout` has elapsed. Returns the
/// indices (into `watched`, ascending) of those that have exited: empty on timeout, several if
/// several exited. An empty `watched` returns an empty list at once.
///
/// Uses `poll(2)`; an interrupted poll (`EINTR`) is retried with the time left, so the wait is
/// bounded by `timeout` (a timeout too large for `Instant` waits as long as `poll` allows).
pub fn wait_any(watched: &[&Watched], timeout: Duration) -> io::Result<Vec<usize>> {
    if watched.is_empty() {
        return Ok(Vec::new());
    }
    let deadline = Instant::now().checked_add(timeout);
    let mut fds: Vec<PollFd<'_>> = watched
        .iter()
        .map(|w| PollFd::new(&w.pidfd, PollFlags::IN))
        .collect();
    loop {
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => timeout,
        };
        match poll(&mut fds, Some(&timespec(left))) {
            Ok(_) => {
                return Ok(fds
                    .iter()
                    .enumerate()
                    .filter(|(_, fd)| exited(fd))
                    .map(|(i, _)| i)
                    .collect())
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{identity, is_cloexec, TempDir};
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, UdpSocket};
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::ExitStatusExt;

    /// Bound on every wait for a child in these tests.
    const BOUND: Duration = Duration::from_secs(30);

    /// A command running the shell script `body`, with stdio `/dev/null`; returns it and the
    /// file its output goes to. The script's stdout is redirected to `$OUT` by `exec`, which
    /// leaves no extra descriptor in the shell. A script lists its descriptors with
    /// `ls -l /proc/$$/fd`: `ls` is a separate process, so the listing shows exactly the
    /// shell's descriptors, the ones it inherited with fd 1 the output file.
    fn script_command(dir: &TempDir, body: &str) -> (Command, PathBuf) {
        let out = dir.path().join("out");
        let script = format!("exec >\"$OUT\" || exit 99\n{body}");
        let cmd = Command::new("/bin/sh")
            .args(["-c", script.as_str()])
            .env("OUT", &out)
            .inherit_stdio(false);
        (cmd, out)
    }

    /// Wait (bounded) for `child` to exit, reap it, and return its output file.
    fn finish(mut child: Child, out: &Path) -> String {
        let w = Watched::open(child.id()).unwrap();
        let done = wait_any(&[&w], BOUND).unwrap();
        if done != [0] {
            let _ = w.kill();
            let _ = child.wait();
            panic!("child did not exit within {BOUND:?}");
        }
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(out).unwrap_or_default();
        assert!(status.success(), "child: {status}\n--- output ---\n{text}");
        text
    }

    /// The descriptors of an `ls -l /proc/PID/fd` listing: number → link target.
    fn fd_listing(text: &str) -> BTreeMap<RawFd, String> {
        text.lines()
            .filter_map(|line| {
                let (left, target) = line.split_once(" -> ")?;
                let fd = left.split_whitespace().last()?.parse().ok()?;
                Some((fd, target.to_owned()))
            })
            .collect()
    }

    fn socket_link(fd: impl AsFd) -> String {
        format!("socket:[{}]", identity(fd).1)
    }

    /// The descriptors a child of this process is expected to have: `placed` (0, 1, 2 and the
    /// ones the spawn put there), plus those this process holds without `FD_CLOEXEC`. This
    /// code creates none, but the test binary may have inherited some from whatever started
    /// it (a shell, cargo's jobserver pipe), and every child inherits those as well.
    fn expected_fds(placed: impl IntoIterator<Item = RawFd>) -> Vec<RawFd> {
        const O_CLOEXEC: u32 = 0o2000000;
        let mut fds: std::collections::BTreeSet<RawFd> = placed.into_iter().collect();
        for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap() {
            let entry = entry.unwrap();
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
                continue;
            };
            // Gone since the listing (the directory's own descriptor): not inherited.
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            if flags & O_CLOEXEC == 0 {
                fds.insert(fd);
            }
        }
        fds.into_iter().collect()
    }

    /// The descriptors of this process whose link target is `target`.
    fn my_fds_pointing_at(target: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy() == target)
            .count()
    }

    #[test]
    fn three_listeners_at_3_4_5_with_listen_vars_for_the_child() {
        let dir = TempDir::new("spawn-listeners");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix = UnixListener::bind(dir.path().join("admin.sock")).unwrap();
        let (cmd, out) = script_command(
            &dir,
            "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES ${HANDOFF_ROLE-unset} \
             ${HANDOFF_CHANNEL_FD-unset}\"\nls -l /proc/$$/fd",
        );
        // Set by the caller's env, overridden or removed by the spawn.
        let cmd = cmd
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "9")
            .env("LISTEN_FDNAMES", "x")
            .env(ENV_ROLE, ROLE_SUCCESSOR)
            .env(ENV_CHANNEL_FD, "7");
        let child = spawn_with_listeners(
            &cmd,
            &[
                ("http", tcp.as_fd()),
                ("dns", udp.as_fd()),
                ("admin", unix.as_fd()),
            ],
        )
        .unwrap();
        let pid = child.id();
        let text = finish(child, &out);

        let first = text.lines().next().unwrap();
        assert_eq!(first, format!("{pid} {pid} 3 http:dns:admin unset unset"));
        let fds = fd_listing(&text);
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected_fds(0..=5),
            "{text}"
        );
        assert_eq!(fds[&0], "/dev/null");
        assert_eq!(fds[&2], "/dev/null");
        assert_eq!(fds[&3], socket_link(&tcp));
        assert_eq!(fds[&4], socket_link(&udp));
        assert_eq!(fds[&5], socket_link(&unix));
        // The parent's listeners were never made inheritable.
        assert!(is_cloexec(&tcp) && is_cloexec(&udp) && is_cloexec(&unix));
    }

    #[test]
    fn three_hundred_listeners_land_above_their_duplicates() {
        let dir = TempDir::new("spawn-300");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = socket_link(&tcp);
        let names: Vec<String> = (0..300).map(|i| format!("l{i}")).collect();
        let listeners: Vec<(&str, BorrowedFd<'_>)> =
            names.iter().map(|n| (n.as_str(), tcp.as_fd())).collect();
        let (cmd, out) = script_command(
            &dir,
            "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES\"\nls -l /proc/$$/fd",
        );
        // A bare name: searched in PATH before the shell execs it.
        let cmd = Command {
            binary: "sh".into(),
            ..cmd
        };
        assert_eq!(my_fds_pointing_at(&link), 1);
        let child = spawn_with_listeners(&cmd, &listeners).unwrap();
        // The duplicates and the reserved numbers are closed by the time spawn returns.
        assert_eq!(my_fds_pointing_at(&link), 1);
        let pid = child.id();
        let text = finish(child, &out);

        let first = text.lines().next().unwrap();
        assert_eq!(first, format!("{pid} {pid} 300 {}", names.join(":")));
        let fds = fd_listing(&text);
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected_fds(0..=302),
            "{text}"
        );
        for fd in 3..=302 {
            assert_eq!(fds[&fd], link, "fd {fd}");
        }
    }

    #[test]
    fn no_listeners_spawns_directly_without_listen_or_handoff_vars() {
        let dir = TempDir::new("spawn-none");
        let (cmd, out) = script_command(
            &dir,
            "echo \"${LISTEN_PID-unset} ${LISTEN_FDS-unset} ${LISTEN_FDNAMES-unset} \
             ${HANDOFF_ROLE-unset} ${HANDOFF_CHANNEL_FD-unset} $KEPT\"\nls -l /proc/$$/fd",
        );
        let cmd = cmd
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "a:b")
            .env(ENV_ROLE, ROLE_SUCCESSOR)
            .env(ENV_CHANNEL_FD, "7")
            .env("KEPT", "no")
            .env("KEPT", "yes");
        let child = spawn_with_listeners(&cmd, &[]).unwrap();
        let text = finish(child, &out);
        assert_eq!(
            text.lines().next().unwrap(),
            "unset unset unset unset unset yes"
        );
        let fds = fd_listing(&text);
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected_fds(0..=2),
            "{text}"
        );
    }

    #[test]
    fn bad_listener_lists_are_refused_before_spawning() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        // A binary that does not exist: the name check comes first.
        let cmd = Command::new("/nonexistent/handoff-daemon");
        for name in ["", "a:b", ":"] {
            let e = spawn_with_listeners(&cmd, &[("ok", tcp.as_fd()), (name, tcp.as_fd())])
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}: {e}");
            assert!(e.to_string().contains(&format!("{name:?}")), "{e}");
        }
        let too_many = vec![("l", tcp.as_fd()); MAX_INHERITED_FDS + 1];
        let e = spawn_with_listeners(&cmd, &too_many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let count = format!("{} listeners", MAX_INHERITED_FDS + 1);
        assert!(e.to_string().contains(&count), "{e}");
        assert_eq!(
            listen_fdnames(&[("http", tcp.as_fd()), ("dns", tcp.as_fd())]).unwrap(),
            "http:dns"
        );
    }

    #[test]
    fn successor_gets_its_channel_and_role_and_no_listen_vars() {
        let dir = TempDir::new("spawn-successor");
        let (ours, theirs) = socketpair_cloexec().unwrap();
        let their_link = socket_link(&theirs);
        let (cmd, out) = script_command(
            &dir,
            "echo \"$HANDOFF_ROLE $HANDOFF_CHANNEL_FD ${LISTEN_PID-unset} ${LISTEN_FDS-unset} \
             ${LISTEN_FDNAMES-unset}\"\nls -l /proc/$$/fd\n\
             IFS= read -r line <&\"$HANDOFF_CHANNEL_FD\"\n\
             echo \"got $line\" >&\"$HANDOFF_CHANNEL_FD\"",
        );
        let cmd = cmd
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "a:b")
            .env(ENV_ROLE, "someone-else")
            .env(ENV_CHANNEL_FD, "99");
        let child = spawn_successor(&cmd, theirs.as_fd()).unwrap();
        assert!(
            is_cloexec(&theirs),
            "the parent's end must stay close-on-exec"
        );
        assert_eq!(my_fds_pointing_at(&their_link), 1, "duplicate not closed");
        drop(theirs);

        let mut ours = ours;
        ours.set_read_timeout(Some(BOUND)).unwrap();
        ours.write_all(b"hello through the channel\n").unwrap();
        let mut reply = String::new();
        let read = BufReader::new(&ours).read_line(&mut reply);
        let text = finish(child, &out);
        read.unwrap_or_else(|e| panic!("no reply from the child: {e}\n{text}"));
        assert_eq!(reply, "got hello through the channel\n");

        let mut first = text.lines().next().unwrap().split(' ');
        assert_eq!(first.next(), Some(ROLE_SUCCESSOR));
        let n: RawFd = first.next().unwrap().parse().unwrap();
        assert!(n > 2, "channel at {n}");
        assert_eq!(first.collect::<Vec<_>>(), ["unset", "unset", "unset"]);
        let fds = fd_listing(&text);
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected_fds([0, 1, 2, n]),
            "{text}"
        );
        assert_eq!(fds[&n], their_link);
    }

    #[test]
    fn a_missing_binary_is_not_found_and_named() {
        let (_ours, theirs) = socketpair_cloexec().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let missing = "/nonexistent/handoff-missing-daemon";
        let cmd = Command::new(missing).inherit_stdio(false);
        let errors = [
            spawn_successor(&cmd, theirs.as_fd()).unwrap_err(),
            spawn_with_listeners(&cmd, &[]).unwrap_err(),
            spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]).unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains(missing), "{e}");
        }

        let bare = Command::new("handoff-no-such-binary-anywhere").env("PATH", "/nonexistent:/bin");
        let e = spawn_with_listeners(&bare, &[("http", tcp.as_fd())]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(
            e.to_string().contains("handoff-no-such-binary-anywhere"),
            "{e}"
        );
        // The same search in the child's PATH finds what is there.
        let sh = Command::new("sh").env("PATH", "/nonexistent::/bin");
        assert_eq!(resolve_binary(&sh).unwrap(), Path::new("/bin/sh"));

        let dir = TempDir::new("spawn-not-exec");
        let e =
            spawn_with_listeners(&Command::new(dir.path()), &[("http", tcp.as_fd())]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let file = dir.path().join("not-executable");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let e = spawn_with_listeners(&Command::new(&file), &[("http", tcp.as_fd())]).unwrap_err();
        // Root may execute any file with an execute bit; this one has none.
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("not-executable"), "{e}");
    }

    /// A child blocked reading its stdin, a pipe: it exits when the pipe closes, so a failed
    /// test never leaves it behind.
    fn blocked_child() -> Child {
        std::process::Command::new("/bin/sh")
            .args(["-c", "read x; exit 0"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn watched_kill_and_exit() {
        let mut victim = blocked_child();
        let mut leaver = blocked_child();
        let wv = Watched::open(victim.id()).unwrap();
        let wl = Watched::open(leaver.id()).unwrap();
        assert_eq!(wv.pid(), victim.id());
        assert!(is_cloexec(&wv), "pidfd must be close-on-exec");
        assert!(!wv.has_exited().unwrap());
        assert!(!wl.has_exited().unwrap());
        assert_eq!(wait_any(&[&wv, &wl], Duration::ZERO).unwrap(), [0usize; 0]);

        // The leaver exits on its own when its stdin closes.
        drop(leaver.stdin.take());
        let started = Instant::now();
        assert_eq!(wait_any(&[&wv, &wl], BOUND).unwrap(), [1]);
        assert!(started.elapsed() < BOUND);
        assert!(wl.has_exited().unwrap(), "a zombie counts as exited");
        assert!(leaver.wait().unwrap().success());
        assert!(wl.has_exited().unwrap(), "and so does a reaped process");

        // The victim is killed through its pidfd.
        wv.kill().unwrap();
        assert_eq!(wait_any(&[&wv], BOUND).unwrap(), [0]);
        assert_eq!(wait_any(&[&wl, &wv], BOUND).unwrap(), [0, 1]);
        wv.kill().unwrap(); // a zombie: no error
        let status = victim.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status}");
        // Reaped: kill is still no error, any other signal is NotFound.
        wv.kill().unwrap();
        let e = wv.signal(Signal::TERM).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(&wv.pid().to_string()), "{e}");
    }

    #[test]
    fn wait_any_times_out_and_returns_nothing() {
        let mut child = blocked_child();
        let w = Watched::open(child.id()).unwrap();
        let started = Instant::now();
        assert!(wait_any(&[&w], Duration::from_millis(50))
            .unwrap()
            .is_empty());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(wait_any(&[], BOUND).unwrap().is_empty());
        assert!(started.elapsed() < BOUND);
        drop(child.stdin.take());
        assert_eq!(wait_any(&[&w], BOUND).unwrap(), [0]);
        child.wait().unwrap();
    }

    #[test]
    fn watched_open_errors_and_foreign_processes() {
        // Above any pid_max (at most 2^22): no such process.
        let e = Watched::open(0x7fff_fff0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(&0x7fff_fff0u32.to_string()), "{e}");
        for pid in [0, u32::MAX] {
            let e = Watched::open(pid).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{pid}: {e}");
        }
        // Not our child: watching works all the same.
        let init = Watched::open(1).unwrap();
        assert_eq!(init.pid(), 1);
        assert!(!init.has_exited().unwrap());
    }
}
