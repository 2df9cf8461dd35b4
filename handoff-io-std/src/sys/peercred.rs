//! Who is on the other end of a control connection, who may be, and binding the control
//! socket so that only its owner can connect.

use std::fs::{DirBuilder, Permissions};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use handoff_proto::Pid;
use rustix::net::{sockopt, AddressFamily, SocketType};

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

/// `<path>.<pid>.tmp`, the private directory the socket is bound in first.
fn staging_dir(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} has no file name", path.display()),
        )
    })?;
    let mut staged = name.to_os_string();
    staged.push(format!(".{}.tmp", std::process::id()));
    Ok(path.with_file_name(staged))
}

fn ignore_not_found(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Bind a listening `AF_UNIX` stream socket at `path` with mode 0600, replacing atomically
/// whatever socket was there (a stale one, or the one an older process still listens on:
/// from now on new connections reach this one).
///
/// The umask cannot be used for this: it is process-wide, so changing it races with every
/// other thread that creates files. Instead the socket is bound inside a fresh directory
/// `<path>.<pid>.tmp/` of mode 0700 next to `path`, so nobody else can reach it while its
/// mode is still the umask default; it is then `chmod`ed to 0600 and renamed over `path`, and
/// the directory is removed. A leftover of that directory from a crashed process with the
/// same pid is cleared first. The socket is close-on-exec.
///
/// `path`'s directory must be writable, and `path` must be short enough that
/// `<path>.<pid>.tmp/s` still fits in `sun_path` (108 bytes).
pub fn bind_unix_listener_0600(path: &Path) -> io::Result<UnixListener> {
    let staging = staging_dir(path)?;
    match std::fs::symlink_metadata(&staging) {
        Ok(m) if m.is_dir() => {
            ignore_not_found(std::fs::remove_file(staging.join("s")))?;
            std::fs::remove_dir(&staging)?;
        }
        Ok(_) => std::fs::remove_file(&staging)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The umask can only remove bits: the directory is at most 0700.
    DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    // Best-effort: an empty directory left behind is cleared by the next bind with this pid.
    let _ = std::fs::remove_dir(&staging);
    bound
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{is_cloexec, TempDir};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
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
}
