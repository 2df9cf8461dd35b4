//! Watching processes through pidfds: [`Watched`], [`wait_any`], and the pidfd of a socket's
//! peer ([`peer_pidfd`]).

use super::*;

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
    use crate::sys::testutil::is_cloexec;
    use std::os::unix::process::ExitStatusExt;

    /// Bound on every wait for a child in these tests.
    const BOUND: Duration = Duration::from_secs(30);

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
