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
//! **The file checked is the file run.** Both spawn functions open the binary once
//! (`O_PATH`, relative to its directory, which is opened and checked first), check that
//! descriptor with `fstat` (a regular file with an execute bit; it and its directory owned by
//! root or by this process's effective uid and writable by neither group nor others), and the
//! child executes that same descriptor (`fexecve(3)`, that is
//! `execveat(fd, "", …, AT_EMPTY_PATH)`). Renaming another file over the path after the check
//! changes nothing. [`check_trusted_binary`] and [`check_trusted_dir`] are the same checks for
//! a caller's allowlist. The process's name (`/proc/<pid>/comm`) is the file's name from Linux
//! 6.14 on; older kernels name a process exec'd this way after the descriptor number (`ps`
//! shows `4`, say), while `/proc/<pid>/exe` and `argv[0]` are right.
//!
//! Only the descriptors named above (and stdin, stdout, stderr) are given to the child:
//! everything this crate opens is close-on-exec, the channel and the listeners are made
//! inheritable in the child only (between `fork` and `exec`), and the parent's own descriptors
//! never lose `FD_CLOEXEC`. So other threads spawning processes at the same time never inherit
//! them, and no lock is needed. A descriptor this process holds *without* `FD_CLOEXEC` (one it
//! inherited from whatever started it, say) is inherited by every child, as with any
//! `std::process::Command`; nothing here closes it. One exception: a binary that is a script
//! (`#!`) is run by the kernel as `interpreter /dev/fd/N`, so its descriptor `N` must survive
//! the `exec`; the interpreter, and what it runs, inherit it (an `O_PATH` descriptor of the
//! script), and the script's `$0` is `/dev/fd/N`, not its path.
//!
//! The module by concern: this file executes the checked binary in the child (placing the
//! descriptors, `fexecve`); `env` builds what the child is given ([`Command`], its
//! environment); `trust` opens and checks the binary ([`check_trusted_binary`]); `watch`
//! watches processes through pidfds ([`Watched`], [`wait_any`], [`peer_pidfd`]).
//!
//! This is the one module of [`crate::sys`] with `unsafe` code (allowed here, for it and its
//! submodules, as before the split): [`CommandExt::pre_exec`], the `fexecve` call it makes,
//! the argument arrays handed to it, and, in the child, owning a descriptor number for `dup2`
//! (this file). The code that runs in the child makes only async-signal-safe calls (`fcntl`,
//! `dup2`, `close`, `getpid`, `fexecve`) and does not allocate; everything it needs, the
//! argument and environment arrays included, is prepared in the parent. Apart from spawning,
//! [`peer_pidfd`] (`watch`) calls the C library's `getsockopt` for `SO_PEERPIDFD`, which
//! `rustix` does not wrap.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CString, OsStr, OsString};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{fstat, open, openat, FileType, Mode, OFlags, Stat};
use rustix::io::{fcntl_dupfd_cloexec, fcntl_setfd, Errno, FdFlags};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use crate::sys::{MAX_INHERITED_FDS, SD_LISTEN_FDS_START};

/// The environment variable that tells a process its role; [`ROLE_SUCCESSOR`] for a
/// successor. [`spawn_with_listeners`] removes it.
pub const ENV_ROLE: &str = "HANDOFF_ROLE";

/// The environment variable naming a successor's control channel: the decimal number of the
/// inherited descriptor. [`spawn_with_listeners`] removes it.
pub const ENV_CHANNEL_FD: &str = "HANDOFF_CHANNEL_FD";

/// The environment variable telling a successor how many listeners it will receive, so that
/// [`detect_role`](crate::role::detect_role) can size its descriptor table while the process is still
/// single-threaded. [`spawn_with_listeners`] removes it.
pub const ENV_LISTENER_COUNT: &str = "HANDOFF_LISTENER_COUNT";

/// The value of [`ENV_ROLE`] for a successor.
pub const ROLE_SUCCESSOR: &str = "successor";

/// The variables of this process's environment that a daemon inherits under
/// [`InheritEnv::Daemon`]: exact names, or prefixes followed by `*`. The search path, the
/// locale and the time zone, and the library's own `HANDOFF_*` settings (`HANDOFF_LOG`; the
/// crash points' `HANDOFF_CRASH_AT` and `HANDOFF_CRASH_ONCE`), which are meant for every
/// process of a deployment.
pub const DAEMON_ENV: &[&str] = &["PATH", "LANG", "LC_*", "TZ", "HANDOFF_*"];

/// `sd_listen_fds(3)`: the pid the listeners are meant for.
const LISTEN_PID: &str = "LISTEN_PID";
/// `sd_listen_fds(3)`: how many listeners, from fd 3 on.
const LISTEN_FDS: &str = "LISTEN_FDS";
/// `sd_listen_fds(3)`: their names, colon-separated.
const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";

/// The search path for a bare binary name when `PATH` is unset (glibc's `_CS_PATH`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Bytes of the `LISTEN_PID=<pid>` entry written in the child: the name, `=`, the ten digits
/// of the largest pid, and the NUL.
const PID_ENTRY: usize = 32;

extern "C" {
    /// `fexecve(3)` of the C library std links (glibc, musl): `execveat(fd, "", argv, envp,
    /// AT_EMPTY_PATH)`, or `execve("/proc/self/fd/<fd>", …)` on a kernel without `execveat`.
    /// Async-signal-safe (POSIX); returns only on failure, with `errno` set.
    fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
}

#[cfg(test)]
thread_local! {
    /// Run once by the next spawn on this thread, after the binary is checked and just before
    /// the fork: a test's stand-in for someone replacing the file at that moment.
    static AFTER_CHECK: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// The test hook [`AFTER_CHECK`], if one is set (nothing outside tests).
fn after_check() {
    #[cfg(test)]
    AFTER_CHECK.with(|h| {
        if let Some(f) = h.borrow_mut().take() {
            f()
        }
    });
}

mod env;
mod trust;
mod watch;

pub use env::{Command, InheritEnv};
pub use trust::{check_trusted_binary, check_trusted_dir};
pub use watch::{peer_pidfd, wait_any, Watched};

use trust::{resolve_binary, Binary};

/// A spawn error naming what could not be spawned, of the same kind as `e`.
fn spawn_error(what: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot spawn {}: {e}", what.display()))
}

/// A NULL-terminated array of pointers to C strings, as `execve` takes it.
struct CArray {
    /// The strings the pointers point into (heap buffers that never move or change).
    _strings: Vec<CString>,
    /// One pointer per string, then `extra` if any, then NULL.
    ptrs: Vec<*const c_char>,
}

// SAFETY: the pointers only point into `_strings`, which this value owns and never changes,
// or at the `LISTEN_PID` entry (atomics, see `Exec`) owned by the same `Exec`; nothing reads
// through them but the kernel, in `fexecve`. Sending or sharing the array across threads is
// therefore as safe as sending or sharing the `CString`s themselves.
unsafe impl Send for CArray {}
// SAFETY: as for `Send` above: no interior mutability is reachable through `&CArray`.
unsafe impl Sync for CArray {}

impl CArray {
    fn new(strings: Vec<CString>, extra: Option<*const c_char>) -> CArray {
        let ptrs = strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(extra)
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        CArray {
            _strings: strings,
            ptrs,
        }
    }
}

/// Everything the child needs to exec the checked binary, prepared in the parent: no
/// allocation happens after the fork.
struct Exec {
    binary: Binary,
    argv: CArray,
    envp: CArray,
    /// The `LISTEN_PID=<pid>` entry of `envp` (a cold start with listeners), written by the
    /// child with its own pid. Atomics, so the child writes through a shared reference while
    /// `envp` points at the same bytes (`AtomicU8` has the layout of `u8`).
    listen_pid: Option<Box<[AtomicU8; PID_ENTRY]>>,
}

impl Exec {
    /// `argv` is `cmd.binary` as given, then `cmd.args`; `envp` is `env`, plus the
    /// `LISTEN_PID` entry if `listen_pid`. A NUL byte in any of them, or a variable name that
    /// is empty or contains `=`, is an `InvalidInput` error.
    fn new(
        cmd: &Command,
        binary: Binary,
        env: BTreeMap<OsString, OsString>,
        listen_pid: bool,
    ) -> io::Result<Exec> {
        let invalid = |what: String| {
            spawn_error(
                &cmd.binary,
                io::Error::new(io::ErrorKind::InvalidInput, what),
            )
        };
        let cstring = |bytes: Vec<u8>| {
            CString::new(bytes).map_err(|e| {
                let s = String::from_utf8_lossy(&e.into_vec()).into_owned();
                invalid(format!("{s:?} contains a NUL byte"))
            })
        };
        let mut argv = vec![cstring(cmd.binary.as_os_str().as_bytes().to_vec())?];
        for a in &cmd.args {
            argv.push(cstring(a.as_bytes().to_vec())?);
        }
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in env {
            if k.is_empty() || k.as_bytes().contains(&b'=') {
                return Err(invalid(format!(
                    "environment variable name {k:?} is empty or contains '='"
                )));
            }
            let mut entry = k.into_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            envp.push(cstring(entry)?);
        }
        let slot = listen_pid.then(|| {
            let slot = Box::new(std::array::from_fn(|_| AtomicU8::new(0)));
            write_listen_pid(&slot, 0);
            slot
        });
        let extra = slot.as_ref().map(|s| s.as_ptr().cast::<c_char>());
        Ok(Exec {
            binary,
            argv: CArray::new(argv, None),
            envp: CArray::new(envp, extra),
            listen_pid: slot,
        })
    }

    /// In the child, between fork and exec: set `LISTEN_PID` to this process's pid, keep a
    /// script's descriptor open across the exec, and exec the binary. Returns only on failure,
    /// with the system's error (a raw OS error: no allocation). Async-signal-safe: `getpid`,
    /// `fcntl`, `fexecve`; no lock, no panic.
    fn exec(&self) -> io::Error {
        if let Some(slot) = &self.listen_pid {
            write_listen_pid(
                slot,
                rustix::process::getpid().as_raw_nonzero().get() as u32,
            );
        }
        if self.binary.script {
            if let Err(e) = fcntl_setfd(&self.binary.fd, FdFlags::empty()) {
                return e.into();
            }
        }
        // SAFETY: `argv.ptrs` and `envp.ptrs` are NULL-terminated arrays of pointers to
        // NUL-terminated strings (`CArray::new`; the `LISTEN_PID` entry ends in a NUL written
        // by `write_listen_pid`), all owned by `self`, which outlives the call. The descriptor
        // is open and owned by `self`. fexecve does not return on success; on failure it
        // returns -1 and sets errno, read just below.
        unsafe {
            fexecve(
                self.binary.fd.as_raw_fd(),
                self.argv.ptrs.as_ptr(),
                self.envp.ptrs.as_ptr(),
            );
        }
        io::Error::last_os_error()
    }
}

/// Write `LISTEN_PID=<pid>` and a NUL into `slot`. No allocation; the indices stay below 22.
fn write_listen_pid(slot: &[AtomicU8; PID_ENTRY], pid: u32) {
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (pid, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    let entry = b"LISTEN_PID="
        .iter()
        .chain(digits[..len].iter().rev())
        .chain(std::iter::once(&0));
    for (cell, &b) in slot.iter().zip(entry) {
        cell.store(b, Ordering::Relaxed);
    }
}

/// Spawn `c`, whose `pre_exec` hook execs the checked binary; errors name `cmd.binary`.
fn spawn_checked(cmd: &Command, mut c: std::process::Command) -> io::Result<Child> {
    after_check();
    let child = c.spawn().map_err(|e| spawn_error(&cmd.binary, e));
    // Closes this process's copies of what the hook owned (the binary, the channel or the
    // listeners' duplicates).
    drop(c);
    child
}

/// Spawn `cmd` as a successor whose control channel is `channel`, one end of a socketpair.
///
/// The binary is opened and checked, and the child executes that descriptor (see the module
/// docs): a binary, or its directory, that someone other than root or this process's user
/// could write is refused with a `PermissionDenied` error before anything is spawned.
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
    // pre_exec and must not replace it, nor the binary. The channel first: it gets the lowest
    // free number, as small a number as a shell script can name (`<&9` at most for dash).
    let chan = fcntl_dupfd_cloexec(channel, SD_LISTEN_FDS_START)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot duplicate the channel: {e}")))?;
    let binary = Binary::open(&resolve_binary(cmd)?)?.at_or_above(SD_LISTEN_FDS_START)?;
    let number = chan.as_raw_fd().to_string();
    let env = cmd.child_env(
        &[LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES],
        &[(ENV_ROLE, ROLE_SUCCESSOR), (ENV_CHANNEL_FD, &number)],
    );
    let exec = Exec::new(cmd, binary, env, false)?;
    let mut c = cmd.std_command();
    let hook = move || -> io::Result<()> {
        // The child's copy of `chan`: descriptor flags belong to the descriptor table, which
        // the child has its own copy of, so this process's `chan` stays close-on-exec.
        fcntl_setfd(&chan, FdFlags::empty())?;
        Err(exec.exec())
    };
    // SAFETY: the hook runs in the child between fork and exec. It makes one fcntl(F_SETFD)
    // on the child's copy of `chan`, a descriptor this code owns and nothing else in the child
    // uses, and then `Exec::exec` (getpid, fcntl, fexecve): all async-signal-safe. It does not
    // allocate (errors are raw OS errors, the arrays were built in the parent), takes no lock
    // and cannot panic.
    unsafe {
        c.pre_exec(hook);
    }
    spawn_checked(cmd, c)
}

/// Spawn `cmd` cold, socket-activation style (`sd_listen_fds(3)`): the listeners at
/// descriptors 3, 4, … in the order given, `LISTEN_FDS` their count, `LISTEN_FDNAMES` their
/// names joined by `:`, and `LISTEN_PID` the child's own pid. With no listeners the three
/// variables are removed instead.
///
/// The binary is opened and checked, and the child executes that descriptor, as in
/// [`spawn_successor`]. `LISTEN_PID` is written into the prepared environment by the child
/// itself (`getpid()`, between `fork` and `exec`), so the returned [`Child`] is the daemon
/// itself, with no shell in between.
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
/// [`ENV_ROLE`], [`ENV_CHANNEL_FD`] and [`ENV_LISTENER_COUNT`] are removed from the child's
/// environment. The `LISTEN_*` and `HANDOFF_*` variables are set or removed after `cmd.env` is
/// applied, so they win.
///
/// Errors (`InvalidInput`, before anything is spawned): an empty name or one containing `:`,
/// more than [`MAX_INHERITED_FDS`] listeners. A binary that fails its checks or cannot be
/// executed: as [`spawn_successor`].
pub fn spawn_with_listeners(
    cmd: &Command,
    listeners: &[(&str, BorrowedFd<'_>)],
) -> io::Result<Child> {
    let names = listen_fdnames(listeners)?;
    let n = listeners.len();
    // n <= MAX_INHERITED_FDS, so the numbers fit in a RawFd.
    let end = SD_LISTEN_FDS_START + n as RawFd;
    // Above the target range, before the free numbers below it are reserved.
    let binary = Binary::open(&resolve_binary(cmd)?)?.at_or_above(end)?;
    let managed = [
        LISTEN_PID,
        LISTEN_FDS,
        LISTEN_FDNAMES,
        ENV_ROLE,
        ENV_CHANNEL_FD,
        ENV_LISTENER_COUNT,
    ];
    if n == 0 {
        let exec = Exec::new(cmd, binary, cmd.child_env(&managed, &[]), false)?;
        let mut c = cmd.std_command();
        let hook = move || -> io::Result<()> { Err(exec.exec()) };
        // SAFETY: the hook runs in the child between fork and exec and only calls
        // `Exec::exec` (fcntl, fexecve: async-signal-safe; no allocation, no lock, no panic).
        unsafe {
            c.pre_exec(hook);
        }
        return spawn_checked(cmd, c);
    }
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
    let count = n.to_string();
    let env = cmd.child_env(&managed, &[(LISTEN_FDS, &count), (LISTEN_FDNAMES, &names)]);
    let exec = Exec::new(cmd, binary, env, true)?;
    let mut c = cmd.std_command();
    let hook = move || -> io::Result<()> {
        place(&sources)?;
        Err(exec.exec())
    };
    // SAFETY: the hook runs in the child between fork and exec. `place` makes only
    // async-signal-safe system calls (fcntl, dup2, close), and `Exec::exec` getpid, fcntl and
    // fexecve; neither allocates (errors are raw OS errors, the sources and the arrays were
    // built in the parent), takes a lock or can panic. The descriptors `place` replaces are
    // argued for in `place_at`; the binary's descriptor is above them.
    unsafe {
        c.pre_exec(hook);
    }
    let child = spawn_checked(cmd, c);
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
    // the child's memory that nothing drops before exec (the hook execs, or returns an error
    // upon which std `_exit`s without running destructors). The one such object std still
    // uses after the hook is its exec-error pipe, which `spawn_with_listeners` keeps out of the
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

#[cfg(test)]
mod tests;
