//! Which role this process was started in.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};
use crate::held;
use crate::inherit::InheritedListeners;
use crate::inherit::MAX_INHERITED_FDS;
use crate::successor::Successor;
use crate::sys::spawn::{ENV_CHANNEL_FD, ENV_LISTENER_COUNT, ENV_ROLE, ROLE_SUCCESSOR};

/// How this process was started.
#[derive(Debug)]
pub enum Role {
    /// First boot, a restart, or the supervisor's cold start. `inherited` holds the listeners
    /// passed systemd-style (`LISTEN_FDS`), if any; bind your own for the names missing.
    ColdStart {
        /// Listeners passed in `LISTEN_FDS`, by name.
        inherited: InheritedListeners,
    },
    /// Started by a supervisor to take over from the serving daemon.
    Successor(Successor),
}

/// Find out how this process was started. Call it once, early in `main`, before the program
/// opens descriptors of its own.
///
/// A successor is recognised by `HANDOFF_ROLE=successor` with `HANDOFF_CHANNEL_FD` naming its
/// channel to the supervisor, an `AF_UNIX` stream socket; anything else is a cold start, with
/// the listeners of `LISTEN_FDS` (see [`crate::inherit`]). A second call finds the channel
/// and the listeners already taken and returns an error or an empty set.
///
/// The library keeps a duplicate of every inherited listener, so that a restarted supervisor
/// can take them back from this daemon (see [`Incumbent`](crate::Incumbent)).
pub fn detect_role() -> Result<Role> {
    if std::env::var_os(ENV_ROLE).is_some_and(|v| v == ROLE_SUCCESSOR) {
        let channel = take_channel()?;
        presize_fd_table(&channel);
        return Ok(Role::Successor(Successor::new(channel)));
    }
    let inherited = InheritedListeners::from_env()?;
    for (name, kind, fd) in inherited.borrow_all() {
        held::keep(name, kind, fd)?;
    }
    Ok(Role::ColdStart { inherited })
}

/// Grow the descriptor table to fit what a successor is about to hold: each listener it
/// receives and the duplicate it keeps ([`ENV_LISTENER_COUNT`] says how many), before the
/// successor starts its thread. Growing the table of a multi-threaded process waits for an RCU
/// grace period (the kernel's `expand_fdtable`); the scale benchmark measured 9–20 ms of that
/// per handoff at 1,000 listeners, while the retiring incumbent's descriptors were being freed
/// (`BENCHMARKS.md`). Best effort: a table that cannot grow (the descriptor limit) grows later.
fn presize_fd_table(channel: &UnixStream) {
    let Some(n) = std::env::var(ENV_LISTENER_COUNT)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    // n <= MAX_INHERITED_FDS, so the number fits in a RawFd.
    let highest = (2 * n.min(MAX_INHERITED_FDS) + 64) as RawFd;
    if let Ok(probe) = rustix::io::fcntl_dupfd_cloexec(channel, highest) {
        drop(probe);
    }
}

/// Own the successor channel named by `HANDOFF_CHANNEL_FD`, once per process.
#[allow(unsafe_code)]
fn take_channel() -> Result<UnixStream> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let bad = |detail: String| Error::Channel {
        what: ENV_CHANNEL_FD.into(),
        detail,
    };
    let value = std::env::var(ENV_CHANNEL_FD)
        .map_err(|_| bad("is not set (or not UTF-8) though HANDOFF_ROLE=successor".into()))?;
    let fd: RawFd = match value.parse::<RawFd>() {
        Ok(fd) if fd > 2 && value.bytes().all(|b| b.is_ascii_digit()) => fd,
        _ => return Err(bad(format!("{value:?} is not a descriptor number above 2"))),
    };
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(bad("was already taken by an earlier detect_role".into()));
    }
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| bad(format!("descriptor {fd} is not open: {e}")))?;
    if !target.to_string_lossy().starts_with("socket:[") {
        return Err(bad(format!(
            "descriptor {fd} is {}, not a socket",
            target.display()
        )));
    }
    // SAFETY: descriptor `fd` is open (checked through /proc/self/fd just above) and is a
    // socket; the supervisor that set HANDOFF_ROLE passed it to this process at exec for its
    // channel, nothing else in the process owns it, and `TAKEN` makes sure it is owned once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_stream_conn = (|| -> rustix::io::Result<bool> {
        use rustix::net::{sockopt, AddressFamily, SocketType};
        Ok(sockopt::socket_domain(&owned)? == AddressFamily::UNIX
            && sockopt::socket_type(&owned)? == SocketType::STREAM
            && !sockopt::socket_acceptconn(&owned)?)
    })();
    match is_stream_conn {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(format!(
                "descriptor {} is not a connected AF_UNIX stream socket",
                owned.as_raw_fd()
            )))
        }
        Err(e) => return Err(bad(format!("descriptor {fd}: {e}"))),
    }
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| bad(format!("cannot set close-on-exec on {fd}: {e}")))?;
    Ok(UnixStream::from(owned))
}
