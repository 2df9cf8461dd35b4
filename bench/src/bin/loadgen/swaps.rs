//! The swaps: the swap command run on its schedule, each one's window recorded.

use crate::args::Opts;
use crate::clients::Shared;
use handoff_bench::ms;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Swaps {
    /// [start, end] of each swap command, ns since `t0`.
    pub windows: Vec<(u64, u64)>,
    pub failed: usize,
    /// The first failures' exit status and output.
    pub failures: Vec<String>,
    /// No more swaps started: `--max-secs` passed, or `--max-failures` failed in a row.
    pub cut_short: Option<&'static str>,
}

pub fn run_swaps(o: &Opts, sh: &Shared) -> Swaps {
    let mut sw = Swaps::default();
    let first = sh.t0 + o.warmup;
    let limit = sh.t0 + o.max_secs;
    let mut next = first;
    let cmd = o.swap_cmd.as_deref().unwrap_or("true");
    let fail = |sw: &mut Swaps, f: String| {
        sw.failed += 1;
        eprintln!("loadgen: {f}");
        if sw.failures.len() < 5 {
            sw.failures.push(f);
        }
    };
    let mut in_a_row = 0;
    for i in 1..=o.swaps {
        // A swap that failed may leave the target in a state no later swap can leave (nginx
        // with two masters): going on would only add failures, and time.
        if in_a_row >= o.max_failures {
            sw.cut_short = Some("--max-failures failed in a row");
            break;
        }
        if let Some(pre) = &o.pre_swap_cmd {
            if let Err(e) = run_bounded(pre, o.swap_timeout) {
                fail(&mut sw, format!("before swap {i}: {e}"));
                in_a_row += 1;
                continue;
            }
        }
        wait_until(next);
        let start = Instant::now();
        if start >= limit {
            sw.cut_short = Some("--max-secs passed");
            break;
        }
        let out = run_bounded(cmd, o.swap_timeout);
        let end = Instant::now();
        sw.windows.push((sh.ns(start), sh.ns(end)));
        match out {
            Ok(()) => in_a_row = 0,
            Err(e) => {
                fail(&mut sw, format!("swap {i} ({} ms): {e}", ms(end - start)));
                in_a_row += 1;
            }
        }
        next = (start + o.interval).max(end + o.min_gap);
    }
    sw
}

/// Run `cmd` through `sh -c`, killed by `timeout` after `bound`; its output if it failed.
pub fn run_bounded(cmd: &str, bound: Duration) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg("--kill-after=5")
        .arg(format!("{}", bound.as_secs_f64()))
        .args(["sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run timeout/sh: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

pub fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        thread::sleep(t - now);
    }
}
