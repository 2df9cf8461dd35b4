//! `handoff-latency`: how long a handoff takes, trigger to commit, phase by phase, against
//! the floor of this machine (see `BENCHMARKS.md`).
//!
//! ```text
//! handoff-latency [--daemon httpd|kvd] [--handoffs N] [--listeners N] [--writes K]
//!                 [--work DIR] [--markdown FILE]
//! handoff-latency --floor [--samples N] [--work DIR] [--markdown FILE]
//! ```
//!
//! The supervisor is the library's (`handoff::supervisor::Supervisor`, std driver) in this
//! process; the daemon is `handoff-httpd` (the no-op daemon: its hooks do nothing) or `kvd`
//! (a real fsynced log: the drain waits for the group commit, the seal fsyncs, the open
//! replays), found next to this executable. Before each handoff, `--writes K` requests
//! (`SET` for kvd, `GET` for httpd) go through the listener, so the daemon has served.
//!
//! Each daemon records (with `HANDOFF_BENCH_TIMINGS`) when its `main` began and how long its
//! hooks took. From that:
//!
//! - **process start** = trigger → the successor's `main` (fork, exec, loader, runtime);
//! - **hooks** = the incumbent's drain and seal hooks + the successor's opening of the data;
//! - **protocol overhead** = total − process start − hooks: messages, descriptor passing,
//!   locks, the journal's fsyncs, and the waits between them.
//!
//! `--floor` measures the machine's floor: fork + exec + exit of a trivial binary
//! (`/bin/true`, and this crate's `bench-true`, a Rust `fn main() {}` like our daemons'
//! runtime), and an fsync'd small file (a 64-byte write + `fsync`) in the work directory's
//! file system, and prints floor = spawn + fsync.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use handoff::supervisor::{SpawnSpec, Supervisor};
use handoff_bench::{mono_ns, ms, raise_nofile, sibling, timings, Stats};

struct Args {
    daemon: String,
    handoffs: usize,
    listeners: usize,
    writes: usize,
    work: PathBuf,
    markdown: Option<PathBuf>,
    floor: bool,
    samples: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        daemon: "httpd".into(),
        handoffs: 200,
        listeners: 1,
        writes: 100,
        work: PathBuf::from("target/bench/work"),
        markdown: None,
        floor: false,
        samples: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--floor" {
            a.floor = true;
            continue;
        }
        let v = it.next().ok_or(format!("{arg} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{arg} {v}: {e}"));
        match arg.as_str() {
            "--daemon" => a.daemon = v,
            "--handoffs" => a.handoffs = num(&v)?,
            "--listeners" => a.listeners = num(&v)?.max(1),
            "--writes" => a.writes = num(&v)?,
            "--work" => a.work = v.into(),
            "--markdown" => a.markdown = Some(v.into()),
            "--samples" => a.samples = num(&v)?,
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    if a.daemon != "httpd" && a.daemon != "kvd" {
        return Err(format!("--daemon {}: httpd or kvd", a.daemon));
    }
    Ok(a)
}

/// A fresh directory, removed on drop.
struct Work(PathBuf);

impl Work {
    fn new(base: &Path, tag: &str) -> Work {
        let p = base.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create the work directory");
        Work(std::fs::canonicalize(&p).expect("canonicalize"))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handoff-latency: {e}");
            std::process::exit(2);
        }
    };
    raise_nofile();
    // The library's own log lines (this process is the supervisor); the daemons get it too.
    std::env::set_var("HANDOFF_LOG", "off");
    let report = if args.floor {
        floor(&args)
    } else {
        handoffs(&args)
    };
    print!("{report}");
    if let Some(p) = &args.markdown {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(p, &report).expect("write the markdown report");
    }
}

/// The floor: spawn + exit of trivial binaries, and an fsync'd small file; plus, for the
/// breakdown, what our own spawn and journal writes cost alone.
fn floor(args: &Args) -> String {
    use std::os::unix::process::CommandExt;
    let work = Work::new(&args.work, "floor");
    let n = args.samples;
    // `fork`: a `pre_exec` hook makes std fork (as our spawn does, for its descriptor
    // placement); without one std uses `posix_spawn` (a `vfork`-like clone).
    let spawn = |bin: &Path, fork: bool, arg: Option<&str>| {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = Command::new(bin);
            c.args(arg);
            if fork {
                // SAFETY: the hook does nothing; it only makes std take its fork path.
                unsafe {
                    c.pre_exec(|| Ok(()));
                }
            }
            c.stderr(std::process::Stdio::null());
            let t = Instant::now();
            let st = c.status().expect("spawn");
            v.push(t.elapsed());
            assert!(st.code().is_some(), "{} died: {st}", bin.display());
        }
        Stats::new(v)
    };
    let fork_true = spawn(Path::new("/bin/true"), true, None);
    let fork_rust = spawn(&sibling("bench-true"), true, None);
    let vfork_rust = spawn(&sibling("bench-true"), false, None);
    let fork_httpd = spawn(&sibling("handoff-httpd"), true, Some("--help"));
    let timed = |f: &mut dyn FnMut(usize)| {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            f(i);
            v.push(t.elapsed());
        }
        Stats::new(v)
    };
    let fsync = timed(&mut |i| {
        let p = work.0.join(format!("f{}", i % 8));
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(&[b'x'; 64]).expect("write");
        f.sync_all().expect("fsync");
    });
    // A round trip: one byte each way over a Unix socket, between two threads (each message
    // of the protocol wakes the peer up like this).
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        use std::io::Read;
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() && byte[0] != 0 {
            b.write_all(&byte).expect("echo");
        }
    });
    let rtt = timed(&mut |_| {
        use std::io::Read;
        let mut byte = [1u8; 1];
        a.write_all(&byte).expect("ping");
        a.read_exact(&mut byte).expect("pong");
    });
    // The same after 1 ms of idleness (as between a handoff's messages, when both sides
    // wait): an idle vCPU sleeps, and waking it costs more than the message.
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        use std::io::Read;
        std::thread::sleep(Duration::from_millis(1));
        let mut byte = [1u8; 1];
        let t = Instant::now();
        a.write_all(&byte).expect("ping");
        a.read_exact(&mut byte).expect("pong");
        v.push(t.elapsed());
    }
    let rtt_idle = Stats::new(v);
    a.write_all(&[0]).expect("stop");
    echo.join().expect("echo thread");
    let journal = work.0.join("journal");
    let record = [7u8; 21];
    let journal_write = timed(&mut |_| {
        handoff_engine::sys::journal_file::write_atomic(&journal, &record).expect("journal write");
    });
    let mut out = format!(
        "## Floor ({n} samples each)\n\n| what | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n"
    );
    for (name, s) in [
        ("fork + exec + exit of `/bin/true`", &fork_true),
        (
            "fork + exec + exit of `bench-true` (Rust, `fn main() {}`)",
            &fork_rust,
        ),
        ("create + write 64 bytes + fsync", &fsync),
        (
            "(for reference) posix_spawn + exit of `bench-true`",
            &vfork_rust,
        ),
        (
            "(for reference) fork + exec + exit of `handoff-httpd --help`",
            &fork_httpd,
        ),
        (
            "(for reference) one journal record, as the supervisor writes it",
            &journal_write,
        ),
    ] {
        out += &format!(
            "| {name} | {} | {} | {} |\n",
            ms(s.p50()),
            ms(s.p99()),
            ms(s.max())
        );
    }
    out += &format!(
        "\nfloor (p50) = fork + exec of `bench-true` + fsync = {} ms (with `/bin/true`: {} ms)\n",
        ms(fork_rust.p50() + fsync.p50()),
        ms(fork_true.p50() + fsync.p50())
    );
    out += &format!(
        "FLOOR floor_ms={} fork_rust_p50_ms={} fork_true_p50_ms={} fsync_p50_ms={} journal_p50_ms={} rtt_p50_ms={} rtt_idle_p50_ms={}\n",
        ms(fork_rust.p50() + fsync.p50()),
        ms(fork_rust.p50()),
        ms(fork_true.p50()),
        ms(fsync.p50()),
        ms(journal_write.p50()),
        ms(rtt.p50()),
        ms(rtt_idle.p50())
    );
    out
}

/// One handoff's measurements.
struct Row {
    successor: u32,
    incumbent: u32,
    trigger_ns: u64,
    /// When `perform_handoff` returned (the engine's `total` stops at the step's start, before
    /// the journal's idle record written in that step).
    done_ns: u64,
    times: handoff::supervisor::PhaseTimes,
}

fn handoffs(args: &Args) -> String {
    let work = Work::new(&args.work, &args.daemon);
    let data = work.0.join("data");
    let tdir = work.0.join("timings");
    std::fs::create_dir_all(&data).expect("mkdir data");
    std::fs::create_dir_all(&tdir).expect("mkdir timings");
    let sock = work.0.join("ctl.sock");
    let (bin, first) = match args.daemon.as_str() {
        "kvd" => (sibling("kvd"), "kv"),
        _ => (sibling("handoff-httpd"), "http"),
    };
    if args.daemon == "kvd" && args.listeners > 1 {
        eprintln!("kvd serves one listener; use --daemon httpd for --listeners");
        std::process::exit(2);
    }
    let listeners: Vec<(String, TcpListener)> = (0..args.listeners)
        .map(|i| {
            let name = if i == 0 {
                first.to_string()
            } else {
                format!("l{i}")
            };
            (name, TcpListener::bind("127.0.0.1:0").expect("bind"))
        })
        .collect();
    let addr = listeners[0].1.local_addr().expect("local_addr");
    let spec = SpawnSpec {
        binary: bin.clone(),
        args: vec![
            "--data".into(),
            data.clone().into(),
            "--socket".into(),
            sock.clone().into(),
        ],
        env: vec![
            (timings::ENV.into(), tdir.clone().into()),
            ("KVD_LOG".into(), "off".into()),
            ("HTTPD_LOG".into(), "off".into()),
            ("HANDOFF_LOG".into(), "off".into()),
        ],
        drain_grace: Duration::from_secs(10),
        deadline: Duration::from_secs(30),
    };
    let mut sup = Supervisor::new(&sock)
        .expect("supervisor")
        .with_cold_start(spec.clone());
    for (name, l) in &listeners {
        sup = sup.with_listener_fd(name, l);
    }
    let first_pid = sup.resume_from_journal().expect("cold start").serving;
    let mut children = Vec::new();
    let mut rows = Vec::with_capacity(args.handoffs);
    let mut serving = first_pid;
    let mut client = Client::new(addr, &args.daemon);
    let wall = Instant::now();
    for i in 0..args.handoffs {
        for w in 0..args.writes {
            client.request(i, w);
        }
        let trigger_ns = mono_ns();
        let o = sup.perform_handoff(spec.clone()).expect("handoff");
        let done_ns = mono_ns();
        assert!(
            o.committed,
            "handoff {i} did not commit: {:?}",
            o.abort_reason
        );
        let successor = o.serving.expect("a committed handoff names the successor");
        rows.push(Row {
            successor,
            incumbent: serving,
            trigger_ns,
            done_ns,
            times: o.times,
        });
        serving = successor;
        children.extend(o.child);
        // Reap the retired ones as they exit (all but the serving one).
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }
    let wall = wall.elapsed();
    client.request(args.handoffs, 0);
    // The daemons write their timings from a thread of their own: the retired ones are
    // complete once they exited; the serving one once it recorded its last `open`.
    let bound = Instant::now() + Duration::from_secs(10);
    while !children
        .iter_mut()
        .all(|c| c.id() == serving || matches!(c.try_wait(), Ok(Some(_))))
    {
        assert!(Instant::now() < bound, "retired daemons did not exit");
        std::thread::park_timeout(Duration::from_millis(5));
    }
    while !timings::read(&tdir, serving)
        .iter()
        .any(|(n, _, _)| n == "open")
    {
        assert!(
            Instant::now() < bound,
            "the serving daemon recorded no timings"
        );
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(serving as i32).expect("pid"),
        rustix::process::Signal::KILL,
    );
    for mut c in children {
        let _ = c.wait();
    }
    analyse(args, &tdir, &rows, wall)
}

fn span(spans: &[(String, u64, u64)], name: &str) -> Option<(u64, u64)> {
    spans
        .iter()
        .rev()
        .find(|(n, _, _)| n == name)
        .map(|(_, a, b)| (*a, *b))
}

/// The `name` span of `pid` that started after `after_ns` (an incumbent drains once per
/// handoff it takes part in).
fn span_after(spans: &[(String, u64, u64)], name: &str, after_ns: u64) -> Option<Duration> {
    spans
        .iter()
        .find(|(n, a, _)| n == name && *a >= after_ns)
        .map(|(_, a, b)| Duration::from_nanos(b - a))
}

fn analyse(args: &Args, tdir: &Path, rows: &[Row], wall: Duration) -> String {
    let names = [
        "spawn → hello",
        "listeners passed",
        "greet the incumbent",
        "drain",
        "seal",
        "begin → ready",
        "commit acknowledged",
        "**trigger → commit** (the phases above)",
        "after the commit: retire the incumbent, journal idle",
        "trigger → outcome returned",
        "process start (trigger → successor main)",
        "hooks (drain + seal + open)",
        "**protocol overhead** (trigger → commit − start − hooks)",
    ];
    let mut cols: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut missing = 0;
    for r in rows {
        let succ = timings::read(tdir, r.successor);
        let inc = timings::read(tdir, r.incumbent);
        let t = r.times;
        let (Some(main), Some(drain), Some(seal), Some(open), Some(to_commit)) = (
            span(&succ, "main"),
            span_after(&inc, "drain", r.trigger_ns),
            span_after(&inc, "seal", r.trigger_ns),
            span(&succ, "open"),
            t.to_commit,
        ) else {
            missing += 1;
            continue;
        };
        let start = Duration::from_nanos(main.0.saturating_sub(r.trigger_ns));
        let returned = Duration::from_nanos(r.done_ns - r.trigger_ns);
        let hooks = drain + seal + Duration::from_nanos(open.1 - open.0);
        let overhead = to_commit.saturating_sub(start + hooks);
        let vals = [
            t.spawn_to_hello,
            t.listeners,
            t.greet_incumbent,
            t.drain,
            t.seal,
            t.begin_to_ready,
            t.commit,
            Some(to_commit),
            Some(returned.saturating_sub(to_commit)),
            Some(returned),
            Some(start),
            Some(hooks),
            Some(overhead),
        ];
        for (c, v) in cols.iter_mut().zip(vals) {
            if let Some(v) = v {
                c.push(v);
            }
        }
    }
    let daemon = match args.daemon.as_str() {
        "kvd" => format!(
            "kvd, {} `SET`s (each fsynced) before each handoff",
            args.writes
        ),
        _ => format!(
            "handoff-httpd (no-op hooks), {} requests before each handoff",
            args.writes
        ),
    };
    let mut out = format!(
        "## Handoff latency: {daemon}, {} listener(s)\n\n{} handoffs, all committed, in {:.1} s \
         ({} without complete timings)\n\n| phase | p50 ms | p99 ms | max ms | mean ms |\n\
         |---|---:|---:|---:|---:|\n",
        args.listeners,
        rows.len(),
        wall.as_secs_f64(),
        missing
    );
    let mut summary = Vec::new();
    for (name, c) in names.iter().zip(cols) {
        let s = Stats::new(c);
        summary.push(s.clone());
        out += &format!(
            "| {name} | {} | {} | {} | {} |\n",
            ms(s.p50()),
            ms(s.p99()),
            ms(s.max()),
            ms(s.mean())
        );
    }
    out += &format!(
        "\nLATENCY daemon={} listeners={} to_commit_p50_ms={} to_commit_p99_ms={} start_p50_ms={} \
         hooks_p50_ms={} overhead_p50_ms={} overhead_p99_ms={}\n",
        args.daemon,
        args.listeners,
        ms(summary[7].p50()),
        ms(summary[7].p99()),
        ms(summary[10].p50()),
        ms(summary[11].p50()),
        ms(summary[12].p50()),
        ms(summary[12].p99())
    );
    out
}

/// The requests sent before each handoff, on a fresh connection each time.
struct Client {
    addr: SocketAddr,
    kvd: bool,
}

impl Client {
    fn new(addr: SocketAddr, daemon: &str) -> Client {
        Client {
            addr,
            kvd: daemon == "kvd",
        }
    }

    fn request(&mut self, round: usize, n: usize) {
        let mut s = TcpStream::connect(self.addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        if self.kvd {
            s.write_all(format!("SET k{n} v{round}\n").as_bytes())
                .expect("send");
            r.read_line(&mut line).expect("answer");
            assert!(line.starts_with("OK "), "kvd answered {line:?}");
        } else {
            s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .expect("send");
            r.read_line(&mut line).expect("answer");
            assert!(line.starts_with("HTTP/1.1 200"), "httpd answered {line:?}");
        }
    }
}
