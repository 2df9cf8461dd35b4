//! Bad input for the reference supervisor and `kvd` (issue 6): each gets a clear error and
//! loses nothing (the serving daemon serves on, every acknowledged write survives, the error
//! says what happened, nothing panics).
//!
//! - `a_full_data_disk_fails_writes_clearly_and_loses_no_acknowledged_write`: kvd's data
//!   directory on a small tmpfs, filled up;
//! - `a_full_journal_disk_fails_the_handoff_before_the_drain`: the supervisor's journal on a
//!   small tmpfs, filled up;
//! - `a_thousand_trigger_connections_at_once_are_all_answered`: 1,000 connections to the
//!   trigger socket at once, twice, the second time during a handoff;
//! - `silent_trigger_peers_time_out_and_block_nobody`: connections that send nothing;
//! - `a_journal_truncated_mid_record_is_set_aside_and_the_daemon_adopted`: the journal cut
//!   short while no supervisor runs.
//!
//! The full-disk tests mount a tmpfs, which needs root (CI runs as root). Run without root
//! they skip with one line, or fail with `HANDOFF_REQUIRE_ROOT_TESTS=1`: a namespace of one's
//! own (`unshare -Urm`) would let the test mount, but the supervisor and kvd would have to run
//! inside it too, and that is not what runs in production.
//!
//! Every wait is bounded by [`BOUND`]. Status (and the descriptor count) is polled with a
//! pause of [`POLL_PAUSE`] between two polls; processes are waited for on pidfds.

mod common;
mod kvd_load;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use handoff_engine::sys::lock::{holders, lock_file_path};
use handoff_engine::sys::spawn::{wait_any, Watched};
use handoff_supervisor::server::{IDLE_TIMEOUT, MAX_CLIENTS};
use kvd_load::{
    cmdline, field, free_port, kvd, pid_of, processes_naming, BOUND, CTL, POLL_PAUSE, SUP,
};

/// `ENOSPC`.
const ENOSPC: i32 = 28;
const NO_SPACE: &str = "No space left on device";
/// Connections of a flood.
const FLOOD: usize = 1000;

// ---------------------------------------------------------------------------------------
// 1. A full data disk.

#[test]
fn a_full_data_disk_fails_writes_clearly_and_loses_no_acknowledged_write() {
    if !common::root(
        "a_full_data_disk_fails_writes_clearly_and_loses_no_acknowledged_write",
        "it mounts a tmpfs",
    ) {
        return;
    }
    let mut env = Env::new("data");
    let data = env.mount("data", "4m");
    env.write_config(&data, None);
    env.start();
    let first = pid_of(&env.idle());
    let addr = env.addr();
    let mut acked = Acked::default();
    for i in 0..20 {
        acked.set(addr, &format!("k{i}"), &format!("value {i}"));
    }

    // Fill the filesystem with a file of our own.
    let filled = fill(&data);
    eprintln!("data disk: filler of {filled} bytes");

    // A write that needs space: a clear error, not acknowledged; a small one after it too.
    let big = "x".repeat(8000);
    let answer = kv(addr, &format!("SET big {big}"));
    eprintln!("data disk full: SET (8000 bytes) -> {answer}");
    assert!(
        answer.starts_with("ERR io: ") && answer.contains(NO_SPACE),
        "{answer}"
    );
    let small = kv(addr, "SET small 1");
    eprintln!("data disk full: SET (small) -> {small}");
    assert!(
        small.starts_with("ERR io: ") && small.contains(NO_SPACE),
        "{small}"
    );
    // Reads go on, the same process serves, nothing failed was applied.
    acked.check(addr);
    assert_eq!(kv(addr, "GET big"), "NONE");
    assert_eq!(kv(addr, "GET small"), "NONE");
    assert_eq!(ping(addr), first);
    assert!(
        env.log()
            .contains(&format!("writing seg-1.log failed: {NO_SPACE}")),
        "{}",
        env.log()
    );

    // A handoff on the full disk rolls back; the incumbent serves on.
    let h = env.handoff();
    eprintln!(
        "data disk full: handoff exit {:?}: {}\n  status: {}\n  kvd said:\n{}",
        h.code,
        h.stdout,
        h.status,
        kvd_lines(&h.log)
    );
    assert_eq!(h.code, Some(1), "{h:?}");
    assert_eq!(field(&h.status, "last"), Some("rolled_back"));
    assert_eq!(pid_of(&h.status), first, "the incumbent serves on");
    // The reason names the disk error: the seal's own, or the successor's, which could not
    // create its segment.
    let reason = field(&h.status, "abort_reason").unwrap().to_string();
    let successor_said = h
        .log
        .lines()
        .any(|l| l.contains(": error: creating seg-") && l.contains(NO_SPACE));
    assert!(
        (reason.starts_with("SealFailed") && reason.contains("No%20space"))
            || (reason.starts_with("Successor") && successor_said),
        "abort reason {reason}; log:\n{}",
        h.log
    );
    assert!(
        h.log.contains("reads only: the log cannot be reopened") && h.log.contains(NO_SPACE),
        "{}",
        h.log
    );
    assert_eq!(ping(addr), first);
    acked.check(addr);
    let answer = kv(addr, "SET after-rollback 1");
    assert!(
        answer.starts_with("ERR io: ") && answer.contains(NO_SPACE),
        "{answer}"
    );
    // No crash, no restart: the supervisor never had to recover the daemon.
    let s = env.idle();
    assert_eq!(field(&s, "recoveries"), Some("1"), "{s}");

    // Space again: a handoff commits, with every acknowledged write.
    fs::remove_file(data.join("filler")).unwrap();
    let h = env.handoff();
    eprintln!(
        "data disk freed: handoff exit {:?}: {}",
        h.code,
        kvd_lines(&h.log)
    );
    assert_eq!(h.code, Some(0), "{h:?}");
    let second = pid_of(&h.status);
    assert_ne!(second, first);
    assert_eq!(ping(addr), second);
    acked.check(addr);
    acked.set(addr, "after", "space");
    acked.check(addr);
    assert_eq!(kv(addr, "GET big"), "NONE");
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------
// 2. A full journal disk.

#[test]
fn a_full_journal_disk_fails_the_handoff_before_the_drain() {
    if !common::root(
        "a_full_journal_disk_fails_the_handoff_before_the_drain",
        "it mounts a tmpfs",
    ) {
        return;
    }
    let mut env = Env::new("journal");
    let jdir = env.mount("journal", "1m");
    let journal = jdir.join("handoff.journal");
    let data = env.dir.join("data");
    fs::create_dir_all(&data).unwrap();
    env.write_config(&data, Some(&journal));
    env.start();
    let first = pid_of(&env.idle());
    assert!(journal.exists(), "the recovery wrote the journal");
    let addr = env.addr();
    let mut acked = Acked::default();
    for i in 0..10 {
        acked.set(addr, &format!("k{i}"), &format!("{i}"));
    }

    let filled = fill(&jdir);
    eprintln!("journal disk: filler of {filled} bytes");
    let before = env.log().len();
    let h = env.handoff();
    eprintln!("journal disk full: handoff exit {:?}: {}", h.code, h.stdout);
    assert_eq!(h.code, Some(1), "{h:?}");
    let tmp = format!("journal {}.tmp: {NO_SPACE}", journal.display());
    assert!(
        h.stdout.contains("JournalFailed") && h.stdout.contains(&tmp),
        "{}",
        h.stdout
    );
    assert!(
        field(&h.status, "abort_reason").is_some_and(|r| r.starts_with("JournalFailed")),
        "{}",
        h.status
    );
    assert_eq!(pid_of(&h.status), first);
    // Nothing drained or sealed: the incumbent was never asked. (The successor, started
    // before the journal write, was killed.)
    let during = &h.log[before..];
    let kvd_said = kvd_lines(during);
    assert!(
        !kvd_said.contains("drained") && !kvd_said.contains("sealed"),
        "{kvd_said}"
    );
    assert!(during.contains("drained: false"), "{during}");
    eprintln!("journal disk full: the supervisor said:\n{during}");
    assert_eq!(ping(addr), first);
    acked.set(addr, "while-full", "journal only");
    acked.check(addr);

    fs::remove_file(jdir.join("filler")).unwrap();
    let h = env.handoff();
    assert_eq!(h.code, Some(0), "{h:?}");
    let second = pid_of(&h.status);
    assert_ne!(second, first);
    assert_eq!(ping(addr), second);
    acked.check(addr);
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------
// 3. A thousand trigger connections at once.

#[test]
fn a_thousand_trigger_connections_at_once_are_all_answered() {
    raise_own_nofile(FLOOD as u64 + 200);
    let mut env = Env::new("flood");
    let data = env.dir.join("data");
    fs::create_dir_all(&data).unwrap();
    env.write_config(&data, None);
    // Started with a low soft limit: the supervisor raises it to the hard limit.
    env.start_with_soft_nofile(256);
    let first = pid_of(&env.idle());
    let sup = env.sup_pid();
    let (soft, hard) = nofile_limits(sup);
    eprintln!("flood: the supervisor's RLIMIT_NOFILE is {soft}/{hard} (started with 256)");
    assert_eq!(soft, hard);
    if hard > 256 {
        assert!(
            env.log()
                .contains(&format!("soft limit raised from 256 to {hard}")),
            "{}",
            env.log()
        );
    }
    let baseline = settled_fds(sup);
    eprintln!("flood: the supervisor holds {baseline} descriptors at rest");

    // 1,000 at once, held open, then `status` on every one.
    let conns = connect_all(&env.trigger(), FLOOD);
    // Held: another client still gets in.
    let s = env
        .status()
        .expect("status while 1,000 connections are open");
    assert!(s.starts_with("state=idle "), "{s}");
    let counts = ask_all(conns);
    eprintln!("flood, 1,000 at once: {counts:?}");
    assert_eq!(counts.total(), FLOOD, "{counts:?}");
    assert!(counts.answered >= MAX_CLIENTS - 1, "{counts:?}");
    assert_eq!(counts.other, Vec::<String>::new());
    let after = wait_fds(sup, baseline);
    eprintln!("flood: descriptors back to {after} (baseline {baseline})");

    // 1,000 at once again, from another thread, during a handoff, with kvd traffic.
    let addr = env.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut acked = Acked::default();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                acked.set(addr, &format!("w{i}"), &format!("{i}"));
                i += 1;
            }
            acked
        })
    };
    let trigger = env.trigger();
    let (done_tx, done) = mpsc::channel();
    let flood = thread::spawn(move || {
        let counts = ask_all(connect_all(&trigger, FLOOD));
        let _ = done_tx.send(());
        counts
    });
    // The handoff, through handoffctl; a refusal ("too many clients") is clear, and retried.
    let end = Instant::now() + BOUND;
    let mut refusals = 0;
    let h = loop {
        let h = env.handoff();
        if h.code == Some(4) && h.stdout.contains("\"error: too many clients") {
            refusals += 1;
            assert!(Instant::now() < end, "refused until the bound: {h:?}");
            thread::sleep(POLL_PAUSE);
            continue;
        }
        break h;
    };
    done.recv_timeout(BOUND).expect("the flood ends");
    let counts = flood.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let acked = writer.join().unwrap();
    eprintln!(
        "flood during a handoff: {counts:?}; handoffctl refused {refusals} times, then exit \
         {:?}; {} writes acknowledged meanwhile",
        h.code,
        acked.0.len()
    );
    assert_eq!(h.code, Some(0), "{h:?}");
    assert_eq!(counts.total(), FLOOD, "{counts:?}");
    assert_eq!(counts.other, Vec::<String>::new());
    let second = pid_of(&h.status);
    assert_ne!(second, first);
    assert!(!acked.0.is_empty());
    acked.check(addr);
    assert_eq!(ping(addr), second);
    let after = wait_fds(sup, baseline);
    eprintln!("flood: descriptors back to {after} (baseline {baseline})");
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------
// 4. Peers that connect and send nothing.

#[test]
fn silent_trigger_peers_time_out_and_block_nobody() {
    let mut env = Env::new("silent");
    let data = env.dir.join("data");
    fs::create_dir_all(&data).unwrap();
    env.write_config(&data, None);
    env.start();
    let first = pid_of(&env.idle());
    let sup = env.sup_pid();
    let baseline = settled_fds(sup);

    // More silent peers than the supervisor serves at once.
    let opened = Instant::now();
    let silent = connect_all(&env.trigger(), 2 * MAX_CLIENTS);
    // Others get in: status, and a handoff, which commits.
    let s = env.status().expect("status among silent peers");
    assert!(s.starts_with("state=idle "), "{s}");
    let h = env.handoff();
    assert_eq!(h.code, Some(0), "{h:?}");
    assert_ne!(pid_of(&h.status), first);
    // Every silent peer ends: the early ones make room for later clients (with a line saying
    // so), the others at the idle timeout. None waits longer than that.
    let mut made_room = 0;
    let mut timed_out = 0;
    let mut last_end = Duration::ZERO;
    for mut c in silent {
        c.set_read_timeout(Some(IDLE_TIMEOUT + BOUND)).unwrap();
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a silent peer was not closed: {e}"),
        }
        let got = String::from_utf8_lossy(&got).into_owned();
        if got.is_empty() {
            timed_out += 1;
            last_end = opened.elapsed();
        } else {
            assert_eq!(
                got,
                "error: too many clients: closed the longest idle connection\n"
            );
            made_room += 1;
        }
    }
    eprintln!(
        "silent peers: {} opened, {made_room} closed to make room, {timed_out} timed out \
         (the last {last_end:?} after opening; timeout {IDLE_TIMEOUT:?})",
        2 * MAX_CLIENTS
    );
    assert_eq!(made_room + timed_out, 2 * MAX_CLIENTS);
    assert!(timed_out > 0 && made_room >= MAX_CLIENTS);
    assert!(last_end >= IDLE_TIMEOUT, "closed before the timeout");
    let after = wait_fds(sup, baseline);
    eprintln!("silent peers: descriptors back to {after} (baseline {baseline})");
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------
// 5. A journal truncated mid-record.

#[test]
fn a_journal_truncated_mid_record_is_set_aside_and_the_daemon_adopted() {
    let mut env = Env::new("trunc");
    let data = env.dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let journal = env.dir.join("handoff.journal");
    env.write_config(&data, Some(&journal));
    env.start();
    env.idle();
    let addr = env.addr();
    let mut acked = Acked::default();
    acked.set(addr, "before", "handoff");
    // A handoff, so the journal holds a real record.
    let h = env.handoff();
    assert_eq!(h.code, Some(0), "{h:?}");
    let serving = pid_of(&h.status);
    acked.set(addr, "after", "handoff");
    let good = fs::read(&journal).unwrap();
    env.kill_supervisor();
    acked.set(addr, "without", "supervisor");

    for cut in [1, good.len() / 2, good.len() - 1] {
        fs::write(&journal, &good[..cut]).unwrap();
        // The supervisor starts (under systemd a refusal would only loop): the damaged
        // journal is moved aside with one line, and the daemon that serves is adopted.
        env.start();
        let s = env.idle();
        assert_eq!(pid_of(&s), serving, "adopted, not restarted");
        let log = env.log();
        let said: Vec<&str> = log.lines().filter(|l| l.contains("corrupt")).collect();
        eprintln!("journal cut to {cut} of {} bytes: {said:?}", good.len());
        assert_eq!(said.len(), 1, "{log}");
        let line = said[0];
        assert!(
            line.contains(&journal.display().to_string()) && line.contains("truncated"),
            "{line}"
        );
        // Kept aside, unchanged, where the line says.
        let aside = line
            .split("moved it to ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .unwrap_or_else(|| panic!("no new place in {line:?}"));
        assert_eq!(fs::read(aside).unwrap(), &good[..cut]);
        fs::remove_file(aside).unwrap();
        assert_eq!(ping(addr), serving);
        acked.set(addr, &format!("cut-{cut}"), "served");
        acked.check(addr);
        env.kill_supervisor();
    }

    env.start();
    let s = env.idle();
    assert_eq!(pid_of(&s), serving, "adopted, not restarted");
    let h = env.handoff();
    assert_eq!(h.code, Some(0), "{h:?}");
    assert_eq!(ping(addr), pid_of(&h.status));
    acked.check(addr);
    let st = env.stop().expect("the supervisor stops");
    assert!(st.success(), "{st:?}");
}

// ---------------------------------------------------------------------------------------
// The environment.

static N: AtomicU32 = AtomicU32::new(0);

/// A tmpfs mounted for one test, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "\n\n*** bad_input: cannot mount a tmpfs at {}: {}\n*** These tests fill a small \
             filesystem of their own: run them as root (CI does). ***\n",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("umount {} failed: unmounting lazily", self.0.display());
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

struct Env {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    sup: Option<Child>,
    starts: u32,
    mounts: Vec<Tmpfs>,
}

#[derive(Debug)]
struct Handoff {
    code: Option<i32>,
    stdout: String,
    status: String,
    /// The supervisor's log (with the daemons' lines) after the handoff.
    log: String,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = PathBuf::from(format!(
            "/tmp/hbad-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Env {
            config: dir.join("handoff.toml"),
            dir,
            port: free_port(),
            sup: None,
            starts: 0,
            mounts: Vec::new(),
        }
    }

    /// A tmpfs of `size` at `<dir>/<name>`.
    fn mount(&mut self, name: &str, size: &str) -> PathBuf {
        let at = self.dir.join(name);
        self.mounts.push(Tmpfs::mount(&at, size));
        at
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    fn trigger(&self) -> PathBuf {
        self.dir.join("trig.sock")
    }

    fn write_config(&self, data: &Path, journal: Option<&Path>) {
        let d = self.dir.display();
        let journal =
            journal.map_or_else(String::new, |j| format!("journal = \"{}\"\n", j.display()));
        let text = format!(
            "control_socket = \"{d}/ctl.sock\"\n\
             trigger_socket = \"{d}/trig.sock\"\n\
             {journal}\
             binary = \"{}\"\n\
             args = [\"--data\", \"{}\", \"--socket\", \"{d}/ctl.sock\"]\n\
             drain_grace_secs = 5\n\
             deadline_secs = 20\n\
             \n\
             [[listeners]]\nname = \"kv\"\naddr = \"127.0.0.1:{}\"\n",
            kvd().display(),
            data.display(),
            self.port
        );
        fs::write(&self.config, text).unwrap();
    }

    fn next_log(&mut self) -> File {
        self.starts += 1;
        File::create(self.dir.join(format!("sup-{}.log", self.starts))).unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("sup-{}.log", self.starts))).unwrap_or_default()
    }

    fn start(&mut self) {
        assert!(self.sup.is_none());
        let log = self.next_log();
        let child = Command::new(SUP)
            .arg("--config")
            .arg(&self.config)
            .env("HANDOFF_LOG", "on")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(child);
    }

    /// Start the supervisor with a soft descriptor limit of `soft` (its hard limit stays ours).
    fn start_with_soft_nofile(&mut self, soft: u64) {
        assert!(self.sup.is_none());
        let log = self.next_log();
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("ulimit -Sn {soft} && exec \"$0\" --config \"$1\""))
            .arg(SUP)
            .arg(&self.config)
            .env("HANDOFF_LOG", "on")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(child);
    }

    fn sup_pid(&self) -> u32 {
        self.sup.as_ref().expect("a supervisor runs").id()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(CTL)
            .arg("--socket")
            .arg(self.trigger())
            .args(["--timeout", "30"])
            .args(args)
            .output()
            .unwrap()
    }

    fn status(&self) -> Option<String> {
        let out = self.ctl(&["status"]);
        let s = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| s.trim_end().to_string())
    }

    fn wait_status(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + BOUND;
        let mut last = None;
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; last status {last:?}; log:\n{}",
                self.log()
            );
            thread::sleep(POLL_PAUSE);
        }
    }

    fn idle(&self) -> String {
        self.wait_status("state=idle with a serving daemon", |s| {
            s.starts_with("state=idle ") && field(s, "serving_pid").is_some_and(|p| p != "-")
        })
    }

    fn handoff(&self) -> Handoff {
        let out = self.ctl(&["--json", "handoff"]);
        Handoff {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
            status: self.idle(),
            log: self.log(),
        }
    }

    fn kill_supervisor(&mut self) {
        let mut c = self.sup.take().expect("a supervisor runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM (which stops the daemon too), bounded; its exit status.
    fn stop(&mut self) -> Option<ExitStatus> {
        common::terminate(self.sup.take()?, BOUND)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.sup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Our daemons: every process whose command line names our directory, and whoever
        // holds the data directory's lock.
        let mut pids = processes_naming(&self.dir);
        pids.extend(holders(&lock_file_path(&self.dir.join("data"))).unwrap_or_default());
        pids.sort_unstable();
        pids.dedup();
        let dir = self.dir.to_string_lossy().into_owned();
        for pid in pids {
            if let Ok(w) = Watched::open(pid) {
                if cmdline(pid).contains(&dir) {
                    let _ = w.kill();
                    let _ = wait_any(&[&w], BOUND);
                }
            }
        }
        // Nobody uses the mounts any more.
        self.mounts.clear();
        if thread::panicking() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Write a file `filler` in `dir` until the filesystem is full (`ENOSPC`); its size.
fn fill(dir: &Path) -> u64 {
    let mut f = File::create(dir.join("filler")).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => panic!("write returned 0 before ENOSPC"),
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(ENOSPC) => return total,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

/// kvd's lines in a supervisor log.
fn kvd_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.starts_with("kvd["))
        .map(|l| format!("    {l}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// kvd's clients.

/// One request on a connection of its own; a connection ended before the answer (a
/// handoff) and `ERR retry` are sent again (bounded).
fn try_kv(addr: SocketAddr, request: &str) -> Result<String, String> {
    let end = Instant::now() + BOUND;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer to {request:?} within {BOUND:?}"));
        }
        let s = TcpStream::connect_timeout(&addr, left).map_err(|e| format!("{addr}: {e}"))?;
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let mut r = BufReader::new(s);
        r.get_mut()
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| format!("{request:?}: {e}"))?;
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(_) if line.ends_with('\n') => {
                let answer = line.trim_end().to_string();
                if answer == "ERR retry" {
                    thread::sleep(POLL_PAUSE);
                    continue;
                }
                return Ok(answer);
            }
            Ok(_) => continue,
            Err(e) => return Err(format!("{request:?}: {e}")),
        }
    }
}

fn kv(addr: SocketAddr, request: &str) -> String {
    try_kv(addr, request).unwrap_or_else(|e| panic!("{e}"))
}

fn ping(addr: SocketAddr) -> u32 {
    let answer = kv(addr, "PING");
    answer
        .strip_prefix("PONG ")
        .and_then(|p| p.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {answer:?}"))
}

/// Acknowledged writes.
#[derive(Debug, Default)]
struct Acked(Vec<(String, String)>);

impl Acked {
    fn set(&mut self, addr: SocketAddr, key: &str, value: &str) {
        let answer = kv(addr, &format!("SET {key} {value}"));
        assert!(answer.starts_with("OK "), "SET {key}: {answer}");
        self.0.push((key.to_string(), value.to_string()));
    }

    /// Every acknowledged write reads back.
    fn check(&self, addr: SocketAddr) {
        for (k, v) in &self.0 {
            assert_eq!(kv(addr, &format!("GET {k}")), format!("VAL {v}"), "key {k}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Trigger-socket floods.

/// Open `n` connections to `path` at once (bounded: on a thread of its own).
fn connect_all(path: &Path, n: usize) -> Vec<UnixStream> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    thread::spawn(move || {
        let conns: io::Result<Vec<UnixStream>> =
            (0..n).map(|_| UnixStream::connect(&path)).collect();
        let _ = tx.send(conns);
    });
    rx.recv_timeout(BOUND)
        .expect("connections within the bound")
        .expect("connect")
}

#[derive(Debug, Default)]
struct FloodCounts {
    /// A `status` line.
    answered: usize,
    /// Closed to make room for a newer client.
    made_room: usize,
    /// Refused: too many clients, none idle.
    refused: usize,
    /// Anything else (must stay empty).
    other: Vec<String>,
}

impl FloodCounts {
    fn total(&self) -> usize {
        self.answered + self.made_room + self.refused + self.other.len()
    }
}

/// Send `status` on every connection, then read one line from each; all within [`BOUND`].
fn ask_all(conns: Vec<UnixStream>) -> FloodCounts {
    let end = Instant::now() + BOUND;
    for mut c in &conns {
        // A connection closed to make room fails here (EPIPE); its line is read below.
        let _ = c.write_all(b"status\n");
    }
    let mut counts = FloodCounts::default();
    for c in conns {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no answers within {BOUND:?}: {counts:?}");
        c.set_read_timeout(Some(left)).unwrap();
        let mut line = String::new();
        let got = BufReader::new(&c).read_line(&mut line);
        match (got, line.trim_end()) {
            (Ok(_), l) if l.starts_with("state=") => counts.answered += 1,
            (Ok(_), "error: too many clients: closed the longest idle connection") => {
                counts.made_room += 1;
            }
            (Ok(_), "error: too many clients") => counts.refused += 1,
            (r, l) => counts.other.push(format!("{r:?} {l:?}")),
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------
// Processes and descriptors.

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn fd_list(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some(format!("{:?} -> {}", e.file_name(), target.display()))
        })
        .collect()
}

/// The supervisor's descriptor count once it has not changed for ten polls in a row (the
/// `status` clients of the last poll closed).
fn settled_fds(pid: u32) -> usize {
    let end = Instant::now() + BOUND;
    let (mut last, mut same) = (fd_count(pid), 0);
    while same < 10 {
        assert!(Instant::now() < end, "descriptor count never settled");
        thread::sleep(POLL_PAUSE);
        let now = fd_count(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Wait (bounded) until the supervisor holds `baseline` descriptors again.
fn wait_fds(pid: u32, baseline: usize) -> usize {
    let end = Instant::now() + BOUND;
    loop {
        let n = fd_count(pid);
        if n == baseline {
            return n;
        }
        assert!(
            Instant::now() < end,
            "the supervisor holds {n} descriptors, {baseline} at rest:\n{}",
            fd_list(pid).join("\n")
        );
        thread::sleep(POLL_PAUSE);
    }
}

/// `(soft, hard)` RLIMIT_NOFILE of `pid`, from `/proc/<pid>/limits`.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let w: Vec<&str> = line.split_whitespace().collect();
    (w[3].parse().unwrap(), w[4].parse().unwrap())
}

/// Raise our own soft descriptor limit to the hard one; it must allow `need`.
fn raise_own_nofile(need: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if let Some(hard) = l.maximum {
        assert!(hard >= need, "RLIMIT_NOFILE hard limit {hard} < {need}");
        l.current = Some(hard);
        setrlimit(Resource::Nofile, l).unwrap();
    }
}
