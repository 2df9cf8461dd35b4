//! `handoff-httpd`: a minimal HTTP/1.1 responder on the std driver, the no-op daemon of the
//! benchmarks (see `BENCHMARKS.md`).
//!
//! ```text
//! handoff-httpd --data <dir> --socket <control socket> [--listen 127.0.0.1:8080]
//! ```
//!
//! It serves every TCP listener it inherits (any name; `--listen` only on a cold start that
//! inherited none) and answers every request with `200 OK` and the body `ok\n`, keeping the
//! connection alive unless the client asks otherwise. It has no data: its data directory only
//! carries the handoff's lock, and its hooks do no work of their own.
//!
//! - **Accepting:** one thread polls every listener; each connection has a thread. Accepting
//!   happens under the gate's lock, so once the drain closed the gate no connection is taken
//!   from the kernel's queue (the successor, which shares the queue, takes it).
//! - **Drain:** close the gate and mark every connection closing. A closing connection answers
//!   its next request with `Connection: close`, half-closes, and reads to the client's end of
//!   stream: the client learns of the close from an answer, never from a reset or from a
//!   request that goes unanswered. The drain does not wait for that: with no data, a request
//!   answered by the retiring process after the seal is as good as one answered by the
//!   successor. The retired process waits (at most [`RETIRE_WAIT`]) for its connections to end
//!   before it exits.
//! - **Seal:** nothing to write. **Resume after an abort:** open the gate again.
//!
//! With `HANDOFF_BENCH_TIMINGS=<dir>` it records when its `main` began and how long its hooks
//! took (see `handoff_bench::timings`), for the latency benchmark's breakdown.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use handoff::drainable::ReadinessSnapshot;
use handoff::{
    detect_role, DataDirLock, DrainReport, Drainable, Incumbent, Role, SealReport, StateSnapshot,
};
use handoff_bench::{mono_ns, raise_nofile, timings};
use rustix::event::{poll, PollFd, PollFlags};

const USAGE: &str = "usage: handoff-httpd --data <dir> --socket <control socket> [--listen <addr>]";

/// How long a retired process waits for its clients to close their connections.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// A request head longer than this is refused (`431`) and the connection closed.
const MAX_HEAD: usize = 16 * 1024;

/// How long a connection waits for its client's end of stream after half-closing.
const LINGER: Duration = Duration::from_secs(2);

fn say(msg: &str) {
    if std::env::var_os("HTTPD_LOG").is_some_and(|v| v == "off") {
        return;
    }
    let line = format!("handoff-httpd[{}]: {msg}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[derive(Debug)]
struct Server {
    gate: Mutex<Gate>,
    /// A connection ended, or the gate opened.
    changed: Condvar,
    /// Written to wake the accept loop's `poll` when the gate changes.
    wake_w: OwnedFd,
    wake_r: OwnedFd,
}

#[derive(Debug, Default)]
struct Gate {
    stopped: bool,
    conns: HashMap<u64, Arc<Conn>>,
    next_id: u64,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    /// Answer the next request with `Connection: close`, then close.
    closing: AtomicBool,
}

impl Server {
    fn new() -> std::io::Result<Arc<Server>> {
        let (wake_r, wake_w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        Ok(Arc::new(Server {
            gate: Mutex::new(Gate::default()),
            changed: Condvar::new(),
            wake_w,
            wake_r,
        }))
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let _ = rustix::io::write(&self.wake_w, &[1]);
    }

    /// The accept loop, over every listener, until the process exits.
    fn accept_loop(self: &Arc<Self>, listeners: Vec<TcpListener>) {
        for l in &listeners {
            if let Err(e) = l.set_nonblocking(true) {
                say(&format!("listener: {e}"));
            }
        }
        loop {
            {
                let mut gate = self.gate();
                while gate.stopped {
                    gate = self.changed.wait(gate).unwrap_or_else(|p| p.into_inner());
                }
            }
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(listeners.len() + 1);
            fds.push(PollFd::new(&self.wake_r, PollFlags::IN));
            fds.extend(listeners.iter().map(|l| PollFd::new(l, PollFlags::IN)));
            if let Err(e) = poll(&mut fds, None) {
                if e != rustix::io::Errno::INTR {
                    say(&format!("poll: {e}"));
                }
                continue;
            }
            if !fds[0].revents().is_empty() {
                let mut sink = [0u8; 64];
                while matches!(rustix::io::read(&self.wake_r, &mut sink), Ok(n) if n > 0) {}
            }
            let ready: Vec<usize> = fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, f)| !f.revents().is_empty())
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            for i in ready {
                self.accept_all(&listeners[i]);
            }
        }
    }

    /// Accept what is queued on `l`, unless the gate is closed: under the gate's lock, so a
    /// drain that closed it knows nothing is accepted after.
    fn accept_all(self: &Arc<Self>, l: &TcpListener) {
        loop {
            let mut gate = self.gate();
            if gate.stopped {
                return;
            }
            let stream = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the connection stays queued; say so and go on.
                    say(&format!("accept: {e}"));
                    return;
                }
            };
            let conn = match stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_nodelay(true))
                .and_then(|()| stream.try_clone())
            {
                Ok(read_half) => (
                    Arc::new(Conn {
                        stream,
                        closing: AtomicBool::new(false),
                    }),
                    read_half,
                ),
                Err(e) => {
                    say(&format!("connection setup: {e}"));
                    continue;
                }
            };
            let id = gate.next_id;
            gate.next_id += 1;
            gate.conns.insert(id, Arc::clone(&conn.0));
            drop(gate);
            let me = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name("httpd-conn".into())
                .spawn(move || me.serve_conn(id, conn.0, conn.1));
            if let Err(e) = spawned {
                say(&format!("thread: {e}"));
                self.gate().conns.remove(&id);
            }
        }
    }

    fn serve_conn(&self, id: u64, conn: Arc<Conn>, mut reader: TcpStream) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let mut w = &conn.stream;
        'conn: loop {
            // One request head (and its body, which we skip).
            let (head_len, body_len, client_close) = loop {
                if let Some(end) = find_head_end(&buf) {
                    match parse_head(&buf[..end]) {
                        Ok((body, close)) => break (end, body, close),
                        Err(status) => {
                            let _ = w.write_all(status.as_bytes());
                            break 'conn;
                        }
                    }
                }
                if buf.len() > MAX_HEAD {
                    let _ = w.write_all(
                        b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
                          Content-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    break 'conn;
                }
                match reader.read(&mut chunk) {
                    Ok(0) => break 'conn,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break 'conn,
                }
            };
            // Skip the body.
            let mut need = head_len + body_len;
            while buf.len() < need {
                match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => break 'conn,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            need = need.min(buf.len());
            buf.drain(..need);
            let close = client_close || conn.closing.load(Ordering::SeqCst);
            // One write per answer: split writes meet Nagle and delayed ACKs.
            let answer: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\
                  Connection: close\r\n\r\nok\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
            };
            if w.write_all(answer).is_err() {
                break;
            }
            if close {
                break;
            }
        }
        // Half-close and read to the client's end of stream, so closing never resets.
        let _ = conn.stream.shutdown(Shutdown::Write);
        let _ = reader.set_read_timeout(Some(LINGER));
        let until = Instant::now() + LINGER;
        while Instant::now() < until {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.gate().conns.remove(&id);
        self.changed.notify_all();
    }

    fn drain(&self) -> DrainReport {
        let mut gate = self.gate();
        gate.stopped = true;
        for c in gate.conns.values() {
            c.closing.store(true, Ordering::SeqCst);
        }
        let open = gate.conns.len() as u64;
        drop(gate);
        self.wake();
        DrainReport {
            open_conns_remaining: open,
            accept_closed: true,
        }
    }

    fn resume(&self) {
        self.gate().stopped = false;
        self.changed.notify_all();
        self.wake();
    }

    /// Wait until every connection ended, at most `bound`; whether they all did.
    fn wait_for_clients(&self, bound: Duration) -> bool {
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

    fn open_conns(&self) -> u64 {
        self.gate().conns.len() as u64
    }
}

/// Where the head ends (just past `\r\n\r\n`).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The body length and whether the client asked to close, or the error answer.
fn parse_head(head: &[u8]) -> Result<(usize, bool), &'static str> {
    const BAD: &str = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let head = std::str::from_utf8(head).map_err(|_| BAD)?;
    let mut lines = head.split("\r\n");
    let request = lines.next().ok_or(BAD)?;
    let version = request.rsplit(' ').next().ok_or(BAD)?;
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(BAD),
    };
    let mut body = 0;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(BAD)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            body = value.parse().map_err(|_| BAD)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(
                "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    Ok((body, close))
}

#[derive(Clone, Debug)]
struct Hooks {
    server: Arc<Server>,
}

impl Drainable for Hooks {
    fn drain(&self, _deadline: Instant) -> handoff::error::Result<DrainReport> {
        let t = mono_ns();
        let report = self.server.drain();
        timings::record("drain", t, mono_ns());
        Ok(report)
    }

    fn seal(&self) -> handoff::error::Result<SealReport> {
        let t = mono_ns();
        timings::record("seal", t, mono_ns());
        Ok(SealReport {
            last_revision_per_shard: vec![0],
            data_dir_fingerprint: 0,
        })
    }

    fn resume_after_abort(&self) -> handoff::error::Result<()> {
        self.server.resume();
        say("resumed after an aborted handoff");
        Ok(())
    }

    fn snapshot_state(&self) -> StateSnapshot {
        StateSnapshot {
            shard_count: 1,
            open_conns: self.server.open_conns(),
            last_revision_per_shard: vec![0],
        }
    }
}

struct Args {
    data: PathBuf,
    socket: PathBuf,
    listen: String,
}

fn parse_args() -> Result<Args, String> {
    let (mut data, mut socket, mut listen) = (None, None, None);
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.to_str() {
            Some("--data") => &mut data,
            Some("--socket") => &mut socket,
            Some("--listen") => &mut listen,
            Some("-h" | "--help") => return Err(USAGE.into()),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        };
        *slot = Some(
            args.next()
                .ok_or_else(|| format!("{arg:?} needs a value\n{USAGE}"))?,
        );
    }
    Ok(Args {
        data: data.ok_or(format!("--data is required\n{USAGE}"))?.into(),
        socket: socket
            .ok_or(format!("--socket is required\n{USAGE}"))?
            .into(),
        listen: match listen {
            Some(l) => l.into_string().map_err(|l| format!("--listen {l:?}"))?,
            None => "127.0.0.1:8080".into(),
        },
    })
}

fn main() -> ExitCode {
    let started = mono_ns();
    timings::record("main", started, started);
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    raise_nofile();
    std::fs::create_dir_all(&args.data)?;
    match detect_role()? {
        Role::ColdStart { mut inherited } => {
            let names: Vec<String> = inherited.names().iter().map(|n| n.to_string()).collect();
            let mut listeners: Vec<TcpListener> =
                names.iter().filter_map(|n| inherited.take(n)).collect();
            let lock = DataDirLock::acquire_or_break_stale(&args.data)?;
            let mut incumbent = Incumbent::bind_cold_start(&args.socket, lock)?;
            if listeners.is_empty() {
                let l = TcpListener::bind(&args.listen)?;
                incumbent = incumbent.with_listener("http", &l)?;
                listeners.push(l);
            }
            run_incumbent(incumbent, listeners, "cold start")
        }
        Role::Successor(s) => {
            let t = mono_ns();
            let s = s.handshake(format!("handoff-httpd {}", env!("CARGO_PKG_VERSION")))?;
            let names = s.listener_names();
            let mut s = s.wait_for_begin()?;
            let begun = mono_ns();
            timings::record("hello_to_begin", t, begun);
            let listeners: Vec<TcpListener> =
                names.iter().filter_map(|n| s.take_listener(n)).collect();
            let taken = mono_ns();
            timings::record("take_listeners", begun, taken);
            let lock = DataDirLock::acquire(&args.data)?;
            timings::record("lock", taken, mono_ns());
            // Opening the data: this daemon has none.
            let opened = mono_ns();
            timings::record("open", opened, opened);
            let incumbent = s.announce_and_bind(
                ReadinessSnapshot {
                    listening_on: names,
                    healthz_ok: true,
                    advertised_revision_per_shard: vec![0],
                },
                &args.socket,
                lock,
            )?;
            timings::record("begin_to_ready", begun, mono_ns());
            timings::flush();
            run_incumbent(incumbent, listeners, "successor")
        }
    }
}

fn run_incumbent(
    incumbent: Incumbent,
    listeners: Vec<TcpListener>,
    role: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::new()?;
    say(&format!("{role}: serving {} listener(s)", listeners.len()));
    let hooks = Hooks {
        server: Arc::clone(&server),
    };
    let acceptor = Arc::clone(&server);
    thread::Builder::new()
        .name("httpd-accept".into())
        .spawn(move || acceptor.accept_loop(listeners))?;
    let retired = incumbent.exit_on_retire(false).serve(hooks)?;
    let all = server.wait_for_clients(RETIRE_WAIT);
    say(&format!(
        "handoff {} committed; exiting{}",
        retired.handoff,
        if all {
            ""
        } else {
            " (some clients kept their connection)"
        }
    ));
    timings::flush();
    // The accept thread and connection threads end with the process.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed() {
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok((0, false))
        );
        assert_eq!(parse_head(b"GET / HTTP/1.0\r\n\r\n"), Ok((0, true)));
        assert_eq!(
            parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Ok((0, false))
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\ncontent-length: 12\r\nConnection: Close\r\n\r\n"),
            Ok((12, true))
        );
        assert!(parse_head(b"GET / SPDY/9\r\n\r\n").is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
