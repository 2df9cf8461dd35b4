//! `kvd` at the OS boundary (issue 13, finding 11), each with a real `kvd` process started cold
//! (no supervisor) on a fresh data directory:
//!
//! - `a_corrupt_segment_is_refused_naming_file_and_offset_and_left_untouched`: one flipped
//!   byte in the first acknowledged `SET`, valid records after it: kvd refuses to start;
//! - `data_is_created_owner_only_and_a_looser_directory_tightened`: modes 0700 and 0600;
//! - `connections_beyond_the_cap_are_refused_while_the_others_are_served`: `--max-conns`;
//! - `idle_and_trickling_connections_are_closed_after_the_idle_timeout`: `--idle-timeout`;
//! - `bad_limits_are_refused_with_a_clear_error`.
//!
//! Every wait is bounded by [`BOUND`] and waits for an event (a line, an end of stream, a
//! process exit), never for time to pass.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The bound on every single wait.
const BOUND: Duration = Duration::from_secs(30);

/// A segment's header record: 8 bytes of frame, 17 of body. The first `SET` follows it.
const FIRST_SET: usize = 25;

#[test]
fn a_corrupt_segment_is_refused_naming_file_and_offset_and_left_untouched() {
    let t = Dir::new("corrupt");
    let mut kvd = Kvd::start(&t, &[]);
    let mut c = kvd.client();
    for i in 1..=5 {
        assert_eq!(c.ask(&format!("SET k{i} v{i}")), format!("OK {i}"));
    }
    drop(c);
    // A crash: the segment stays unsealed, every write in it acknowledged.
    kvd.kill();
    let seg = t.data().join("seg-1.log");
    let mut bytes = fs::read(&seg).unwrap();
    bytes[FIRST_SET + 8 + 3] ^= 0x40; // in the first SET's revision: its checksum fails
    fs::write(&seg, &bytes).unwrap();

    let (status, said) = Kvd::run_to_exit(&t, &[]);
    assert_eq!(
        status.code(),
        Some(1),
        "kvd started on a corrupt log:\n{said}"
    );
    let error = said
        .lines()
        .find(|l| l.contains(": error: "))
        .unwrap_or_else(|| panic!("no error line:\n{said}"));
    assert!(
        error.contains(&format!("{} at offset {FIRST_SET}: ", seg.display()))
            && error.contains("checksum mismatch")
            && error.contains("valid record follows"),
        "{error}"
    );
    assert_eq!(fs::read(&seg).unwrap(), bytes, "the segment was changed");
    assert_eq!(
        segments(&t.data()),
        ["seg-1.log"],
        "a segment was added or removed"
    );

    // Repaired (the byte flipped back): every acknowledged write is there.
    bytes[FIRST_SET + 8 + 3] ^= 0x40;
    fs::write(&seg, &bytes).unwrap();
    let kvd = Kvd::start(&t, &[]);
    let mut c = kvd.client();
    for i in 1..=5 {
        assert_eq!(c.ask(&format!("GET k{i}")), format!("VAL v{i}"));
    }
}

#[test]
fn data_is_created_owner_only_and_a_looser_directory_tightened() {
    let t = Dir::new("modes");
    // Created by kvd, with a parent it creates too.
    let data = t.0.join("a").join("data");
    let kvd = Kvd::start_with_data(&t, &data, &[]);
    assert_eq!(kvd.client().ask("SET k v"), "OK 1");
    assert_eq!(mode_of(&t.0.join("a")), 0o700);
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&data.join("seg-1.log")), 0o600);
    drop(kvd);

    // A directory created by someone else, 0755, with a segment 0644 (an older kvd).
    let loose = t.0.join("loose");
    {
        let kvd = Kvd::start_with_data(&t, &loose, &[]);
        assert_eq!(kvd.client().ask("SET k v"), "OK 1");
    }
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(loose.join("seg-1.log"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut kvd = Kvd::start_with_data(&t, &loose, &[]);
    assert_eq!(kvd.client().ask("GET k"), "VAL v");
    assert_eq!(mode_of(&loose), 0o700);
    assert_eq!(mode_of(&loose.join("seg-1.log")), 0o600);
    assert_eq!(mode_of(&loose.join("seg-2.log")), 0o600);
    let said = kvd.said_so_far();
    assert!(said.contains("tightened"), "{said}");
}

#[test]
fn connections_beyond_the_cap_are_refused_while_the_others_are_served() {
    let t = Dir::new("cap");
    let kvd = Kvd::start(&t, &["--max-conns", "2"]);
    let mut a = kvd.client();
    let mut b = kvd.client();
    assert!(a.ask("PING").starts_with("PONG "));
    assert!(b.ask("PING").starts_with("PONG "));

    // A third: one line, then a clean end of stream.
    let mut c = kvd.client();
    assert_eq!(c.line().as_deref(), Some("ERR busy"));
    assert_eq!(c.line(), None);
    // The two are served on.
    assert_eq!(a.ask("SET a 1"), "OK 1");
    assert_eq!(b.ask("GET a"), "VAL 1");

    // One leaves: a new connection is served once kvd saw it go.
    drop(a);
    let deadline = Instant::now() + BOUND;
    let mut refusals = 0;
    let mut d = loop {
        assert!(Instant::now() < deadline, "no slot after a client left");
        let mut d = kvd.client();
        d.send("PING");
        match d.try_line() {
            Ok(Some(l)) if l.starts_with("PONG ") => break d,
            Ok(Some(l)) if l == "ERR busy" => refusals += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => refusals += 1,
            other => panic!("{other:?}"),
        }
    };
    eprintln!("{refusals} refusals before the slot freed");
    assert_eq!(d.ask("GET a"), "VAL 1");
    assert_eq!(b.ask("SET b 2"), "OK 2");
    // Full again.
    let mut e = kvd.client();
    assert_eq!(e.line().as_deref(), Some("ERR busy"));
}

#[test]
fn idle_and_trickling_connections_are_closed_after_the_idle_timeout() {
    let t = Dir::new("idle");
    let timeout = Duration::from_secs(1);
    let kvd = Kvd::start(&t, &["--idle-timeout", "1"]);
    let mut idle = kvd.client();
    assert!(idle.ask("PING").starts_with("PONG "));
    let since = Instant::now();
    // A client that sends half a request, and no more.
    let mut trickle = kvd.client();
    trickle.0.get_mut().write_all(b"SET k ").unwrap();
    let trickle_since = Instant::now();

    assert_eq!(idle.line(), None, "a clean end of stream");
    let idle_after = since.elapsed();
    assert_eq!(trickle.line(), None, "a clean end of stream");
    let trickle_after = trickle_since.elapsed();
    eprintln!("closed after {idle_after:?} (idle), {trickle_after:?} (trickling)");
    for after in [idle_after, trickle_after] {
        assert!(
            after >= timeout - Duration::from_millis(100),
            "closed after {after:?}, before the idle timeout"
        );
    }
    // kvd serves on.
    let mut c = kvd.client();
    assert_eq!(c.ask("SET k v"), "OK 1");
}

#[test]
fn bad_limits_are_refused_with_a_clear_error() {
    let t = Dir::new("badargs");
    for (args, says) in [
        (
            ["--max-conns", "0"],
            "--max-conns \"0\": not a whole number of at least 1",
        ),
        (
            ["--max-conns", "-3"],
            "--max-conns \"-3\": not a whole number",
        ),
        (
            ["--idle-timeout", "0"],
            "--idle-timeout \"0\": not a number of seconds above 0",
        ),
        (
            ["--idle-timeout", "NaN"],
            "--idle-timeout \"NaN\": not a number",
        ),
        (
            ["--idle-timeout", "1e300"],
            "--idle-timeout \"1e300\": not a number",
        ),
    ] {
        let (status, said) = Kvd::run_to_exit(&t, &args);
        assert_eq!(status.code(), Some(1), "{args:?}: {said}");
        assert!(said.contains(says), "{args:?}: {said}");
    }
    assert!(!t.data().exists(), "nothing created");
}

// ---------------------------------------------------------------------------------------

/// A fresh directory, removed at the end unless the test failed.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: AtomicU64 = AtomicU64::new(0);
        // Short: the control socket's path must fit in 108 bytes.
        let dir = std::env::temp_dir().join(format!(
            "kvdh-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn data(&self) -> PathBuf {
        self.0.join("data")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A `kvd` started cold on `127.0.0.1:0`, killed when dropped.
struct Kvd {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    said: Vec<String>,
}

impl Kvd {
    fn command(t: &Dir, data: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvd"));
        cmd.arg("--data")
            .arg(data)
            .arg("--socket")
            .arg(t.0.join("kvd.sock"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("KVD_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn start(t: &Dir, args: &[&str]) -> Kvd {
        Kvd::start_with_data(t, &t.data(), args)
    }

    fn start_with_data(t: &Dir, data: &Path, args: &[&str]) -> Kvd {
        let mut child = Kvd::command(t, data, args).spawn().expect("start kvd");
        let lines = read_lines(child.stderr.take().unwrap());
        // Killed by its drop if it does not start.
        let mut kvd = Kvd {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            lines,
            said: Vec::new(),
        };
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = kvd
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("kvd did not start ({e}):\n{}", kvd.said.join("\n")));
            let addr = line
                .split_once("serving on ")
                .and_then(|(_, rest)| rest.split(',').next())
                .map(|a| a.parse().unwrap());
            kvd.said.push(line);
            if let Some(addr) = addr {
                kvd.addr = addr;
                return kvd;
            }
        }
    }

    /// Run kvd, which must exit by itself within [`BOUND`]: its status and what it said.
    fn run_to_exit(t: &Dir, args: &[&str]) -> (ExitStatus, String) {
        let mut child = Kvd::command(t, &t.data(), args).spawn().expect("start kvd");
        let lines = read_lines(child.stderr.take().unwrap());
        // Not waited for yet: the pid is our child's, and the pidfd refers to it.
        let pid = rustix::process::Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let bound = rustix::event::Timespec::try_from(BOUND).unwrap();
        let ready = rustix::event::poll(&mut fds, Some(&bound)).unwrap();
        if ready == 0 {
            let _ = child.kill();
            let _ = child.wait();
            let said: Vec<String> = lines.try_iter().collect();
            panic!(
                "kvd did not exit within {BOUND:?}; it said:\n{}",
                said.join("\n")
            );
        }
        let status = child.wait().unwrap();
        // The pipe ends with the process.
        let said: Vec<String> = lines.iter().collect();
        (status, said.join("\n"))
    }

    fn client(&self) -> Client {
        let s = TcpStream::connect_timeout(&self.addr, BOUND).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        Client(BufReader::new(s))
    }

    fn said_so_far(&mut self) -> String {
        self.said.extend(self.lines.try_iter());
        self.said.join("\n")
    }

    fn kill(&mut self) {
        // Our own child, not yet waited for: its pid is still ours.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kvd {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("kvd said:\n{}", self.said_so_far());
        }
    }
}

/// The lines of `from`, on a channel, read by a thread of their own.
fn read_lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

struct Client(BufReader<TcpStream>);

impl Client {
    fn send(&mut self, request: &str) {
        // A refused connection may be closed already: what matters is what is read.
        let _ = self
            .0
            .get_mut()
            .write_all(format!("{request}\n").as_bytes());
    }

    fn try_line(&mut self) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        Ok(match self.0.read_line(&mut line)? {
            0 => None,
            _ => Some(line.trim_end_matches('\n').to_string()),
        })
    }

    /// The next line, or `None` at a clean end of stream (a reset fails the test).
    fn line(&mut self) -> Option<String> {
        self.try_line()
            .unwrap_or_else(|e| panic!("reading a line: {e}"))
    }

    fn ask(&mut self, request: &str) -> String {
        self.send(request);
        self.line().expect("an answer")
    }
}

/// The permission bits of `path`, from `fstat` on a descriptor opened without following a
/// symbolic link.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::OpenOptionsExt;
    let f: File = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta = f.metadata().unwrap();
    assert_eq!(
        meta.uid(),
        rustix::process::geteuid().as_raw(),
        "{}",
        path.display()
    );
    meta.mode() & 0o7777
}

/// The segment files in `dir`, sorted by name.
fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    names
}
