//! Who is on the other end of a control connection, who may be, and binding the control
//! socket so that only its owner can connect.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use handoff_proto::Pid;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use rustix::net::{sockopt, AddressFamily, SocketType};

use crate::sys::fscheck::{self, Dir, Unsafe};

/// `(pid, uid, gid)` of the peer of the connected `AF_UNIX` stream socket `sock`
/// (`SO_PEERCRED`): the credentials the peer had when it called `connect` (or `socketpair`),
/// with the effective uid and gid. The pid may since have exited or been reused.
///
/// Refused with [`io::ErrorKind::InvalidInput`] unless `sock` is an `AF_UNIX` `SOCK_STREAM` or
/// `SOCK_SEQPACKET` socket, and with `NotConnected` unless it is connected: the kernel reports
/// pid 0 for those, which `rustix`'s `UCred` (a non-zero `Pid`) cannot represent.
///
/// Known limit: the kernel also reports pid 0 when the peer lives in a pid namespace this
/// process cannot see (for example a host process connecting into a container). `rustix`
/// 1.1's `socket_peercred` mishandles that value (its `Pid` is non-zero by type); in practice
/// the call then fails with a bogus error, so such a peer is refused, not admitted.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(Pid, u32, u32)> {
    if sockopt::socket_domain(sock)? != AddressFamily::UNIX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer credentials need an AF_UNIX socket",
        ));
    }
    let ty = sockopt::socket_type(sock)?;
    if ty != SocketType::STREAM && ty != SocketType::SEQPACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer credentials need a SOCK_STREAM or SOCK_SEQPACKET socket",
        ));
    }
    // ENOTCONN for a socket that was never connected (and is not listening).
    rustix::net::getpeername(sock)?;
    let cred = sockopt::socket_peercred(sock)?;
    let pid = Pid::try_from(cred.pid.as_raw_pid()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_PEERCRED reported a negative pid",
        )
    })?;
    Ok((pid, cred.uid.as_raw(), cred.gid.as_raw()))
}

/// Which peers may talk on a control socket, by effective uid.
///
/// This is the first check only. A daemon started by a handoff supervisor also requires the
/// peer to hold that supervisor's lock ([`crate::sys::supervisor_lock::check_peer`]), which no
/// policy widens: a uid admitted here is necessary, not sufficient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Uids admitted.
    pub allowed_uids: Vec<u32>,
}

impl Default for PeerPolicy {
    /// This process's effective uid, and root.
    fn default() -> Self {
        let me = rustix::process::geteuid().as_raw();
        let mut allowed_uids = vec![me, 0];
        allowed_uids.dedup();
        PeerPolicy { allowed_uids }
    }
}

impl PeerPolicy {
    /// Whether a peer with effective uid `uid` is admitted.
    pub fn admits(&self, uid: u32) -> bool {
        self.allowed_uids.contains(&uid)
    }
}

/// `<name>.<pid>.tmp`, the private directory a socket is bound in first.
fn staging_name(name: &OsStr) -> OsString {
    let mut staged = name.to_os_string();
    staged.push(format!(".{}.tmp", std::process::id()));
    staged
}

/// `<path>.<pid>.tmp`.
#[cfg(test)]
fn staging_dir(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} has no file name", path.display()),
        )
    })?;
    Ok(path.with_file_name(staging_name(name)))
}

/// `path` refused: something other than a socket is there.
fn not_a_socket(path: &Path, st: &rustix::fs::Stat) -> io::Error {
    Unsafe::new(
        path,
        format!(
            "is {}, not a socket: only a socket is replaced",
            fscheck::kind(st)
        ),
        "remove it or choose another path",
    )
    .into_io(io::ErrorKind::AlreadyExists)
}

/// The private directory `<name>.<pid>.tmp` of `dir`, created with mode 0700 (the umask can
/// only remove bits) after clearing a leftover of this uid from a crashed process with the same
/// pid (an entry of another uid there is refused), opened `O_PATH`.
fn make_staging(dir: &Dir, name: &OsStr) -> io::Result<(OsString, OwnedFd)> {
    let sname = staging_name(name);
    let me = rustix::process::geteuid().as_raw();
    if let Some(st) = dir.stat(&sname)? {
        if st.st_uid != me {
            return Err(Unsafe::new(
                &dir.join(&sname),
                format!(
                    "is owned by uid {}, not by this process (uid {me}); it is left alone",
                    st.st_uid
                ),
                "remove it",
            )
            .into());
        }
        if fscheck::is(&st, FileType::Directory) {
            let old = rustix::fs::openat(
                dir.fd(),
                &sname,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            ignore_not_found(rustix::fs::unlinkat(&old, "s", AtFlags::empty()))?;
            ignore_not_found(rustix::fs::unlinkat(dir.fd(), &sname, AtFlags::REMOVEDIR))?;
        } else {
            ignore_not_found(rustix::fs::unlinkat(dir.fd(), &sname, AtFlags::empty()))?;
        }
    }
    rustix::fs::mkdirat(dir.fd(), &sname, Mode::RWXU)?;
    let fd = rustix::fs::openat(
        dir.fd(),
        &sname,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok((sname, fd))
}

fn ignore_not_found(r: rustix::io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Move the socket `s` of directory `staging` to `name` in `dir` (the path `path`), replacing
/// only a socket. Anything else there is refused and left as it is.
///
/// `renameat2(RENAME_NOREPLACE)` places the socket where nothing is; where something is, it
/// must be a socket, and the socket is renamed over it. The check and that rename are two
/// steps, which is harmless because of the directory's rule ([`Dir::of`]): only this uid and
/// root can replace an entry of `dir`, or in a sticky directory the entry's owner; whatever
/// else the rename could replace is a name that owner put there in that instant, and renaming
/// over a name never changes the file behind it (another name of that file keeps it).
fn put_in_place(staging: &OwnedFd, dir: &Dir, name: &OsStr, path: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(staging, "s", dir.fd(), name, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST) => {}
        // A filesystem without renameat2's flags: the check below, then a plain rename.
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(st) = dir.stat(name)? {
        if !fscheck::is(&st, FileType::Socket) {
            return Err(not_a_socket(path, &st));
        }
    }
    rustix::fs::renameat(staging, "s", dir.fd(), name)?;
    Ok(())
}

/// Bind a listening `AF_UNIX` stream socket at `path` with mode 0600, replacing atomically
/// whatever socket was there (a stale one, or the one an older process still listens on:
/// from now on new connections reach this one). Anything else at `path` (a regular file, a
/// link, a directory) is refused with [`io::ErrorKind::AlreadyExists`] and left as it is.
///
/// `path`'s directory is opened once and checked ([`Dir::of`]: this uid's or root's, not
/// writable by others unless sticky; refused otherwise), and everything below happens relative
/// to it. The umask cannot set the mode: it is process-wide, so changing it races with every
/// other thread that creates files. Instead the socket is bound inside a fresh directory
/// `<name>.<pid>.tmp/` of mode 0700 next to `path`, so nobody else can reach it while its mode
/// is still the umask default; it is then `chmod`ed to 0600 (by name in that directory, which
/// only this uid and root can write, so no link can be swapped in), moved to `path`
/// ([`put_in_place`]), and the directory is removed. A leftover of that directory from a
/// crashed process with the same pid is cleared first. The socket is close-on-exec.
///
/// `path` must be short enough that `<path>.<pid>.tmp/s` still fits in `sun_path` (108
/// bytes).
pub fn bind_unix_listener_0600(path: &Path) -> io::Result<UnixListener> {
    let (dir, name) = Dir::of(path)?;
    let (sname, staging) = make_staging(&dir, name)?;
    let bound = (|| {
        // Bound by path, so the socket's address names it (`ss -xl`, /proc/net/unix). Should
        // the directory's path lead elsewhere by now, the socket is not in `staging`, and the
        // chmod below fails: nothing is renamed.
        let listener = UnixListener::bind(path.with_file_name(&sname).join("s"))?;
        rustix::fs::chmodat(&staging, "s", Mode::RUSR | Mode::WUSR, AtFlags::empty())?;
        put_in_place(&staging, &dir, name, path)?;
        Ok(listener)
    })();
    // Best-effort: the socket is there only on failure; an empty directory left behind is
    // cleared by the next bind with this pid.
    let _ = rustix::fs::unlinkat(&staging, "s", AtFlags::empty());
    let _ = rustix::fs::unlinkat(dir.fd(), &sname, AtFlags::REMOVEDIR);
    bound
}

/// Bind a listening `AF_UNIX` stream socket at `path` (mode as the umask leaves it) unless a
/// live one is there: a socket nobody listens on (stale) is removed first, one somebody listens
/// on (it accepts, or its accept queue is full) is [`io::ErrorKind::AddrInUse`], and anything
/// else at `path` (a regular file, a link, a directory) is refused with
/// [`io::ErrorKind::AlreadyExists`] and left as it is. `path`'s directory is checked as by
/// [`bind_unix_listener_0600`]; the check of a stale socket and its removal are two steps, which
/// the same directory rule makes harmless (see [`put_in_place`]). The probe never blocks.
/// Close-on-exec.
pub fn bind_unix_listener_unless_live(path: &Path) -> io::Result<UnixListener> {
    let in_use = || {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: a process listens on it", path.display()),
        )
    };
    let (dir, name) = Dir::of(path)?;
    // A few rounds in case the entry comes and goes meanwhile.
    for _ in 0..3 {
        match UnixListener::bind(path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            r => return r,
        }
        let Some(st) = dir.stat(name)? else {
            continue;
        };
        if !fscheck::is(&st, FileType::Socket) {
            return Err(not_a_socket(path, &st));
        }
        match crate::sys::conn::connect_nonblocking(path) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            // Connected, a full accept queue, or anything else: not ours to remove.
            _ => return Err(in_use()),
        }
        ignore_not_found(rustix::fs::unlinkat(dir.fd(), name, AtFlags::empty()))?;
    }
    Err(in_use())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{is_cloexec, root, TempDir};
    use std::fs::Permissions;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::net::{UnixDatagram, UnixStream};

    fn me() -> (Pid, u32, u32) {
        (
            std::process::id(),
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        )
    }

    #[test]
    fn socketpair_peer_is_us() {
        let (a, b) = socketpair_cloexec().unwrap();
        assert_eq!(peer_credentials(a.as_fd()).unwrap(), me());
        assert_eq!(peer_credentials(b.as_fd()).unwrap(), me());
    }

    #[test]
    fn unsuitable_sockets_are_refused() {
        let unconnected = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let err = peer_credentials(unconnected.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotConnected, "{err}");
        let (d, _e) = UnixDatagram::pair().unwrap();
        let err = peer_credentials(d.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = peer_credentials(tcp.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn default_policy_is_our_uid_and_root() {
        let p = PeerPolicy::default();
        let uid = me().1;
        assert!(p.admits(uid));
        assert!(p.admits(0));
        let stranger = if uid == 4242 { 4343 } else { 4242 };
        assert!(!p.admits(stranger));
        assert!(p.allowed_uids.len() <= 2);
        assert!(!PeerPolicy {
            allowed_uids: vec![]
        }
        .admits(uid));
    }

    #[test]
    fn bound_socket_has_mode_0600_and_serves() {
        let dir = TempDir::new("peercred");
        let path = dir.path().join("ctl.sock");
        let listener = bind_unix_listener_0600(&path).unwrap();
        assert!(is_cloexec(&listener));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!staging_dir(&path).unwrap().exists());

        let _client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(peer_credentials(server.as_fd()).unwrap(), me());
        // Only the socket is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ctl.sock")]);
    }

    #[test]
    fn binding_over_a_stale_or_live_socket() {
        let dir = TempDir::new("peercred-stale");
        let path = dir.path().join("ctl.sock");
        // A stale socket file: its listener is gone, the file stays.
        drop(UnixListener::bind(&path).unwrap());
        assert!(UnixStream::connect(&path).is_err());
        let first = bind_unix_listener_0600(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        first.accept().unwrap();

        // A live one: new connections go to the replacement, none to the old listener.
        let second = bind_unix_listener_0600(&path).unwrap();
        first.set_nonblocking(true).unwrap();
        second.set_nonblocking(true).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        second.accept().unwrap();
        assert_eq!(
            first.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn leftover_staging_dir_is_cleared() {
        let dir = TempDir::new("peercred-leftover");
        let path = dir.path().join("ctl.sock");
        let staging = staging_dir(&path).unwrap();
        assert_eq!(
            staging.file_name().unwrap().to_str().unwrap(),
            format!("ctl.sock.{}.tmp", std::process::id())
        );
        // As a crash between bind and rename would leave it.
        std::fs::create_dir(&staging).unwrap();
        drop(UnixListener::bind(staging.join("s")).unwrap());
        let l = bind_unix_listener_0600(&path).unwrap();
        assert!(!staging.exists());
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
        // A plain file in its place is cleared too.
        std::fs::write(&staging, b"x").unwrap();
        bind_unix_listener_0600(&path).unwrap();
        assert!(!staging.exists());
        // No file name: refused.
        assert_eq!(
            bind_unix_listener_0600(Path::new("/")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_a_socket_is_replaced() {
        let dir = TempDir::new("peercred-file");
        let path = dir.path().join("ctl.sock");
        // A regular file at the path: refused, kept as it was.
        std::fs::write(&path, b"precious").unwrap();
        let err = bind_unix_listener_0600(&path).expect_err("replaced a regular file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("not a socket"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // A symbolic link (to anything): refused, the link and its target kept.
        let target = dir.path().join("target");
        std::fs::write(&target, b"also precious").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let msg = bind_unix_listener_0600(&path).unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"also precious");
        // Nothing left behind.
        assert_eq!(names(dir.path()), ["ctl.sock", "target"]);
        // With the path cleared, the bind works.
        std::fs::remove_file(&path).unwrap();
        let l = bind_unix_listener_0600(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky() {
        let dir = TempDir::new("peercred-dir");
        let sub = dir.path().join("run");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, Permissions::from_mode(0o777)).unwrap();
        let path = sub.join("ctl.sock");
        let msg = bind_unix_listener_0600(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&sub.display().to_string()) && msg.contains("writable by group or others"),
            "{msg}"
        );
        assert!(names(&sub).is_empty());
        std::fs::set_permissions(&sub, Permissions::from_mode(0o1777)).unwrap();
        let l = bind_unix_listener_0600(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn a_staging_entry_of_another_uid_is_left_alone() {
        if !root(
            "a_staging_entry_of_another_uid_is_left_alone",
            "an entry chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("peercred-squat");
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o1777)).unwrap();
        let path = dir.path().join("ctl.sock");
        let staging = staging_dir(&path).unwrap();
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("s"), b"theirs").unwrap();
        std::os::unix::fs::chown(&staging, Some(65534), Some(65534)).unwrap();
        let msg = bind_unix_listener_0600(&path).unwrap_err().to_string();
        assert!(msg.contains("owned by uid 65534"), "{msg}");
        assert_eq!(std::fs::read(staging.join("s")).unwrap(), b"theirs");
        assert!(std::fs::symlink_metadata(&path).is_err());
    }

    #[test]
    fn unless_live_replaces_only_a_stale_socket() {
        let dir = TempDir::new("peercred-unless-live");
        let path = dir.path().join("kv.sock");
        // Nothing there: bound at the path itself (its address is the path).
        let first = bind_unix_listener_unless_live(&path).unwrap();
        assert!(is_cloexec(&first));
        assert_eq!(first.local_addr().unwrap().as_pathname(), Some(&*path));
        // Live: AddrInUse, and the live one keeps its path.
        let err = bind_unix_listener_unless_live(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        let _c = UnixStream::connect(&path).unwrap();
        first.accept().unwrap();
        // Stale: replaced. (A child another test is forking holds a copy of the listener
        // until its exec, and the listener is live until then: wait for that, bounded.)
        drop(first);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while UnixStream::connect(&path).is_ok() {
            assert!(std::time::Instant::now() < until, "the listener stays live");
            std::thread::yield_now();
        }
        let second = bind_unix_listener_unless_live(&path).unwrap();
        let _c = UnixStream::connect(&path).unwrap();
        second.accept().unwrap();
        drop(second);
        // A regular file or a link: refused and kept.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"precious").unwrap();
        let err = bind_unix_listener_unless_live(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(
            err.to_string().contains("is a regular file, not a socket"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        std::os::unix::fs::symlink(&stale, &path).unwrap();
        let err = bind_unix_listener_unless_live(&path).unwrap_err();
        assert!(
            err.to_string().contains("is a symbolic link, not a socket"),
            "{err}"
        );
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::symlink_metadata(&stale)
            .unwrap()
            .file_type()
            .is_socket());
        // An unsafe directory: refused.
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o777)).unwrap();
        let err = bind_unix_listener_unless_live(&dir.path().join("other.sock")).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
    }
}
