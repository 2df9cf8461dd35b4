//! `rogue`: a peer that breaks the protocol on purpose, for the security and bad-input tests.
//!
//! **Against an incumbent's control socket**, as a would-be supervisor:
//! `rogue <control socket> [MODE]`, where MODE is
//!
//! - `prepare` (the default): a valid supervisor `Hello`, then a `Prepare` (which, if obeyed,
//!   makes the incumbent drain);
//! - `garbage`: a frame whose body is not a message;
//! - `oversize`: a frame header announcing more than `MAX_FRAME_LEN` bytes;
//! - `truncated`: half of a `Hello` frame, then the write side shut down;
//! - `wrong-version`: a `Hello` offering only protocol versions 90 to 99;
//! - `out-of-phase`: a valid `Hello`, then a `Commit` for a handoff that never began;
//! - `silent`: connect and send nothing (prints `connected` at once, then waits);
//! - `hello`: a valid supervisor `Hello` only (during a handoff, if obeyed, it supersedes the
//!   supervisor's session and aborts the handoff);
//! - `return-listeners`: a valid `Hello`, then `ReturnListeners` (which, if obeyed, hands it
//!   the daemon's listening sockets);
//! - `fds`: a descriptor flood: `ROGUE_CONNS` connections (default 64), on each
//!   `ROGUE_MSGS` messages (default 4) of one byte of a frame that never completes, each
//!   carrying 253 descriptors (`SCM_RIGHTS`, duplicates of `/dev/null`). It then waits up to
//!   2 s for the daemon to close them, prints `fds sent=<n> conns=<n> closed=<n>`, and keeps
//!   the connections open until its stdin ends.
//!
//! With `ROGUE_HOLD_LOCK=<path>` it first takes an exclusive `flock` on that file (created
//! 0600 if missing) and holds it while it runs, as a supervisor holds its supervisor lock; it
//! prints `lock-held` and exits if someone else holds it (after retrying for
//! `ROGUE_LOCK_WAIT_MS`, default 0: a lock the test process has just released can stay held a
//! moment by a child another test thread is forking).
//!
//! It prints on stdout what happened, as its last line:
//! `connect-failed <error>`, `eof` / `reset` (closed without answering), `silent` (nothing
//! came back in 10 s and the connection stayed open), `read-failed <error>`, or
//! `answered <n> bytes: <kinds> fds=<n>` (the kinds of the frames decoded, a `HelloAck`
//! with the daemon's status in brackets, a `Refused` with its reason as `Refused(<reason>)`;
//! then how many descriptors came with them). It stops reading at `Drained`/`DrainFailed`,
//! `Refused`, `Listeners`, a `HelloAck` in `hello` mode, end of stream, or 10 s (30 s in
//! `silent` mode).
//!
//! **As a successor**, spawned by a supervisor (`HANDOFF_ROLE=successor`, channel in
//! `HANDOFF_CHANNEL_FD`) with `ROGUE_MODE` set to one of
//!
//! - `garbage`, `oversize`, `truncated`: as above, instead of its `HelloAck`;
//! - `wrong-version`: a `HelloAck` choosing version 99;
//! - `lie-pid`: a `HelloAck` naming another pid than its own;
//! - `out-of-phase`: `Ready` right after its `HelloAck`, before any `Begin`;
//! - `duplicate-ready`: the whole protocol up to `Begin`, then `Ready` twice;
//! - `fds`: a valid `HelloAck` carrying 253 descriptors (the supervisor expects none from a
//!   successor).
//!
//! After misbehaving it reads its channel until the supervisor closes it or kills it (30 s at
//! most), and reports on stderr what it was told.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use handoff_engine::sys::fdpass::{recv_with_fds, send_with_fds};
use handoff_proto::wire::{
    encode, DaemonStatus, Decoder, Hello, HelloAck, Message, PeerRole, VersionRange,
    HANDSHAKE_VERSION, MAX_FRAME_LEN, SUPPORTED_VERSIONS,
};
use handoff_proto::{HandoffId, ReadinessSnapshot, MAX_FDS_PER_MESSAGE};

/// A frame whose body is no message: variant tag 200 does not exist.
fn garbage_frame() -> Vec<u8> {
    let body = [200u8, 1, 2, 3, 4, 5, 6, 7];
    let mut f = ((2 + body.len()) as u32).to_le_bytes().to_vec();
    f.extend(HANDSHAKE_VERSION.to_le_bytes());
    f.extend(body);
    f
}

/// A frame header announcing one byte more than the limit, and a little of its body.
fn oversize_frame() -> Vec<u8> {
    let mut f = (MAX_FRAME_LEN + 1).to_le_bytes().to_vec();
    f.extend(HANDSHAKE_VERSION.to_le_bytes());
    f.extend([0u8; 64]);
    f
}

fn frame(version: u16, m: &Message) -> Vec<u8> {
    encode(version, m).expect("encode")
}

fn supervisor_hello(versions: VersionRange) -> Vec<u8> {
    frame(
        HANDSHAKE_VERSION,
        &Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions,
            pid: std::process::id(),
            build_id: "rogue".into(),
        }),
    )
}

fn describe(m: &Message) -> String {
    match m {
        Message::Refused { reason } => format!("Refused({reason})"),
        Message::HelloAck(a) => format!("HelloAck[{:?}]", a.status),
        m => m.kind().to_string(),
    }
}

/// `ROGUE_HOLD_LOCK=<path>`: take an exclusive `flock` on it and keep it (the returned
/// descriptor) for the life of the process. `None` if the variable is unset; exits after
/// printing `lock-held` if another process holds the lock.
fn hold_lock() -> Option<OwnedFd> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let path = std::env::var_os("ROGUE_HOLD_LOCK")?;
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::RUSR | Mode::WUSR,
    )
    .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let wait = Duration::from_millis(env_count("ROGUE_LOCK_WAIT_MS", 0) as u64);
    let until = Instant::now() + wait;
    loop {
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Some(fd),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < until => {
                // No event announces a flock's release: a bounded poll.
                std::thread::park_timeout(Duration::from_millis(5));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                println!("lock-held");
                std::process::exit(0);
            }
            Err(e) => panic!("flock {path:?}: {e}"),
        }
    }
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

/// The `fds` mode (see the module docs).
fn flood(path: &std::ffi::OsStr) {
    let conns = env_count("ROGUE_CONNS", 64);
    let msgs = env_count("ROGUE_MSGS", 4);
    let me = std::process::id();
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let fds: Vec<BorrowedFd<'_>> = vec![null.as_fd(); MAX_FDS_PER_MESSAGE];
    // A frame header announcing the largest frame allowed: the bytes that follow are its body,
    // so a reader that only decodes waits for more and never refuses the connection for them.
    let mut header = MAX_FRAME_LEN.to_le_bytes().to_vec();
    header.extend(HANDSHAKE_VERSION.to_le_bytes());
    let mut socks = Vec::new();
    let mut sent = 0usize;
    for _ in 0..conns {
        let s = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) => {
                println!("connect-failed {e}");
                return;
            }
        };
        s.set_write_timeout(Some(Duration::from_secs(1)))
            .expect("write timeout");
        for i in 0..msgs {
            let bytes: &[u8] = if i == 0 { &header } else { &[0u8] };
            match send_with_fds(s.as_fd(), bytes, &fds) {
                Ok(()) => sent += fds.len(),
                // Closed by the daemon already, or it stopped reading.
                Err(_) => break,
            }
        }
        socks.push(Some(s));
    }
    // Wait (2 s at most) for the daemon to close each connection.
    let until = Instant::now() + Duration::from_secs(2);
    let mut closed = 0;
    let mut buf = [0u8; 4096];
    while closed < socks.len() && Instant::now() < until {
        for slot in socks.iter_mut() {
            let Some(s) = slot else { continue };
            s.set_nonblocking(true).expect("non-blocking");
            let gone = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            if gone {
                closed += 1;
                // Keep the number of open connections honest: a closed one is dropped.
                *slot = None;
            }
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
    eprintln!("rogue[{me}]: fds: sent {sent} descriptors over {conns} connections");
    println!("fds sent={sent} conns={conns} closed={closed}");
    let _ = std::io::stdout().flush();
    // Keep the connections open while the test looks at the daemon.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

fn main() {
    if std::env::var_os("HANDOFF_ROLE").is_some_and(|r| r == "successor") {
        return successor();
    }
    let mut args = std::env::args_os().skip(1);
    let path = args.next().expect("usage: rogue <control socket> [MODE]");
    let mode = args
        .next()
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_else(|| "prepare".into());
    let me = std::process::id();
    let _lock = hold_lock();
    if mode == "fds" {
        return flood(&path);
    }
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-failed {e}");
            return;
        }
    };
    let wait = if mode == "silent" { 30 } else { 10 };
    s.set_read_timeout(Some(Duration::from_secs(wait)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    let hello = supervisor_hello(SUPPORTED_VERSIONS);
    let bytes = match mode.as_str() {
        "prepare" => {
            let mut b = hello;
            b.extend(frame(
                SUPPORTED_VERSIONS.max,
                &Message::Prepare {
                    handoff: HandoffId(0x0bad_cafe),
                    successor: me,
                    drain_grace_ms: 1_000,
                    deadline_ms: 10_000,
                },
            ));
            b
        }
        "hello" => hello,
        "return-listeners" => {
            let mut b = hello;
            b.extend(frame(SUPPORTED_VERSIONS.max, &Message::ReturnListeners));
            b
        }
        "garbage" => garbage_frame(),
        "oversize" => oversize_frame(),
        "truncated" => hello[..hello.len() / 2].to_vec(),
        "wrong-version" => supervisor_hello(VersionRange { min: 90, max: 99 }),
        "out-of-phase" => {
            let mut b = hello;
            b.extend(frame(
                SUPPORTED_VERSIONS.max,
                &Message::Commit {
                    handoff: HandoffId(0x0bad_cafe),
                },
            ));
            b
        }
        "silent" => {
            println!("connected");
            let _ = std::io::stdout().flush();
            Vec::new()
        }
        other => panic!("unknown mode {other}"),
    };
    match s.write_all(&bytes) {
        Ok(()) => eprintln!("rogue[{me}]: {mode}: sent {} bytes", bytes.len()),
        // The daemon may have closed already: the read below tells how.
        Err(e) => eprintln!("rogue[{me}]: {mode}: write failed: {e}"),
    }
    if mode == "truncated" {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut dec = Decoder::new(SUPPORTED_VERSIONS);
    let mut kinds: Vec<String> = Vec::new();
    let mut total = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(wait);
    let end = loop {
        // `recv_with_fds` ignores the socket's read timeout: poll first, bounded.
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = [rustix::event::PollFd::new(&s, rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut pfd, Some(&timeout)) {
            Ok(0) => break "silent",
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                println!("read-failed {e}");
                return;
            }
        }
        match recv_with_fds(s.as_fd(), &mut buf, &mut fds) {
            Ok(0) => break "eof",
            Ok(n) => {
                total += n;
                dec.push(&buf[..n]);
                while let Ok(Some(m)) = dec.next_message() {
                    if let Message::HelloAck(a) = &m {
                        dec.set_negotiated(a.version);
                    }
                    kinds.push(describe(&m));
                }
                if kinds.iter().any(|k| {
                    k == "Drained"
                        || k == "DrainFailed"
                        || k == "Listeners"
                        || k.starts_with("Refused(")
                        || (mode == "hello" && k.starts_with("HelloAck"))
                }) {
                    break "done";
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "silent"
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                println!("read-failed {e}");
                return;
            }
        }
    };
    if total == 0 {
        println!("{end}");
    } else {
        eprintln!("rogue[{me}]: read ended with {end}");
        println!(
            "answered {total} bytes: {} fds={}",
            kinds.join(","),
            fds.len()
        );
    }
}

/// The successor channel, read one message at a time (keeping any descriptors that come).
struct Channel {
    s: UnixStream,
    dec: Decoder,
    fds: Vec<OwnedFd>,
}

impl Channel {
    #[allow(unsafe_code)]
    fn inherited() -> Channel {
        let fd: i32 = std::env::var("HANDOFF_CHANNEL_FD")
            .expect("HANDOFF_CHANNEL_FD")
            .parse()
            .expect("HANDOFF_CHANNEL_FD is a number");
        // SAFETY: the supervisor passed this descriptor, a connected stream socket, at exec
        // for the successor channel; nothing else in this process owns it.
        let s = unsafe { UnixStream::from_raw_fd(fd) };
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Channel {
            s,
            dec: Decoder::new(SUPPORTED_VERSIONS),
            fds: Vec::new(),
        }
    }

    /// The next message; `None` at end of stream, on an error or after 30 s of silence.
    fn next(&mut self) -> Option<Message> {
        let mut buf = [0u8; 65536];
        loop {
            match self.dec.next_message() {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("rogue successor: undecodable frame: {e}");
                    return None;
                }
            }
            match recv_with_fds(self.s.as_fd(), &mut buf, &mut self.fds) {
                Ok(0) => return None,
                Ok(n) => self.dec.push(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("rogue successor: read: {e}");
                    return None;
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.s.write_all(bytes) {
            eprintln!("rogue successor: write: {e}");
        }
    }
}

fn successor() {
    let mode = std::env::var("ROGUE_MODE").expect("ROGUE_MODE");
    let me = std::process::id();
    let mut ch = Channel::inherited();
    match ch.next() {
        Some(Message::Hello(_)) => {}
        other => panic!("rogue successor: expected the supervisor's Hello, got {other:?}"),
    }
    let v = SUPPORTED_VERSIONS.max;
    let ack = |version: u16, pid: u32| {
        frame(
            HANDSHAKE_VERSION,
            &Message::HelloAck(HelloAck {
                role: PeerRole::Successor,
                version,
                pid,
                build_id: "rogue".into(),
                status: DaemonStatus::Successor,
            }),
        )
    };
    match mode.as_str() {
        "garbage" => ch.send(&garbage_frame()),
        "oversize" => ch.send(&oversize_frame()),
        "truncated" => {
            let a = ack(v, me);
            ch.send(&a[..a.len() / 2]);
            let _ = ch.s.shutdown(std::net::Shutdown::Write);
        }
        "wrong-version" => ch.send(&ack(99, me)),
        "fds" => {
            let null = std::fs::File::open("/dev/null").expect("/dev/null");
            let fds: Vec<BorrowedFd<'_>> = vec![null.as_fd(); MAX_FDS_PER_MESSAGE];
            if let Err(e) = send_with_fds(ch.s.as_fd(), &ack(v, me), &fds) {
                eprintln!("rogue successor: write: {e}");
            }
        }
        "lie-pid" => ch.send(&ack(v, me + 1000)),
        "out-of-phase" => {
            ch.send(&ack(v, me));
            ch.dec.set_negotiated(v);
            let handoff = match ch.next() {
                Some(Message::Welcome { handoff, .. }) => handoff,
                other => panic!("rogue successor: expected Welcome, got {other:?}"),
            };
            ch.send(&frame(
                v,
                &Message::Ready {
                    handoff,
                    readiness: ReadinessSnapshot::default(),
                },
            ));
        }
        "duplicate-ready" => {
            ch.send(&ack(v, me));
            ch.dec.set_negotiated(v);
            let (handoff, want) = match ch.next() {
                Some(Message::Welcome {
                    handoff, listeners, ..
                }) => (handoff, listeners),
                other => panic!("rogue successor: expected Welcome, got {other:?}"),
            };
            let mut got = 0u32;
            while got < want {
                match ch.next() {
                    Some(Message::Listeners { batch }) => got += batch.len() as u32,
                    other => panic!("rogue successor: expected Listeners, got {other:?}"),
                }
            }
            ch.send(&frame(v, &Message::ListenersAck { count: got }));
            let seal = loop {
                match ch.next() {
                    Some(Message::Begin { seal, .. }) => break seal,
                    Some(Message::Heartbeat) => {}
                    other => panic!("rogue successor: expected Begin, got {other:?}"),
                }
            };
            let ready = frame(
                v,
                &Message::Ready {
                    handoff,
                    readiness: ReadinessSnapshot {
                        listening_on: Vec::new(),
                        healthz_ok: true,
                        advertised_revision_per_shard: seal.last_revision_per_shard,
                    },
                },
            );
            let mut twice = ready.clone();
            twice.extend(ready);
            ch.send(&twice);
        }
        other => panic!("unknown ROGUE_MODE {other}"),
    }
    eprintln!("rogue successor[{me}]: {mode}: done misbehaving");
    // Whatever the supervisor answers: it decides the outcome, not this process's exit.
    ch.dec.set_negotiated(v);
    while let Some(m) = ch.next() {
        eprintln!("rogue successor[{me}]: told {}", describe(&m));
    }
    eprintln!("rogue successor[{me}]: channel closed");
}
