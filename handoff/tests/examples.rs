//! The two examples, end to end: `embedded_supervisor` starts `my_daemon` cold and hands it
//! off to a new `my_daemon` while clients write; a second supervisor process takes the
//! listener back from the daemon and hands off again. No write acknowledged before, during or
//! after a handoff is lost, and no request goes unanswered.
//!
//! The test runs the example executables in `target/<profile>/examples/`, which `cargo test`
//! builds when it tests this package (`cargo test -p handoff`, `cargo test --workspace`). A
//! run limited to this target (`cargo test -p handoff --test examples`) does not build
//! them: run `cargo build -p handoff --examples` first.
//!
//! Every wait is bounded by [`WAIT`]; the test waits for events (a line printed, an answer, a
//! process exit), never for time to pass.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The bound on every single wait: a line from the supervisor, an answer, an exit.
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn supervisor_starts_my_daemon_and_hands_it_off_with_no_lost_write() {
    let t = Fixture::new();

    // Round 1: one supervisor binds the listener, starts my_daemon cold, and hands off when
    // told to (`--pause`).
    let mut sup = t.supervisor(&["--pause"], &t.my_daemon(), "127.0.0.1:0");
    let addr: SocketAddr = sup.expect("listening on ").parse().unwrap();
    let cold: u32 = sup.expect("serving: pid ").parse().unwrap();
    t.track(cold);
    sup.expect("press Enter to hand off");

    let mut client = Client::new(addr);
    assert_eq!(client.ask("PID"), format!("PID {cold}"));
    for i in 0..10 {
        let answer = client.ask(&format!("SET before{i} value {i}"));
        assert!(answer.starts_with("OK "), "SET before{i}: {answer}");
    }
    assert_eq!(client.ask("GET before3"), "VALUE value 3");
    assert_eq!(client.ask("GET nothing"), "NONE");
    assert_eq!(client.reconnects, 0);

    // A second client writes without pause through the handoff.
    let writer = Writer::start(addr);
    writer.wait_for_acks(5);

    sup.send_line();
    let outcome = sup.expect_one_of(&["swap complete; new pid ", "aborted: "]);
    let new: u32 = match outcome.strip_prefix("swap complete; new pid ") {
        Some(pid) => pid.parse().unwrap(),
        None => panic!("the handoff did not commit: {outcome}"),
    };
    t.track(new);
    assert_ne!(new, cold);
    assert!(sup.wait_exit().success(), "supervisor exit status");

    // The first client's connection was idle during the handoff: the draining daemon closed
    // it between two requests (a connection belongs to the process that accepted it, which
    // has exited). The client sees the close, reconnects once, and the successor answers.
    assert_eq!(client.ask("GET before3"), "VALUE value 3");
    assert_eq!(
        client.reconnects, 1,
        "the pre-handoff connection closes once"
    );
    assert_eq!(client.ask("PID"), format!("PID {new}"));

    // Let the successor acknowledge some writes too, then check every acknowledged one.
    writer.forget_acks();
    writer.wait_for_acks(5);
    let (written, writer_reconnects) = writer.stop();
    assert!(
        writer_reconnects >= 1,
        "the writer's connection was served by the old process, so it was closed"
    );
    client.check_all(&written);
    for i in 0..10 {
        assert_eq!(
            client.ask(&format!("GET before{i}")),
            format!("VALUE value {i}")
        );
    }

    // Round 2: a new supervisor finds the address in use, takes the listener back from the
    // serving daemon, and hands off again.
    let mut sup = t.supervisor(&[], &t.my_daemon(), &addr.to_string());
    sup.expect(&format!("{addr} is in use"));
    assert_eq!(sup.expect("serving: pid "), new.to_string());
    let third: u32 = sup.expect("swap complete; new pid ").parse().unwrap();
    t.track(third);
    assert!(sup.wait_exit().success(), "supervisor exit status");

    assert_eq!(client.ask("PID"), format!("PID {third}"));
    client.check_all(&written);
    assert!(client.ask("SET after").starts_with("ERR usage"));
    assert!(client.ask("SET after y").starts_with("OK "));
    assert_eq!(client.ask("GET after"), "VALUE y");
}

#[test]
fn failed_successor_rolls_back_and_the_incumbent_serves_on() {
    let t = Fixture::new();

    // Start my_daemon cold, then end the supervisor's input: no handoff, the daemon serves on.
    let mut sup = t.supervisor(&["--pause"], &t.my_daemon(), "127.0.0.1:0");
    let addr: SocketAddr = sup.expect("listening on ").parse().unwrap();
    let cold: u32 = sup.expect("serving: pid ").parse().unwrap();
    t.track(cold);
    sup.expect("press Enter to hand off");
    sup.stdin = None;
    sup.expect("end of input: no handoff");
    assert!(sup.wait_exit().success(), "supervisor exit status");

    let mut client = Client::new(addr);
    assert_eq!(client.ask("PID"), format!("PID {cold}"));
    for i in 0..10 {
        let answer = client.ask(&format!("SET before{i} value {i}"));
        assert!(answer.starts_with("OK "), "SET before{i}: {answer}");
    }
    let writer = Writer::start(addr);
    writer.wait_for_acks(5);

    // A successor that opens the wrong data directory: it sees none of the sealed data,
    // refuses to go on (before `Ready`), and exits; the incumbent takes its lock back, reopens
    // its logs and serves on.
    let wrong = t.dir.join("wrong-data-dir.sh");
    fs::write(
        &wrong,
        format!(
            "#!/bin/sh\nMY_DAEMON_DATA={} exec {} \"$@\"\n",
            t.dir.join("elsewhere").display(),
            t.my_daemon().display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o755)).unwrap();
    let mut sup = t.supervisor(&[], &wrong, &addr.to_string());
    assert_eq!(sup.expect("serving: pid "), cold.to_string());
    let outcome = sup.expect_one_of(&["swap complete; new pid ", "aborted: "]);
    assert!(outcome.starts_with("aborted: Some("), "{outcome}");
    // The script ran (and my_daemon refused the data directory), rather than failing to start.
    assert!(!outcome.contains("SpawnFailed"), "{outcome}");
    assert!(sup.wait_exit().success(), "supervisor exit status");

    // Everything acknowledged is there, the writer goes on being acknowledged, by the same
    // process.
    writer.forget_acks();
    writer.wait_for_acks(5);
    let (written, _) = writer.stop();
    assert_eq!(client.ask("PID"), format!("PID {cold}"));
    client.check_all(&written);
    assert!(client.ask("SET after-rollback 1").starts_with("OK "));

    // The logs were sealed and reopened: a real handoff now replays them whole.
    let mut sup = t.supervisor(&[], &t.my_daemon(), &addr.to_string());
    let new: u32 = sup.expect("swap complete; new pid ").parse().unwrap();
    t.track(new);
    assert!(sup.wait_exit().success(), "supervisor exit status");
    assert_eq!(client.ask("PID"), format!("PID {new}"));
    client.check_all(&written);
    assert_eq!(client.ask("GET after-rollback"), "VALUE 1");
    for i in 0..10 {
        assert_eq!(
            client.ask(&format!("GET before{i}")),
            format!("VALUE value {i}")
        );
    }
}

/// A temporary directory, the examples, and every daemon started, killed at the end.
struct Fixture {
    dir: PathBuf,
    log: PathBuf,
    examples: PathBuf,
    daemons: Mutex<Vec<u32>>,
    supervisors: Mutex<Vec<String>>,
}

impl Fixture {
    fn new() -> Fixture {
        // target/<profile>/deps/examples-<hash> → target/<profile>/examples
        let exe = std::env::current_exe().unwrap();
        let examples = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in target/<profile>/deps")
            .join("examples");
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for name in ["my_daemon", "embedded_supervisor"] {
            let (exe, source) = (examples.join(name), sources.join(format!("{name}.rs")));
            let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
            let built = modified(&exe).unwrap_or_else(|| {
                panic!(
                    "{} is missing: build the examples first (`cargo build -p handoff --examples`)",
                    exe.display()
                )
            });
            assert!(
                modified(&source).is_none_or(|m| m <= built),
                "{} is older than its source: rebuild it (`cargo build -p handoff --examples`)",
                exe.display()
            );
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("handoff-examples-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Fixture {
            log: dir.join("stderr.log"),
            dir,
            examples,
            daemons: Mutex::new(Vec::new()),
            supervisors: Mutex::new(Vec::new()),
        }
    }

    /// Start `embedded_supervisor` with `args`; its daemons write to the same stderr log.
    fn supervisor(&self, args: &[&str], binary: &Path, addr: &str) -> Supervisor<'_> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(self.examples.join("embedded_supervisor"))
            .args(args)
            .arg(binary)
            .env("MY_DAEMON_SOCKET", self.dir.join("handoff.sock"))
            .env("MY_DAEMON_DATA", self.dir.join("data"))
            .env("MY_DAEMON_ADDR", addr)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // The daemons the supervisor starts inherit this pipe: the reader ends only when the
        // last of them exits, so it runs detached.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Supervisor {
            stdin: child.stdin.take(),
            child,
            lines,
            fixture: self,
        }
    }

    fn my_daemon(&self) -> PathBuf {
        self.examples.join("my_daemon")
    }

    fn track(&self, pid: u32) {
        self.daemons.lock().unwrap().push(pid);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for &pid in self.daemons.lock().unwrap().iter() {
            // Only a process that is still a my_daemon (not a zombie, not a reused pid).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("my_daemon") {
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
        if thread::panicking() {
            eprintln!("--- supervisor output");
            for line in self.supervisors.lock().unwrap().iter() {
                eprintln!("{line}");
            }
            eprintln!(
                "--- stderr of the supervisors and daemons ({})",
                self.log.display()
            );
            eprintln!("{}", fs::read_to_string(&self.log).unwrap_or_default());
            eprintln!("--- kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `embedded_supervisor`.
struct Supervisor<'f> {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    fixture: &'f Fixture,
}

impl Supervisor<'_> {
    /// The rest of the next line starting with `prefix`, within [`WAIT`].
    fn expect(&mut self, prefix: &str) -> String {
        let line = self.expect_one_of(&[prefix]);
        line[prefix.len()..].to_string()
    }

    /// The next line starting with one of `prefixes`, within [`WAIT`].
    fn expect_one_of(&mut self, prefixes: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!("supervisor printed no line starting with {prefixes:?}: {e}"),
            };
            self.fixture.supervisors.lock().unwrap().push(line.clone());
            if prefixes.iter().any(|p| line.starts_with(p)) {
                return line;
            }
        }
    }

    fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Wait for the supervisor to exit, within [`WAIT`].
    fn wait_exit(&mut self) -> ExitStatus {
        self.stdin = None;
        // Wait on its exit through a pidfd (bounded), then reap it.
        if let Ok(w) = handoff_engine::sys::spawn::Watched::open(self.child.id()) {
            let exited = handoff_engine::sys::spawn::wait_any(&[&w], WAIT).unwrap();
            assert!(!exited.is_empty(), "supervisor did not exit in time");
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client of `my_daemon` that reconnects when the server closes its connection before
/// answering (the daemon then did not execute the request, see the example's docs).
struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    reconnects: u32,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: None,
            reconnects: 0,
        }
    }

    /// The answer to `request`, within [`WAIT`].
    fn ask(&mut self, request: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer to {request:?} within {WAIT:?}");
            if self.conn.is_none() {
                // The listener exists throughout (the supervisor holds it): the kernel
                // completes the connection even while no process accepts.
                let s = TcpStream::connect_timeout(&self.addr, left)
                    .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr));
                self.conn = Some(BufReader::new(s));
            }
            let conn = self.conn.as_mut().unwrap();
            match round_trip(conn, request, left) {
                Ok(answer) => return answer,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof
                            | ErrorKind::ConnectionReset
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::BrokenPipe
                    ) =>
                {
                    self.conn = None;
                    self.reconnects += 1;
                }
                Err(e) => panic!("{request:?}: {e}"),
            }
        }
    }

    /// Every `(key, value)` reads back.
    fn check_all(&mut self, written: &[(String, String)]) {
        for (key, value) in written {
            assert_eq!(
                self.ask(&format!("GET {key}")),
                format!("VALUE {value}"),
                "acknowledged write of {key} lost"
            );
        }
    }
}

fn round_trip(
    conn: &mut BufReader<TcpStream>,
    request: &str,
    timeout: Duration,
) -> io::Result<String> {
    conn.get_ref().set_read_timeout(Some(timeout))?;
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

/// A client writing `SET w<i> <i>` in a loop on a thread of its own.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: mpsc::Receiver<()>,
    thread: thread::JoinHandle<(Vec<(String, String)>, u32)>,
}

impl Writer {
    fn start(addr: SocketAddr) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, acks) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut client = Client::new(addr);
            let mut written = Vec::new();
            let mut i = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                let (key, value) = (format!("w{i}"), format!("{i}"));
                let answer = client.ask(&format!("SET {key} {value}"));
                assert!(answer.starts_with("OK "), "SET {key}: {answer}");
                written.push((key, value));
                let _ = tx.send(());
                i += 1;
            }
            (written, client.reconnects)
        });
        Writer { stop, acks, thread }
    }

    /// Wait for `n` more acknowledged writes, within [`WAIT`] each.
    fn wait_for_acks(&self, n: usize) {
        for _ in 0..n {
            if let Err(e) = self.acks.recv_timeout(WAIT) {
                panic!("the writer got no acknowledgement within {WAIT:?}: {e}");
            }
        }
    }

    /// Forget the acknowledgements not waited for yet.
    fn forget_acks(&self) {
        while self.acks.try_recv().is_ok() {}
    }

    /// Stop; what was acknowledged, and how often the writer reconnected.
    fn stop(self) -> (Vec<(String, String)>, u32) {
        self.stop.store(true, Ordering::SeqCst);
        // Each request is bounded by WAIT, so this join is too.
        match self.thread.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}
