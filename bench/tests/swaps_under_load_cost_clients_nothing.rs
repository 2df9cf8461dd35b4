//! `loadgen` against the reference supervisor with kvd, and with handoff-httpd: a few handoffs
//! under open- and closed-loop load, with `bench/load.sh`'s own swap commands, cost the clients
//! no error, and requests are answered inside the swap windows.
//!
//! The data directory and the supervisor's journal are on a tmpfs (`/dev/shm`) when there is
//! one: this test is about what clients see, and on a machine whose disk is busy with other work
//! an `fsync` has been seen to take 20 s, long enough for a successor to give up on a supervisor
//! blocked in its journal's `fsync` (the handoff then rolls back; `bench/load.sh` keeps the
//! disk and reports such a rollback as a failed swap).
//!
//! Every wait is bounded: the supervisor's readiness is a bounded poll of its status, loadgen
//! stops by itself (each request is bounded by its answer timeout), and the processes are
//! stopped through pidfds with a bound.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_engine::sys::spawn::{wait_any, Watched};

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");
const BOUND: Duration = Duration::from_secs(30);
/// The pause between two status polls of a bounded poll.
const POLL_PAUSE: Duration = Duration::from_millis(20);

/// `target/<profile>/<bin>` of workspace package `package`, built (or found up to date) by
/// cargo, in the profile this test was built in, with `features`.
///
/// The binaries land where the other packages' tests find theirs: build them as those tests
/// do. `handoff-supervisor`'s crash matrix needs its binary with the crash points (inert unless
/// `HANDOFF_CRASH_AT` is set); an ordinary build here replaced it, and the matrix, run after
/// this test by `cargo test --workspace`, failed.
fn workspace_bins(package: &str, bins: &[&str], features: &[&str]) -> Vec<PathBuf> {
    let dir = Path::new(LOADGEN).parent().unwrap().to_path_buf();
    let profile = dir.file_name().unwrap().to_str().unwrap().to_string();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "-p", package])
        .env("CARGO_TARGET_DIR", dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for b in bins {
        cmd.args(["--bin", b]);
    }
    if profile == "release" {
        cmd.arg("--release");
    }
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    assert!(
        cmd.status().expect("cargo build").success(),
        "cannot build {bins:?}"
    );
    bins.iter().map(|b| dir.join(b)).collect()
}

/// The test directory and the supervisor: stopped at the end, even on a panic, with every
/// process whose command line names the directory (a retired daemon, an orphan).
struct Env {
    dir: PathBuf,
    /// The data directory and the journal (on a tmpfs).
    shm: PathBuf,
    sup: Option<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut sup) = self.sup.take() {
            if let Ok(w) = Watched::open(sup.id()) {
                let _ = w.signal(rustix::process::Signal::TERM);
                if wait_any(&[&w], BOUND).unwrap_or_default().is_empty() {
                    let _ = w.kill();
                }
            }
            let _ = sup.wait();
        }
        let dir = self.dir.to_string_lossy().into_owned();
        for pid in pids_naming(&dir) {
            if let Ok(w) = Watched::open(pid) {
                // Only ours: its command line still names our directory (not a reused pid).
                if cmdline(pid).contains(&dir) {
                    let _ = w.kill();
                    let _ = wait_any(&[&w], BOUND);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("kept {} and {}", self.dir.display(), self.shm.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
            let _ = fs::remove_dir_all(&self.shm);
        }
    }
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .into_owned()
}

fn pids_naming(dir: &str) -> Vec<u32> {
    let Ok(d) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&p: &u32| p != std::process::id() && cmdline(p).contains(dir))
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_end())
}

#[test]
fn kvd_handoffs_under_load_cost_clients_nothing() {
    let kvd = workspace_bins("handoff-demo", &["kvd"], &["crash-points"]).remove(0);
    swaps_under_load(&kvd, "kvd", "kv", "kvd");
}

#[test]
fn httpd_handoffs_under_load_cost_clients_nothing() {
    let httpd = PathBuf::from(env!("CARGO_BIN_EXE_handoff-httpd"));
    swaps_under_load(&httpd, "httpd", "http", "http");
}

/// Five handoffs of `daemon` (copied as `<name>-v<n>`, its listener `listener`) under
/// loadgen's `proto` load.
fn swaps_under_load(daemon: &Path, name: &str, listener: &str, proto: &str) {
    // One at a time: each is the only load on the machine it adds.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let sup_bins = workspace_bins(
        "handoff-supervisor",
        &["handoff-supervisor", "handoffctl"],
        &["crash-points"],
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("load.sh");
    // Short: the control socket's path must fit in 108 bytes.
    let dir = PathBuf::from(format!("/tmp/hlt-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let shm = if Path::new("/dev/shm").is_dir() {
        PathBuf::from(format!("/dev/shm/hlt-{}-{name}", std::process::id()))
    } else {
        dir.join("shm")
    };
    let _ = fs::remove_dir_all(&shm);
    fs::create_dir_all(shm.join("data")).unwrap();
    fs::create_dir_all(dir.join("bins")).unwrap();
    let mut env = Env {
        dir: dir.clone(),
        shm: shm.clone(),
        sup: None,
    };
    // The layout load.sh's `ours-prepare` and `ours-swap` expect.
    let v0 = dir.join(format!("bins/{name}-v0"));
    for (from, to) in [
        (sup_bins[1].as_path(), dir.join("handoffctl")),
        (daemon, v0.clone()),
    ] {
        assert!(Command::new("cp")
            .arg(from)
            .arg(&to)
            .status()
            .unwrap()
            .success());
    }
    fs::write(dir.join("n"), "0\n").unwrap();
    let port = handoff_bench::free_port();
    let d = dir.display();
    let config = dir.join("handoff.toml");
    fs::write(
        &config,
        format!(
            "control_socket = \"{d}/ctl.sock\"\ntrigger_socket = \"{d}/trig.sock\"\n\
             binary = \"{v0}\"\n\
             args = [\"--data\", \"{s}/data\", \"--socket\", \"{d}/ctl.sock\"]\n\
             journal = \"{s}/journal\"\n\
             binary_dir = \"{d}/bins\"\ndrain_grace_secs = 5\ndeadline_secs = 20\n\n\
             [[listeners]]\nname = \"{listener}\"\naddr = \"127.0.0.1:{port}\"\n",
            v0 = v0.display(),
            s = shm.display(),
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join("sup.log")).unwrap();
    env.sup = Some(
        Command::new(&sup_bins[0])
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Serving: a bounded poll of the supervisor's status.
    let end = Instant::now() + BOUND;
    loop {
        let out = Command::new(dir.join("handoffctl"))
            .arg("--socket")
            .arg(dir.join("trig.sock"))
            .arg("status")
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        if s.starts_with("state=idle ") && field(&s, "serving_pid").is_some_and(|p| p != "-") {
            break;
        }
        assert!(
            Instant::now() < end,
            "{name} not serving within {BOUND:?}: {s}; log:\n{}",
            fs::read_to_string(dir.join("sup.log")).unwrap_or_default()
        );
        std::thread::sleep(POLL_PAUSE);
    }

    let s = script.display();
    let out = Command::new(LOADGEN)
        .args(["--proto", proto, "--addr", &format!("127.0.0.1:{port}")])
        .args(["--open-rate", "200", "--closed", "4", "--open-workers", "8"])
        .args(["--warmup", "0.5", "--swaps", "5", "--interval", "200"])
        .args([
            "--cooldown",
            "0.3",
            "--swap-timeout",
            "20",
            "--max-secs",
            "25",
        ])
        .args(["--label", name])
        .arg("--pre-swap-cmd")
        .arg(format!(
            "'{s}' ours-prepare '{d}' '{}' {name}",
            daemon.display()
        ))
        .arg("--swap-cmd")
        .arg(format!("'{s}' ours-swap '{d}' {name}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "{text}{}\nsupervisor log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(dir.join("sup.log")).unwrap_or_default()
    );
    assert!(out.status.success(), "loadgen failed:\n{report}");
    let result = text
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line:\n{report}"));
    let num = |k: &str| -> u64 {
        field(result, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {result}"))
    };
    assert_eq!(num("swaps"), 5, "{report}");
    assert_eq!(num("swaps_failed"), 0, "{report}");
    for kind in ["open_loop", "closed_loop"] {
        assert_eq!(
            num(&format!("{kind}_errors")),
            0,
            "{kind} errors:\n{report}"
        );
        assert!(
            num(&format!("{kind}_window_ok")) > 0,
            "{kind}: nothing answered inside the swap windows:\n{report}"
        );
        assert!(num(&format!("{kind}_steady_requests")) > 0, "{report}");
    }
    eprintln!("{text}");
    drop(env);
}
