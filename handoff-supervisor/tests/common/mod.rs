//! Helpers shared by the supervisor's end-to-end tests: the workspace's binaries, processes
//! waited for on pidfds, the rule for tests that need root ([`root`]), and [`Env`], the
//! reference supervisor with `testd` as its daemon (`supervisor.rs`, `unsafe_files.rs`; the
//! tests with `kvd` under load have theirs in `kvd_load`).

// Each test file uses a part of it.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use handoff_engine::sys::spawn::{wait_any, Watched};

pub const CTL: &str = env!("CARGO_BIN_EXE_handoffctl");
pub const SUP: &str = env!("CARGO_BIN_EXE_handoff-supervisor");

/// `target/<profile>/<bin>` of workspace package `package`, next to `handoffctl`; built with
/// cargo if it is not there yet (a workspace `cargo test` has built it already).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    workspace_bin_with(package, bin, &[], |_| true)
}

/// [`workspace_bin`], built with `features` of `package` unless the file there passes `ok`.
pub fn workspace_bin_with(
    package: &str,
    bin: &str,
    features: &[&str],
    ok: impl Fn(&Path) -> bool,
) -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let _g = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(env!("CARGO_BIN_EXE_handoffctl"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(bin);
    if !path.exists() || !ok(&path) {
        let profile = dir.file_name().unwrap().to_str().unwrap().to_string();
        let target = dir.parent().unwrap();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", package, "--bin", bin])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        }
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
        let st = cmd.status().expect("cargo build");
        assert!(
            st.success() && path.exists() && ok(&path),
            "cannot build {bin}"
        );
    }
    path
}

// ---------------------------------------------------------------------------------------
// Processes

/// Send `sig` ("TERM", "KILL", "STOP", …) to `pid` with `kill(1)`; a pid that is gone is no
/// error. For the test's own processes only.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether process `pid` runs (neither a zombie nor gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s[s.rfind(')')? + 2..].chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Wait (bounded, on a pidfd) for our child `c` to exit: its status, or `None` if it runs on.
pub fn exited_within(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let exited = Watched::open(c.id())
        .map(|w| !wait_any(&[&w], limit).unwrap_or_default().is_empty())
        .unwrap_or(true);
    if exited {
        c.wait().ok()
    } else {
        None
    }
}

/// [`exited_within`]; one that runs on is killed (`SIGKILL`) and reaped, and `None`.
pub fn exit_within(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let st = exited_within(c, limit);
    if st.is_none() {
        let _ = c.kill();
        let _ = c.wait();
    }
    st
}

/// `SIGTERM` our child `c` (a supervisor: it stops its daemon too) and wait for its exit, up
/// to `limit`: its status, or `None` (and it is killed) if it does not go.
pub fn terminate(mut c: Child, limit: Duration) -> Option<ExitStatus> {
    if let Ok(w) = Watched::open(c.id()) {
        let _ = w.signal(rustix::process::Signal::TERM);
    }
    exit_within(&mut c, limit)
}

/// Copy an executable through `cp`, a process of its own: had this (multi-threaded) test
/// process written the copy, a child forked meanwhile by another test could still hold the
/// descriptor open for writing when the copy is executed (ETXTBSY).
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

/// Whether the test `test`, which needs root for `why` ("a tmpfs mounted"), may run: `true`
/// as root. Otherwise one line on stderr (`SKIPPED <test>: needs root (<why>)`) and `false`,
/// for the test to return at once; with `HANDOFF_REQUIRE_ROOT_TESTS=1` (CI), a panic instead,
/// so that a run that must prove the root-only tests cannot skip them.
pub fn root(test: &str, why: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("HANDOFF_REQUIRE_ROOT_TESTS").is_some_and(|v| v == "1") {
        panic!("{test} needs root ({why}), and HANDOFF_REQUIRE_ROOT_TESTS=1");
    }
    eprintln!("SKIPPED {test}: needs root ({why})");
    false
}

// ---------------------------------------------------------------------------------------
// The reference supervisor with testd

/// The value of `key` in a status line (`key=value key=value …`).
pub fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .split(' ')
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_end())
}

/// `target/<profile>/testd`, built if it is not there yet.
pub fn testd() -> PathBuf {
    workspace_bin("handoff-tests", "testd")
}

static N: AtomicU32 = AtomicU32::new(0);

/// A test directory with a configuration for `testd` (a Unix listener `kv.sock`, the control
/// socket `ctl.sock`, the trigger socket `trig.sock`, the data in `data/`), the supervisor
/// started on it, and every daemon seen: at the end, the supervisor is stopped (`SIGTERM`,
/// bounded) and every daemon seen or holding the data directory is killed, even on a panic.
/// Every supervisor started appends to `sup.log`.
pub struct Env {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub sup: Option<Child>,
    /// Every daemon pid seen.
    pub seen: Vec<u32>,
    /// Where the lines of the supervisor started last begin in `sup.log`.
    log_start: usize,
}

impl Env {
    /// A new directory, `/tmp/hsup-<tag><pid>-<n>`, with a configuration for `binary`
    /// (`testd` if `None`); `extra` is appended to the top-level keys.
    pub fn new(tag: &str, extra: &str, binary: Option<&Path>) -> Env {
        let dir = PathBuf::from(format!(
            "/tmp/hsup-{tag}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = binary.map_or_else(testd, Path::to_path_buf);
        let d = dir.display();
        let text = format!(
            "control_socket = \"{d}/ctl.sock\"\n\
             trigger_socket = \"{d}/trig.sock\"\n\
             binary = \"{}\"\n\
             drain_grace_secs = 5\n\
             deadline_secs = 20\n\
             env = {{ TESTD_DATA = \"{d}/data\", TESTD_SOCK = \"{d}/ctl.sock\" }}\n\
             {extra}\n\
             [[listeners]]\nname = \"kv\"\naddr = \"{d}/kv.sock\"\nkind = \"unix\"\n",
            binary.display()
        );
        let config = dir.join("handoff.toml");
        std::fs::write(&config, text).unwrap();
        Env {
            dir,
            config,
            sup: None,
            seen: Vec::new(),
            log_start: 0,
        }
    }

    pub fn trigger(&self) -> PathBuf {
        self.dir.join("trig.sock")
    }

    /// The default journal: `<control socket>.journal`.
    pub fn journal(&self) -> PathBuf {
        self.dir.join("ctl.sock.journal")
    }

    /// Start the supervisor, its log (and its daemons') appended to `sup.log`.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sup.log"))
            .unwrap();
        self.log_start = self.log().len();
        let child = Command::new(SUP)
            .arg("--config")
            .arg(&self.config)
            // The tests read the library's log lines: never let the caller's setting hide them.
            .env("HANDOFF_LOG", "on")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(child);
    }

    /// All of `sup.log`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sup.log")).unwrap_or_default()
    }

    /// `sup.log` from the start of the supervisor started last.
    pub fn last_log(&self) -> String {
        self.log()
            .get(self.log_start..)
            .unwrap_or_default()
            .to_string()
    }

    /// Start the supervisor and wait (bounded) for it to exit: its status, and its log.
    pub fn start_and_wait_exit(&mut self, limit: Duration) -> (ExitStatus, String) {
        self.start();
        let mut c = self.sup.take().unwrap();
        let Some(st) = exit_within(&mut c, limit) else {
            panic!(
                "the supervisor did not exit within {limit:?}; log:\n{}",
                self.last_log()
            );
        };
        (st, self.last_log())
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(CTL)
            .arg("--socket")
            .arg(self.trigger())
            .args(args)
            .output()
            .unwrap()
    }

    /// `handoffctl status`, if answered; the serving pid it names is remembered.
    pub fn status(&mut self) -> Option<String> {
        let out = self.ctl(&["status"]);
        let s = String::from_utf8(out.stdout).ok()?;
        let pid = field(&s, "serving_pid").and_then(|p| p.parse().ok());
        if let Some(p) = pid {
            if !self.seen.contains(&p) {
                self.seen.push(p);
            }
        }
        out.status.success().then(|| s.trim_end().to_string())
    }

    /// Wait (bounded) until `status` satisfies `f`; a supervisor that exits meanwhile fails
    /// the wait at once.
    pub fn wait_status(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
            }
            let exited = self.sup.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < end,
                "no {what} (supervisor exit: {exited:?}); log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) until a daemon serves and no handoff runs: the status line.
    pub fn idle(&mut self) -> String {
        self.wait_status("state=idle", |s| s.starts_with("state=idle "))
    }

    /// SIGTERM the supervisor and wait for it (bounded; SIGKILL after, and `None`).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        terminate(self.sup.take()?, Duration::from_secs(15))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A graceful stop stops the daemon too (bounded; SIGKILL after).
        let _ = self.stop();
        // Whoever holds the data directory is a daemon of this test.
        let lock = handoff_engine::sys::lock::lock_file_path(&self.dir.join("data"));
        self.seen
            .extend(handoff_engine::sys::lock::holders(&lock).unwrap_or_default());
        for p in &self.seen {
            signal(*p, "KILL");
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
