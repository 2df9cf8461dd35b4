//! A non-blocking control connection: bytes and descriptors (`SCM_RIGHTS`) in, frames out
//! through an outbox; the `poll(2)` wait the std loops are built on; and a waker.
//!
//! Nothing here blocks. [`Conn::read_available`] takes what is queued and says whether the
//! peer closed. [`Conn::send`] writes what the socket takes now and keeps the rest in an
//! outbox, flushed by [`Conn::flush`] when the socket is writable ([`Conn::wants_write`]);
//! descriptors ride with the first byte of their frame. A peer that stops reading fills the
//! outbox up to [`MAX_OUTBOX`] and is then cut off (the machines also drop it after the
//! silence limit).
//!
//! Descriptors that arrive are queued in order until the frame that announced them is decoded
//! ([`Conn::take_fds`]), up to the connection's *descriptor budget*, which its role sets to
//! what that peer may send: none by default ([`Conn::new`]; an incumbent's control
//! connections, a supervisor's end of a successor's channel), the configured listeners on a
//! supervisor's connection to the incumbent, the announced listeners on a successor's channel
//! ([`Conn::with_fd_budget`]). A peer that sends more is cut off at once: the read is an error,
//! what it sent in that read is dropped, and its descriptors are closed. On a connection with
//! no budget they never even enter this process's descriptor table (the kernel discards them).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use crate::sys::fdpass::{recv_with_fds_upto, send_some_with_fds};
use crate::sys::MAX_INHERITED_FDS;

/// The largest descriptor budget a connection can have: every listener a handoff can pass.
pub const MAX_FD_BUDGET: usize = MAX_INHERITED_FDS;

/// Most bytes taken from a connection in one call, so one chatty peer cannot starve a loop.
const MAX_READ_PER_CALL: usize = 4 << 20;

/// Most bytes waiting in an outbox before the peer is cut off (four full frames).
pub const MAX_OUTBOX: usize = 4 << 20;

/// Connect to the Unix stream socket at `path` without ever blocking.
///
/// A blocking `connect(2)` on a Unix socket waits while the listener's accept queue is full:
/// a stopped daemon with a full backlog would freeze the caller's loop. Here the socket is
/// non-blocking from its creation, so a full queue is an immediate failure (`EAGAIN`), reported
/// as [`io::ErrorKind::WouldBlock`] with a message that says so. A Unix stream connect never
/// completes later (no `EINPROGRESS`), so success means connected. The stream returned is
/// non-blocking and close-on-exec.
pub fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&sock, &addr) {
        Ok(()) => Ok(UnixStream::from(sock)),
        Err(Errno::AGAIN) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "its accept queue is full (the process behind it is not accepting)",
        )),
        Err(e) => Err(e.into()),
    }
}

/// What [`Conn::read_available`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStatus {
    /// The connection is open; the bytes (maybe none) were read.
    Open,
    /// The peer closed (end of stream or reset) after the bytes read.
    Closed,
}

/// One frame waiting to go out, with the descriptors its first byte carries.
#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

/// One control connection.
#[derive(Debug)]
pub struct Conn {
    sock: UnixStream,
    fds: VecDeque<OwnedFd>,
    fd_budget: usize,
    outbox: VecDeque<Pending>,
    queued: usize,
}

impl Conn {
    /// Wrap a connected stream socket and make it non-blocking. It accepts no descriptor
    /// from the peer (see [`with_fd_budget`](Self::with_fd_budget)).
    pub fn new(sock: UnixStream) -> io::Result<Conn> {
        sock.set_nonblocking(true)?;
        Ok(Conn {
            sock,
            fds: VecDeque::new(),
            fd_budget: 0,
            outbox: VecDeque::new(),
            queued: 0,
        })
    }

    /// Accept up to `n` descriptors queued at once from the peer (at most
    /// [`MAX_FD_BUDGET`]); a peer that sends more is cut off.
    pub fn with_fd_budget(mut self, n: usize) -> Conn {
        self.fd_budget = n.min(MAX_FD_BUDGET);
        self
    }

    /// How many descriptors the peer may have queued at once.
    pub fn fd_budget(&self) -> usize {
        self.fd_budget
    }

    /// The socket, to poll or register.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Append to `out` everything queued now, and the descriptors that came with it to the
    /// connection's queue.
    ///
    /// A peer that sends more descriptors than the budget allows is an
    /// [`io::ErrorKind::InvalidData`] error that says so: nothing of that call is appended to
    /// `out`, the queue is emptied and every descriptor closed. Close the connection.
    pub fn read_available(&mut self, out: &mut Vec<u8>) -> io::Result<ReadStatus> {
        let mut buf = [0u8; 64 * 1024];
        let mut fds = Vec::new();
        let mut total = 0;
        let start = out.len();
        loop {
            let room = self.fd_budget.saturating_sub(self.fds.len());
            let got = recv_with_fds_upto(self.sock.as_fd(), &mut buf, &mut fds, room);
            let r = match got {
                Ok(0) => self
                    .queue_fds(std::mem::take(&mut fds))
                    .map(|()| Some(ReadStatus::Closed)),
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    total += n;
                    match self.queue_fds(std::mem::take(&mut fds)) {
                        Ok(()) if total >= MAX_READ_PER_CALL => Ok(Some(ReadStatus::Open)),
                        Ok(()) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(ReadStatus::Open)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    Ok(Some(ReadStatus::Closed))
                }
                // MSG_CTRUNC: more descriptors came than there was room for.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(self.over_budget(&e)),
                Err(e) => return Err(e),
            };
            match r {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(e) => {
                    out.truncate(start);
                    self.fds.clear();
                    return Err(e);
                }
            }
        }
    }

    fn queue_fds(&mut self, fds: Vec<OwnedFd>) -> io::Result<()> {
        let arrived = fds.len();
        self.fds.extend(fds);
        if self.fds.len() > self.fd_budget {
            let e = io::Error::other(format!("{arrived} more arrived"));
            return Err(self.over_budget(&e));
        }
        Ok(())
    }

    /// The error for a peer that sent more descriptors than the budget.
    fn over_budget(&self, detail: &io::Error) -> io::Error {
        let msg = match self.fd_budget {
            0 => format!(
                "peer sent descriptors, and this connection accepts none; closed ({detail})"
            ),
            n => format!(
                "peer sent more descriptors than this connection accepts ({n}); closed \
                 ({detail})"
            ),
        };
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    /// The next `n` descriptors received, in order; `None` (and the queue emptied) if fewer
    /// arrived.
    pub fn take_fds(&mut self, n: usize) -> Option<Vec<OwnedFd>> {
        if self.fds.len() < n {
            self.fds.clear();
            return None;
        }
        Some(self.fds.drain(..n).collect())
    }

    /// Send `bytes`, `fds` riding with the first byte: as much as the socket takes now, the
    /// rest from the outbox on [`flush`](Self::flush). The descriptors are duplicated
    /// (close-on-exec) only if they have to wait. Never raises `SIGPIPE`. An error means the
    /// connection is unusable (the peer is gone, or has not read for [`MAX_OUTBOX`] bytes).
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut sent = 0;
        if self.outbox.is_empty() {
            match send_some_with_fds(self.sock.as_fd(), bytes, fds) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if sent == bytes.len() {
                return Ok(());
            }
        }
        let fds = if sent == 0 {
            fds.iter()
                .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(io::Error::from))
                .collect::<io::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        self.queued += bytes.len() - sent;
        if self.queued > MAX_OUTBOX {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("peer has not read {} bytes", self.queued),
            ));
        }
        self.outbox.push_back(Pending {
            bytes: bytes[sent..].to_vec(),
            sent: 0,
            fds,
        });
        Ok(())
    }

    /// Whether the outbox holds bytes: poll for writability and call [`flush`](Self::flush).
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Write what the outbox holds, as far as the socket takes it.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(p) = self.outbox.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = if p.sent == 0 {
                p.fds.iter().map(AsFd::as_fd).collect()
            } else {
                Vec::new()
            };
            match send_some_with_fds(self.sock.as_fd(), &p.bytes[p.sent..], &fds) {
                Ok(n) => {
                    p.sent += n;
                    self.queued -= n;
                    if p.sent == p.bytes.len() {
                        self.outbox.pop_front();
                    } else {
                        // Sent with the first chunk: the descriptors are gone.
                        p.fds.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `poll(2)` until one of `fds` is ready or `until` passes (`None`: no limit); returns how
/// many are ready (0 on timeout). Retries `EINTR` with the time left.
pub fn wait(fds: &mut [PollFd<'_>], until: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout = until.map(|t| {
            // Round up to the millisecond, so a wake-up never comes a hair early and spins.
            let left = t.saturating_duration_since(Instant::now()) + Duration::from_nanos(999_999);
            rustix::event::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_millis()) * 1_000_000,
            }
        });
        match rustix::event::poll(fds, timeout.as_ref()) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a polled descriptor is readable or hung up (both mean: read it now).
pub fn readable(p: &PollFd<'_>) -> bool {
    p.revents()
        .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

/// Whether a polled descriptor can take bytes.
pub fn writable(p: &PollFd<'_>) -> bool {
    p.revents().intersects(PollFlags::OUT | PollFlags::ERR)
}

/// A self-wakeable pair: another thread [`Waker::wake`]s a loop blocked in [`wait`] on
/// [`Waker::fd`].
#[derive(Debug)]
pub struct Waker {
    rx: UnixStream,
    tx: UnixStream,
}

impl Waker {
    /// A new pair, both ends non-blocking and close-on-exec.
    pub fn new() -> io::Result<Waker> {
        let (rx, tx) = crate::sys::fdpass::socketpair_cloexec()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Waker { rx, tx })
    }

    /// The end to poll for `IN`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Wake the loop. A full buffer means a wake-up is already pending.
    pub fn wake(&self) {
        let _ = rustix::net::send(&self.tx, &[1], rustix::net::SendFlags::NOSIGNAL);
    }

    /// Consume pending wake-ups.
    pub fn clear(&self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = rustix::net::recv(&self.rx, &mut buf, rustix::net::RecvFlags::empty()) {
            if n.0 == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;

    #[test]
    fn connecting_to_a_full_accept_queue_fails_at_once() {
        let dir = crate::sys::testutil::TempDir::new("fullq");
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // Never accepted: fill the queue until the kernel refuses, with a bound.
        let mut held = Vec::new();
        let err = loop {
            assert!(held.len() < 100_000, "the accept queue never filled");
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(err.to_string().contains("accept queue is full"), "{err}");
        // A free slot connects again.
        let _ = listener.accept().expect("accept one");
        connect_nonblocking(&path).expect("connect after a slot freed");
    }

    #[test]
    fn a_full_socket_queues_in_the_outbox_and_flushes_in_order_with_descriptors() {
        let (a, b) = socketpair_cloexec().expect("pair");
        let mut tx = Conn::new(a).expect("conn");
        let mut rx = Conn::new(b).expect("conn").with_fd_budget(1);
        let (x, _y) = socketpair_cloexec().expect("a descriptor to pass");
        // Fill the socket buffer, then send a frame with a descriptor: it must wait.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while !tx.wants_write() {
            tx.send(&chunk, &[]).expect("send");
            sent += chunk.len();
        }
        tx.send(b"tail", &[x.as_fd()]).expect("queued");
        assert!(tx.wants_write());
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(10);
        while got.len() < sent + 4 {
            assert!(
                Instant::now() < until,
                "stalled at {} of {}",
                got.len(),
                sent + 4
            );
            rx.read_available(&mut got).expect("read");
            tx.flush().expect("flush");
        }
        assert!(!tx.wants_write());
        assert_eq!(&got[sent..], b"tail");
        assert_eq!(rx.take_fds(1).expect("the descriptor arrived").len(), 1);
    }

    #[test]
    fn descriptors_beyond_the_budget_cut_the_peer_off() {
        use crate::sys::fdpass::send_with_fds;
        let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
        let many = vec![devnull.as_fd(); handoff_proto::MAX_FDS_PER_MESSAGE];

        // No budget (the default): bytes with descriptors are an error, and nothing of them
        // is returned or queued.
        let (a, b) = socketpair_cloexec().expect("pair");
        let mut rx = Conn::new(b).expect("conn");
        assert_eq!(rx.fd_budget(), 0);
        send_with_fds(a.as_fd(), b"before", &[]).expect("send");
        send_with_fds(a.as_fd(), b"x", &many).expect("send");
        let mut got = b"kept".to_vec();
        let err = rx
            .read_available(&mut got)
            .expect_err("descriptors on a no-budget conn");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("accepts none"), "{err}");
        assert_eq!(
            got, b"kept",
            "what the call read is dropped, what was there is kept"
        );
        assert!(rx.take_fds(1).is_none());

        // A budget of 3: three queue, a fourth cuts the peer off, and the queue is closed.
        let (a, b) = socketpair_cloexec().expect("pair");
        let mut rx = Conn::new(b).expect("conn").with_fd_budget(3);
        send_with_fds(a.as_fd(), b"a", &many[..2]).expect("send");
        let mut got = Vec::new();
        assert_eq!(
            rx.read_available(&mut got).expect("within"),
            ReadStatus::Open
        );
        send_with_fds(a.as_fd(), b"b", &many[..1]).expect("send");
        assert_eq!(
            rx.read_available(&mut got).expect("within"),
            ReadStatus::Open
        );
        assert_eq!(got, b"ab");
        send_with_fds(a.as_fd(), b"c", &many[..1]).expect("send");
        let err = rx.read_available(&mut got).expect_err("over the budget");
        assert!(err.to_string().contains("accepts (3)"), "{err}");
        assert!(rx.take_fds(1).is_none(), "the queue was emptied");

        // Taking descriptors makes room again; a full message over the room is refused.
        let (a, b) = socketpair_cloexec().expect("pair");
        let mut rx = Conn::new(b).expect("conn").with_fd_budget(300);
        send_with_fds(a.as_fd(), b"a", &many).expect("send");
        let mut got = Vec::new();
        rx.read_available(&mut got).expect("within");
        assert_eq!(rx.take_fds(253).expect("253 arrived").len(), 253);
        send_with_fds(a.as_fd(), b"b", &many).expect("send");
        rx.read_available(&mut got).expect("room again");
        send_with_fds(a.as_fd(), b"c", &many).expect("send");
        let err = rx.read_available(&mut got).expect_err("253 + 253 > 300");
        assert!(err.to_string().contains("accepts (300)"), "{err}");
        // Never above the cap.
        assert_eq!(
            Conn::new(a)
                .expect("conn")
                .with_fd_budget(usize::MAX)
                .fd_budget(),
            MAX_FD_BUDGET
        );
    }

    #[test]
    fn a_peer_that_never_reads_is_cut_off_at_the_outbox_limit() {
        let (a, _b) = socketpair_cloexec().expect("pair");
        let mut tx = Conn::new(a).expect("conn");
        let chunk = vec![0u8; 256 * 1024];
        let err = (0..64)
            .find_map(|_| tx.send(&chunk, &[]).err())
            .expect("cut off before 16 MiB");
        assert!(err.to_string().contains("has not read"), "{err}");
    }
}
