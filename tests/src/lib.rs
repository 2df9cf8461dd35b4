//! Shared harness of the end-to-end tests: a temporary directory, a cluster (this test
//! process as the supervisor, `testd` as the daemon), and line-protocol clients.
//!
//! Everything is real: the supervisor is `handoff::supervisor::Supervisor`, the daemons are
//! `testd` processes, the listeners are real sockets, the lock is a real `flock`. Waits are
//! bounded and wait on the event they need (an answer, an exit), never on a sleep.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use handoff::supervisor::{SpawnSpec, Supervisor};
use handoff::Timing;

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

/// Timings scaled down for tests: heartbeat 100 ms, silence 1.5 s, slack 1.5 s.
pub fn test_timing() -> Timing {
    Timing {
        heartbeat_interval: Duration::from_millis(100),
        peer_silence: Duration::from_millis(1500),
        slack: Duration::from_millis(1500),
        retry_interval: Duration::from_millis(20),
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
    fn raw(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Udp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::UnixDgram(l, _) => l.as_raw_fd(),
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
    /// The supervisor (this test process).
    pub sup: Supervisor,
}

impl Cluster {
    /// A cluster with one TCP listener named `http` on 127.0.0.1.
    pub fn tcp(testd: &Path, tag: &str) -> Cluster {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        Cluster::with_listeners(testd, tag, vec![("http".into(), Listener::Tcp(l))])
    }

    /// A cluster with these listeners. The supervisor cold-starts `testd` when nobody
    /// serves.
    pub fn with_listeners(testd: &Path, tag: &str, listeners: Vec<(String, Listener)>) -> Cluster {
        let dir = TempDir::new(tag);
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        let sock = dir.path().join("ctl.sock");
        let mut sup = Supervisor::new(&sock)
            .expect("supervisor")
            .with_timing(test_timing())
            .with_recovery_wait(Duration::from_secs(5));
        for (name, l) in &listeners {
            sup = sup.with_listener(name, l.raw());
        }
        let mut c = Cluster {
            dir,
            testd: testd.to_path_buf(),
            data,
            sock,
            listeners,
            sup,
        };
        c.sup = std::mem::replace(&mut c.sup, Supervisor::new(&c.sock).expect("placeholder"))
            .with_cold_start(c.spec(&[]));
        c
    }

    /// How to run `testd` for this cluster, with extra environment.
    pub fn spec(&self, env: &[(&str, &str)]) -> SpawnSpec {
        let mut e = vec![
            ("TESTD_DATA".into(), self.data.clone().into_os_string()),
            ("TESTD_SOCK".into(), self.sock.clone().into_os_string()),
            ("TESTD_TIMING_MS".into(), "100,1500,1500".into()),
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
        handoff::sys::lock::lock_file_path(&self.data)
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
    match handoff::sys::spawn::Watched::open(pid) {
        Err(_) => true,
        Ok(w) => !handoff::sys::spawn::wait_any(&[&w], BOUND)
            .expect("wait_any")
            .is_empty(),
    }
}
