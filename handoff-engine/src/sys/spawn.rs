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
//! This is the one file of [`crate::sys`] with `unsafe` code: [`CommandExt::pre_exec`], the
//! `fexecve` call it makes, the argument arrays handed to it, and, in the child, owning a
//! descriptor number for `dup2`. The code that runs in the child makes only async-signal-safe
//! calls (`fcntl`, `dup2`, `close`, `getpid`, `fexecve`) and does not allocate; everything it
//! needs, the argument and environment arrays included, is prepared in the parent. Apart from
//! spawning, [`peer_pidfd`] calls the C library's `getsockopt` for `SO_PEERPIDFD`, which
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

/// Which of this process's environment variables a child inherits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InheritEnv {
    /// All of them, as with `std::process::Command` (the default of [`Command::new`]: a
    /// program starting a supervisor, say).
    #[default]
    All,
    /// Only those named by [`DAEMON_ENV`]; what else the child needs is set in
    /// [`Command::env`]. What a supervisor gives the daemons it starts
    /// ([`SpawnSpec`](crate::spec::SpawnSpec)).
    Daemon,
}

/// What to run: a binary, its arguments and environment, and what to do with stdio.
///
/// The child's environment: this process's variables as [`inherit_env`](Self::inherit_env)
/// selects them, with [`env`](Self::env) applied on top, in order (a later entry for the same
/// name wins). The spawn functions then set or remove the variables they manage (`HANDOFF_*`,
/// `LISTEN_*`), which override anything in `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The program. A bare name (no `/`) is searched in `PATH`: the `PATH` of
    /// [`env`](Self::env) if it sets one, else this process's. It is the child's `argv[0]`
    /// as given.
    pub binary: PathBuf,
    /// The arguments, after `argv[0]`.
    pub args: Vec<OsString>,
    /// Environment variables set for the child, applied in order over the inherited
    /// environment.
    pub env: Vec<(OsString, OsString)>,
    /// Which of this process's variables the child inherits ([`InheritEnv::All`] from
    /// [`Command::new`]).
    pub inherit_env: InheritEnv,
    /// `true`: the child inherits this process's stdin, stdout and stderr. `false`: all three
    /// are `/dev/null` (a daemon that logs elsewhere, or a test).
    pub inherit_stdio: bool,
}

impl Command {
    /// Run `binary` with no arguments, no extra environment, this process's whole environment
    /// and its stdio.
    pub fn new(binary: impl Into<PathBuf>) -> Command {
        Command {
            binary: binary.into(),
            args: Vec::new(),
            env: Vec::new(),
            inherit_env: InheritEnv::All,
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

    /// Set [`inherit_env`](Self::inherit_env).
    pub fn inherit_env(mut self, inherit: InheritEnv) -> Command {
        self.inherit_env = inherit;
        self
    }

    /// Set [`inherit_stdio`](Self::inherit_stdio).
    pub fn inherit_stdio(mut self, inherit: bool) -> Command {
        self.inherit_stdio = inherit;
        self
    }

    /// A `std` command that never runs its own program: the `pre_exec` hook given to it execs
    /// the checked binary. It has this command's stdio and an empty environment of its own.
    fn std_command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.binary);
        c.env_clear();
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

    /// The child's environment: the inherited variables, then [`env`](Self::env), then
    /// `remove` removed and `set` set.
    fn child_env(&self, remove: &[&str], set: &[(&str, &str)]) -> BTreeMap<OsString, OsString> {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| match self.inherit_env {
                InheritEnv::All => true,
                InheritEnv::Daemon => is_daemon_var(k),
            })
            .collect();
        for (k, v) in &self.env {
            env.insert(k.clone(), v.clone());
        }
        for k in remove {
            env.remove(OsStr::new(k));
        }
        for (k, v) in set {
            env.insert((*k).into(), (*v).into());
        }
        env
    }
}

/// Whether [`DAEMON_ENV`] names the variable `name`.
fn is_daemon_var(name: &OsStr) -> bool {
    let name = name.as_bytes();
    DAEMON_ENV.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix.as_bytes()),
        None => name == p.as_bytes(),
    })
}

/// A spawn error naming what could not be spawned, of the same kind as `e`.
fn spawn_error(what: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot spawn {}: {e}", what.display()))
}

/// Why a file or directory with status `st` could be written by someone other than root or
/// this process's effective user: it is owned by another user, or writable by its group or by
/// others. `None` when it could not.
fn writable_by_others(st: &Stat) -> Option<String> {
    let euid = rustix::process::geteuid().as_raw();
    let uid = st.st_uid;
    if uid != 0 && uid != euid {
        return Some(format!(
            "is owned by uid {uid}, neither root nor this process's uid {euid}"
        ));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "others"
        } else {
            "its group"
        };
        return Some(format!("is writable by {who} (mode {mode:o})"));
    }
    None
}

/// A permission error saying that `path` `why` (from [`writable_by_others`]).
fn untrusted(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} {why}: only root and this process's user may be able to write a binary or its \
             directory",
            path.display()
        ),
    )
}

/// Check the directory open at `dir` (whose path is `path`): a directory that only root or
/// this process's user can write.
fn check_dir_fd(dir: &OwnedFd, path: &Path) -> io::Result<()> {
    let st = fstat(dir)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory", path.display()),
        ));
    }
    match writable_by_others(&st) {
        Some(why) => Err(untrusted(path, &why)),
        None => Ok(()),
    }
}

/// Check that `dir` (symlinks followed) is a directory that nobody but root and this
/// process's effective user can write: owned by one of them, not writable by group or others.
/// A `PermissionDenied` error says which rule it breaks.
pub fn check_trusted_dir(dir: &Path) -> io::Result<()> {
    let fd = open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display())))?;
    check_dir_fd(&fd, dir)
}

/// Open `path` (symlinks resolved first) as [`check_trusted_binary`] describes: its directory
/// is opened and checked, then the file is opened relative to that descriptor without following
/// a symlink, and checked. Returns the file (`O_PATH`, close-on-exec), its resolved path and its
/// status. Errors name the file or directory at fault when it is not `path` itself (the caller
/// names `path`).
fn open_checked(path: &Path) -> io::Result<(OwnedFd, PathBuf, Stat)> {
    let canon = std::fs::canonicalize(path)?;
    let not_a_file = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a regular file", canon.display()),
        )
    };
    let (Some(parent), Some(name)) = (canon.parent(), canon.file_name()) else {
        return Err(not_a_file());
    };
    let dir = open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", parent.display()),
        )
    })?;
    check_dir_fd(&dir, parent)?;
    // Relative to the directory just checked; a symlink put there since `canonicalize` is
    // opened as itself (`O_PATH | O_NOFOLLOW`) and refused as not a regular file.
    let fd = openat(
        &dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", canon.display()),
        )
    })?;
    let st = fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_a_file());
    }
    if let Some(why) = writable_by_others(&st) {
        return Err(untrusted(&canon, &why));
    }
    Ok((fd, canon, st))
}

/// Check `path` as a binary to run: resolved (symlinks followed), it must be a regular file in
/// a directory, the file and the directory each owned by root or by this process's effective
/// user and writable by neither group nor others. Returns the resolved path. A
/// `PermissionDenied` error names the file or directory and the rule it breaks; a missing file
/// is the system's `NotFound` error, which does not repeat `path`.
///
/// The spawn functions make the same checks on the descriptor they execute; this is for a
/// caller's own allowlist (the reference supervisor's configuration).
pub fn check_trusted_binary(path: &Path) -> io::Result<PathBuf> {
    open_checked(path).map(|(_, canon, _)| canon)
}

/// A binary opened for execution and checked: the child execs this descriptor.
#[derive(Debug)]
struct Binary {
    /// `O_PATH`, close-on-exec.
    fd: OwnedFd,
    /// Whether it starts with `#!`: the kernel then gives the interpreter `/dev/fd/<fd>`, so
    /// the child must leave the descriptor open across the exec.
    script: bool,
}

impl Binary {
    /// Open and check `path` (see [`open_checked`]), and require an execute bit.
    fn open(path: &Path) -> io::Result<Binary> {
        let (fd, canon, st) = open_checked(path).map_err(|e| spawn_error(path, e))?;
        if st.st_mode & 0o111 == 0 {
            return Err(spawn_error(
                path,
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not executable (mode {:o})",
                        canon.display(),
                        st.st_mode & 0o7777
                    ),
                ),
            ));
        }
        let script = starts_with_shebang(&fd);
        Ok(Binary { fd, script })
    }

    /// The same binary at a descriptor number of `min` or more (close-on-exec), so that
    /// nothing placed in the child below `min` replaces it.
    fn at_or_above(self, min: RawFd) -> io::Result<Binary> {
        Ok(Binary {
            fd: fcntl_dupfd_cloexec(&self.fd, min)?,
            script: self.script,
        })
    }
}

/// Whether the file open at `fd` (`O_PATH`) starts with `#!`. It is read through a second
/// descriptor opened by `/proc/self/fd`, which names that very file; a file that cannot be read
/// cannot be a script an interpreter runs, and counts as none.
fn starts_with_shebang(fd: &OwnedFd) -> bool {
    let Ok(file) = open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) else {
        return false;
    };
    let mut magic = [0u8; 2];
    matches!(rustix::io::pread(&file, &mut magic, 0), Ok(2)) && magic == *b"#!"
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

/// Whether `path` is a regular file this process may execute (for the `PATH` search).
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

/// The path to open for `cmd`: `cmd.binary` if it has a `/`, else the first executable file
/// of that name in the child's `PATH` (an empty entry is the current directory). It is checked
/// when opened ([`Binary::open`]).
fn resolve_binary(cmd: &Command) -> io::Result<PathBuf> {
    let binary = &cmd.binary;
    if binary.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot spawn an empty binary path",
        ));
    }
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return Ok(binary.clone());
    }
    let path = cmd.child_var("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
            .join(binary)
        })
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "cannot spawn {}: no executable of that name in PATH={}",
                    binary.display(),
                    path.to_string_lossy()
                ),
            )
        })
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

    /// The process at the other end of the connected `AF_UNIX` socket `sock`, whose
    /// `SO_PEERCRED` pid is `pid`: the kernel's own pidfd on it ([`peer_pidfd`]), or, on a
    /// kernel without `SO_PEERPIDFD` (before 6.5), a pidfd opened on `pid`, which a process
    /// that exited since the connect, its pid reused at once, could fool.
    pub(crate) fn peer(sock: BorrowedFd<'_>, pid: u32) -> io::Result<Watched> {
        match peer_pidfd(sock) {
            Ok(pidfd) => Ok(Watched::from_pidfd(pid, pidfd)),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Watched::open(pid),
            Err(e) => Err(e),
        }
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

/// A pidfd for the process at the other end of the connected `AF_UNIX` socket `sock`, as the
/// kernel recorded it at `connect` (or `socketpair`): `getsockopt(SO_PEERPIDFD)`, Linux 6.5
/// and later. Unlike the pid of `SO_PEERCRED`, it refers to that very process even if it has
/// exited and its pid was reused since (the pidfd then reads as exited). Close-on-exec (the
/// kernel creates it with `O_CLOEXEC`).
///
/// `rustix` has no wrapper for this option, so this is a direct `getsockopt` call through the
/// C library `std` links. An [`io::ErrorKind::Unsupported`] error means the kernel (or this
/// architecture's numbering, not known here) does not offer it: fall back to
/// `pidfd_open(pid)`, which a pid reuse can fool.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use std::os::raw::{c_int, c_void};
    // `SOL_SOCKET` is 1 except on mips (and on architectures not listed, whose numbers are
    // not known here).
    let level: c_int = if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
        0xffff
    } else if cfg!(any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv32",
        target_arch = "riscv64",
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "s390x",
        target_arch = "loongarch64",
    )) {
        1
    } else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "SO_PEERPIDFD: option number not known for this architecture",
        ));
    };
    // The same number on every architecture above (`asm-generic/socket.h`, and mips).
    const SO_PEERPIDFD: c_int = 77;
    extern "C" {
        fn getsockopt(
            fd: c_int,
            level: c_int,
            name: c_int,
            value: *mut c_void,
            len: *mut u32,
        ) -> c_int;
    }
    let mut fd: c_int = -1;
    let mut len = std::mem::size_of::<c_int>() as u32;
    // SAFETY: `getsockopt` is the C library's, with its C signature (`socklen_t` is `u32` on
    // Linux). `sock` is a descriptor borrowed for this call, so it stays open while the
    // kernel reads it. `value` points to a live, writable `c_int` and `len` to its size, so
    // the kernel writes at most those 4 bytes; nothing else is touched.
    let r = unsafe {
        getsockopt(
            sock.as_raw_fd(),
            level,
            SO_PEERPIDFD,
            (&mut fd as *mut c_int).cast::<c_void>(),
            &mut len,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(Errno::NOPROTOOPT.raw_os_error()) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("SO_PEERPIDFD: {e} (Linux 6.5 or later is needed)"),
            ));
        }
        return Err(io::Error::new(e.kind(), format!("SO_PEERPIDFD: {e}")));
    }
    if len as usize != std::mem::size_of::<c_int>() || fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_PEERPIDFD returned descriptor {fd} with length {len}"),
        ));
    }
    // SAFETY: the call succeeded, so the kernel has just installed `fd` in this process's
    // table for this caller: a new descriptor that nothing else owns or knows the number of.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{identity, is_cloexec, root, TempDir};
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
    fn finish(child: Child, out: &Path) -> String {
        crate::sys::testutil::finish(child, out, "spawn")
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
        // bash: dash's redirections name descriptors 0 to 9 only (`<&12` is a syntax error),
        // and the channel's number depends on what the tests running meanwhile hold open.
        let cmd = Command {
            binary: "/bin/bash".into(),
            ..cmd
        };
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

    /// Set the permission bits of `path` to `mode`.
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A copy of `from` at `to` with mode `mode`. Copied by `cp`, another process: were this
    /// multi-threaded process to hold the copy open for writing, a child forked meanwhile by
    /// another test would inherit that descriptor until its exec, and executing the copy would
    /// fail with `ETXTBSY`.
    fn copy_exe(from: &str, to: &Path, mode: u32) {
        let status = std::process::Command::new("cp")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success(), "cp {from} {}: {status}", to.display());
        set_mode(to, mode);
    }

    /// The file is replaced (renamed over) after the spawn checked it and before the child
    /// execs: the child still runs the file that was checked, for a successor and for a cold
    /// start, with and without listeners.
    #[test]
    fn the_checked_binary_runs_though_replaced_after_the_check() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        for case in ["successor", "cold, no listeners", "cold, one listener"] {
            let dir = TempDir::new("spawn-swap");
            let daemon = dir.path().join("daemon");
            copy_exe("/bin/sh", &daemon, 0o755);
            let other = dir.path().join("other");
            std::fs::write(&other, "#!/bin/sh\necho replaced >\"$OUT\"\n").unwrap();
            set_mode(&other, 0o755);
            let out = dir.path().join("out");
            let cmd = Command::new(&daemon)
                .args(["-c", "echo checked >\"$OUT\""])
                .env("OUT", &out)
                .inherit_stdio(false);
            let (d, o) = (daemon.clone(), other.clone());
            AFTER_CHECK.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || std::fs::rename(&o, &d).unwrap()))
            });
            let (_ours, theirs) = socketpair_cloexec().unwrap();
            let child = match case {
                "successor" => spawn_successor(&cmd, theirs.as_fd()),
                "cold, no listeners" => spawn_with_listeners(&cmd, &[]),
                _ => spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
            }
            .unwrap();
            assert!(
                AFTER_CHECK.with(|h| h.borrow().is_none()),
                "{case}: hook not run"
            );
            // The rename did happen: the path names the other file now.
            assert!(!other.exists(), "{case}");
            assert_eq!(finish(child, &out), "checked\n", "{case}");
        }
    }

    /// A binary, or the directory it is in, that someone other than root or this process's
    /// user could write is refused, by every spawn function, before anything is spawned.
    #[test]
    fn writable_binaries_and_directories_are_refused() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_ours, theirs) = socketpair_cloexec().unwrap();
        let dir = TempDir::new("spawn-writable");
        let sub = dir.path().join("bin");
        std::fs::create_dir(&sub).unwrap();
        set_mode(&sub, 0o755);
        let daemon = sub.join("daemon");
        copy_exe("/bin/sh", &daemon, 0o755);
        for (what, file_mode, dir_mode, named) in [
            ("group-writable binary", 0o775, 0o755, &daemon),
            ("world-writable binary", 0o757, 0o755, &daemon),
            ("group-writable directory", 0o755, 0o775, &sub),
            ("world-writable directory", 0o755, 0o757, &sub),
            ("sticky world-writable directory", 0o755, 0o1777, &sub),
        ] {
            set_mode(&daemon, file_mode);
            set_mode(&sub, dir_mode);
            let cmd = Command::new(&daemon)
                .args(["-c", "exit 0"])
                .inherit_stdio(false);
            let errors = [
                spawn_successor(&cmd, theirs.as_fd()),
                spawn_with_listeners(&cmd, &[]),
                spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
            ];
            for r in errors {
                let e = match r {
                    Ok(mut child) => {
                        let _ = child.wait();
                        panic!("{what}: spawned");
                    }
                    Err(e) => e,
                };
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{what}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("writable"), "{what}: {msg}");
                assert!(msg.contains(&named.display().to_string()), "{what}: {msg}");
            }
        }
        // Back to 0755 and 0755: spawned.
        set_mode(&daemon, 0o755);
        set_mode(&sub, 0o755);
        let out = dir.path().join("out");
        let cmd = Command::new(&daemon)
            .args(["-c", "echo ok >\"$OUT\""])
            .env("OUT", &out)
            .inherit_stdio(false);
        assert_eq!(
            finish(spawn_with_listeners(&cmd, &[]).unwrap(), &out),
            "ok\n"
        );
    }

    /// A binary, or its directory, owned by a user other than root or this process's is
    /// refused, even with no write bit for group or others.
    #[test]
    fn binaries_owned_by_another_user_are_refused() {
        if !root(
            "binaries_owned_by_another_user_are_refused",
            "files chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("spawn-owner");
        let sub = dir.path().join("bin");
        std::fs::create_dir(&sub).unwrap();
        let daemon = sub.join("daemon");
        copy_exe("/bin/sh", &daemon, 0o755);
        let other = rustix::process::Uid::from_raw(4242);
        for (what, path) in [("binary", &daemon), ("directory", &sub)] {
            rustix::fs::chown(path.as_path(), Some(other), None).unwrap();
            let cmd = Command::new(&daemon)
                .args(["-c", "exit 0"])
                .inherit_stdio(false);
            let e = match spawn_with_listeners(&cmd, &[]) {
                Ok(mut child) => {
                    let _ = child.wait();
                    panic!("{what} owned by uid 4242: spawned");
                }
                Err(e) => e,
            };
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{what}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("uid 4242"), "{what}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            rustix::fs::chown(path.as_path(), Some(rustix::process::Uid::ROOT), None).unwrap();
        }
    }

    const ENV_CHILD: &str = "HOIS_SPAWN_ENV_CHILD";
    const ENV_CHILD_TEST: &str = "sys::spawn::tests::env_child_side";

    /// The environment a `SpawnSpec`'s daemon starts with, as the daemon sees it
    /// (`/proc/self/environ` of the exec'd program): sorted `NAME=value` lines.
    fn daemon_environ(
        dir: &TempDir,
        name: &str,
        spawn: impl FnOnce(&Command) -> Child,
    ) -> Vec<String> {
        let out = dir.path().join(name);
        let spec = crate::spec::SpawnSpec {
            binary: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "tr '\\000' '\\n' </proc/$$/environ >\"$OUT\"".into(),
            ],
            env: vec![
                ("OUT".into(), out.clone().into()),
                ("DAEMON_SETTING".into(), "from-the-spec".into()),
            ],
            ..Default::default()
        };
        let text = finish(spawn(&spec.command().inherit_stdio(false)), &out);
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }

    /// The child half of [`a_daemon_inherits_only_the_documented_environment`]: a supervisor
    /// whose own environment holds more than a daemon needs. Returns at once in a normal run.
    #[test]
    fn env_child_side() {
        if std::env::var_os(ENV_CHILD).is_none() {
            return;
        }
        let dir = TempDir::new("spawn-env");
        let (_ours, theirs) = socketpair_cloexec().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let names = |lines: &[String]| -> Vec<String> {
            lines
                .iter()
                .map(|l| l.split_once('=').map_or(l.as_str(), |(k, _)| k).to_owned())
                .collect()
        };
        let succ = daemon_environ(&dir, "successor", |cmd| {
            spawn_successor(cmd, theirs.as_fd()).unwrap()
        });
        assert_eq!(
            names(&succ),
            [
                "DAEMON_SETTING",
                "HANDOFF_CHANNEL_FD",
                "HANDOFF_LOG",
                "HANDOFF_ROLE",
                "LANG",
                "LC_TIME",
                "OUT",
                "PATH",
                "TZ"
            ],
            "{succ:#?}"
        );
        assert!(
            succ.contains(&"DAEMON_SETTING=from-the-spec".to_owned()),
            "{succ:#?}"
        );
        assert!(succ.contains(&"PATH=/usr/bin:/bin".to_owned()), "{succ:#?}");
        let mut cold_pid = 0;
        let cold = daemon_environ(&dir, "cold", |cmd| {
            let child = spawn_with_listeners(cmd, &[("http", tcp.as_fd())]).unwrap();
            cold_pid = child.id();
            child
        });
        assert_eq!(
            names(&cold),
            [
                "DAEMON_SETTING",
                "HANDOFF_LOG",
                "LANG",
                "LC_TIME",
                "LISTEN_FDNAMES",
                "LISTEN_FDS",
                "LISTEN_PID",
                "OUT",
                "PATH",
                "TZ"
            ],
            "{cold:#?}"
        );
        assert!(
            cold.contains(&format!("LISTEN_PID={cold_pid}")),
            "{cold:#?}"
        );
        println!("environments as documented");
    }

    /// A script (`#!`) runs, for a successor and for a cold start: the kernel hands it to its
    /// interpreter as `/dev/fd/N`, so that descriptor of the script (and only it) stays open.
    #[test]
    fn a_script_runs_with_its_own_descriptor_only() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        for case in ["successor", "cold"] {
            let dir = TempDir::new("spawn-script");
            let script = dir.path().join("daemon.sh");
            let source = dir.path().join("source");
            std::fs::write(
                &source,
                "#!/bin/sh\nexec >\"$OUT\"\necho \"$0 $*\"\nls -l /proc/$$/fd\n",
            )
            .unwrap();
            copy_exe(source.to_str().unwrap(), &script, 0o755);
            let out = dir.path().join("out");
            let cmd = Command::new(&script)
                .args(["a", "b"])
                .env("OUT", &out)
                .inherit_stdio(false);
            let (_ours, theirs) = socketpair_cloexec().unwrap();
            let child = match case {
                "successor" => spawn_successor(&cmd, theirs.as_fd()),
                _ => spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
            }
            .unwrap();
            let text = finish(child, &out);
            let first = text.lines().next().unwrap();
            let n: RawFd = first
                .strip_prefix("/dev/fd/")
                .and_then(|rest| rest.strip_suffix(" a b"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{case}: {text}"));
            let fds = fd_listing(&text);
            let name = script.display().to_string();
            assert_eq!(fds[&n], name, "{case}: {text}");
            // Besides 0, 1, 2 and the channel or listener: the script's descriptor, and the
            // interpreter's own for reading it (dash moves it to 10 or above).
            let mut placed: Vec<RawFd> = fds
                .iter()
                .filter(|(_, t)| {
                    **t == name || **t == socket_link(&theirs) || **t == socket_link(&tcp)
                })
                .map(|(f, _)| *f)
                .collect();
            placed.extend([0, 1, 2]);
            if case == "cold" {
                assert_eq!(fds[&3], socket_link(&tcp), "{case}: {text}");
            }
            assert_eq!(
                fds.keys().copied().collect::<Vec<_>>(),
                expected_fds(placed),
                "{case}: {text}"
            );
        }
    }

    /// The child's name (`/proc/<pid>/comm`) is its binary's file name, as after an exec by
    /// path; kernels before Linux 6.14 name a process exec'd with `execveat(AT_EMPTY_PATH)`
    /// after the descriptor number instead.
    #[test]
    fn the_child_is_named_after_its_binary() {
        let dir = TempDir::new("spawn-comm");
        let daemon = dir.path().join("my-daemon");
        copy_exe("/bin/sh", &daemon, 0o755);
        let out = dir.path().join("out");
        let cmd = Command::new(&daemon)
            .args(["-c", "cat /proc/$$/comm >\"$OUT\""])
            .env("OUT", &out)
            .inherit_stdio(false);
        let comm = finish(spawn_with_listeners(&cmd, &[]).unwrap(), &out);
        let old_kernel = comm.trim_end().bytes().all(|b| b.is_ascii_digit());
        assert!(comm == "my-daemon\n" || old_kernel, "{comm:?}");
    }

    /// A daemon started for a `SpawnSpec` (successor or cold start) inherits only the
    /// documented variables of the supervisor's environment (`PATH`, `LANG`, `LC_*`, `TZ`,
    /// `HANDOFF_*`), plus the spec's `env` and what the spawn sets; not the supervisor's other
    /// variables, secrets or `NOTIFY_SOCKET` among them.
    #[test]
    fn a_daemon_inherits_only_the_documented_environment() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                ENV_CHILD_TEST,
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env_clear()
            .env(ENV_CHILD, "1")
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("LC_TIME", "C")
            .env("TZ", "UTC")
            .env("HANDOFF_LOG", "on")
            .env("HOME", "/root")
            .env("SECRET_TOKEN", "hunter2")
            .env("NOTIFY_SOCKET", "/run/systemd/notify")
            .env("LISTEN_PID", "1")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "x")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child: {}\n{text}", out.status);
        assert!(text.contains("environments as documented"), "{text}");
    }
}
