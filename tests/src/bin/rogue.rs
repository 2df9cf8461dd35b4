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
//! - `silent`: connect and send nothing (prints `connected` at once, then waits).
//!
//! It prints on stdout what happened, as its last line:
//! `connect-failed <error>`, `eof` / `reset` (closed without answering), `silent` (nothing
//! came back in 10 s and the connection stayed open), `read-failed <error>`, or
//! `answered <n> bytes: <kinds>` (the kinds of the frames decoded; a `Refused` shows its
//! reason as `Refused(<reason>)`). It stops reading at `Drained`/`DrainFailed`, `Refused`,
//! end of stream, or 10 s (30 s in `silent` mode).
//!
//! **As a successor**, spawned by a supervisor (`HANDOFF_ROLE=successor`, channel in
//! `HANDOFF_CHANNEL_FD`) with `ROGUE_MODE` set to one of
//!
//! - `garbage`, `oversize`, `truncated`: as above, instead of its `HelloAck`;
//! - `wrong-version`: a `HelloAck` choosing version 99;
//! - `lie-pid`: a `HelloAck` naming another pid than its own;
//! - `out-of-phase`: `Ready` right after its `HelloAck`, before any `Begin`;
//! - `duplicate-ready`: the whole protocol up to `Begin`, then `Ready` twice.
//!
//! After misbehaving it reads its channel until the supervisor closes it or kills it (30 s at
//! most), and reports on stderr what it was told.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use handoff::sys::fdpass::recv_with_fds;
use handoff_proto::wire::{
    encode, DaemonStatus, Decoder, Hello, HelloAck, Message, PeerRole, VersionRange,
    HANDSHAKE_VERSION, MAX_FRAME_LEN, SUPPORTED_VERSIONS,
};
use handoff_proto::{HandoffId, ReadinessSnapshot};

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
        m => m.kind().to_string(),
    }
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
    let mut buf = [0u8; 4096];
    let end = loop {
        match s.read(&mut buf) {
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
                if kinds
                    .iter()
                    .any(|k| k == "Drained" || k == "DrainFailed" || k.starts_with("Refused("))
                {
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
        println!("answered {total} bytes: {}", kinds.join(","));
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
