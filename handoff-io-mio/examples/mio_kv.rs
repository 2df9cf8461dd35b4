// `mio_kv`: a line-based key-value store with an fsynced append-only log, served by ONE
// thread running ONE mio loop, which also performs the handoffs (handoff-io-mio). Clients are
// served while the incumbent drains, and while a successor opens its data the same loop keeps
// its channel to the supervisor answered.
//
// It is a drop-in replacement for the end-to-end tests' `testd` (the tests' bin `testd-mio`
// is `include!` of this file, so: plain comments, no inner attributes, one `fn main`; only
// `handoff_io_mio`, `mio`, `rustix` and `std`).
//
// Protocol, on every TCP and Unix stream listener, one request per line:
//   PING → `PONG <pid>`; PID → `<pid>`; GET k → `VAL v` | `NONE`;
//   SET k v → appended to `data.log` and fsynced, then `OK <revision>` (`ERR …` while a
//   handoff is in progress).
// UDP and Unix datagram listeners answer each datagram the same way, to its sender.
//
// Environment: `TESTD_DATA` (data directory), `TESTD_SOCK` (control socket), `TESTD_FAIL`
// (as a successor: `exit-before-ready`, `hang-before-ready`, `no-hello`,
// `hello-after-supervisor-exit`, `crash-after-lock`,
// `slow-open=<ms>`), `TESTD_TIMING_MS` (heartbeat,silence,slack), `TESTD_DRAIN_MS` (a slow
// drain), `TESTD_CHILD_FDS_OUT` (see `report_child_fds`). The incumbent fails its seal while
// `<data>/fail-seal` exists. Events go to stdout, one line each: `serving pid=… role=cold|
// successor`, `successor-started pid=…`, `draining pid=…`, `sealed pid=…`, `opening pid=…`,
// `resumed pid=…`.
//
// Token plan: the successor's channel is token 0, the incumbent driver has 1..=65 (control
// socket and 64 control connections), listener i is LISTENER_BASE + i, connection n is
// CONN_BASE + n.
//
// Timers (the slow drain, the slow open, the drain deadline, an accept retry) are deadlines
// joined with the driver's `poll_timeout`; nothing in this program sleeps or blocks, except
// `report_child_fds` (a short child process, once at start) and the log's fsync.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use handoff_io_mio::{
    detect_role, DataDirLock, DrainReport, IncumbentConfig, IncumbentEvent, ListenerKind,
    ReadinessSnapshot, Role, SealReport, StateSnapshot, SuccessorEvent, Timing, Tokens,
    EXIT_ABORTED,
};
use mio::event::{Event, Source};
use mio::net::{TcpListener, TcpStream, UdpSocket, UnixDatagram, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};

type Res<T> = Result<T, Box<dyn Error>>;

/// The successor driver's one token.
const SUCCESSOR_TOKEN: Token = Token(0);
/// The incumbent driver's tokens: its control socket and up to 64 control connections.
const INCUMBENT_TOKENS: Tokens = Tokens { start: 1, len: 65 };
/// Listener `i` is `LISTENER_BASE + i`.
const LISTENER_BASE: usize = 1 << 16;
/// Connection `n` is `CONN_BASE + n`.
const CONN_BASE: usize = 1 << 30;
/// A client line longer than this is dropped.
const MAX_LINE: usize = 64 * 1024;
/// After an accept error other than "would block" (EMFILE…), try again this much later.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

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

/// One event line on stdout, flushed at once (tests act on them).
fn event(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The data: one append-only log of `SET` lines, and the map it implies.
struct Db {
    dir: PathBuf,
    log: Option<File>,
    map: BTreeMap<String, String>,
    revision: u64,
    writable: bool,
}

impl Db {
    fn open(dir: &Path) -> io::Result<Db> {
        let (map, revision) = Db::load(dir)?;
        let log = Db::open_log(dir)?;
        Ok(Db {
            dir: dir.to_path_buf(),
            log: Some(log),
            map,
            revision,
            writable: true,
        })
    }

    fn open_log(dir: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("data.log"))
    }

    fn load(dir: &Path) -> io::Result<(BTreeMap<String, String>, u64)> {
        let mut map = BTreeMap::new();
        let mut revision = 0;
        match File::open(dir.join("data.log")) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    if let Some((k, v)) = line.strip_prefix("SET ").and_then(|r| r.split_once(' '))
                    {
                        map.insert(k.to_string(), v.to_string());
                        revision += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok((map, revision))
    }

    /// Reread the log from disk and open it for appending again (after a rolled-back handoff).
    fn reopen(&mut self) -> io::Result<()> {
        let (map, revision) = Db::load(&self.dir)?;
        let log = Db::open_log(&self.dir)?;
        self.map = map;
        self.revision = revision;
        self.log = Some(log);
        self.writable = true;
        Ok(())
    }

    fn set(&mut self, k: &str, v: &str) -> Result<u64, &'static str> {
        if !self.writable {
            return Err("ERR read-only (handoff in progress), retry");
        }
        let log = self.log.as_mut().ok_or("ERR closed")?;
        writeln!(log, "SET {k} {v}").map_err(|_| "ERR io")?;
        log.sync_data().map_err(|_| "ERR io")?;
        self.map.insert(k.to_string(), v.to_string());
        self.revision += 1;
        Ok(self.revision)
    }
}

/// The answer to one request line.
fn answer(pid: u32, db: &mut Option<Db>, line: &str) -> String {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("PING"), _, _) => format!("PONG {pid}"),
        (Some("PID"), _, _) => pid.to_string(),
        (Some("SET"), Some(k), Some(v)) => match db.as_mut().map(|d| d.set(k, v)) {
            Some(Ok(rev)) => format!("OK {rev}"),
            Some(Err(e)) => e.to_string(),
            None => "ERR closed".into(),
        },
        (Some("GET"), Some(k), _) => match db.as_ref().and_then(|d| d.map.get(k)) {
            Some(v) => format!("VAL {v}"),
            None => "NONE".into(),
        },
        _ => "ERR unknown command".into(),
    }
}

/// A listener of any kind, as mio serves it.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(UnixListener),
    UnixDgram(UnixDatagram),
}

impl Listener {
    /// From a listener descriptor of `kind`, in whatever blocking mode: made non-blocking
    /// (the mode lives on the open file description, shared with the supervisor's copy and
    /// the other daemon's; mio needs `O_NONBLOCK`).
    fn new(kind: ListenerKind, fd: impl Into<OwnedFd>) -> io::Result<Listener> {
        let fd: OwnedFd = fd.into();
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(match kind {
            ListenerKind::Tcp => Listener::Tcp(TcpListener::from_std(fd.into())),
            ListenerKind::Udp => Listener::Udp(UdpSocket::from_std(fd.into())),
            ListenerKind::UnixStream => Listener::Unix(UnixListener::from_std(fd.into())),
            ListenerKind::UnixDatagram => Listener::UnixDgram(UnixDatagram::from_std(fd.into())),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Udp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
            Listener::UnixDgram(l) => l.as_fd(),
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Tcp(l) => l,
            Listener::Udp(l) => l,
            Listener::Unix(l) => l,
            Listener::UnixDgram(l) => l,
        }
    }
}

/// An accepted client connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Conn {
    stream: Stream,
    /// Bytes read, not yet a whole line.
    input: Vec<u8>,
    /// Answers not written yet.
    output: Vec<u8>,
    /// Draining: requests are no longer answered; half-close once `output` is written.
    closing: bool,
    /// Half-closed (our side of the stream ended); we read on to the client's end.
    shut: bool,
    /// The client ended its side.
    eof: bool,
}

/// A drain in progress.
struct Drain {
    /// The (simulated, `TESTD_DRAIN_MS`) drain work ends then; existing connections are
    /// served meanwhile.
    work_until: Instant,
    /// The handoff's drain grace ends then: report what is still open.
    deadline: Instant,
    /// The work is done: connections are being half-closed.
    closing: bool,
}

/// The handoff driver this process runs now.
enum Driver {
    Successor(handoff_io_mio::Successor),
    Incumbent(handoff_io_mio::Incumbent),
    /// Only while the successor turns into the incumbent.
    Switching,
}

impl Driver {
    fn owns(&self, t: Token) -> bool {
        match self {
            Driver::Successor(s) => s.owns(t),
            Driver::Incumbent(i) => i.owns(t),
            Driver::Switching => false,
        }
    }

    fn handle_event(&mut self, ev: &Event) -> io::Result<()> {
        match self {
            Driver::Successor(s) => s.handle_event(ev),
            Driver::Incumbent(i) => i.handle_event(ev),
            Driver::Switching => Ok(()),
        }
    }

    fn handle_timeout(&mut self) -> io::Result<()> {
        match self {
            Driver::Successor(s) => s.handle_timeout(),
            Driver::Incumbent(i) => i.handle_timeout(),
            Driver::Switching => Ok(()),
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Driver::Successor(s) => s.poll_timeout(),
            Driver::Incumbent(i) => i.poll_timeout(),
            Driver::Switching => None,
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The server: listeners, connections, data, and where the handoff stands on our side.
struct App {
    pid: u32,
    data: PathBuf,
    sock: PathBuf,
    fail: String,
    drain_ms: u64,
    /// The loop (its registry registers our sockets too).
    poll: Poll,
    listeners: Vec<Listener>,
    /// The listeners are registered and accepted on.
    accepting: bool,
    accept_retry: Option<Instant>,
    conns: BTreeMap<usize, Conn>,
    next_conn: usize,
    db: Option<Db>,
    drain: Option<Drain>,
    /// Successor, `slow-open`: the data is "opened" then, with this lock.
    opening: Option<(Instant, DataDirLock)>,
    /// Successor, `hang-before-ready`: the lock, held and never announced.
    _hung: Option<DataDirLock>,
}

impl App {
    fn start_accepting(&mut self) -> io::Result<()> {
        if self.accepting {
            return Ok(());
        }
        for (i, l) in self.listeners.iter_mut().enumerate() {
            // A daemon that took these over after us may have left them blocking (the mode is
            // shared): make sure, or the accept loop would block.
            rustix::io::ioctl_fionbio(l.fd(), true)?;
            self.poll.registry().register(
                l.source(),
                Token(LISTENER_BASE + i),
                Interest::READABLE,
            )?;
        }
        self.accepting = true;
        Ok(())
    }

    /// New connections and datagrams wait in the kernel's queues (for the successor).
    fn stop_accepting(&mut self) {
        if !self.accepting {
            return;
        }
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l.source());
        }
        self.accepting = false;
        self.accept_retry = None;
    }

    fn next_timer(&self) -> Option<Instant> {
        let drain = self
            .drain
            .as_ref()
            .map(|d| if d.closing { d.deadline } else { d.work_until });
        let t = earliest(drain, self.opening.as_ref().map(|(at, _)| *at));
        earliest(t, self.accept_retry)
    }

    fn handle_event(&mut self, ev: &Event) {
        let t = ev.token().0;
        if t >= CONN_BASE {
            self.on_conn(t, ev.is_readable() || ev.is_read_closed() || ev.is_error());
        } else if t >= LISTENER_BASE && t - LISTENER_BASE < self.listeners.len() {
            self.on_listener(t - LISTENER_BASE);
        }
    }

    fn on_listener(&mut self, i: usize) {
        if !self.accepting {
            return;
        }
        let App {
            pid,
            db,
            listeners,
            accept_retry,
            ..
        } = self;
        let mut accepted = Vec::new();
        let mut buf = [0u8; 512];
        let failed = loop {
            let r = match &listeners[i] {
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    // Answers go out at once (no Nagle wait behind a delayed ACK).
                    let _ = s.set_nodelay(true);
                    accepted.push(Stream::Tcp(s))
                }),
                Listener::Unix(l) => l.accept().map(|(s, _)| accepted.push(Stream::Unix(s))),
                Listener::Udp(s) => s.recv_from(&mut buf).map(|(n, from)| {
                    let reply = answer(*pid, db, String::from_utf8_lossy(&buf[..n]).trim());
                    let _ = s.send_to(reply.as_bytes(), from);
                }),
                Listener::UnixDgram(s) => s.recv_from(&mut buf).map(|(n, from)| {
                    let reply = answer(*pid, db, String::from_utf8_lossy(&buf[..n]).trim());
                    if let Some(p) = from.as_pathname() {
                        let _ = s.send_to(reply.as_bytes(), p);
                    }
                }),
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            // Edge-triggered: the pending connection would never be announced again.
            eprintln!("mio_kv[{pid}]: listener {i}: {e}; retrying in {ACCEPT_RETRY:?}");
            *accept_retry = Some(Instant::now() + ACCEPT_RETRY);
        }
        for s in accepted {
            self.add_conn(s);
        }
    }

    fn add_conn(&mut self, mut stream: Stream) {
        let token = CONN_BASE + self.next_conn;
        self.next_conn += 1;
        // Both, once: edge-triggered, a writable edge comes whenever buffer space frees up.
        if let Err(e) = self.poll.registry().register(
            stream.source(),
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            eprintln!("mio_kv[{}]: registering a connection: {e}", self.pid);
            return;
        }
        let mut conn = Conn {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            closing: false,
            shut: false,
            eof: false,
        };
        if self.drain.as_ref().is_some_and(|d| d.closing) {
            conn.closing = true;
        }
        self.conns.insert(token, conn);
    }

    /// Read what there is, answer every whole line, write what we can, half-close or close.
    fn on_conn(&mut self, token: usize, readable: bool) {
        let App { pid, db, conns, .. } = self;
        let Some(c) = conns.get_mut(&token) else {
            return;
        };
        let mut broken = false;
        if readable && !c.eof {
            let mut buf = [0u8; 4096];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => c.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            let mut start = 0;
            while let Some(n) = c.input[start..].iter().position(|&b| b == b'\n') {
                let line = &c.input[start..start + n];
                start += n + 1;
                // Half-closed (draining): the request cannot be answered; it is read and
                // dropped so that closing never resets the connection.
                if !c.closing {
                    let reply = answer(*pid, db, &String::from_utf8_lossy(line));
                    c.output.extend_from_slice(reply.as_bytes());
                    c.output.push(b'\n');
                }
            }
            c.input.drain(..start);
            if c.eof && !c.input.is_empty() && !c.closing {
                // A last line without its newline (as `BufRead::lines` answers it).
                let reply = answer(*pid, db, &String::from_utf8_lossy(&c.input));
                c.output.extend_from_slice(reply.as_bytes());
                c.output.push(b'\n');
            }
            if c.eof || c.input.len() > MAX_LINE {
                c.input.clear();
            }
        }
        if !broken {
            broken = !Self::progress(c);
        }
        if broken || (c.eof && c.output.is_empty()) {
            self.close(token);
        }
    }

    /// Write what can be written; half-close a closing connection whose answers are out.
    /// `false`: the connection broke.
    fn progress(c: &mut Conn) -> bool {
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(0) => return false,
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if c.closing && !c.shut && c.output.is_empty() {
            c.stream.shutdown_write();
            c.shut = true;
        }
        true
    }

    fn close(&mut self, token: usize) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(c.stream.source());
        }
    }

    /// Run the timers that are due and finish a drain whose connections are all half-closed.
    /// Whether anything happened.
    fn timers(&mut self, driver: &mut Driver) -> Res<bool> {
        let now = Instant::now();
        let mut busy = false;
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            for i in 0..self.listeners.len() {
                self.on_listener(i);
            }
            busy = true;
        }
        if self.opening.as_ref().is_some_and(|(at, _)| *at <= now) {
            let (_, lock) = self.opening.take().expect("checked");
            if let Driver::Successor(s) = driver {
                self.open_and_ready(s, lock)?;
            }
            busy = true;
        }
        if let (Some(d), Driver::Incumbent(inc)) = (self.drain.as_mut(), &mut *driver) {
            if !d.closing && d.work_until <= now {
                // The drain work is done: every connection is half-closed after its last
                // answer (now, or once that answer is written).
                d.closing = true;
                let broken: Vec<usize> = self
                    .conns
                    .iter_mut()
                    .filter_map(|(t, c)| {
                        c.closing = true;
                        (!Self::progress(c)).then_some(*t)
                    })
                    .collect();
                for t in broken {
                    self.close(t);
                }
                busy = true;
            }
            let d = self.drain.as_ref().expect("still draining");
            let open = self.conns.values().filter(|c| !c.shut).count() as u64;
            if d.closing && (open == 0 || d.deadline <= now) {
                self.drain = None;
                let synced = match self.db.as_ref().and_then(|db| db.log.as_ref()) {
                    Some(log) => log.sync_all(),
                    None => Ok(()),
                };
                inc.drained(match synced {
                    Ok(()) => Ok(DrainReport {
                        open_conns_remaining: open,
                        accept_closed: true,
                    }),
                    Err(e) => Err(format!("drain: fsync: {e}")),
                })?;
                busy = true;
            }
        }
        Ok(busy)
    }

    fn on_incumbent_event(
        &mut self,
        inc: &mut handoff_io_mio::Incumbent,
        ev: IncumbentEvent,
    ) -> Res<()> {
        let pid = self.pid;
        match ev {
            IncumbentEvent::Drain { deadline, .. } => {
                event(&format!("draining pid={pid}"));
                self.stop_accepting();
                if let Some(db) = self.db.as_mut() {
                    db.writable = false;
                }
                self.drain = Some(Drain {
                    work_until: Instant::now() + Duration::from_millis(self.drain_ms),
                    deadline,
                    closing: false,
                });
                // `timers` finishes it (at once when there is no drain work and nothing to
                // write).
            }
            IncumbentEvent::Seal { .. } => {
                let r = self.seal();
                if r.is_ok() {
                    event(&format!("sealed pid={pid}"));
                }
                inc.sealed(r)?;
            }
            IncumbentEvent::Resume { .. } => {
                self.drain = None;
                let r = match self.db.as_mut() {
                    Some(db) => db.reopen().map_err(|e| format!("resume_after_abort: {e}")),
                    None => Err("resume_after_abort: no data".into()),
                }
                .and_then(|()| {
                    self.start_accepting()
                        .map_err(|e| format!("resume_after_abort: listeners: {e}"))
                });
                if r.is_ok() {
                    event(&format!("resumed pid={pid}"));
                }
                inc.resumed(r.map(|()| StateSnapshot {
                    shard_count: 1,
                    open_conns: self.conns.len() as u64,
                    last_revision_per_shard: vec![self.db.as_ref().map_or(0, |d| d.revision)],
                }))?;
            }
            IncumbentEvent::Retired { .. } => {
                let _ = io::stdout().flush();
                std::process::exit(0);
            }
        }
        Ok(())
    }

    /// fsync and close the log; the revision is what the successor must find.
    fn seal(&mut self) -> Result<SealReport, String> {
        let db = self.db.as_mut().ok_or("seal: no data")?;
        if db.dir.join("fail-seal").exists() {
            return Err("seal: fail-seal present: refusing to seal".into());
        }
        if let Some(log) = db.log.take() {
            log.sync_all().map_err(|e| format!("seal: fsync: {e}"))?;
        }
        db.writable = false;
        Ok(SealReport {
            last_revision_per_shard: vec![db.revision],
            data_dir_fingerprint: db.revision,
        })
    }

    fn on_successor_event(&mut self, driver: &mut Driver, ev: SuccessorEvent) -> Res<()> {
        let pid = self.pid;
        match ev {
            SuccessorEvent::ListenersReceived => {}
            SuccessorEvent::Begun { .. } => {
                let Driver::Successor(s) = driver else {
                    return Ok(());
                };
                for name in s.listener_names() {
                    let taken = if let Some(l) = s.take::<std::net::TcpListener>(&name) {
                        Listener::new(ListenerKind::Tcp, l)
                    } else if let Some(l) = s.take::<std::net::UdpSocket>(&name) {
                        Listener::new(ListenerKind::Udp, l)
                    } else if let Some(l) = s.take::<std::os::unix::net::UnixListener>(&name) {
                        Listener::new(ListenerKind::UnixStream, l)
                    } else if let Some(l) = s.take::<std::os::unix::net::UnixDatagram>(&name) {
                        Listener::new(ListenerKind::UnixDatagram, l)
                    } else {
                        continue;
                    };
                    self.listeners.push(taken?);
                }
                if self.fail == "exit-before-ready" {
                    std::process::exit(3);
                }
                let lock = DataDirLock::acquire(&self.data)?;
                if self.fail == "crash-after-lock" {
                    std::process::abort();
                }
                if self.fail == "hang-before-ready" {
                    // The loop goes on (the channel is answered); `ready` never comes, and
                    // the supervisor aborts us at its deadline.
                    self._hung = Some(lock);
                    return Ok(());
                }
                event(&format!("opening pid={pid}"));
                match self.fail.strip_prefix("slow-open=") {
                    Some(ms) => {
                        let at = Instant::now() + Duration::from_millis(ms.parse()?);
                        self.opening = Some((at, lock));
                    }
                    None => self.open_and_ready(s, lock)?,
                }
            }
            SuccessorEvent::Committed { .. } => {
                let Driver::Successor(s) = std::mem::replace(driver, Driver::Switching) else {
                    return Ok(());
                };
                let inc = s.into_incumbent(&self.sock, self.poll.registry(), INCUMBENT_TOKENS)?;
                *driver = Driver::Incumbent(inc);
                self.start_accepting()?;
                event(&format!("serving pid={pid} role=successor"));
                report_child_fds();
            }
            SuccessorEvent::Aborted { .. } => {
                // The library logged the reason. Exit without touching the data.
                std::process::exit(EXIT_ABORTED);
            }
        }
        Ok(())
    }

    fn open_and_ready(&mut self, s: &mut handoff_io_mio::Successor, lock: DataDirLock) -> Res<()> {
        let db = Db::open(&self.data)?;
        let readiness = ReadinessSnapshot {
            listening_on: s.listener_names(),
            healthz_ok: true,
            advertised_revision_per_shard: vec![db.revision],
        };
        self.db = Some(db);
        s.ready(readiness, lock)?;
        Ok(())
    }

    /// Everything that follows from what happened: the driver's events and our timers, until
    /// neither has anything left.
    fn settle(&mut self, driver: &mut Driver) -> Res<()> {
        loop {
            let mut busy = false;
            match driver {
                Driver::Incumbent(inc) => {
                    if let Some(ev) = inc.poll_event() {
                        self.on_incumbent_event(inc, ev)?;
                        busy = true;
                    }
                }
                Driver::Successor(s) => {
                    if let Some(ev) = s.poll_event() {
                        self.on_successor_event(driver, ev)?;
                        busy = true;
                    }
                }
                Driver::Switching => {}
            }
            busy |= self.timers(driver)?;
            if !busy {
                return Ok(());
            }
        }
    }
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
/// nothing of the library's (or mio's) leaks into the daemon's own children.
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

fn main() -> Res<()> {
    raise_nofile();
    let data = env_path("TESTD_DATA");
    let sock = env_path("TESTD_SOCK");
    let fail = std::env::var("TESTD_FAIL").unwrap_or_default();
    let drain_ms = std::env::var("TESTD_DRAIN_MS")
        .ok()
        .map_or(0, |ms| ms.parse().unwrap_or(0));
    let pid = std::process::id();
    let role = detect_role()?;
    if let (Role::Successor(_), "no-hello") = (&role, fail.as_str()) {
        // Never answer (the channel stays open): the supervisor must give up on its own.
        loop {
            std::thread::park();
        }
    }

    let poll = Poll::new()?;
    let mut app = App {
        pid,
        data: data.clone(),
        sock: sock.clone(),
        fail,
        drain_ms,
        poll,
        listeners: Vec::new(),
        accepting: false,
        accept_retry: None,
        conns: BTreeMap::new(),
        next_conn: 0,
        db: None,
        drain: None,
        opening: None,
        _hung: None,
    };
    let mut driver = match role {
        Role::ColdStart { mut inherited } => {
            let names: Vec<String> = inherited.names().iter().map(|s| s.to_string()).collect();
            for n in names {
                let l = if let Some(l) = inherited.take::<std::net::TcpListener>(&n) {
                    Listener::new(ListenerKind::Tcp, l)?
                } else if let Some(l) = inherited.take::<std::net::UdpSocket>(&n) {
                    Listener::new(ListenerKind::Udp, l)?
                } else if let Some(l) = inherited.take::<std::os::unix::net::UnixListener>(&n) {
                    Listener::new(ListenerKind::UnixStream, l)?
                } else if let Some(l) = inherited.take::<std::os::unix::net::UnixDatagram>(&n) {
                    Listener::new(ListenerKind::UnixDatagram, l)?
                } else {
                    continue;
                };
                app.listeners.push(l);
            }
            let lock = DataDirLock::acquire_or_break_stale(&data)?;
            app.db = Some(Db::open(&data)?);
            let inc = IncumbentConfig::bind_cold_start(&sock, lock)?.with_timing(timing());
            let inc = handoff_io_mio::Incumbent::new(inc, app.poll.registry(), INCUMBENT_TOKENS)?;
            app.start_accepting()?;
            event(&format!("serving pid={pid} role=cold"));
            report_child_fds();
            Driver::Incumbent(inc)
        }
        Role::Successor(s) => {
            event(&format!("successor-started pid={pid}"));
            if app.fail == "hello-after-supervisor-exit" {
                // Say hello only once the supervisor that spawned us is gone (getppid changes
                // when the parent dies; 30 s at most), so a test that kills it at
                // `successor-started` knows the handoff went no further.
                let parent = std::os::unix::process::parent_id();
                let until = Instant::now() + Duration::from_secs(30);
                while std::os::unix::process::parent_id() == parent && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let s = handoff_io_mio::Successor::new(
                s,
                format!("mio_kv {pid}"),
                timing(),
                app.poll.registry(),
                SUCCESSOR_TOKEN,
            )?;
            Driver::Successor(s)
        }
    };

    let mut events = Events::with_capacity(1024);
    loop {
        app.settle(&mut driver)?;
        let until = earliest(driver.poll_timeout(), app.next_timer());
        let timeout = until.map(|t| t.saturating_duration_since(Instant::now()));
        match app.poll.poll(&mut events, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        }
        for ev in events.iter() {
            if driver.owns(ev.token()) {
                driver.handle_event(ev)?;
            } else {
                app.handle_event(ev);
            }
        }
        driver.handle_timeout()?;
    }
}
