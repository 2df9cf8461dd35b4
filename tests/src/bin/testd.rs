//! `testd`: the small stateful daemon the end-to-end tests hand off.
//!
//! It serves every listener it is given (TCP, UDP, Unix stream, Unix datagram) with a line
//! protocol, keeps a real append-only log in its data directory, and implements `Drainable`:
//!
//! - `PING` → `PONG <pid>`; `SET <key> <value>` → appended and fsynced, then `OK <revision>`;
//!   `GET <key>` → `VAL <value>` or `NONE`; `PID` → `<pid>`. Datagram sockets answer `PING`
//!   with `PONG <pid>` to the sender.
//! - Drain: stop accepting (new connections wait in the kernel's queue for the successor),
//!   let in-flight requests finish, then half-close every connection (the client reads a clean
//!   end of stream after its last answer, never a reset); writes are refused from then on.
//! - Seal: fsync and write a seal line with the revision; resume: reopen the log and serve.
//!
//! Configuration (environment): `TESTD_DATA` (data directory), `TESTD_SOCK` (control
//! socket), `TESTD_FAIL` (a failure to act out as a successor: `exit-before-ready`,
//! `hang-before-ready`, `no-hello`, `hello-after-supervisor-exit`, `crash-after-lock`,
//! `slow-open=<ms>`), `TESTD_TIMING_MS`
//! (heartbeat,silence,slack in ms, optional), `TESTD_DRAIN_MS` (a slow drain). The incumbent fails its seal hook while a file
//! `fail-seal` exists in the data directory. Events are printed on stdout, one per line
//! (`successor-started`, `draining`, `sealed`, `opening`, `serving … role=…`, `resumed`, each
//! with `pid=…`), for tests that act at a given point of a handoff.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use handoff::drainable::ReadinessSnapshot;
use handoff::error::{Error, Result};
use handoff::{
    detect_role, BegunSuccessor, DataDirLock, DrainReport, Drainable, Incumbent, Role, SealReport,
    StateSnapshot, Timing,
};

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("{name} must be set")))
}

fn timing() -> Timing {
    let mut t = Timing::default();
    if let Ok(v) = std::env::var("TESTD_TIMING_MS") {
        let ms: Vec<u64> = v
            .split(',')
            .map(|x| x.parse().expect("TESTD_TIMING_MS"))
            .collect();
        t.heartbeat_interval = Duration::from_millis(ms[0]);
        t.peer_silence = Duration::from_millis(ms[1]);
        t.slack = Duration::from_millis(ms[2]);
    }
    t
}

/// The data: one append-only log of `SET` lines, and the map it implies.
struct Db {
    dir: PathBuf,
    state: Mutex<DbState>,
}

struct DbState {
    log: Option<File>,
    map: BTreeMap<String, String>,
    revision: u64,
    writable: bool,
}

impl Db {
    fn open(dir: &Path) -> Result<Arc<Db>> {
        let (map, revision) = Db::load(dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("data.log"))?;
        Ok(Arc::new(Db {
            dir: dir.to_path_buf(),
            state: Mutex::new(DbState {
                log: Some(log),
                map,
                revision,
                writable: true,
            }),
        }))
    }

    fn load(dir: &Path) -> Result<(BTreeMap<String, String>, u64)> {
        let mut map = BTreeMap::new();
        let mut revision = 0;
        match File::open(dir.join("data.log")) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    if let Some(rest) = line.strip_prefix("SET ") {
                        if let Some((k, v)) = rest.split_once(' ') {
                            map.insert(k.to_string(), v.to_string());
                            revision += 1;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok((map, revision))
    }

    fn set(&self, k: &str, v: &str) -> std::result::Result<u64, &'static str> {
        let mut s = self.state.lock().unwrap();
        if !s.writable {
            return Err("ERR read-only (handoff in progress), retry");
        }
        let log = s.log.as_mut().ok_or("ERR closed")?;
        writeln!(log, "SET {k} {v}").map_err(|_| "ERR io")?;
        log.sync_data().map_err(|_| "ERR io")?;
        s.map.insert(k.to_string(), v.to_string());
        s.revision += 1;
        Ok(s.revision)
    }

    fn get(&self, k: &str) -> Option<String> {
        self.state.lock().unwrap().map.get(k).cloned()
    }

    fn revision(&self) -> u64 {
        self.state.lock().unwrap().revision
    }
}

/// The accept loops and connections.
struct Server {
    pid: u32,
    db: Arc<Db>,
    accepting: AtomicBool,
    conns: Mutex<Vec<Arc<ConnSlot>>>,
    open: AtomicU64,
    in_flight: (Mutex<u64>, Condvar),
}

struct ConnSlot {
    stream: TcpOrUnix,
    closing: AtomicBool,
    busy: Mutex<()>,
}

enum TcpOrUnix {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl TcpOrUnix {
    fn shutdown_write(&self) {
        let _ = match self {
            TcpOrUnix::Tcp(s) => s.shutdown(Shutdown::Write),
            TcpOrUnix::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Server {
    fn answer(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("PING"), _, _) => format!("PONG {}", self.pid),
            (Some("PID"), _, _) => self.pid.to_string(),
            (Some("SET"), Some(k), Some(v)) => match self.db.set(k, v) {
                Ok(rev) => format!("OK {rev}"),
                Err(e) => e.to_string(),
            },
            (Some("GET"), Some(k), _) => match self.db.get(k) {
                Some(v) => format!("VAL {v}"),
                None => "NONE".into(),
            },
            _ => "ERR unknown command".into(),
        }
    }

    fn serve_conn(
        self: &Arc<Self>,
        slot: Arc<ConnSlot>,
        reader: Box<dyn std::io::Read + Send>,
        mut writer: Box<dyn Write + Send>,
    ) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let mut lines = BufReader::new(reader).lines();
        while let Some(Ok(line)) = lines.next() {
            let guard = slot.busy.lock().unwrap();
            if slot.closing.load(Ordering::SeqCst) {
                // Half-closed: the request cannot be answered; keep reading to the client's
                // end of stream so closing never resets the connection.
                drop(guard);
                continue;
            }
            let reply = self.answer(&line);
            // One write per answer: split writes meet Nagle and delayed ACKs (40 ms stalls).
            if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
                break;
            }
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.conns
            .lock()
            .unwrap()
            .retain(|c| !Arc::ptr_eq(c, &slot));
    }

    fn track(self: &Arc<Self>, stream: TcpOrUnix) {
        let (reader, writer): (Box<dyn std::io::Read + Send>, Box<dyn Write + Send>) = match &stream
        {
            TcpOrUnix::Tcp(s) => (
                Box::new(s.try_clone().unwrap()),
                Box::new(s.try_clone().unwrap()),
            ),
            TcpOrUnix::Unix(s) => (
                Box::new(s.try_clone().unwrap()),
                Box::new(s.try_clone().unwrap()),
            ),
        };
        let slot = Arc::new(ConnSlot {
            stream,
            closing: AtomicBool::new(false),
            busy: Mutex::new(()),
        });
        self.conns.lock().unwrap().push(Arc::clone(&slot));
        let me = Arc::clone(self);
        std::thread::spawn(move || me.serve_conn(slot, reader, writer));
    }

    /// Wait until `accepting` (polling the listener with a short timeout so a drain is
    /// noticed), then accept.
    fn accept_ready(&self, fd: std::os::fd::BorrowedFd<'_>) -> bool {
        if !self.accepting.load(Ordering::SeqCst) {
            let (lock, cv) = &self.in_flight;
            let g = lock.lock().unwrap();
            let _ = cv.wait_timeout(g, Duration::from_millis(100)).unwrap();
            return false;
        }
        let mut p = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let t = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        matches!(rustix::event::poll(&mut p, Some(&t)), Ok(n) if n > 0)
            && self.accepting.load(Ordering::SeqCst)
    }

    fn serve_tcp(self: Arc<Self>, l: TcpListener) {
        l.set_nonblocking(true).unwrap();
        loop {
            if !self.accept_ready(std::os::fd::AsFd::as_fd(&l)) {
                continue;
            }
            if let Ok((s, _)) = l.accept() {
                s.set_nonblocking(false).unwrap();
                let _ = s.set_nodelay(true);
                self.track(TcpOrUnix::Tcp(s));
            }
        }
    }

    fn serve_unix(self: Arc<Self>, l: UnixListener) {
        l.set_nonblocking(true).unwrap();
        loop {
            if !self.accept_ready(std::os::fd::AsFd::as_fd(&l)) {
                continue;
            }
            if let Ok((s, _)) = l.accept() {
                s.set_nonblocking(false).unwrap();
                self.track(TcpOrUnix::Unix(s));
            }
        }
    }

    fn serve_udp(self: Arc<Self>, s: UdpSocket) {
        let mut buf = [0u8; 512];
        loop {
            if !self.accept_ready(std::os::fd::AsFd::as_fd(&s)) {
                continue;
            }
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let reply = self.answer(String::from_utf8_lossy(&buf[..n]).trim());
                let _ = s.send_to(reply.as_bytes(), from);
            }
        }
    }

    fn serve_unix_dgram(self: Arc<Self>, s: UnixDatagram) {
        let mut buf = [0u8; 512];
        loop {
            if !self.accept_ready(std::os::fd::AsFd::as_fd(&s)) {
                continue;
            }
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let reply = self.answer(String::from_utf8_lossy(&buf[..n]).trim());
                if let Some(p) = from.as_pathname() {
                    let _ = s.send_to(reply.as_bytes(), p);
                }
            }
        }
    }
}

struct Hooks {
    server: Arc<Server>,
}

impl Drainable for Hooks {
    fn drain(&self, deadline: Instant) -> Result<DrainReport> {
        let s = &self.server;
        println!("draining pid={}", s.pid);
        s.accepting.store(false, Ordering::SeqCst);
        s.db.state.lock().unwrap().writable = false;
        if let Ok(ms) = std::env::var("TESTD_DRAIN_MS") {
            // Simulated slow drain work (so a test can act while it runs): existing clients
            // are still answered meanwhile, writes refused.
            std::thread::park_timeout(Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        let conns: Vec<Arc<ConnSlot>> = s.conns.lock().unwrap().clone();
        let mut remaining = 0;
        for c in conns {
            // Wait for the request in flight on this connection, if any, then half-close.
            let got = loop {
                if let Ok(g) = c.busy.try_lock() {
                    break Some(g);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::yield_now();
            };
            match got {
                Some(_g) => {
                    c.closing.store(true, Ordering::SeqCst);
                    c.stream.shutdown_write();
                }
                None => remaining += 1,
            }
        }
        if let Some(log) = s.db.state.lock().unwrap().log.as_ref() {
            log.sync_all()?;
        }
        Ok(DrainReport {
            open_conns_remaining: remaining,
            accept_closed: true,
        })
    }

    fn seal(&self) -> Result<SealReport> {
        let db = &self.server.db;
        if db.dir.join("fail-seal").exists() {
            return Err(Error::msg("fail-seal present: refusing to seal"));
        }
        let mut st = db.state.lock().unwrap();
        if let Some(log) = st.log.take() {
            log.sync_all()?;
        }
        let rev = st.revision;
        println!("sealed pid={}", self.server.pid);
        Ok(SealReport {
            last_revision_per_shard: vec![rev],
            data_dir_fingerprint: rev,
        })
    }

    fn resume_after_abort(&self) -> Result<()> {
        let db = &self.server.db;
        let (map, revision) = Db::load(&db.dir)?;
        let log = OpenOptions::new()
            .append(true)
            .open(db.dir.join("data.log"))?;
        let mut st = db.state.lock().unwrap();
        st.map = map;
        st.revision = revision;
        st.log = Some(log);
        st.writable = true;
        drop(st);
        self.server.accepting.store(true, Ordering::SeqCst);
        println!("resumed pid={}", self.server.pid);
        Ok(())
    }

    fn snapshot_state(&self) -> StateSnapshot {
        StateSnapshot {
            shard_count: 1,
            open_conns: self.server.open.load(Ordering::SeqCst),
            last_revision_per_shard: vec![self.server.db.revision()],
        }
    }
}

enum Listeners {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(UnixListener),
    UnixDgram(UnixDatagram),
}

fn start(server: &Arc<Server>, listeners: Vec<Listeners>) {
    for l in listeners {
        let s = Arc::clone(server);
        match l {
            Listeners::Tcp(l) => std::thread::spawn(move || s.serve_tcp(l)),
            Listeners::Udp(l) => std::thread::spawn(move || s.serve_udp(l)),
            Listeners::Unix(l) => std::thread::spawn(move || s.serve_unix(l)),
            Listeners::UnixDgram(l) => std::thread::spawn(move || s.serve_unix_dgram(l)),
        };
    }
}

fn take_all_begun(b: &mut BegunSuccessor, names: &[String]) -> Vec<Listeners> {
    names
        .iter()
        .filter_map(|n| {
            if let Some(l) = b.take_listener(n) {
                Some(Listeners::Tcp(l))
            } else if let Some(l) = b.take(n) {
                Some(Listeners::Udp(l))
            } else if let Some(l) = b.take(n) {
                Some(Listeners::Unix(l))
            } else {
                b.take(n).map(Listeners::UnixDgram)
            }
        })
        .collect()
}

/// Raise the soft descriptor limit to the hard one (tests hand over 1,000 listeners).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// `TESTD_CHILD_FDS_OUT=<path>`: spawn a child the ordinary way (std `Command`) that writes
/// the descriptors it inherited to `<path>`, one number per line, so a test can check that
/// nothing of the library's leaks into the daemon's own children.
fn report_child_fds() {
    if let Some(out) = std::env::var_os("TESTD_CHILD_FDS_OUT") {
        let out = PathBuf::from(out);
        let tmp = out.with_extension("tmp");
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("ls /proc/$$/fd > \"$0\" && mv \"$0\" \"$1\"")
            .arg(&tmp)
            .arg(&out)
            .status()
            .expect("spawn sh");
        assert!(status.success(), "fd report failed: {status}");
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    raise_nofile();
    let data = env_path("TESTD_DATA");
    let sock = env_path("TESTD_SOCK");
    let fail = std::env::var("TESTD_FAIL").unwrap_or_default();
    let pid = std::process::id();
    match detect_role()? {
        Role::ColdStart { mut inherited } => {
            let names: Vec<String> = inherited.names().iter().map(|s| s.to_string()).collect();
            let mut listeners = Vec::new();
            for n in names {
                if let Some(l) = inherited.take(&n) {
                    listeners.push(Listeners::Tcp(l));
                } else if let Some(l) = inherited.take(&n) {
                    listeners.push(Listeners::Udp(l));
                } else if let Some(l) = inherited.take(&n) {
                    listeners.push(Listeners::Unix(l));
                } else if let Some(l) = inherited.take(&n) {
                    listeners.push(Listeners::UnixDgram(l));
                }
            }
            let lock = DataDirLock::acquire_or_break_stale(&data)?;
            let db = Db::open(&data)?;
            let server = new_server(pid, db);
            let incumbent = Incumbent::bind_cold_start(&sock, lock)?.with_timing(timing());
            start(&server, listeners);
            println!("serving pid={pid} role=cold");
            report_child_fds();
            incumbent.serve(Hooks { server })?;
        }
        Role::Successor(s) => {
            if fail == "no-hello" {
                // Never answer: the supervisor must give up on its own.
                loop {
                    std::thread::park();
                }
            }
            println!("successor-started pid={pid}");
            if fail == "hello-after-supervisor-exit" {
                wait_for_parent_exit();
            }
            let s = s.with_timing(timing()).handshake(format!("testd {pid}"))?;
            let names = s.listener_names();
            let mut s = s.wait_for_begin()?;
            let listeners = take_all_begun(&mut s, &names);
            if fail == "exit-before-ready" {
                std::process::exit(3);
            }
            let lock = DataDirLock::acquire(&data)?;
            if fail == "crash-after-lock" {
                std::process::abort();
            }
            if fail == "hang-before-ready" {
                loop {
                    std::thread::park();
                }
            }
            println!("opening pid={pid}");
            if let Some(ms) = fail.strip_prefix("slow-open=") {
                std::thread::park_timeout(Duration::from_millis(ms.parse()?));
            }
            let db = Db::open(&data)?;
            let readiness = ReadinessSnapshot {
                listening_on: names.clone(),
                healthz_ok: true,
                advertised_revision_per_shard: vec![db.revision()],
            };
            let incumbent = s.announce_and_bind(readiness, &sock, lock)?;
            let server = new_server(pid, db);
            start(&server, listeners);
            println!("serving pid={pid} role=successor");
            report_child_fds();
            incumbent.with_timing(timing()).serve(Hooks { server })?;
        }
    }
    Ok(())
}

fn new_server(pid: u32, db: Arc<Db>) -> Arc<Server> {
    Arc::new(Server {
        pid,
        db,
        accepting: AtomicBool::new(true),
        conns: Mutex::new(Vec::new()),
        open: AtomicU64::new(0),
        in_flight: (Mutex::new(0), Condvar::new()),
    })
}

/// `hello-after-supervisor-exit`: wait until the process that spawned this successor (the
/// supervisor) has exited, so that a test can kill the supervisor at `successor-started` and
/// know the handoff went no further. Polls `getppid` (it changes when the parent dies), for
/// 30 s at most.
fn wait_for_parent_exit() {
    let parent = std::os::unix::process::parent_id();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::process::parent_id() == parent && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
