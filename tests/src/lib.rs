//! Shared harness of the end-to-end tests: a temporary directory, a cluster (this test
//! process as the supervisor, `testd` as the daemon), and line-protocol clients.
//!
//! Everything is real: the supervisor is `handoff::supervisor::Supervisor`, the daemons are
//! `testd` processes, the listeners are real sockets, the lock is a real `flock`. Waits are
//! bounded and wait on the event they need (an answer, an exit), never on a sleep.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use handoff::supervisor::{HandoffOutcome, Recovery, SpawnSpec, Supervisor};
use handoff::Timing;
use handoff_engine::{SupervisorEngine, SupervisorEvent};

/// How long any single wait of a test may take before it fails.
pub const BOUND: Duration = Duration::from_secs(30);

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name contains `tag`.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            // Short: Unix socket paths must fit in 108 bytes.
            let p = std::env::temp_dir().join(format!("ho-{}-{tag}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return TempDir(p),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", p.display()),
            }
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Timings scaled down for tests: heartbeat 100 ms, silence 4 s, slack 3 s. (1.5 s was too
/// tight: on 2 loaded cores a whole process can stall that long, and a live peer was taken
/// for silent.)
pub fn test_timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_millis(100),
        peer_silence: Duration::from_millis(4000),
        slack: Duration::from_millis(3000),
        retry_interval: Duration::from_millis(20),
        recovery_wait: Duration::from_secs(5),
        ..Timing::default()
    }
}

/// The listeners of a cluster, held by the test (the supervisor's side).
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A UDP socket.
    Udp(UdpSocket),
    /// A Unix stream listener, and its path.
    Unix(UnixListener, PathBuf),
    /// A Unix datagram socket, and its path.
    UnixDgram(UnixDatagram, PathBuf),
}

impl Listener {
    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Udp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
            Listener::UnixDgram(l, _) => l.as_fd(),
        }
    }
}

/// Which driver a scenario runs on: the daemon (`testd`, or `testd-mio`, the mio example)
/// and the supervisor (`handoff::supervisor::Supervisor`, or `handoff_io_mio::Supervisor` in
/// a mio loop of this test process).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// The blocking std driver.
    Std,
    /// The mio driver.
    Mio,
}

impl Driver {
    /// This driver's test daemon.
    pub fn daemon(self) -> PathBuf {
        bin(match self {
            Driver::Std => "testd",
            Driver::Mio => "testd-mio",
        })
    }
}

/// A binary of this package, in `target/<profile>/` (next to a bin, one up from a test in
/// `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built", p.display());
    p
}

/// Run a scenario `fn name(driver: Driver)` on both drivers: `name::std` and `name::mio`.
#[macro_export]
macro_rules! on_both_drivers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn std() {
                super::$name($crate::Driver::Std)
            }
            #[test]
            fn mio() {
                super::$name($crate::Driver::Mio)
            }
        }
    )*};
}

/// The supervisor of a [`Cluster`], of either driver, with the std API.
#[derive(Debug)]
pub enum Sup {
    /// Not built yet.
    Unset,
    /// `handoff::supervisor::Supervisor`.
    Std(Supervisor),
    /// `handoff_io_mio::Supervisor` in a mio loop.
    Mio(MioSup),
}

impl Sup {
    /// See `Supervisor::resume_from_journal`.
    pub fn resume_from_journal(&self) -> handoff::error::Result<Recovery> {
        match self {
            Sup::Std(s) => s.resume_from_journal(),
            Sup::Mio(s) => s.resume_from_journal(),
            Sup::Unset => unreachable!("built in the constructor"),
        }
    }

    /// See `Supervisor::perform_handoff`.
    pub fn perform_handoff(&self, spec: SpawnSpec) -> handoff::error::Result<HandoffOutcome> {
        match self {
            Sup::Std(s) => s.perform_handoff(spec),
            Sup::Mio(s) => s.perform_handoff(spec),
            Sup::Unset => unreachable!("built in the constructor"),
        }
    }

    /// See `Supervisor::serving`.
    pub fn serving(&self) -> Option<u32> {
        match self {
            Sup::Std(s) => s.serving(),
            Sup::Mio(s) => s.serving(),
            Sup::Unset => None,
        }
    }
}

/// The mio supervisor driven by a mio loop in the calling thread, behind the blocking API
/// the tests use. One call at a time; another gets `Busy` at once, as with the std one.
#[derive(Debug)]
pub struct MioSup {
    inner: std::sync::Mutex<(mio::Poll, handoff_io_mio::Supervisor)>,
    serving: std::sync::atomic::AtomicU32,
}

impl MioSup {
    /// Drive `engine` from a fresh mio poll.
    pub fn new(engine: SupervisorEngine) -> MioSup {
        let poll = mio::Poll::new().expect("mio poll");
        let tokens = handoff_io_mio::Tokens {
            start: 1000,
            len: 64,
        };
        let sup = handoff_io_mio::Supervisor::new(engine, poll.registry(), tokens)
            .expect("mio supervisor");
        MioSup {
            inner: std::sync::Mutex::new((poll, sup)),
            serving: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn lock(
        &self,
    ) -> handoff::error::Result<std::sync::MutexGuard<'_, (mio::Poll, handoff_io_mio::Supervisor)>>
    {
        self.inner.try_lock().map_err(|_| {
            handoff::error::Error::Busy(handoff::supervisor::Busy {
                what: "another call on this supervisor is running".into(),
                handoff: None,
            })
        })
    }

    /// Run the loop until the driver reports an event; bounded by [`BOUND`] plus `extra`.
    fn run(
        poll: &mut mio::Poll,
        sup: &mut handoff_io_mio::Supervisor,
        extra: Duration,
    ) -> handoff::error::Result<SupervisorEvent> {
        let until = std::time::Instant::now() + BOUND + extra;
        let mut events = mio::Events::with_capacity(64);
        loop {
            if let Some(ev) = sup.poll_event() {
                return Ok(ev);
            }
            let now = std::time::Instant::now();
            assert!(now < until, "the mio supervisor reported nothing in time");
            let wake = sup.poll_timeout().map_or(until, |t| t.min(until));
            poll.poll(&mut events, Some(wake.saturating_duration_since(now)))?;
            for ev in events.iter() {
                assert!(sup.owns(ev.token()), "a token nobody registered");
                sup.handle_event(ev)?;
            }
            sup.handle_timeout()?;
        }
    }

    fn recover(
        poll: &mut mio::Poll,
        sup: &mut handoff_io_mio::Supervisor,
    ) -> handoff::error::Result<Recovery> {
        sup.start_recovery()?;
        match MioSup::run(poll, sup, Duration::from_secs(20))? {
            SupervisorEvent::Recovered(r) => Ok(r),
            SupervisorEvent::Failed(e) => Err(e),
            SupervisorEvent::Outcome(o) => panic!("an outcome during a recovery: {o:?}"),
        }
    }

    /// See `Supervisor::resume_from_journal`.
    pub fn resume_from_journal(&self) -> handoff::error::Result<Recovery> {
        let mut g = self.lock()?;
        let (poll, sup) = &mut *g;
        let r = MioSup::recover(poll, sup);
        self.publish(sup);
        r
    }

    /// See `Supervisor::perform_handoff`.
    pub fn perform_handoff(&self, spec: SpawnSpec) -> handoff::error::Result<HandoffOutcome> {
        let mut g = self.lock()?;
        let (poll, sup) = &mut *g;
        // What happened since the last call (the incumbent may have died).
        let mut events = mio::Events::with_capacity(64);
        poll.poll(&mut events, Some(Duration::ZERO))?;
        for ev in events.iter() {
            sup.handle_event(ev)?;
        }
        sup.handle_timeout()?;
        if let Some(SupervisorEvent::Failed(e)) = sup.poll_event() {
            return Err(e);
        }
        if sup.needs_recovery() {
            MioSup::recover(poll, sup)?;
        }
        let deadline = spec.deadline;
        sup.trigger(spec)?;
        let r = match MioSup::run(poll, sup, deadline)? {
            SupervisorEvent::Outcome(o) => Ok(o),
            SupervisorEvent::Failed(e) => Err(e),
            SupervisorEvent::Recovered(r) => panic!("a recovery during a handoff: {r:?}"),
        };
        self.publish(sup);
        r
    }

    fn publish(&self, sup: &handoff_io_mio::Supervisor) {
        self.serving.store(
            sup.serving().unwrap_or(0),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// See `Supervisor::serving`.
    pub fn serving(&self) -> Option<u32> {
        match self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            p => Some(p),
        }
    }
}

/// A data directory, a control socket, listeners, and a supervisor for `testd`.
#[derive(Debug)]
pub struct Cluster {
    /// Holds every path of the cluster.
    pub dir: TempDir,
    /// `testd`'s binary.
    pub testd: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// The control socket.
    pub sock: PathBuf,
    /// The listeners, by name.
    pub listeners: Vec<(String, Listener)>,
    /// The supervisor (this test process), of the driver's kind.
    pub sup: Sup,
    /// Which driver the daemon and the supervisor use.
    pub driver: Driver,
}

impl Cluster {
    /// A cluster with one TCP listener named `http` on 127.0.0.1.
    pub fn tcp(driver: Driver, tag: &str) -> Cluster {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        Cluster::with_listeners(driver, tag, vec![("http".into(), Listener::Tcp(l))])
    }

    /// A cluster with these listeners, on `driver`'s daemon and supervisor. The supervisor
    /// cold-starts the daemon when nobody serves.
    pub fn with_listeners(
        driver: Driver,
        tag: &str,
        listeners: Vec<(String, Listener)>,
    ) -> Cluster {
        let dir = TempDir::new(tag);
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        let sock = dir.path().join("ctl.sock");
        let mut c = Cluster {
            dir,
            driver,
            testd: driver.daemon(),
            data,
            sock,
            listeners,
            sup: Sup::Unset,
        };
        c.sup = c.build_sup(c.spec(&[]));
        c
    }

    /// The same cluster with `daemon`'s test daemon instead (the supervisor stays of
    /// `self.driver`'s kind): mixes the drivers.
    pub fn with_daemon(mut self, daemon: Driver) -> Cluster {
        self.testd = daemon.daemon();
        self.sup = self.build_sup(self.spec(&[]));
        self
    }

    /// A supervisor of `self.driver`'s kind for this cluster, cold-starting with `cold`.
    fn build_sup(&self, cold: SpawnSpec) -> Sup {
        match self.driver {
            Driver::Std => {
                let mut s = Supervisor::new(&self.sock)
                    .expect("supervisor")
                    .with_timing(test_timing())
                    .with_cold_start(cold);
                for (name, l) in &self.listeners {
                    s = s.with_listener_fd(name, l.fd());
                }
                Sup::Std(s)
            }
            Driver::Mio => {
                let mut e = SupervisorEngine::new(&self.sock)
                    .expect("supervisor")
                    .with_timing(test_timing())
                    .with_cold_start(cold);
                for (name, l) in &self.listeners {
                    e = e.with_listener_fd(name, l.fd());
                }
                Sup::Mio(MioSup::new(e))
            }
        }
    }

    /// How to run `testd` for this cluster, with extra environment.
    pub fn spec(&self, env: &[(&str, &str)]) -> SpawnSpec {
        let mut e = vec![
            ("TESTD_DATA".into(), self.data.clone().into_os_string()),
            ("TESTD_SOCK".into(), self.sock.clone().into_os_string()),
            ("TESTD_TIMING_MS".into(), "100,4000,3000".into()),
        ];
        for (k, v) in env {
            e.push(((*k).into(), (*v).into()));
        }
        SpawnSpec {
            binary: self.testd.clone(),
            env: e,
            drain_grace: Duration::from_secs(5),
            deadline: Duration::from_secs(10),
            ..Default::default()
        }
    }

    /// The TCP listener `http`'s address.
    pub fn http(&self) -> std::net::SocketAddr {
        for (n, l) in &self.listeners {
            if let (true, Listener::Tcp(l)) = (n == "http", l) {
                return l.local_addr().expect("addr");
            }
        }
        panic!("no http listener");
    }

    /// The lock file.
    pub fn lock_file(&self) -> PathBuf {
        handoff_engine::sys::lock::lock_file_path(&self.data)
    }
}

impl Drop for Cluster {
    /// Kill every daemon still holding the data directory (the serving one, or a leftover),
    /// so no test leaves a process behind.
    fn drop(&mut self) {
        let mut pids = handoff_engine::sys::lock::holders(&self.lock_file()).unwrap_or_default();
        pids.extend(self.sup.serving());
        for pid in pids {
            if let Ok(w) = handoff_engine::sys::spawn::Watched::open(pid) {
                let _ = w.kill();
                let _ = handoff_engine::sys::spawn::wait_any(&[&w], BOUND);
            }
        }
    }
}

/// One line-protocol connection.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<Box<dyn ReadWrite>>,
}

/// Read + Write + Debug for a client's stream.
pub trait ReadWrite: io::Read + io::Write + Send + std::fmt::Debug {}
impl<T: io::Read + io::Write + Send + std::fmt::Debug> ReadWrite for T {}

impl Client {
    /// Connect over TCP; every read and write is bounded by [`BOUND`].
    pub fn tcp(addr: std::net::SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, BOUND)?;
        s.set_read_timeout(Some(BOUND))?;
        s.set_write_timeout(Some(BOUND))?;
        Ok(Client {
            reader: BufReader::new(Box::new(s)),
        })
    }

    /// Connect to a Unix stream listener.
    pub fn unix(path: &Path) -> io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(BOUND))?;
        s.set_write_timeout(Some(BOUND))?;
        Ok(Client {
            reader: BufReader::new(Box::new(s)),
        })
    }

    /// Send one request line and read the answer. A clean end of stream is
    /// `UnexpectedEof`.
    pub fn call(&mut self, line: &str) -> io::Result<String> {
        let w = self.reader.get_mut();
        w.write_all(format!("{line}\n").as_bytes())?;
        w.flush()?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of stream",
            ));
        }
        Ok(answer.trim_end().to_string())
    }

    /// `PING` → the pid that answered.
    pub fn ping(&mut self) -> io::Result<u32> {
        let a = self.call("PING")?;
        a.strip_prefix("PONG ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad answer {a:?}")))
    }
}

/// Whether a process exists (a zombie counts as gone once reaped).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// Wait (bounded by [`BOUND`]) until process `pid` has exited, through a pidfd.
pub fn wait_gone(pid: u32) -> bool {
    match handoff_engine::sys::spawn::Watched::open(pid) {
        Err(_) => true,
        Ok(w) => !handoff_engine::sys::spawn::wait_any(&[&w], BOUND)
            .expect("wait_any")
            .is_empty(),
    }
}

/// Whether the test `test`, which needs root for `why` ("it writes ns_last_pid"), may run:
/// `true` as root. Otherwise one line on stderr (`SKIPPED <test>: needs root (<why>)`) and
/// `false`, for the test to return at once; with `HANDOFF_REQUIRE_ROOT_TESTS=1` (CI), a panic
/// instead, so that a run that must prove the root-only tests cannot skip them.
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

/// The supervisor as a process of its own, `testsup`, so that a test can really kill it: a
/// [`Site`] (a directory, a control socket, a data directory) and the events every `testsup`
/// started on it prints, with the daemons it starts (`listening addr=…`, `recovered pid=…`,
/// `draining pid=…`: one per line, on their shared stdout).
pub mod testsup {
    use std::io::{BufRead, BufReader};
    use std::path::PathBuf;
    use std::process::{Child, ChildStdin, Command, Stdio};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Instant;

    use super::{bin, Driver, TempDir, BOUND};

    /// A running `testsup`: it ends when its stdin closes.
    #[derive(Debug)]
    pub struct Sup {
        /// The process.
        pub child: Child,
        /// Its commands (`handoff <fail>`).
        pub stdin: ChildStdin,
    }

    /// A directory with a data directory and a control socket (`ctl.sock`), and the events of
    /// the `testsup` processes started on it. Dropped, it kills whoever holds the data
    /// directory's lock (a daemon of a test that failed half-way).
    #[derive(Debug)]
    pub struct Site {
        /// The driver of the supervisor and its daemons.
        pub driver: Driver,
        /// The directory.
        pub dir: TempDir,
        events: Receiver<String>,
        tx: Sender<String>,
    }

    impl Site {
        /// A new site, its directory named after `tag`.
        pub fn new(driver: Driver, tag: &str) -> Site {
            let dir = TempDir::new(tag);
            std::fs::create_dir(dir.path().join("data")).expect("mkdir");
            let (tx, events) = channel();
            Site {
                driver,
                dir,
                events,
                tx,
            }
        }

        /// The control socket.
        pub fn sock(&self) -> PathBuf {
            self.dir.path().join("ctl.sock")
        }

        /// The supervisor's journal (`<control socket>.journal`).
        pub fn journal(&self) -> PathBuf {
            self.dir.path().join("ctl.sock.journal")
        }

        /// Start `testsup`, binding its own listener if `bind`, with `env` added to its
        /// environment; every line it or its daemons print arrives on the events ([`wait`]).
        ///
        /// [`wait`]: Site::wait
        pub fn sup(&self, bind: bool, env: &[(&str, &str)]) -> Sup {
            let mut cmd = Command::new(bin("testsup"));
            cmd.arg(self.sock()).arg(self.driver.daemon());
            if self.driver == Driver::Mio {
                cmd.env("TESTSUP_DRIVER", "mio");
            }
            if bind {
                cmd.args(["bind", "127.0.0.1:0"]);
            }
            cmd.env("TESTD_DATA", self.dir.path().join("data"))
                .env("TESTD_SOCK", self.sock())
                .env("TESTD_TIMING_MS", "100,4000,3000")
                .envs(env.iter().copied())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn testsup");
            let out = child.stdout.take().expect("stdout");
            let tx = self.tx.clone();
            // Reads until every writer (the supervisor and the daemons it started) has closed.
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            let stdin = child.stdin.take().expect("stdin");
            Sup { child, stdin }
        }

        /// The next event containing `what` (others are skipped), within [`BOUND`].
        pub fn wait(&self, what: &str) -> String {
            let until = Instant::now() + BOUND;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(left) {
                    Ok(line) if line.contains(what) => return line,
                    Ok(_) => {}
                    Err(e) => panic!("no {what:?} event within {BOUND:?}: {e}"),
                }
            }
        }
    }

    impl Drop for Site {
        fn drop(&mut self) {
            // Daemons still holding the lock (a test that failed half-way).
            let lock = handoff_engine::sys::lock::lock_file_path(&self.dir.path().join("data"));
            for pid in handoff_engine::sys::lock::holders(&lock).unwrap_or_default() {
                if let Ok(w) = handoff_engine::sys::spawn::Watched::open(pid) {
                    let _ = w.kill();
                    let _ = handoff_engine::sys::spawn::wait_any(&[&w], BOUND);
                }
            }
        }
    }

    /// The value of `key=` in an event line; a panic if there is none.
    pub fn field(line: &str, key: &str) -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    }
}

// ==== BEGIN: helpers of security.rs, fd_hygiene.rs, listener_kinds.rs, many_listeners.rs ====
// (Additive block, kept apart from the rest of the harness.)

/// Helpers for the security, descriptor-hygiene and listener tests: what a process holds
/// open (`/proc/<pid>/fd` and `fdinfo`), the kernel's table of Unix sockets, a supervisor's
/// `Hello` over a control socket, and stopping a daemon.
pub mod probe {
    use std::collections::BTreeMap;
    use std::io::{self, Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use handoff_proto::wire::{
        encode, Decoder, Hello, HelloAck, Message, PeerRole, HANDSHAKE_VERSION, SUPPORTED_VERSIONS,
    };

    use super::{Cluster, BOUND};

    /// `O_CLOEXEC` as `/proc/<pid>/fdinfo/<n>` reports it in `flags:` (octal): the kernel adds
    /// it there when the descriptor has `FD_CLOEXEC`.
    const O_CLOEXEC: u32 = 0o2_000_000;

    impl Cluster {
        /// Replace the cold-start command with one carrying extra environment.
        pub fn with_cold_start_env(mut self, env: &[(&str, &str)]) -> Cluster {
            let spec = self.spec(env);
            self.sup = self.build_sup(spec);
            self
        }
    }

    /// One open descriptor of a process.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Fd {
        /// Its number.
        pub fd: i32,
        /// What `/proc/<pid>/fd/<n>` links to (`socket:[ino]`, a path, `pipe:[ino]`, …).
        pub target: PathBuf,
        /// Whether it has `FD_CLOEXEC`.
        pub cloexec: bool,
    }

    impl Fd {
        /// The inode of a `socket:[ino]` target.
        pub fn socket_inode(&self) -> Option<u64> {
            self.target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        }
    }

    /// Every descriptor process `pid` (a number, or `self`) holds, by number. Descriptors that
    /// close while they are being read are left out.
    pub fn open_fds(pid: &str) -> io::Result<BTreeMap<i32, Fd>> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let e = e?;
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let (Ok(target), Ok(info)) = (
                std::fs::read_link(e.path()),
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")),
            ) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .ok_or_else(|| io::Error::other(format!("no flags in fdinfo of {fd}")))?;
            out.insert(
                fd,
                Fd {
                    fd,
                    target,
                    cloexec: flags & O_CLOEXEC != 0,
                },
            );
        }
        Ok(out)
    }

    /// The descriptors of 3 or more that this process holds *without* close-on-exec: every
    /// child it starts inherits them (whatever started the test leaked them to it), so they
    /// are expected in the daemons and their children too.
    pub fn inheritable_baseline() -> BTreeMap<i32, PathBuf> {
        open_fds("self")
            .expect("/proc/self/fd")
            .into_values()
            .filter(|f| f.fd > 2 && !f.cloexec)
            .map(|f| (f.fd, f.target))
            .collect()
    }

    /// The inode of a socket (or any file) this process holds.
    pub fn inode(fd: impl AsFd) -> u64 {
        rustix::fs::fstat(fd).expect("fstat").st_ino
    }

    /// One line of `/proc/net/unix`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct UnixSocket {
        /// `Flags`: `0x10000` (`__SO_ACCEPTCON`) on a listening socket.
        pub flags: u32,
        /// `St`: 1 unconnected (or listening), 3 connected.
        pub state: u32,
        /// The address it was bound to (an accepted socket shows its listener's), if any.
        pub path: Option<PathBuf>,
    }

    impl UnixSocket {
        /// Whether it is a listening socket.
        pub fn listening(&self) -> bool {
            self.flags & 0x10000 != 0
        }
    }

    /// The Unix sockets of this network namespace, by inode.
    pub fn unix_sockets() -> BTreeMap<u64, UnixSocket> {
        let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
        table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ino = f.get(6)?.parse().ok()?;
                Some((
                    ino,
                    UnixSocket {
                        flags: u32::from_str_radix(f.get(3)?, 16).ok()?,
                        state: u32::from_str_radix(f.get(5)?, 16).ok()?,
                        path: f.get(7).map(PathBuf::from),
                    },
                ))
            })
            .collect()
    }

    /// Where [`handoff`]'s incumbent `pid` first binds the control socket `sock` (it then
    /// renames it into place; `/proc/net/unix` keeps the bound name).
    pub fn control_bind_path(sock: &Path, pid: u32) -> PathBuf {
        let mut name = sock.file_name().expect("file name").to_os_string();
        name.push(format!(".{pid}.tmp"));
        sock.with_file_name(name).join("s")
    }

    /// The names of process `pid`'s threads.
    pub fn thread_names(pid: u32) -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim_end().to_string())
            .collect()
    }

    /// Poll `ready` every few milliseconds until it holds or `bound` passes; whether it held.
    /// Only for states no event announces (a file appearing, a thread ending in another
    /// process): each step is a bounded `park_timeout`, and the whole wait is bounded.
    pub fn poll_until(bound: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + bound;
        loop {
            if ready() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }

    /// Open a supervisor session on the control socket `sock` (a `Hello` as the supervisor)
    /// and read the `HelloAck`; the session stays open as long as the returned stream.
    pub fn hello(sock: &Path) -> io::Result<(UnixStream, HelloAck)> {
        let mut s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(BOUND))?;
        s.set_write_timeout(Some(BOUND))?;
        let hello = Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions: SUPPORTED_VERSIONS,
            pid: std::process::id(),
            build_id: "handoff-tests probe".into(),
        });
        s.write_all(&encode(HANDSHAKE_VERSION, &hello).map_err(io::Error::other)?)?;
        let mut dec = Decoder::new(SUPPORTED_VERSIONS);
        let mut buf = [0u8; 4096];
        loop {
            match dec.next_message().map_err(io::Error::other)? {
                Some(Message::HelloAck(ack)) => return Ok((s, ack)),
                Some(other) => {
                    return Err(io::Error::other(format!(
                        "expected HelloAck, got {}",
                        other.kind()
                    )))
                }
                None => {}
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "control socket closed before HelloAck",
                ));
            }
            dec.push(&buf[..n]);
        }
    }

    /// Kills (through pidfds) the daemons it watches when dropped, also when the test panics:
    /// a daemon left behind would hold the test's stdout and stderr open, and whatever reads
    /// them would wait for it.
    #[derive(Debug, Default)]
    pub struct Reaper(std::sync::Mutex<Vec<handoff_engine::sys::spawn::Watched>>);

    impl Reaper {
        /// A reaper watching nobody yet.
        pub fn new() -> Reaper {
            Reaper::default()
        }

        /// Kill `pid` when this is dropped; returns `pid`.
        pub fn watch(&self, pid: u32) -> u32 {
            if let Ok(w) = handoff_engine::sys::spawn::Watched::open(pid) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).push(w);
            }
            pid
        }
    }

    impl Drop for Reaper {
        fn drop(&mut self) {
            for w in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = w.kill();
            }
        }
    }

    /// Kill daemon `pid` (`SIGKILL` through a pidfd) and wait, bounded, until it is gone.
    pub fn stop_daemon(pid: u32) {
        if let Ok(w) = handoff_engine::sys::spawn::Watched::open(pid) {
            let _ = w.kill();
        }
        assert!(super::wait_gone(pid), "daemon {pid} did not exit");
    }
}
// ==== END: helpers of security.rs, fd_hygiene.rs, listener_kinds.rs, many_listeners.rs ====
