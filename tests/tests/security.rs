//! The control socket: only its owner (and root) may reach it; a peer of another uid that
//! does reach it is dropped before it can make the incumbent do anything; and a peer of the
//! daemon's own uid is dropped too unless it holds the supervisor lock, so while a supervisor
//! lives nobody else can take the listeners, drain the incumbent or abort a handoff. A peer
//! that is admitted cannot fill the daemon's descriptor table either.
//!
//! The other uid is `nobody` (65534), through `setpriv --reuid=65534 --regid=65534
//! --clear-groups`, which also drops every capability; switching to it needs root, so that test
//! (and the descriptor flood, see there) skips with one line when not run as root, unless
//! `HANDOFF_REQUIRE_ROOT_TESTS=1`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use handoff_tests::probe::{hello, open_fds, poll_until, Reaper};
use handoff_tests::{alive, root, wait_gone, Client, Cluster, Driver, Sup, BOUND};

const ROGUE: &str = env!("CARGO_BIN_EXE_rogue");
const SETPRIV: &str = "/usr/bin/setpriv";
const NOBODY: u32 = 65534;

/// Run `rogue` against `sock`, as `nobody` or as ourselves; the last line it printed. Bounded:
/// the rogue gives up reading after 10 s.
fn rogue(sock: &Path, as_nobody: bool) -> String {
    rogue_mode(sock, as_nobody, "prepare", &[])
}

/// [`rogue`] in `mode`, with extra environment.
fn rogue_mode(sock: &Path, as_nobody: bool, mode: &str, env: &[(&str, &Path)]) -> String {
    let out = if as_nobody {
        Command::new(SETPRIV)
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(ROGUE)
            .arg(sock)
            .arg(mode)
            .envs(env.iter().copied())
            .output()
    } else {
        Command::new(ROGUE)
            .arg(sock)
            .arg(mode)
            .envs(env.iter().copied())
            .output()
    }
    .expect("run rogue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rogue failed: {}: {stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").to_string();
    eprintln!(
        "rogue {mode} as {}: {last:?} ({})",
        if as_nobody { "nobody" } else { "root" },
        stderr.trim_end()
    );
    last
}

/// The supervisor lock of a cluster's supervisor: next to its journal
/// (`<control socket>.journal`).
fn supervisor_lock(c: &Cluster) -> PathBuf {
    let mut p = c.sock.clone().into_os_string();
    p.push(".journal.lock");
    PathBuf::from(p)
}

/// A rogue's answer means the daemon dropped it unheard: closed without a byte.
fn dropped_unheard(answer: &str) -> bool {
    answer == "eof" || answer == "reset"
}

/// How many descriptors process `pid` holds.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count()
}

/// The incumbent `pid` serves and takes writes (a drained one answers "ERR read-only").
fn serves_and_writes(c: &Cluster, pid: u32, key: &str) {
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), pid, "another process answers");
    let set = cl.call(&format!("SET {key} x")).expect("set");
    assert!(
        set.starts_with("OK "),
        "the incumbent does not take writes: {set}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn control_socket_is_a_socket_of_mode_0600(driver: Driver) {
    let c = Cluster::tcp(driver, "sec-mode");
    let reaper = Reaper::new();
    reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let meta = std::fs::metadata(&c.sock).expect("control socket exists");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket: {:?}",
        c.sock.display(),
        meta.file_type()
    );
    assert_eq!(
        mode(&c.sock),
        0o600,
        "control socket mode {:o}",
        mode(&c.sock)
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        rustix::process::geteuid().as_raw(),
        "owned by the daemon's uid"
    );
    // Nothing of the staging directory the socket was bound in is left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(c.dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "left over: {leftovers:?}");
}

fn another_uid_is_refused_and_cannot_make_the_incumbent_drain(driver: Driver) {
    if !root(
        "another_uid_is_refused_and_cannot_make_the_incumbent_drain",
        "it runs the rogue as uid 65534 through setpriv",
    ) {
        return;
    }
    assert!(
        Path::new(SETPRIV).exists(),
        "{SETPRIV} is needed to run a client as another uid"
    );
    let c = Cluster::tcp(driver, "sec-uid");
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    // What the incumbent holds now. The supervisor's recovery session may close meanwhile
    // (fewer descriptors later is fine); a new one would be the refused peer kept.
    let fds_before: std::collections::BTreeSet<PathBuf> = open_fds(&old.to_string())
        .expect("fds of the incumbent")
        .into_values()
        .map(|f| f.target)
        .collect();

    // (a) The socket as the daemon made it (0600, owned by root): nobody cannot connect.
    assert_eq!(mode(&c.sock), 0o600);
    let a = rogue(&c.sock, true);
    assert!(
        a.starts_with("connect-failed") && a.contains("os error 13"),
        "nobody reached a 0600 socket: {a:?}"
    );

    // (b) Make the socket reachable by anyone: the daemon itself must refuse the peer.
    std::fs::set_permissions(&c.sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    for dir in c.dir.path().ancestors().skip(1) {
        assert!(
            mode(dir) & 0o001 != 0,
            "{} is not traversable by others",
            dir.display()
        );
    }
    let b = rogue(&c.sock, true);
    // `eof` or `reset` means the daemon accepted, checked SO_PEERCRED and closed the
    // connection (it logs "refused control connection: peer pid … has uid 65534"); it read
    // nothing, so neither the Hello nor the Prepare reached the protocol.
    assert!(
        b == "eof" || b == "reset",
        "nobody's connection was not dropped unanswered: {b:?}"
    );
    // The refused connection is not kept.
    let new_fds: Vec<PathBuf> = open_fds(&old.to_string())
        .expect("fds of the incumbent")
        .into_values()
        .map(|f| f.target)
        .filter(|t| !fds_before.contains(t))
        .collect();
    assert!(
        new_fds.is_empty(),
        "the incumbent holds new descriptors after refusing a peer: {new_fds:?}"
    );

    // The incumbent did not drain: it answers, and it takes writes (a drained one refuses
    // them with "ERR read-only").
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), old, "another process answers");
    assert_eq!(cl.call("SET rogue no").expect("set"), "OK 1");
    drop(cl);
    assert!(alive(old));

    // And a real handoff still goes through.
    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    assert_ne!(new, old);
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    let mut cl = Client::tcp(c.http()).expect("connect after");
    assert_eq!(cl.ping().expect("ping after"), new);
    assert_eq!(cl.call("GET rogue").expect("get"), "VAL no");
    drop(cl);
    // The successor bound a fresh control socket: 0600 again.
    assert_eq!(mode(&c.sock), 0o600, "the successor's control socket");

    // The same rogue as root (the daemon's own uid) is dropped unheard too, since it does
    // not hold the supervisor lock; the supervisor (this process) is answered: the test does
    // tell a refused peer from an admitted one.
    let root = rogue(&c.sock, false);
    assert!(dropped_unheard(&root), "root was not dropped: {root:?}");
    let (_session, ack) = hello(&c.sock).expect("the supervisor is answered");
    assert_eq!(ack.pid, new);

    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}

/// While a supervisor lives, a peer of the daemon's own uid gets nothing: `ReturnListeners`
/// returns no listener, `Prepare` drains nothing; both are dropped unheard. The supervisor
/// itself still gets the listeners back (a restarted one does, in `supervisor_crash.rs`).
fn same_uid_rogue_gets_no_listener_and_cannot_drain(driver: Driver) {
    let c = Cluster::tcp(driver, "sec-same");
    let reaper = Reaper::new();
    let pid = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let fds_before = fd_count(pid);

    let listeners = rogue_mode(&c.sock, false, "return-listeners", &[]);
    assert!(
        dropped_unheard(&listeners),
        "a same-uid rogue was answered on ReturnListeners: {listeners:?}"
    );
    let prepare = rogue_mode(&c.sock, false, "prepare", &[]);
    assert!(
        dropped_unheard(&prepare),
        "a same-uid rogue was answered on Prepare: {prepare:?}"
    );
    // It cannot take the supervisor's place either: the lock is held.
    let lock = supervisor_lock(&c);
    let taken = rogue_mode(
        &c.sock,
        false,
        "return-listeners",
        &[("ROGUE_HOLD_LOCK", &lock)],
    );
    assert_eq!(taken, "lock-held", "the rogue took the supervisor lock");

    // Each refused connection was closed before its rogue saw the end of stream.
    let fds_after = fd_count(pid);
    assert!(
        fds_after <= fds_before,
        "the incumbent holds more descriptors after refusing peers: {fds_after} > {fds_before}"
    );
    serves_and_writes(&c, pid, "same-uid");
    // And a real handoff still goes through.
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "not committed: {:?}", o.abort_reason);
    reaper.watch(o.serving.expect("serving"));
    assert!(wait_gone(pid), "old incumbent {pid} did not exit");
}

/// A same-uid peer that says `Hello` during a handoff would, if heard, supersede the
/// supervisor's session and abort the handoff; it is dropped unheard and the handoff commits.
fn same_uid_rogue_cannot_abort_a_running_handoff(driver: Driver) {
    // A slow drain (3 s) keeps the handoff running while the rogue speaks.
    let c = Cluster::tcp(driver, "sec-abort").with_cold_start_env(&[("TESTD_DRAIN_MS", "3000")]);
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    serves_and_writes(&c, old, "before");
    // Connected before the handoff: the draining incumbent accepts no new connection.
    let mut cl = Client::tcp(c.http()).expect("connect");
    let outcome = std::thread::scope(|s| {
        let handoff = s.spawn(|| c.sup.perform_handoff(c.spec(&[])));
        // The drain has begun once the incumbent refuses writes.
        assert!(
            poll_until(BOUND, || cl
                .call("SET during x")
                .is_ok_and(|a| a.starts_with("ERR read-only"))),
            "the incumbent never started draining"
        );
        drop(cl);
        let answer = rogue_mode(&c.sock, false, "hello", &[]);
        assert!(
            dropped_unheard(&answer),
            "a same-uid rogue was answered during a handoff: {answer:?}"
        );
        handoff.join().expect("handoff thread")
    })
    .expect("handoff");
    assert!(
        outcome.committed,
        "the rogue aborted the handoff: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    assert_ne!(new, old);
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    serves_and_writes(&c, new, "after");
}

/// A second supervisor on the same journal is refused at start, naming the lock and the
/// supervisor holding it; once the first is gone, a new one starts.
fn a_second_supervisor_on_the_same_journal_is_refused(driver: Driver) {
    let c = Cluster::tcp(driver, "sec-twice");
    let reaper = Reaper::new();
    let pid = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let second = handoff::supervisor::Supervisor::new(&c.sock).expect("supervisor");
    let err = second
        .resume_from_journal()
        .expect_err("a second supervisor on the same journal")
        .to_string();
    eprintln!("second supervisor: {err}");
    let lock = supervisor_lock(&c);
    assert!(
        err.contains("another supervisor")
            && err.contains(&std::process::id().to_string())
            && err.contains(&*lock.to_string_lossy()),
        "{err}"
    );
    serves_and_writes(&c, pid, "second");
    drop(second);
    // The first one is gone: a new one takes its place and adopts the daemon.
    let c = c.with_cold_start_env(&[]);
    assert_eq!(c.sup.resume_from_journal().expect("recover").serving, pid);
}

/// A peer the daemon admits (here: one holding the supervisor lock while no supervisor runs)
/// floods it with descriptors over many connections. The incumbent needs none: each such
/// connection is closed at once, its descriptor count stays flat, and it keeps accepting
/// clients and its supervisor.
///
/// Needs root: the flood keeps tens of thousands of descriptors in flight, more than the
/// kernel lets a user without `CAP_SYS_RESOURCE` have in flight (its `RLIMIT_NOFILE`); past
/// that the rogue's sends fail and connections go out without descriptors.
fn unsolicited_descriptors_are_refused_and_the_daemon_keeps_accepting(driver: Driver) {
    if !root(
        "unsolicited_descriptors_are_refused_and_the_daemon_keeps_accepting",
        "more descriptors in flight than RLIMIT_NOFILE lets a user have",
    ) {
        return;
    }
    let mut c = Cluster::tcp(driver, "sec-fds");
    let reaper = Reaper::new();
    let pid = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let before = fd_count(pid);
    // No supervisor runs now: its lock is free for the rogue to take.
    c.sup = Sup::Unset;
    let lock = supervisor_lock(&c);
    let mut flood = Command::new(ROGUE)
        .arg(&c.sock)
        .arg("fds")
        .env("ROGUE_HOLD_LOCK", &lock)
        // This process released the lock just now; a child another test thread is forking
        // may hold it until its exec.
        .env("ROGUE_LOCK_WAIT_MS", "5000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rogue");
    let mut out = BufReader::new(flood.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read the rogue's summary");
    let line = line.trim().to_string();
    // Measured while the rogue still holds its connections open.
    let during = fd_count(pid);
    eprintln!("flood: {line:?}; incumbent descriptors {before} before, {during} during");
    let field = |k: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    assert!(
        field("sent") >= 64 * 253,
        "the flood did not go out: {line}"
    );
    let conns = field("conns");
    assert_eq!(
        field("closed"),
        conns,
        "the incumbent kept connections that sent descriptors ({line}); its descriptors went \
         from {before} to {during}"
    );
    assert!(
        during <= before + 8,
        "the incumbent's descriptors went from {before} to {during} under the flood"
    );
    // It keeps accepting clients...
    serves_and_writes(&c, pid, "flood");
    drop(flood.stdin.take());
    assert!(flood.wait().expect("wait").success());
    // ... and its supervisor, which hands off.
    let c = c.with_cold_start_env(&[]);
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "not committed: {:?}", o.abort_reason);
    reaper.watch(o.serving.expect("serving"));
}

handoff_tests::on_both_drivers!(
    control_socket_is_a_socket_of_mode_0600,
    another_uid_is_refused_and_cannot_make_the_incumbent_drain,
    same_uid_rogue_gets_no_listener_and_cannot_drain,
    same_uid_rogue_cannot_abort_a_running_handoff,
    a_second_supervisor_on_the_same_journal_is_refused,
    unsolicited_descriptors_are_refused_and_the_daemon_keeps_accepting,
);
