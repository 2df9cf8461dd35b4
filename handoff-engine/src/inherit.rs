//! systemd-style listener inheritance for a cold start (`sd_listen_fds(3)`).
//!
//! A socket-activating launcher (systemd, `systemfd`, a test harness) starts the daemon with
//! its listeners at descriptors 3, 4, … ([`SD_LISTEN_FDS_START`]) and describes them in three
//! environment variables:
//!
//! - `LISTEN_PID`: the pid the descriptors are meant for. Unset or another pid: they are not
//!   ours (they were inherited through an intermediate process) and are ignored.
//! - `LISTEN_FDS`: how many descriptors, from fd 3 on.
//! - `LISTEN_FDNAMES`: their names, colon-separated (`http:dns:admin`). Unset: every name is
//!   `"unknown"`, as systemd does.
//!
//! What is here:
//!
//! - [`parse`]: the pure reading of the three variables, with the rules above and the errors
//!   of [`InheritError`]. No descriptor is touched.
//! - [`InheritedListeners`]: named, checked, close-on-exec, blocking listeners, and the takers
//!   an application uses (`inherited.take("http")`).
//!
//! - [`InheritedListeners::from_env`]: takes ownership of the descriptors [`parse`] names, once
//!   per process. Before it owns anything it checks through `/proc/self/fd` that every named
//!   descriptor is an open socket, so a wrong `LISTEN_FDS` can never make it close a file the
//!   program opened itself. When one fails its check, none of the others is left inheritable.
//!
//! The same care for the other descriptor numbers that come from outside: the successor's
//! channel named by `HANDOFF_CHANNEL_FD` ([`detect_role`](crate::role::detect_role)), owned only once
//! it has been seen to be a connected `AF_UNIX` stream socket and otherwise left open, and a
//! listener given to a supervisor as a raw number ([`ListenerSource`](crate::ListenerSource))
//!, only duplicated. Turning a raw descriptor number into an `OwnedFd` or a
//! `BorrowedFd` has no safe API: this module and `sys::spawn` hold the crate's `unsafe` code,
//! each use with a SAFETY comment.
//!
//! The `LISTEN_*` variables are left in the environment (removing them is not thread-safe).
//! Children the daemon spawns inherit the variables but not the descriptors, which are
//! close-on-exec once taken; a child's `LISTEN_PID` check fails anyway.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use handoff_proto::ListenerKind;

use crate::held::Held;
pub use crate::listener::{Listener, ListenerSet};

use crate::sys::sockcheck::{self, SockCheckError};

pub use crate::sys::{MAX_INHERITED_FDS, SD_LISTEN_FDS_START};

/// The name given to a descriptor `LISTEN_FDNAMES` does not name (systemd's default).
pub const UNKNOWN_NAME: &str = "unknown";

/// Why the inherited listeners cannot be used. Every variant names the variable or the
/// descriptor at fault and the value found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InheritError {
    /// `LISTEN_PID` is set but is not a positive decimal number.
    #[error("LISTEN_PID={value:?} is not a process id")]
    BadPid {
        /// The variable's value.
        value: String,
    },
    /// `LISTEN_FDS` is set but is not a decimal number.
    #[error("LISTEN_FDS={value:?} is not a descriptor count")]
    BadCount {
        /// The variable's value.
        value: String,
    },
    /// `LISTEN_FDS` is larger than [`MAX_INHERITED_FDS`].
    #[error("LISTEN_FDS={count} is more than the {max} descriptors accepted")]
    TooMany {
        /// The count found.
        count: usize,
        /// [`MAX_INHERITED_FDS`].
        max: usize,
    },
    /// `LISTEN_FDNAMES` does not have exactly `LISTEN_FDS` entries.
    #[error("LISTEN_FDNAMES={value:?} has {names} names but LISTEN_FDS={count}")]
    NameCountMismatch {
        /// The variable's value.
        value: String,
        /// How many colon-separated entries it has.
        names: usize,
        /// `LISTEN_FDS`.
        count: usize,
    },
    /// `LISTEN_FDS` names a descriptor that is not open, or not a socket. Nothing was taken.
    #[error("LISTEN_FDS names descriptor {fd} ({name:?}), which is not an open socket: {found}")]
    NotASocket {
        /// The descriptor number.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What `/proc/self/fd` shows for it (or why it could not be read).
        found: String,
    },
    /// An inherited descriptor is not a socket a listener can be (or is a stream socket that
    /// is not listening).
    #[error("inherited descriptor {fd} ({name:?}) is not a listener: {source}")]
    NotAListener {
        /// The descriptor number.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What is wrong with it.
        source: SockCheckError,
    },
    /// Setting close-on-exec or blocking mode on an inherited descriptor failed.
    #[error("cannot set up inherited descriptor {fd} ({name:?}): {source}")]
    Setup {
        /// The descriptor number.
        fd: RawFd,
        /// Its name.
        name: String,
        /// The system error.
        source: io::Error,
    },
}

/// A decimal number made of ASCII digits only: no sign, no blanks (`u32::from_str` would
/// accept `"+3"`).
fn decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Read the three `sd_listen_fds` variables (given as their values, `None` when unset) for a
/// process whose pid is `my_pid`, and return the inherited descriptors as `(fd, name)` pairs,
/// fd 3 first. Touches no descriptor.
///
/// - `LISTEN_PID` unset, or another pid: `Ok(vec![])` (nothing is checked further: the
///   variables were meant for another process). Set but not a positive number: an error.
/// - `LISTEN_FDS` unset: `Ok(vec![])`. Not a number: an error. Zero: `Ok(vec![])` (libsystemd
///   calls zero `EINVAL`; a launcher that passes nothing is no reason to refuse to start),
///   provided `LISTEN_FDNAMES` is unset or empty. More than [`MAX_INHERITED_FDS`]: an error.
/// - `LISTEN_FDNAMES` unset: every name is [`UNKNOWN_NAME`]. Set: exactly `LISTEN_FDS`
///   colon-separated entries, or an error; an empty entry (`http::admin`) is also
///   [`UNKNOWN_NAME`]. Names need not be unique.
pub fn parse(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Vec<(RawFd, String)>, InheritError> {
    let Some(pid) = listen_pid else {
        return Ok(Vec::new());
    };
    match decimal(pid) {
        Some(0) | None => {
            return Err(InheritError::BadPid {
                value: pid.to_owned(),
            })
        }
        Some(p) if p != my_pid => return Ok(Vec::new()),
        Some(_) => {}
    }
    let Some(fds) = listen_fds else {
        return Ok(Vec::new());
    };
    let count = decimal(fds).ok_or_else(|| InheritError::BadCount {
        value: fds.to_owned(),
    })? as usize;
    if count > MAX_INHERITED_FDS {
        return Err(InheritError::TooMany {
            count,
            max: MAX_INHERITED_FDS,
        });
    }
    let names: Vec<String> = match listen_fdnames {
        None => vec![UNKNOWN_NAME.to_owned(); count],
        Some("") if count == 0 => Vec::new(),
        Some(value) => {
            let names: Vec<&str> = value.split(':').collect();
            if names.len() != count {
                return Err(InheritError::NameCountMismatch {
                    value: value.to_owned(),
                    names: names.len(),
                    count,
                });
            }
            names
                .into_iter()
                .map(|n| if n.is_empty() { UNKNOWN_NAME } else { n }.to_owned())
                .collect()
        }
    };
    // count <= MAX_INHERITED_FDS, so the numbers fit in a RawFd.
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (SD_LISTEN_FDS_START + i as RawFd, name))
        .collect())
}

/// Inherited listeners: each named, checked to be a listener of a known kind, close-on-exec
/// and in blocking mode. Take them out by name and type with
/// [`take`](ListenerSet::take); what is never taken is closed on drop. The same type as a
/// successor's received listeners ([`ListenerSet`]).
pub type InheritedListeners = ListenerSet;

impl ListenerSet {
    /// The listeners this process inherited (`sd_listen_fds(3)`): checked, named, close-on-exec
    /// and blocking. Empty if none were meant for this process. Call it early, before the
    /// program opens descriptors of its own; a second call returns an empty set (the
    /// descriptors are taken once per process).
    ///
    /// On an error about a descriptor, none of the descriptors `LISTEN_FDS` names is left for a
    /// child to inherit: the sockets among them that came through `exec` (not close-on-exec)
    /// are owned and closed, as they would have been owned on success; a descriptor that is not
    /// a socket is not this code's to close, and is only made close-on-exec.
    #[allow(unsafe_code)]
    pub fn from_env() -> Result<InheritedListeners, InheritError> {
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(InheritedListeners::empty());
        }
        let var = |k: &str| std::env::var(k).ok();
        let list = parse(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        )?;
        // Check every descriptor before owning any, without borrowing a number that may not
        // be open: `/proc/self/fd/N` names the open file, `socket:[inode]` for a socket.
        for (fd, name) in &list {
            if let Err(found) = proc_socket(*fd) {
                let err = InheritError::NotASocket {
                    fd: *fd,
                    name: name.clone(),
                    found,
                };
                disarm(list.iter().map(|(fd, _)| *fd));
                return Err(err);
            }
        }
        // Every one is owned before any is checked further, so that on an error in
        // `from_owned` all of them are closed.
        let owned: Vec<(String, OwnedFd)> = list
            .into_iter()
            .map(|(fd, name)| {
                // SAFETY: by sd_listen_fds(3), the launcher that set LISTEN_PID to this
                // process's pid passed these descriptors to it at exec; each is open and a
                // socket (checked just above); nothing else in this process owns them (the
                // launcher's protocol reserves 3.. for them, and `TAKEN` makes sure this code
                // takes them only once).
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                (name, fd)
            })
            .collect();
        InheritedListeners::from_owned(owned)
    }

    /// Check and set up descriptors this process owns: each must be a listener (see
    /// [`sockcheck::inspect`]); each is made close-on-exec and blocking
    /// ([`sockcheck::normalise`]). On error every descriptor given is closed (the whole of
    /// `fds` is taken first) and the error names the first bad one (its number and name).
    ///
    /// Blocking mode lives on the open file description, shared with the launcher's copy;
    /// see [`sockcheck::normalise`].
    pub fn from_owned(
        fds: impl IntoIterator<Item = (String, OwnedFd)>,
    ) -> Result<InheritedListeners, InheritError> {
        // All of them, before the first check can return: the rest are then dropped (closed)
        // with it rather than left where a lazy iterator had them.
        let fds: Vec<(String, OwnedFd)> = fds.into_iter().collect();
        let mut entries = Vec::new();
        for (name, fd) in fds {
            let raw = fd.as_raw_fd();
            let kind = match sockcheck::inspect(fd.as_fd()) {
                Ok(k) => ListenerKind::from(k),
                Err(source) => {
                    return Err(InheritError::NotAListener {
                        fd: raw,
                        name,
                        source,
                    })
                }
            };
            if let Err(source) = sockcheck::normalise(fd.as_fd()) {
                return Err(InheritError::Setup {
                    fd: raw,
                    name,
                    source,
                });
            }
            entries.push(Held { name, kind, fd });
        }
        Ok(ListenerSet::from_held(entries))
    }
}

// ---- Descriptor numbers named by someone else ----
//
// A number read from the environment or given by a caller as a `RawFd` identifies nothing this
// process owns until shown otherwise. `/proc/self/fd` and `/proc/self/fdinfo` describe a
// number without touching it; only then is it borrowed (`BorrowedFd::borrow_raw`) for a check
// or a duplicate, and owned only when the protocol that named it gives it to this process.

/// What `/proc/self/fd/<fd>` names (`socket:[inode]` for a socket), read without touching the
/// descriptor; an error if it is not open.
fn proc_target(fd: RawFd) -> io::Result<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).map(|t| t.to_string_lossy().into_owned())
}

/// `Ok` if descriptor `fd` is open and a socket (by `/proc/self/fd`); else what it is, or why
/// it cannot be read.
fn proc_socket(fd: RawFd) -> Result<(), String> {
    if fd < 0 {
        return Err(format!("{fd} is not a descriptor number"));
    }
    match proc_target(fd) {
        Ok(t) if t.starts_with("socket:[") => Ok(()),
        Ok(t) => Err(t),
        Err(e) => Err(format!("not open ({e})")),
    }
}

/// Whether descriptor `fd` is close-on-exec, by `/proc/self/fdinfo/<fd>` (read without
/// touching it); `None` if it is not open or cannot be read.
fn proc_cloexec(fd: RawFd) -> Option<bool> {
    const O_CLOEXEC: u32 = 0o2000000;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
    Some(flags & O_CLOEXEC != 0)
}

/// After a refused `LISTEN_FDS`: leave none of `fds` inheritable. A socket that came through
/// `exec` (not close-on-exec) is owned and closed, as `from_env` would have owned it; a
/// descriptor that is not a socket is made close-on-exec and left open; one that is not open,
/// or already close-on-exec (this process opened or took it after the exec), is left alone.
#[allow(unsafe_code)]
fn disarm(fds: impl Iterator<Item = RawFd>) {
    for fd in fds {
        if proc_cloexec(fd) != Some(false) {
            continue;
        }
        if proc_socket(fd).is_ok() {
            // SAFETY: `fd` is open, a socket, and inheritable: it came through the exec, and
            // sd_listen_fds(3) gives the descriptors `LISTEN_FDS` names to this process
            // (LISTEN_PID is its pid); `from_env`'s `TAKEN` makes sure nothing took them
            // before. Owning it here, to close it at once, is what `from_env` does on success.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        } else {
            // SAFETY: `fd` was open an instant ago (`/proc/self/fdinfo`) and is borrowed for
            // one fcntl(F_SETFD) only. Closed by another thread meanwhile: EBADF, ignored;
            // reused by it: a new descriptor gets FD_CLOEXEC, which std sets on every
            // descriptor it opens anyway. Nothing is closed.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC);
        }
    }
}

/// Own the successor's channel, the descriptor named by `HANDOFF_CHANNEL_FD`, once per
/// process, if it is a connected `AF_UNIX` stream socket; it is made close-on-exec. Any other
/// descriptor there is refused and left as it is, open: it may be someone else's. The error
/// says what is wrong (the caller names the variable).
#[allow(unsafe_code)]
pub(crate) fn successor_channel_from_env() -> Result<std::os::unix::net::UnixStream, String> {
    use crate::sys::spawn::ENV_CHANNEL_FD;
    static TAKEN: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let value = std::env::var(ENV_CHANNEL_FD)
        .map_err(|_| "is not set (or not UTF-8) though HANDOFF_ROLE=successor".to_string())?;
    let fd: RawFd = match decimal(&value).and_then(|n| RawFd::try_from(n).ok()) {
        Some(fd) if fd > 2 => fd,
        _ => return Err(format!("{value:?} is not a descriptor number above 2")),
    };
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if *taken {
        return Err("was already taken by an earlier detect_role".into());
    }
    proc_socket(fd).map_err(|found| format!("descriptor {fd} is {found}, not a socket"))?;
    // SAFETY: `fd` is open (just checked through /proc/self/fd) and is borrowed for the
    // getsockopt calls below only. Were it closed by another thread meanwhile they fail
    // (EBADF); were it reused, they describe the new descriptor and nothing is changed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let is_stream_conn = (|| -> rustix::io::Result<bool> {
        use rustix::net::{sockopt, AddressFamily, SocketType};
        Ok(sockopt::socket_domain(borrowed)? == AddressFamily::UNIX
            && sockopt::socket_type(borrowed)? == SocketType::STREAM
            && !sockopt::socket_acceptconn(borrowed)?)
    })();
    match is_stream_conn {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "descriptor {fd} is not a connected AF_UNIX stream socket (left open)"
            ))
        }
        Err(e) => return Err(format!("descriptor {fd}: {e} (left open)")),
    }
    // SAFETY: `fd` is an open, connected AF_UNIX stream socket (checked just above); the
    // supervisor that set HANDOFF_ROLE passed it to this process at exec for its channel and
    // named it in HANDOFF_CHANNEL_FD; nothing else in the process owns it, and `TAKEN` makes
    // sure it is owned once.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    *taken = true;
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("cannot set close-on-exec on {fd}: {e}"))?;
    Ok(owned.into())
}

/// A close-on-exec duplicate of descriptor number `fd`, which this process does not own and
/// whose caller only vouches that it is open now (a listener given by number). `/proc/self/fd`
/// must show an open socket first; only then is the number borrowed, for the one
/// `fcntl(F_DUPFD_CLOEXEC)`. The descriptor, its flags and its open file description are left
/// as they are. The error says what the number is instead.
#[allow(unsafe_code)]
pub(crate) fn dup_raw_socket(fd: RawFd) -> Result<OwnedFd, String> {
    proc_socket(fd).map_err(|found| format!("descriptor {fd} is {found}, not a socket"))?;
    // SAFETY: `fd` is open (just checked through /proc/self/fd) and is borrowed for one
    // fcntl(F_DUPFD_CLOEXEC). Were it closed by another thread meanwhile, the call fails with
    // EBADF; were the number reused meanwhile, the duplicate is of the new descriptor, which
    // the caller's check of the listener kind then judges. Nothing is closed or changed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, SD_LISTEN_FDS_START)
        .map_err(|e| format!("descriptor {fd}: cannot duplicate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{is_cloexec, TempDir};
    use handoff_proto::ListenerInfo;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    const ME: u32 = 4242;

    fn ok(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Vec<(RawFd, String)> {
        parse(pid, fds, names, ME).unwrap()
    }

    fn pairs(v: &[(RawFd, &str)]) -> Vec<(RawFd, String)> {
        v.iter().map(|(f, n)| (*f, n.to_string())).collect()
    }

    #[test]
    fn parse_unset_means_nothing() {
        assert!(ok(None, None, None).is_empty());
        // systemd requires LISTEN_PID: without it the descriptors are not known to be ours.
        assert!(ok(None, Some("2"), Some("a:b")).is_empty());
        assert!(ok(Some("4242"), None, None).is_empty());
        assert!(ok(Some("4242"), None, Some("a:b")).is_empty());
    }

    #[test]
    fn parse_wrong_pid_means_nothing_and_checks_nothing_else() {
        assert!(ok(Some("1"), Some("2"), Some("a:b")).is_empty());
        assert!(ok(Some("42420"), Some("garbage"), Some("a:b:c")).is_empty());
        assert!(ok(Some("4241"), Some("99999"), None).is_empty());
    }

    #[test]
    fn parse_pid_match() {
        assert_eq!(
            ok(Some("4242"), Some("3"), Some("http:dns:admin")),
            pairs(&[(3, "http"), (4, "dns"), (5, "admin")])
        );
        assert_eq!(ok(Some("4242"), Some("1"), Some("x")), pairs(&[(3, "x")]));
        // Duplicate names are allowed (systemd allows them); the takers use the first.
        assert_eq!(
            ok(Some("4242"), Some("2"), Some("x:x")),
            pairs(&[(3, "x"), (4, "x")])
        );
        let max = MAX_INHERITED_FDS.to_string();
        let v = ok(Some("4242"), Some(&max), None);
        assert_eq!(v.len(), 16_192);
        assert_eq!(v.last().unwrap().0, 3 + 16_191);
    }

    #[test]
    fn parse_missing_names_are_unknown() {
        assert_eq!(
            ok(Some("4242"), Some("2"), None),
            pairs(&[(3, "unknown"), (4, "unknown")])
        );
        assert_eq!(
            ok(Some("4242"), Some("3"), Some("http::admin")),
            pairs(&[(3, "http"), (4, "unknown"), (5, "admin")])
        );
        assert_eq!(
            ok(Some("4242"), Some("1"), Some("")),
            pairs(&[(3, "unknown")])
        );
        assert_eq!(
            ok(Some("4242"), Some("2"), Some(":")),
            pairs(&[(3, "unknown"), (4, "unknown")])
        );
    }

    #[test]
    fn parse_count_name_mismatch() {
        for (fds, names, n) in [
            ("3", "http:dns", 2),
            ("1", "a:b", 2),
            ("2", "a", 1),
            ("3", "a:b:c:", 4),
        ] {
            let e = parse(Some("4242"), Some(fds), Some(names), ME).unwrap_err();
            match &e {
                InheritError::NameCountMismatch {
                    value,
                    names: got,
                    count,
                } => {
                    assert_eq!(
                        (value.as_str(), *got, count.to_string()),
                        (names, n, fds.to_string())
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        let e = parse(Some("4242"), Some("3"), Some("http:dns"), ME).unwrap_err();
        assert_eq!(
            e.to_string(),
            "LISTEN_FDNAMES=\"http:dns\" has 2 names but LISTEN_FDS=3"
        );
    }

    #[test]
    fn parse_garbage_numbers() {
        for pid in [
            "",
            "0",
            "-1",
            "+4242",
            " 4242",
            "4242 ",
            "42x",
            "0x10",
            "99999999999",
        ] {
            let e = parse(Some(pid), Some("1"), None, ME).unwrap_err();
            assert!(
                matches!(&e, InheritError::BadPid { value } if value == pid),
                "{pid:?}: {e:?}"
            );
        }
        assert_eq!(
            parse(Some("x"), None, None, ME).unwrap_err().to_string(),
            "LISTEN_PID=\"x\" is not a process id"
        );
        for fds in ["", "-1", "+1", " 1", "1 ", "one", "0x1", "99999999999"] {
            let e = parse(Some("4242"), Some(fds), None, ME).unwrap_err();
            assert!(
                matches!(&e, InheritError::BadCount { value } if value == fds),
                "{fds:?}: {e:?}"
            );
        }
        assert_eq!(
            parse(Some("4242"), Some("three"), None, ME)
                .unwrap_err()
                .to_string(),
            "LISTEN_FDS=\"three\" is not a descriptor count"
        );
        for fds in ["16193", "4294967295"] {
            let e = parse(Some("4242"), Some(fds), None, ME).unwrap_err();
            assert!(
                matches!(e, InheritError::TooMany { max: 16_192, .. }),
                "{fds}: {e:?}"
            );
        }
        assert_eq!(
            parse(Some("4242"), Some("16193"), None, ME)
                .unwrap_err()
                .to_string(),
            "LISTEN_FDS=16193 is more than the 16192 descriptors accepted"
        );
    }

    #[test]
    fn parse_zero() {
        assert!(ok(Some("4242"), Some("0"), None).is_empty());
        assert!(ok(Some("4242"), Some("0"), Some("")).is_empty());
        assert!(ok(Some("4242"), Some("000"), None).is_empty());
        assert!(matches!(
            parse(Some("4242"), Some("0"), Some("http"), ME),
            Err(InheritError::NameCountMismatch {
                names: 1,
                count: 0,
                ..
            })
        ));
    }

    /// `fd` with `FD_CLOEXEC` cleared and `O_NONBLOCK` set, the state a launcher may leave it in.
    fn as_launched(fd: impl Into<OwnedFd>) -> OwnedFd {
        let fd = fd.into();
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty()).unwrap();
        let fl = rustix::fs::fcntl_getfl(&fd).unwrap();
        rustix::fs::fcntl_setfl(&fd, fl | rustix::fs::OFlags::NONBLOCK).unwrap();
        fd
    }

    fn is_nonblocking(fd: impl AsFd) -> bool {
        rustix::fs::fcntl_getfl(fd)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK)
    }

    #[test]
    fn takers_by_name_and_kind() {
        let dir = TempDir::new("inherit-takers");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let us = UnixListener::bind(dir.path().join("s")).unwrap();
        let ud = UnixDatagram::bind(dir.path().join("d")).unwrap();
        let mut inh = InheritedListeners::from_owned([
            ("http".to_string(), as_launched(tcp)),
            ("dns".to_string(), as_launched(udp)),
            ("admin".to_string(), as_launched(us)),
            ("log".to_string(), as_launched(ud)),
        ])
        .unwrap();
        assert_eq!(inh.names(), ["http", "dns", "admin", "log"]);
        assert_eq!(
            inh.infos()[1],
            ListenerInfo {
                name: "dns".into(),
                kind: ListenerKind::Udp
            }
        );

        // Wrong kind or unknown name: None, and the entry stays.
        assert!(inh.take::<TcpListener>("dns").is_none());
        assert!(inh.take::<UdpSocket>("http").is_none());
        assert!(inh.take::<UnixListener>("log").is_none());
        assert!(inh.take::<UnixDatagram>("admin").is_none());
        assert!(inh.take::<TcpListener>("nope").is_none());
        assert_eq!(inh.names(), ["http", "dns", "admin", "log"]);

        let http: TcpListener = inh.take("http").unwrap();
        assert_eq!(http.local_addr().unwrap(), tcp_addr);
        assert!(is_cloexec(&http) && !is_nonblocking(&http));
        assert!(inh.take::<TcpListener>("http").is_none());
        let dns = inh.take::<UdpSocket>("dns").unwrap();
        assert_eq!(dns.local_addr().unwrap(), udp_addr);
        assert!(is_cloexec(&dns) && !is_nonblocking(&dns));
        assert_eq!(inh.names(), ["admin", "log"]);

        // Blocking: this accept waits for the connection rather than failing with EAGAIN.
        let mut c = TcpStream::connect(tcp_addr).unwrap();
        let (mut s, _) = http.accept().unwrap();
        s.write_all(b"ok").unwrap();
        let mut buf = [0; 2];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");

        let parts = inh.into_parts();
        let kinds: Vec<_> = parts
            .iter()
            .map(|(n, k, fd)| (n.as_str(), *k, is_cloexec(fd)))
            .collect();
        assert_eq!(
            kinds,
            [
                ("admin", ListenerKind::UnixStream, true),
                ("log", ListenerKind::UnixDatagram, true)
            ]
        );
        assert!(InheritedListeners::empty().is_empty());
    }

    #[test]
    fn non_listeners_are_refused_by_number_and_name() {
        let dir = TempDir::new("inherit-bad");
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let raw = file.as_raw_fd();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = InheritedListeners::from_owned([
            ("http".to_string(), OwnedFd::from(tcp)),
            ("db".to_string(), OwnedFd::from(file)),
        ])
        .unwrap_err();
        assert!(
            matches!(&e, InheritError::NotAListener { fd, name, source: SockCheckError::NotASocket } if *fd == raw && name == "db"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "inherited descriptor {raw} (\"db\") is not a listener: descriptor is not a socket"
            )
        );
        let (a, _b) = UnixStream::pair().unwrap();
        let e = InheritedListeners::from_owned([("a".to_string(), OwnedFd::from(a))]).unwrap_err();
        assert!(
            matches!(
                e,
                InheritError::NotAListener {
                    source: SockCheckError::NotListening { .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    const CHILD_ENV: &str = "HANDOFF_INHERIT_CHILD";
    const CHILD_TEST: &str = "inherit::tests::child_side";

    /// The child half of [`inherited_by_a_real_child`]: the test binary re-executed with
    /// [`CHILD_ENV`] set, the three listeners at fds 3, 4, 5 and the `LISTEN_*` variables set
    /// for it. In a normal test run [`CHILD_ENV`] is unset and this test returns at once: it
    /// has nothing to inherit, and it must not be marked ignored because the parent
    /// runs it by exact name.
    ///
    /// The child takes them with [`InheritedListeners::from_env`], the way a daemon does.
    #[test]
    fn child_side() {
        if std::env::var(CHILD_ENV).as_deref() != Ok("1") {
            return;
        }
        let var = |k: &str| std::env::var(k).ok();
        let mut inh = InheritedListeners::from_env().unwrap();
        assert_eq!(inh.names(), ["http", "dns", "admin"]);
        // Taken once per process: a second call finds nothing.
        assert!(InheritedListeners::from_env().unwrap().is_empty());
        assert!(inh.take::<UdpSocket>("http").is_none());
        let http: TcpListener = inh.take("http").unwrap();
        let dns = inh.take::<UdpSocket>("dns").unwrap();
        let admin = inh.take::<UnixListener>("admin").unwrap();
        assert!(inh.is_empty());
        assert_eq!(
            http.local_addr().unwrap().to_string(),
            var("HANDOFF_INHERIT_TCP").unwrap()
        );
        assert_eq!(
            dns.local_addr().unwrap().to_string(),
            var("HANDOFF_INHERIT_UDP").unwrap()
        );
        assert_eq!(
            admin
                .local_addr()
                .unwrap()
                .as_pathname()
                .unwrap()
                .to_str()
                .unwrap(),
            var("HANDOFF_INHERIT_UNIX").unwrap()
        );
        assert!(is_cloexec(&http) && is_cloexec(&dns) && is_cloexec(&admin));
        let (mut conn, _) = http.accept().unwrap();
        conn.write_all(format!("ok {}", std::process::id()).as_bytes())
            .unwrap();
    }

    /// A real child inherits a TCP listener, a UDP socket and a Unix listener at fds 3, 4, 5
    /// with `LISTEN_FDS=3`, `LISTEN_FDNAMES=http:dns:admin` and `LISTEN_PID` its own pid, and
    /// serves the connection this process makes.
    ///
    /// No `unsafe` is needed to place the fds: they are handed to `/bin/sh` as its stdin,
    /// stdout and stderr (std dup2s them in the child, which clears `FD_CLOEXEC` there), and
    /// the shell moves them to 3, 4, 5 before it execs the test binary. The parent's copies
    /// stay close-on-exec all along, so tests spawning children in parallel never inherit them
    /// and no lock is needed.
    #[test]
    fn inherited_by_a_real_child() {
        let dir = TempDir::new("inherit-child");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix_path = dir.path().join("admin.sock");
        let unix = UnixListener::bind(&unix_path).unwrap();
        let log = dir.path().join("child.log");

        let script = "exec 3<&0 4<&1 5<&2 0</dev/null 1>>\"$HANDOFF_INHERIT_LOG\" 2>&1; \
                      LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"";
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, "1")
            .env("LISTEN_FDS", "3")
            .env("LISTEN_FDNAMES", "http:dns:admin")
            .env_remove("LISTEN_PID")
            .env("HANDOFF_INHERIT_LOG", &log)
            .env("HANDOFF_INHERIT_TCP", tcp_addr.to_string())
            .env("HANDOFF_INHERIT_UDP", udp.local_addr().unwrap().to_string())
            .env("HANDOFF_INHERIT_UNIX", &unix_path)
            .stdin(Stdio::from(OwnedFd::from(tcp)))
            .stdout(Stdio::from(OwnedFd::from(udp)))
            .stderr(Stdio::from(OwnedFd::from(unix)));
        let mut child = cmd.spawn().unwrap();
        // Close this process's copies: only the child can accept now.
        drop(cmd);
        let child_log = || std::fs::read_to_string(&log).unwrap_or_default();

        // The listener listened before the spawn: the connection is queued at once and
        // served when the child accepts.
        let mut c = TcpStream::connect(tcp_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reply = String::new();
        if let Err(e) = c.read_to_string(&mut reply) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "no reply from the child: {e}\n--- child output ---\n{}",
                child_log()
            );
        }
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "child: {status}\n--- child output ---\n{}",
            child_log()
        );
        // `exec` keeps the pid: the reply comes from the process the shell became.
        assert_eq!(reply, format!("ok {}", child.id()), "{}", child_log());
    }

    const NOT_A_SOCKET_TEST: &str = "inherit::tests::child_side_not_a_socket";

    /// The child half of [`a_wrong_listen_fds_takes_nothing`]: fd 3 is a regular file the
    /// program opened itself, and `LISTEN_FDS` claims it. Returns at once in a normal run.
    #[test]
    fn child_side_not_a_socket() {
        if std::env::var(CHILD_ENV).as_deref() != Ok("2") {
            return;
        }
        let err = InheritedListeners::from_env().unwrap_err();
        assert!(
            matches!(&err, InheritError::NotASocket { fd: 3, name, .. } if name == "http"),
            "{err}"
        );
        // Refused before anything was owned: the program's file is still open.
        let target = std::fs::read_link("/proc/self/fd/3").unwrap();
        assert_eq!(
            target.to_string_lossy(),
            std::env::var("HANDOFF_INHERIT_FILE").unwrap()
        );
        println!("refused: {err}");
    }

    #[test]
    fn a_wrong_listen_fds_takes_nothing() {
        let dir = TempDir::new("inherit-not-a-socket");
        let file = dir.path().join("data.txt");
        std::fs::write(&file, b"not a socket").unwrap();
        let log = dir.path().join("child.log");
        let script = "exec 3<&0 0</dev/null 1>>\"$HANDOFF_INHERIT_LOG\" 2>&1; \
                      LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"";
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                NOT_A_SOCKET_TEST,
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, "2")
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .env_remove("LISTEN_PID")
            .env("HANDOFF_INHERIT_LOG", &log)
            .env("HANDOFF_INHERIT_FILE", &file)
            .stdin(Stdio::from(std::fs::File::open(&file).unwrap()))
            .status()
            .unwrap();
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            status.success(),
            "child: {status}\n--- child output ---\n{out}"
        );
        assert!(
            out.contains("refused: LISTEN_FDS names descriptor 3"),
            "{out}"
        );
    }

    const LEAK_TEST: &str = "inherit::tests::child_side_nothing_leaks";

    /// The child half of [`a_failed_check_leaves_nothing_inheritable`]: `LISTEN_FDS=3` names a
    /// TCP listener at 3, a bad descriptor at 4 (a regular file with [`CHILD_ENV`]` = file`, a
    /// connected stream socket with `stream`) and a Unix listener at 5, all inheritable as a
    /// launcher leaves them. Returns at once in a normal run.
    #[test]
    fn child_side_nothing_leaks() {
        let case = std::env::var(CHILD_ENV).unwrap_or_default();
        if case != "file" && case != "stream" {
            return;
        }
        let err = InheritedListeners::from_env().unwrap_err();
        match (case.as_str(), &err) {
            ("file", InheritError::NotASocket { fd: 4, .. }) => {}
            ("stream", InheritError::NotAListener { fd: 4, .. }) => {}
            _ => panic!("{case}: {err:?}"),
        }
        // None of the three is inheritable now: each is closed or close-on-exec.
        for fd in 3..=5 {
            if let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) {
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                    .unwrap();
                assert!(
                    flags & 0o2000000 != 0,
                    "{case}: fd {fd} is inheritable: {err}"
                );
            }
        }
        // A regular file is not this code's to close.
        if case == "file" {
            let target = std::fs::read_link("/proc/self/fd/4").unwrap();
            assert_eq!(
                target.to_string_lossy(),
                std::env::var("HANDOFF_INHERIT_FILE").unwrap()
            );
        }
        // And a child of this process sees none of them.
        let out = Command::new("/bin/sh")
            .args(["-c", "ls /proc/$$/fd"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let fds: Vec<&str> = listing.split_whitespace().collect();
        for fd in ["3", "4", "5"] {
            assert!(
                !fds.contains(&fd),
                "{case}: fd {fd} leaked: {fds:?} ({err})"
            );
        }
        println!("nothing leaked: {err}");
    }

    /// When one of the descriptors `LISTEN_FDS` names fails its check, `from_env` returns the
    /// error and leaves none of the others inheritable: the sockets are closed, the non-socket
    /// (not this code's to close) is made close-on-exec, so no child the daemon starts
    /// inherits a listener by accident.
    #[test]
    fn a_failed_check_leaves_nothing_inheritable() {
        use crate::sys::spawn::{spawn_with_listeners, Command as Spawn};
        let dir = TempDir::new("inherit-leak");
        let file = dir.path().join("data.txt");
        std::fs::write(&file, b"not a socket").unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let unix = UnixListener::bind(dir.path().join("admin.sock")).unwrap();
        let (stream, _peer) = UnixStream::pair().unwrap();
        let opened = std::fs::File::open(&file).unwrap();
        for (case, bad) in [("file", opened.as_fd()), ("stream", stream.as_fd())] {
            let log = dir.path().join(format!("{case}.log"));
            // Through a shell for the output file; `exec` keeps the descriptors and the pid
            // (`LISTEN_PID`).
            let cmd = Spawn::new("/bin/sh")
                .args(["-c", "exec \"$0\" \"$@\" >>\"$HANDOFF_INHERIT_LOG\" 2>&1"])
                .arg(std::env::current_exe().unwrap())
                .args(["--exact", LEAK_TEST, "--nocapture", "--test-threads", "1"])
                .env(CHILD_ENV, case)
                .env("HANDOFF_INHERIT_LOG", &log)
                .env("HANDOFF_INHERIT_FILE", &file)
                .inherit_stdio(false);
            let listeners = [("http", tcp.as_fd()), ("bad", bad), ("admin", unix.as_fd())];
            let child = spawn_with_listeners(&cmd, &listeners).unwrap();
            let out = crate::sys::testutil::finish(child, &log, case);
            assert!(out.contains("nothing leaked: "), "{case}: {out}");
        }
    }
}
