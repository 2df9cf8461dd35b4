//! Which role this process was started in, at the engine's level: a cold start with the
//! inherited listeners, or a successor with its channel to the supervisor. The drivers wrap
//! the channel (`handoff_io_std::Successor`, `handoff_io_mio::Successor`).

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};
use crate::held;
use crate::inherit::InheritedListeners;
use crate::inherit::MAX_INHERITED_FDS;
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
    /// Started by a supervisor to take over from the serving daemon: the channel to that
    /// supervisor, for a driver's successor.
    Successor(UnixStream),
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
/// can take them back from this daemon (see [`crate::held`]).
pub fn detect_role() -> Result<Role> {
    if std::env::var_os(ENV_ROLE).is_some_and(|v| v == ROLE_SUCCESSOR) {
        let channel = take_channel()?;
        presize_fd_table(&channel);
        return Ok(Role::Successor(channel));
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

/// Own the successor channel named by `HANDOFF_CHANNEL_FD`, once per process. A descriptor
/// there that is not a connected `AF_UNIX` stream socket is refused and left open: it may be
/// someone else's.
fn take_channel() -> Result<UnixStream> {
    let chan = crate::inherit::successor_channel_from_env().map_err(|detail| Error::Channel {
        what: ENV_CHANNEL_FD.into(),
        detail,
    })?;
    // Its peer spawned us: the supervisor this successor will admit at once as incumbent.
    crate::sys::supervisor_lock::remember_spawner(std::os::fd::AsFd::as_fd(&chan));
    Ok(chan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::spawn::{spawn_successor, Command};
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    const CHILD_ENV: &str = "HOIS_ROLE_CHILD";
    const CHILD_TEST: &str = "role::tests::child_side_wrong_channel";

    /// What `/proc/self/fd/N` names, or why it cannot be read.
    fn fd_target(fd: RawFd) -> String {
        match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(e) => format!("not open ({e})"),
        }
    }

    /// The child half of [`a_channel_of_the_wrong_type_is_left_open`]: started as a successor
    /// whose `HANDOFF_CHANNEL_FD` names a UDP socket. Returns at once in a normal run.
    #[test]
    fn child_side_wrong_channel() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let fd: RawFd = std::env::var(ENV_CHANNEL_FD).unwrap().parse().unwrap();
        let before = fd_target(fd);
        assert!(before.starts_with("socket:["), "{before}");
        let err = match detect_role() {
            Ok(r) => panic!("a UDP socket was taken as the channel: {r:?}"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("not a connected AF_UNIX stream socket"),
            "{err}"
        );
        // Not this code's to close: it is still open, the same socket.
        assert_eq!(fd_target(fd), before, "after: {err}");
        println!("left open: {err}");
    }

    /// `detect_role` refuses a channel descriptor of the wrong type without closing it: it
    /// may be someone else's.
    #[test]
    fn a_channel_of_the_wrong_type_is_left_open() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let log = std::env::temp_dir().join(format!("hois-role-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        // Through a shell for the output file; `exec` keeps the descriptors and the pid.
        let cmd = Command::new("/bin/sh")
            .args(["-c", "exec \"$0\" \"$@\" >>\"$CHILD_LOG\" 2>&1"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, "1")
            .env("CHILD_LOG", &log)
            .inherit_stdio(false);
        let child = spawn_successor(&cmd, udp.as_fd()).unwrap();
        let out = crate::sys::testutil::finish(child, &log, "wrong channel type");
        let _ = std::fs::remove_file(&log);
        assert!(out.contains("left open: "), "{out}");
    }
}
