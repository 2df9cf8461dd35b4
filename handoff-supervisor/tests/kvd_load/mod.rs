//! The machinery of the supervisor's end-to-end tests with `kvd` under load, shared by
//! `kvd_under_load.rs` and `crash_matrix.rs`: [`Env`] (a test directory, the reference
//! supervisor, every process started, killed at the end), [`Writers`] (the load), and the
//! `/proc` helpers.
//!
//! Every wait is bounded by [`BOUND`]. Waits on the writers wait for acknowledgements (a
//! condition variable); waits on processes wait on pidfds. Status is polled with a pause of
//! [`POLL_PAUSE`] between two polls: a bounded poll, never a synchronisation by time.

// Each test file uses a part of it.
#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use handoff_engine::sys::lock::{holders, lock_file_path};
use handoff_engine::sys::spawn::{self as hspawn, wait_any, Watched};

pub use crate::common::{alive, copy_executable, field, CTL, SUP};

/// The bound on every single wait.
pub const BOUND: Duration = Duration::from_secs(30);
/// The pause between two status polls of a bounded poll.
pub const POLL_PAUSE: Duration = Duration::from_millis(20);
pub const WRITERS: usize = 8;
/// Acknowledgements every writer must get between two events (handoffs, kills, restarts).
pub const ACKS_PER_ROUND: u64 = 50;
/// Acknowledgements every writer must get while no supervisor runs.
pub const NO_SUPERVISOR_ACKS: u64 = 100;

// ---------------------------------------------------------------------------------------
// The supervisor

/// `target/<profile>/kvd`, built if it is not there yet.
pub fn kvd() -> PathBuf {
    crate::common::workspace_bin("handoff-demo", "kvd")
}

static N: AtomicU32 = AtomicU32::new(0);

/// A test directory, the supervisor, and every process started: killed at the end, even on
/// a panic.
pub struct Env {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub sup: Option<Child>,
    /// Supervisors started so far; the n-th logs to `sup-<n>.log`.
    pub starts: u32,
    /// Every daemon pid seen.
    pub seen: Vec<u32>,
    /// Extra environment of the supervisors [`start`](Env::start) starts.
    pub sup_env: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct Handoff {
    pub code: Option<i32>,
    /// `handoffctl --json`'s answer.
    pub stdout: String,
    pub wall: Duration,
    /// The status once idle again.
    pub status: String,
}

impl Handoff {
    /// The handoff's total, from the status line's phases, in milliseconds.
    pub fn total_ms(&self) -> f64 {
        field(&self.status, "phases")
            .and_then(|p| p.split(',').find_map(|x| x.strip_prefix("total:")))
            .and_then(|t| t.strip_suffix("ms")?.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

impl Env {
    pub fn new(tag: &str) -> Env {
        // Short: the control socket's path must fit in 108 bytes.
        let dir = PathBuf::from(format!(
            "/tmp/hkl-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).unwrap();
        fs::create_dir_all(dir.join("bins")).unwrap();
        let config = dir.join("handoff.toml");
        Env {
            dir,
            config,
            sup: None,
            starts: 0,
            seen: Vec::new(),
            sup_env: Vec::new(),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn trigger(&self) -> PathBuf {
        self.dir.join("trig.sock")
    }

    /// A copy of `binary` in `bins/` (the config's `binary_dir`).
    pub fn copy_of(&self, binary: &Path, name: &str) -> PathBuf {
        let copy = self.dir.join("bins").join(name);
        copy_executable(binary, &copy);
        copy
    }

    pub fn write_config(&self, binary: &Path, port: u16) {
        self.write_config_with(binary, port, "drain_grace_secs = 5\ndeadline_secs = 20\n");
    }

    /// The config, with `extra` (TOML lines: the limits, `env`) instead of the default limits.
    pub fn write_config_with(&self, binary: &Path, port: u16, extra: &str) {
        let d = self.dir.display();
        let text = format!(
            "control_socket = \"{d}/ctl.sock\"\n\
             trigger_socket = \"{d}/trig.sock\"\n\
             binary = \"{}\"\n\
             args = [\"--data\", \"{d}/data\", \"--socket\", \"{d}/ctl.sock\"]\n\
             {extra}\
             binary_dir = \"{d}/bins\"\n\
             \n\
             [[listeners]]\nname = \"kv\"\naddr = \"127.0.0.1:{port}\"\n",
            binary.display()
        );
        fs::write(&self.config, text).unwrap();
    }

    pub fn next_log(&mut self) -> PathBuf {
        self.starts += 1;
        let log = self.dir.join(format!("sup-{}.log", self.starts));
        fs::File::create(&log).unwrap();
        log
    }

    /// The log of the supervisor started last (and of the daemons it started).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("sup-{}.log", self.starts))).unwrap_or_default()
    }

    /// The sizes of the logs so far.
    pub fn log_sizes(&self) -> Vec<u64> {
        (1..=self.starts)
            .map(|n| fs::metadata(self.dir.join(format!("sup-{n}.log"))).map_or(0, |m| m.len()))
            .collect()
    }

    /// What the logs of the supervisors started so far gained since `sizes`.
    pub fn log_growth(&self, sizes: &[u64]) -> String {
        let mut out = String::new();
        for (i, &from) in sizes.iter().enumerate() {
            let text = fs::read(self.dir.join(format!("sup-{}.log", i + 1))).unwrap_or_default();
            let new = text.get(from as usize..).unwrap_or_default();
            for line in String::from_utf8_lossy(new).lines() {
                out.push_str(&format!("  sup-{}.log: {line}\n", i + 1));
            }
        }
        out
    }

    /// Start the supervisor the ordinary way: it binds the listener.
    pub fn start(&mut self) {
        assert!(self.sup.is_none());
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.next_log())
            .unwrap();
        let child = Command::new(SUP)
            .arg("--config")
            .arg(&self.config)
            // The tests read the library's log lines: never let the caller's setting hide them.
            .env("HANDOFF_LOG", "on")
            .envs(self.sup_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sup = Some(child);
    }

    /// Start the supervisor socket-activated: `listener` at fd 3, `LISTEN_FDS=1`,
    /// `LISTEN_FDNAMES=kv`, `LISTEN_PID` its pid.
    ///
    /// `spawn_with_listeners` gives stdio `/dev/null` or ours; for a log of its own, the
    /// supervisor is run through `sh -c 'exec "$0" … 2>>log'`. `exec` keeps the pid, so
    /// `LISTEN_PID` still names the supervisor (the test checks that it accepted the
    /// listener), as systemd would give it the journal.
    pub fn start_socket_activated(&mut self, listener: &TcpListener) {
        assert!(self.sup.is_none());
        let log = self.next_log();
        let cmd = hspawn::Command::new("/bin/sh")
            .arg("-c")
            .arg("exec \"$0\" --config \"$1\" 2>>\"$2\"")
            .arg(SUP)
            .arg(&self.config)
            .arg(&log)
            .env("HANDOFF_LOG", "on")
            .inherit_stdio(false);
        let child = hspawn::spawn_with_listeners(&cmd, &[("kv", listener.as_fd())]).unwrap();
        self.sup = Some(child);
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(CTL)
            .arg("--socket")
            .arg(self.trigger())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn track(&mut self, pid: u32) {
        if !self.seen.contains(&pid) {
            self.seen.push(pid);
        }
    }

    pub fn status(&mut self) -> Option<String> {
        let out = self.ctl(&["status"]);
        let s = String::from_utf8(out.stdout).ok()?;
        if let Some(p) = field(&s, "serving_pid").and_then(|p| p.parse().ok()) {
            self.track(p);
        }
        out.status.success().then(|| s.trim_end().to_string())
    }

    /// Poll `status` until it satisfies `f`, within [`BOUND`] ([`POLL_PAUSE`] between polls).
    pub fn wait_status(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
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

    pub fn idle(&mut self) -> String {
        self.wait_status("state=idle with a serving daemon", |s| {
            s.starts_with("state=idle ") && field(s, "serving_pid").is_some_and(|p| p != "-")
        })
    }

    /// `handoffctl --json handoff [target]`, then the status once idle.
    pub fn handoff(&mut self, target: Option<&Path>) -> Handoff {
        let mut args = vec!["--json", "--timeout", "30", "handoff"];
        let t = target.map(|t| t.to_str().unwrap().to_string());
        if let Some(t) = &t {
            args.push(t);
        }
        let start = Instant::now();
        let out = self.ctl(&args);
        let wall = start.elapsed();
        let status = self.idle();
        Handoff {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).trim_end().to_string(),
            wall,
            status,
        }
    }

    /// SIGKILL the supervisor and reap it.
    pub fn kill_supervisor(&mut self) {
        let mut c = self.sup.take().expect("a supervisor runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM the supervisor and wait for its exit (bounded); SIGKILL if it does not go.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        crate::common::terminate(self.sup.take()?, BOUND)
    }
}

impl Drop for Env {
    /// Kill the supervisor, every process holding the data directory's lock, every daemon
    /// seen, and any other process whose command line names this test's directory (a
    /// successor of a killed supervisor, a retired daemon still waiting for its clients).
    fn drop(&mut self) {
        if let Some(mut c) = self.sup.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut pids = holders(&lock_file_path(&self.data())).unwrap_or_default();
        pids.extend(self.seen.iter().copied());
        pids.extend(processes_naming(&self.dir));
        pids.sort_unstable();
        pids.dedup();
        let dir = self.dir.to_string_lossy().into_owned();
        for pid in pids {
            if let Ok(w) = Watched::open(pid) {
                // Only ours: its command line names our directory (a reused pid is left).
                if cmdline(pid).contains(&dir) {
                    let _ = w.kill();
                    let _ = wait_any(&[&w], BOUND);
                }
            }
        }
        if thread::panicking() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One connection to the trigger socket, asked `status` again and again.
pub struct StatusConn(BufReader<UnixStream>);

impl StatusConn {
    pub fn connect(path: &Path) -> StatusConn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        StatusConn(BufReader::new(s))
    }

    pub fn query(&mut self) -> String {
        self.0.get_mut().write_all(b"status\n").unwrap();
        let mut line = String::new();
        self.0.read_line(&mut line).unwrap();
        assert!(line.starts_with("state="), "{line:?}");
        line.trim_end().to_string()
    }
}

pub fn pid_of(status: &str) -> u32 {
    field(status, "serving_pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no serving pid in {status}"))
}

// ---------------------------------------------------------------------------------------
// Processes and sockets, from /proc

pub fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .into_owned()
}

pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose command line names `dir`.
pub fn processes_naming(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy();
    pids()
        .into_iter()
        .filter(|&p| alive(p) && cmdline(p).contains(&*dir))
        .collect()
}

/// The inodes of the sockets process `pid` has open.
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| {
                let target = fs::read_link(e.ok()?.path()).ok()?;
                target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// The inode of the TCP socket listening on 127.0.0.1:`port`, from `/proc/net/tcp`.
pub fn listening_inode(port: u16) -> Option<u64> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.len() > 9 && w[1] == local && w[3] == "0A").then(|| w[9].parse().ok())?
    })
}

/// A port nobody uses now, below the ephemeral range: no client's `connect` takes it as its
/// source port before the supervisor binds it (which would make that bind fail).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = 10_000.min(low / 2);
    let span = low.saturating_sub(base).max(1);
    let start = u64::from(std::process::id()) * 7919;
    for _ in 0..span {
        let n = u64::from(NEXT.fetch_add(1, Ordering::SeqCst));
        let port = base + ((start + n * 101) % u64::from(span)) as u32;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().unwrap().port();
        }
    }
    panic!("no free port in {base}..{low}");
}

// ---------------------------------------------------------------------------------------
// The load

/// How requests and connections ended, over all writers.
#[derive(Debug, Default)]
pub struct Counts {
    pub acks: AtomicU64,
    /// `ERR retry` answers.
    pub retries: AtomicU64,
    /// A clean end of stream before the answer.
    pub eofs: AtomicU64,
    pub connects: AtomicU64,
    pub refused: AtomicU64,
    pub resets: AtomicU64,
}

/// A client that reconnects when its connection ends before an answer (the request was then
/// not executed) and counts how connections ended. `per_request`: a new connection for every
/// request, closed after the answer.
pub struct Client {
    pub addr: SocketAddr,
    pub per_request: bool,
    pub conn: Option<BufReader<TcpStream>>,
    pub counts: Arc<Counts>,
    /// Set when the test ends early (a panic): give up at once.
    pub abort: Arc<AtomicBool>,
}

impl Client {
    pub fn new(addr: SocketAddr, per_request: bool, counts: Arc<Counts>) -> Client {
        Client {
            addr,
            per_request,
            conn: None,
            counts,
            abort: Arc::default(),
        }
    }

    /// The answer to `request`, before `deadline`.
    pub fn request(&mut self, request: &str, deadline: Instant) -> Result<String, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer to {request:?} within {BOUND:?}"));
            }
            if self.abort.load(Ordering::SeqCst) {
                return Err("aborted".into());
            }
            if self.conn.is_none() {
                match TcpStream::connect_timeout(&self.addr, left) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(|e| e.to_string())?;
                        self.counts.connects.fetch_add(1, Ordering::SeqCst);
                        self.conn = Some(BufReader::new(s));
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        self.counts.refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Err(e) => return Err(format!("connecting to {}: {e}", self.addr)),
                }
            }
            let conn = self.conn.as_mut().unwrap();
            match round_trip(conn, request, left) {
                Ok(answer) => {
                    if self.per_request {
                        self.conn = None;
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    self.conn = None;
                    match e.kind() {
                        ErrorKind::UnexpectedEof => &self.counts.eofs,
                        ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe => &self.counts.resets,
                        _ => return Err(format!("{request:?}: {e}")),
                    }
                    .fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

pub fn round_trip(
    conn: &mut BufReader<TcpStream>,
    request: &str,
    timeout: Duration,
) -> io::Result<String> {
    conn.get_ref().set_read_timeout(Some(timeout))?;
    // One write per request.
    conn.get_mut()
        .write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    match line.strip_suffix('\n') {
        Some(answer) => Ok(answer.to_string()),
        None => Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "closed before an answer",
        )),
    }
}

/// `PONG <pid> <build>` on a new connection.
pub fn ping(addr: SocketAddr) -> (u32, String) {
    let answer = Client::new(addr, true, Arc::default())
        .request("PING", Instant::now() + BOUND)
        .unwrap();
    let mut words = answer.split(' ');
    assert_eq!(words.next(), Some("PONG"), "{answer}");
    let pid = words.next().unwrap().parse().unwrap();
    (pid, words.next().unwrap().to_string())
}

/// Acknowledgements per writer, and the first failure of any.
#[derive(Debug, Default)]
pub struct Progress {
    pub acks: Vec<u64>,
    pub failure: Option<String>,
}

#[derive(Debug, Default)]
pub struct Shared {
    /// Stop after the write in progress.
    pub stop: AtomicBool,
    /// Stop now (the test ends early).
    pub abort: Arc<AtomicBool>,
    pub progress: Mutex<Progress>,
    pub changed: Condvar,
    /// The test's steps, when they began (since the writers started), for the report.
    pub events: Mutex<Vec<(Duration, String)>>,
}

/// What one writer did.
#[derive(Debug, Default)]
pub struct WriterLog {
    /// `(key, value, revision)`.
    pub acked: Vec<(String, String, u64)>,
    /// When each acknowledgement came, since the start.
    pub ack_times: Vec<Duration>,
    /// The longest time from a write's first attempt to its acknowledgement.
    pub max_latency: Duration,
}

/// [`WRITERS`] threads writing `SET w<t>-<i> <value>` without pause; the even ones on a
/// long-lived connection, the odd ones on a connection per request.
pub struct Writers {
    pub shared: Arc<Shared>,
    pub counts: Arc<Counts>,
    pub threads: Vec<thread::JoinHandle<WriterLog>>,
    pub started: Instant,
}

impl Writers {
    pub fn start(addr: SocketAddr) -> Writers {
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                acks: vec![0; WRITERS],
                failure: None,
            }),
            ..Shared::default()
        });
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let threads = (0..WRITERS)
            .map(|w| {
                let shared = Arc::clone(&shared);
                let mut client = Client::new(addr, w % 2 == 1, Arc::clone(&counts));
                client.abort = Arc::clone(&shared.abort);
                thread::spawn(move || {
                    let mut log = WriterLog::default();
                    if let Err(e) = write_on(w, client, &shared, started, &mut log) {
                        let mut p = shared.progress.lock().unwrap();
                        p.failure.get_or_insert(format!("writer {w}: {e}"));
                        shared.changed.notify_all();
                    }
                    log
                })
            })
            .collect();
        Writers {
            shared,
            counts,
            threads,
            started,
        }
    }

    /// Wait until every writer got `n` more acknowledgements, within [`BOUND`].
    pub fn wait_for_each(&self, n: u64) {
        let deadline = Instant::now() + BOUND;
        let mut p = self.shared.progress.lock().unwrap();
        let target: Vec<u64> = p.acks.iter().map(|a| a + n).collect();
        loop {
            if let Some(f) = &p.failure {
                panic!("{f}");
            }
            if p.acks.iter().zip(&target).all(|(a, t)| a >= t) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "writers stalled: {:?}, want {target:?}; {:?}",
                p.acks,
                self.counts
            );
            p = self.shared.changed.wait_timeout(p, left).unwrap().0;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.acks.load(Ordering::SeqCst)
    }

    /// Note a step of the test, for the report.
    pub fn mark(&self, what: &str) {
        let at = self.started.elapsed();
        self.shared
            .events
            .lock()
            .unwrap()
            .push((at, what.to_string()));
    }

    pub fn stop(mut self) -> Written {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Each request is bounded by BOUND, so the joins are too.
        let logs: Vec<WriterLog> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        if let Some(f) = &self.shared.progress.lock().unwrap().failure {
            panic!("{f}");
        }
        let events = std::mem::take(&mut *self.shared.events.lock().unwrap());
        Written {
            logs,
            counts: Arc::clone(&self.counts),
            elapsed: self.started.elapsed(),
            events,
        }
    }
}

impl Drop for Writers {
    /// A test that panics leaves no writer running (spinning on a refused connection).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.abort.store(true, Ordering::SeqCst);
    }
}

pub fn write_on(
    w: usize,
    mut client: Client,
    shared: &Shared,
    started: Instant,
    log: &mut WriterLog,
) -> Result<(), String> {
    let mut last = 0;
    for i in 0.. {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (key, value) = (format!("w{w}-{i}"), format!("value {w} {i}"));
        let first = Instant::now();
        let deadline = first + BOUND;
        let revision = loop {
            let answer = client.request(&format!("SET {key} {value}"), deadline)?;
            if answer == "ERR retry" {
                client.counts.retries.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            match answer.strip_prefix("OK ").map(str::parse::<u64>) {
                Some(Ok(rev)) => break rev,
                _ => return Err(format!("SET {key}: {answer}")),
            }
        };
        let now = Instant::now();
        if revision <= last {
            return Err(format!("revision {revision} after {last}"));
        }
        last = revision;
        log.max_latency = log.max_latency.max(now - first);
        log.ack_times.push(now - started);
        log.acked.push((key, value, revision));
        client.counts.acks.fetch_add(1, Ordering::SeqCst);
        shared.progress.lock().unwrap().acks[w] += 1;
        shared.changed.notify_all();
    }
    Ok(())
}

/// What the writers got acknowledged.
pub struct Written {
    pub logs: Vec<WriterLog>,
    pub counts: Arc<Counts>,
    pub elapsed: Duration,
    pub events: Vec<(Duration, String)>,
}

impl Written {
    pub fn acked(&self) -> impl Iterator<Item = &(String, String, u64)> {
        self.logs.iter().flat_map(|l| l.acked.iter())
    }

    /// Print the figures: acks, retries, ends of stream, handoff totals, stalls.
    pub fn report(&self, name: &str, handoff_ms: &[f64]) {
        let c = &self.counts;
        let mut times: Vec<Duration> = self
            .logs
            .iter()
            .flat_map(|l| l.ack_times.iter().copied())
            .collect();
        times.sort_unstable();
        let (gap, gap_at) = times
            .windows(2)
            .map(|w| (w[1] - w[0], w[0]))
            .max()
            .unwrap_or_default();
        // The step the longest gap began in.
        let step = self
            .events
            .iter()
            .rev()
            .find(|(at, _)| *at <= gap_at)
            .map_or("the start", |(_, what)| what.as_str());
        let steps: Vec<String> = self
            .events
            .iter()
            .map(|(at, what)| format!("{:.0}ms {what}", at.as_secs_f64() * 1000.0))
            .collect();
        let latency = self.logs.iter().map(|l| l.max_latency).max();
        let per: Vec<usize> = self.logs.iter().map(|l| l.acked.len()).collect();
        eprintln!(
            "FIGURES {name}: {} acks in {:.1?} ({per:?}), {} ERR retry, {} clean closes, {} \
             connections, {} refused, {} reset; handoff totals (ms) {handoff_ms:.1?}; longest \
             gap between two acks {gap:.1?} at {gap_at:.1?} (during: {step}); longest write \
             {latency:.1?}\n  steps: {}",
            c.acks.load(Ordering::SeqCst),
            self.elapsed,
            c.retries.load(Ordering::SeqCst),
            c.eofs.load(Ordering::SeqCst),
            c.connects.load(Ordering::SeqCst),
            c.refused.load(Ordering::SeqCst),
            c.resets.load(Ordering::SeqCst),
            steps.join(", "),
        );
    }

    /// No connection refused or reset, unique revisions, and every write reads back.
    pub fn check(&self, addr: SocketAddr) {
        let c = &self.counts;
        assert_eq!(c.refused.load(Ordering::SeqCst), 0, "connections refused");
        assert_eq!(c.resets.load(Ordering::SeqCst), 0, "connections reset");
        self.check_reads(addr);
    }

    /// Unique revisions, and every acknowledged write reads back.
    pub fn check_reads(&self, addr: SocketAddr) {
        let mut revisions: Vec<u64> = self.acked().map(|a| a.2).collect();
        let n = revisions.len();
        assert!(n as u64 >= WRITERS as u64 * ACKS_PER_ROUND);
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), n, "a revision given twice");
        // Every (key, value) reads back, GETs pipelined 200 at a time.
        let s = TcpStream::connect_timeout(&addr, BOUND).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        let mut out = &s;
        let mut lines = BufReader::new(&s);
        let acked: Vec<&(String, String, u64)> = self.acked().collect();
        for chunk in acked.chunks(200) {
            let requests: String = chunk.iter().map(|(k, _, _)| format!("GET {k}\n")).collect();
            out.write_all(requests.as_bytes()).unwrap();
            for (key, value, rev) in chunk {
                let mut line = String::new();
                lines.read_line(&mut line).unwrap();
                assert_eq!(
                    line,
                    format!("VAL {value}\n"),
                    "acknowledged write of {key} (revision {rev}) lost"
                );
            }
        }
    }
}
