//! `kvd` end to end, under the library's embedded supervisor: 8 writers write unique keys
//! without pause through 5 handoffs (one of them to a broken build, which rolls back), then the
//! serving daemon is killed and started cold. Every acknowledged write reads back, no
//! connection is refused or reset.
//!
//! Every wait is bounded by [`BOUND`] and waits for an event (an answer, an acknowledgement
//! count, a process exit), never for time to pass.

use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use handoff::supervisor::{HandoffOutcome, SpawnSpec, Supervisor};
use handoff::AbortReason;

/// The bound on every single wait.
const BOUND: Duration = Duration::from_secs(30);
const WRITERS: usize = 8;
/// Acknowledgements every writer must get from each daemon before the next handoff.
const ACKS_PER_ROUND: u64 = 20;

#[test]
fn writers_lose_nothing_through_five_handoffs_one_rolled_back() {
    let t = Fixture::new();
    let kvd = PathBuf::from(env!("CARGO_BIN_EXE_kvd"));
    let v2 = t.copy_of(&kvd, "kvd-v2");
    let broken = t.copy_of(&kvd, "kvd-broken");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sup = Supervisor::new(&t.socket())
        .unwrap()
        .with_listener_fd("kv", &listener)
        .with_cold_start(t.spec(&kvd));
    let mut serving = sup.resume_from_journal().unwrap().serving;
    t.track(serving);
    assert_eq!(ping(addr), (serving, "kvd".to_string()));

    let writers = Writers::start(addr);
    let rounds: [(&Path, &str, bool); 5] = [
        (&kvd, "kvd", true),
        (&v2, "kvd-v2", true),
        (&broken, "kvd-broken", false),
        (&kvd, "kvd", true),
        (&v2, "kvd-v2", true),
    ];
    let mut children = Vec::new();
    for (round, (binary, build, commits)) in rounds.into_iter().enumerate() {
        writers.wait_for_each(ACKS_PER_ROUND);
        let before = serving;
        let outcome: HandoffOutcome = sup.perform_handoff(t.spec(binary)).unwrap();
        eprintln!(
            "round {round}: {build}: committed {} in {:?}, acks so far {}",
            outcome.committed,
            outcome.times,
            writers.total()
        );
        assert_eq!(outcome.committed, commits, "round {round}: {outcome:?}");
        serving = outcome.serving.expect("somebody serves");
        t.track(serving);
        if commits {
            assert_ne!(serving, before);
            assert_eq!(ping(addr), (serving, build.to_string()));
            children.extend(outcome.child);
        } else {
            assert_eq!(serving, before, "the incumbent serves on");
            assert!(
                matches!(
                    outcome.abort_reason,
                    Some(AbortReason::SuccessorExited | AbortReason::SuccessorDisconnected)
                ),
                "{:?}",
                outcome.abort_reason
            );
            let status = outcome.successor_status.expect("the broken build exited");
            assert_eq!(status.code(), Some(1), "{status}");
            assert_eq!(ping(addr).0, before);
        }
    }
    // The last daemon takes writes too.
    writers.wait_for_each(ACKS_PER_ROUND);
    let written = writers.stop();
    let counts = &written.counts;
    eprintln!(
        "{} acknowledged writes; {} ERR retry, {} clean ends of stream before an answer, \
         {} reconnects, {} refused, {} reset",
        written.acked.len(),
        counts.retries.load(Ordering::SeqCst),
        counts.eofs.load(Ordering::SeqCst),
        counts.reconnects.load(Ordering::SeqCst),
        counts.refused.load(Ordering::SeqCst),
        counts.resets.load(Ordering::SeqCst),
    );
    assert_eq!(
        counts.refused.load(Ordering::SeqCst),
        0,
        "connections refused"
    );
    assert_eq!(counts.resets.load(Ordering::SeqCst), 0, "connections reset");

    // Revisions: unique, and increasing for each writer.
    let mut revisions: Vec<u64> = written.acked.iter().map(|a| a.2).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        written.acked.len(),
        "a revision given twice"
    );
    check_all(addr, &written.acked);

    // The retired daemons exited by themselves (status 0).
    let last = children.pop().expect("the last successor");
    for child in &mut children {
        assert!(wait_exit(child).success(), "retired daemon {}", child.id());
    }

    // Crash: the serving daemon is killed (its segment is not sealed); the supervisor starts
    // kvd cold, which recovers the log, and everything acknowledged is there.
    let mut last = last;
    assert_eq!(last.id(), serving);
    t.kill(serving);
    assert!(!wait_exit(&mut last).success());
    let recovered = sup.resume_from_journal().unwrap().serving;
    t.track(recovered);
    assert_ne!(recovered, serving);
    assert_eq!(ping(addr), (recovered, "kvd".to_string()));
    check_all(addr, &written.acked);
    let mut c = Client::new(addr, Arc::default());
    let after = c.request("SET after-crash yes");
    let rev: u64 = after.strip_prefix("OK ").unwrap().parse().unwrap();
    assert_eq!(rev, *revisions.last().unwrap() + 1, "the revisions go on");
    drop(listener);
}

/// `PONG <pid> <build>` on a new connection.
fn ping(addr: SocketAddr) -> (u32, String) {
    let answer = Client::new(addr, Arc::default()).request("PING");
    let mut words = answer.split(' ');
    assert_eq!(words.next(), Some("PONG"), "{answer}");
    let pid = words.next().unwrap().parse().unwrap();
    (pid, words.next().unwrap().to_string())
}

/// Every `(key, value)` reads back (requests pipelined, 200 at a time).
fn check_all(addr: SocketAddr, acked: &[(String, String, u64)]) {
    let s = TcpStream::connect_timeout(&addr, BOUND).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    let mut out = &s;
    let mut lines = BufReader::new(&s);
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

/// The exit status of `child`, within [`BOUND`].
fn wait_exit(child: &mut Child) -> ExitStatus {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(BOUND) {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("daemon {pid} did not exit within {BOUND:?}"),
        }
    })
}

// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Counts {
    /// `ERR retry` answers.
    retries: AtomicU64,
    /// A clean end of stream before the answer.
    eofs: AtomicU64,
    reconnects: AtomicU64,
    refused: AtomicU64,
    resets: AtomicU64,
}

/// A client that reconnects when its connection ends before an answer (the request was then
/// not executed) and counts how connections ended.
struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    counts: Arc<Counts>,
}

impl Client {
    fn new(addr: SocketAddr, counts: Arc<Counts>) -> Client {
        Client {
            addr,
            conn: None,
            counts,
        }
    }

    /// The answer to `request`, within [`BOUND`].
    fn request(&mut self, request: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer to {request:?} within {BOUND:?}");
            if self.conn.is_none() {
                match TcpStream::connect_timeout(&self.addr, left) {
                    Ok(s) => {
                        s.set_nodelay(true).unwrap();
                        self.conn = Some(BufReader::new(s));
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        self.counts.refused.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Err(e) => panic!("connecting to {}: {e}", self.addr),
                }
            }
            let conn = self.conn.as_mut().unwrap();
            match round_trip(conn, request, left) {
                Ok(answer) => return answer,
                Err(e) => {
                    match e.kind() {
                        ErrorKind::UnexpectedEof => &self.counts.eofs,
                        ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe => &self.counts.resets,
                        _ => panic!("{request:?}: {e}"),
                    }
                    .fetch_add(1, Ordering::SeqCst);
                    self.conn = None;
                    self.counts.reconnects.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

fn round_trip(
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

/// What the writers got acknowledged: `(key, value, revision)`.
struct Written {
    acked: Vec<(String, String, u64)>,
    counts: Arc<Counts>,
}

/// [`WRITERS`] threads writing `SET w<t>-<i> <value>` without pause.
struct Writers {
    stop: Arc<AtomicBool>,
    /// Acknowledgements per writer, and its condition variable.
    acks: Arc<(Mutex<Vec<u64>>, Condvar)>,
    counts: Arc<Counts>,
    threads: Vec<thread::JoinHandle<Vec<(String, String, u64)>>>,
}

impl Writers {
    fn start(addr: SocketAddr) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new((Mutex::new(vec![0; WRITERS]), Condvar::new()));
        let counts = Arc::new(Counts::default());
        let threads = (0..WRITERS)
            .map(|w| {
                let (stop, acks) = (Arc::clone(&stop), Arc::clone(&acks));
                let mut client = Client::new(addr, Arc::clone(&counts));
                thread::spawn(move || {
                    let mut written = Vec::new();
                    let mut last = 0;
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let (key, value) = (format!("w{w}-{i}"), format!("value {w} {i}"));
                        let revision = loop {
                            let answer = client.request(&format!("SET {key} {value}"));
                            if answer == "ERR retry" {
                                client.counts.retries.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                            match answer.strip_prefix("OK ").map(str::parse::<u64>) {
                                Some(Ok(rev)) => break rev,
                                _ => panic!("SET {key}: {answer}"),
                            }
                        };
                        assert!(revision > last, "writer {w}: {revision} after {last}");
                        last = revision;
                        written.push((key, value, revision));
                        acks.0.lock().unwrap()[w] += 1;
                        acks.1.notify_all();
                    }
                    written
                })
            })
            .collect();
        Writers {
            stop,
            acks,
            counts,
            threads,
        }
    }

    /// Wait until every writer got `n` more acknowledgements, within [`BOUND`].
    fn wait_for_each(&self, n: u64) {
        let (lock, cv) = &*self.acks;
        let deadline = Instant::now() + BOUND;
        let mut acks = lock.lock().unwrap();
        let target: Vec<u64> = acks.iter().map(|a| a + n).collect();
        while acks.iter().zip(&target).any(|(a, t)| a < t) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "writers stalled: {acks:?}, want {target:?}"
            );
            acks = cv.wait_timeout(acks, left).unwrap().0;
        }
    }

    fn total(&self) -> u64 {
        self.acks.0.lock().unwrap().iter().sum()
    }

    fn stop(self) -> Written {
        self.stop.store(true, Ordering::SeqCst);
        // Each request is bounded by BOUND, so the joins are too.
        let acked = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        Written {
            acked,
            counts: self.counts,
        }
    }
}

// ---------------------------------------------------------------------------------------

/// A temporary directory, and every daemon started, killed at the end.
struct Fixture {
    dir: PathBuf,
    daemons: Mutex<Vec<u32>>,
}

impl Fixture {
    fn new() -> Fixture {
        // Short: the control socket's path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!("kvd-e2e-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Fixture {
            dir,
            daemons: Mutex::new(Vec::new()),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("kvd.sock")
    }

    fn spec(&self, binary: &Path) -> SpawnSpec {
        SpawnSpec {
            binary: binary.to_path_buf(),
            args: vec![
                "--data".into(),
                self.dir.join("data").into(),
                "--socket".into(),
                self.socket().into(),
            ],
            drain_grace: Duration::from_secs(10),
            deadline: Duration::from_secs(20),
            ..Default::default()
        }
    }

    /// A copy of `binary` named `name`.
    fn copy_of(&self, binary: &Path, name: &str) -> PathBuf {
        let copy = self.dir.join(name);
        copy_executable(binary, &copy);
        copy
    }

    fn track(&self, pid: u32) {
        self.daemons.lock().unwrap().push(pid);
    }

    /// SIGKILL `pid` if it is still one of our daemons (not a zombie, not a reused pid).
    fn kill(&self, pid: u32) {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&*self.dir.to_string_lossy()) {
            return;
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for &pid in self.daemons.lock().unwrap().iter() {
            self.kill(pid);
        }
        if thread::panicking() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Copy an executable through `cp`, a process of its own: had this (multi-threaded) test
/// process written the copy, a child forked meanwhile by another test could still hold the
/// descriptor open for writing when the copy is executed (ETXTBSY).
fn copy_executable(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
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
