//! Who the supervisor is: the process that holds the *supervisor lock*.
//!
//! A supervisor takes an exclusive `flock` on `<journal>.lock` when it starts and keeps it for
//! its whole life ([`SupervisorLock`]). Two supervisors on one journal therefore cannot run
//! at once: the second is refused at start, naming the first. The lock file is created with
//! mode 0600 and must be a regular file owned by the supervisor's uid, with no permission for
//! group or others (anyone who can open a file can `flock` it) and a single name, in a
//! directory nobody else may write; it is opened like every file this layer trusts
//! ([`fscheck`]).
//!
//! The supervisor tells every daemon it starts (successor or cold start) which file that is,
//! in [`ENV_SUPERVISOR_LOCK`]: its device and inode as `/proc/locks` prints them
//! ([`LockId`]). The daemon then admits a control connection only from a process that holds
//! a `flock` on that file ([`check_peer`]): the process at the other end of the socket is
//! named by a pidfd the kernel makes for it (`SO_PEERPIDFD`), `/proc/locks` must show its pid
//! holding the lock, and the pidfd must still show it alive after that reading, so the pid
//! read there was that process's and not a later one's. A supervisor restarted after a crash
//! takes the same lock again (the kernel released its predecessor's) and is admitted; a
//! process of the daemon's uid that is not the supervisor is not, while a supervisor lives.
//!
//! What this does not cover: a process that can open the lock file can take it while no
//! supervisor runs and is then admitted. With the supervisor running as root and the file
//! root's (mode 0600), that is root only; with a supervisor of the daemon's own uid, any
//! process of that uid can kill the supervisor and take the lock.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use handoff_proto::Pid;
use rustix::fs::FlockOperation;
use rustix::io::Errno;

use crate::sys::fscheck::{self, Rules, Unsafe};
use crate::sys::lock;
use crate::sys::spawn::Watched;

/// The environment variable in which a supervisor names its lock file to the daemons it
/// starts: a [`LockId`], `<major>:<minor>:<inode>` as `/proc/locks` prints it.
pub const ENV_SUPERVISOR_LOCK: &str = "HANDOFF_SUPERVISOR_LOCK";

/// What the lock file must be: besides a regular file of this process's effective uid, one
/// that nobody else may open (whoever can open it can `flock` it), with a single name.
const RULES: Rules = Rules {
    forbidden_mode: 0o077,
    max_len: None,
    single_link: true,
    others_could: "flock it and pass for the supervisor",
    after_remove: " (the supervisor creates it again, with mode 0600)",
};

/// How long [`SupervisorLock::acquire`] retries a lock that only this process holds (see
/// there).
const SELF_HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The supervisor lock of the journal `journal`: `<journal>.lock`.
pub fn lock_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// A file as `/proc/locks` names it: the device of its filesystem (major and minor, printed
/// in hex there) and its inode number. Written and parsed as `/proc/locks` prints it,
/// `<major>:<minor>:<inode>` (`fd:01:1234`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockId {
    /// Major device number.
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// Inode number.
    pub ino: u64,
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}:{}", self.major, self.minor, self.ino)
    }
}

impl std::str::FromStr for LockId {
    type Err = String;

    /// Strict: exactly `<hex>:<hex>:<decimal>`, nothing around it.
    fn from_str(s: &str) -> Result<LockId, String> {
        let bad = || format!("{s:?} is not <major>:<minor>:<inode> (hex:hex:decimal)");
        let mut parts = s.split(':');
        let (Some(ma), Some(mi), Some(ino), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex = |t: &str| {
            if t.is_empty() || t.len() > 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(t, 16).ok()
        };
        let dec = |t: &str| {
            if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            t.parse::<u64>().ok()
        };
        match (hex(ma), hex(mi), dec(ino)) {
            (Some(major), Some(minor), Some(ino)) => Ok(LockId { major, minor, ino }),
            _ => Err(bad()),
        }
    }
}

impl LockId {
    /// The supervisor lock named by `value`, the content of [`ENV_SUPERVISOR_LOCK`]: `None`
    /// when it is unset, an error (saying why) when it is set but not a [`LockId`].
    pub fn from_env_value(value: Option<&std::ffi::OsStr>) -> Result<Option<LockId>, String> {
        let Some(v) = value else {
            return Ok(None);
        };
        let v = v.to_str().ok_or_else(|| format!("{v:?} is not UTF-8"))?;
        v.parse().map(Some)
    }

    /// The supervisor lock named in this process's environment (see
    /// [`from_env_value`](Self::from_env_value)).
    pub fn from_env() -> Result<Option<LockId>, String> {
        LockId::from_env_value(std::env::var_os(ENV_SUPERVISOR_LOCK).as_deref())
    }

    fn of_stat(st: &rustix::fs::Stat) -> LockId {
        LockId {
            major: rustix::fs::major(st.st_dev),
            minor: rustix::fs::minor(st.st_dev),
            ino: st.st_ino,
        }
    }
}

/// Why [`SupervisorLock::acquire`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorLockError {
    /// Another supervisor (another process, or another one in this process) holds it.
    #[error("another supervisor ({}) holds {}", holders_text(holders), path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, from `/proc/locks` (empty if it could not be told).
        holders: Vec<Pid>,
    },
    /// The file is not one this supervisor can trust.
    #[error("supervisor lock {}: {detail}", path.display())]
    Unsafe {
        /// The lock file.
        path: PathBuf,
        /// What is wrong, and what to do.
        detail: String,
    },
    /// Opening or locking failed.
    #[error("supervisor lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
}

fn holders_text(holders: &[Pid]) -> String {
    let me = std::process::id();
    let name = |p: &Pid| {
        if *p == me {
            format!("{p}, this process")
        } else {
            p.to_string()
        }
    };
    match holders {
        [] => "pid unknown".into(),
        [one] => format!("pid {}", name(one)),
        many => format!(
            "pids {}",
            many.iter().map(name).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The supervisor lock, held (see the [module docs](self)). Dropping it releases the lock.
#[derive(Debug)]
pub struct SupervisorLock {
    file: OwnedFd,
    path: PathBuf,
    id: LockId,
}

impl SupervisorLock {
    /// Take the lock on `path` without waiting: create it (mode 0600) if missing, check it
    /// (in a directory of this uid or root that others may not write unless it is sticky; a
    /// regular file, not a symbolic link, owned by this process's effective uid, no permission
    /// for group or others, one link), and `flock` it exclusively. A file that fails a check
    /// is [`SupervisorLockError::Unsafe`], and is left as it is. Held by someone else:
    /// [`SupervisorLockError::Held`], naming the holders. The descriptor is close-on-exec, so
    /// no daemon this supervisor starts holds the lock with it.
    ///
    /// One wait: a lock that `/proc/locks` shows held by this very process is retried for up
    /// to a second. A `flock` belongs to the open file, and a child being spawned by another
    /// thread holds a copy of every descriptor until its `exec`, so a lock that an earlier
    /// supervisor of this process has just released can look held for that long. A second
    /// supervisor that really runs in this process is refused after that second.
    pub fn acquire(path: &Path) -> Result<SupervisorLock, SupervisorLockError> {
        let io_err = |source: io::Error| SupervisorLockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (file, st) =
            fscheck::open_or_create(path, &RULES).map_err(|e| match Unsafe::of(&e) {
                Some(u) => SupervisorLockError::Unsafe {
                    path: path.to_path_buf(),
                    detail: format!("{}; {}", u.problem, u.fix),
                },
                None => io_err(e),
            })?;
        let until = std::time::Instant::now() + SELF_HELD_WAIT;
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(Errno::INTR) => continue,
                Err(Errno::WOULDBLOCK) => {
                    let id = LockId::of_stat(&st);
                    let holders =
                        lock::flock_holders(id.major, id.minor, id.ino).unwrap_or_default();
                    // Held by this process only: maybe by a descriptor it has just closed
                    // (an earlier supervisor dropped), still open in a child another thread
                    // is forking, until that child's `exec` closes it. Wait that out, briefly.
                    let me = std::process::id();
                    if !holders.is_empty()
                        && holders.iter().all(|&p| p == me)
                        && std::time::Instant::now() < until
                    {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    }
                    return Err(SupervisorLockError::Held {
                        path: path.to_path_buf(),
                        holders,
                    });
                }
                Err(e) => return Err(io_err(e.into())),
            }
        }
        // How `/proc/locks` names the file is what the daemons compare with: take it from
        // this descriptor's own lock line (`/proc/self/fdinfo`), which is the same text. It
        // can differ from `fstat`'s device on some filesystems (overlayfs, btrfs subvolumes).
        let id = fdinfo_lock_id(file.as_fd()).unwrap_or_else(|| LockId::of_stat(&st));
        Ok(SupervisorLock {
            file,
            path: path.to_path_buf(),
            id,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file as `/proc/locks` names it: the value of [`ENV_SUPERVISOR_LOCK`].
    pub fn id(&self) -> LockId {
        self.id
    }
}

impl AsFd for SupervisorLock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The file `fd` holds a `flock` on, from the `lock:` line of `/proc/self/fdinfo/<fd>`.
fn fdinfo_lock_id(fd: BorrowedFd<'_>) -> Option<LockId> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let me = std::process::id();
    info.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .filter_map(|l| lock::parse_flock_line(l.trim()))
        .find(|&(pid, ..)| pid == me)
        .map(|(_, major, minor, ino)| LockId { major, minor, ino })
}

/// Whether the peer of the accepted control connection `sock`, whose `SO_PEERCRED` pid is
/// `pid`, holds the supervisor lock `id`. `Ok(())` admits it; `Err` says why not.
///
/// The peer is named by a pidfd from `SO_PEERPIDFD`, the process that connected; on a kernel
/// without it (before 6.5), by `pidfd_open(pid)`, which a pid reused between the connect and
/// this check could fool. `/proc/locks` must show `pid` holding a `flock` on `id`, and then the
/// pidfd must show the process still alive: a process that had exited (its pid free to be
/// reused, maybe by the supervisor) is refused.
pub fn check_peer(sock: BorrowedFd<'_>, pid: Pid, id: LockId) -> Result<Watched, String> {
    let peer = Watched::peer(sock, pid).map_err(|e| format!("peer pid {pid}: {e}"))?;
    let held = lock::holds_flock(pid, id.major, id.minor, id.ino)
        .map_err(|e| format!("reading /proc/locks: {e}"))?;
    if !held {
        return Err(format!(
            "peer pid {pid} does not hold the supervisor lock {id} ({ENV_SUPERVISOR_LOCK})"
        ));
    }
    if peer
        .has_exited()
        .map_err(|e| format!("peer pid {pid}: polling its pidfd: {e}"))?
    {
        return Err(format!(
            "peer pid {pid} exited after connecting (its pid may name another process now)"
        ));
    }
    Ok(peer)
}

/// The pidfd of the process that spawned this successor, taken from its channel (see
/// [`remember_spawner`]), for the [`Admission`] the successor makes once it is the incumbent.
static SPAWNER: std::sync::Mutex<Option<Watched>> = std::sync::Mutex::new(None);

/// Remember the peer of a successor's channel, the socketpair its supervisor made and handed
/// it at spawn: by construction the process that spawned this successor, which is the
/// supervisor holding the lock. Proven by the kernel (`SO_PEERPIDFD`); where that is not
/// available nothing is remembered, and the first connection takes the slow check.
pub(crate) fn remember_spawner(channel: BorrowedFd<'_>) {
    let Ok((pid, _, _)) = crate::sys::peercred::peer_credentials(channel) else {
        return;
    };
    if let Ok(pidfd) = crate::sys::spawn::peer_pidfd(channel) {
        if let Ok(mut s) = SPAWNER.lock() {
            *s = Some(Watched::from_pidfd(pid, pidfd));
        }
    }
}

/// A daemon's admission of control connections under a supervisor lock: [`check_peer`], with
/// the supervisor it has proven remembered.
///
/// [`check_peer`] reads `/proc/locks`, and the kernel makes that reading wait for an RCU grace
/// period after the lock table changed (measured: about 10 ms right after a handoff's
/// `flock`s, 0.03 ms otherwise). A handoff's critical path must not pay that, so the process
/// proven once, by that check or as the spawner of this successor ([`remember_spawner`]), is
/// remembered by a pidfd: while that process lives its pid is its own, so a peer with that pid
/// is that process, admitted at once. Any other peer takes the full check, and becomes the one
/// remembered if it passes (a restarted supervisor).
#[derive(Debug)]
pub struct Admission {
    id: LockId,
    known: Option<Watched>,
}

impl Admission {
    /// The admission for the lock `id`, seeded with the spawner of this successor if
    /// [`remember_spawner`] saw one.
    pub fn new(id: LockId) -> Admission {
        let known = SPAWNER.lock().ok().and_then(|mut s| s.take());
        Admission { id, known }
    }

    /// The lock whose holder is admitted.
    pub fn id(&self) -> LockId {
        self.id
    }

    /// Whether the peer of `sock`, whose `SO_PEERCRED` pid is `pid`, is the supervisor.
    pub fn admit(&mut self, sock: BorrowedFd<'_>, pid: Pid) -> Result<(), String> {
        if let Some(known) = &self.known {
            if known.pid() == pid && matches!(known.has_exited(), Ok(false)) {
                return Ok(());
            }
        }
        self.known = Some(check_peer(sock, pid, self.id)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{is_cloexec, root, TempDir};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lock_ids_print_and_parse_as_proc_locks_does() {
        let id = LockId {
            major: 0xfd,
            minor: 1,
            ino: 5679,
        };
        assert_eq!(id.to_string(), "fd:01:5679");
        assert_eq!("fd:01:5679".parse::<LockId>(), Ok(id));
        assert_eq!(
            "103:0a:42".parse::<LockId>(),
            Ok(LockId {
                major: 0x103,
                minor: 0x0a,
                ino: 42
            })
        );
        for bad in [
            "",
            "fd:01",
            "fd:01:",
            ":01:5",
            "fd:01:5:6",
            "fd:01:-5",
            "fd:01:+5",
            " fd:01:5",
            "fd:01:5 ",
            "xx:01:5",
            "fd:01:0x5",
            "100000000:01:5",
            "fd:01:99999999999999999999",
        ] {
            let err = bad.parse::<LockId>().expect_err(bad);
            assert!(
                err.contains("is not <major>:<minor>:<inode>"),
                "{bad}: {err}"
            );
        }
        assert_eq!(LockId::from_env_value(None), Ok(None));
        assert_eq!(
            LockId::from_env_value(Some("00:2e:7".as_ref())),
            Ok(Some(LockId {
                major: 0,
                minor: 0x2e,
                ino: 7
            }))
        );
        assert!(LockId::from_env_value(Some("garbage".as_ref())).is_err());
    }

    #[test]
    fn acquire_creates_a_private_file_refuses_a_second_holder_and_names_it() {
        let dir = TempDir::new("suplock");
        let path = lock_path(&dir.path().join("j.journal"));
        assert!(path.to_string_lossy().ends_with("j.journal.lock"));
        let held = SupervisorLock::acquire(&path).expect("first");
        assert!(is_cloexec(&held));
        let meta = std::fs::metadata(&path).expect("stat");
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // `/proc/locks` names it as `id()` says, with this process holding it.
        let id = held.id();
        assert!(
            lock::holds_flock(std::process::id(), id.major, id.minor, id.ino).expect("/proc/locks")
        );

        // A second supervisor, even in this process, is refused and told who holds it.
        let err = SupervisorLock::acquire(&path).expect_err("second");
        let me = std::process::id();
        assert!(
            matches!(&err, SupervisorLockError::Held { holders, .. } if holders == &vec![me]),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "another supervisor (pid {me}, this process) holds {}",
                path.display()
            )
        );
        // Released on drop; the file stays, with the same identity.
        drop(held);
        let again = SupervisorLock::acquire(&path).expect("after the first is gone");
        assert_eq!(again.id(), id);
    }

    #[test]
    fn unsafe_lock_files_are_refused() {
        let dir = TempDir::new("suplock-unsafe");
        // Readable by others: anyone could open it and flock it.
        let loose = dir.path().join("loose");
        std::fs::write(&loose, b"").expect("write");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = SupervisorLock::acquire(&loose).expect_err("0644");
        assert!(err.to_string().contains("mode 0644"), "{err}");
        // A symbolic link, even to a good file.
        let good = dir.path().join("good");
        drop(SupervisorLock::acquire(&good).expect("good"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        let err = SupervisorLock::acquire(&link).expect_err("symlink");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        // Not a regular file.
        let sub = dir.path().join("dir");
        std::fs::create_dir(&sub).expect("mkdir");
        let err = SupervisorLock::acquire(&sub).expect_err("a directory");
        assert!(
            matches!(
                err,
                SupervisorLockError::Io { .. } | SupervisorLockError::Unsafe { .. }
            ),
            "{err:?}"
        );
    }

    /// A second name for the lock file (a hard link), whoever made it: refused under both.
    #[test]
    fn a_lock_file_with_a_second_name_is_refused() {
        let dir = TempDir::new("suplock-link");
        let first = dir.path().join("first");
        drop(SupervisorLock::acquire(&first).expect("first"));
        let second = dir.path().join("second");
        std::fs::hard_link(&first, &second).expect("link");
        for p in [&first, &second] {
            let err = SupervisorLock::acquire(p).expect_err("two links");
            assert!(err.to_string().contains("has 2 links"), "{err}");
        }
    }

    /// In a directory others may write (without the sticky bit), another user could swap the
    /// file: refused, and nothing is created there.
    #[test]
    fn a_lock_file_in_a_directory_others_may_write_is_refused() {
        let dir = TempDir::new("suplock-dir");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = SupervisorLock::acquire(&open.join("s.lock")).expect_err("open directory");
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        assert!(
            !open.join("s.lock").exists(),
            "created in a refused directory"
        );
    }

    #[test]
    fn a_lock_file_of_another_uid_is_refused() {
        if !root(
            "a_lock_file_of_another_uid_is_refused",
            "a lock file chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("suplock-owner");
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, b"").expect("write");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let err = SupervisorLock::acquire(&theirs).expect_err("another owner");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn a_peer_is_admitted_only_while_it_holds_the_lock() {
        let dir = TempDir::new("suplock-peer");
        let path = dir.path().join("s.lock");
        let held = SupervisorLock::acquire(&path).expect("lock");
        let id = held.id();
        let (a, _b) = socketpair_cloexec().expect("pair");
        let me = std::process::id();
        // The peer (this process) holds it.
        check_peer(a.as_fd(), me, id).expect("admitted");
        // Another file, which nobody locks: not the supervisor lock. (A made-up inode number
        // could be a file another test of this process holds a flock on.)
        let unlocked = dir.path().join("unlocked");
        std::fs::write(&unlocked, b"").expect("write");
        let other = LockId {
            ino: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&unlocked).unwrap()),
            ..id
        };
        let err = check_peer(a.as_fd(), me, other).expect_err("another lock");
        assert!(err.contains("does not hold the supervisor lock"), "{err}");
        // Released: refused.
        drop(held);
        let err = check_peer(a.as_fd(), me, id).expect_err("released");
        assert!(
            err.contains(&format!("peer pid {me} does not hold")),
            "{err}"
        );
    }

    #[test]
    fn admission_remembers_the_proven_supervisor_and_checks_anyone_else() {
        let dir = TempDir::new("suplock-admission");
        let held = SupervisorLock::acquire(&dir.path().join("s.lock")).expect("lock");
        let (a, _b) = socketpair_cloexec().expect("pair");
        let me = std::process::id();
        let mut admission = Admission {
            id: held.id(),
            known: None,
        };
        // A pid that is not the peer's holds nothing: the full check refuses it.
        let err = admission.admit(a.as_fd(), 1).expect_err("pid 1");
        assert!(err.contains("does not hold"), "{err}");
        assert!(admission.known.is_none());
        // The holder passes the full check and is remembered by its pidfd.
        admission.admit(a.as_fd(), me).expect("the holder");
        assert_eq!(admission.known.as_ref().map(Watched::pid), Some(me));
        // Remembered while it lives, so no /proc/locks reading on the next connection: it is
        // admitted even once the lock is gone (the full check would refuse it).
        drop(held);
        check_peer(a.as_fd(), me, admission.id()).expect_err("the full check refuses");
        admission.admit(a.as_fd(), me).expect("remembered");
        // Anyone else still takes the full check.
        admission.admit(a.as_fd(), 1).expect_err("pid 1 again");
    }

    #[test]
    fn the_peer_pidfd_names_the_connecting_process() {
        let (a, _b) = socketpair_cloexec().expect("pair");
        let pidfd = crate::sys::spawn::peer_pidfd(a.as_fd()).expect("SO_PEERPIDFD on Linux 6.5+");
        assert!(is_cloexec(&pidfd));
        let raw = pidfd.as_raw_fd();
        let peer = Watched::from_pidfd(std::process::id(), pidfd);
        assert!(!peer.has_exited().expect("poll"));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).expect("fdinfo");
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .map(str::trim)
            .expect("a Pid: line");
        assert_eq!(pid, std::process::id().to_string());
        // Not a socket: an error, not a panic.
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(crate::sys::spawn::peer_pidfd(f.as_fd()).is_err());
    }
}
