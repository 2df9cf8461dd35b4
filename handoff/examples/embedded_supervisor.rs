//! The seed README's "Embedded in code" supervisor, made a program: hold the daemon's
//! listener, make sure the daemon serves, and hand it off to a new binary.
//!
//! ```text
//! cargo build -p handoff --examples
//! target/debug/examples/embedded_supervisor [--pause] [BINARY]
//! ```
//!
//! 1. Bind the `http` listener at `MY_DAEMON_ADDR` (default `127.0.0.1:8080`). If the address
//!    is in use, a daemon started by an earlier run serves on it: the listener is then taken
//!    back from that daemon ([`Supervisor::expect_listener`]).
//! 2. [`Supervisor::resume_from_journal`]: find the daemon serving at the control socket
//!    `MY_DAEMON_SOCKET` (default `/tmp/my-daemon/handoff.sock`, as for `my_daemon`), settle
//!    whatever an earlier run left half done, and start `BINARY` cold if nobody serves.
//! 3. With `--pause`, wait for a line on standard input (talk to the daemon meanwhile; end of
//!    input exits without a handoff).
//! 4. [`Supervisor::perform_handoff`] to `BINARY`, and say how it ended.
//!
//! `BINARY` defaults to the `my_daemon` example next to this executable. Both are daemons of
//! this example: the supervisor exits when done and leaves the daemon serving (the next run
//! takes the listener back from it); stop the daemon with `kill`.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handoff::supervisor::{SpawnSpec, Supervisor};
use handoff::ListenerKind;

const USAGE: &str = "usage: embedded_supervisor [--pause] [BINARY]";

fn main() -> anyhow::Result<()> {
    let mut pause = false;
    let mut binary = None;
    for arg in std::env::args_os().skip(1) {
        match arg.to_str() {
            Some("--pause") => pause = true,
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(());
            }
            Some(s) if s.starts_with('-') => anyhow::bail!("unknown option {s}\n{USAGE}"),
            _ if binary.is_none() => binary = Some(PathBuf::from(arg)),
            _ => anyhow::bail!("one BINARY only\n{USAGE}"),
        }
    }
    let binary = match binary {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("my_daemon"),
    };
    let sock = std::env::var_os("MY_DAEMON_SOCKET")
        .map_or_else(|| "/tmp/my-daemon/handoff.sock".into(), PathBuf::from);
    let addr = std::env::var("MY_DAEMON_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir)?;
    }

    let tcp_listener = match TcpListener::bind(&addr) {
        Ok(l) => Some(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => None,
        Err(e) => return Err(anyhow::Error::new(e).context(format!("binding {addr}"))),
    };
    let sup = Supervisor::new(Path::new(&sock))?;
    let sup = match &tcp_listener {
        Some(tcp_listener) => {
            println!("listening on {}", tcp_listener.local_addr()?);
            sup.with_listener("http", tcp_listener.as_raw_fd())
        }
        None => {
            println!("{addr} is in use: taking the listener back from the daemon serving it");
            sup.expect_listener("http", ListenerKind::Tcp)
        }
    }
    // Not in the seed: start the daemon when nobody serves (first run, or after a crash).
    .with_cold_start(SpawnSpec {
        binary: binary.clone(),
        env: daemon_env(),
        ..Default::default()
    });
    let recovery = sup.resume_from_journal()?; // clear any prior crash state
    println!("serving: pid {}", recovery.serving);

    if pause {
        println!("press Enter to hand off to {}", binary.display());
        if std::io::stdin().read_line(&mut String::new())? == 0 {
            println!("end of input: no handoff");
            return Ok(());
        }
    }

    let outcome = sup.perform_handoff(SpawnSpec {
        binary,
        drain_grace: Duration::from_secs(25),
        deadline: Duration::from_secs(60),
        env: daemon_env(), // not in the seed
        ..Default::default()
    })?;

    if outcome.committed {
        println!("swap complete; new pid {}", outcome.child.unwrap().id());
    } else {
        println!("aborted: {:?}", outcome.abort_reason);
        // incumbent is still serving; retry when ready
    }
    Ok(())
}

/// The daemon's settings (`MY_DAEMON_*`) from our environment. A daemon inherits only `PATH`,
/// `LANG`, `LC_*`, `TZ` and `HANDOFF_*` from its supervisor; the rest is passed explicitly.
fn daemon_env() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| k.to_string_lossy().starts_with("MY_DAEMON_"))
        .collect()
}
