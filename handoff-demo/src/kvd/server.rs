//! The service: a line-based TCP key-value server over the [`Wal`], and its drain.
//!
//! One thread accepts; every connection is served by a thread of its own. A connection reads
//! one request per line and writes each answer with one `write` (TCP_NODELAY is set too: an
//! answer split over two segments meets Nagle and delayed ACKs, 40 ms stalls).
//!
//! [`Limits`] bound what clients can hold: at most `max_conns` connections (a connection
//! beyond them is accepted, answered `ERR busy` and closed), and each request line must
//! arrive whole within `idle_timeout` of the previous answer (or of the accept), else the
//! connection is closed (a clean end of stream: the client sent no whole request, so nothing
//! was executed). A write that cannot proceed for `idle_timeout` (a client that does not read
//! its answers) ends the connection too.
//!
//! The drain (see [`Server::drain`]) closes the gate (the accept loop takes no connection from
//! then on: new ones wait in the kernel's queue, which the successor shares), refuses writes,
//! waits for the request each connection is executing (a `SET` until its group commit), and
//! half-closes every connection after its last answer. A connection's thread then reads, and
//! ignores, whatever the client still sends until the client closes, so the end is a clean end
//! of stream on both sides, never a reset.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use handoff::DrainReport;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::kvd::log::{SetError, Wal};
use crate::kvd::say;

/// A request line longer than this is refused, and the connection closed.
const MAX_LINE: usize = 64 * 1024;

/// What clients may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is answered `ERR busy` and closed.
    pub max_conns: usize,
    /// How long a connection may take to send a whole request line after the previous
    /// answer (or the accept), and how long a write may block.
    pub idle_timeout: Duration,
}

impl Limits {
    /// 1,024 connections; 60 s.
    pub const DEFAULT: Limits = Limits {
        max_conns: 1024,
        idle_timeout: Duration::from_secs(60),
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// The server: the log, the gate of the accept loop, the connections.
#[derive(Debug)]
pub struct Server {
    pid: u32,
    build: String,
    limits: Limits,
    wal: Wal,
    gate: Mutex<Gate>,
    /// The gate opened or closed, or a connection ended.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Gate {
    /// A handoff drained this process: accept nothing.
    stopped: bool,
    conns: HashMap<u64, Arc<Conn>>,
    next_id: u64,
    /// Connections are being refused (at `max_conns`); said once per run of refusals.
    refusing: bool,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    state: Mutex<ConnState>,
    /// `busy` went false.
    idle: Condvar,
}

#[derive(Debug, Default)]
struct ConnState {
    /// A request is being executed and answered.
    busy: bool,
    /// Drained: execute nothing more, half-close after the answer in progress.
    closing: bool,
    /// The write side is shut down.
    shut: bool,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shut the write side down once: the client reads the end of the stream after the last
    /// answer.
    fn half_close(&self, st: &mut ConnState) {
        if !st.shut {
            st.shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }
}

/// Answer a connection beyond the limit `ERR busy` and close it. The accept loop must not
/// wait for it: one write that fits in the empty send buffer (non-blocking), and what the
/// client already sent is read first, so that the close is a clean end of stream if it sent no
/// more.
fn refuse(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let _ = (&stream).read(&mut [0; 4096]);
    let _ = (&stream).write(b"ERR busy\n");
    let _ = stream.shutdown(Shutdown::Write);
}

/// A connection's reads, each bounded by what remains until `until`.
struct Timed<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

impl Server {
    /// A server of `wal`, its clients bound by `limits`; `build` is what `PING` reports.
    pub fn new(wal: Wal, build: String, limits: Limits) -> Arc<Server> {
        Arc::new(Server {
            pid: std::process::id(),
            build,
            limits,
            wal,
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
        })
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accept connections on `listener` for ever (returns only if polling fails).
    ///
    /// The listener is shared with the supervisor and, during a handoff, the successor: it is
    /// non-blocking (a property of the shared socket, which every party `poll`s), and a
    /// connection is accepted only with the gate held open, so that once the drain closed the
    /// gate no connection is taken from the queue.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let tick = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            self.wait_while_stopped();
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            let mut gate = self.gate();
            if gate.stopped {
                continue;
            }
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) => {
                    use io::ErrorKind::*;
                    if !matches!(e.kind(), WouldBlock | Interrupted | ConnectionAborted) {
                        // Out of descriptors or memory: try again a little later.
                        say(&format!("accept: {e}"));
                        drop(
                            self.changed
                                .wait_timeout(gate, Duration::from_millis(100))
                                .unwrap_or_else(|p| p.into_inner()),
                        );
                    }
                    continue;
                }
            };
            if gate.conns.len() >= self.limits.max_conns {
                let first = !gate.refusing;
                gate.refusing = true;
                drop(gate);
                if first {
                    say(&format!(
                        "{} connections open, the limit: refusing new ones (ERR busy) until \
                         one ends",
                        self.limits.max_conns
                    ));
                }
                refuse(stream);
                continue;
            }
            gate.refusing = false;
            let _ = stream.set_nodelay(true);
            // Bounds each write; reads are bounded per request line (see `Timed`).
            let _ = stream.set_write_timeout(Some(self.limits.idle_timeout));
            let conn = Arc::new(Conn {
                stream,
                state: Mutex::new(ConnState::default()),
                idle: Condvar::new(),
            });
            let id = gate.next_id;
            gate.next_id += 1;
            gate.conns.insert(id, Arc::clone(&conn));
            drop(gate);
            let me = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name(format!("kvd-conn-{id}"))
                .spawn(move || me.serve_conn(id, conn));
            if let Err(e) = spawned {
                say(&format!("cannot start a connection thread: {e}"));
                self.unregister(id);
            }
        }
    }

    fn wait_while_stopped(&self) {
        let mut gate = self.gate();
        while gate.stopped {
            gate = self.changed.wait(gate).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn unregister(&self, id: u64) {
        self.gate().conns.remove(&id);
        self.changed.notify_all();
    }

    fn serve_conn(&self, id: u64, conn: Arc<Conn>) {
        let mut reader = BufReader::new(Timed {
            stream: &conn.stream,
            until: Instant::now(),
        });
        let mut line = Vec::new();
        loop {
            line.clear();
            // The whole next line must arrive within the idle timeout; if not, the read fails
            // and the connection ends.
            reader.get_mut().until = Instant::now() + self.limits.idle_timeout;
            match (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                // The client closed, the connection broke, or the idle timeout passed.
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let complete = line.last() == Some(&b'\n');
            if !complete && line.len() <= MAX_LINE {
                break; // closed in the middle of a line: there is nobody to answer
            }
            {
                let mut st = conn.lock();
                if st.closing {
                    continue; // drained: read on to the client's end of stream
                }
                st.busy = true;
            }
            let mut reply = if complete {
                self.answer(&line[..line.len() - 1])
            } else {
                "ERR line too long".to_string()
            };
            reply.push('\n');
            // One write per answer.
            let written = (&conn.stream).write_all(reply.as_bytes());
            let mut st = conn.lock();
            st.busy = false;
            if !complete {
                st.closing = true;
            }
            if st.closing {
                conn.half_close(&mut st);
            }
            conn.idle.notify_all();
            drop(st);
            if written.is_err() {
                break;
            }
        }
        self.unregister(id);
    }

    /// The answer to one request line (without its newline).
    fn answer(&self, line: &[u8]) -> String {
        let Ok(line) = std::str::from_utf8(line) else {
            return "ERR request is not UTF-8".into();
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("SET"), Some(key), Some(value)) if !key.is_empty() => {
                match self.wal.set(key, value) {
                    Ok(revision) => format!("OK {revision}"),
                    Err(SetError::Retry) => "ERR retry".into(),
                    Err(SetError::Failed(e)) => format!("ERR io: {e}").replace('\n', " "),
                }
            }
            (Some("GET"), Some(key), None) if !key.is_empty() => match self.wal.get(key) {
                Some(value) => format!("VAL {value}"),
                None => "NONE".into(),
            },
            (Some("PING"), None, None) => format!("PONG {} {}", self.pid, self.build),
            _ => "ERR usage: SET <key> <value> | GET <key> | PING".into(),
        }
    }

    /// The drain hook: close the gate, refuse writes, let every connection finish the request
    /// it is executing (waiting for its group commit) and half-close it after that answer.
    /// Connections still busy at `deadline` are counted; they half-close after their answer.
    pub fn drain(&self, deadline: Instant) -> DrainReport {
        let conns: Vec<Arc<Conn>> = {
            let mut gate = self.gate();
            gate.stopped = true;
            gate.conns.values().cloned().collect()
        };
        // Closing first: a request that starts from now on is not executed (its client reads
        // the end of the stream and sends it again); one already executing that writes after
        // the freeze is answered `ERR retry`.
        for conn in &conns {
            conn.lock().closing = true;
        }
        self.wal.freeze();
        let mut remaining = 0;
        for conn in &conns {
            let mut st = conn.lock();
            while st.busy {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = conn
                    .idle
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if st.busy {
                remaining += 1;
            } else {
                conn.half_close(&mut st);
            }
        }
        self.wal.wait_quiet(deadline);
        DrainReport {
            open_conns_remaining: remaining,
            accept_closed: true,
        }
    }

    /// After a rolled-back handoff: reopen the log (a new segment) from disk and accept again.
    /// Connections are accepted even if the log cannot be reopened (a full disk): reads are
    /// served, and writes are answered with the log's error until a later reopen or seal
    /// succeeds. The error is returned for the log line.
    pub fn resume(&self) -> io::Result<()> {
        let reopened = self.wal.reopen();
        self.gate().stopped = false;
        self.changed.notify_all();
        reopened
    }

    /// Connections open now.
    pub fn open_conns(&self) -> u64 {
        self.gate().conns.len() as u64
    }

    /// After a successor took over: wait (up to `bound`) for the clients to close the
    /// connections this process half-closed, so that exiting resets none of them. Whether
    /// they all closed.
    pub fn wait_for_clients(&self, bound: Duration) -> bool {
        let until = Instant::now() + bound;
        let mut gate = self.gate();
        while !gate.conns.is_empty() {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            gate = self
                .changed
                .wait_timeout(gate, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvd::testutil::TempDir;
    use std::net::SocketAddr;
    use std::sync::mpsc;

    const BOUND: Duration = Duration::from_secs(30);

    /// A server on a fresh data directory and an ephemeral port, accepting on a thread.
    fn start(tag: &str) -> (TempDir, Arc<Server>, SocketAddr) {
        let dir = TempDir::new(tag);
        let server = Server::new(
            Wal::open(dir.path()).unwrap(),
            "kvd-test".into(),
            Limits::DEFAULT,
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = Arc::clone(&server);
        thread::spawn(move || accepting.serve(listener));
        (dir, server, addr)
    }

    struct Client(BufReader<TcpStream>);

    impl Client {
        fn connect(addr: SocketAddr) -> Client {
            let s = TcpStream::connect_timeout(&addr, BOUND).unwrap();
            s.set_read_timeout(Some(BOUND)).unwrap();
            Client(BufReader::new(s))
        }

        fn send(&mut self, request: &str) {
            self.0
                .get_mut()
                .write_all(format!("{request}\n").as_bytes())
                .unwrap();
        }

        /// The next line, or `None` at a clean end of stream (a reset fails the test).
        fn line(&mut self) -> Option<String> {
            let mut line = String::new();
            match self.0.read_line(&mut line) {
                Ok(0) => None,
                Ok(_) => Some(line.trim_end_matches('\n').to_string()),
                Err(e) => panic!("reading an answer: {e}"),
            }
        }

        fn ask(&mut self, request: &str) -> String {
            self.send(request);
            self.line().expect("an answer")
        }
    }

    #[test]
    fn answers_and_refuses_writes_from_the_drain_on() {
        let (_dir, server, _) = start("answers");
        let ask = |line: &str| server.answer(line.as_bytes());
        assert_eq!(ask("SET a one two"), "OK 1");
        assert_eq!(ask("GET a"), "VAL one two");
        assert_eq!(ask("GET b"), "NONE");
        assert_eq!(ask("PING"), format!("PONG {} kvd-test", std::process::id()));
        for bad in ["SET a", "SET  x", "GET", "GET a b", "PING x", "set a b", ""] {
            assert!(ask(bad).starts_with("ERR usage"), "{bad:?}: {}", ask(bad));
        }
        server.wal().freeze();
        assert_eq!(ask("SET b 2"), "ERR retry");
        assert_eq!(ask("GET a"), "VAL one two", "reads go on");
        server.resume().unwrap();
        assert_eq!(ask("SET b 2"), "OK 2");
    }

    #[test]
    fn drain_half_closes_after_the_last_answer_and_resume_accepts_again() {
        let (_dir, server, addr) = start("drain");
        let mut a = Client::connect(addr);
        assert_eq!(a.ask("SET x 1"), "OK 1");
        let report = server.drain(Instant::now() + BOUND);
        assert_eq!(report.open_conns_remaining, 0);
        assert!(report.accept_closed);
        // A clean end of stream; what the client still sends is read and ignored (so the
        // close is no reset) and not executed.
        assert_eq!(a.line(), None);
        a.send("SET y 2");
        assert_eq!(a.line(), None);
        drop(a);
        assert!(server.wait_for_clients(BOUND), "the connection ended");
        assert_eq!(server.wal().get("y"), None);

        // A new connection waits in the queue, and is served once the server resumes.
        let mut b = Client::connect(addr);
        b.send("PING");
        assert_eq!(server.open_conns(), 0, "not accepted while drained");
        server.resume().unwrap();
        assert!(b.line().unwrap().starts_with("PONG "));
        assert_eq!(b.ask("SET y 2"), "OK 2");
        assert_eq!(b.ask("GET x"), "VAL 1");
    }

    /// A rollback whose log cannot be reopened (a full disk) still accepts connections: reads
    /// are served, writes are answered with the error.
    #[test]
    fn resume_serves_reads_when_the_log_cannot_be_reopened() {
        let (dir, server, addr) = start("noreopen");
        let mut a = Client::connect(addr);
        assert_eq!(a.ask("SET x 1"), "OK 1");
        server.drain(Instant::now() + BOUND);
        assert_eq!(a.line(), None);
        drop(a);
        // Where the log's next segment goes.
        std::fs::create_dir(dir.path().join("seg-2.log")).unwrap();
        let e = server.resume().unwrap_err();
        let mut b = Client::connect(addr);
        assert!(b.ask("PING").starts_with("PONG "));
        assert_eq!(b.ask("GET x"), "VAL 1");
        assert_eq!(b.ask("SET y 2"), format!("ERR io: reopening the log: {e}"));
    }

    /// A `SET` waiting for its group commit when the drain starts is answered `OK` before its
    /// connection is half-closed.
    #[test]
    fn drain_waits_for_the_group_commit_in_flight() {
        let (_dir, server, addr) = start("inflight");
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        server.wal().set_before_sync(move |_| {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = release_rx.lock().unwrap().recv_timeout(BOUND);
        });
        let mut a = Client::connect(addr);
        a.send("SET k v");
        entered.recv_timeout(BOUND).unwrap(); // the SET is in its fsync
        let draining = {
            let server = Arc::clone(&server);
            thread::spawn(move || server.drain(Instant::now() + BOUND))
        };
        // Wait until the drain closed the gate, then let the fsync finish.
        let until = Instant::now() + BOUND;
        while !server.gate().stopped {
            assert!(Instant::now() < until, "the drain did not start");
            thread::yield_now();
        }
        release.send(()).unwrap();
        let report = draining.join().unwrap();
        assert_eq!(report.open_conns_remaining, 0);
        assert_eq!(a.line().as_deref(), Some("OK 1"));
        assert_eq!(a.line(), None, "half-closed after the answer");
    }
}
