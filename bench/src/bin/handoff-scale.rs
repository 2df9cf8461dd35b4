//! `handoff-scale`: handoff time, and what the reference supervisor holds, as the number of
//! listeners grows (see `BENCHMARKS.md`).
//!
//! ```text
//! handoff-scale [--counts 1,10,100,1000,10000] [--handoffs N] [--work DIR] [--markdown FILE]
//! ```
//!
//! For each count it writes a configuration with that many TCP listeners on 127.0.0.1 (port 0:
//! the supervisor binds them), starts `handoff-supervisor` (found next to this executable)
//! with `handoff-httpd` as the daemon, waits until it serves, performs N handoffs (default 20)
//! over the trigger socket, and reads each one's phases from the `status` line. It reports the
//! phases' p50/p99, and the supervisor's and the daemon's resident set and descriptors, at
//! rest before the handoffs and after them. The growth per listener is the difference to the
//! smallest count, divided by the extra listeners.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_bench::{ms, proc_fd_count, proc_rss_kib, sibling, Stats};

const BOUND: Duration = Duration::from_secs(120);

struct Args {
    counts: Vec<usize>,
    handoffs: usize,
    work: PathBuf,
    markdown: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        counts: vec![1, 10, 100, 1000, 10000],
        handoffs: 20,
        work: PathBuf::from("target/bench/work"),
        markdown: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let v = it.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--counts" => {
                a.counts = v
                    .split(',')
                    .map(|c| c.trim().parse().map_err(|e| format!("--counts {c}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--handoffs" => a.handoffs = v.parse().map_err(|e| format!("--handoffs: {e}"))?,
            "--work" => a.work = v.into(),
            "--markdown" => a.markdown = Some(v.into()),
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    Ok(a)
}

/// One line asked of the trigger socket, one line answered.
fn ask(trigger: &Path, line: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(trigger)?;
    s.set_read_timeout(Some(BOUND))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.split(' ').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

/// `phases=spawn_to_hello:2.100ms,…`: the named phase.
fn phase(status: &str, name: &str) -> Option<Duration> {
    field(status, "phases")?.split(',').find_map(|p| {
        let (n, v) = p.split_once(':')?;
        let v = v.strip_suffix("ms")?.parse::<f64>().ok()?;
        (n == name).then(|| Duration::from_secs_f64(v / 1e3))
    })
}

/// The supervisor, stopped (SIGTERM: it stops the daemon) and reaped on drop, a panic too.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

struct Point {
    count: usize,
    startup: Duration,
    phases: Vec<(&'static str, Stats)>,
    sup_rest: (u64, usize),
    sup_after: (u64, usize),
    daemon: (u64, usize),
}

const PHASES: [&str; 7] = [
    "spawn_to_hello",
    "listeners",
    "drain",
    "seal",
    "begin_to_ready",
    "commit",
    "total",
];

fn measure(args: &Args, count: usize) -> Point {
    let work = args
        .work
        .join(format!("scale-{count}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("data")).expect("mkdir");
    let work = std::fs::canonicalize(&work).expect("canonicalize");
    let (sock, trigger, data) = (
        work.join("ctl.sock"),
        work.join("trigger.sock"),
        work.join("data"),
    );
    let httpd = sibling("handoff-httpd");
    let mut config = format!(
        "control_socket = {sock:?}\ntrigger_socket = {trigger:?}\nbinary = {httpd:?}\n\
         args = [\"--data\", {data:?}, \"--socket\", {sock:?}]\n\
         env = {{ HTTPD_LOG = \"off\", HANDOFF_LOG = \"off\"{timings} }}\n\
         drain_grace_secs = 10\ndeadline_secs = 100\n",
        timings = std::env::var("HANDOFF_BENCH_TIMINGS")
            .map(|d| format!(", HANDOFF_BENCH_TIMINGS = {d:?}"))
            .unwrap_or_default()
    );
    for i in 0..count {
        config += &format!("\n[[listeners]]\nname = \"l{i}\"\naddr = \"127.0.0.1:0\"\n");
    }
    let cfg = work.join("handoff.toml");
    std::fs::write(&cfg, config).expect("write the configuration");
    let log = std::fs::File::create(work.join("supervisor.log")).expect("log");
    let t = Instant::now();
    let sup = Command::new(sibling("handoff-supervisor"))
        .arg("--config")
        .arg(&cfg)
        .env("HANDOFF_LOG", "off")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start handoff-supervisor");
    let serving = |sup: &mut Child| loop {
        if let Ok(Some(st)) = sup.try_wait() {
            panic!(
                "handoff-supervisor exited ({st}); see {}",
                work.join("supervisor.log").display()
            );
        }
        if let Ok(s) = ask(&trigger, "status") {
            if let Some(pid) = field(&s, "serving_pid").and_then(|p| p.parse::<u32>().ok()) {
                if field(&s, "state") == Some("idle") {
                    return pid;
                }
            }
        }
        assert!(t.elapsed() < BOUND, "no daemon served within {BOUND:?}");
        std::thread::park_timeout(Duration::from_millis(5));
    };
    let mut sup = Reaped(sup);
    let first = serving(&mut sup.0);
    let startup = t.elapsed();
    let sup_pid = sup.0.id();
    let at = |pid: u32| {
        (
            proc_rss_kib(pid).unwrap_or(0),
            proc_fd_count(pid).unwrap_or(0),
        )
    };
    let sup_rest = at(sup_pid);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); PHASES.len()];
    let mut pid = first;
    for i in 0..args.handoffs {
        let answer = ask(&trigger, "handoff").expect("trigger a handoff");
        assert!(
            answer.contains("committed=true"),
            "handoff {i} with {count} listeners: {answer}"
        );
        let status = ask(&trigger, "status").expect("status");
        for (s, name) in samples.iter_mut().zip(PHASES) {
            if let Some(d) = phase(&status, name) {
                s.push(d);
            }
        }
        pid = field(&status, "serving_pid")
            .and_then(|p| p.parse().ok())
            .expect("serving pid");
    }
    let sup_after = at(sup_pid);
    let daemon = at(pid);
    drop(sup);
    let _ = std::fs::remove_dir_all(&work);
    Point {
        count,
        startup,
        phases: PHASES
            .iter()
            .zip(samples)
            .map(|(n, s)| (*n, Stats::new(s)))
            .collect(),
        sup_rest,
        sup_after,
        daemon,
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("handoff-scale: {e}");
            std::process::exit(2);
        }
    };
    {
        // The supervisor holds every listener and, while spawning, a duplicate of each: 10,000
        // listeners need 20,000 descriptors and more. Raise the hard limit where we may (root:
        // this machine's default hard limit is 20,000), the soft one to it; the supervisor and
        // the daemons inherit both.
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut l = getrlimit(Resource::Nofile);
        let want = Some(65_536);
        if l.maximum < want {
            let raised = rustix::process::Rlimit {
                current: want,
                maximum: want,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                l = raised;
            }
        }
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    let mut points = Vec::new();
    for &c in &args.counts {
        eprintln!("handoff-scale: {c} listener(s)…");
        points.push(measure(&args, c));
    }
    let mut out = format!(
        "## Scale: {} handoffs of handoff-httpd per listener count, reference supervisor\n\n\
         | listeners | total p50 ms | total p99 ms | listeners passed p50 ms | spawn → hello p50 ms | \
         begin → ready p50 ms | commit p50 ms | startup ms | supervisor RSS KiB (rest → after) | \
         supervisor fds (rest → after) | daemon RSS KiB | daemon fds |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        args.handoffs
    );
    let get = |p: &Point, n: &str| {
        p.phases
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    for p in &points {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {} → {} | {} → {} | {} | {} |\n",
            p.count,
            ms(get(p, "total").p50()),
            ms(get(p, "total").p99()),
            ms(get(p, "listeners").p50()),
            ms(get(p, "spawn_to_hello").p50()),
            ms(get(p, "begin_to_ready").p50()),
            ms(get(p, "commit").p50()),
            p.startup.as_secs_f64() * 1e3,
            p.sup_rest.0,
            p.sup_after.0,
            p.sup_rest.1,
            p.sup_after.1,
            p.daemon.0,
            p.daemon.1,
        );
    }
    if let (Some(a), Some(b)) = (points.first(), points.last()) {
        if b.count > a.count {
            let extra = (b.count - a.count) as f64;
            let dt = get(b, "total").p50().as_secs_f64() - get(a, "total").p50().as_secs_f64();
            let drss = b.sup_after.0 as f64 - a.sup_after.0 as f64;
            out += &format!(
                "\nper extra listener: {:.2} µs of handoff time (p50), {:.2} KiB of supervisor RSS\n",
                dt * 1e6 / extra,
                drss / extra
            );
        }
    }
    print!("{out}");
    if let Some(p) = &args.markdown {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(p, &out).expect("write the markdown report");
    }
}
