//! `rogue <control socket>`: a would-be supervisor. Connects to the control socket as
//! whoever runs it, sends a valid supervisor `Hello` and then a `Prepare` (which, if obeyed,
//! makes the incumbent drain), and prints on stdout what happened, as its last line:
//!
//! - `connect-failed <error>`: the connection was not made;
//! - `eof` / `reset`: the daemon closed the connection without answering;
//! - `answered <n> bytes: <kinds>`: the daemon answered (the kinds of the frames decoded,
//!   comma-separated); it stops reading at `Drained`/`DrainFailed`, end of stream, or 10 s;
//! - `silent`: connected, but nothing came back in 10 s and the connection stayed open;
//! - `read-failed <error>`.
//!
//! Progress goes to stderr.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use handoff_proto::wire::{
    encode, Decoder, Hello, Message, PeerRole, HANDSHAKE_VERSION, SUPPORTED_VERSIONS,
};
use handoff_proto::HandoffId;

fn main() {
    let path = std::env::args_os()
        .nth(1)
        .expect("usage: rogue <control socket>");
    let me = std::process::id();
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-failed {e}");
            return;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    let mut bytes = encode(
        HANDSHAKE_VERSION,
        &Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions: SUPPORTED_VERSIONS,
            pid: me,
            build_id: "rogue".into(),
        }),
    )
    .expect("encode Hello");
    bytes.extend(
        encode(
            SUPPORTED_VERSIONS.max,
            &Message::Prepare {
                handoff: HandoffId(0x0bad_cafe),
                successor: me,
                drain_grace_ms: 1_000,
                deadline_ms: 10_000,
            },
        )
        .expect("encode Prepare"),
    );
    match s.write_all(&bytes) {
        Ok(()) => eprintln!(
            "rogue[{me}]: sent Hello and Prepare ({} bytes)",
            bytes.len()
        ),
        // The daemon may have closed already: the read below tells how.
        Err(e) => eprintln!("rogue[{me}]: write failed: {e}"),
    }
    let mut dec = Decoder::new(SUPPORTED_VERSIONS);
    let mut kinds: Vec<&'static str> = Vec::new();
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
                    kinds.push(m.kind());
                }
                if kinds.iter().any(|k| *k == "Drained" || *k == "DrainFailed") {
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
