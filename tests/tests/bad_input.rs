//! Bad input on the protocol's channels: each gets a clear error and loses nothing.
//!
//! `rogue` (`tests/src/bin/rogue.rs`) plays the misbehaving peer for real, over the real
//! sockets: as a would-be supervisor on an incumbent's control socket, and as a successor
//! spawned by the supervisor. After every case the incumbent still serves, under the same pid,
//! with every acknowledged write, holding the lock; and a good handoff still commits.
//!
//! A daemon started by a supervisor hears only the holder of the supervisor lock (a rogue
//! that does not hold it is dropped unheard: `security.rs`). So that the bad frames reach
//! the incumbent's machine, the rogue here takes that lock while no supervisor runs, as a
//! buggy supervisor would hold it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff::supervisor::Supervisor;
use handoff::supervisor::Verdict;
use handoff::{AbortReason, ListenerKind};
use handoff_engine::sys::lock::holds_lock;
use handoff_tests::probe::Reaper;
use handoff_tests::{test_timing, Client, Cluster, Driver, Sup, BOUND};

const ROGUE: &str = env!("CARGO_BIN_EXE_rogue");

/// The supervisor lock of a cluster's supervisor, `<control socket>.journal.lock`.
fn supervisor_lock(c: &Cluster) -> PathBuf {
    let mut p = c.sock.clone().into_os_string();
    p.push(".journal.lock");
    PathBuf::from(p)
}

/// Run `rogue <sock> <mode>` as ourselves, holding the supervisor lock `lock`; the last line
/// it printed. Bounded: the rogue gives up reading after 10 s.
fn rogue(sock: &Path, mode: &str, lock: &Path) -> String {
    let out = Command::new(ROGUE)
        .arg(sock)
        .arg(mode)
        .env("ROGUE_HOLD_LOCK", lock)
        // This process released the lock just now; a child another test thread is forking
        // may hold it until its exec.
        .env("ROGUE_LOCK_WAIT_MS", "5000")
        .output()
        .expect("run rogue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rogue {mode}: {}: {stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().unwrap_or("").to_string()
}

/// The incumbent `pid` serves, answers with every write made so far, accepts a new one and
/// holds the lock.
fn still_serving(c: &Cluster, pid: u32, writes: &mut u64, what: &str) {
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(
        cl.ping().expect("ping"),
        pid,
        "{what}: another process serves"
    );
    for i in 0..*writes {
        assert_eq!(
            cl.call(&format!("GET k{i}")).expect("get"),
            format!("VAL v{i}"),
            "{what}: acknowledged write k{i} lost"
        );
    }
    let answer = cl.call(&format!("SET k{writes} v{writes}")).expect("set");
    assert!(answer.starts_with("OK "), "{what}: {answer}");
    *writes += 1;
    assert!(
        holds_lock(pid, &c.lock_file()).expect("/proc/locks"),
        "{what}: {pid} does not hold the lock"
    );
}

/// A peer the incumbent admits (it holds the supervisor lock) sends bytes that are not the
/// protocol: the incumbent answers `Refused` with the reason (or just closes, for a frame cut
/// short) and goes on serving; nothing drains.
fn incumbent_refuses_bad_frames_and_keeps_serving(driver: Driver) {
    let mut c = Cluster::tcp(driver, "bad-sup");
    let pid = c.sup.resume_from_journal().expect("cold start").serving;
    let mut writes = 0;
    still_serving(&c, pid, &mut writes, "start");
    // No supervisor runs while the rogue holds its lock.
    c.sup = Sup::Unset;
    let lock = supervisor_lock(&c);
    let cases: [(&str, &str); 5] = [
        ("garbage", "answered"),
        ("oversize", "answered"),
        ("truncated", "eof"),
        ("wrong-version", "answered"),
        ("out-of-phase", "answered"),
    ];
    for (mode, want) in cases {
        let got = rogue(&c.sock, mode, &lock);
        eprintln!("incumbent, {mode}: {got}");
        assert!(got.starts_with(want), "{mode}: {got}");
        still_serving(&c, pid, &mut writes, mode);
    }
    // A supervisor again: it adopts the daemon and hands off.
    let c = c.with_cold_start_env(&[]);
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
}

/// A peer that connects to the control socket and sends nothing holds up neither the daemon
/// nor a handoff; the retiring incumbent closes it. The peer is admitted: a connection of the
/// supervisor's own process (the test's), left silent.
fn silent_peer_on_the_control_socket_blocks_nothing(driver: Driver) {
    let c = Cluster::tcp(driver, "silent");
    let pid = c.sup.resume_from_journal().expect("cold start").serving;
    let mut writes = 0;
    let mut silent = UnixStream::connect(&c.sock).expect("connect");
    silent.set_read_timeout(Some(BOUND)).expect("timeout");
    still_serving(&c, pid, &mut writes, "silent peer connected");
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
    let new = o.serving.expect("serving");
    let Verdict::Committed { successor } = o.verdict else {
        panic!("{:?}", o.verdict)
    };
    assert_eq!(successor, new);
    // The old incumbent retired: its end of the silent connection is closed (bounded).
    let mut rest = Vec::new();
    let n = silent
        .read_to_end(&mut rest)
        .expect("the silent peer was not let go");
    assert_eq!(n, 0, "the silent peer was answered: {rest:?}");
    still_serving(&c, new, &mut writes, "after the handoff");
    if let Some(mut child) = o.child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A successor that breaks the protocol in `mode`: the handoff rolls back with a reason that
/// says what happened, and the incumbent serves on with everything.
fn successor_misbehaviour_rolls_back(driver: Driver) {
    let c = Cluster::tcp(driver, "bad-succ");
    let pid = c.sup.resume_from_journal().expect("cold start").serving;
    let mut writes = 0;
    still_serving(&c, pid, &mut writes, "start");
    let cases: [(&str, &str); 8] = [
        ("fds", ""),
        ("garbage", "bad frame"),
        ("oversize", "exceeds"),
        ("truncated", ""),
        ("wrong-version", "version"),
        ("lie-pid", "pid"),
        ("out-of-phase", "Ready is not allowed"),
        ("duplicate-ready", "Ready is not allowed"),
    ];
    for (mode, want) in cases {
        let mut spec = c.spec(&[("ROGUE_MODE", mode)]);
        spec.binary = ROGUE.into();
        let o = c.sup.perform_handoff(spec).expect("handoff call");
        eprintln!(
            "successor, {mode}: {:?} in {:?}",
            o.abort_reason, o.times.total
        );
        assert!(!o.committed, "{mode}: committed");
        assert_eq!(o.serving, Some(pid), "{mode}");
        let reason = o.abort_reason.clone().expect("a reason");
        match (&reason, mode) {
            (AbortReason::SuccessorDisconnected | AbortReason::SuccessorExited, "truncated") => {}
            // Descriptors on a channel where the supervisor expects none: cut off at once
            // (not at the deadline).
            (AbortReason::SuccessorDisconnected, "fds") => assert!(
                o.times.total < c.spec(&[]).deadline,
                "fds: rolled back only after {:?}",
                o.times.total
            ),
            (AbortReason::ProtocolViolation(m), _) if !want.is_empty() => {
                assert!(m.contains(want), "{mode}: {m}")
            }
            _ => panic!("{mode}: {reason:?}"),
        }
        assert!(
            matches!(o.verdict, Verdict::RolledBack { incumbent, .. } if incumbent == pid),
            "{mode}: {:?}",
            o.verdict
        );
        still_serving(&c, pid, &mut writes, mode);
    }
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
    if let Some(mut child) = o.child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A supervisor restarted with a configuration that names a listener the daemon does not have
/// (it was renamed): recovery asks the daemon for its listeners, finds one it does not know,
/// and fails with an error naming it; the daemon serves on. With the right name it recovers.
fn unknown_listener_name_at_recovery(driver: Driver) {
    let mut c = Cluster::tcp(driver, "unknown-name");
    let reaper = Reaper::new();
    let pid = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let mut writes = 0;
    still_serving(&c, pid, &mut writes, "start");
    // The first supervisor is gone (one supervisor per journal).
    c.sup = Sup::Unset;
    let restarted = |name: &str| {
        Supervisor::new(&c.sock)
            .expect("supervisor")
            .with_timing(test_timing())
            .expect_listener(name, ListenerKind::Tcp)
    };
    let err = restarted("web")
        .resume_from_journal()
        .expect_err("a listener the daemon does not have")
        .to_string();
    eprintln!("renamed listener: {err}");
    assert!(
        err.contains("\"http\"") && err.contains("not configured"),
        "{err}"
    );
    still_serving(&c, pid, &mut writes, "renamed listener");
    let sup = restarted("http");
    assert_eq!(sup.resume_from_journal().expect("recover").serving, pid);
    still_serving(&c, pid, &mut writes, "recovered");
}

handoff_tests::on_both_drivers!(
    incumbent_refuses_bad_frames_and_keeps_serving,
    silent_peer_on_the_control_socket_blocks_nothing,
    successor_misbehaviour_rolls_back,
    unknown_listener_name_at_recovery,
);
