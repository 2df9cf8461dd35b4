//! A non-blocking control connection: bytes in and out with descriptors (`SCM_RIGHTS`), and
//! the `poll(2)` wait the drivers' loops are built on.
//!
//! Reads never block: [`Conn::read_available`] takes what is queued and says whether the peer
//! closed. Writes are bounded: [`Conn::send`] waits for room at most the given time, so a peer
//! that stops reading can stall a driver for that long and no longer. Descriptors that arrive
//! are queued in order until the frame that announced them is decoded
//! ([`Conn::take_fds`]); a peer that sends more than a handoff can ever need is cut off.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use crate::inherit::MAX_INHERITED_FDS;
use crate::sys::fdpass::{recv_with_fds, send_some_with_fds};

/// Most descriptors queued on one connection before the peer is cut off.
const MAX_QUEUED_FDS: usize = MAX_INHERITED_FDS + 8;

/// Most bytes taken from a connection in one call, so one chatty peer cannot starve a loop.
const MAX_READ_PER_CALL: usize = 4 << 20;

/// What [`Conn::read_available`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadStatus {
    /// The connection is open; `bytes` (maybe none) were read.
    Open,
    /// The peer closed (end of stream or reset) after the bytes read.
    Closed,
}

/// One control connection.
#[derive(Debug)]
pub(crate) struct Conn {
    sock: UnixStream,
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    /// Wrap a connected stream socket and make it non-blocking.
    pub(crate) fn new(sock: UnixStream) -> io::Result<Conn> {
        sock.set_nonblocking(true)?;
        Ok(Conn {
            sock,
            fds: VecDeque::new(),
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Append to `out` everything queued now, and the descriptors that came with it to the
    /// connection's queue.
    pub(crate) fn read_available(&mut self, out: &mut Vec<u8>) -> io::Result<ReadStatus> {
        let mut buf = [0u8; 64 * 1024];
        let mut fds = Vec::new();
        let mut total = 0;
        loop {
            match recv_with_fds(self.sock.as_fd(), &mut buf, &mut fds) {
                Ok(0) => {
                    self.queue(fds)?;
                    return Ok(ReadStatus::Closed);
                }
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    total += n;
                    self.queue(std::mem::take(&mut fds))?;
                    if total >= MAX_READ_PER_CALL {
                        return Ok(ReadStatus::Open);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadStatus::Open),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(ReadStatus::Closed)
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn queue(&mut self, fds: Vec<OwnedFd>) -> io::Result<()> {
        self.fds.extend(fds);
        if self.fds.len() > MAX_QUEUED_FDS {
            self.fds.clear();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer sent more than {MAX_QUEUED_FDS} descriptors"),
            ));
        }
        Ok(())
    }

    /// The next `n` descriptors received, in order; `None` (and the queue emptied) if fewer
    /// arrived.
    pub(crate) fn take_fds(&mut self, n: usize) -> Option<Vec<OwnedFd>> {
        if self.fds.len() < n {
            self.fds.clear();
            return None;
        }
        Some(self.fds.drain(..n).collect())
    }

    /// Write all of `bytes`, `fds` riding with the first byte, waiting at most `timeout` for
    /// room in the socket buffer. Never raises `SIGPIPE`.
    pub(crate) fn send(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> io::Result<()> {
        let until = Instant::now() + timeout;
        let mut sent = 0;
        let mut first = true;
        while sent < bytes.len() {
            let with: &[BorrowedFd<'_>] = if first { fds } else { &[] };
            match send_some_with_fds(self.sock.as_fd(), &bytes[sent..], with) {
                Ok(n) => {
                    sent += n;
                    first = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = [PollFd::new(&self.sock, PollFlags::OUT)];
                    if wait(&mut p, Some(until))? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("peer did not read for {timeout:?}"),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `poll(2)` until one of `fds` is ready or `until` passes (`None`: no limit); returns how
/// many are ready (0 on timeout). Retries `EINTR` with the time left.
pub(crate) fn wait(fds: &mut [PollFd<'_>], until: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout = match until {
            None => None,
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                // Round up, so a wake-up never comes a hair early and spins.
                let left = left + Duration::from_nanos(999_999);
                Some(rustix::event::Timespec {
                    tv_sec: left.as_secs() as i64,
                    tv_nsec: i64::from(left.subsec_millis()) * 1_000_000,
                })
            }
        };
        match rustix::event::poll(fds, timeout.as_ref()) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a polled descriptor is readable or hung up (both mean: read it now).
pub(crate) fn readable(p: &PollFd<'_>) -> bool {
    p.revents()
        .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

/// A self-wakeable pair: another thread [`Waker::wake`]s a loop blocked in [`wait`] on
/// [`Waker::fd`].
#[derive(Debug)]
pub(crate) struct Waker {
    rx: UnixStream,
    tx: UnixStream,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let (rx, tx) = crate::sys::fdpass::socketpair_cloexec()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Waker { rx, tx })
    }

    /// The end to poll for `IN`.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }

    /// Wake the loop. A full buffer means a wake-up is already pending.
    pub(crate) fn wake(&self) {
        let _ = rustix::net::send(&self.tx, &[1], rustix::net::SendFlags::NOSIGNAL);
    }

    /// Consume pending wake-ups.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = rustix::net::recv(&self.rx, &mut buf, rustix::net::RecvFlags::empty()) {
            if n.0 == 0 {
                break;
            }
        }
    }
}
