//! What a received descriptor really is, checked against the listener kind announced for it,
//! and putting it in the mode this process needs.

use std::io;
use std::os::fd::BorrowedFd;

use handoff_proto::ListenerKind;
use rustix::io::{Errno, FdFlags};
use rustix::net::{sockopt, AddressFamily, SocketType};

/// The socket kinds a listener can be; the same four as [`ListenerKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SocketKind {
    /// `AF_INET`/`AF_INET6`, `SOCK_STREAM`, listening.
    Tcp,
    /// `AF_INET`/`AF_INET6`, `SOCK_DGRAM`.
    Udp,
    /// `AF_UNIX`, `SOCK_STREAM`, listening.
    UnixStream,
    /// `AF_UNIX`, `SOCK_DGRAM`.
    UnixDatagram,
}

impl From<SocketKind> for ListenerKind {
    fn from(k: SocketKind) -> ListenerKind {
        match k {
            SocketKind::Tcp => ListenerKind::Tcp,
            SocketKind::Udp => ListenerKind::Udp,
            SocketKind::UnixStream => ListenerKind::UnixStream,
            SocketKind::UnixDatagram => ListenerKind::UnixDatagram,
        }
    }
}

impl From<ListenerKind> for SocketKind {
    fn from(k: ListenerKind) -> SocketKind {
        match k {
            ListenerKind::Tcp => SocketKind::Tcp,
            ListenerKind::Udp => SocketKind::Udp,
            ListenerKind::UnixStream => SocketKind::UnixStream,
            ListenerKind::UnixDatagram => SocketKind::UnixDatagram,
        }
    }
}

/// Why a descriptor is not the listener it should be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SockCheckError {
    /// `getsockopt` failed with `ENOTSOCK`: a file, pipe or other non-socket.
    #[error("descriptor is not a socket")]
    NotASocket,
    /// The address family is not the one expected (or not one a listener can have).
    #[error("wrong socket domain: {}, expected {expected}", domain_name(*found))]
    WrongDomain {
        /// `SO_DOMAIN` as found (`AF_*` value).
        found: u16,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The socket type is not the one expected (or not one a listener can have).
    #[error("wrong socket type: {}, expected {expected}", type_name(*found))]
    WrongType {
        /// `SO_TYPE` as found (`SOCK_*` value).
        found: u32,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A stream socket that is not listening (`SO_ACCEPTCONN` is 0): a connection, or a
    /// socket that was never `listen`ed on.
    #[error("{domain} stream socket is not listening")]
    NotListening {
        /// `"AF_INET/AF_INET6"` or `"AF_UNIX"`.
        domain: &'static str,
    },
    /// `getsockopt` failed otherwise (for example `EBADF`).
    #[error("cannot inspect socket: {0}")]
    Io(#[from] io::Error),
}

fn domain_name(raw: u16) -> String {
    match AddressFamily::from_raw(raw) {
        AddressFamily::INET => "AF_INET".into(),
        AddressFamily::INET6 => "AF_INET6".into(),
        AddressFamily::UNIX => "AF_UNIX".into(),
        AddressFamily::NETLINK => "AF_NETLINK".into(),
        AddressFamily::PACKET => "AF_PACKET".into(),
        _ => format!("address family {raw}"),
    }
}

fn type_name(raw: u32) -> String {
    match SocketType::from_raw(raw) {
        SocketType::STREAM => "SOCK_STREAM".into(),
        SocketType::DGRAM => "SOCK_DGRAM".into(),
        SocketType::SEQPACKET => "SOCK_SEQPACKET".into(),
        SocketType::RAW => "SOCK_RAW".into(),
        _ => format!("socket type {raw}"),
    }
}

fn sockopt_err(e: Errno) -> SockCheckError {
    if e == Errno::NOTSOCK {
        SockCheckError::NotASocket
    } else {
        SockCheckError::Io(e.into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Domain {
    Inet,
    Unix,
}

const INET: &str = "AF_INET or AF_INET6";
const UNIX: &str = "AF_UNIX";

fn domain(fd: BorrowedFd<'_>) -> Result<Domain, SockCheckError> {
    match sockopt::socket_domain(fd).map_err(sockopt_err)? {
        AddressFamily::INET | AddressFamily::INET6 => Ok(Domain::Inet),
        AddressFamily::UNIX => Ok(Domain::Unix),
        other => Err(SockCheckError::WrongDomain {
            found: other.as_raw(),
            expected: "AF_INET, AF_INET6 or AF_UNIX",
        }),
    }
}

fn listening(fd: BorrowedFd<'_>, d: Domain) -> Result<(), SockCheckError> {
    if sockopt::socket_acceptconn(fd).map_err(sockopt_err)? {
        Ok(())
    } else {
        Err(SockCheckError::NotListening {
            domain: if d == Domain::Inet {
                "AF_INET/AF_INET6"
            } else {
                "AF_UNIX"
            },
        })
    }
}

/// What listener kind `fd` is, from `SO_DOMAIN`, `SO_TYPE` and `SO_ACCEPTCONN`. Stream
/// sockets must be listening; datagram sockets need not be (nor can they be). Binding is not
/// checked.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketKind, SockCheckError> {
    let d = domain(fd)?;
    let ty = sockopt::socket_type(fd).map_err(sockopt_err)?;
    let kind = match (d, ty) {
        (Domain::Inet, SocketType::STREAM) => SocketKind::Tcp,
        (Domain::Inet, SocketType::DGRAM) => SocketKind::Udp,
        (Domain::Unix, SocketType::STREAM) => SocketKind::UnixStream,
        (Domain::Unix, SocketType::DGRAM) => SocketKind::UnixDatagram,
        (_, other) => {
            return Err(SockCheckError::WrongType {
                found: other.as_raw(),
                expected: "SOCK_STREAM or SOCK_DGRAM",
            })
        }
    };
    if ty == SocketType::STREAM {
        listening(fd, d)?;
    }
    Ok(kind)
}

/// Check that `fd` is a listener of kind `expected`. The error names the first thing wrong,
/// in the order: not a socket, domain, type, not listening.
pub fn check(fd: BorrowedFd<'_>, expected: ListenerKind) -> Result<(), SockCheckError> {
    let (want_domain, want_type) = match expected {
        ListenerKind::Tcp => (Domain::Inet, SocketType::STREAM),
        ListenerKind::Udp => (Domain::Inet, SocketType::DGRAM),
        ListenerKind::UnixStream => (Domain::Unix, SocketType::STREAM),
        ListenerKind::UnixDatagram => (Domain::Unix, SocketType::DGRAM),
    };
    let expected_domain = if want_domain == Domain::Inet {
        INET
    } else {
        UNIX
    };
    let found_domain = sockopt::socket_domain(fd).map_err(sockopt_err)?;
    let d = match found_domain {
        AddressFamily::INET | AddressFamily::INET6 => Some(Domain::Inet),
        AddressFamily::UNIX => Some(Domain::Unix),
        _ => None,
    };
    if d != Some(want_domain) {
        return Err(SockCheckError::WrongDomain {
            found: found_domain.as_raw(),
            expected: expected_domain,
        });
    }
    let ty = sockopt::socket_type(fd).map_err(sockopt_err)?;
    if ty != want_type {
        return Err(SockCheckError::WrongType {
            found: ty.as_raw(),
            expected: if want_type == SocketType::STREAM {
                "SOCK_STREAM"
            } else {
                "SOCK_DGRAM"
            },
        });
    }
    if want_type == SocketType::STREAM {
        listening(fd, want_domain)?;
    }
    Ok(())
}

/// Put a received listener in the state a blocking driver expects: `FD_CLOEXEC` set (so it does
/// not leak into children unless the driver clears it on purpose) and `O_NONBLOCK` cleared.
///
/// `FD_CLOEXEC` belongs to this process's descriptor, but `O_NONBLOCK` lives on the *open file
/// description*, which `SCM_RIGHTS` shares with the sender (and `dup`/`fork` share too).
/// Changing it here changes it for the old daemon's copy of the listener as well, and the old
/// daemon may still be accepting on it. So each process must set the mode it needs on its own
/// side right before it uses the listener, and never assume the mode it finds (a non-blocking
/// driver sets `O_NONBLOCK` again after this).
pub fn normalise(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd_flags = rustix::io::fcntl_getfd(fd)?;
    if !fd_flags.contains(FdFlags::CLOEXEC) {
        rustix::io::fcntl_setfd(fd, fd_flags | FdFlags::CLOEXEC)?;
    }
    let fl = rustix::fs::fcntl_getfl(fd)?;
    if fl.contains(rustix::fs::OFlags::NONBLOCK) {
        rustix::fs::fcntl_setfl(fd, fl - rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{is_cloexec, TempDir};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    const ALL: [ListenerKind; 4] = [
        ListenerKind::Tcp,
        ListenerKind::Udp,
        ListenerKind::UnixStream,
        ListenerKind::UnixDatagram,
    ];

    fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
        rustix::fs::fcntl_getfl(fd)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK)
    }

    #[test]
    fn the_four_kinds() {
        let dir = TempDir::new("sockcheck");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp6 = TcpListener::bind("[::1]:0").ok();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let us = UnixListener::bind(dir.path().join("s")).unwrap();
        let ud = UnixDatagram::bind(dir.path().join("d")).unwrap();
        // An unbound datagram socket is a datagram socket all the same.
        let ud_unbound = UnixDatagram::unbound().unwrap();

        let cases: Vec<(BorrowedFd<'_>, SocketKind)> = vec![
            (tcp.as_fd(), SocketKind::Tcp),
            (udp.as_fd(), SocketKind::Udp),
            (us.as_fd(), SocketKind::UnixStream),
            (ud.as_fd(), SocketKind::UnixDatagram),
            (ud_unbound.as_fd(), SocketKind::UnixDatagram),
        ];
        let v6 = tcp6.as_ref().map(|l| (l.as_fd(), SocketKind::Tcp));
        for (fd, kind) in cases.into_iter().chain(v6) {
            assert_eq!(inspect(fd).unwrap(), kind);
            for expected in ALL {
                let r = check(fd, expected);
                if ListenerKind::from(kind) == expected {
                    r.unwrap();
                } else {
                    assert!(
                        matches!(
                            r,
                            Err(SockCheckError::WrongDomain { .. }
                                | SockCheckError::WrongType { .. })
                        ),
                        "{kind:?} checked as {expected:?}: {r:?}"
                    );
                }
            }
        }
        for k in ALL {
            assert_eq!(ListenerKind::from(SocketKind::from(k)), k);
        }
        let e = check(udp.as_fd(), ListenerKind::UnixDatagram).unwrap_err();
        assert_eq!(
            e.to_string(),
            "wrong socket domain: AF_INET, expected AF_UNIX"
        );
        let e = check(udp.as_fd(), ListenerKind::Tcp).unwrap_err();
        assert_eq!(
            e.to_string(),
            "wrong socket type: SOCK_DGRAM, expected SOCK_STREAM"
        );
    }

    #[test]
    fn non_listening_stream_sockets_are_rejected() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        assert!(matches!(
            inspect(conn.as_fd()),
            Err(SockCheckError::NotListening { .. })
        ));
        let e = check(conn.as_fd(), ListenerKind::Tcp).unwrap_err();
        assert!(matches!(e, SockCheckError::NotListening { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "AF_INET/AF_INET6 stream socket is not listening"
        );
        // A non-listening TCP socket checked as UDP is the wrong type first.
        assert!(matches!(
            check(conn.as_fd(), ListenerKind::Udp),
            Err(SockCheckError::WrongType { .. })
        ));
        // A never-bound socket.
        let raw = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(matches!(
            check(raw.as_fd(), ListenerKind::Tcp),
            Err(SockCheckError::NotListening { .. })
        ));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            check(a.as_fd(), ListenerKind::UnixStream),
            Err(SockCheckError::NotListening { domain: "AF_UNIX" })
        ));
    }

    #[test]
    fn other_sockets_and_files_are_rejected() {
        let dir = TempDir::new("sockcheck-file");
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        assert!(matches!(
            inspect(file.as_fd()),
            Err(SockCheckError::NotASocket)
        ));
        let e = check(file.as_fd(), ListenerKind::UnixStream).unwrap_err();
        assert!(matches!(e, SockCheckError::NotASocket), "{e:?}");
        assert_eq!(e.to_string(), "descriptor is not a socket");

        let seq = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let e = inspect(seq.as_fd()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "wrong socket type: SOCK_SEQPACKET, expected SOCK_STREAM or SOCK_DGRAM"
        );
    }

    #[test]
    fn normalise_sets_cloexec_and_blocking() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let twin = tcp.try_clone().unwrap();
        tcp.set_nonblocking(true).unwrap();
        rustix::io::fcntl_setfd(&tcp, FdFlags::empty()).unwrap();
        assert!(!is_cloexec(&tcp));
        // O_NONBLOCK is on the open file description: the duplicate sees it too.
        assert!(is_nonblocking(twin.as_fd()));

        normalise(tcp.as_fd()).unwrap();
        assert!(is_cloexec(&tcp));
        assert!(!is_nonblocking(tcp.as_fd()));
        assert!(!is_nonblocking(twin.as_fd()));
        // Idempotent.
        normalise(tcp.as_fd()).unwrap();
        assert!(is_cloexec(&tcp) && !is_nonblocking(tcp.as_fd()));
    }
}
