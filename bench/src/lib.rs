//! Shared pieces of the benchmark programs in `src/bin` (see `BENCHMARKS.md` at the root).
//!
//! - [`mono_ns`]: `CLOCK_MONOTONIC` in nanoseconds. It is one clock for every process on the
//!   machine, so a supervisor and the daemons it spawns can compare their timestamps.
//! - [`Stats`]: percentiles of a sample of durations.
//! - [`proc_rss_kib`], [`proc_fd_count`]: what a process holds, from `/proc`.
//! - [`free_port`]: a free TCP port on 127.0.0.1 for a server under test.

use std::time::Duration;

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock `std::time::Instant` reads on Linux).
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// A sample of durations, sorted on creation.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    sorted: Vec<Duration>,
}

impl Stats {
    /// The sample `v`, in any order.
    pub fn new(mut v: Vec<Duration>) -> Stats {
        v.sort_unstable();
        Stats { sorted: v }
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The `p`-quantile (`0.0..=1.0`) by the nearest-rank method; zero for an empty sample.
    pub fn pct(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (p * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.pct(0.5)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.pct(0.99)
    }

    /// The largest value (zero for an empty sample).
    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    /// The arithmetic mean (zero for an empty sample).
    pub fn mean(&self) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32
    }
}

/// The executable `name` next to this one (`target/<profile>/`); exits with a message naming
/// what to build if it is missing.
pub fn sibling(name: &str) -> std::path::PathBuf {
    let p = std::env::current_exe()
        .expect("current_exe")
        .with_file_name(name);
    if !p.exists() {
        eprintln!(
            "{} not found next to this executable: build it first \
             (cargo build --release -p handoff-bench -p handoff-demo -p handoff-supervisor)",
            p.display()
        );
        std::process::exit(2);
    }
    p
}

/// Raise the soft descriptor limit to the hard one (the scale runs pass thousands of
/// listeners).
pub fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// Milliseconds with three decimals, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The resident set of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// How many descriptors process `pid` holds (entries of `/proc/<pid>/fd`).
pub fn proc_fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A TCP port on 127.0.0.1 that nobody uses now, below the ephemeral range: no client's
/// `connect` takes it as its source port before the server binds it (which would make that
/// bind fail, with thousands of connections a second).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = 10_000.min(low / 2);
    let span = low.saturating_sub(base).max(1);
    // Spread over the range by pid and time, so that concurrent callers rarely collide.
    let start = u64::from(std::process::id()) * 7919 + mono_ns() / 1000;
    for _ in 0..span {
        let n = u64::from(NEXT.fetch_add(1, Ordering::SeqCst));
        let port = base + ((start + n * 101) % u64::from(span)) as u32;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            if let Ok(a) = l.local_addr() {
                return a.port();
            }
        }
    }
    panic!("no free port in {base}..{low}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(s.p50(), Duration::from_millis(50));
        assert_eq!(s.p99(), Duration::from_millis(99));
        assert_eq!(s.max(), Duration::from_millis(100));
        assert_eq!(s.pct(0.0), Duration::from_millis(1));
        assert_eq!(Stats::default().p99(), Duration::ZERO);
    }

    #[test]
    fn our_own_process_is_visible_in_proc() {
        let pid = std::process::id();
        assert!(proc_rss_kib(pid).unwrap() > 0);
        assert!(proc_fd_count(pid).unwrap() >= 3);
        let (a, b) = (mono_ns(), mono_ns());
        assert!(b >= a);
    }
}

/// Hook times of a daemon under a benchmark.
///
/// When `HANDOFF_BENCH_TIMINGS` names a directory, [`record`](timings::record) keeps
/// `<name> <start_ns> <end_ns>` (CLOCK_MONOTONIC, see [`mono_ns`]) in memory and
/// [`flush`](timings::flush) appends what was kept to `<dir>/<pid>`. Daemons flush where no
/// handoff waits for them: a successor once its commit is acknowledged, an incumbent when it
/// retires. So the measured path pays for a `Vec` push, not for a write or a thread. Unset,
/// recording costs one check of a `OnceLock`.
pub mod timings {
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};

    /// The environment variable naming the directory.
    pub const ENV: &str = "HANDOFF_BENCH_TIMINGS";

    struct Sink {
        path: PathBuf,
        lines: Mutex<String>,
    }

    fn sink() -> Option<&'static Sink> {
        static SINK: OnceLock<Option<Sink>> = OnceLock::new();
        SINK.get_or_init(|| {
            let dir = std::env::var_os(ENV)?;
            Some(Sink {
                path: std::path::Path::new(&dir).join(std::process::id().to_string()),
                lines: Mutex::new(String::with_capacity(4096)),
            })
        })
        .as_ref()
    }

    /// Whether timings are recorded (the variable is set).
    pub fn enabled() -> bool {
        sink().is_some()
    }

    /// Record the span `name` from `start_ns` to `end_ns` (a point: the same value twice).
    pub fn record(name: &str, start_ns: u64, end_ns: u64) {
        if let Some(s) = sink() {
            use std::fmt::Write as _;
            let mut l = s.lines.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(l, "{name} {start_ns} {end_ns}");
        }
    }

    /// Append what was recorded since the last flush to the file (errors are ignored: the
    /// benchmark then reports the handoff as without timings).
    pub fn flush() {
        if let Some(s) = sink() {
            let text = std::mem::take(&mut *s.lines.lock().unwrap_or_else(|p| p.into_inner()));
            if text.is_empty() {
                return;
            }
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&s.path)
            {
                let _ = f.write_all(text.as_bytes());
            }
        }
    }

    /// The spans recorded by process `pid` under `dir`: `(name, start_ns, end_ns)`.
    pub fn read(dir: &std::path::Path, pid: u32) -> Vec<(String, u64, u64)> {
        let text = std::fs::read_to_string(dir.join(pid.to_string())).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split(' ');
                let name = w.next()?.to_string();
                let a = w.next()?.parse().ok()?;
                let b = w.next()?.parse().ok()?;
                Some((name, a, b))
            })
            .collect()
    }
}
