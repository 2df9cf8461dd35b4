//! End-to-end tests of `handoff-supervisor` and `handoffctl`, with the tests crate's
//! `testd` as the daemon (built first if missing). Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    alive, copy_executable, exit_within, exited_within, field, root, signal, testd, Env, CTL, SUP,
};

/// `PING` over the daemon's Unix listener: the pid that answers.
fn ping(env: &Env) -> u32 {
    let mut s = UnixStream::connect(env.dir.join("kv.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PING\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.trim()
        .strip_prefix("PONG ")
        .and_then(|p| p.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {line:?}"))
}

/// A raw client: send `text`, read until `done` says the answer is complete (bounded).
fn raw(path: &Path, text: &[u8], done: impl Fn(&str) -> bool) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(text).unwrap();
    if !text.ends_with(b"\n") {
        // An unterminated last line: end the stream so it counts.
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&String::from_utf8_lossy(&got)) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8(got).unwrap()
}

const KEYS: [&str; 12] = [
    "state",
    "serving_pid",
    "binary",
    "current",
    "last",
    "handoff_id",
    "abort_reason",
    "phases",
    "handoffs",
    "recoveries",
    "error",
    "build",
];

#[test]
fn handoff_through_handoffctl_commits() {
    let mut env = Env::new("t", "", None);
    env.start();
    let s = env.idle();
    let first: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    assert_eq!(ping(&env), first);
    // The status line: these keys, in this order.
    let keys: Vec<&str> = s.split(' ').map(|w| w.split_once('=').unwrap().0).collect();
    assert_eq!(keys, KEYS, "{s}");
    assert_eq!(field(&s, "last"), Some("none"));
    assert_eq!(field(&s, "binary"), Some(testd().to_str().unwrap()));
    // The build id from the daemon's handshake: testd started cold has the library's default
    // (`<file name> <version>`); as a successor it says `testd <pid>`, and keeps it once it
    // serves.
    assert_eq!(
        field(&s, "build"),
        Some(format!("testd%20{}", env!("CARGO_PKG_VERSION")).as_str()),
        "{s}"
    );

    let out = env.ctl(&["handoff"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", env.log());
    assert!(
        stdout.starts_with("ok: handoff_id=")
            && stdout.ends_with(" committed=true abort_reason=None\n"),
        "{stdout}"
    );
    let id = field(&stdout["ok: ".len()..], "handoff_id")
        .unwrap()
        .to_string();

    let s = env.idle();
    let second: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    assert_ne!(first, second);
    assert_eq!(ping(&env), second);
    assert_eq!(
        field(&s, "build"),
        Some(format!("testd%20{second}").as_str())
    );
    assert_eq!(field(&s, "last"), Some("committed"));
    assert_eq!(field(&s, "handoff_id"), Some(id.as_str()));
    assert_eq!(field(&s, "handoffs"), Some("1"));
    let phases = field(&s, "phases").unwrap();
    for p in [
        "spawn_to_hello:",
        ",drain:",
        ",seal:",
        ",commit:",
        ",total:",
    ] {
        assert!(phases.contains(p), "{phases}");
    }
    assert!(phases.ends_with("ms"), "{phases}");

    // --json
    let out = env.ctl(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(0));
    let j = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        j.starts_with("{\"ok\":true,\"command\":\"status\",\"status\":{\"state\":\"idle\",")
            && j.contains(&format!("\"serving_pid\":{second},")),
        "{j}"
    );

    // metrics: Prometheus text, ending with an empty line.
    let m = raw(&env.trigger(), b"metrics\n", |t| t.ends_with("\n\n"));
    for want in [
        "# TYPE handoff_handoffs_total counter\nhandoff_handoffs_total 1\n",
        "handoff_handoffs_committed_total 1\n",
        "handoff_handoffs_rolled_back_total 0\n",
        "handoff_handoffs_failed_total 0\n",
        "handoff_phase_duration_seconds_count{phase=\"total\"} 1\n",
        "handoff_last_phase_seconds{phase=\"drain\"} ",
        &format!("handoff_serving_pid {second}\n"),
    ] {
        assert!(m.contains(want), "missing {want:?} in\n{m}");
    }
    let out = env.ctl(&["--json", "metrics"]);
    let j = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(j.contains("\"handoff_handoffs_total\":1"), "{j}");

    // Several commands on one connection, answered in order.
    let both = raw(&env.trigger(), b"status\nstatus\nbogus\n", |t| {
        t.lines().count() >= 3
    });
    let lines: Vec<&str> = both.lines().collect();
    assert!(lines[0].starts_with("state=idle ") && lines[1].starts_with("state=idle "));
    assert!(
        lines[2].starts_with("error: unknown command: bogus"),
        "{both}"
    );

    // SIGTERM: the daemon is stopped, the supervisor exits 0, the trigger socket is gone.
    let st = env.stop().expect("supervisor stops within its bound");
    assert!(st.success(), "{st:?}\n{}", env.log());
    assert!(!alive(second), "daemon {second} still runs");
    assert!(!env.trigger().exists());
}

#[test]
fn trigger_while_busy_gets_busy() {
    // The incumbent drains for 1.5 s: the handoff is in progress long enough.
    let mut env = Env::new("t", "", None);
    let cfg = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("TESTD_SOCK", "TESTD_DRAIN_MS = \"1500\", TESTD_SOCK");
    std::fs::write(&env.config, cfg).unwrap();
    env.start();
    env.idle();
    let first = Command::new(CTL)
        .arg("--socket")
        .arg(env.trigger())
        .arg("handoff")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let s = env.wait_status("state=handoff", |s| s.starts_with("state=handoff "));
    let current = field(&s, "current").unwrap().to_string();
    let out = env.ctl(&["handoff"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert_eq!(stdout, format!("busy: handoff {current} in progress\n"));
    let out = env.ctl(&["--json", "handoff"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"busy\":"));
    // status and metrics are answered at once during the handoff.
    let t = Instant::now();
    assert!(env.status().unwrap().starts_with("state=handoff "));
    assert!(t.elapsed() < Duration::from_secs(1));

    let out = first.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!("handoff_id={current} committed=true")),
        "{stdout}"
    );
    let m = raw(&env.trigger(), b"metrics\n", |t| t.ends_with("\n\n"));
    assert!(m.contains("handoff_triggers_busy_total 2\n"), "{m}");
}

#[test]
fn only_allowed_binaries() {
    let mut env = Env::new("t", "", None);
    // A second name for testd, allowed by `allowed_binaries`.
    let v2 = env.dir.join("testd-v2");
    std::os::unix::fs::symlink(testd(), &v2).unwrap();
    let cfg = std::fs::read_to_string(&env.config).unwrap().replace(
        "drain_grace_secs",
        &format!(
            "allowed_binaries = [\"{}\", \"/bin/false\"]\ndrain_grace_secs",
            v2.display()
        ),
    );
    std::fs::write(&env.config, cfg).unwrap();
    env.start();
    env.idle();
    for bad in ["/bin/true", "relative/testd", "/nonexistent/x"] {
        let out = env.ctl(&["handoff", bad]);
        assert_eq!(out.status.code(), Some(4), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            err.contains(&format!("error: binary not allowed: {bad}")),
            "{err}"
        );
    }
    let s = env.idle();
    assert_eq!(field(&s, "handoffs"), Some("0"));
    let out = env.ctl(&["handoff", v2.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // An allowed binary that exits at once: the handoff rolls back, exit code 1.
    let out = env.ctl(&["handoff", "/bin/false"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(" committed=false abort_reason=Some("),
        "{stdout}"
    );
    let s = env.idle();
    assert_eq!(field(&s, "last"), Some("rolled_back"));
}

#[test]
fn trigger_socket_is_0600_and_checks_peers() {
    let mut env = Env::new("t", "", None);
    env.start();
    env.idle();
    let mode = std::fs::metadata(env.trigger())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    if !root(
        "trigger_socket_is_0600_and_checks_peers",
        "it runs handoffctl as nobody through setpriv",
    ) {
        return;
    }
    // handoffctl where `nobody` can run it.
    let ctl = env.dir.join("handoffctl");
    copy_executable(Path::new(CTL), &ctl);
    let as_nobody = |env: &Env| {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&ctl)
            .arg("--socket")
            .arg(env.trigger())
            .arg("handoff")
            .output()
            .unwrap()
    };
    // 0600: nobody cannot even connect.
    let out = as_nobody(&env);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // Opened up: connected, then refused by SO_PEERCRED with one line.
    std::fs::set_permissions(env.trigger(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&env);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("error: not allowed"), "{err}");
    assert!(env.log().contains("trigger client refused: pid "));
    // Nothing happened, and we are still served.
    let s = env.idle();
    assert_eq!(field(&s, "handoffs"), Some("0"));
}

#[test]
fn slow_and_bad_clients_do_not_block_others() {
    let mut env = Env::new("t", "", None);
    env.start();
    env.idle();
    // A client that sent half a line and waits.
    let mut slow = UnixStream::connect(env.trigger()).unwrap();
    slow.write_all(b"sta").unwrap();
    // A silent one.
    let _silent = UnixStream::connect(env.trigger()).unwrap();
    let t = Instant::now();
    assert!(env.status().is_some());
    assert!(t.elapsed() < Duration::from_secs(2));
    // A line longer than 4 KiB: one error line, then closed.
    let long = vec![b'x'; 5000];
    let answer = raw(&env.trigger(), &long, |_| false);
    assert_eq!(answer, "error: line too long\n");
    // The slow client finishes its line and is answered.
    slow.write_all(b"tus\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = slow.read(&mut buf).unwrap();
    let got = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(got.starts_with("state=idle "), "{got:?}\n{}", env.log());
    // A last line without a newline, then end of stream: answered.
    let a = raw(&env.trigger(), b"status", |t| t.ends_with('\n'));
    assert!(a.starts_with("state=idle "), "{a}");
}

#[test]
fn crash_respawn_and_restart_adoption() {
    let mut env = Env::new("t", "", None);
    env.start();
    let s = env.idle();
    let first: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    // The daemon crashes: a new one is started.
    signal(first, "KILL");
    let s = env.wait_status("a new daemon", |s| {
        s.starts_with("state=idle ") && field(s, "serving_pid") != Some(&first.to_string())
    });
    let second: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    assert_eq!(field(&s, "recoveries"), Some("2"));
    assert_eq!(ping(&env), second);

    // The supervisor is SIGKILLed; a new one adopts the daemon (its listener is in use, so
    // it takes it back from the daemon) and hands off.
    let mut c = env.sup.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    env.start();
    let s = env.wait_status("adoption", |s| {
        s.starts_with("state=idle ") && field(s, "recoveries") == Some("1")
    });
    assert_eq!(
        field(&s, "serving_pid"),
        Some(second.to_string().as_str()),
        "{}",
        env.log()
    );
    assert!(env
        .log()
        .contains("address in use; expecting it from the serving daemon"));
    let out = env.ctl(&["handoff"]);
    assert_eq!(out.status.code(), Some(0), "{}", env.log());
    let s = env.idle();
    let third: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    assert_eq!(ping(&env), third);
    assert!(env.stop().is_some_and(|s| s.success()));
}

/// A stop ends the daemon, so the journal it leaves names nobody: the next start has no pid to
/// watch or kill (a pid that may belong to another process by then), and it starts the daemon
/// cold at once. A handoff afterwards keeps counting handoff ids from where they were.
#[test]
fn a_stop_leaves_a_journal_that_names_nobody() {
    use handoff_proto::JournalRecord;
    let mut env = Env::new("t", "", None);
    env.start();
    env.idle();
    assert_eq!(
        env.ctl(&["handoff"]).status.code(),
        Some(0),
        "{}",
        env.log()
    );
    let s = env.idle();
    let serving: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    assert!(env.stop().is_some_and(|s| s.success()), "{}", env.log());
    assert!(!alive(serving), "the daemon outlived the stop");
    let bytes = std::fs::read(env.dir.join("ctl.sock.journal")).unwrap();
    let record = handoff_proto::journal::decode(&bytes).unwrap();
    assert_eq!(
        record,
        JournalRecord::Idle {
            serving: None,
            last_handoff: handoff_proto::HandoffId(1),
        },
        "{}",
        env.log()
    );
    assert!(!env.log().contains("killed pid"), "{}", env.log());
}

#[test]
fn a_daemon_that_never_comes_up_is_retried_with_backoff() {
    let mut env = Env::new("t", "", Some(Path::new("/bin/false")));
    env.start();
    env.wait_status("recovering", |s| s.starts_with("state=recovering "));
    // Watch the first four cold starts arrive (bounded) and time the gaps between them. The
    // engine alone retries every 50 ms (three gaps: ~150 ms); the backoff (100 ms, doubling,
    // gating the engine's timer) makes them ~100, ~100, ~200 ms (~400 ms in all).
    let until = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let starts = env.log().matches("started /bin/false cold").count();
        while seen.len() < starts.min(4) {
            seen.push(Instant::now());
        }
        assert!(
            Instant::now() < until,
            "{} cold starts in 20 s:\n{}",
            seen.len(),
            env.log()
        );
        std::thread::yield_now();
    }
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps between cold starts: {gaps:?}");
    // Only the sum is checked: a start delayed by load shortens the gap after it.
    let total: Duration = gaps.iter().sum();
    assert!(
        total >= Duration::from_millis(300),
        "gaps {gaps:?}: no backoff"
    );
    let out = env.ctl(&["handoff"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "busy: recovering\n");
    assert!(env.stop().is_some_and(|s| s.success()));
}

#[test]
fn bad_config_is_reported_with_key_and_line() {
    let env = Env::new("t", "colour = \"red\"", None);
    let out = Command::new(SUP)
        .arg("--config")
        .arg(&env.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("colour") && err.contains("line 7"), "{err}");
    let out = Command::new(CTL)
        .args(["--socket", "/nonexistent/t", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = Command::new(CTL)
        .args(["--socket", "/x", "frob"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn bad_flag_values_get_one_line_and_the_usage_exit_code() {
    // Each bad --timeout: one error line naming the flag and the value, then the usage line;
    // the usage exit code (4); no panic. Nothing is connected to (the socket does not exist).
    for v in [
        "1e20",
        "18446744073709551616",
        "inf",
        "-inf",
        "NaN",
        "-1",
        "0",
        "-0",
        "1e-300",
        "0.0001",
        "abc",
        "",
        "1s",
    ] {
        let out = Command::new(CTL)
            .args(["--socket", "/nonexistent/t", "--timeout", v, "status"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(4), "--timeout {v:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "--timeout {v:?}: {err}");
        assert!(
            lines[0].starts_with(&format!("handoffctl: --timeout {v:?}: ")),
            "--timeout {v:?}: {err}"
        );
        assert!(lines[1].starts_with("usage: handoffctl "), "{err}");
    }
    let out = Command::new(CTL)
        .args(["--socket", "/nonexistent/t", "status", "--timeout"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("handoffctl: --timeout needs a value\n")
    );
    // The supervisor's flags: a missing value is named too (usage exit code 2).
    for args in [&["--config"][..], &["--config", ""], &["--check", "-c"]] {
        let out = Command::new(SUP).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("handoff-supervisor: --config needs a file\n")
                || err.starts_with("handoff-supervisor: -c needs a file\n"),
            "{args:?}: {err}"
        );
    }
    // Good values get past the arguments: the missing socket is what fails (exit 3).
    for v in ["0.001", "1", "2.5", "86400", "31536000"] {
        let out = Command::new(CTL)
            .args(["--socket", "/nonexistent/t", "--timeout", v, "status"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(3), "--timeout {v:?}: {err}");
        assert!(err.contains("cannot reach /nonexistent/t"), "{err}");
    }
}

/// Raise this process's soft `RLIMIT_NOFILE` to at least `need` (up to the hard limit).
fn raise_own_nofile(need: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current.is_some_and(|c| c < need) {
        l.current = l.maximum.map(|m| m.max(need).min(m));
        setrlimit(Resource::Nofile, l).expect("raise RLIMIT_NOFILE");
    }
}

/// A process's state letter from `/proc/<pid>/stat` (`T`: stopped).
fn proc_state(pid: u32) -> Option<char> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].chars().next())
}

/// `status` on a fresh connection, answered within `limit`, or why not.
fn status_within(path: &Path, limit: Duration) -> Result<String, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"status\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + limit;
    while !got.ends_with(b"\n") {
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&got))),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A signal to this test process (a child's exit) interrupts the read: go on
            // waiting for what is left of the limit.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && Instant::now() < until => {
                let left = until.saturating_duration_since(Instant::now());
                s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
            }
            Err(e) => return Err(format!("no answer within {limit:?}: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&got).trim_end().to_string())
}

/// SIGCONT on drop: a stopped daemon is resumed whatever the test's end.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[test]
fn a_stopped_daemon_with_a_full_accept_queue_freezes_nothing() {
    let mut env = Env::new("t", "", None);
    let cfg = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("drain_grace_secs = 5", "drain_grace_secs = 1")
        .replace("deadline_secs = 20", "deadline_secs = 5");
    std::fs::write(&env.config, cfg).unwrap();
    env.start();
    let s = env.idle();
    let daemon: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    let _resume = Resume(daemon);
    signal(daemon, "STOP");
    let end = Instant::now() + Duration::from_secs(10);
    while proc_state(daemon) != Some('T') {
        assert!(Instant::now() < end, "daemon {daemon} did not stop");
        std::thread::yield_now();
    }
    // Fill the stopped daemon's control socket's accept queue (bounded).
    let held = fill_accept_queue(&env.dir.join("ctl.sock"));
    eprintln!(
        "{} connections fill the control socket's accept queue",
        held.len()
    );

    // A handoff: it must connect to the incumbent's control socket.
    let mut h = Command::new(CTL)
        .arg("--socket")
        .arg(env.trigger())
        .args(["--timeout", "60", "handoff"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Meanwhile the supervisor answers `status` at once, every time, until the handoff ends.
    let end = Instant::now() + Duration::from_secs(30);
    let mut answered = 0;
    let mut states = Vec::new();
    while h.try_wait().unwrap().is_none() {
        let s = status_within(&env.trigger(), Duration::from_secs(3)).unwrap_or_else(|e| {
            let _ = h.kill();
            panic!(
                "status after {answered} answers: {e}; states {states:?}; log:\n{}",
                env.log()
            )
        });
        answered += 1;
        let state = s.split(' ').next().unwrap_or("").to_string();
        if states.last() != Some(&state) {
            states.push(state);
        }
        assert!(Instant::now() < end, "the handoff did not end in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = h.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "status answered {answered} times during the handoff ({states:?}); handoffctl: {stdout}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", env.log());
    assert!(
        stdout.contains(" committed=false abort_reason=Some(IncumbentUnreachable(")
            && stdout.contains("accept queue is full"),
        "{stdout}"
    );
    // After it, too: the recovery that follows meets the same full queue, and the status
    // tells what happened.
    let s = status_within(&env.trigger(), Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("status after the handoff: {e}; log:\n{}", env.log()));
    assert_eq!(field(&s, "last"), Some("rolled_back"), "{s}");
    assert!(
        field(&s, "abort_reason").is_some_and(|r| r.contains("accept%20queue%20is%20full")),
        "{s}"
    );
    // SIGTERM is handled: the supervisor stops (the stopped daemon is killed after the grace).
    let st = env.stop().expect("the supervisor stops on SIGTERM");
    assert!(st.success(), "{st:?}\n{}", env.log());
    drop(held);
}

/// Connections to the Unix socket at `path` until its accept queue is full (bounded).
fn fill_accept_queue(path: &Path) -> Vec<UnixStream> {
    raise_own_nofile(20_000);
    let mut held = Vec::new();
    loop {
        assert!(held.len() < 100_000, "the accept queue never filled");
        match handoff_engine::sys::conn::connect_nonblocking(path) {
            Ok(c) => held.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return held,
            Err(e) => panic!("connect {} (after {}): {e}", path.display(), held.len()),
        }
    }
}

#[test]
fn a_new_supervisor_is_not_hung_by_full_accept_queues() {
    let mut env = Env::new("t", "", None);
    env.start();
    let s = env.idle();
    let daemon: u32 = field(&s, "serving_pid").unwrap().parse().unwrap();
    let sup = env.sup.as_ref().unwrap().id();
    // The supervisor and its daemon stop; the trigger socket's and the daemon's listener's
    // accept queues fill up.
    let _resume = (Resume(sup), Resume(daemon));
    for p in [sup, daemon] {
        signal(p, "STOP");
        let end = Instant::now() + Duration::from_secs(10);
        while proc_state(p) != Some('T') {
            assert!(Instant::now() < end, "pid {p} did not stop");
            std::thread::yield_now();
        }
    }
    let held_trigger = fill_accept_queue(&env.trigger());
    let held_kv = fill_accept_queue(&env.dir.join("kv.sock"));
    eprintln!(
        "accept queues full: trigger socket after {}, listener after {}",
        held_trigger.len(),
        held_kv.len()
    );

    // A second supervisor on the same trigger socket: refused at once, not hung.
    let run = |config: &Path| {
        Command::new(SUP)
            .arg("--config")
            .arg(config)
            .env("HANDOFF_LOG", "on")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(config.with_extension("log")).unwrap())
            .spawn()
            .unwrap()
    };
    let mut second = run(&env.config);
    let st = exit_within(&mut second, Duration::from_secs(10));
    let log = std::fs::read_to_string(env.config.with_extension("log")).unwrap_or_default();
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(1),
        "exit {st:?}; log:\n{log}"
    );
    assert!(
        log.contains("is in use by a supervisor that does not answer: its accept queue is full"),
        "{log}"
    );

    // One with a trigger and control socket of its own but the same listener: it sees the
    // listener is held (someone listens, not accepting), comes up and answers.
    let other = env.dir.join("other.toml");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("trig.sock", "trig2.sock")
        .replace("ctl.sock", "ctl2.sock");
    std::fs::write(&other, text).unwrap();
    let mut third = run(&other);
    let trig2 = env.dir.join("trig2.sock");
    let end = Instant::now() + Duration::from_secs(10);
    let s = loop {
        if let Ok(s) = status_within(&trig2, Duration::from_secs(3)) {
            break s;
        }
        if Instant::now() >= end {
            let _ = third.kill();
            let _ = third.wait();
            panic!(
                "the third supervisor never answered; log:\n{}",
                std::fs::read_to_string(other.with_extension("log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(s.starts_with("state=recovering "), "{s}");
    let log = std::fs::read_to_string(other.with_extension("log")).unwrap_or_default();
    assert!(
        log.contains("address in use; expecting it from the serving daemon"),
        "{log}"
    );
    signal(third.id(), "TERM");
    let st = exit_within(&mut third, Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
}

#[test]
fn trickling_clients_lock_nobody_out_and_each_line_has_a_deadline() {
    use handoff_supervisor::server::{LINE_TIMEOUT, MAX_CLIENTS};
    let mut env = Env::new("t", "", None);
    env.start();
    env.idle();
    // More clients than places, each with the first byte of a line that never ends.
    let n = MAX_CLIENTS + 8;
    let mut tricklers: Vec<(UnixStream, Instant)> = (0..n)
        .map(|_| {
            let mut c = UnixStream::connect(env.trigger()).unwrap();
            c.write_all(b"s").unwrap();
            (c, Instant::now())
        })
        .collect();
    // A real client still gets its answer: one of them makes room.
    let s = status_within(&env.trigger(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("status among {n} trickling clients: {e}"));
    assert!(s.starts_with("state=idle "), "{s}");
    // They go on trickling, a byte at a time: each is closed at its line's deadline (or was
    // closed to make room), however recently its last byte came.
    for (c, _) in &tricklers {
        c.set_nonblocking(true).unwrap();
    }
    let mut endings: Vec<Option<(Duration, String)>> = vec![None; n];
    let end = Instant::now() + LINE_TIMEOUT + Duration::from_secs(10);
    while endings.iter().any(Option::is_none) {
        assert!(
            Instant::now() < end,
            "{} of {n} trickling clients still open {:?} after their first byte; log:\n{}",
            endings.iter().filter(|e| e.is_none()).count(),
            LINE_TIMEOUT + Duration::from_secs(10),
            env.log()
        );
        for (i, (c, first)) in tricklers.iter_mut().enumerate() {
            if endings[i].is_some() {
                continue;
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            let closed = loop {
                match c.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            if closed || !got.is_empty() {
                endings[i] = Some((first.elapsed(), String::from_utf8_lossy(&got).into_owned()));
            } else {
                let _ = c.write(b"t");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut evicted = 0;
    let mut timed_out = 0;
    for (after, text) in endings.into_iter().flatten() {
        if text
            == "error: too many clients: closed the connection with the oldest unfinished line\n"
        {
            evicted += 1;
        } else {
            assert_eq!(
                text,
                format!("error: line not completed within {LINE_TIMEOUT:?}\n"),
                "after {after:?}"
            );
            assert!(after >= LINE_TIMEOUT, "closed after {after:?}");
            timed_out += 1;
        }
    }
    eprintln!(
        "{n} trickling clients: {evicted} closed to make room, {timed_out} at the line deadline"
    );
    assert!(evicted >= 1 && timed_out >= 1, "{evicted} {timed_out}");
    let s = status_within(&env.trigger(), Duration::from_secs(5)).unwrap();
    assert!(s.starts_with("state=idle "), "{s}");
}

/// `handoffctl --socket <trigger> status` as `uid`:`gid` (no supplementary groups).
fn status_as(env: &Env, ctl: &Path, uid: u32, gid: u32) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(ctl)
        .arg("--socket")
        .arg(env.trigger())
        .arg("status")
        .output()
        .unwrap()
}

#[test]
fn trigger_group_and_mode_admit_another_uid_and_only_it() {
    use std::os::unix::fs::MetadataExt;
    if !root(
        "trigger_group_and_mode_admit_another_uid_and_only_it",
        "it runs handoffctl as other uids through setpriv",
    ) {
        return;
    }
    // Not configured: uid 1000 is refused at the socket (0600, ours), and listing it in
    // trigger_uids alone is refused when the configuration is read.
    let mut env = Env::new("t", "", None);
    let ctl = env.dir.join("handoffctl");
    copy_executable(Path::new(CTL), &ctl);
    env.start();
    env.idle();
    let out = status_as(&env, &ctl, 1000, 1000);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(err.contains("Permission denied"), "{err}");
    let mut listed = Env::new("t", "trigger_uids = [0, 1000]", None);
    listed.start();
    // Had it started, its drop stops it (and the daemon) gracefully.
    let st = exited_within(listed.sup.as_mut().unwrap(), Duration::from_secs(10));
    let err = listed.log();
    assert_eq!(st.and_then(|s| s.code()), Some(2), "{st:?}: {err}");
    listed.sup = None;
    assert!(
        err.contains("`trigger_uids` (line 7): uid 1000 cannot connect"),
        "{err}"
    );
    drop(env);

    // Configured: the socket is root:1000 0660; uid 1000 connects and is answered.
    let mut env = Env::new(
        "t",
        "trigger_uids = [0, 1000]\ntrigger_group = \"1000\"\ntrigger_mode = 0o660",
        None,
    );
    let ctl = env.dir.join("handoffctl");
    copy_executable(Path::new(CTL), &ctl);
    env.start();
    env.idle();
    let meta = std::fs::symlink_metadata(env.trigger()).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 1000, 0o660)
    );
    let out = status_as(&env, &ctl, 1000, 1000);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", env.log());
    assert!(stdout.starts_with("state=idle "), "{stdout}");
    // uid 1000 outside group 1000, or another uid outside it: refused at the socket.
    for (uid, gid) in [(1000, 1001), (1001, 1001)] {
        let out = status_as(&env, &ctl, uid, gid);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(3), "{uid}:{gid}: {out:?}");
        assert!(err.contains("Permission denied"), "{uid}:{gid}: {err}");
    }
    // In the group but not in trigger_uids: connected, then refused by SO_PEERCRED.
    let out = status_as(&env, &ctl, 1001, 1000);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(err.contains("error: not allowed"), "{err}");
    assert!(
        env.log().contains("trigger client refused: pid "),
        "{}",
        env.log()
    );
}
