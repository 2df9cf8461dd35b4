//! Requests and answers: what each protocol sends, and one connection's exchange of a
//! request for its answer, checked and classified.

use crate::args::{KvdOps, Opts, Proto};
use crate::outcome::{ErrKind, Failure};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// What a request asks, so that its answer can be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Http,
    Set,
    Get,
    Ping,
}

#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub bytes: Vec<u8>,
}

const HTTP_KEEP: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: handoff-loadgen\r\n\r\n";
const HTTP_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: handoff-loadgen\r\nConnection: close\r\n\r\n";

/// A small xorshift generator: keys only, no need for quality.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The `n`-th request of a client.
pub fn request(o: &Opts, keep_alive: bool, n: u64, rng: &mut Rng) -> Request {
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
pub enum Attempt {
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
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(o: &Opts, deadline: Instant) -> Result<Conn, Failure> {
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
    pub fn usable(&self) -> bool {
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
    pub fn exchange(&mut self, req: &Request, deadline: Instant) -> Attempt {
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
