//! `kvd`: the stateful example daemon of the end-to-end tests and the live demo. A TCP
//! key-value server with a real data directory, handed off to a new binary of itself with no
//! refused or reset connection and no lost acknowledged write.
//!
//! ```text
//! kvd --data <dir> --socket <control socket> [--listen 127.0.0.1:7878]
//!     [--max-conns 1024] [--idle-timeout 60]
//! ```
//!
//! The listen address is used only on a cold start without an inherited TCP listener named
//! `kv` (a supervisor passes one). At most `--max-conns` connections are served at once: one
//! more is answered `ERR busy` and closed. A connection that does not send a whole request
//! line within `--idle-timeout` seconds of the previous answer (or of its accept) is closed,
//! a clean end of stream (see [`server::Limits`]).
//!
//! # Protocol
//!
//! One request per line, one answer per line (written with one `write`):
//!
//! ```text
//! SET <key> <value>  ->  OK <revision>     after the fsync that covers the write
//!                    |   ERR retry         a handoff is in progress: not applied, send it again
//!                    |   ERR io: <error>   the log could not be written (a full disk): not
//!                                          acknowledged; no write succeeds until a handoff
//!                                          (or its rollback) reopens the log
//! GET <key>          ->  VAL <value> | NONE
//! PING               ->  PONG <pid> <build>   build: the executable's file name
//! ```
//!
//! The value is the rest of the line (it may hold spaces). During a handoff a connection may
//! also end (a clean end of stream) before the answer to a request: that request was not
//! executed; connect again and send it again. The new connection waits in the listener's queue
//! for whichever process serves next.
//!
//! # Data
//!
//! An append-only log in segments `seg-<n>.log`, records checksummed, written with group
//! commit (see [`log`]). The data directory is created 0700 (an existing one of kvd's user
//! that others may read is tightened to 0700), the segments 0600. A handoff seals the active segment; the successor replays and verifies
//! the log, checks that it found what was sealed, advertises the same revision, and writes a
//! new segment. A rolled-back incumbent does the same.
//!
//! # A deliberately broken build
//!
//! If the executable's file name contains `broken`, a successor fails while opening the data
//! (after `wait_for_begin` and taking the lock) and exits with status 1: the handoff rolls
//! back. Copy the binary to `kvd-broken` to demonstrate a rollback.

pub mod log;
pub mod server;

use std::error::Error;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use handoff::drainable::ReadinessSnapshot;
use handoff::{
    detect_role, DataDirLock, DrainReport, Drainable, Incumbent, Role, SealReport, StateSnapshot,
};

use handoff_bench::{mono_ns, timings};

use crate::kvd::log::Wal;
use crate::kvd::server::{Limits, Server};

const USAGE: &str = "usage: kvd --data <dir> --socket <control socket> [--listen <addr>] \
                     [--max-conns <n> (1024)] [--idle-timeout <seconds> (60)]";

/// How long a retired process waits for its clients to close the connections it half-closed.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// One line on standard error, written with one `write` (processes share it). `KVD_LOG=off`
/// silences it (the demo does, to keep its progress line readable).
pub(crate) fn say(msg: &str) {
    if std::env::var_os("KVD_LOG").is_some_and(|v| v == "off") {
        return;
    }
    let line = format!("kvd[{}]: {msg}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

struct Args {
    data: PathBuf,
    socket: PathBuf,
    listen: String,
    limits: Limits,
}

fn parse_args() -> Result<Args, String> {
    let (mut data, mut socket, mut listen) = (None, None, None);
    let (mut max_conns, mut idle_timeout) = (None, None);
    let mut args = std::env::args_os().skip(1).peekable();
    // Started through the demo binary as `handoff-demo kvd …` (or a copy named `kvd-…`).
    if args.peek().is_some_and(|a| a == "kvd") {
        args.next();
    }
    while let Some(arg) = args.next() {
        let slot = match arg.to_str() {
            Some("--data") => &mut data,
            Some("--socket") => &mut socket,
            Some("--listen") => &mut listen,
            Some("--max-conns") => &mut max_conns,
            Some("--idle-timeout") => &mut idle_timeout,
            Some("-h" | "--help") => return Err(USAGE.into()),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        };
        let value = args
            .next()
            .ok_or_else(|| format!("{arg:?} needs a value\n{USAGE}"))?;
        *slot = Some(value);
    }
    let listen = match listen {
        Some(l) => l
            .into_string()
            .map_err(|l| format!("--listen {l:?} is not UTF-8"))?,
        None => "127.0.0.1:7878".into(),
    };
    let mut limits = Limits::DEFAULT;
    if let Some(n) = max_conns {
        limits.max_conns = n
            .to_str()
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n >= 1)
            .ok_or_else(|| format!("--max-conns {n:?}: not a whole number of at least 1"))?;
    }
    if let Some(secs) = idle_timeout {
        limits.idle_timeout = secs
            .to_str()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|&s| s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("--idle-timeout {secs:?}: not a number of seconds above 0"))?;
    }
    Ok(Args {
        limits,
        data: data
            .ok_or_else(|| format!("--data is required\n{USAGE}"))?
            .into(),
        socket: socket
            .ok_or_else(|| format!("--socket is required\n{USAGE}"))?
            .into(),
        listen,
    })
}

/// The executable's file name (what `PING` reports, and what makes a build broken).
fn build_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| n.trim_end_matches(" (deleted)").to_string())
        .unwrap_or_else(|| "kvd".into())
}

/// Whether this process was started as `kvd`: its file name begins with `kvd`, or its first
/// argument is `kvd` (the demo binary runs itself, or copies of itself, as the daemon).
pub fn is_kvd_invocation() -> bool {
    build_name().starts_with("kvd") || std::env::args_os().nth(1).is_some_and(|a| a == "kvd")
}

/// `kvd`'s `main`.
pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let started = mono_ns();
    timings::record("main", started, started);
    let args = parse_args()?;
    let build = build_name();
    crate::kvd::log::create_data_dir(&args.data)?;
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match detect_role()? {
        Role::ColdStart { mut inherited } => {
            let (listener, bound_here) = match inherited.take("kv") {
                Some(l) => (l, false),
                None => (TcpListener::bind(&args.listen)?, true),
            };
            let lock = DataDirLock::acquire_or_break_stale(&args.data)?;
            let wal = Wal::open(&args.data)?;
            let mut incumbent = Incumbent::bind_cold_start(&args.socket, lock)?;
            if bound_here {
                // A supervisor started later takes it back from us (`expect_listener`).
                incumbent = incumbent.with_listener("kv", &listener)?;
            }
            run_incumbent(
                incumbent,
                Server::new(wal, build, args.limits),
                listener,
                "cold start",
            )
        }
        Role::Successor(s) => {
            let s = s.handshake(format!("{build} {}", env!("CARGO_PKG_VERSION")))?;
            let mut s = s.wait_for_begin()?;
            let listener = s
                .take_listener("kv")
                .ok_or("the supervisor passed no TCP listener named \"kv\"")?;
            let lock = DataDirLock::acquire(&args.data)?;
            if build.contains("broken") {
                return Err(format!(
                    "{build} is a deliberately broken build: it fails to open the data"
                )
                .into());
            }
            let t = mono_ns();
            let wal = Wal::open(&args.data)?;
            timings::record("open", t, mono_ns());
            // What we opened must be what the incumbent sealed; an error here exits before
            // `Ready`, and the handoff rolls back.
            let sealed = s.seal_report();
            let revision = wal.revision();
            if sealed.last_revision_per_shard != [revision]
                || sealed.data_dir_fingerprint != wal.fingerprint()
            {
                return Err(format!(
                    "opened revision {revision} (fingerprint {:#018x}), but the incumbent \
                     sealed {:?} ({:#018x})",
                    wal.fingerprint(),
                    sealed.last_revision_per_shard,
                    sealed.data_dir_fingerprint
                )
                .into());
            }
            let incumbent = s.announce_and_bind(
                ReadinessSnapshot {
                    listening_on: vec![listener.local_addr()?.to_string()],
                    healthz_ok: true,
                    advertised_revision_per_shard: vec![revision],
                },
                &args.socket,
                lock,
            )?;
            timings::flush();
            run_incumbent(
                incumbent,
                Server::new(wal, build, args.limits),
                listener,
                "successor",
            )
        }
    }
}

/// Serve: the handoff endpoint on a thread of its own, the accept loop on this one.
fn run_incumbent(
    incumbent: Incumbent,
    server: Arc<Server>,
    listener: TcpListener,
    role: &str,
) -> Result<(), Box<dyn Error>> {
    say(&format!(
        "{role}: serving on {}, revision {}",
        listener.local_addr()?,
        server.wal().revision()
    ));
    let hooks = Hooks {
        server: Arc::clone(&server),
    };
    thread::Builder::new()
        .name("kvd-handoff".into())
        .spawn(move || {
            match incumbent.exit_on_retire(false).serve(hooks.clone()) {
                Ok(retired) => {
                    // Our clients read the end of their streams; let them close first.
                    let all = hooks.server.wait_for_clients(RETIRE_WAIT);
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
                    std::process::exit(0);
                }
                // The daemon serves on, but cannot be handed off any more.
                Err(e) => say(&format!("the handoff endpoint stopped: {e}")),
            }
        })?;
    server.serve(listener)?;
    Ok(())
}

#[derive(Clone)]
struct Hooks {
    server: Arc<Server>,
}

impl Drainable for Hooks {
    fn drain(&self, deadline: Instant) -> handoff::error::Result<DrainReport> {
        let t = mono_ns();
        let report = self.server.drain(deadline);
        timings::record("drain", t, mono_ns());
        say(&format!(
            "drained ({} connections still busy)",
            report.open_conns_remaining
        ));
        Ok(report)
    }

    fn seal(&self) -> handoff::error::Result<SealReport> {
        let wal = self.server.wal();
        let t = mono_ns();
        let sealed = wal.seal()?;
        timings::record("seal", t, mono_ns());
        let stats = wal.stats();
        say(&format!(
            "sealed at revision {} (group commit: {} writes in {} fsyncs)",
            sealed.revision, stats.records, stats.fsyncs
        ));
        Ok(SealReport {
            last_revision_per_shard: vec![sealed.revision],
            data_dir_fingerprint: sealed.fingerprint,
        })
    }

    fn resume_after_abort(&self) -> handoff::error::Result<()> {
        // Serving again does not depend on the log: a log that cannot be reopened (a full
        // disk) fails writes with its error, as a failed write does while serving. Failing the
        // hook instead would keep the gate shut and the handoff unresolved while it retries.
        match self.server.resume() {
            Ok(()) => say(&format!(
                "resumed at revision {}",
                self.server.wal().revision()
            )),
            Err(e) => say(&format!(
                "resumed at revision {}, reads only: the log cannot be reopened: {e}",
                self.server.wal().revision()
            )),
        }
        Ok(())
    }

    fn snapshot_state(&self) -> StateSnapshot {
        StateSnapshot {
            shard_count: 1,
            open_conns: self.server.open_conns(),
            last_revision_per_shard: vec![self.server.wal().revision()],
        }
    }
}

#[cfg(test)]
mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("kvd-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether the test `test`, which needs root for `why` ("a tmpfs mounted"), may run:
    /// `true` as root. Otherwise one line on stderr (`SKIPPED <test>: needs root (<why>)`)
    /// and `false`, for the test to return at once; with `HANDOFF_REQUIRE_ROOT_TESTS=1` (CI),
    /// a panic instead, so that a run that must prove the root-only tests cannot skip them.
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
}
