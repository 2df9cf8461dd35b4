//! Files the reference supervisor opens at start, through the real `handoff-supervisor` binary
//! with the tests crate's `testd` as the daemon (built first if missing). Every wait is bounded.
//!
//! - `a_corrupt_journal_is_set_aside_and_the_daemon_starts`: a journal that does not decode is
//!   moved to `<journal>.corrupt-<unix time>` with one log line, and the daemon starts.
//! - `an_unsafe_journal_stops_the_supervisor_with_status_78`: a symbolic link, a FIFO, a file
//!   others may write, an oversized file, one of another uid: refused at once with one line
//!   naming the problem and exit status 78, which the systemd unit does not restart.
//! - `a_regular_file_at_the_trigger_socket_or_a_listener_path_is_kept`: only sockets are
//!   replaced.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use handoff_io_std::sys::spawn::{wait_any, Watched};

const CTL: &str = env!("CARGO_BIN_EXE_handoffctl");
const SUP: &str = env!("CARGO_BIN_EXE_handoff-supervisor");
/// How long a refusal may take (a FIFO that blocks the start-up fails here).
const BOUND: Duration = Duration::from_secs(10);

static N: AtomicU32 = AtomicU32::new(0);

struct Env {
    dir: PathBuf,
    config: PathBuf,
    sup: Option<Child>,
    starts: u32,
    /// Daemon pids seen, killed at the end whatever happens.
    seen: Vec<u32>,
}

impl Env {
    fn new() -> Env {
        let dir = PathBuf::from(format!(
            "/tmp/hsup-uf{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let testd = common::workspace_bin("handoff-tests", "testd");
        let d = dir.display();
        let text = format!(
            "control_socket = \"{d}/ctl.sock\"\n\
             trigger_socket = \"{d}/trig.sock\"\n\
             binary = \"{}\"\n\
             drain_grace_secs = 5\n\
             deadline_secs = 20\n\
             env = {{ TESTD_DATA = \"{d}/data\", TESTD_SOCK = \"{d}/ctl.sock\" }}\n\
             [[listeners]]\nname = \"kv\"\naddr = \"{d}/kv.sock\"\nkind = \"unix\"\n",
            testd.display()
        );
        let config = dir.join("handoff.toml");
        fs::write(&config, text).unwrap();
        Env {
            dir,
            config,
            sup: None,
            starts: 0,
            seen: Vec::new(),
        }
    }

    /// The default journal: `<control socket>.journal`.
    fn journal(&self) -> PathBuf {
        self.dir.join("ctl.sock.journal")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("sup-{}.log", self.starts))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = fs::File::create(self.log_path()).unwrap();
        let child = Command::new(SUP)
            .arg("--config")
            .arg(&self.config)
            .env("HANDOFF_LOG", "on")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(child);
    }

    /// Start the supervisor and wait (bounded) for it to exit: its status and its log.
    fn start_and_wait_exit(&mut self) -> (ExitStatus, String) {
        self.start();
        let mut c = self.sup.take().unwrap();
        let w = Watched::open(c.id()).unwrap();
        if wait_any(&[&w], BOUND).unwrap().is_empty() {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "the supervisor did not exit within {BOUND:?}; log:\n{}",
                self.log()
            );
        }
        (c.wait().unwrap(), self.log())
    }

    /// Wait (bounded) until `handoffctl status` shows a serving daemon: the status line.
    fn idle(&mut self) -> String {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let out = Command::new(CTL)
                .arg("--socket")
                .arg(self.dir.join("trig.sock"))
                .arg("status")
                .output()
                .unwrap();
            let s = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
            if let Some(pid) = field(&s, "serving_pid").and_then(|p| p.parse().ok()) {
                if !self.seen.contains(&pid) {
                    self.seen.push(pid);
                }
                if s.starts_with("state=idle ") {
                    return s;
                }
            }
            let exited = self.sup.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < end,
                "no daemon serving (supervisor exit: {exited:?}); log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM the supervisor and wait for it (bounded; SIGKILL after).
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.sup.take()?;
        signal(c.id(), "TERM");
        let exited = Watched::open(c.id())
            .map(|w| {
                !wait_any(&[&w], Duration::from_secs(15))
                    .unwrap_or_default()
                    .is_empty()
            })
            .unwrap_or(true);
        if !exited {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        c.wait().ok()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.stop();
        // Whoever holds the data directory is a daemon of this test.
        let lock = handoff_io_std::sys::lock::lock_file_path(&self.dir.join("data"));
        self.seen
            .extend(handoff_io_std::sys::lock::holders(&lock).unwrap_or_default());
        for p in &self.seen {
            signal(*p, "KILL");
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .split(' ')
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_end())
}

/// Whether this test may do what only root can; `false` (skip, said on one line) if not,
/// unless `HANDOFF_REQUIRE_ROOT_TESTS=1`.
fn root(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("HANDOFF_REQUIRE_ROOT_TESTS").is_none_or(|v| v != "1"),
        "{what} needs root (HANDOFF_REQUIRE_ROOT_TESTS=1)"
    );
    eprintln!("SKIPPED: {what} needs root");
    false
}

/// The log's lines that contain `what`.
fn lines_with<'a>(log: &'a str, what: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(what)).collect()
}

#[test]
fn a_corrupt_journal_is_set_aside_and_the_daemon_starts() {
    let mut env = Env::new();
    let journal = env.journal();
    let garbage = b"not a journal at all".to_vec();
    fs::write(&journal, &garbage).unwrap();
    fs::set_permissions(&journal, fs::Permissions::from_mode(0o600)).unwrap();

    env.start();
    let s = env.idle();
    eprintln!("started over a corrupt journal: {s}");
    let log = env.log();
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
        lines_with(&env.log(), "corrupt").is_empty(),
        "{}",
        env.log()
    );
}

#[test]
fn an_unsafe_journal_stops_the_supervisor_with_status_78() {
    let mut env = Env::new();
    let journal = env.journal();
    // A valid journal elsewhere, to link to.
    env.start();
    env.idle();
    assert!(env.stop().expect("stops").success());
    let good = env.dir.join("good.journal");
    fs::rename(&journal, &good).unwrap();
    let good_bytes = fs::read(&good).unwrap();

    type Plant = Box<dyn Fn(&Path, &Path)>;
    let mut cases: Vec<(&str, &str, Plant)> = vec![
        (
            "a symbolic link",
            "is a symbolic link",
            Box::new(|j, good| std::os::unix::fs::symlink(good, j).unwrap()),
        ),
        (
            "a FIFO",
            "FIFO",
            Box::new(|j, _| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    j,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    0,
                )
                .unwrap()
            }),
        ),
        (
            "writable by others",
            "writable by group or others",
            Box::new(|j, good| {
                fs::copy(good, j).unwrap();
                fs::set_permissions(j, fs::Permissions::from_mode(0o666)).unwrap();
            }),
        ),
        (
            "too large",
            "larger than",
            Box::new(|j, _| {
                let f = fs::File::create(j).unwrap();
                f.set_len(64 << 20).unwrap();
            }),
        ),
    ];
    if root("a journal of another uid") {
        cases.push((
            "of another uid",
            "owned by uid 65534",
            Box::new(|j, good| {
                fs::copy(good, j).unwrap();
                std::os::unix::fs::chown(j, Some(65534), Some(65534)).unwrap();
            }),
        ));
    }
    for (what, says, plant) in cases {
        plant(&journal, &good);
        let before = fs::symlink_metadata(&journal).unwrap();
        let (st, log) = env.start_and_wait_exit();
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
    }
    assert_eq!(fs::read(&good).unwrap(), good_bytes);
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
fn a_regular_file_at_the_trigger_socket_or_a_listener_path_is_kept() {
    let mut env = Env::new();
    for name in ["kv.sock", "trig.sock"] {
        let path = env.dir.join(name);
        // (The listener's stale socket, from the start before, goes.)
        let _ = fs::remove_file(&path);
        fs::write(&path, b"precious").unwrap();
        let (st, log) = env.start_and_wait_exit();
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
