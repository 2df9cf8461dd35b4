//! The system layer shared by the drivers: everything `handoff-proto`'s outputs ask of the
//! operating system, as small blocking-agnostic functions over file descriptors.
//!
//! - [`conn`]: a non-blocking control connection (frames out through an outbox, bytes and
//!   descriptors in), a `poll(2)` wait, and a waker.
//! - [`fdpass`]: send and receive bytes with listener descriptors (`SCM_RIGHTS`).
//! - [`sockcheck`]: check that a received descriptor is the listener kind announced, and put
//!   it in the mode this process needs.
//! - [`lock`]: the data-directory `flock`, its lock record, and killing a lock holder only
//!   once it is proven to hold the lock ([`proc::Proven::lock_holder`]).
//! - [`fscheck`]: opening the files this layer trusts (journal, lock files, control socket path)
//!   relative to a checked directory, never through a link, checked with `fstat`.
//! - [`journal_file`]: atomic replacement and reading of the supervisor's journal.
//! - [`peercred`]: peer credentials of a control connection, and binding the control socket
//!   with mode 0600.
//! - [`spawn`]: spawning a successor with its channel, or a daemon cold with its listeners at
//!   3, 4, … (`LISTEN_FDS`); watching and killing processes through pidfds.
//! - [`supervisor_lock`]: the supervisor's identity, a `flock` it holds for its whole life,
//!   and the daemon's check that a control connection comes from its holder.
//! - [`proc`]: process identity: a pid read from a file identifies nobody until proven
//!   ([`proc::Proven`]); signals go only through pidfds of proven processes.
//!
//! Linux only. Every descriptor created or received here is close-on-exec, so nothing leaks
//! into a spawned successor by accident: a descriptor is made inheritable only by [`spawn`],
//! in the child, between `fork` and `exec`. All system calls go through `rustix`, except
//! `getsockopt(SO_PEERPIDFD)`, which `rustix` does not wrap. `unsafe` is denied in the layer
//! (below); [`spawn`] alone allows it, for `pre_exec`, for placing descriptors at fixed
//! numbers in the child and for that `getsockopt`, each use with a SAFETY comment.

#![deny(unsafe_code)]

pub mod conn;
pub mod fdpass;
pub mod fscheck;
pub mod journal_file;
pub mod lock;
pub mod peercred;
pub mod proc;
pub mod sockcheck;
pub mod spawn;
pub mod supervisor_lock;

use std::os::fd::RawFd;

use handoff_proto::MAX_FDS_PER_MESSAGE;

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// Most descriptors accepted in `LISTEN_FDS`, and queued on a control connection: 64 full
/// `SCM_RIGHTS` messages ([`MAX_FDS_PER_MESSAGE`] each), 16,192. That is above the 10,000
/// listeners the scale benchmark asks for (`BENCHMARKS.md`; this machine's descriptor limit
/// stops it at 9,000). Four messages, 1,012, was the limit before, and refused such a cold
/// start. A larger count is a launcher bug,
/// not a configuration. The process's descriptor limit must allow twice the listeners.
pub const MAX_INHERITED_FDS: usize = 64 * MAX_FDS_PER_MESSAGE;

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers of the crate's tests: a fresh temporary directory per test (made with `std`
    //! only), descriptor checks, and the rule for tests that need root ([`root`]).

    use std::io;
    use std::os::fd::AsFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// A directory under the system temp dir, removed (best-effort) on drop.
    #[derive(Debug)]
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            let base = std::env::temp_dir();
            loop {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let p = base.join(format!("hois-{}-{tag}-{n}", std::process::id()));
                match std::fs::create_dir(&p) {
                    Ok(()) => return TempDir(p),
                    // Left behind by an earlier run whose pid we reuse: take the next name.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => panic!("cannot create temp dir {}: {e}", p.display()),
                }
            }
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether `FD_CLOEXEC` is set on `fd`.
    pub(crate) fn is_cloexec(fd: impl AsFd) -> bool {
        rustix::io::fcntl_getfd(fd)
            .expect("F_GETFD")
            .contains(rustix::io::FdFlags::CLOEXEC)
    }

    /// Wait (30 s at most, on a pidfd) for `child`, which writes its output to `out`, to
    /// exit: that output. A child that runs on is killed; one that runs on or fails is a panic
    /// showing its output, `what` saying which.
    pub(crate) fn finish(mut child: std::process::Child, out: &Path, what: &str) -> String {
        use crate::sys::spawn::{wait_any, Watched};
        let bound = std::time::Duration::from_secs(30);
        let w = Watched::open(child.id()).expect("a pidfd on our child");
        if wait_any(&[&w], bound).expect("wait_any") != [0] {
            let _ = w.kill();
            let _ = child.wait();
            panic!("{what}: the child did not exit within {bound:?}");
        }
        let status = child.wait().expect("wait");
        let text = std::fs::read_to_string(out).unwrap_or_default();
        assert!(
            status.success(),
            "{what}: child {status}\n--- child output ---\n{text}"
        );
        text
    }

    /// Whether the test `test`, which needs root for `why` ("a file of another uid"), may run:
    /// `true` as root. Otherwise one line on stderr (`SKIPPED <test>: needs root (<why>)`) and
    /// `false`, for the test to return at once; with `HANDOFF_REQUIRE_ROOT_TESTS=1` (CI), a
    /// panic instead, so that a run that must prove the root-only tests cannot skip them.
    pub(crate) fn root(test: &str, why: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        if std::env::var_os("HANDOFF_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
            panic!("{test} needs root ({why}), and HANDOFF_REQUIRE_ROOT_TESTS=1");
        }
        eprintln!("SKIPPED {test}: needs root ({why})");
        false
    }

    /// Spawn `make()` as pid `pid` (free now, reaped): `pid - 1` is written to
    /// `/proc/sys/kernel/ns_last_pid` (root), and the spawn retried, bounded, while another
    /// process takes the pid first.
    pub(crate) fn spawn_at_pid(
        pid: u32,
        make: impl Fn() -> std::process::Command,
    ) -> std::process::Child {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
                    .expect("write ns_last_pid");
                let mut c = make().spawn().expect("spawn");
                if c.id() == pid {
                    return c;
                }
                drop(c.stdin.take());
                let _ = c.kill();
                let _ = c.wait();
            }
            assert!(
                std::time::Instant::now() < until,
                "no process could get pid {pid}"
            );
            std::thread::yield_now();
        }
    }

    /// `(st_dev, st_ino)` of `fd`: equal for two descriptors of the same socket or file.
    pub(crate) fn identity(fd: impl AsFd) -> (u64, u64) {
        let st = rustix::fs::fstat(fd).expect("fstat");
        (st.st_dev, st.st_ino)
    }
}
