//! Bytes with descriptors over a Unix stream socket (`SCM_RIGHTS`).
//!
//! The descriptors of a `Listeners` frame ride on the first `sendmsg` of the frame's bytes.
//! On a `SOCK_STREAM` Unix socket the kernel attaches them to the first byte sent and never
//! merges that data with bytes of another `sendmsg` in one `recvmsg`, so the receiver gets them
//! together with the start of the frame.
//!
//! Received descriptors are always close-on-exec (`MSG_CMSG_CLOEXEC`): there is no window in
//! which a concurrent `fork`+`exec` in this process could inherit them.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use handoff_proto::MAX_FDS_PER_MESSAGE;
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// A connected pair of `AF_UNIX` `SOCK_STREAM` sockets, both close-on-exec.
pub fn socketpair_cloexec() -> io::Result<(UnixStream, UnixStream)> {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((UnixStream::from(a), UnixStream::from(b)))
}

fn check_fds(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message; the kernel passes at most {MAX_FDS_PER_MESSAGE} \
                 (SCM_MAX_FD), split them over several messages",
                fds.len()
            ),
        ));
    }
    if bytes.is_empty() && !fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte of data to travel with on a stream socket",
        ));
    }
    Ok(())
}

/// Write all of `bytes` on the connected stream socket `sock`, passing `fds` (`SCM_RIGHTS`)
/// with the first `sendmsg` only. Uses `MSG_NOSIGNAL`: a closed peer is an `EPIPE` error,
/// never a `SIGPIPE`.
///
/// `fds` stay owned by the caller; the receiver gets duplicates sharing the same open file
/// descriptions. More than [`MAX_FDS_PER_MESSAGE`] descriptors, or descriptors with no bytes,
/// are refused with [`io::ErrorKind::InvalidInput`] before anything is sent.
///
/// Meant for a blocking socket: it loops on partial writes and retries `EINTR`. On a
/// non-blocking socket a `WouldBlock` after a partial write would lose the count of bytes
/// written; use [`send_some_with_fds`] there.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    check_fds(bytes, fds)?;
    if bytes.is_empty() {
        return Ok(());
    }
    let mut sent = send_some_with_fds(sock, bytes, fds)?;
    while sent < bytes.len() {
        sent += send_some_with_fds(sock, &bytes[sent..], &[])?;
    }
    Ok(())
}

/// One `sendmsg` of a prefix of `bytes`, carrying `fds`; returns how many bytes were written
/// (at least one). The descriptors went with those bytes, so pass them again only if this
/// returns an error. Retries `EINTR`; on a non-blocking socket returns `WouldBlock` when the
/// socket buffer is full, having sent nothing. Same limits as [`send_with_fds`].
pub fn send_some_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    check_fds(bytes, fds)?;
    if bytes.is_empty() {
        return Ok(0);
    }
    let space_len = if fds.is_empty() {
        0
    } else {
        rustix::cmsg_space!(ScmRights(fds.len()))
    };
    let mut space = vec![MaybeUninit::<u8>::uninit(); space_len];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "control buffer too small for the descriptors (internal error)",
        ));
    }
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "sendmsg wrote no bytes",
                ))
            }
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One `recvmsg` on the stream socket `sock` into `buf`: returns the number of bytes read
/// (`0` at end of stream) and appends the descriptors that came with them to `fds_out`, in the
/// order the sender passed them, each close-on-exec.
///
/// Room is reserved for [`MAX_FDS_PER_MESSAGE`] descriptors (and one `SCM_CREDENTIALS`
/// message, which is ignored). If the kernel still truncated the control data (`MSG_CTRUNC`),
/// the descriptors that did arrive are closed, `fds_out` is left unchanged and an
/// [`io::ErrorKind::InvalidData`] error is returned. The bytes of that `recvmsg` are consumed
/// all the same, so the stream is out of step: close the connection.
///
/// `buf` must not be empty (a zero-length read could not be told from end of stream).
/// Retries `EINTR`; on a non-blocking socket returns `WouldBlock` when nothing is queued.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds_out: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_with_fd_room(sock, buf, fds_out, MAX_FDS_PER_MESSAGE)
}

/// [`recv_with_fds`] with room for only `room` descriptors (at most
/// [`MAX_FDS_PER_MESSAGE`]): more is the same `MSG_CTRUNC` error, and those that did arrive
/// (a few more than `room` can fit, from alignment) are closed. With `room == 0` no control
/// buffer is given at all, so the kernel installs none of the descriptors a peer sends: it
/// discards them and reports `MSG_CTRUNC`, and this process's descriptor table never holds
/// them, even for a moment.
pub fn recv_with_fds_upto(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds_out: &mut Vec<OwnedFd>,
    room: usize,
) -> io::Result<usize> {
    recv_with_fd_room(sock, buf, fds_out, room.min(MAX_FDS_PER_MESSAGE))
}

fn recv_with_fd_room(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds_out: &mut Vec<OwnedFd>,
    room: usize,
) -> io::Result<usize> {
    if buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "recv_with_fds needs a non-empty buffer",
        ));
    }
    let space_len = if room == 0 {
        0
    } else {
        rustix::cmsg_space!(ScmRights(room), ScmCredentials(1))
    };
    let mut space = vec![MaybeUninit::<u8>::uninit(); space_len];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => break msg,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut received = Vec::new();
    for message in control.drain() {
        // Anything but descriptors (credentials) is dropped here; descriptors are never lost.
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            received.extend(fds);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        let got = received.len();
        drop(received);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "control data truncated (MSG_CTRUNC): the peer sent more descriptors than fit; \
                 the {got} that arrived were closed and {} bytes were consumed",
                msg.bytes
            ),
        ));
    }
    fds_out.extend(received);
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{identity, is_cloexec, TempDir};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;

    /// Receive until `want` bytes arrived; returns the bytes and every descriptor.
    fn recv_all(sock: &UnixStream, want: usize) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut data = Vec::new();
        let mut fds = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while data.len() < want {
            let n = recv_with_fds(sock.as_fd(), &mut buf, &mut fds).expect("recv");
            assert!(n > 0, "unexpected end of stream after {} bytes", data.len());
            data.extend_from_slice(&buf[..n]);
        }
        (data, fds)
    }

    #[test]
    fn three_listeners_arrive_as_the_same_sockets() {
        let dir = TempDir::new("fdpass");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix_path = dir.path().join("l.sock");
        let unix = UnixListener::bind(&unix_path).unwrap();
        let (a, b) = socketpair_cloexec().unwrap();
        assert!(is_cloexec(&a) && is_cloexec(&b));

        send_with_fds(
            a.as_fd(),
            b"listeners",
            &[tcp.as_fd(), udp.as_fd(), unix.as_fd()],
        )
        .unwrap();
        let (data, fds) = recv_all(&b, 9);
        assert_eq!(data, b"listeners");
        assert_eq!(fds.len(), 3);
        for fd in &fds {
            assert!(is_cloexec(fd), "received descriptor without FD_CLOEXEC");
        }
        assert_eq!(identity(&fds[0]), identity(&tcp));
        assert_eq!(identity(&fds[1]), identity(&udp));
        assert_eq!(identity(&fds[2]), identity(&unix));

        let mut fds = fds.into_iter();
        let tcp2 = TcpListener::from(fds.next().unwrap());
        let udp2 = UdpSocket::from(fds.next().unwrap());
        let unix2 = UnixListener::from(fds.next().unwrap());
        assert_eq!(tcp2.local_addr().unwrap(), tcp.local_addr().unwrap());
        assert_eq!(udp2.local_addr().unwrap(), udp.local_addr().unwrap());
        assert_eq!(
            unix2.local_addr().unwrap().as_pathname(),
            Some(unix_path.as_path())
        );
        // The received listener really serves: a connection queued on it is accepted.
        let mut client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (mut server, _) = tcp2.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn at_most_253_descriptors_per_message() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, mut b) = socketpair_cloexec().unwrap();

        let fds = vec![tcp.as_fd(); MAX_FDS_PER_MESSAGE];
        send_with_fds(a.as_fd(), b"x", &fds).unwrap();
        let (data, got) = recv_all(&b, 1);
        assert_eq!(data, b"x");
        assert_eq!(got.len(), MAX_FDS_PER_MESSAGE);
        for fd in &got {
            assert!(is_cloexec(fd));
            assert_eq!(identity(fd), identity(&tcp));
        }
        drop(got);

        let too_many = vec![tcp.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        let err = send_with_fds(a.as_fd(), b"y", &too_many).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("254 descriptors"), "{err}");
        assert!(err.to_string().contains("253"), "{err}");
        // Nothing was sent: the receiver sees end of stream right away.
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn descriptors_without_bytes_are_refused() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, _b) = socketpair_cloexec().unwrap();
        let err = send_with_fds(a.as_fd(), b"", &[tcp.as_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        send_with_fds(a.as_fd(), b"", &[]).unwrap();
        let mut fds = Vec::new();
        let err = recv_with_fds(a.as_fd(), &mut [], &mut fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn partial_writes_carry_the_descriptors_once() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = socketpair_cloexec().unwrap();
        let big = vec![0x5au8; 4 << 20];

        // Non-blocking: one sendmsg fills the socket buffer and reports a partial write.
        a.set_nonblocking(true).unwrap();
        let n = send_some_with_fds(a.as_fd(), &big, &[tcp.as_fd()]).unwrap();
        assert!(n > 0 && n < big.len(), "wrote {n}");
        let err = send_some_with_fds(a.as_fd(), &big[n..], &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let (data, fds) = recv_all(&b, n);
        assert_eq!(data.len(), n);
        assert_eq!(fds.len(), 1);
        assert_eq!(identity(&fds[0]), identity(&tcp));

        // Blocking: the whole 4 MiB goes through while the peer reads, descriptor once.
        a.set_nonblocking(false).unwrap();
        let (data, fds) = std::thread::scope(|s| {
            let reader = s.spawn(|| recv_all(&b, big.len()));
            send_with_fds(a.as_fd(), &big, &[tcp.as_fd()]).unwrap();
            reader.join().unwrap()
        });
        assert!(data == big);
        assert_eq!(fds.len(), 1);
        assert_eq!(identity(&fds[0]), identity(&tcp));
    }

    #[test]
    fn truncated_control_data_is_an_error_and_closes_what_arrived() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = socketpair_cloexec().unwrap();
        send_with_fds(a.as_fd(), b"z", &vec![tcp.as_fd(); 100]).unwrap();
        let keep = tcp.try_clone().unwrap();
        let mut fds = vec![OwnedFd::from(keep)];
        let mut buf = [0u8; 8];
        let err = recv_with_fd_room(b.as_fd(), &mut buf, &mut fds, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("MSG_CTRUNC"), "{err}");
        assert_eq!(fds.len(), 1, "fds_out must be left unchanged");
    }

    #[test]
    fn with_no_room_the_kernel_discards_the_descriptors() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = socketpair_cloexec().unwrap();
        send_with_fds(a.as_fd(), b"zz", &vec![tcp.as_fd(); MAX_FDS_PER_MESSAGE]).unwrap();
        let mut fds = Vec::new();
        let mut buf = [0u8; 8];
        let err = recv_with_fds_upto(b.as_fd(), &mut buf, &mut fds, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // None was ever installed here: "the 0 that arrived".
        assert!(err.to_string().contains("the 0 that arrived"), "{err}");
        assert!(fds.is_empty());
        // Plain bytes still come through with no room.
        send_with_fds(a.as_fd(), b"ok", &[]).unwrap();
        let n = recv_with_fds_upto(b.as_fd(), &mut buf, &mut fds, 0).unwrap();
        assert_eq!(&buf[..n], b"ok");
    }
}
