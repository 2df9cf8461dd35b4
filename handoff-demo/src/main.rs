//! `handoff-demo`: the whole promise in one command.
//!
//! ```text
//! cargo run --release -p handoff-demo [-- --handoffs 20 --clients 8]
//! ```
//!
//! It starts the reference supervisor (`handoff-supervisor`, socket-activated with the `kv`
//! listener) with `kvd` (a key-value daemon with a real, fsynced, segmented log), puts it under
//! load from concurrent clients (half on long-lived connections,
//! half opening a new connection per request), hands it off again and again to fresh copies
//! of the binary ("v2", "v3", …), once to a deliberately broken build that must roll back,
//! then reads back every acknowledged write. It prints a progress line while it runs and a
//! table at the end, and exits non-zero if any acknowledged write was lost, any connection was
//! refused or reset, or a handoff ended otherwise than expected.
//!
//! It also samples the supervisor's open descriptors (`/proc/PID/fd`) and resident memory
//! (`VmRSS` in `/proc/PID/status`) before the first handoff, every 100 handoffs and at the
//! end, prints them, and fails if the descriptor count grew (`scripts/soak` runs 1,000
//! handoffs).
//!
//! The same binary is the daemon and the supervisor: started as `kvd …` (or under a file name
//! beginning with `kvd`) it runs `kvd` (see `handoff_demo::kvd`); as `supervisor --config …` it
//! runs `handoff-supervisor`. Handoffs are triggered over the supervisor's trigger socket, as
//! `handoffctl` does.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use handoff_engine::sys::spawn::{spawn_with_listeners, Command, Watched};

/// How long any client operation may take before it counts as a stall failure.
const IO_BOUND: Duration = Duration::from_secs(30);

struct Opts {
    handoffs: usize,
    clients: usize,
    broken_at: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        handoffs: 20,
        clients: 8,
        broken_at: 7,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = || args.get(i + 1).and_then(|v| v.parse().ok());
        match args[i].as_str() {
            "--handoffs" => o.handoffs = v().expect("--handoffs N"),
            "--clients" => o.clients = v().expect("--clients N"),
            "--broken-at" => o.broken_at = v().expect("--broken-at N"),
            "-h" | "--help" => {
                println!(
                    "usage: handoff-demo [--handoffs N (20)] [--clients N (8)] [--broken-at N (7)]"
                );
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    assert!(o.clients >= 2, "at least 2 clients");
    o
}

/// What every client counts.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    clean_closes: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other_errors: AtomicU64,
    max_stall_us: AtomicU64,
}

impl Counters {
    fn stall(&self, d: Duration) {
        self.max_stall_us
            .fetch_max(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// One client connection speaking kvd's line protocol.
struct Conn {
    r: BufReader<TcpStream>,
}

enum Answer {
    Line(String),
    /// A clean end of stream: the daemon half-closed the connection (a drain); reconnect.
    Closed,
}

impl Conn {
    fn open(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, IO_BOUND)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_BOUND))?;
        s.set_write_timeout(Some(IO_BOUND))?;
        Ok(Conn {
            r: BufReader::new(s),
        })
    }

    fn call(&mut self, line: &str) -> io::Result<Answer> {
        self.r.get_mut().write_all(format!("{line}\n").as_bytes())?;
        let mut a = String::new();
        if self.r.read_line(&mut a)? == 0 {
            return Ok(Answer::Closed);
        }
        Ok(Answer::Line(a.trim_end().to_string()))
    }
}

/// Classify a connection error: refused and reset are what the demo promises never happen.
fn count_error(c: &Counters, e: &io::Error) {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => c.refused.fetch_add(1, Ordering::Relaxed),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            c.reset.fetch_add(1, Ordering::Relaxed)
        }
        _ => c.other_errors.fetch_add(1, Ordering::Relaxed),
    };
}

/// A client: writes unique keys and reads some back, until `stop`. Returns what was acked.
fn client(
    id: usize,
    addr: SocketAddr,
    long_lived: bool,
    stop: Arc<AtomicBool>,
    c: Arc<Counters>,
) -> BTreeMap<String, String> {
    let mut acked = BTreeMap::new();
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let key = format!("c{id}-k{n}");
        let value = format!("v{n}-{}", n.wrapping_mul(2654435761) % 1_000_003);
        if conn.is_none() {
            match Conn::open(addr) {
                Ok(cn) => conn = Some(cn),
                Err(e) => {
                    count_error(&c, &e);
                    continue;
                }
            }
        }
        let cn = conn.as_mut().expect("opened above");
        c.sent.fetch_add(1, Ordering::Relaxed);
        match cn.call(&format!("SET {key} {value}")) {
            Ok(Answer::Line(a)) if a.starts_with("OK ") => {
                acked.insert(key.clone(), value.clone());
                c.acked.fetch_add(1, Ordering::Relaxed);
                c.stall(last_ok.elapsed());
                last_ok = Instant::now();
                n += 1;
                // Now and then, read one of ours back on the same connection.
                if n % 16 == 0 {
                    let probe = format!("c{id}-k{}", n / 2);
                    if let Some(want) = acked.get(&probe) {
                        match cn.call(&format!("GET {probe}")) {
                            Ok(Answer::Line(got)) if got == format!("VAL {want}") => {}
                            Ok(Answer::Line(got)) if got == "ERR retry" => {}
                            Ok(Answer::Closed) => conn = None,
                            Ok(Answer::Line(got)) => {
                                eprintln!(
                                    "\nclient {id}: GET {probe} = {got:?}, expected VAL {want}"
                                );
                                c.other_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                count_error(&c, &e);
                                conn = None;
                            }
                        }
                    }
                }
                if !long_lived {
                    conn = None;
                }
            }
            Ok(Answer::Line(a)) if a.starts_with("ERR retry") => {
                // Not applied (a handoff is draining this daemon): retry, on a new connection
                // once this one is closed.
                c.retried.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
            }
            Ok(Answer::Line(a)) => {
                eprintln!("\nclient {id}: unexpected answer {a:?}");
                c.other_errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Ok(Answer::Closed) => {
                c.clean_closes.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Err(e) => {
                count_error(&c, &e);
                conn = None;
            }
        }
    }
    acked
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The work directory, removed at the end.
struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_build(exe: &Path, work: &Path, name: &str) -> PathBuf {
    let to = work.join(name);
    std::fs::copy(exe, &to).expect("copy the binary");
    to
}

/// One command on the trigger socket, one line back (as `handoffctl` does).
fn ask(trigger: &Path, line: &str) -> io::Result<String> {
    let mut s = UnixStream::connect(trigger)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

/// Wait (bounded, polling `status`) until the supervisor reports a serving daemon.
fn wait_serving(trigger: &Path, log: &Path) -> u32 {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = ask(trigger, "status") {
            if s.starts_with("state=idle ") {
                if let Some(pid) = field(&s, "serving_pid").and_then(|p| p.parse().ok()) {
                    return pid;
                }
            }
        }
        if Instant::now() > until {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("the supervisor did not start kvd within 30 s:\n{log}");
        }
        // A bounded poll of the status socket while the supervisor starts.
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// `key=value` from a status line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// `handoff <path>` → whether it committed, and the abort reason.
fn trigger_handoff(trigger: &Path, bin: &Path) -> io::Result<(bool, String)> {
    let a = ask(trigger, &format!("handoff {}", bin.display()))?;
    let committed = field(&a, "committed").ok_or_else(|| io::Error::other(a.clone()))? == "true";
    let reason = a.split("abort_reason=").nth(1).unwrap_or("?").to_string();
    Ok((committed, reason))
}

/// The last handoff's phase times, from `status` (`phases=name:<ms>ms,…`).
fn last_phases(trigger: &Path) -> BTreeMap<String, Duration> {
    let s = ask(trigger, "status").unwrap_or_default();
    field(&s, "phases")
        .unwrap_or("-")
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            let ms: f64 = v.strip_suffix("ms")?.parse().ok()?;
            Some((k.to_string(), Duration::from_secs_f64(ms / 1e3)))
        })
        .collect()
}

/// How often (in handoffs) the supervisor's descriptors and memory are sampled.
const SAMPLE_EVERY: usize = 100;

/// A process's open descriptors and resident memory, from `/proc`.
struct Usage {
    /// What each open descriptor refers to (`/proc/PID/fd/N` link targets), sorted.
    fds: Vec<String>,
    rss_kib: u64,
}

fn usage(pid: u32) -> io::Result<Usage> {
    let mut fds = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        // A descriptor closed between the listing and the reading is simply not counted.
        if let Ok(target) = std::fs::read_link(e.path()) {
            fds.push(target.display().to_string());
        }
    }
    fds.sort();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS line"))?;
    Ok(Usage { fds, rss_kib })
}

fn main() -> std::process::ExitCode {
    if handoff_demo::kvd::is_kvd_invocation() {
        return handoff_demo::kvd::main();
    }
    if std::env::args().nth(1).as_deref() == Some("supervisor") {
        return handoff_supervisor::cli::cli(std::env::args().skip(2));
    }
    let o = opts();
    // Quiet daemons, unless asked otherwise: the supervisor inherits our environment and
    // passes `HANDOFF_LOG` on to kvd; `KVD_LOG` goes through the configuration's `env`.
    for var in ["HANDOFF_LOG", "KVD_LOG"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "off");
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    let work = Work(std::env::temp_dir().join(format!("handoff-demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&work.0);
    std::fs::create_dir_all(work.0.join("data")).expect("work dir");
    let data = work.0.join("data");
    let sock = work.0.join("kvd.sock");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let trigger = work.0.join("trigger.sock");
    let v1 = copy_build(&exe, &work.0, "kvd-v1");
    let config = work.0.join("handoff.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = {sock:?}\n\
             trigger_socket = {trigger:?}\n\
             binary = {v1:?}\n\
             args = [\"--data\", {data:?}, \"--socket\", {sock:?}]\n\
             env = {{ KVD_LOG = {kvd_log:?} }}\n\
             binary_dir = {dir:?}\n\
             drain_grace_secs = 5\n\
             deadline_secs = 20\n\n\
             [[listeners]]\nname = \"kv\"\naddr = \"{addr}\"\n",
            dir = work.0,
            kvd_log = std::env::var("KVD_LOG").unwrap_or_default(),
        ),
    )
    .expect("write the configuration");
    println!(
        "handoff demo: handoff-supervisor with kvd on {addr}, {} clients ({} long-lived, {} connection-per-request), {} handoffs (#{} to a broken build)",
        o.clients,
        o.clients / 2,
        o.clients - o.clients / 2,
        o.handoffs,
        o.broken_at
    );
    // The supervisor, socket-activated as systemd would start it: the `kv` listener at fd 3
    // (`LISTEN_FDS`), its log in the work directory.
    let sup_log = work.0.join("supervisor.log");
    let mut cmd = Command::new("/bin/sh");
    cmd.args = vec![
        "-c".into(),
        "exec \"$0\" supervisor --config \"$1\" 2>>\"$2\"".into(),
        exe.clone().into_os_string(),
        config.clone().into_os_string(),
        sup_log.clone().into_os_string(),
    ];
    cmd.inherit_stdio = false;
    let mut sup_child =
        spawn_with_listeners(&cmd, &[("kv", listener.as_fd())]).expect("start handoff-supervisor");
    drop(listener);
    let first = wait_serving(&trigger, &sup_log);
    println!(
        "kvd v1 serving as pid {first} under handoff-supervisor pid {}",
        sup_child.id()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let clients: Vec<_> = (0..o.clients)
        .map(|id| {
            let (stop, c) = (Arc::clone(&stop), Arc::clone(&counters));
            std::thread::spawn(move || client(id, addr, id % 2 == 0, stop, c))
        })
        .collect();

    let started = Instant::now();
    let progress = Arc::new(Mutex::new(String::new()));
    let (committed, rolled_back, unexpected) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let ticker = {
        let (stop, c, committed, rolled_back) = (
            Arc::clone(&stop),
            Arc::clone(&counters),
            Arc::clone(&committed),
            Arc::clone(&rolled_back),
        );
        let progress = Arc::clone(&progress);
        let total = o.handoffs;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let line = format!(
                    "\r[{:>5.1}s] handoffs {}/{} (committed {}, rolled back {}) | writes acked {} | retried {} | refused {} reset {} | longest stall {}   ",
                    started.elapsed().as_secs_f64(),
                    committed.load(Ordering::Relaxed) + rolled_back.load(Ordering::Relaxed),
                    total,
                    committed.load(Ordering::Relaxed),
                    rolled_back.load(Ordering::Relaxed),
                    c.acked.load(Ordering::Relaxed),
                    c.retried.load(Ordering::Relaxed),
                    c.refused.load(Ordering::Relaxed),
                    c.reset.load(Ordering::Relaxed),
                    ms(Duration::from_micros(c.max_stall_us.load(Ordering::Relaxed))),
                );
                print!("{line}");
                let _ = io::stdout().flush();
                *progress.lock().expect("progress") = line;
                std::thread::park_timeout(Duration::from_millis(200));
            }
        })
    };

    let sup_pid = sup_child.id();
    // (handoffs done, the supervisor's usage then), taken when it is idle between handoffs.
    let mut samples: Vec<(usize, Usage)> = Vec::new();
    let mut sample = |done: usize| match usage(sup_pid) {
        Ok(u) => {
            println!(
                "\n  after {done} handoffs: supervisor fds {}, RSS {} KiB",
                u.fds.len(),
                u.rss_kib
            );
            samples.push((done, u));
        }
        Err(e) => println!("\n  cannot read the supervisor's /proc entries: {e}"),
    };
    let mut times = Vec::new();
    let mut version = 1;
    // The build serving now, removed once a later one commits (1,000 copies of the binary
    // would fill the disk); v1 stays, it is the configured binary.
    let mut serving_copy: Option<PathBuf> = None;
    for i in 1..=o.handoffs {
        // Let the clients work a little between handoffs.
        let settle = Instant::now() + Duration::from_millis(150);
        while Instant::now() < settle {
            std::thread::park_timeout(settle - Instant::now());
        }
        if (i - 1) % SAMPLE_EVERY == 0 {
            sample(i - 1);
        }
        let broken = i == o.broken_at;
        let name = if broken {
            format!("kvd-v{}-broken", version + 1)
        } else {
            version += 1;
            format!("kvd-v{version}")
        };
        let bin = copy_build(&exe, &work.0, &name);
        let outcome = trigger_handoff(&trigger, &bin);
        match &outcome {
            Ok((true, _)) => {
                if let Some(old) = serving_copy.replace(bin.clone()) {
                    let _ = std::fs::remove_file(old);
                }
            }
            _ => {
                let _ = std::fs::remove_file(&bin);
            }
        }
        match outcome {
            Ok((committed_now, reason)) if committed_now != broken => {
                if committed_now {
                    committed.fetch_add(1, Ordering::Relaxed);
                    times.push(last_phases(&trigger));
                } else {
                    rolled_back.fetch_add(1, Ordering::Relaxed);
                    let total = last_phases(&trigger)
                        .get("total")
                        .copied()
                        .unwrap_or_default();
                    println!(
                        "\n  #{i} {name}: rolled back as expected ({reason}) in {}",
                        ms(total)
                    );
                }
            }
            Ok((committed_now, reason)) => {
                unexpected.fetch_add(1, Ordering::Relaxed);
                println!("\n  #{i} {name}: UNEXPECTED: committed={committed_now} ({reason})");
            }
            Err(e) => {
                unexpected.fetch_add(1, Ordering::Relaxed);
                println!("\n  #{i} {name}: trigger failed: {e}");
            }
        }
    }
    // A last moment of traffic on the final build, then stop and verify.
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        std::thread::park_timeout(settle - Instant::now());
    }
    sample(o.handoffs);
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<BTreeMap<String, String>> = clients
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let _ = ticker.join();
    println!();

    // Read every acknowledged write back.
    let mut lost = 0u64;
    let mut checked = 0u64;
    let mut verify = Conn::open(addr).expect("connect to verify");
    for (k, v) in acked.iter().flatten() {
        let got = loop {
            match verify.call(&format!("GET {k}")) {
                Ok(Answer::Line(a)) => break a,
                Ok(Answer::Closed) | Err(_) => verify = Conn::open(addr).expect("reconnect"),
            }
        };
        checked += 1;
        if got != format!("VAL {v}") {
            lost += 1;
            if lost <= 5 {
                println!("  LOST: {k} = {v:?}, read {got:?}");
            }
        }
    }

    let c = &counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let phase = |key: &str| {
        let mut v: Vec<Duration> = times.iter().filter_map(|t| t.get(key).copied()).collect();
        v.sort();
        (pct(&v, 0.5), pct(&v, 0.99))
    };
    let rows: [(&str, String); 13] = [
        ("handoffs committed", get(&committed).to_string()),
        (
            "handoffs rolled back (as expected)",
            get(&rolled_back).to_string(),
        ),
        (
            "handoffs with another outcome",
            get(&unexpected).to_string(),
        ),
        ("requests sent", get(&c.sent).to_string()),
        ("writes acknowledged", get(&c.acked).to_string()),
        ("writes answered `ERR retry`", get(&c.retried).to_string()),
        (
            "connections closed cleanly, retried",
            get(&c.clean_closes).to_string(),
        ),
        ("connections refused", get(&c.refused).to_string()),
        ("connections reset", get(&c.reset).to_string()),
        ("other client errors", get(&c.other_errors).to_string()),
        ("acknowledged writes read back", checked.to_string()),
        ("acknowledged writes lost", lost.to_string()),
        (
            "longest client stall",
            ms(Duration::from_micros(get(&c.max_stall_us))),
        ),
    ];
    println!("\n  {:<38}  {:>10}", "result", "value");
    println!("  {:-<38}  {:->10}", "", "");
    for (k, v) in rows {
        println!("  {k:<38}  {v:>10}");
    }
    println!(
        "\n  {:<38}  {:>10}  {:>10}",
        "phase (committed handoffs)", "p50", "p99"
    );
    println!("  {:-<38}  {:->10}  {:->10}", "", "", "");
    for (name, key) in [
        ("spawn → hello", "spawn_to_hello"),
        ("listeners passed", "listeners"),
        ("greet the incumbent", "greet_incumbent"),
        ("drain", "drain"),
        ("seal", "seal"),
        ("begin → ready", "begin_to_ready"),
        ("commit", "commit"),
        ("trigger → commit acknowledged", "to_commit"),
        ("total (to the outcome)", "total"),
    ] {
        let (p50, p99) = phase(key);
        println!("  {name:<38}  {:>10}  {:>10}", ms(p50), ms(p99));
    }
    println!(
        "\n  {:<38}  {:>10}  {:>10}",
        format!("supervisor (pid {sup_pid}), after handoffs"),
        "fds",
        "RSS"
    );
    println!("  {:-<38}  {:->10}  {:->10}", "", "", "");
    for (done, u) in &samples {
        println!(
            "  {done:<38}  {:>10}  {:>10}",
            u.fds.len(),
            format!("{} KiB", u.rss_kib)
        );
    }
    let fds_flat = match (samples.first(), samples.last()) {
        (Some((_, first)), Some((_, last))) if samples.len() >= 2 => {
            let grew = last.fds.len() > first.fds.len();
            if grew {
                let new: Vec<&String> =
                    last.fds.iter().filter(|f| !first.fds.contains(f)).collect();
                println!("  the supervisor's descriptors grew; new ones: {new:?}");
            }
            !grew
        }
        _ => {
            println!("  too few samples of the supervisor's descriptors");
            false
        }
    };
    let ok = fds_flat
        && lost == 0
        && get(&c.refused) == 0
        && get(&c.reset) == 0
        && get(&c.other_errors) == 0
        && get(&unexpected) == 0
        && get(&rolled_back) == u64::from(o.broken_at <= o.handoffs)
        && get(&c.acked) > 0;
    // Stop: SIGTERM makes the supervisor stop kvd within its drain grace, then exit.
    if let Ok(w) = Watched::open(sup_child.id()) {
        let _ = w.signal(rustix::process::Signal::TERM);
        if handoff_engine::sys::spawn::wait_any(&[&w], Duration::from_secs(15))
            .unwrap_or_default()
            .is_empty()
        {
            println!("  the supervisor did not stop within 15 s; killing it");
            let _ = w.kill();
        }
    }
    let _ = sup_child.wait();
    drop(progress);
    if ok {
        println!("\nOK: every acknowledged write survived {} handoffs; no connection was refused or reset.", get(&committed) + get(&rolled_back));
    } else {
        println!("\nFAILED: see the table above.");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
