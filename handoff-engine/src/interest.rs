//! The driving contract of the engines ([`IncumbentEngine`](crate::IncumbentEngine),
//! [`SuccessorEngine`](crate::SuccessorEngine), [`SupervisorEngine`](crate::SupervisorEngine)),
//! the non-blocking cores of the three roles, shared by both drivers.
//!
//! An engine owns a role's machine and its descriptors (control socket, connections,
//! pidfds) and performs every output the machine asks for that needs no decision from the
//! application: sending frames with their listeners, taking and releasing the lock, writing
//! the journal, spawning and killing processes. What it cannot do on its own comes out as an
//! event (`poll_event`): call a hook, report an outcome. No engine call blocks (the one
//! exception is the supervisor's journal `fsync` and `fork`/`exec`, which take milliseconds).
//!
//! A driver wraps an engine in a loop of one shape:
//!
//! 1. wait until a descriptor of [`interests`](crate::IncumbentEngine::interests) is ready or
//!    [`poll_timeout`](crate::IncumbentEngine::poll_timeout) passes;
//! 2. feed what happened: `ready(now, key, readable, writable)`, `handle_timeout(now)`, hook
//!    results;
//! 3. drain `poll_event()` until it returns `None`, acting on each event;
//! 4. go back to 1; the interests may have changed.
//!
//! The std driver does this with `poll(2)` (and runs hooks on a thread); `handoff-io-mio`
//! registers the interests with a `mio::Registry` and hands the events to the application.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags};

use crate::sys::conn::{readable, wait, writable};

/// A descriptor an engine wants watched, and for what.
#[derive(Debug)]
pub struct Interest<'a, K> {
    /// What to tell the engine when it is ready.
    pub key: K,
    /// The descriptor.
    pub fd: BorrowedFd<'a>,
    /// Watch for readability (always true today: every descriptor is read).
    pub read: bool,
    /// Watch for writability (an outbox is waiting).
    pub write: bool,
}

/// Ready descriptors: `(key, readable, writable)`.
pub type Ready<K> = Vec<(K, bool, bool)>;

/// Wait with `poll(2)` until one of `interests` (or `waker`, if given) is ready or `until`
/// passes; returns the ready keys with (readable, writable), and whether `waker` is readable.
/// The std driver's loops are this plus dispatch.
pub fn wait_ready<K: Copy>(
    interests: &[Interest<'_, K>],
    waker: Option<BorrowedFd<'_>>,
    until: Option<Instant>,
) -> io::Result<(Ready<K>, bool)> {
    let mut fds: Vec<PollFd<'_>> = interests
        .iter()
        .map(|i| {
            let mut f = PollFlags::empty();
            if i.read {
                f |= PollFlags::IN;
            }
            if i.write {
                f |= PollFlags::OUT;
            }
            PollFd::from_borrowed_fd(i.fd, f)
        })
        .collect();
    if let Some(w) = waker {
        fds.push(PollFd::from_borrowed_fd(w, PollFlags::IN));
    }
    wait(&mut fds, until)?;
    let ready = interests
        .iter()
        .zip(&fds)
        .filter(|(_, p)| readable(p) || writable(p))
        .map(|(i, p)| (i.key, readable(p), writable(p)))
        .collect();
    let woken = waker.is_some() && readable(&fds[fds.len() - 1]);
    Ok((ready, woken))
}
