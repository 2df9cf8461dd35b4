//! `bench-handoff`: how long handoffs take, phase by phase, with real processes.
//!
//! ```text
//! cargo run --release -p handoff-tests --bin bench-handoff -- [HANDOFFS] [LISTENERS]
//! ```
//!
//! Starts `testd` (built next to this binary) under an embedded `Supervisor` with LISTENERS
//! TCP listeners (default 1), performs HANDOFFS handoffs in a row (default 100), each under a
//! client that keeps connecting and pinging, and prints p50 / p99 / max of every phase and of
//! the total, plus how many client requests were answered during the run and how many
//! connections failed (refused or reset; must be 0).

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use handoff_tests::{Client, Cluster, Listener};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(100, |a| a.parse().expect("HANDOFFS"));
    let listeners: usize = args.next().map_or(1, |a| a.parse().expect("LISTENERS"));
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut l = getrlimit(Resource::Nofile);
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
    std::env::set_var("HANDOFF_LOG", "off");
    let ls: Vec<(String, Listener)> = (0..listeners)
        .map(|i| {
            let name = if i == 0 {
                "http".to_string()
            } else {
                format!("l{i}")
            };
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            (name, Listener::Tcp(l))
        })
        .collect();
    let c = Cluster::with_listeners(handoff_tests::Driver::Std, "bench", ls);
    c.sup.resume_from_journal().expect("cold start");
    let addr = c.http();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match Client::tcp(addr).and_then(|mut c| c.ping()) {
                    Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let mut phases: Vec<(&str, Vec<Duration>)> = [
        "spawn→hello",
        "listeners",
        "drain",
        "seal",
        "begin→ready",
        "commit",
        "total",
    ]
    .iter()
    .map(|n| (*n, Vec::new()))
    .collect();
    let mut committed = 0;
    for _ in 0..n {
        let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
        if o.committed {
            committed += 1;
        }
        if let Some(mut child) = o.child {
            // Reaped when it is replaced; keep the handle from piling up as a zombie later.
            std::thread::spawn(move || child.wait());
        }
        let t = o.times;
        let all = [
            t.spawn_to_hello,
            t.listeners,
            t.drain,
            t.seal,
            t.begin_to_ready,
            t.commit,
            Some(t.total),
        ];
        for (slot, v) in phases.iter_mut().zip(all) {
            if let Some(v) = v {
                slot.1.push(v);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client");
    println!("{n} handoffs with {listeners} listener(s): {committed} committed");
    println!("{:<12} {:>10} {:>10} {:>10}", "phase", "p50", "p99", "max");
    for (name, mut v) in phases {
        v.sort();
        println!(
            "{name:<12} {:>10.3?} {:>10.3?} {:>10.3?}",
            pct(&v, 0.5),
            pct(&v, 0.99),
            v.last().copied().unwrap_or_default()
        );
    }
    println!(
        "client requests answered during the run: {}; connections refused or reset: {}",
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(committed, n, "every handoff must commit");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no connection may fail");
}
