//! `kvd` (handoff-demo's stateful daemon) under real load through the reference supervisor:
//! [`WRITERS`] threads write unique keys without pause, half of them on long-lived connections
//! and half on a new connection per request, while
//!
//! - `a_handoff_under_socket_activation`: `handoff-supervisor` is started the way systemd
//!   starts a socket-activated service (the test binds the TCP listener and passes it as fd 3
//!   with `LISTEN_FDS=1`, `LISTEN_FDNAMES=kv`, `LISTEN_PID`), takes that listener rather than
//!   binding the configured address, and is made to hand off three times with `handoffctl`
//!   (committed) and once to a broken build (rolled back);
//! - `supervisor_sigkilled_and_restarted_under_load`: the supervisor, which bound the listener
//!   itself, is SIGKILLed while idle, and in the middle of a handoff (as soon as it has
//!   started, once the successor holds the data directory, once the successor has marked the
//!   commit), and restarted each time: it adopts the serving daemon, takes the listener back
//!   from it, and a following handoff commits. While no supervisor runs the load must go on.
//!
//! Afterwards no connection was refused or reset and every acknowledged write reads back.
//!
//! Every wait is bounded by [`BOUND`]. Waits on the writers wait for acknowledgements (a
//! condition variable); waits on processes wait on pidfds. Status is polled with a pause of
//! [`POLL_PAUSE`] between two polls: a bounded poll, never a synchronisation by time.
//!
//! `kvd` is taken from `target/<profile>/kvd` (built first if missing).

mod common;
mod kvd_load;

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

use handoff_engine::sys::lock::{holders, lock_file_path};
use handoff_engine::sys::spawn::{wait_any, Watched};

use kvd_load::*;

#[test]
fn a_handoff_under_socket_activation() {
    let kvd = kvd();
    let mut env = Env::new("sa");
    // Copies first, before this test spawns anything (ETXTBSY).
    let v2 = env.copy_of(&kvd, "kvd-v2");
    let broken = env.copy_of(&kvd, "kvd-broken");
    // The listener systemd would hold, and a different, unbound, address in the config.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let configured = free_port();
    env.write_config(&kvd, configured);
    env.start_socket_activated(&listener);
    let sup_pid = env.sup.as_ref().unwrap().id();

    let s = env.idle();
    let mut serving = pid_of(&s);
    // It took the inherited listener: its log says so, it and the daemon hold our socket,
    // LISTEN_PID named it, and nobody listens on the configured address.
    let log = env.log();
    assert!(
        log.contains("listener \"kv\": inherited from systemd"),
        "log:\n{log}"
    );
    assert!(!log.contains("cannot bind"), "log:\n{log}");
    let ino = rustix::fs::fstat(&listener).unwrap().st_ino;
    assert!(
        socket_inodes(sup_pid).contains(&ino),
        "the supervisor does not hold the activated listener"
    );
    assert!(
        socket_inodes(serving).contains(&ino),
        "kvd does not hold the activated listener"
    );
    assert_eq!(
        fs::read_link(format!("/proc/{sup_pid}/exe")).unwrap(),
        fs::canonicalize(SUP).unwrap()
    );
    let environ = fs::read(format!("/proc/{sup_pid}/environ")).unwrap();
    let environ: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    for want in [
        format!("LISTEN_PID={sup_pid}"),
        "LISTEN_FDS=1".into(),
        "LISTEN_FDNAMES=kv".into(),
    ] {
        assert!(environ.contains(&want.as_bytes()), "{want} not in environ");
    }
    assert_eq!(listening_inode(configured), None, "port {configured} bound");
    let refused = TcpStream::connect(("127.0.0.1", configured)).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(ping(addr), (serving, "kvd".to_string()));

    let writers = Writers::start(addr);
    let rounds: [(Option<&Path>, &str, i32); 4] = [
        (Some(v2.as_path()), "kvd-v2", 0),
        (Some(broken.as_path()), "kvd-broken", 1),
        (None, "kvd", 0),
        (Some(v2.as_path()), "kvd-v2", 0),
    ];
    let mut figures = Vec::new();
    for (round, (target, build, code)) in rounds.into_iter().enumerate() {
        writers.wait_for_each(ACKS_PER_ROUND);
        let before = serving;
        writers.mark(&format!("handoff to {build}"));
        let h = env.handoff(target);
        writers.mark("handoff over");
        eprintln!(
            "socket activation, round {round} ({build}): exit {:?} in {:?}: {}; acks so far {}",
            h.code,
            h.wall,
            field(&h.status, "phases").unwrap_or("-"),
            writers.total()
        );
        assert_eq!(h.code, Some(code), "round {round}: {h:?}\n{}", env.log());
        serving = pid_of(&h.status);
        if code == 0 {
            assert!(
                h.stdout
                    .starts_with("{\"ok\":true,\"command\":\"handoff\",\"exit_code\":0,"),
                "{}",
                h.stdout
            );
            assert_eq!(field(&h.status, "last"), Some("committed"));
            assert_ne!(serving, before);
            assert_eq!(ping(addr), (serving, build.to_string()));
        } else {
            assert!(h.stdout.contains("\"committed\":false"), "{}", h.stdout);
            assert_eq!(field(&h.status, "last"), Some("rolled_back"));
            let reason = field(&h.status, "abort_reason").unwrap();
            assert!(
                reason.starts_with("Successor"),
                "abort reason {reason}: expected the successor's exit"
            );
            assert_eq!(serving, before, "the incumbent serves on");
            assert_eq!(ping(addr), (before, "kvd-v2".to_string()));
        }
        figures.push(h.total_ms());
    }
    writers.wait_for_each(ACKS_PER_ROUND);
    let written = writers.stop();
    written.report("socket activation", &figures);
    written.check(addr);

    // A graceful stop stops the daemon, and the supervisor exits 0.
    let st = env.stop().expect("the supervisor stops within its bound");
    assert!(st.success(), "{st:?}\n{}", env.log());
    assert!(!alive(serving), "kvd {serving} still runs after the stop");
    drop(listener);
}

#[test]
fn supervisor_sigkilled_and_restarted_under_load() {
    let kvd = kvd();
    let mut env = Env::new("kill");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    env.write_config(&kvd, port);
    env.start();
    let s = env.idle();
    let mut serving = pid_of(&s);
    assert!(
        env.log().contains("nobody serves: started"),
        "{}",
        env.log()
    );
    assert_eq!(ping(addr).0, serving);
    // The listening socket, which the supervisor bound: the same socket all along (read now,
    // while /proc/net/tcp is short: under load it lists thousands of TIME_WAIT sockets).
    let ino = listening_inode(port).expect("the supervisor listens");
    let sup = env.sup.as_ref().unwrap().id();
    assert!(socket_inodes(sup).contains(&ino) && socket_inodes(serving).contains(&ino));
    let writers = Writers::start(addr);
    writers.wait_for_each(ACKS_PER_ROUND);
    let mut figures = Vec::new();

    // A handoff under the first supervisor.
    writers.mark("handoff");
    let h = env.handoff(None);
    writers.mark("handoff over");
    assert_eq!(h.code, Some(0), "{h:?}\n{}", env.log());
    serving = pid_of(&h.status);
    figures.push(h.total_ms());
    writers.wait_for_each(ACKS_PER_ROUND);

    // 1. SIGKILL while idle.
    let (acks, t) = (writers.total(), Instant::now());
    writers.mark("kill (idle)");
    env.kill_supervisor();
    writers.wait_for_each(NO_SUPERVISOR_ACKS);
    eprintln!(
        "killed while idle: {} acks in {:?} without a supervisor",
        writers.total() - acks,
        t.elapsed()
    );
    writers.mark("restart");
    serving = restart_and_adopt(&mut env, &[serving], ino);
    writers.mark("adopted");
    assert_eq!(ping(addr).0, serving);
    writers.mark("handoff");
    let h = env.handoff(None);
    writers.mark("handoff over");
    assert_eq!(h.code, Some(0), "{h:?}\n{}", env.log());
    assert_ne!(pid_of(&h.status), serving);
    serving = pid_of(&h.status);
    assert_eq!(ping(addr).0, serving);
    figures.push(h.total_ms());
    writers.wait_for_each(ACKS_PER_ROUND);

    // 2. to 4. SIGKILL in the middle of a handoff, at three points.
    for point in [
        KillPoint::HandoffStarted,
        KillPoint::SuccessorHoldsLock,
        KillPoint::SuccessorCommitted,
    ] {
        let incumbent = serving;
        let (acks, t) = (writers.total(), Instant::now());
        let logged = env.log_sizes();
        writers.mark(&format!("handoff, kill {point:?}"));
        let mid = kill_mid_handoff(&mut env, point, incumbent);
        writers.mark("killed");
        // The daemons resolve the handoff on their own; the load goes on.
        writers.wait_for_each(NO_SUPERVISOR_ACKS);
        let without = (writers.total() - acks, t.elapsed());
        // What the daemons logged meanwhile (into the logs of the supervisors that started
        // them).
        let meanwhile = env.log_growth(&logged);
        let mut candidates = vec![incumbent];
        candidates.extend(mid.successor);
        writers.mark("restart");
        serving = restart_and_adopt(&mut env, &candidates, ino);
        writers.mark("adopted");
        let how = if serving == incumbent {
            "the incumbent serves on"
        } else {
            "the successor committed"
        };
        eprintln!(
            "killed {point:?} (landed: {}, handoffctl exit {:?}): {how}; {} acks in {:?} \
             without a supervisor; the daemons logged:\n{meanwhile}",
            mid.landed, mid.ctl_code, without.0, without.1
        );
        writers.mark("handoff");
        let h = env.handoff(None);
        writers.mark("handoff over");
        assert_eq!(h.code, Some(0), "{h:?}\n{}", env.log());
        assert_ne!(pid_of(&h.status), serving);
        serving = pid_of(&h.status);
        assert_eq!(ping(addr).0, serving);
        figures.push(h.total_ms());
        writers.wait_for_each(ACKS_PER_ROUND);
    }

    let written = writers.stop();
    written.report("sigkill and restart", &figures);
    written.check(addr);
    let st = env.stop().expect("the supervisor stops within its bound");
    assert!(st.success(), "{st:?}\n{}", env.log());
    assert!(!alive(serving), "kvd {serving} still runs after the stop");
}

/// Start a supervisor with the same config after the last one was killed: it finds the
/// listener's address in use, adopts the serving daemon (one of `candidates`) and takes the
/// listener (the socket of inode `listener`) back from it. The adopted pid.
fn restart_and_adopt(env: &mut Env, candidates: &[u32], listener: u64) -> u32 {
    env.start();
    let s = env.wait_status("adoption", |s| {
        s.starts_with("state=idle ")
            && field(s, "recoveries") == Some("1")
            && field(s, "serving_pid").is_some_and(|p| p != "-")
    });
    let pid = pid_of(&s);
    let log = env.log();
    assert!(
        candidates.contains(&pid),
        "adopted {pid}, expected one of {candidates:?}\n{log}"
    );
    assert!(
        log.contains("address in use; expecting it from the serving daemon"),
        "{log}"
    );
    assert!(
        log.contains(&format!("recovered: pid {pid} serves")),
        "{log}"
    );
    assert!(
        !log.contains("nobody serves: started"),
        "a daemon was started cold: {log}"
    );
    // It holds the listener again, and so does the daemon.
    let sup = env.sup.as_ref().unwrap().id();
    assert!(
        socket_inodes(sup).contains(&listener),
        "the restarted supervisor did not take the listener back"
    );
    assert!(socket_inodes(pid).contains(&listener));
    pid
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum KillPoint {
    /// As soon as `status` says `state=handoff`.
    HandoffStarted,
    /// As soon as a process other than the incumbent holds the data directory's lock (the
    /// incumbent has sealed; the successor opens the data).
    SuccessorHoldsLock,
    /// As soon as the lock record carries the successor's commit mark (the commit point).
    SuccessorCommitted,
}

#[derive(Debug)]
struct MidKill {
    /// The supervisor died before it answered `handoffctl` (else the handoff ended before
    /// the kill: too quick to catch at this point).
    landed: bool,
    /// The successor, if one was started.
    successor: Option<u32>,
    ctl_code: Option<i32>,
}

/// Trigger a handoff (a background `handoffctl`) and SIGKILL the supervisor at `point`.
fn kill_mid_handoff(env: &mut Env, point: KillPoint, incumbent: u32) -> MidKill {
    let before: u64 = field(&env.idle(), "handoffs").unwrap().parse().unwrap();
    let ctl = Command::new(CTL)
        .arg("--socket")
        .arg(env.trigger())
        .args(["--json", "handoff"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ctl_watch = Watched::open(ctl.id()).unwrap();
    let end = Instant::now() + BOUND;
    // Poll status on one connection without pause (bounded): a handoff of kvd takes
    // milliseconds.
    let mut conn = StatusConn::connect(&env.trigger());
    loop {
        let s = conn.query();
        if s.starts_with("state=handoff ") {
            break;
        }
        let n: u64 = field(&s, "handoffs").unwrap().parse().unwrap();
        if n > before {
            break; // Already over.
        }
        assert!(Instant::now() < end, "no handoff started: {s}");
    }
    // Then watch the data directory's lock (bounded, without pause), unless it is over.
    let lock = lock_file_path(&env.data());
    let reached = || match point {
        KillPoint::HandoffStarted => true,
        KillPoint::SuccessorHoldsLock => holders(&lock)
            .unwrap_or_default()
            .into_iter()
            .any(|p| p != incumbent),
        KillPoint::SuccessorCommitted => {
            let record = fs::read_to_string(&lock).unwrap_or_default();
            let owner = record
                .split_whitespace()
                .find_map(|w| w.strip_prefix("owner="));
            let mark = record
                .split_whitespace()
                .find_map(|w| w.strip_prefix("committed="));
            owner.is_some_and(|o| o != incumbent.to_string()) && mark.is_some_and(|m| m != "-")
        }
    };
    while !reached() && !ctl_watch.has_exited().unwrap() {
        assert!(Instant::now() < end, "the handoff never reached {point:?}");
        thread::yield_now();
    }
    env.kill_supervisor();
    let successor = env
        .log()
        .lines()
        .filter_map(|l| l.split_once(": successor pid ")?.1.strip_suffix(" started"))
        .next_back()
        .map(|p| p.parse::<u32>().unwrap());
    if let Some(p) = successor {
        env.track(p);
    }
    assert!(
        !wait_any(&[&ctl_watch], BOUND).unwrap().is_empty(),
        "handoffctl did not exit"
    );
    let out = ctl.wait_with_output().unwrap();
    let ctl_code = out.status.code();
    // 3: the connection closed without an answer; 0: committed before the kill.
    assert!(
        matches!(ctl_code, Some(0 | 3)),
        "handoffctl: {out:?}\n{}",
        env.log()
    );
    MidKill {
        landed: ctl_code == Some(3),
        successor,
        ctl_code,
    }
}
