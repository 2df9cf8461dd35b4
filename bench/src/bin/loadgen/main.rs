//! `loadgen`: what clients see of a server while its binary is swapped, again and again
//! (issue 7, part 2). The same load for every target: our supervisor with kvd or
//! handoff-httpd, an nginx binary upgrade, a HAProxy master-worker reload.
//!
//! ```text
//! loadgen --addr 127.0.0.1:PORT --proto http|kvd [--open-rate 500] [--closed 8]
//!         [--warmup 2] [--swaps 200] [--interval 150] --swap-cmd "<shell command>"
//!         [--json FILE] [--label NAME] [more: --help]
//! ```
//!
//! Two kinds of client run at once:
//!
//! - **open-loop**: `--open-rate` new connections per second on a fixed schedule, run by a
//!   pool of `--open-workers` threads; each connects, sends one request, reads the answer and
//!   closes. Its latency runs from the *scheduled* start, so a server that stalls is charged
//!   for the requests that queued behind the stall (no coordinated omission).
//! - **closed-loop**: `--closed` keep-alive connections, each sending its next request as soon
//!   as the answer to the last one arrived. A connection the server ends after an answer
//!   (`Connection: close`, or the end of the stream) is replaced, which is no error. Before
//!   reusing a connection the client peeks at it (non-blocking) and replaces it if the server
//!   already closed it, as careful HTTP clients do.
//!
//! Protocols: `http` (`GET / HTTP/1.1`; a status other than 200 is an error) and `kvd`
//! (alternate `SET`/`GET` of random keys, or `PING` with `--kvd-ops ping`). A kvd connection
//! that ends cleanly before the answer, and an `ERR retry`, mean "not executed, send it again"
//! (kvd's protocol): the request is sent again on a new connection and counted as `resent`,
//! not as an error. Its latency runs from the first attempt to the answer.
//!
//! After `--warmup` seconds it runs `--swap-cmd` through `sh -c` `--swaps` times, one every
//! `--interval` ms (and never less than `--min-gap` ms after the previous one ended). The
//! command must return once the swap is complete; a swap's window is [command start, command
//! end]. Requests that overlap a window are reported apart from the others (steady state);
//! requests that began during the warmup are not reported. After the last swap the load runs
//! on for `--cooldown` seconds, then stops.
//!
//! It prints a text report and one `RESULT key=value …` line (and writes the same keys as a
//! JSON object to `--json FILE`). Traffic goes only to a loopback address: any other is
//! refused.
//!
//! The modules: `args` (the command line), `conn` (requests, answers, one connection),
//! `clients` (the closed-loop clients and the open-loop workers), `swaps` (the swap
//! schedule), `outcome` (what became of each request), `summary` (the figures) and `report`
//! (the text report, the `RESULT` line, the JSON object and the dump). This file runs them.

mod args;
mod clients;
mod conn;
mod outcome;
mod report;
mod summary;
mod swaps;

use args::{parse_args, USAGE};
use clients::{closed_loop, open_loop_worker, Shared};
use outcome::Log;
use report::{dump, json, print_report, result_line, results};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use summary::summarise;
use swaps::{run_swaps, wait_until, Swaps};

/// Whether `addr` accepts a connection within `bound` (tries every 10 ms: a bounded poll).
fn wait_ready(addr: SocketAddr, bound: Duration) -> bool {
    let end = Instant::now() + bound;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv == ["--print-free-port"] {
        println!("{}", handoff_bench::free_port());
        return ExitCode::SUCCESS;
    }
    let o = match parse_args(&argv) {
        Ok(o) => Arc::new(o),
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !o.wait_ready.is_zero() && !wait_ready(o.addr, o.wait_ready) {
        eprintln!(
            "loadgen: {} accepted no connection within {:?}",
            o.addr, o.wait_ready
        );
        return ExitCode::FAILURE;
    }
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        stop_at: AtomicU64::new(u64::MAX),
        other_texts: Mutex::new(Vec::new()),
    });
    let spawn = |name: String, f: Box<dyn FnOnce() -> Log + Send>| {
        thread::Builder::new()
            .name(name)
            .spawn(f)
            .expect("start a client thread")
    };
    let closed: Vec<_> = (0..o.closed)
        .map(|i| {
            let (o, sh) = (Arc::clone(&o), Arc::clone(&sh));
            spawn(
                format!("closed-{i}"),
                Box::new(move || closed_loop(&o, &sh, i as u64)),
            )
        })
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let workers = if o.open_rate == 0 { 0 } else { o.open_workers };
    let open: Vec<_> = (0..workers)
        .map(|i| {
            let (o, sh, next) = (Arc::clone(&o), Arc::clone(&sh), Arc::clone(&next));
            spawn(
                format!("open-{i}"),
                Box::new(move || open_loop_worker(&o, &sh, &next, i as u64)),
            )
        })
        .collect();

    let sw = if o.swaps > 0 {
        run_swaps(&o, &sh)
    } else {
        wait_until(sh.t0 + o.warmup + o.duration);
        Swaps::default()
    };
    wait_until(Instant::now() + o.cooldown);
    let end = sh.ns(Instant::now());
    sh.stop_at.store(end, Ordering::Relaxed);
    sh.stop.store(true, Ordering::Relaxed);
    // Every request is bounded by --answer-timeout, so the joins are too.
    let join = |v: Vec<thread::JoinHandle<Log>>| -> Vec<Log> {
        v.into_iter()
            .map(|t| t.join().expect("a client thread panicked"))
            .collect()
    };
    let (open_logs, closed_logs) = (join(open), join(closed));
    let elapsed = sh.t0.elapsed();
    if let Some(path) = &o.dump {
        if let Err(e) = dump(path, &sw, &[("open", &open_logs), ("closed", &closed_logs)]) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
    let from = o.warmup.as_nanos() as u64;
    let mut kinds = Vec::new();
    if o.open_rate > 0 {
        kinds.push(summarise("open_loop", open_logs, &sw.windows, from, end));
    }
    if o.closed > 0 {
        kinds.push(summarise(
            "closed_loop",
            closed_logs,
            &sw.windows,
            from,
            end,
        ));
    }
    print_report(&o, &sw, &kinds, elapsed);
    let texts = sh.other_texts.lock().unwrap_or_else(|p| p.into_inner());
    for t in texts.iter() {
        println!("  other error: {t}");
    }
    let r = results(&o, &sw, &kinds);
    println!("{}", result_line(&r));
    if let Some(path) = &o.json {
        if let Err(e) = std::fs::write(path, json(&r)) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
