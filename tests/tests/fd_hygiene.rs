//! Descriptor hygiene: a daemon holds exactly the descriptors it needs, and none of the
//! library's leak into the processes it starts.
//!
//! Every descriptor is accounted for by what it links to in `/proc/<pid>/fd`. The test
//! process itself may hold descriptors without close-on-exec that whatever started it leaked
//! (they are inherited by every child, the library documents that it leaves them alone): that
//! baseline is computed from `/proc/self/fd` and `fdinfo`, and expected everywhere, except
//! where a cold start places its listeners (`LISTEN_FDS`: 3, 4, …), which replaces them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use handoff_tests::probe::{
    control_bind_path, hello, inheritable_baseline, inode, open_fds, poll_until, thread_names,
    unix_sockets, Reaper,
};
use handoff_tests::{Client, Cluster, Driver, Listener, BOUND};

/// How many listeners [`cluster`] makes.
const LISTENERS: i32 = 2;

/// The test's inheritable descriptors as a daemon it starts holds them: all of them in a
/// successor; in a cold-started daemon, those not replaced by the listeners it was given at
/// 3, 4, … (`LISTEN_FDS`).
fn baseline(cold: bool) -> BTreeMap<i32, PathBuf> {
    let mut b = inheritable_baseline();
    if cold {
        b.retain(|fd, _| *fd >= 3 + LISTENERS);
    }
    b
}

/// A cluster with a TCP listener `http` and a UDP socket `dns`, and their inodes.
fn cluster(tag: &str) -> (Cluster, BTreeSet<u64>) {
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let inodes = BTreeSet::from([inode(&tcp), inode(&udp)]);
    let c = Cluster::with_listeners(
        Driver::Std,
        tag,
        vec![
            ("http".into(), Listener::Tcp(tcp)),
            ("dns".into(), Listener::Udp(udp)),
        ],
    );
    (c, inodes)
}

/// What a serving `testd` may hold, and how many of each.
struct Expected<'a> {
    cluster: &'a Cluster,
    /// The inodes of the listeners (the test's own descriptors for them).
    listeners: &'a BTreeSet<u64>,
    /// The test's descriptors 0, 1, 2, and its inheritable ones.
    stdio: BTreeMap<i32, PathBuf>,
    baseline: BTreeMap<i32, PathBuf>,
    /// Supervisor sessions open on the control socket (the test's own probe).
    sessions: usize,
}

/// Check every descriptor of daemon `pid` against `e`; all problems in one panic message.
fn check_daemon_fds(pid: u32, e: &Expected<'_>) {
    let fds = open_fds(&pid.to_string()).expect("fds of the daemon");
    let socks = unix_sockets();
    let control = control_bind_path(&e.cluster.sock, pid);
    let lock = e.cluster.lock_file();
    let log = e.cluster.data.join("data.log");
    let listing: Vec<String> = fds
        .values()
        .map(|f| {
            format!(
                "{} -> {}{}",
                f.fd,
                f.target.display(),
                if f.cloexec { "" } else { " (inheritable)" }
            )
        })
        .collect();
    eprintln!("daemon {pid} holds:\n  {}", listing.join("\n  "));

    let mut problems = Vec::new();
    let mut per_listener: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut locks, mut logs, mut control_listeners, mut sessions, mut unnamed) =
        (0, 0, 0, 0, Vec::new());
    // The supervisor the daemon proved is remembered by a pidfd (sys::supervisor_lock::
    // Admission): one at most.
    let mut pidfds = 0;
    for f in fds.values() {
        let inherited = e.stdio.get(&f.fd).or_else(|| e.baseline.get(&f.fd));
        if let Some(target) = inherited {
            if &f.target != target {
                problems.push(format!(
                    "fd {} is {}, the test's is {}",
                    f.fd,
                    f.target.display(),
                    target.display()
                ));
            }
            continue;
        }
        if !f.cloexec {
            problems.push(format!(
                "fd {} ({}) is not close-on-exec: every child would inherit it",
                f.fd,
                f.target.display()
            ));
        }
        let Some(ino) = f.socket_inode() else {
            if f.target == lock {
                locks += 1;
            } else if f.target == log {
                logs += 1;
            } else if f.target == std::path::Path::new("anon_inode:[pidfd]") {
                pidfds += 1;
            } else {
                problems.push(format!("unexpected fd {} -> {}", f.fd, f.target.display()));
            }
            continue;
        };
        if e.listeners.contains(&ino) {
            *per_listener.entry(ino).or_default() += 1;
            continue;
        }
        match socks.get(&ino) {
            Some(s) if s.path.as_deref() == Some(control.as_path()) => {
                if s.listening() {
                    control_listeners += 1;
                } else {
                    sessions += 1;
                }
            }
            Some(s) if s.path.is_none() => unnamed.push(f.clone()),
            other => problems.push(format!(
                "unexpected socket fd {} -> {} ({other:?})",
                f.fd,
                f.target.display()
            )),
        }
    }
    for fd in e.stdio.keys().chain(e.baseline.keys()) {
        if !fds.contains_key(fd) {
            problems.push(format!("inherited fd {fd} is missing"));
        }
    }
    // Each listener twice: the application's descriptor (testd serves on it) and the
    // library's close-on-exec duplicate, kept to hand back to a restarted supervisor.
    for ino in e.listeners {
        let n = per_listener.get(ino).copied().unwrap_or(0);
        if n != 2 {
            problems.push(format!("listener socket:[{ino}] is held {n} times, not 2"));
        }
    }
    if pidfds > 1 {
        problems.push(format!(
            "{pidfds} pidfds, not at most 1 (the remembered supervisor)"
        ));
    }
    if locks != 1 {
        problems.push(format!("{} opened {locks} times, not once", lock.display()));
    }
    if logs != 1 {
        problems.push(format!("{} opened {logs} times, not once", log.display()));
    }
    if control_listeners != 1 {
        problems.push(format!("{control_listeners} control listeners, not 1"));
    }
    if sessions != e.sessions {
        problems.push(format!(
            "{sessions} control sessions, not {} (a supervisor's connection kept?)",
            e.sessions
        ));
    }
    // Unnamed Unix sockets: only the incumbent loop's waker, a socketpair whose two ends the
    // daemon holds once each. A successor's channel to the supervisor (and its poll
    // duplicate) would be more.
    if unnamed.len() != 2 || unnamed[0].target == unnamed[1].target {
        problems.push(format!(
            "unnamed sockets {:?}, expected exactly the waker pair (2 distinct)",
            unnamed
                .iter()
                .map(|f| (f.fd, f.target.display().to_string()))
                .collect::<Vec<_>>()
        ));
    }
    assert!(
        problems.is_empty(),
        "daemon {pid}'s descriptors:\n  {}\nproblems:\n  {}",
        listing.join("\n  "),
        problems.join("\n  ")
    );
}

fn stdio_of_test() -> BTreeMap<i32, PathBuf> {
    open_fds("self")
        .expect("/proc/self/fd")
        .into_values()
        .filter(|f| f.fd <= 2)
        .map(|f| (f.fd, f.target))
        .collect()
}

#[test]
fn a_serving_daemon_holds_only_what_it_needs_before_and_after_a_handoff() {
    let (c, listeners) = cluster("fds");
    assert_eq!(listeners.len(), LISTENERS as usize);
    let e = |cold, sessions| Expected {
        cluster: &c,
        listeners: &listeners,
        stdio: stdio_of_test(),
        baseline: baseline(cold),
        sessions,
    };
    eprintln!(
        "inheritable baseline of the test: {:?}",
        inheritable_baseline()
    );

    // The cold-started daemon: it has answered the supervisor, so its loop runs.
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    check_daemon_fds(old, &e(true, 0));

    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    // The successor's incumbent loop answers: it runs, with its waker and hook thread. It
    // binds the control socket right after acknowledging the commit, and the outcome can
    // reach us first: until then the path still leads to the retiring incumbent, which
    // resets the connection (a known window, see ARCHITECTURE's limitations). Wait for the
    // successor's answer, bounded.
    let mut session = None;
    assert!(
        poll_until(BOUND, || match hello(&c.sock) {
            Ok((s, ack)) if ack.pid == new => {
                session = Some(s);
                true
            }
            _ => false,
        }),
        "the successor never answered on the control socket"
    );
    let _session = session;
    // The thread that pumped the supervisor channel owns the channel: once it has ended
    // the channel must be closed. A thread ending in another process announces nothing, so
    // this is a bounded poll of its thread list (the name is `handoff-successor`, cut to 15
    // bytes by the kernel).
    assert!(
        poll_until(BOUND, || !thread_names(new)
            .iter()
            .any(|n| n.starts_with("handoff-succ"))),
        "the successor's channel thread is still running: {:?}",
        thread_names(new)
    );
    check_daemon_fds(new, &e(false, 1));

    // And it serves.
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), new);
    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait (bounded) for `path` to appear and read it. Nothing announces a file written by a
/// grandchild, so this polls for it every few ms until [`BOUND`].
fn wait_for_file(path: &Path) -> String {
    assert!(
        poll_until(BOUND, || path.exists()),
        "{} did not appear",
        path.display()
    );
    std::fs::read_to_string(path).expect("read fd report")
}

/// The descriptor numbers a `testd` child listed (`ls /proc/$$/fd` run by `/bin/sh`).
fn reported(path: &Path) -> BTreeSet<i32> {
    wait_for_file(path)
        .lines()
        .map(|l| l.trim().parse().expect("a descriptor number"))
        .collect()
}

/// What the child `sh` may hold: 0, 1, 2, the test's inheritable baseline (inherited by
/// everything the test starts), and one more: to run `ls /proc/$$/fd > tmp`, the shell
/// itself redirects its standard output, saving the original first with
/// `fcntl(F_DUPFD, 10)` (dash does, `ls` lists the shell's table at that moment). That copy
/// lands on the lowest free number of 10 or more.
fn expected_child_fds(baseline: &BTreeMap<i32, PathBuf>) -> BTreeSet<i32> {
    let mut want: BTreeSet<i32> = [0, 1, 2]
        .into_iter()
        .chain(baseline.keys().copied())
        .collect();
    let saved = (10..).find(|n| !want.contains(n)).expect("a free number");
    want.insert(saved);
    want
}

#[test]
fn children_of_the_daemon_inherit_nothing_of_the_library() {
    let (c, _listeners) = cluster("childfds");
    let cold_out = c.dir.path().join("cold-child-fds");
    let succ_out = c.dir.path().join("successor-child-fds");
    let c = c.with_cold_start_env(&[("TESTD_CHILD_FDS_OUT", cold_out.to_str().expect("utf-8"))]);
    let (cold_baseline, baseline) = (baseline(true), baseline(false));
    let (cold_want, want) = (
        expected_child_fds(&cold_baseline),
        expected_child_fds(&baseline),
    );

    // Cold start: the listeners came in at 3 and 4 without close-on-exec (LISTEN_FDS).
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let cold = reported(&cold_out);
    eprintln!("child of the cold daemon holds {cold:?}; expected {cold_want:?}");
    assert_eq!(
        cold,
        cold_want,
        "a child of the cold-started daemon inherited {:?} (baseline {cold_baseline:?})",
        cold.difference(&cold_want).collect::<Vec<_>>()
    );

    // Successor: its channel came in at HANDOFF_CHANNEL_FD without close-on-exec, its
    // listeners over SCM_RIGHTS.
    let outcome = c
        .sup
        .perform_handoff(c.spec(&[("TESTD_CHILD_FDS_OUT", succ_out.to_str().expect("utf-8"))]))
        .expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    reaper.watch(outcome.serving.expect("serving pid"));
    let succ = reported(&succ_out);
    eprintln!("child of the successor holds {succ:?}; expected {want:?}");
    assert_eq!(
        succ,
        want,
        "a child of the successor inherited {:?} (baseline {baseline:?})",
        succ.difference(&want).collect::<Vec<_>>()
    );
    assert!(handoff_tests::wait_gone(old));
    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}
