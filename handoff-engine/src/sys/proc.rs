//! Process identity: telling a process apart from whoever gets its pid later.
//!
//! A pid is only a number. The kernel gives it to another process once the first one has been
//! reaped, within a boot and, since numbering starts again, across boots. So a pid read from
//! a file (the supervisor's journal, a lock record, `/proc/locks`) identifies nobody until it
//! is proven to be the process meant, and a process is signalled only through a pidfd opened
//! on a process that was proven. [`Proven`] is that: a pidfd, and the
//! [`ProcessIdentity`] (boot id and start time) of the process it refers to.
//!
//! Every proof has the same race-free order. `pidfd_open(pid)` first: the pidfd refers to
//! whoever has the pid at that moment, for good. Then whatever `/proc/<pid>` says is read.
//! Then the pidfd is polled: if its process is still alive, it held the pid all along, so
//! what was read was about it. Only then is what was read compared with what was expected.
//!
//! The proofs:
//!
//! - [`Proven::child`]: a child of this process that has not been reaped. Its pid cannot have
//!   been reused: the kernel keeps it until the parent reaps it.
//! - [`Proven::peer`]: the process at the other end of a connected Unix socket. With Linux
//!   6.5 or later the kernel hands out a pidfd on it (`SO_PEERPIDFD`), which cannot refer to
//!   anybody else. On older kernels the pid from `SO_PEERCRED` is opened, and a process that
//!   exited between the connect and that open, its pid reused at once, would be taken for the
//!   peer: a window of microseconds that also needs a whole pid cycle.
//! - [`Proven::verify`]: a pid read from a file, with the identity recorded for it when it
//!   was proven. A different boot id or start time means another process: not proven.
//! - [`Proven::lock_holder`]: the process holds an open file description that holds a
//!   `flock` on a given file, as its own descriptor table shows (`/proc/<pid>/fdinfo`).
//!   `/proc/locks` is not proof: it names the process that *took* the lock, which may have
//!   exited while a process that inherited the descriptor holds it on, and its pid be reused.
//!
//! Limits: the start time is read in this process's time namespace, and pids are those of its
//! pid namespace; a supervisor restarted in another namespace finds no identity matching, and
//! leaves those processes alone (it never mistakes them).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;

use handoff_proto::Pid;
pub use handoff_proto::ProcessIdentity;
use rustix::process::Signal;

use crate::sys::spawn::Watched;

/// Where the kernel shows this boot's id (a random UUID drawn at boot).
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id, as 16 bytes (read once).
pub fn boot_id() -> io::Result<[u8; 16]> {
    static CACHED: OnceLock<[u8; 16]> = OnceLock::new();
    if let Some(id) = CACHED.get() {
        return Ok(*id);
    }
    let text = std::fs::read_to_string(BOOT_ID)?;
    let id = parse_boot_id(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{BOOT_ID}: not a UUID: {:?}", text.trim_end()),
        )
    })?;
    Ok(*CACHED.get_or_init(|| id))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (and a newline), strictly.
fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let groups: Vec<&str> = text.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The start time (field 22, `starttime`, clock ticks after boot) from the text of
/// `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so the fields are counted after the *last* `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state); field 22 is the 20th from there.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The start time of whoever has `pid` now. Proves nothing by itself: see [`Proven`].
fn read_start_ticks(pid: Pid) -> io::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)?;
    parse_start_ticks(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: no start time in {stat:?}"),
        )
    })
}

/// pidfs's magic number (`PIDFS_MAGIC`, include/uapi/linux/magic.h).
const PIDFS_MAGIC: u32 = 0x5049_4446;

/// The inode number of `pidfd` if it lives on pidfs (Linux 6.9 or later), where every process
/// has its own; `None` where pidfds are anonymous inodes.
fn pidfd_inode(pidfd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let fs = rustix::fs::fstatfs(pidfd)?;
    if fs.f_type as u32 != PIDFS_MAGIC {
        return Ok(None);
    }
    Ok(Some(rustix::fs::fstat(pidfd)?.st_ino))
}

/// How an identity reads in a message: `boot 07e664c8…, started at tick 12345`.
struct Shown<'a>(&'a ProcessIdentity);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0.boot_id[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "… boot, started at tick {}", self.0.start_ticks)?;
        match self.0.pidfd_inode {
            Some(ino) => write!(f, ", pidfs inode {ino}"),
            None => Ok(()),
        }
    }
}

/// Why a pid is not proven to be the process meant. None of these is a reason to signal it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unproven {
    /// No process has the pid, or the one that had it has exited (a zombie counts as exited).
    #[error("pid {pid} has exited")]
    Gone {
        /// The pid.
        pid: Pid,
    },
    /// Another process has the pid now.
    #[error(
        "pid {pid} is another process now ({}, not {})",
        Shown(found),
        Shown(expected)
    )]
    Other {
        /// The pid.
        pid: Pid,
        /// The identity recorded for it.
        expected: ProcessIdentity,
        /// The identity of the process that has it now.
        found: ProcessIdentity,
    },
    /// The process holds no `flock` on the file (through any descriptor of its own).
    #[error("pid {pid} holds no lock on {}", path.display())]
    NotHolder {
        /// The pid.
        pid: Pid,
        /// The lock file.
        path: PathBuf,
    },
    /// `/proc` or a pidfd could not be read: nothing can be told about the pid.
    #[error("pid {pid} cannot be checked: {source}")]
    Io {
        /// The pid.
        pid: Pid,
        /// The failure.
        source: io::Error,
    },
}

/// A process proven to be the one meant: a pidfd on it, and its identity. Signals go through
/// the pidfd, which never reaches a process that reused the pid; see the [module docs](self)
/// for the proofs.
#[derive(Debug)]
pub struct Proven {
    watched: Watched,
    identity: ProcessIdentity,
}

impl Proven {
    /// `watched`, if its process is still alive after `read` (about that pid) ran: `read`'s
    /// answer was then about that process.
    fn confirm<T>(
        watched: Watched,
        read: impl FnOnce(Pid) -> io::Result<T>,
    ) -> Result<(Watched, T), Unproven> {
        let pid = watched.pid();
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let value = match read(pid) {
            Ok(v) => v,
            // `/proc/<pid>` went away: the pidfd's process is gone.
            Err(e) if gone(&e) => return Err(Unproven::Gone { pid }),
            Err(source) => return Err(Unproven::Io { pid, source }),
        };
        match watched.has_exited() {
            Ok(false) => Ok((watched, value)),
            Ok(true) => Err(Unproven::Gone { pid }),
            Err(source) => Err(Unproven::Io { pid, source }),
        }
    }

    /// Open a pidfd on `pid`; `Gone` if nobody has it.
    fn open(pid: Pid) -> Result<Watched, Unproven> {
        Watched::open(pid).map_err(|e| Proven::open_error(pid, e))
    }

    /// Opening a pidfd on `pid` failed with `e`: `Gone` if nobody has that pid.
    fn open_error(pid: Pid, e: io::Error) -> Unproven {
        match e.kind() {
            io::ErrorKind::NotFound => Unproven::Gone { pid },
            _ => Unproven::Io { pid, source: e },
        }
    }

    fn stamp(watched: Watched) -> Result<Proven, Unproven> {
        let pid = watched.pid();
        let (watched, start_ticks) = Proven::confirm(watched, read_start_ticks)?;
        let io = |source| Unproven::Io { pid, source };
        let identity = ProcessIdentity {
            boot_id: boot_id().map_err(io)?,
            start_ticks,
            pidfd_inode: pidfd_inode(watched.as_fd()).map_err(io)?,
        };
        Ok(Proven { watched, identity })
    }

    /// A child of this process that has not been reaped (call it right after the spawn, and
    /// before any `wait` on `child`). `Gone` if it has already exited.
    pub fn child(child: &Child) -> Result<Proven, Unproven> {
        Proven::stamp(Proven::open(child.id())?)
    }

    /// The process at the other end of the connected `AF_UNIX` stream socket `sock`: for the
    /// connecting end, the process that called `listen` on the socket it connected to. Its pid
    /// is the one `SO_PEERCRED` reports. Proven by the kernel's `SO_PEERPIDFD` (Linux 6.5 or
    /// later); before that, by a pidfd opened on the `SO_PEERCRED` pid (see the
    /// [module docs](self) for the window this leaves). `Gone` if that process has exited.
    pub fn peer(sock: BorrowedFd<'_>) -> Result<Proven, Unproven> {
        let (pid, _, _) = crate::sys::peercred::peer_credentials(sock)
            .map_err(|source| Unproven::Io { pid: 0, source })?;
        let watched = Watched::peer(sock, pid).map_err(|e| Proven::open_error(pid, e))?;
        Proven::stamp(watched)
    }

    /// The process that has `pid` now, if it is the one `expected` identifies (same boot, same
    /// start time). `Other` if another process has the pid, `Gone` if nobody does.
    pub fn verify(pid: Pid, expected: &ProcessIdentity) -> Result<Proven, Unproven> {
        let p = Proven::stamp(Proven::open(pid)?)?;
        if p.identity != *expected {
            return Err(Unproven::Other {
                pid,
                expected: *expected,
                found: p.identity,
            });
        }
        Ok(p)
    }

    /// The process `pid`, if it holds an open file description that holds a `flock` on the
    /// file at `path`, as its own `/proc/<pid>/fdinfo` shows (so whichever process took the
    /// lock, and whatever `/proc/locks` names). `NotHolder` if it holds none.
    ///
    /// Reading another process's `fdinfo` needs the permission to inspect it (same uid and
    /// dumpable, or `CAP_SYS_PTRACE`): without it this is `Io`, never a proof.
    pub fn lock_holder(pid: Pid, path: &Path) -> Result<Proven, Unproven> {
        let st = rustix::fs::stat(path).map_err(|e| Unproven::Io {
            pid,
            source: io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", path.display()),
            ),
        })?;
        let file = (
            rustix::fs::major(st.st_dev),
            rustix::fs::minor(st.st_dev),
            st.st_ino,
        );
        let watched = Proven::open(pid)?;
        let (watched, holds) = Proven::confirm(watched, |pid| holds_flock(pid, file))?;
        if !holds {
            return Err(Unproven::NotHolder {
                pid,
                path: path.to_path_buf(),
            });
        }
        Proven::stamp(watched)
    }

    /// The pid.
    pub fn pid(&self) -> Pid {
        self.watched.pid()
    }

    /// The identity proven.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    /// The pidfd: readable once the process has exited.
    pub fn watched(&self) -> &Watched {
        &self.watched
    }

    /// Whether the process has exited (a zombie counts as exited). Does not block.
    pub fn has_exited(&self) -> io::Result<bool> {
        self.watched.has_exited()
    }

    /// SIGKILL the process through its pidfd; one that has already exited is no error.
    pub fn kill(&self) -> io::Result<()> {
        self.watched.kill()
    }

    /// Send `sig` through the pidfd.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        self.watched.signal(sig)
    }

    /// The pidfd alone.
    pub fn into_watched(self) -> Watched {
        self.watched
    }

    /// A second handle on the same process (a duplicate of the pidfd).
    pub fn try_clone(&self) -> io::Result<Proven> {
        Ok(Proven {
            watched: self.watched.try_clone()?,
            identity: self.identity,
        })
    }
}

impl AsFd for Proven {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.watched.as_fd()
    }
}

/// Whether one of `pid`'s descriptors is an open file description that holds a `flock` on the
/// file `(major, minor, inode)`: its `fdinfo` shows the locks held through it as `lock:`
/// lines, in the format of `/proc/locks`. A descriptor closed during the scan is skipped;
/// `/proc/<pid>` gone is `NotFound`.
fn holds_flock(pid: Pid, file: (u32, u32, u64)) -> io::Result<bool> {
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let text = match std::fs::read_to_string(entry.path()) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let held = text
            .lines()
            .filter_map(|l| l.strip_prefix("lock:"))
            .filter_map(crate::sys::lock::parse_flock_line)
            .any(|(_, major, minor, ino)| (major, minor, ino) == file);
        if held {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{is_cloexec, root, TempDir};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::process::{Command, Stdio};

    /// A child blocked reading its stdin (a pipe): it exits when the pipe closes.
    fn blocked_child() -> Child {
        Command::new("/bin/sh")
            .args(["-c", "read x"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// This process's identity, read through a pidfd on itself.
    fn own_identity() -> ProcessIdentity {
        let w = Watched::open(std::process::id()).unwrap();
        Proven::stamp(w).unwrap().identity()
    }

    fn end(mut child: Child) {
        drop(child.stdin.take());
        let _ = child.wait();
    }

    #[test]
    fn start_time_is_counted_after_the_last_parenthesis() {
        let fields = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        for comm in ["sh", "a b", "x) (y", ")", "(((", "9 9 9 9)"] {
            let stat = format!("123 ({comm}) {fields}\n");
            assert_eq!(parse_start_ticks(&stat), Some(424242), "{comm:?}");
        }
        assert_eq!(parse_start_ticks("123 (sh) S 1 2"), None);
        assert_eq!(parse_start_ticks("no parenthesis at all"), None);
        // This process: what /proc/self/stat says.
        let me = std::process::id();
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(
            Some(read_start_ticks(me).unwrap()),
            parse_start_ticks(&text)
        );
    }

    #[test]
    fn boot_ids_parse_strictly() {
        let id = parse_boot_id("07e664c8-a68a-470a-b7d7-2b18b521c49b\n").unwrap();
        assert_eq!(&id[..4], &[0x07, 0xe6, 0x64, 0xc8]);
        assert_eq!(id[15], 0x9b);
        for bad in [
            "",
            "07e664c8a68a470ab7d72b18b521c49b",
            "07e664c8-a68a-470a-b7d7-2b18b521c49",
            "07e664c8-a68a-470a-b7d7-2b18b521c49bb",
            "g7e664c8-a68a-470a-b7d7-2b18b521c49b",
            "07e664c8-a68a-470a-b7d7-2b18b521c4+b",
        ] {
            assert_eq!(parse_boot_id(bad), None, "{bad:?}");
        }
        assert_eq!(boot_id().unwrap(), boot_id().unwrap());
    }

    #[test]
    fn a_child_is_proven_and_verified_and_another_process_is_not() {
        let mut a = blocked_child();
        let b = blocked_child();
        let pa = Proven::child(&a).unwrap();
        let pb = Proven::child(&b).unwrap();
        assert_eq!(pa.pid(), a.id());
        assert!(is_cloexec(&pa), "pidfd must be close-on-exec");
        assert_eq!(pa.identity().boot_id, boot_id().unwrap());
        let again = Proven::verify(a.id(), &pa.identity()).unwrap();
        assert_eq!(again.identity(), pa.identity());
        // Another process's identity does not verify a's pid, and says why.
        let mut other = pb.identity();
        other.start_ticks += 1;
        match Proven::verify(b.id(), &other) {
            Err(Unproven::Other {
                pid,
                expected,
                found,
            }) => {
                assert_eq!((pid, expected, found), (b.id(), other, pb.identity()));
            }
            other => panic!("{other:?}"),
        }
        // Nor does one from another boot.
        let mut reboot = pa.identity();
        reboot.boot_id[0] ^= 1;
        let e = Proven::verify(a.id(), &reboot).unwrap_err();
        assert!(matches!(e, Unproven::Other { .. }), "{e:?}");
        assert!(e.to_string().contains("is another process now"), "{e}");
        // Exited, not yet reaped: gone. Reaped: gone.
        let pid = a.id();
        let id = pa.identity();
        drop(a.stdin.take());
        let _ = crate::sys::spawn::wait_any(&[pa.watched()], std::time::Duration::from_secs(30));
        assert!(matches!(
            Proven::verify(pid, &id),
            Err(Unproven::Gone { .. })
        ));
        assert!(matches!(Proven::child(&a), Err(Unproven::Gone { .. })));
        a.wait().unwrap();
        assert!(matches!(
            Proven::verify(pid, &id),
            Err(Unproven::Gone { .. }) | Err(Unproven::Other { .. })
        ));
        pa.kill().unwrap(); // through the pidfd: reaches nobody else
        end(b);
    }

    /// Pid reuse for real (root: `ns_last_pid`): the identity recorded for a pid does not
    /// verify the process that has the pid after it.
    #[test]
    fn a_reused_pid_is_another_process() {
        if !root(
            "a_reused_pid_is_another_process",
            "it writes /proc/sys/kernel/ns_last_pid",
        ) {
            return;
        }
        let first = blocked_child();
        let pid = first.id();
        let id = Proven::child(&first).unwrap().identity();
        end(first);
        let second = crate::sys::testutil::spawn_at_pid(pid, || {
            let mut c = Command::new("/bin/sh");
            c.args(["-c", "read x"]).stdin(Stdio::piped());
            c
        });
        let e = Proven::verify(pid, &id).unwrap_err();
        assert!(matches!(e, Unproven::Other { .. }), "{e:?}");
        let now = Proven::child(&second).unwrap().identity();
        assert_eq!(now.boot_id, id.boot_id);
        // The two started within a few milliseconds: often in the same clock tick, which only
        // the pidfs inode tells apart (this kernel has pidfs: it is 6.9 or later).
        eprintln!("first {id:?}, second {now:?}");
        assert!(id.pidfd_inode.is_some() && now.pidfd_inode.is_some());
        end(second);
    }

    #[test]
    fn the_peer_of_a_connection_is_the_process_that_listens() {
        let dir = TempDir::new("proc-peer");
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = Proven::verify(std::process::id(), &own_identity())
            .unwrap()
            .identity();
        for end in [c.as_fd(), s.as_fd()] {
            let p = Proven::peer(end).unwrap();
            assert_eq!(p.pid(), std::process::id());
            assert_eq!(p.identity(), me);
            assert!(is_cloexec(&p));
            assert!(!p.has_exited().unwrap());
        }
        // A socket that is not connected is an error, not a proof.
        let e = Proven::peer(l.as_fd()).unwrap_err();
        assert!(matches!(e, Unproven::Io { .. }), "{e:?}");
    }

    #[test]
    fn a_lock_holder_is_proven_by_its_descriptors_not_by_proc_locks() {
        let dir = TempDir::new("proc-lock");
        // Started before the lock is taken: a child spawned while it is held has a copy of the
        // (close-on-exec) descriptor until its exec has closed it, which may be after the
        // spawn returned.
        let other = blocked_child();
        let lock = crate::sys::lock::try_acquire(dir.path()).unwrap().lock;
        let path = lock.path().to_path_buf();
        let me = std::process::id();
        assert_eq!(Proven::lock_holder(me, &path).unwrap().pid(), me);
        // A process with no descriptor on it.
        let e = Proven::lock_holder(other.id(), &path).unwrap_err();
        assert!(matches!(e, Unproven::NotHolder { .. }), "{e:?}");
        assert!(e.to_string().contains("holds no lock on"), "{e}");
        // A holder that did not take the lock: `flock(1)` takes it on the shell's descriptor
        // and exits; /proc/locks names flock's (dead) pid, the shell holds the lock.
        lock.release().unwrap();
        let mut sh = Command::new("/bin/sh")
            .args([
                "-c",
                "exec 9<>\"$0\" && flock -x 9 && echo locked && exec cat",
            ])
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "locked\n");
        let taker = crate::sys::lock::holders(&path).unwrap();
        assert_eq!(taker.len(), 1);
        assert_ne!(taker[0], sh.id());
        assert_eq!(Proven::lock_holder(sh.id(), &path).unwrap().pid(), sh.id());
        assert!(matches!(
            Proven::lock_holder(taker[0], &path),
            Err(Unproven::Gone { .. }) | Err(Unproven::NotHolder { .. })
        ));
        // A missing lock file: nothing to prove.
        let e = Proven::lock_holder(me, &dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, Unproven::Io { .. }), "{e:?}");
        end(sh);
        end(other);
    }
}
