//! Files the reference supervisor opens at start, through the real `handoff-supervisor` binary
//! with the tests crate's `testd` as the daemon (built first if missing). Every wait is bounded.
//!
//! - `a_corrupt_journal_is_set_aside_and_the_daemon_starts`: a journal that does not decode is
//!   moved to `<journal>.corrupt-<unix time>` with one log line, and the daemon starts.
//! - `an_unsafe_journal_stops_the_supervisor_with_status_78`: a symbolic link, a FIFO, a file
//!   others may write, an oversized file (and, as root,
//!   `a_journal_of_another_uid_stops_the_supervisor_with_status_78`): refused at once with one
//!   line naming the problem and exit status 78, which the systemd unit does not restart.
//! - `a_regular_file_at_the_trigger_socket_or_a_listener_path_is_kept`: only sockets are
//!   replaced.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{root, Env};

/// How long a refusal may take (a FIFO that blocks the start-up fails here).
const BOUND: Duration = Duration::from_secs(10);

/// The log's lines that contain `what`.
fn lines_with<'a>(log: &'a str, what: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(what)).collect()
}

#[test]
fn a_corrupt_journal_is_set_aside_and_the_daemon_starts() {
    let mut env = Env::new("uf", "", None);
    let journal = env.journal();
    let garbage = b"not a journal at all".to_vec();
    fs::write(&journal, &garbage).unwrap();
    fs::set_permissions(&journal, fs::Permissions::from_mode(0o600)).unwrap();

    env.start();
    let s = env.idle();
    eprintln!("started over a corrupt journal: {s}");
    let log = env.last_log();
    let said = lines_with(&log, "corrupt");
    assert_eq!(said.len(), 1, "one line about the journal; log:\n{log}");
    let line = said[0];
    eprintln!("{line}");
    // What was wrong, where it went, and what recovery does instead.
    let aside: Vec<PathBuf> = fs::read_dir(&env.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("ctl.sock.journal.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        line.contains(&journal.display().to_string())
            && line.contains(&aside[0].display().to_string())
            && line.contains("magic")
            && line.contains("control socket"),
        "{line}"
    );
    assert_eq!(fs::read(&aside[0]).unwrap(), garbage, "moved, not changed");
    // The recovery wrote a fresh journal, which the next start reads.
    assert!(fs::read(&journal).unwrap().starts_with(b"HOJ"));
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
    env.start();
    env.idle();
    assert!(
        lines_with(&env.last_log(), "corrupt").is_empty(),
        "{}",
        env.last_log()
    );
}

/// An environment whose supervisor wrote a journal, moved since to `good.journal` (returned):
/// the journal's path is free, and a valid journal is at hand to copy or link to.
fn env_with_a_good_journal() -> (Env, PathBuf) {
    let mut env = Env::new("uf", "", None);
    env.start();
    env.idle();
    assert!(env.stop().expect("stops").success());
    let good = env.dir.join("good.journal");
    fs::rename(env.journal(), &good).unwrap();
    (env, good)
}

/// With `plant(journal, good)` done, the supervisor is refused at once: exit status 78, one
/// line naming the journal and saying `says`, the journal untouched, no daemon started. The
/// planted file is removed after.
fn assert_refused(
    env: &mut Env,
    good: &Path,
    what: &str,
    says: &str,
    plant: impl Fn(&Path, &Path),
) {
    let journal = env.journal();
    let good_bytes = fs::read(good).unwrap();
    plant(&journal, good);
    let before = fs::symlink_metadata(&journal).unwrap();
    let (st, log) = env.start_and_wait_exit(BOUND);
    let refusal = lines_with(&log, "handoff-supervisor: journal ");
    eprintln!("{what}: {st:?}: {refusal:?}");
    assert_eq!(st.code(), Some(78), "{what}; log:\n{log}");
    assert_eq!(refusal.len(), 1, "{what}; log:\n{log}");
    assert!(
        refusal[0].contains(&journal.display().to_string()) && refusal[0].contains(says),
        "{what}: {}",
        refusal[0]
    );
    // Nothing touched, nothing started.
    let after = fs::symlink_metadata(&journal).unwrap();
    assert_eq!(
        (before.file_type(), before.len(), before.permissions()),
        (after.file_type(), after.len(), after.permissions()),
        "{what}"
    );
    assert!(!log.contains("nobody serves"), "{what}; log:\n{log}");
    fs::remove_file(&journal).unwrap();
    assert_eq!(fs::read(good).unwrap(), good_bytes, "{what}");
}

#[test]
fn an_unsafe_journal_stops_the_supervisor_with_status_78() {
    let (mut env, good) = env_with_a_good_journal();
    assert_refused(
        &mut env,
        &good,
        "a symbolic link",
        "is a symbolic link",
        |j, good| std::os::unix::fs::symlink(good, j).unwrap(),
    );
    assert_refused(&mut env, &good, "a FIFO", "FIFO", |j, _| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            j,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap()
    });
    assert_refused(
        &mut env,
        &good,
        "writable by others",
        "writable by group or others",
        |j, good| {
            fs::copy(good, j).unwrap();
            fs::set_permissions(j, fs::Permissions::from_mode(0o666)).unwrap();
        },
    );
    assert_refused(&mut env, &good, "too large", "larger than", |j, _| {
        let f = fs::File::create(j).unwrap();
        f.set_len(64 << 20).unwrap();
    });
    // systemd must not restart a supervisor that refused its journal.
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("handoff-supervisor.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.trim() == "RestartPreventExitStatus=78"),
        "{unit}"
    );
}

#[test]
fn a_journal_of_another_uid_stops_the_supervisor_with_status_78() {
    if !root(
        "a_journal_of_another_uid_stops_the_supervisor_with_status_78",
        "a journal chowned to another uid",
    ) {
        return;
    }
    let (mut env, good) = env_with_a_good_journal();
    assert_refused(
        &mut env,
        &good,
        "of another uid",
        "owned by uid 65534",
        |j, good| {
            fs::copy(good, j).unwrap();
            std::os::unix::fs::chown(j, Some(65534), Some(65534)).unwrap();
        },
    );
}

#[test]
fn a_regular_file_at_the_trigger_socket_or_a_listener_path_is_kept() {
    let mut env = Env::new("uf", "", None);
    for name in ["kv.sock", "trig.sock"] {
        let path = env.dir.join(name);
        // (The listener's stale socket, from the start before, goes.)
        let _ = fs::remove_file(&path);
        fs::write(&path, b"precious").unwrap();
        let (st, log) = env.start_and_wait_exit(BOUND);
        eprintln!("a regular file at {name}: {st:?}: {}", log.trim_end());
        assert!(!st.success(), "{log}");
        assert!(
            log.contains(&path.display().to_string()) && log.contains("not a socket"),
            "{name}; log:\n{log}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"precious", "{name}");
        assert!(!log.contains("nobody serves"), "{name}; log:\n{log}");
        fs::remove_file(&path).unwrap();
    }
    // Cleared, the same configuration starts.
    env.start();
    env.idle();
}
