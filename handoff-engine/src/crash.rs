//! Named crash points: the places where the crash matrix
//! (`handoff-supervisor/tests/crash_matrix.rs`, `scripts/crash-matrix`) kills a process.
//!
//! Compiled in only with the cargo feature `crash-points` (off by default, so never in a
//! release build; the end-to-end tests turn it on through their dependencies). Then
//! [`point`] reads `HANDOFF_CRASH_AT` once; if it names this point, the process sends itself
//! `SIGKILL`: no destructor, no flush, no unlock, exactly as if the machine lost power for this
//! one process. With `HANDOFF_CRASH_ONCE=<path>` set, the process first creates `<path>`
//! (`O_EXCL`, holding `"<point> <pid>\n"`) and crashes only if it could: a respawned or
//! restarted process with the same environment runs through the point unharmed.
//!
//! Without the feature every function here is an empty `#[inline(always)]` function.
//!
//! [`POINTS`] is the one list of names; a unit test checks that each is used exactly once in
//! this crate's source, and the crash matrix that it covers each.

/// Every crash point, `role.step`, in the order a committed handoff (then a rolled-back one,
/// then a restarted supervisor's recovery) passes them.
pub const POINTS: &[&str] = &[
    // The supervisor (engine/supervisor.rs, sys/journal_file.rs).
    "supervisor.successor_spawned",
    "supervisor.inflight_tmp_written",
    "supervisor.inflight_journaled",
    "supervisor.listeners_sent",
    "supervisor.prepare_sent",
    "supervisor.seal_sent",
    "supervisor.begin_sent",
    "supervisor.committing_tmp_written",
    "supervisor.committing_journaled",
    "supervisor.commit_sent_successor",
    "supervisor.commit_sent_incumbent",
    "supervisor.idle_journaled",
    "supervisor.abort_sent_incumbent",
    "supervisor.listeners_taken_back",
    // The incumbent (engine/incumbent.rs).
    "incumbent.hello_acked",
    "incumbent.drain_started",
    "incumbent.drained_sent",
    "incumbent.sealed",
    "incumbent.lock_released",
    "incumbent.sealed_sent",
    "incumbent.commit_acked",
    "incumbent.lock_reacquired",
    "incumbent.resumed_sent",
    "incumbent.listeners_returned",
    // The successor (engine/successor.rs, sys/lock.rs, successor.rs).
    "successor.hello_acked",
    "successor.listeners_received",
    "successor.begun",
    "successor.lock_taken",
    "successor.data_opened",
    "successor.ready_sent",
    "successor.commit_marked",
    "successor.commit_acked",
    "successor.control_bound",
];

/// The environment variable naming the point to crash at.
pub const CRASH_AT: &str = "HANDOFF_CRASH_AT";
/// The environment variable naming the once-marker file.
pub const CRASH_ONCE: &str = "HANDOFF_CRASH_ONCE";

/// Whether crash points are compiled into this build.
pub const ENABLED: bool = cfg!(feature = "crash-points");

/// Crash here if `HANDOFF_CRASH_AT` names `name` (and the once-marker, if any, is new).
#[cfg(feature = "crash-points")]
pub fn point(name: &'static str) {
    use std::sync::OnceLock;
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_AT).ok());
    debug_assert!(
        POINTS.contains(&name),
        "crash point {name} is not in POINTS"
    );
    if at.as_deref() != Some(name) {
        return;
    }
    let pid = std::process::id();
    if let Some(marker) = std::env::var_os(CRASH_ONCE) {
        use std::io::Write;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker);
        match created {
            Ok(mut f) => {
                // Written and closed before the kill: the test reads who died where.
                let _ = f.write_all(format!("{name} {pid}\n").as_bytes());
                let _ = f.sync_all();
            }
            // Someone crashed here already (or the marker cannot be made): run on.
            Err(_) => return,
        }
    }
    let line = format!("handoff[{pid}] crash point {name}: SIGKILL\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    let me = rustix::process::getpid();
    let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
    // SIGKILL cannot be caught or blocked; it is delivered before `kill` returns.
    unreachable!("SIGKILL to ourselves returned");
}

/// Crash here if `HANDOFF_CRASH_AT` names `name` (and the once-marker, if any, is new).
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &'static str) {}

/// [`point`], only in a process started as a successor (`HANDOFF_ROLE=successor`): for
/// library calls that cold starts make too.
#[cfg(feature = "crash-points")]
pub fn successor_point(name: &'static str) {
    if std::env::var_os("HANDOFF_ROLE").is_some_and(|r| r == "successor") {
        point(name);
    }
}

/// [`point`], only in a process started as a successor (`HANDOFF_ROLE=successor`).
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn successor_point(_name: &'static str) {}

#[cfg(test)]
mod tests {
    use super::POINTS;

    /// The source files of this crate, but this one, and of the std driver (`handoff-io-std`),
    /// which places the one point of a blocking call (`successor.control_bound`).
    fn sources() -> Vec<(String, String)> {
        fn walk(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("crash.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    out.push((p.display().to_string(), text));
                }
            }
        }
        let mut out = Vec::new();
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        walk(&here.join("src"), &mut out);
        walk(&here.join("../handoff-io-std/src"), &mut out);
        out
    }

    #[test]
    fn every_point_is_used_exactly_once() {
        let sources = sources();
        for name in POINTS {
            let quoted = format!("\"{name}\"");
            let uses: Vec<&str> = sources
                .iter()
                .flat_map(|(p, t)| std::iter::repeat_n(p.as_str(), t.matches(&quoted).count()))
                .collect();
            assert_eq!(uses.len(), 1, "crash point {name} used at {uses:?}");
        }
        // And nothing outside the list is used as a point.
        for (p, t) in &sources {
            for call in ["crash::point(\"", "crash::successor_point(\""] {
                for (i, _) in t.match_indices(call) {
                    let rest = &t[i + call.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    assert!(POINTS.contains(&name), "{p}: unlisted crash point {name}");
                }
            }
        }
    }

    #[test]
    fn names_are_role_dot_step_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for name in POINTS {
            let (role, step) = name.split_once('.').unwrap();
            assert!(
                ["supervisor", "incumbent", "successor"].contains(&role),
                "{name}"
            );
            assert!(
                !step.is_empty() && step.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(*name), "{name} listed twice");
        }
    }
}
