//! The output: the text report, the `RESULT key=value …` line, the JSON object (the keys
//! `bench/load.sh` and the load test read) and the `--dump` file.

use crate::args::{Opts, Proto};
use crate::outcome::{ErrKind, Log, Rec, KINDS};
use crate::summary::Kind;
use crate::swaps::Swaps;
use handoff_bench::{ms, Stats};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::Duration;

/// `kind:count,…` of the non-zero counts, or `-`.
pub fn kinds_text(errors: &[u64; KINDS.len()]) -> String {
    let v: Vec<String> = KINDS
        .iter()
        .zip(errors)
        .filter(|(_, &n)| n > 0)
        .map(|(k, n)| format!("{}:{n}", k.name()))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// A value of the result line.
#[derive(Debug)]
pub enum Val {
    Int(u64),
    Num(f64),
    Text(String),
}

pub fn msf(d: Duration) -> Val {
    Val::Num((d.as_secs_f64() * 1e6).round() / 1e3)
}

pub fn results(o: &Opts, sw: &Swaps, kinds: &[Kind]) -> Vec<(String, Val)> {
    let mut r: Vec<(String, Val)> = Vec::new();
    let mut put = |k: &str, v: Val| r.push((k.to_string(), v));
    put("label", Val::Text(o.label.clone()));
    put(
        "proto",
        Val::Text(match o.proto {
            Proto::Http => "http".into(),
            Proto::Kvd => "kvd".into(),
        }),
    );
    put("open_rate", Val::Int(u64::from(o.open_rate)));
    put("closed_clients", Val::Int(o.closed as u64));
    put("swaps_requested", Val::Int(o.swaps as u64));
    let done = sw.windows.len() as u64;
    put("swaps", Val::Int(done));
    put("swaps_failed", Val::Int(sw.failed as u64));
    let durations = Stats::new(
        sw.windows
            .iter()
            .map(|w| Duration::from_nanos(w.1 - w.0))
            .collect(),
    );
    put("swap_p50_ms", msf(durations.p50()));
    put("swap_p99_ms", msf(durations.p99()));
    put("swap_max_ms", msf(durations.max()));
    for k in kinds {
        let p = k.name;
        let mut all = k.steady.errors;
        for (a, w) in all.iter_mut().zip(k.window.errors) {
            *a += w;
        }
        let errors: u64 = all.iter().sum();
        let mut put = |key: &str, v: Val| r.push((format!("{p}_{key}"), v));
        put("requests", Val::Int(k.steady.n + k.window.n));
        put("errors", Val::Int(errors));
        put(
            "errors_per_1k_swaps",
            if done == 0 {
                Val::Text("n/a".into())
            } else {
                Val::Num((errors as f64 * 1000.0 / done as f64 * 10.0).round() / 10.0)
            },
        );
        put("error_kinds", Val::Text(kinds_text(&all)));
        put("resent", Val::Int(k.steady.resent + k.window.resent));
        put("steady_requests", Val::Int(k.steady.n));
        put("steady_errors", Val::Int(k.steady.error_count()));
        put("steady_p50_ms", msf(k.steady_lat.p50()));
        put("steady_p99_ms", msf(k.steady_lat.p99()));
        put("steady_max_ms", msf(k.steady_lat.max()));
        put("window_requests", Val::Int(k.window.n));
        put("window_ok", Val::Int(k.window_lat.len() as u64));
        put("window_errors", Val::Int(k.window.error_count()));
        put(
            "window_error_kinds",
            Val::Text(kinds_text(&k.window.errors)),
        );
        put("window_p50_ms", msf(k.window_lat.p50()));
        put("window_p99_ms", msf(k.window_lat.p99()));
        put("window_max_ms", msf(k.window_lat.max()));
        put("stall_ms", msf(k.stall));
        put("window_stall_ms", msf(k.window_stall));
        put("connects", Val::Int(k.connects));
        put("stale_closed", Val::Int(k.stale));
        put("server_closed", Val::Int(k.server_closed));
    }
    r
}

pub fn result_line(r: &[(String, Val)]) -> String {
    let mut s = String::from("RESULT");
    for (k, v) in r {
        match v {
            Val::Int(n) => write!(s, " {k}={n}"),
            Val::Num(x) => write!(s, " {k}={x}"),
            // Our texts hold no spaces but a label might: keep the line splittable.
            Val::Text(t) => write!(s, " {k}={}", t.replace(' ', "_")),
        }
        .expect("writing to a String");
    }
    s
}

pub fn json(r: &[(String, Val)]) -> String {
    let body: Vec<String> = r
        .iter()
        .map(|(k, v)| match v {
            Val::Int(n) => format!("\"{k}\":{n}"),
            Val::Num(x) => format!("\"{k}\":{x}"),
            Val::Text(t) => format!(
                "\"{k}\":\"{}\"",
                t.replace('\\', "\\\\").replace('"', "\\\"")
            ),
        })
        .collect();
    format!("{{{}}}\n", body.join(","))
}

pub fn print_report(o: &Opts, sw: &Swaps, kinds: &[Kind], elapsed: Duration) {
    println!(
        "loadgen {}: {:?} on {}, {} new connections/s + {} keep-alive clients, {:.1} s",
        o.label,
        o.proto,
        o.addr,
        o.open_rate,
        o.closed,
        elapsed.as_secs_f64()
    );
    let durations = Stats::new(
        sw.windows
            .iter()
            .map(|w| Duration::from_nanos(w.1 - w.0))
            .collect(),
    );
    println!(
        "swaps: {} of {} ({} failed{}); command p50 {} ms, p99 {} ms, max {} ms",
        sw.windows.len(),
        o.swaps,
        sw.failed,
        sw.cut_short
            .map(|why| format!(", stopped: {why}"))
            .unwrap_or_default(),
        ms(durations.p50()),
        ms(durations.p99()),
        ms(durations.max())
    );
    for f in &sw.failures {
        println!("  {f}");
    }
    println!(
        "\n  {:<13} {:<7} {:>9} {:>7} {:>7} {:>10} {:>10} {:>10}  errors by kind",
        "clients", "part", "requests", "errors", "resent", "p50 ms", "p99 ms", "max ms"
    );
    for k in kinds {
        for (part, p, lat) in [
            ("steady", &k.steady, &k.steady_lat),
            ("swaps", &k.window, &k.window_lat),
        ] {
            println!(
                "  {:<13} {:<7} {:>9} {:>7} {:>7} {:>10} {:>10} {:>10}  {}",
                k.name,
                part,
                p.n,
                p.error_count(),
                p.resent,
                ms(lat.p50()),
                ms(lat.p99()),
                ms(lat.max()),
                kinds_text(&p.errors)
            );
        }
        println!(
            "  {:<13} longest stall {} ms ({} ms overlapping a swap); {} connections, {} found \
             closed before reuse, {} closed by the server after an answer",
            k.name,
            ms(k.stall),
            ms(k.window_stall),
            k.connects,
            k.stale,
            k.server_closed
        );
    }
}

/// `swap <start> <end>` per window, then `<kind> <start> <began> <end> <outcome> <resent>` per
/// request, sorted by start; times in milliseconds since the start of the run.
pub fn dump(path: &std::path::Path, sw: &Swaps, logs: &[(&str, &Vec<Log>)]) -> io::Result<()> {
    let msn = |ns: u64| ns as f64 / 1e6;
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    for w in &sw.windows {
        writeln!(out, "swap {:.3} {:.3}", msn(w.0), msn(w.1))?;
    }
    let mut all: Vec<(&str, &Rec)> = logs
        .iter()
        .flat_map(|(k, v)| {
            v.iter()
                .flat_map(move |l| l.recs.iter().map(move |r| (*k, r)))
        })
        .collect();
    all.sort_by_key(|(_, r)| r.start);
    for (k, r) in all {
        writeln!(
            out,
            "{k} {:.3} {:.3} {:.3} {} {}",
            msn(r.start),
            msn(r.began),
            msn(r.end),
            r.err.map_or("ok", ErrKind::name),
            r.resent
        )?;
    }
    out.flush()
}
