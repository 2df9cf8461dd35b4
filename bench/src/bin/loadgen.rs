//! `loadgen`: what clients see of a server while its binary is swapped, again and again
//! (issue 7, part 2). The same load for every target: our supervisor with kvd or
//! handoff-httpd, an nginx binary upgrade, a HAProxy master-worker reload.
//!
//! ```text
//! loadgen --addr 127.0.0.1:PORT --proto http|kvd [--open-rate 500] [--closed 8]
//!         [--warmup 2] [--swaps 200] [--interval 150] --swap-cmd "<shell command>"
//!         [--json FILE] [--label NAME] [more: --help]
//! ```
//!
//! Two kinds of client run at once:
//!
//! - **open-loop**: `--open-rate` new connections per second on a fixed schedule, run by a
//!   pool of `--open-workers` threads; each connects, sends one request, reads the answer and
//!   closes. Its latency runs from the *scheduled* start, so a server that stalls is charged
//!   for the requests that queued behind the stall (no coordinated omission).
//! - **closed-loop**: `--closed` keep-alive connections, each sending its next request as soon
//!   as the answer to the last one arrived. A connection the server ends after an answer
//!   (`Connection: close`, or the end of the stream) is replaced, which is no error. Before
//!   reusing a connection the client peeks at it (non-blocking) and replaces it if the server
//!   already closed it, as careful HTTP clients do.
//!
//! Protocols: `http` (`GET / HTTP/1.1`; a status other than 200 is an error) and `kvd`
//! (alternate `SET`/`GET` of random keys, or `PING` with `--kvd-ops ping`). A kvd connection
//! that ends cleanly before the answer, and an `ERR retry`, mean "not executed, send it again"
//! (kvd's protocol): the request is sent again on a new connection and counted as `resent`,
//! not as an error. Its latency runs from the first attempt to the answer.
//!
//! After `--warmup` seconds it runs `--swap-cmd` through `sh -c` `--swaps` times, one every
//! `--interval` ms (and never less than `--min-gap` ms after the previous one ended). The
//! command must return once the swap is complete; a swap's window is [command start, command
//! end]. Requests that overlap a window are reported apart from the others (steady state);
//! requests that began during the warmup are not reported. After the last swap the load runs
//! on for `--cooldown` seconds, then stops.
//!
//! It prints a text report and one `RESULT key=value …` line (and writes the same keys as a
//! JSON object to `--json FILE`). Traffic goes only to a loopback address: any other is
//! refused.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use handoff_bench::{ms, Stats};

const USAGE: &str = "\
usage: loadgen --addr 127.0.0.1:PORT --proto http|kvd [options]
  --open-rate N        new connections per second, one request each (500; 0: none)
  --open-workers N     threads running the open-loop schedule (32)
  --closed N           keep-alive clients (8)
  --warmup SECS        load before the first swap, not reported (2)
  --swaps N            swaps to perform (0)
  --interval MS        from one swap's start to the next's (150)
  --min-gap MS         at least this long from one swap's end to the next's start (30)
  --swap-cmd CMD       run by `sh -c`; returns when the swap is complete
  --pre-swap-cmd CMD   run by `sh -c` before each swap, outside its window (a copy of a binary)
  --swap-timeout SECS  a swap command still running then is killed, and failed (60)
  --max-failures N     stop swapping after N failed swaps in a row (3)
  --duration SECS      with no swaps: how long to measure after the warmup (5)
  --cooldown SECS      load after the last swap (1)
  --max-secs SECS      no swap starts later than this after the start (3600)
  --answer-timeout S   a request unanswered this long after its start fails (5)
  --connect-timeout S  a connect taking this long fails (2)
  --kvd-ops setget|ping  kvd requests (setget)
  --keys N             kvd key space (1000)
  --label NAME         the target's name in the report (target)
  --json FILE          also write the results as one JSON object
  --wait-ready SECS    first wait (bounded) until the target accepts a connection (0: no)
  --dump FILE          every request and swap window, one a line (times in ms since the start)
loadgen --print-free-port   prints a free 127.0.0.1 port below the ephemeral range";

// ---------------------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http,
    Kvd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvdOps {
    SetGet,
    Ping,
}

#[derive(Debug)]
struct Opts {
    addr: SocketAddr,
    proto: Proto,
    open_rate: u32,
    open_workers: usize,
    closed: usize,
    warmup: Duration,
    swaps: usize,
    interval: Duration,
    min_gap: Duration,
    swap_cmd: Option<String>,
    pre_swap_cmd: Option<String>,
    swap_timeout: Duration,
    max_failures: usize,
    duration: Duration,
    cooldown: Duration,
    max_secs: Duration,
    answer_timeout: Duration,
    connect_timeout: Duration,
    kvd_ops: KvdOps,
    keys: u32,
    label: String,
    json: Option<PathBuf>,
    wait_ready: Duration,
    dump: Option<PathBuf>,
}

fn secs(v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{v:?} is not a number of seconds"))
}

fn millis(v: &str) -> Result<Duration, String> {
    secs(v).map(|d| d / 1000)
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{v:?} is not a number"))
}

fn parse_args(argv: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        proto: Proto::Http,
        open_rate: 500,
        open_workers: 32,
        closed: 8,
        warmup: Duration::from_secs(2),
        swaps: 0,
        interval: Duration::from_millis(150),
        min_gap: Duration::from_millis(30),
        swap_cmd: None,
        pre_swap_cmd: None,
        swap_timeout: Duration::from_secs(60),
        max_failures: 3,
        duration: Duration::from_secs(5),
        cooldown: Duration::from_secs(1),
        max_secs: Duration::from_secs(3600),
        answer_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        kvd_ops: KvdOps::SetGet,
        keys: 1000,
        label: "target".into(),
        json: None,
        wait_ready: Duration::ZERO,
        dump: None,
    };
    let (mut addr, mut proto) = (None, None);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--addr" => addr = Some(num::<SocketAddr>(v)?),
            "--proto" => {
                proto = Some(match v.as_str() {
                    "http" => Proto::Http,
                    "kvd" => Proto::Kvd,
                    _ => return Err(format!("--proto {v:?}: http or kvd")),
                })
            }
            "--open-rate" => o.open_rate = num(v)?,
            "--open-workers" => o.open_workers = num::<usize>(v)?.max(1),
            "--closed" => o.closed = num(v)?,
            "--warmup" => o.warmup = secs(v)?,
            "--swaps" => o.swaps = num(v)?,
            "--interval" => o.interval = millis(v)?,
            "--min-gap" => o.min_gap = millis(v)?,
            "--swap-cmd" => o.swap_cmd = Some(v.clone()),
            "--pre-swap-cmd" => o.pre_swap_cmd = Some(v.clone()),
            "--swap-timeout" => o.swap_timeout = secs(v)?,
            "--max-failures" => o.max_failures = num::<usize>(v)?.max(1),
            "--duration" => o.duration = secs(v)?,
            "--cooldown" => o.cooldown = secs(v)?,
            "--max-secs" => o.max_secs = secs(v)?,
            "--answer-timeout" => o.answer_timeout = secs(v)?,
            "--connect-timeout" => o.connect_timeout = secs(v)?,
            "--kvd-ops" => {
                o.kvd_ops = match v.as_str() {
                    "setget" => KvdOps::SetGet,
                    "ping" => KvdOps::Ping,
                    _ => return Err(format!("--kvd-ops {v:?}: setget or ping")),
                }
            }
            "--keys" => o.keys = num::<u32>(v)?.max(1),
            "--label" => o.label = v.clone(),
            "--json" => o.json = Some(PathBuf::from(v)),
            "--wait-ready" => o.wait_ready = secs(v)?,
            "--dump" => o.dump = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    o.addr = addr.ok_or("--addr is required")?;
    o.proto = proto.ok_or("--proto is required")?;
    // The machine's rule: load goes to this machine only.
    if !o.addr.ip().is_loopback() {
        return Err(format!(
            "--addr {}: only loopback addresses are allowed",
            o.addr
        ));
    }
    if o.swaps > 0 && o.swap_cmd.is_none() {
        return Err("--swaps needs --swap-cmd".into());
    }
    if o.open_rate == 0 && o.closed == 0 {
        return Err("no clients: --open-rate and --closed are both 0".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Outcomes

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    /// `connect` refused (nothing listening, or the queue overflowed).
    ConnectRefused,
    /// `connect` reset.
    ConnectReset,
    /// `connect` took longer than `--connect-timeout`.
    ConnectTimeout,
    /// ECONNRESET / EPIPE / ECONNABORTED on an established connection.
    Reset,
    /// HTTP: the server closed the connection after the request and before any answer byte.
    EofBeforeAnswer,
    /// The connection ended inside an answer.
    Truncated,
    /// An answer that is not the expected one (a status other than 200, `ERR io`, junk).
    BadAnswer,
    /// No (complete) answer within `--answer-timeout` of the request's start.
    AnswerTimeout,
    /// Anything else (its text is kept for the first few).
    Other,
}

const KINDS: [ErrKind; 9] = [
    ErrKind::ConnectRefused,
    ErrKind::ConnectReset,
    ErrKind::ConnectTimeout,
    ErrKind::Reset,
    ErrKind::EofBeforeAnswer,
    ErrKind::Truncated,
    ErrKind::BadAnswer,
    ErrKind::AnswerTimeout,
    ErrKind::Other,
];

impl ErrKind {
    fn name(self) -> &'static str {
        match self {
            ErrKind::ConnectRefused => "connect_refused",
            ErrKind::ConnectReset => "connect_reset",
            ErrKind::ConnectTimeout => "connect_timeout",
            ErrKind::Reset => "reset",
            ErrKind::EofBeforeAnswer => "eof_before_answer",
            ErrKind::Truncated => "truncated",
            ErrKind::BadAnswer => "bad_answer",
            ErrKind::AnswerTimeout => "answer_timeout",
            ErrKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        KINDS
            .iter()
            .position(|&k| k == self)
            .expect("KINDS lists all")
    }

    /// The kind of an I/O error on an established connection.
    fn of_io(e: &io::Error) -> ErrKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => ErrKind::Reset,
            K::WouldBlock | K::TimedOut => ErrKind::AnswerTimeout,
            _ => ErrKind::Other,
        }
    }

    /// The kind of a failed `connect`.
    fn of_connect(e: &io::Error) -> ErrKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrKind::ConnectRefused,
            K::ConnectionReset | K::ConnectionAborted => ErrKind::ConnectReset,
            K::WouldBlock | K::TimedOut => ErrKind::ConnectTimeout,
            _ => ErrKind::Other,
        }
    }
}

/// A failure, with the I/O error when there is one (kept for `other`).
#[derive(Debug)]
struct Failure(ErrKind, String);

impl Failure {
    fn io(kind: ErrKind, e: &io::Error) -> Failure {
        Failure(kind, e.to_string())
    }
}

/// One request, as recorded: times in nanoseconds since the start of the run.
#[derive(Clone, Copy, Debug)]
struct Rec {
    start: u64,
    /// When the client began it (later than `start` for an open-loop request whose worker was
    /// late: the schedule's lag, which its latency includes).
    began: u64,
    end: u64,
    /// `None`: answered as expected.
    err: Option<ErrKind>,
    /// How many times it was sent again (kvd's "not executed").
    resent: u32,
}

/// What a client thread did: its requests and a few counters.
#[derive(Debug, Default)]
struct Log {
    recs: Vec<Rec>,
    /// Connections opened.
    connects: u64,
    /// Connections found closed by the server before reuse (the peek).
    stale: u64,
    /// Connections the server ended after an answer (`Connection: close`).
    server_closed: u64,
}

/// What every thread shares.
#[derive(Debug)]
struct Shared {
    t0: Instant,
    /// Set once the load should stop.
    stop: AtomicBool,
    /// When the open-loop schedule ends (ns since `t0`; `u64::MAX` until known).
    stop_at: AtomicU64,
    /// The first few texts of `other` errors.
    other_texts: Mutex<Vec<String>>,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_nanos() as u64
    }

    fn note(&self, f: &Failure) {
        if f.0 == ErrKind::Other {
            let mut t = self.other_texts.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() < 8 {
                t.push(f.1.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Requests and answers

/// What a request asks, so that its answer can be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Http,
    Set,
    Get,
    Ping,
}

#[derive(Debug)]
struct Request {
    op: Op,
    bytes: Vec<u8>,
}

const HTTP_KEEP: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: handoff-loadgen\r\n\r\n";
const HTTP_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: handoff-loadgen\r\nConnection: close\r\n\r\n";

/// A small xorshift generator: keys only, no need for quality.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The `n`-th request of a client.
fn request(o: &Opts, keep_alive: bool, n: u64, rng: &mut Rng) -> Request {
    match (o.proto, o.kvd_ops) {
        (Proto::Http, _) => Request {
            op: Op::Http,
            bytes: if keep_alive { HTTP_KEEP } else { HTTP_CLOSE }.to_vec(),
        },
        (Proto::Kvd, KvdOps::Ping) => Request {
            op: Op::Ping,
            bytes: b"PING\n".to_vec(),
        },
        (Proto::Kvd, KvdOps::SetGet) => {
            let key = rng.next() % u64::from(o.keys);
            if n % 2 == 0 {
                Request {
                    op: Op::Set,
                    bytes: format!("SET k{key} v{}\n", rng.next() % 1_000_000).into_bytes(),
                }
            } else {
                Request {
                    op: Op::Get,
                    bytes: format!("GET k{key}\n").into_bytes(),
                }
            }
        }
    }
}

/// How one attempt on one connection ended.
#[derive(Debug)]
enum Attempt {
    /// Answered as expected; `keep`: the connection may carry the next request.
    Answered {
        keep: bool,
    },
    /// kvd: not executed (a clean end of stream before the answer, or `ERR retry`).
    Resend {
        conn_ended: bool,
    },
    Failed(Failure),
}

/// A connection and what was read past the last answer.
#[derive(Debug)]
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(o: &Opts, deadline: Instant) -> Result<Conn, Failure> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure(ErrKind::AnswerTimeout, String::new()));
        }
        let s = TcpStream::connect_timeout(&o.addr, o.connect_timeout.min(left))
            .map_err(|e| Failure::io(ErrKind::of_connect(&e), &e))?;
        s.set_nodelay(true)
            .map_err(|e| Failure::io(ErrKind::Other, &e))?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(512),
        })
    }

    /// Whether the server still holds the connection open: a non-blocking peek sees neither
    /// its end of stream nor a reset (nor stray bytes, which would corrupt the next answer).
    fn usable(&self) -> bool {
        let mut b = [0u8; 1];
        match rustix::net::recv(
            &self.s,
            &mut b[..],
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
        ) {
            Err(rustix::io::Errno::AGAIN) => true,
            Ok(_) | Err(_) => false,
        }
    }

    /// Send `req`, read and check its answer, before `deadline`.
    fn exchange(&mut self, req: &Request, deadline: Instant) -> Attempt {
        if let Err(e) = self.s.write_all(&req.bytes) {
            return Attempt::Failed(Failure::io(ErrKind::of_io(&e), &e));
        }
        match req.op {
            Op::Http => self.http_answer(deadline),
            _ => self.kvd_answer(req.op, deadline),
        }
    }

    /// Read more bytes into `buf`: `Ok(0)` at the end of the stream.
    fn fill(&mut self, deadline: Instant) -> Result<usize, Failure> {
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure(ErrKind::AnswerTimeout, String::new()));
            }
            self.s
                .set_read_timeout(Some(left))
                .map_err(|e| Failure::io(ErrKind::Other, &e))?;
            match self.s.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::io(ErrKind::of_io(&e), &e)),
            }
        }
    }

    fn http_answer(&mut self, deadline: Instant) -> Attempt {
        // The head.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            match self.fill(deadline) {
                Ok(0) if self.buf.is_empty() => {
                    return Attempt::Failed(Failure(ErrKind::EofBeforeAnswer, String::new()))
                }
                Ok(0) => return Attempt::Failed(Failure(ErrKind::Truncated, String::new())),
                Ok(_) => {}
                Err(f) => return Attempt::Failed(f),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default();
        let mut words = status.split(' ');
        let version = words.next().unwrap_or_default();
        let code = words.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Attempt::Failed(Failure(ErrKind::BadAnswer, status.to_string()));
        }
        let mut keep = version == "HTTP/1.1";
        let mut length = None;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "content-length" => length = v.parse::<usize>().ok(),
                "connection" if v.contains("close") => keep = false,
                "connection" if v.contains("keep-alive") => keep = true,
                "transfer-encoding" => {
                    return Attempt::Failed(Failure(ErrKind::BadAnswer, format!("{k}: {v}")))
                }
                _ => {}
            }
        }
        // The body: Content-Length bytes, or up to the end of a `Connection: close` stream.
        let body_end = match length {
            Some(n) => head_end + n,
            None if !keep => usize::MAX,
            None => {
                return Attempt::Failed(Failure(ErrKind::BadAnswer, "no Content-Length".into()))
            }
        };
        while self.buf.len() < body_end {
            match self.fill(deadline) {
                Ok(0) if body_end == usize::MAX => break,
                Ok(0) => return Attempt::Failed(Failure(ErrKind::Truncated, String::new())),
                Ok(_) => {}
                Err(f) => return Attempt::Failed(f),
            }
        }
        if code != "200" {
            return Attempt::Failed(Failure(ErrKind::BadAnswer, status.to_string()));
        }
        if body_end != usize::MAX && self.buf.len() > body_end {
            return Attempt::Failed(Failure(ErrKind::BadAnswer, "bytes after the answer".into()));
        }
        self.buf.clear();
        Attempt::Answered { keep }
    }

    fn kvd_answer(&mut self, op: Op, deadline: Instant) -> Attempt {
        let line_end = loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                break i;
            }
            match self.fill(deadline) {
                // kvd's "not executed, send it again".
                Ok(0) if self.buf.is_empty() => return Attempt::Resend { conn_ended: true },
                Ok(0) => return Attempt::Failed(Failure(ErrKind::Truncated, String::new())),
                Ok(_) => {}
                Err(f) => return Attempt::Failed(f),
            }
        };
        let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
        let extra = self.buf.len() > line_end + 1;
        self.buf.clear();
        if extra {
            return Attempt::Failed(Failure(ErrKind::BadAnswer, "bytes after the answer".into()));
        }
        let ok = match op {
            Op::Set if line == "ERR retry" => return Attempt::Resend { conn_ended: false },
            Op::Set => line
                .strip_prefix("OK ")
                .is_some_and(|r| r.parse::<u64>().is_ok()),
            Op::Get => line.starts_with("VAL ") || line == "NONE",
            Op::Ping => line.starts_with("PONG "),
            Op::Http => unreachable!("an HTTP request is read by http_answer"),
        };
        if ok {
            Attempt::Answered { keep: true }
        } else {
            Attempt::Failed(Failure(ErrKind::BadAnswer, line))
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Clients

/// After a failed connect, a closed-loop client waits this long before the next: a real
/// client backs off, and a refusing server would otherwise be counted thousands of times.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);

/// A keep-alive client, until `stop`.
fn closed_loop(o: &Opts, sh: &Shared, id: u64) -> Log {
    let mut log = Log::default();
    let mut rng = Rng::new(id + 1);
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let req = request(o, true, n, &mut rng);
        n += 1;
        let start = Instant::now();
        let deadline = start + o.answer_timeout;
        let mut resent = 0u32;
        let outcome = loop {
            if conn.as_ref().is_some_and(|c| !c.usable()) {
                log.stale += 1;
                conn = None;
            }
            let c = match &mut conn {
                Some(c) => c,
                None => match Conn::open(o, deadline) {
                    Ok(c) => {
                        log.connects += 1;
                        conn.insert(c)
                    }
                    Err(f) => break Err(f),
                },
            };
            match c.exchange(&req, deadline) {
                Attempt::Answered { keep } => {
                    if !keep {
                        log.server_closed += 1;
                        conn = None;
                    }
                    break Ok(());
                }
                Attempt::Resend { conn_ended } => {
                    resent += 1;
                    if conn_ended {
                        conn = None;
                    }
                    if Instant::now() >= deadline {
                        break Err(Failure(ErrKind::AnswerTimeout, "resent until".into()));
                    }
                }
                Attempt::Failed(f) => {
                    conn = None;
                    break Err(f);
                }
            }
        };
        let end = Instant::now();
        let err = outcome.as_ref().err().map(|f| f.0);
        if let Err(f) = &outcome {
            sh.note(f);
        }
        log.recs.push(Rec {
            start: sh.ns(start),
            began: sh.ns(start),
            end: sh.ns(end),
            err,
            resent,
        });
        if matches!(
            err,
            Some(ErrKind::ConnectRefused | ErrKind::ConnectReset | ErrKind::ConnectTimeout)
        ) {
            thread::sleep(CONNECT_BACKOFF);
        }
    }
    log
}

/// One worker of the open-loop schedule: takes the next slot, waits for its time, runs it.
fn open_loop_worker(o: &Opts, sh: &Shared, next: &AtomicU64, id: u64) -> Log {
    let mut log = Log::default();
    let mut rng = Rng::new(1_000_003 + id);
    let period_ns = 1e9 / f64::from(o.open_rate);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let sched_ns = (i as f64 * period_ns) as u64;
        // Wait for the slot, in short steps so that a stop is seen.
        loop {
            if sched_ns >= sh.stop_at.load(Ordering::Relaxed) {
                return log;
            }
            let now = sh.ns(Instant::now());
            if now >= sched_ns {
                break;
            }
            thread::sleep(Duration::from_nanos(sched_ns - now).min(Duration::from_millis(20)));
        }
        let sched = sh.t0 + Duration::from_nanos(sched_ns);
        let began = sh.ns(Instant::now());
        let req = request(o, false, i, &mut rng);
        let deadline = Instant::now().max(sched) + o.answer_timeout;
        let mut resent = 0u32;
        let outcome = loop {
            let mut c = match Conn::open(o, deadline) {
                Ok(c) => c,
                Err(f) => break Err(f),
            };
            log.connects += 1;
            match c.exchange(&req, deadline) {
                Attempt::Answered { .. } => break Ok(()),
                Attempt::Resend { .. } => {
                    resent += 1;
                    if Instant::now() >= deadline {
                        break Err(Failure(ErrKind::AnswerTimeout, "resent until".into()));
                    }
                }
                Attempt::Failed(f) => break Err(f),
            }
        };
        let err = outcome.as_ref().err().map(|f| f.0);
        if let Err(f) = &outcome {
            sh.note(f);
        }
        log.recs.push(Rec {
            start: sched_ns,
            began,
            end: sh.ns(Instant::now()),
            err,
            resent,
        });
    }
}

// ---------------------------------------------------------------------------------------
// Swaps

#[derive(Debug, Default)]
struct Swaps {
    /// [start, end] of each swap command, ns since `t0`.
    windows: Vec<(u64, u64)>,
    failed: usize,
    /// The first failures' exit status and output.
    failures: Vec<String>,
    /// No more swaps started: `--max-secs` passed, or `--max-failures` failed in a row.
    cut_short: Option<&'static str>,
}

fn run_swaps(o: &Opts, sh: &Shared) -> Swaps {
    let mut sw = Swaps::default();
    let first = sh.t0 + o.warmup;
    let limit = sh.t0 + o.max_secs;
    let mut next = first;
    let cmd = o.swap_cmd.as_deref().unwrap_or("true");
    let fail = |sw: &mut Swaps, f: String| {
        sw.failed += 1;
        eprintln!("loadgen: {f}");
        if sw.failures.len() < 5 {
            sw.failures.push(f);
        }
    };
    let mut in_a_row = 0;
    for i in 1..=o.swaps {
        // A swap that failed may leave the target in a state no later swap can leave (nginx
        // with two masters): going on would only add failures, and time.
        if in_a_row >= o.max_failures {
            sw.cut_short = Some("--max-failures failed in a row");
            break;
        }
        if let Some(pre) = &o.pre_swap_cmd {
            if let Err(e) = run_bounded(pre, o.swap_timeout) {
                fail(&mut sw, format!("before swap {i}: {e}"));
                in_a_row += 1;
                continue;
            }
        }
        wait_until(next);
        let start = Instant::now();
        if start >= limit {
            sw.cut_short = Some("--max-secs passed");
            break;
        }
        let out = run_bounded(cmd, o.swap_timeout);
        let end = Instant::now();
        sw.windows.push((sh.ns(start), sh.ns(end)));
        match out {
            Ok(()) => in_a_row = 0,
            Err(e) => {
                fail(&mut sw, format!("swap {i} ({} ms): {e}", ms(end - start)));
                in_a_row += 1;
            }
        }
        next = (start + o.interval).max(end + o.min_gap);
    }
    sw
}

/// Run `cmd` through `sh -c`, killed by `timeout` after `bound`; its output if it failed.
fn run_bounded(cmd: &str, bound: Duration) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(format!("{}", bound.as_secs_f64()))
        .args(["sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run timeout/sh: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        thread::sleep(t - now);
    }
}

// ---------------------------------------------------------------------------------------
// The report

/// Whether `[a, b]` overlaps one of `windows` (sorted, disjoint).
fn overlaps(windows: &[(u64, u64)], a: u64, b: u64) -> bool {
    // The last window starting at or before `b`; an earlier one ended before it started.
    let i = windows.partition_point(|w| w.0 <= b);
    i > 0 && windows[i - 1].1 >= a
}

/// The figures of one part (steady state or swap windows) of one client kind.
#[derive(Debug, Default)]
struct Part {
    n: u64,
    errors: [u64; KINDS.len()],
    resent: u64,
    latency: Vec<Duration>,
}

impl Part {
    fn add(&mut self, r: &Rec) {
        self.n += 1;
        self.resent += u64::from(r.resent);
        match r.err {
            None => self.latency.push(Duration::from_nanos(r.end - r.start)),
            Some(k) => self.errors[k.index()] += 1,
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// One client kind's figures.
#[derive(Debug)]
struct Kind {
    name: &'static str,
    steady: Part,
    window: Part,
    steady_lat: Stats,
    window_lat: Stats,
    /// The longest time without a successful completion, and the longest one overlapping a
    /// swap window.
    stall: Duration,
    window_stall: Duration,
    connects: u64,
    stale: u64,
    server_closed: u64,
}

fn summarise(
    name: &'static str,
    logs: Vec<Log>,
    windows: &[(u64, u64)],
    from: u64,
    to: u64,
) -> Kind {
    let (mut steady, mut window) = (Part::default(), Part::default());
    let (mut connects, mut stale, mut server_closed) = (0, 0, 0);
    let mut done = Vec::new();
    for log in logs {
        connects += log.connects;
        stale += log.stale;
        server_closed += log.server_closed;
        for r in log.recs.iter().filter(|r| r.start >= from) {
            if overlaps(windows, r.start, r.end) {
                window.add(r);
            } else {
                steady.add(r);
            }
            if r.err.is_none() {
                done.push(r.end);
            }
        }
    }
    done.sort_unstable();
    let (mut stall, mut window_stall) = (0u64, 0u64);
    let mut last = from;
    for &t in done.iter().chain(std::iter::once(&to.max(from))) {
        let gap = t.saturating_sub(last);
        stall = stall.max(gap);
        if overlaps(windows, last, t) {
            window_stall = window_stall.max(gap);
        }
        last = last.max(t);
    }
    Kind {
        name,
        steady_lat: Stats::new(std::mem::take(&mut steady.latency)),
        window_lat: Stats::new(std::mem::take(&mut window.latency)),
        steady,
        window,
        stall: Duration::from_nanos(stall),
        window_stall: Duration::from_nanos(window_stall),
        connects,
        stale,
        server_closed,
    }
}

/// `kind:count,…` of the non-zero counts, or `-`.
fn kinds_text(errors: &[u64; KINDS.len()]) -> String {
    let v: Vec<String> = KINDS
        .iter()
        .zip(errors)
        .filter(|(_, &n)| n > 0)
        .map(|(k, n)| format!("{}:{n}", k.name()))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// A value of the result line.
#[derive(Debug)]
enum Val {
    Int(u64),
    Num(f64),
    Text(String),
}

fn msf(d: Duration) -> Val {
    Val::Num((d.as_secs_f64() * 1e6).round() / 1e3)
}

fn results(o: &Opts, sw: &Swaps, kinds: &[Kind]) -> Vec<(String, Val)> {
    let mut r: Vec<(String, Val)> = Vec::new();
    let mut put = |k: &str, v: Val| r.push((k.to_string(), v));
    put("label", Val::Text(o.label.clone()));
    put(
        "proto",
        Val::Text(match o.proto {
            Proto::Http => "http".into(),
            Proto::Kvd => "kvd".into(),
        }),
    );
    put("open_rate", Val::Int(u64::from(o.open_rate)));
    put("closed_clients", Val::Int(o.closed as u64));
    put("swaps_requested", Val::Int(o.swaps as u64));
    let done = sw.windows.len() as u64;
    put("swaps", Val::Int(done));
    put("swaps_failed", Val::Int(sw.failed as u64));
    let durations = Stats::new(
        sw.windows
            .iter()
            .map(|w| Duration::from_nanos(w.1 - w.0))
            .collect(),
    );
    put("swap_p50_ms", msf(durations.p50()));
    put("swap_p99_ms", msf(durations.p99()));
    put("swap_max_ms", msf(durations.max()));
    for k in kinds {
        let p = k.name;
        let mut all = k.steady.errors;
        for (a, w) in all.iter_mut().zip(k.window.errors) {
            *a += w;
        }
        let errors: u64 = all.iter().sum();
        let mut put = |key: &str, v: Val| r.push((format!("{p}_{key}"), v));
        put("requests", Val::Int(k.steady.n + k.window.n));
        put("errors", Val::Int(errors));
        put(
            "errors_per_1k_swaps",
            if done == 0 {
                Val::Text("n/a".into())
            } else {
                Val::Num((errors as f64 * 1000.0 / done as f64 * 10.0).round() / 10.0)
            },
        );
        put("error_kinds", Val::Text(kinds_text(&all)));
        put("resent", Val::Int(k.steady.resent + k.window.resent));
        put("steady_requests", Val::Int(k.steady.n));
        put("steady_errors", Val::Int(k.steady.error_count()));
        put("steady_p50_ms", msf(k.steady_lat.p50()));
        put("steady_p99_ms", msf(k.steady_lat.p99()));
        put("steady_max_ms", msf(k.steady_lat.max()));
        put("window_requests", Val::Int(k.window.n));
        put("window_ok", Val::Int(k.window_lat.len() as u64));
        put("window_errors", Val::Int(k.window.error_count()));
        put(
            "window_error_kinds",
            Val::Text(kinds_text(&k.window.errors)),
        );
        put("window_p50_ms", msf(k.window_lat.p50()));
        put("window_p99_ms", msf(k.window_lat.p99()));
        put("window_max_ms", msf(k.window_lat.max()));
        put("stall_ms", msf(k.stall));
        put("window_stall_ms", msf(k.window_stall));
        put("connects", Val::Int(k.connects));
        put("stale_closed", Val::Int(k.stale));
        put("server_closed", Val::Int(k.server_closed));
    }
    r
}

fn result_line(r: &[(String, Val)]) -> String {
    let mut s = String::from("RESULT");
    for (k, v) in r {
        match v {
            Val::Int(n) => write!(s, " {k}={n}"),
            Val::Num(x) => write!(s, " {k}={x}"),
            // Our texts hold no spaces but a label might: keep the line splittable.
            Val::Text(t) => write!(s, " {k}={}", t.replace(' ', "_")),
        }
        .expect("writing to a String");
    }
    s
}

fn json(r: &[(String, Val)]) -> String {
    let body: Vec<String> = r
        .iter()
        .map(|(k, v)| match v {
            Val::Int(n) => format!("\"{k}\":{n}"),
            Val::Num(x) => format!("\"{k}\":{x}"),
            Val::Text(t) => format!(
                "\"{k}\":\"{}\"",
                t.replace('\\', "\\\\").replace('"', "\\\"")
            ),
        })
        .collect();
    format!("{{{}}}\n", body.join(","))
}

fn print_report(o: &Opts, sw: &Swaps, kinds: &[Kind], elapsed: Duration) {
    println!(
        "loadgen {}: {:?} on {}, {} new connections/s + {} keep-alive clients, {:.1} s",
        o.label,
        o.proto,
        o.addr,
        o.open_rate,
        o.closed,
        elapsed.as_secs_f64()
    );
    let durations = Stats::new(
        sw.windows
            .iter()
            .map(|w| Duration::from_nanos(w.1 - w.0))
            .collect(),
    );
    println!(
        "swaps: {} of {} ({} failed{}); command p50 {} ms, p99 {} ms, max {} ms",
        sw.windows.len(),
        o.swaps,
        sw.failed,
        sw.cut_short
            .map(|why| format!(", stopped: {why}"))
            .unwrap_or_default(),
        ms(durations.p50()),
        ms(durations.p99()),
        ms(durations.max())
    );
    for f in &sw.failures {
        println!("  {f}");
    }
    println!(
        "\n  {:<13} {:<7} {:>9} {:>7} {:>7} {:>10} {:>10} {:>10}  errors by kind",
        "clients", "part", "requests", "errors", "resent", "p50 ms", "p99 ms", "max ms"
    );
    for k in kinds {
        for (part, p, lat) in [
            ("steady", &k.steady, &k.steady_lat),
            ("swaps", &k.window, &k.window_lat),
        ] {
            println!(
                "  {:<13} {:<7} {:>9} {:>7} {:>7} {:>10} {:>10} {:>10}  {}",
                k.name,
                part,
                p.n,
                p.error_count(),
                p.resent,
                ms(lat.p50()),
                ms(lat.p99()),
                ms(lat.max()),
                kinds_text(&p.errors)
            );
        }
        println!(
            "  {:<13} longest stall {} ms ({} ms overlapping a swap); {} connections, {} found \
             closed before reuse, {} closed by the server after an answer",
            k.name,
            ms(k.stall),
            ms(k.window_stall),
            k.connects,
            k.stale,
            k.server_closed
        );
    }
}

/// `swap <start> <end>` per window, then `<kind> <start> <began> <end> <outcome> <resent>` per
/// request, sorted by start; times in milliseconds since the start of the run.
fn dump(path: &std::path::Path, sw: &Swaps, logs: &[(&str, &Vec<Log>)]) -> io::Result<()> {
    let msn = |ns: u64| ns as f64 / 1e6;
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    for w in &sw.windows {
        writeln!(out, "swap {:.3} {:.3}", msn(w.0), msn(w.1))?;
    }
    let mut all: Vec<(&str, &Rec)> = logs
        .iter()
        .flat_map(|(k, v)| {
            v.iter()
                .flat_map(move |l| l.recs.iter().map(move |r| (*k, r)))
        })
        .collect();
    all.sort_by_key(|(_, r)| r.start);
    for (k, r) in all {
        writeln!(
            out,
            "{k} {:.3} {:.3} {:.3} {} {}",
            msn(r.start),
            msn(r.began),
            msn(r.end),
            r.err.map_or("ok", ErrKind::name),
            r.resent
        )?;
    }
    out.flush()
}

/// Whether `addr` accepts a connection within `bound` (tries every 10 ms: a bounded poll).
fn wait_ready(addr: SocketAddr, bound: Duration) -> bool {
    let end = Instant::now() + bound;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv == ["--print-free-port"] {
        println!("{}", handoff_bench::free_port());
        return ExitCode::SUCCESS;
    }
    let o = match parse_args(&argv) {
        Ok(o) => Arc::new(o),
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !o.wait_ready.is_zero() && !wait_ready(o.addr, o.wait_ready) {
        eprintln!(
            "loadgen: {} accepted no connection within {:?}",
            o.addr, o.wait_ready
        );
        return ExitCode::FAILURE;
    }
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        stop_at: AtomicU64::new(u64::MAX),
        other_texts: Mutex::new(Vec::new()),
    });
    let spawn = |name: String, f: Box<dyn FnOnce() -> Log + Send>| {
        thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("start a client thread")
    };
    let closed: Vec<_> = (0..o.closed)
        .map(|i| {
            let (o, sh) = (Arc::clone(&o), Arc::clone(&sh));
            spawn(
                format!("closed-{i}"),
                Box::new(move || closed_loop(&o, &sh, i as u64)),
            )
        })
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let workers = if o.open_rate == 0 { 0 } else { o.open_workers };
    let open: Vec<_> = (0..workers)
        .map(|i| {
            let (o, sh, next) = (Arc::clone(&o), Arc::clone(&sh), Arc::clone(&next));
            spawn(
                format!("open-{i}"),
                Box::new(move || open_loop_worker(&o, &sh, &next, i as u64)),
            )
        })
        .collect();

    let sw = if o.swaps > 0 {
        run_swaps(&o, &sh)
    } else {
        wait_until(sh.t0 + o.warmup + o.duration);
        Swaps::default()
    };
    wait_until(Instant::now() + o.cooldown);
    let end = sh.ns(Instant::now());
    sh.stop_at.store(end, Ordering::Relaxed);
    sh.stop.store(true, Ordering::Relaxed);
    // Every request is bounded by --answer-timeout, so the joins are too.
    let join = |v: Vec<thread::JoinHandle<Log>>| -> Vec<Log> {
        v.into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect()
    };
    let (open_logs, closed_logs) = (join(open), join(closed));
    let elapsed = sh.t0.elapsed();
    if let Some(path) = &o.dump {
        if let Err(e) = dump(path, &sw, &[("open", &open_logs), ("closed", &closed_logs)]) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    let from = o.warmup.as_nanos() as u64;
    let mut kinds = Vec::new();
    if o.open_rate > 0 {
        kinds.push(summarise("open_loop", open_logs, &sw.windows, from, end));
    }
    if o.closed > 0 {
        kinds.push(summarise(
            "closed_loop",
            closed_logs,
            &sw.windows,
            from,
            end,
        ));
    }
    print_report(&o, &sw, &kinds, elapsed);
    let texts = sh.other_texts.lock().unwrap_or_else(|p| p.into_inner());
    for t in texts.iter() {
        println!("  other error: {t}");
    }
    let r = results(&o, &sw, &kinds);
    println!("{}", result_line(&r));
    if let Some(path) = &o.json {
        if let Err(e) = std::fs::write(path, json(&r)) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_with_sorted_windows() {
        let w = [(10, 20), (40, 50)];
        assert!(!overlaps(&w, 0, 9));
        assert!(overlaps(&w, 0, 10));
        assert!(overlaps(&w, 15, 16));
        assert!(overlaps(&w, 20, 30));
        assert!(!overlaps(&w, 21, 39));
        assert!(overlaps(&w, 21, 60));
        assert!(!overlaps(&w, 51, 60));
        assert!(!overlaps(&[], 0, 100));
    }

    #[test]
    fn only_loopback_targets() {
        let args = |a: &str| -> Vec<String> {
            ["--proto", "http", "--addr", a]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        assert!(parse_args(&args("127.0.0.1:80")).is_ok());
        assert!(parse_args(&args("127.1.2.3:80")).is_ok());
        assert!(parse_args(&args("[::1]:80")).is_ok());
        assert!(parse_args(&args("10.0.0.1:80")).is_err());
        assert!(parse_args(&args("192.168.1.1:80")).is_err());
    }

    #[test]
    fn stalls_count_from_the_start_and_to_the_end() {
        let logs = vec![Log {
            recs: vec![
                Rec {
                    start: 100,
                    began: 100,
                    end: 110,
                    err: None,
                    resent: 0,
                },
                Rec {
                    start: 120,
                    began: 120,
                    end: 300,
                    err: Some(ErrKind::Reset),
                    resent: 0,
                },
                Rec {
                    start: 150,
                    began: 150,
                    end: 200,
                    err: None,
                    resent: 1,
                },
            ],
            ..Log::default()
        }];
        let k = summarise("x", logs, &[(140, 160)], 100, 400);
        assert_eq!(k.stall, Duration::from_nanos(200));
        assert_eq!(k.window_stall, Duration::from_nanos(90));
        assert_eq!(k.window.n, 2);
        assert_eq!(k.window.errors[ErrKind::Reset.index()], 1);
        assert_eq!(k.window.resent, 1);
        assert_eq!(k.steady.n, 1);
    }
}
