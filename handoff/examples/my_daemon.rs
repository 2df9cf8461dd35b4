//! The seed README's "Integrate your daemon" program, made to run: a small sharded key-value
//! store that can be handed off to a new binary of itself with no lost write.
//!
//! ```text
//! cargo run -p handoff --example my_daemon                 # alone, binds MY_DAEMON_ADDR
//! cargo run -p handoff --example embedded_supervisor       # under a supervisor (see there)
//! ```
//!
//! Configuration, from the environment. The seed hard-codes `/run/my-daemon/handoff.sock` and
//! `/var/lib/my-daemon/data`, which only root can create; the defaults here live under `/tmp`
//! so that the example runs as any user:
//!
//! - `MY_DAEMON_SOCKET`: the handoff control socket (default `/tmp/my-daemon/handoff.sock`);
//! - `MY_DAEMON_DATA`: the data directory (default `/tmp/my-daemon/data`);
//! - `MY_DAEMON_ADDR`: the address to bind when no `http` listener was inherited (default
//!   `127.0.0.1:8080`; the seed binds `0.0.0.0:8080`).
//!
//! The data: one append-only log per shard, `shard-<n>.log`, one record per line, `SET <rev>
//! <key> <value>`, each fsynced before it is acknowledged. A handoff seals every log with a
//! footer line `SEAL <rev>`; the successor opens the logs, checks that it sees what was
//! sealed, and advertises the same revisions, which is what the supervisor checks before it
//! commits.
//!
//! The service: TCP, one request per line, one answer per line.
//!
//! ```text
//! SET <key> <value>   ->  OK <revision of the key's shard>
//! GET <key>           ->  VALUE <value>  |  NONE
//! PID                 ->  PID <pid of the process that answers>
//! ```
//!
//! While a handoff drains, the daemon stops accepting, lets the requests being executed
//! finish, and closes every connection at its next request boundary without executing the
//! request it may have received: a client whose connection closes before an answer came
//! knows the request was not executed, reconnects and sends it again. The new connection waits
//! in the kernel's accept queue (the listener is shared with the successor) until the
//! successor accepts it, or this process again if the handoff is rolled back.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use handoff::drainable::ReadinessSnapshot;
use handoff::error::Error;
use handoff::{detect_role, DataDirLock, Incumbent, Role};
use handoff::{error::Result, DrainReport, Drainable, SealReport, StateSnapshot};

struct MyDrainable {
    db: Arc<MyDatabase>,
}

impl Drainable for MyDrainable {
    fn drain(&self, deadline: Instant) -> Result<DrainReport> {
        // Stop accepting new connections and writes.
        // Finish in-flight requests. Fsync before returning.
        self.db.stop_writes();
        self.db.drain_inflight(deadline)?;
        self.db.fsync()?;
        Ok(DrainReport {
            open_conns_remaining: 0,
            accept_closed: true,
        })
    }

    fn seal(&self) -> Result<SealReport> {
        // Flush each shard, write its footer, fsync, close the file.
        // The library releases your DataDirLock immediately after this returns.
        let revisions = self.db.seal_active_segments()?;
        Ok(SealReport {
            last_revision_per_shard: revisions,
            data_dir_fingerprint: self.db.fingerprint(),
        })
    }

    fn resume_after_abort(&self) -> Result<()> {
        // Successor failed. Reopen your writer state and restart accepting.
        self.db.reopen_writer()?;
        Ok(())
    }

    fn snapshot_state(&self) -> StateSnapshot {
        StateSnapshot {
            shard_count: self.db.shard_count(),
            open_conns: self.db.open_conns(),
            last_revision_per_shard: self.db.revisions(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    // Not the seed's /run and /var/lib paths: see the top of this file.
    let socket_path: &Path = &env_path("MY_DAEMON_SOCKET", "/tmp/my-daemon/handoff.sock");
    let data_dir: &Path = &env_path("MY_DAEMON_DATA", "/tmp/my-daemon/data");
    let addr = std::env::var("MY_DAEMON_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    if let Some(dir) = socket_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::create_dir_all(data_dir)?;

    match detect_role()? {
        Role::ColdStart { mut inherited } => {
            // First boot, or supervisor's initial spawn.
            // Bind own listener if none was inherited.
            let bound_here = !inherited.names().contains(&"http");
            let listener = inherited
                .take("http")
                .unwrap_or_else(|| TcpListener::bind(&addr).expect("binding MY_DAEMON_ADDR"));

            let lock = DataDirLock::acquire_or_break_stale(data_dir)?;
            let db = MyDatabase::open(data_dir)?;
            let mut incumbent = Incumbent::bind_cold_start(socket_path, lock)?;
            if bound_here {
                // Not in the seed: a listener the daemon bound itself is given to the library
                // too, so that a supervisor started later can take it back from this process
                // (`Supervisor::expect_listener`) and pass it to a successor.
                incumbent = incumbent.with_listener("http", &listener)?;
            }
            announce("cold start", &listener, &db);

            let drainable = MyDrainable {
                db: Arc::clone(&db),
            };
            thread::spawn(move || serve_handoffs(incumbent, drainable));

            serve(listener, db)?;
        }

        Role::Successor(s) => {
            // Spawned by the supervisor during a swap.
            // handshake/wait_for_begin use consuming typestates so the compiler
            // enforces call order: Successor → HandshookSuccessor → BegunSuccessor.
            let s = s.handshake(build_id())?;
            let mut s = s.wait_for_begin()?; // blocks until incumbent has sealed and released flock

            let listener = s
                .take_listener("http")
                .expect("supervisor must pass http listener");
            let lock = DataDirLock::acquire(data_dir)?; // always succeeds; incumbent released it
            let db = MyDatabase::open(data_dir)?; // opens sealed snapshot

            // Not in the seed: check that what we opened is what the incumbent sealed. An
            // error here exits the process before `Ready`, and the handoff rolls back.
            let sealed = s.seal_report();
            anyhow::ensure!(
                sealed.last_revision_per_shard == db.revisions()
                    && sealed.data_dir_fingerprint == db.fingerprint(),
                "opened revisions {:?} (fingerprint {:#x}), but the incumbent sealed {:?} ({:#x})",
                db.revisions(),
                db.fingerprint(),
                sealed.last_revision_per_shard,
                sealed.data_dir_fingerprint,
            );

            // Send Ready and bind in one call. This is the safe path: by the
            // time the bind runs, the supervisor has committed the prior
            // incumbent, so we can take over the control-socket path
            // without breaking the abort guarantee.
            let incumbent = s.announce_and_bind(
                ReadinessSnapshot {
                    listening_on: vec![listener.local_addr()?.to_string()],
                    healthz_ok: true,
                    advertised_revision_per_shard: db.revisions(),
                },
                socket_path,
                lock,
            )?;
            announce("successor", &listener, &db);

            let drainable = MyDrainable {
                db: Arc::clone(&db),
            };
            thread::spawn(move || serve_handoffs(incumbent, drainable));

            serve(listener, db)?;
        }
    }
    Ok(())
}

/// Answer supervisors until a successor takes over; `serve` then ends the process (status 0).
/// It returns only if its loop cannot go on: the daemon keeps serving, but cannot be handed
/// off any more, which an operator must hear of.
fn serve_handoffs(incumbent: Incumbent, drainable: MyDrainable) {
    if let Err(e) = incumbent.serve(drainable) {
        eprintln!(
            "my_daemon[{}]: the handoff endpoint stopped: {e}",
            std::process::id()
        );
    }
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn build_id() -> String {
    format!("my_daemon {}", env!("CARGO_PKG_VERSION"))
}

fn announce(role: &str, listener: &TcpListener, db: &MyDatabase) {
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    eprintln!(
        "my_daemon[{}]: {role}: serving on {addr}, shard revisions {:?}",
        std::process::id(),
        db.revisions()
    );
}

// ---------------------------------------------------------------------------------------
// The service: a line-based TCP server.

/// Accept connections and serve each on a thread of its own, forever. While a handoff drains
/// ([`MyDatabase::stop_writes`]) nothing is accepted: new connections wait in the kernel's
/// queue for whichever process serves next.
fn serve(listener: TcpListener, db: Arc<MyDatabase>) -> std::io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // How often an idle accept loop looks at the gate: a drain waits at most this long for
    // the loop to stop accepting.
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    loop {
        db.wait_until_accepting();
        let mut fds = [PollFd::new(&listener, PollFlags::IN)];
        match poll(&mut fds, Some(&tick)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[0].revents().is_empty() || db.gate().stopped {
            continue;
        }
        // The listener is shared with the supervisor and, during a handoff, the successor;
        // nobody else accepts while this process may, so this does not block.
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                use std::io::ErrorKind::*;
                if !matches!(e.kind(), WouldBlock | Interrupted | ConnectionAborted) {
                    eprintln!("my_daemon[{}]: accept: {e}", std::process::id());
                }
                continue;
            }
        };
        let Ok(id) = db.register(&stream) else {
            continue;
        };
        let db = Arc::clone(&db);
        thread::spawn(move || serve_connection(&db, id, stream));
    }
}

fn serve_connection(db: &MyDatabase, id: u64, stream: TcpStream) {
    let mut out = &stream;
    let mut lines = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(_) if line.ends_with('\n') => {}
            _ => break, // closed (maybe mid-line), or unreadable
        }
        // Stopped for a handoff: close without executing the request.
        let Some(_in_flight) = db.begin_request() else {
            break;
        };
        let request = line.trim_end_matches(['\n', '\r']);
        let answer = db.execute(request);
        if writeln!(out, "{answer}").is_err() {
            break;
        }
    }
    db.unregister(id);
}

// ---------------------------------------------------------------------------------------
// The database: append-only, fsynced logs, one per shard.

const SHARDS: usize = 2;

struct MyDatabase {
    dir: PathBuf,
    shards: Vec<Mutex<Shard>>,
    gate: Mutex<Gate>,
    gate_changed: Condvar,
}

struct Shard {
    path: PathBuf,
    /// `None` once sealed (or after a failed append): no more writes until reopened.
    writer: Option<File>,
    revision: u64,
    data: HashMap<String, String>,
}

/// Who may come in: the drain closes the gate.
#[derive(Default)]
struct Gate {
    /// Draining or sealed: accept nothing, execute nothing.
    stopped: bool,
    /// The accept loop is running (it stops only at its next look at `stopped`).
    accepting: bool,
    /// Requests being executed and answered.
    in_flight: u64,
    conns: HashMap<u64, TcpStream>,
    next_conn: u64,
}

/// A request being executed; the drain waits for it.
struct InFlight<'a>(&'a MyDatabase);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.gate().in_flight -= 1;
        self.0.gate_changed.notify_all();
    }
}

impl MyDatabase {
    /// Open (creating if needed) the shard logs in `dir`, replaying them.
    fn open(dir: &Path) -> Result<Arc<MyDatabase>> {
        let shards = (0..SHARDS)
            .map(|n| Shard::load(dir.join(format!("shard-{n}.log"))).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;
        sync_dir(dir)?;
        Ok(Arc::new(MyDatabase {
            dir: dir.to_path_buf(),
            shards,
            gate: Mutex::new(Gate::default()),
            gate_changed: Condvar::new(),
        }))
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let n = fnv1a(FNV_OFFSET, key.as_bytes()) as usize % self.shards.len();
        self.shards[n].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn all_shards(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn execute(&self, request: &str) -> String {
        let mut words = request.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("SET"), Some(key), Some(value)) if !key.is_empty() => {
                match self.shard(key).append(key, value) {
                    Ok(rev) => format!("OK {rev}"),
                    Err(e) => format!("ERR {e}"),
                }
            }
            (Some("GET"), Some(key), None) => match self.shard(key).data.get(key) {
                Some(value) => format!("VALUE {value}"),
                None => "NONE".into(),
            },
            (Some("PID"), None, None) => format!("PID {}", std::process::id()),
            _ => "ERR usage: SET <key> <value> | GET <key> | PID".into(),
        }
    }

    /// Refuse new connections and new requests from now on.
    fn stop_writes(&self) {
        self.gate().stopped = true;
        self.gate_changed.notify_all();
    }

    /// Wait (until `deadline`) for the accept loop to stop and the requests being executed
    /// to be answered, then close every connection.
    fn drain_inflight(&self, deadline: Instant) -> Result<()> {
        let mut gate = self.gate();
        while gate.accepting || gate.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::msg(format!(
                    "{} requests still in flight at the drain deadline",
                    gate.in_flight
                )));
            }
            gate = self
                .gate_changed
                .wait_timeout(gate, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // Every connection is between two requests: close them (their threads see the end of
        // the stream, or the gate closed, and go).
        for conn in gate.conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        Ok(())
    }

    fn fsync(&self) -> Result<()> {
        for shard in self.all_shards() {
            if let Some(w) = &shard.writer {
                w.sync_all()?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Write each shard's footer, fsync and close it; the shards' revisions.
    fn seal_active_segments(&self) -> Result<Vec<u64>> {
        let mut revisions = Vec::with_capacity(self.shards.len());
        for mut shard in self.all_shards() {
            if let Some(mut w) = shard.writer.take() {
                writeln!(w, "SEAL {}", shard.revision)?;
                w.sync_all()?;
            }
            revisions.push(shard.revision);
        }
        sync_dir(&self.dir)?;
        Ok(revisions)
    }

    /// After a rolled-back handoff: reload every shard from disk, writer open, and accept
    /// again.
    fn reopen_writer(&self) -> Result<()> {
        for mut shard in self.all_shards() {
            *shard = Shard::load(shard.path.clone())?;
        }
        self.gate().stopped = false;
        self.gate_changed.notify_all();
        Ok(())
    }

    /// FNV-1a over the shard count and the revisions.
    fn fingerprint(&self) -> u64 {
        let revisions = self.revisions();
        let h = fnv1a(FNV_OFFSET, &(revisions.len() as u64).to_le_bytes());
        revisions.iter().fold(h, |h, r| fnv1a(h, &r.to_le_bytes()))
    }

    fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn open_conns(&self) -> u64 {
        self.gate().conns.len() as u64
    }

    fn revisions(&self) -> Vec<u64> {
        self.all_shards().map(|s| s.revision).collect()
    }

    /// Block while stopped; then mark the accept loop running.
    fn wait_until_accepting(&self) {
        let mut gate = self.gate();
        while gate.stopped {
            if gate.accepting {
                gate.accepting = false;
                self.gate_changed.notify_all();
            }
            gate = self
                .gate_changed
                .wait(gate)
                .unwrap_or_else(|p| p.into_inner());
        }
        gate.accepting = true;
    }

    fn register(&self, stream: &TcpStream) -> std::io::Result<u64> {
        let twin = stream.try_clone()?;
        let mut gate = self.gate();
        let id = gate.next_conn;
        gate.next_conn += 1;
        gate.conns.insert(id, twin);
        Ok(id)
    }

    fn unregister(&self, id: u64) {
        self.gate().conns.remove(&id);
    }

    /// `None` while stopped: the request must not be executed.
    fn begin_request(&self) -> Option<InFlight<'_>> {
        let mut gate = self.gate();
        if gate.stopped {
            return None;
        }
        gate.in_flight += 1;
        Some(InFlight(self))
    }
}

impl Shard {
    /// Replay a shard log (created if missing). A last line without its newline is a write
    /// cut short by a crash, never acknowledged: it is cut off.
    fn load(path: PathBuf) -> Result<Shard> {
        let ctx = |e: std::io::Error| Error::msg(format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(ctx)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(ctx)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64).map_err(ctx)?;
            file.sync_all().map_err(ctx)?;
        }
        let mut shard = Shard {
            path: path.clone(),
            writer: None,
            revision: 0,
            data: HashMap::new(),
        };
        for (n, line) in text[..complete].lines().enumerate() {
            let bad = || Error::msg(format!("{} line {}: {line:?}", path.display(), n + 1));
            let mut words = line.splitn(4, ' ');
            match (words.next(), words.next().map(str::parse::<u64>)) {
                (Some("SET"), Some(Ok(rev))) if rev == shard.revision + 1 => {
                    let (key, value) = (words.next().ok_or_else(bad)?, words.next().unwrap_or(""));
                    shard.data.insert(key.to_string(), value.to_string());
                    shard.revision = rev;
                }
                (Some("SEAL"), Some(Ok(rev))) if rev == shard.revision => {}
                _ => return Err(bad()),
            }
        }
        shard.writer = Some(file);
        Ok(shard)
    }

    /// Append `SET`, fsync, apply; the new revision.
    fn append(&mut self, key: &str, value: &str) -> Result<u64> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| Error::msg("shard is sealed"))?;
        let rev = self.revision + 1;
        let written = writer
            .write_all(format!("SET {rev} {key} {value}\n").as_bytes())
            .and_then(|()| writer.sync_data());
        if let Err(e) = written {
            // The log may end with part of a line now: no more appends until reloaded.
            self.writer = None;
            return Err(e.into());
        }
        self.revision = rev;
        self.data.insert(key.to_string(), value.to_string());
        Ok(rev)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}
