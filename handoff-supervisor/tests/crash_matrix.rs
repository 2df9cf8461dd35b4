//! The crash matrix: for every named crash point (`handoff_engine::crash::POINTS`), the
//! reference supervisor runs `kvd` under the load of [`WRITERS`] writers, the process the point
//! belongs to is SIGKILLed there by itself (`HANDOFF_CRASH_AT`, compiled in through the
//! `crash-points` feature this package's dev-dependency turns on), and then:
//!
//! - the crash happened: the once-marker names the point and the victim's pid, the victim is
//!   gone, and its exit was SIGKILL where we can see it (the supervisor is our child; a daemon
//!   is the supervisor's child and its log says so, unless it was handed over from a killed
//!   supervisor);
//! - within [`RECOVER_BOUND`] (deadline + slack + margin) exactly one `kvd` of this test
//!   lives, the supervisor is idle and names it, it answers `PING`, and it alone holds the
//!   data directory's lock (`/proc/locks`);
//! - a further handoff commits (the system is usable again);
//! - every acknowledged write reads back, no connection was refused, and none was reset,
//!   except where the victim was serving clients when it died (a SIGKILLed server resets the
//!   connections it had, see [`kills_a_server`]).
//!
//! Points in the supervisor: the supervisor dies and the test restarts it (it adopts whoever
//! serves). Points in a daemon: the supervisor recovers on its own (rollback, or a cold start
//! after a crash of the serving daemon). The crash is armed by removing the once-marker,
//! which the test creates first: a daemon started before the handoff (or respawned after the
//! crash) runs through the point unharmed.
//!
//! `cargo test` runs [`REDUCED`]; `scripts/crash-matrix` runs them all (the ignored
//! `full_crash_matrix`) and writes the table to `target/crash-matrix.md`.

mod common;
mod kvd_load;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use handoff_engine::crash::{self, POINTS};
use handoff_engine::sys::lock::{holders, lock_file_path};
use handoff_engine::sys::spawn::{wait_any, Watched};

use kvd_load::*;

/// The handoff deadline and drain grace in the config.
const DEADLINE_SECS: u64 = 8;
const DRAIN_SECS: u64 = 3;
/// From the crash to one serving process: the deadline, the slack (5 s), and a margin for a
/// cold start and two loaded cores.
const RECOVER_BOUND: Duration = Duration::from_secs(DEADLINE_SECS + 5 + 12);
/// Acknowledgements every writer gets before the crash, after the recovery, and after the
/// further handoff.
const ACKS: u64 = 20;

/// The subset `cargo test` runs: points of every role, on the commit, rollback and restart
/// routes, at the steps where the protocol changes hands (journal, lock, commit mark).
const REDUCED: &[&str] = &[
    "supervisor.inflight_tmp_written",
    "supervisor.committing_journaled",
    "supervisor.abort_sent_incumbent",
    "incumbent.drain_started",
    "incumbent.lock_released",
    "successor.lock_taken",
    "successor.commit_marked",
    "incumbent.listeners_returned",
];

/// How the point is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// A handoff to a good build (`kvd-v2`).
    Commit,
    /// A handoff to `kvd-broken`, which fails after taking the lock: the handoff rolls back.
    Rollback,
    /// The supervisor is SIGKILLed while idle and restarted: it takes the listener back.
    Restart,
}

/// The points only a rolled-back handoff reaches.
const ROLLBACK: &[&str] = &[
    "supervisor.abort_sent_incumbent",
    "incumbent.lock_reacquired",
    "incumbent.resumed_sent",
];
/// The points only a restarted supervisor's recovery reaches.
const RESTART: &[&str] = &[
    "supervisor.listeners_taken_back",
    "incumbent.listeners_returned",
];
/// The points where the victim serves clients when it dies (not drained yet, or resumed):
/// the kernel resets those of its connections that hold unread requests.
const SERVER_VICTIMS: &[&str] = &[
    "incumbent.hello_acked",
    "incumbent.drain_started",
    "incumbent.resumed_sent",
    "incumbent.listeners_returned",
];

fn route(point: &str) -> Route {
    if ROLLBACK.contains(&point) {
        Route::Rollback
    } else if RESTART.contains(&point) {
        Route::Restart
    } else {
        Route::Commit
    }
}

fn kills_a_server(point: &str) -> bool {
    SERVER_VICTIMS.contains(&point)
}

// This test build has the crash points (the dev-dependency's feature).
const _: () = assert!(
    crash::ENABLED,
    "this test build lacks the crash-points feature"
);

#[test]
fn crash_points_are_compiled_into_the_test_binaries() {
    for bin in [Path::new(SUP), &kvd_with_crash_points()] {
        assert!(
            has_crash_points(bin),
            "{} lacks the crash points",
            bin.display()
        );
    }
}

#[test]
fn the_matrix_covers_every_point() {
    // The full matrix runs `POINTS` itself; the lists here name only real points.
    let listed: BTreeSet<&str> = POINTS.iter().copied().collect();
    assert_eq!(listed.len(), POINTS.len());
    for p in [REDUCED, ROLLBACK, RESTART, SERVER_VICTIMS].concat() {
        assert!(listed.contains(p), "{p} is not a crash point");
    }
    // The reduced matrix has every role and every route.
    for role in ["supervisor.", "incumbent.", "successor."] {
        assert!(REDUCED.iter().any(|p| p.starts_with(role)), "{role}");
    }
    for r in [Route::Commit, Route::Rollback, Route::Restart] {
        assert!(REDUCED.iter().any(|p| route(p) == r), "{r:?}");
    }
}

#[test]
fn reduced_crash_matrix() {
    run_matrix(REDUCED, None);
}

#[test]
#[ignore = "full crash matrix: run by scripts/crash-matrix"]
fn full_crash_matrix() {
    let only = std::env::var("CRASH_MATRIX_ONLY").ok();
    let points: Vec<&str> = POINTS
        .iter()
        .copied()
        .filter(|p| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|x| x == *p))
        })
        .collect();
    let out = std::env::var_os("CRASH_MATRIX_OUT").map_or_else(
        || {
            Path::new(CTL)
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("crash-matrix.md")
        },
        PathBuf::from,
    );
    run_matrix(&points, Some(&out));
}

/// Run every point, print the table (and write it to `out`), then fail if any point failed.
fn run_matrix(points: &[&str], out: Option<&Path>) {
    let kvd = kvd_with_crash_points();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for point in points {
        let started = Instant::now();
        match std::panic::catch_unwind(|| run_point(point, &kvd)) {
            Ok(row) => {
                eprintln!(
                    "crash matrix: {point}: {} in {:.1?}",
                    row.outcome,
                    started.elapsed()
                );
                rows.push(row);
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let first = msg.lines().next().unwrap_or("").to_string();
                eprintln!("crash matrix: {point}: FAILED: {msg}");
                failures.push(format!("{point}: {first}"));
                rows.push(Row::failed(point, &first));
            }
        }
    }
    let table = table(&rows);
    eprintln!("{table}");
    if let Some(out) = out {
        fs::write(out, &table).unwrap();
        eprintln!("written to {}", out.display());
    }
    assert!(
        failures.is_empty(),
        "failed points:\n{}",
        failures.join("\n")
    );
}

/// One line of the table.
struct Row {
    point: String,
    route: Route,
    outcome: String,
    serving: &'static str,
    crash: &'static str,
    recover: Option<Duration>,
    acked: usize,
    refused: u64,
    reset: u64,
}

impl Row {
    fn failed(point: &str, why: &str) -> Row {
        Row {
            point: point.to_string(),
            route: route(point),
            outcome: format!("FAILED: {}", why.replace('|', "/")),
            serving: "-",
            crash: "-",
            recover: None,
            acked: 0,
            refused: 0,
            reset: 0,
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| point | route | outcome | serving after | crash seen | recovered in | acked writes (all read back) | refused | reset |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| `{}` | {:?} | {} | {} | {} | {} | {} | {} | {} |",
            r.point,
            r.route,
            r.outcome,
            r.serving,
            r.crash,
            r.recover
                .map_or("-".into(), |d| format!("{} ms", d.as_millis())),
            r.acked,
            r.refused,
            r.reset
        );
    }
    t
}

/// `kvd`, built with the crash points if the one there lacks them.
fn kvd_with_crash_points() -> PathBuf {
    common::workspace_bin_with("handoff-demo", "kvd", &["crash-points"], has_crash_points)
}

/// Whether `binary` has the crash points compiled in: the line `crash::point` prints is in
/// it only then.
fn has_crash_points(binary: &Path) -> bool {
    let needle = b"] crash point ";
    fs::read(binary).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
}

/// The `kvd` processes of this test (command line `--data <dir>/data`), alive.
fn kvds(env: &Env) -> Vec<u32> {
    let data = env.data().to_string_lossy().into_owned();
    let mut v: Vec<u32> = processes_naming(&env.dir)
        .into_iter()
        .filter(|&p| cmdline(p).contains(&format!("--data\0{data}")))
        .collect();
    v.sort_unstable();
    v
}

/// Wait for `child`'s exit (bounded); its wait status.
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let w = Watched::open(child.id()).unwrap();
    assert!(
        !wait_any(&[&w], BOUND).unwrap().is_empty(),
        "{what} did not exit within {BOUND:?}"
    );
    child.wait().unwrap()
}

/// Poll (bounded, [`POLL_PAUSE`] apart) until `f` gives a value.
fn poll<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {bound:?} waiting for {what}"
        );
        thread::sleep(POLL_PAUSE);
    }
}

fn run_point(point: &str, kvd: &Path) -> Row {
    let in_supervisor = point.starts_with("supervisor.");
    let route = route(point);
    let mut env = Env::new("cm");
    // Copies first, before this test spawns anything (ETXTBSY).
    let v2 = env.copy_of(kvd, "kvd-v2");
    let broken = env.copy_of(kvd, "kvd-broken");
    let marker = env.dir.join("crash.marker");
    // Disarmed until the test removes it.
    fs::write(&marker, "disarmed\n").unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut extra = format!("drain_grace_secs = {DRAIN_SECS}\ndeadline_secs = {DEADLINE_SECS}\n");
    let crash_env = vec![
        (crash::CRASH_AT.to_string(), point.to_string()),
        (crash::CRASH_ONCE.to_string(), marker.display().to_string()),
    ];
    if in_supervisor {
        env.sup_env = crash_env;
    } else {
        let _ = writeln!(
            extra,
            "env = {{ {} = \"{point}\", {} = \"{}\" }}",
            crash::CRASH_AT,
            crash::CRASH_ONCE,
            marker.display()
        );
    }
    env.write_config_with(kvd, port, &extra);
    env.start();
    let old = pid_of(&env.idle());
    let writers = Writers::start(addr);
    writers.wait_for_each(ACKS);

    // Arm, and reach the point.
    let t0;
    match route {
        Route::Commit | Route::Rollback => {
            let target = if route == Route::Commit { &v2 } else { &broken };
            fs::remove_file(&marker).unwrap();
            t0 = Instant::now();
            writers.mark(&format!("handoff, crash at {point}"));
            let mut ctl = Command::new(CTL)
                .arg("--socket")
                .arg(env.trigger())
                .args(["--json", "--timeout", "60", "handoff"])
                .arg(target)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            if in_supervisor {
                let mut sup = env.sup.take().unwrap();
                let st = wait_exit(&mut sup, "the supervisor");
                assert_eq!(st.signal(), Some(9), "supervisor: {st:?}\n{}", env.log());
            }
            wait_exit(&mut ctl, "handoffctl");
        }
        Route::Restart => {
            env.kill_supervisor();
            writers.wait_for_each(ACKS);
            fs::remove_file(&marker).unwrap();
            t0 = Instant::now();
            writers.mark(&format!("restart, crash at {point}"));
            env.start();
            if in_supervisor {
                let mut sup = env.sup.take().unwrap();
                let st = wait_exit(&mut sup, "the restarted supervisor");
                assert_eq!(st.signal(), Some(9), "supervisor: {st:?}\n{}", env.log());
            }
        }
    }
    // The crash happened, at this point, to the right process.
    let (victim, at) = poll("the crash marker", BOUND, || {
        let text = fs::read_to_string(&marker).ok()?;
        let (at, pid) = text.trim_end().split_once(' ')?;
        Some((pid.parse::<u32>().ok()?, at.to_string()))
    });
    assert_eq!(at, point);
    poll("the victim's death", BOUND, || {
        (!alive(victim)).then_some(())
    });
    let crash_seen = if in_supervisor {
        "SIGKILL (wait status)"
    } else {
        let all = all_logs(&env);
        assert!(
            all.contains(&format!("handoff[{victim}] crash point {point}: SIGKILL")),
            "{all}"
        );
        if all.contains(&format!("pid {victim} exited: signal: 9 (SIGKILL)")) {
            "SIGKILL (supervisor log)"
        } else {
            "gone (not the supervisor's child)"
        }
    };
    if in_supervisor {
        // Restart it (without the crash point) as an operator or systemd would.
        env.sup_env.clear();
        writers.mark("restart");
        env.start();
    }
    let successor = all_logs(&env)
        .lines()
        .filter_map(|l| l.split_once(": successor pid ")?.1.strip_suffix(" started"))
        .next()
        .map(|p| p.parse::<u32>().unwrap());

    // Exactly one serving kvd, named by the supervisor, answering, alone holding the lock.
    let lock = lock_file_path(&env.data());
    let (serving, status) = poll("one serving kvd", RECOVER_BOUND, || {
        let s = env.status()?;
        if !s.starts_with("state=idle ") {
            return None;
        }
        let p: u32 = field(&s, "serving_pid")?.parse().ok()?;
        (kvds(&env) == [p] && holders(&lock).ok()? == [p]).then_some((p, s))
    });
    let recover = t0.elapsed();
    assert_eq!(ping(addr).0, serving);
    let who = if serving == old {
        "old"
    } else if Some(serving) == successor {
        "new"
    } else {
        "cold-started"
    };
    let log = env.log();
    let outcome = if in_supervisor {
        assert!(
            log.contains(&format!("recovered: pid {serving} serves")),
            "{log}"
        );
        if log.contains("nobody serves: started") {
            "cold start after restart".to_string()
        } else {
            "adopted after restart".to_string()
        }
    } else {
        let last = match field(&status, "last") {
            Some("committed") => "committed",
            Some("rolled_back") => "rolled back",
            Some("lost") => "lost",
            _ => "no handoff",
        };
        if who == "cold-started" {
            format!("{last}, respawned")
        } else if route == Route::Restart {
            format!("{}, adopted", if who == "old" { "kept" } else { last })
        } else {
            last.to_string()
        }
    };
    writers.mark("recovered");
    writers.wait_for_each(ACKS);

    // A further handoff commits.
    writers.mark("further handoff");
    let h = env.handoff(None);
    assert_eq!(
        h.code,
        Some(0),
        "further handoff: {h:?}\n{}",
        all_logs(&env)
    );
    let after = pid_of(&h.status);
    assert_ne!(after, serving);
    assert_eq!(ping(addr).0, after);
    writers.wait_for_each(ACKS / 2);
    let written = writers.stop();
    written.report(point, &[h.total_ms()]);
    written.check_reads(addr);
    let refused = written
        .counts
        .refused
        .load(std::sync::atomic::Ordering::SeqCst);
    let reset = written
        .counts
        .resets
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(refused, 0, "connections refused");
    if !kills_a_server(point) {
        assert_eq!(reset, 0, "connections reset");
    }
    let st = env.stop().expect("the supervisor stops within its bound");
    assert!(st.success(), "{st:?}\n{}", env.log());
    Row {
        point: point.to_string(),
        route,
        outcome,
        serving: who,
        crash: crash_seen,
        recover: Some(recover),
        acked: written.acked().count(),
        refused,
        reset,
    }
}

/// The logs of every supervisor started so far (the daemons log into them too).
fn all_logs(env: &Env) -> String {
    (1..=env.starts)
        .map(|n| fs::read_to_string(env.dir.join(format!("sup-{n}.log"))).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("")
}
