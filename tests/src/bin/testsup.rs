//! `testsup`: a supervisor process for the supervisor-crash tests, built on
//! `handoff::supervisor::Supervisor`, so that a test can SIGKILL it mid-handoff.
//!
//! Usage: `testsup <control-socket> <daemon> [bind <addr>]`, with `TESTD_*` in the environment
//! (passed on to the daemons); `TESTSUP_DRIVER=mio` runs the mio supervisor driver instead of
//! the std one.
//! - With `bind <addr>` it binds the TCP listener `http` itself and prints
//!   `listening addr=<addr>`; without, it expects the serving daemon to hand `http` back.
//! - It then recovers from the journal (starting `testd` cold if nobody serves) and prints
//!   `recovered pid=<serving>`.
//! - Each stdin line `handoff [TESTD_FAIL value]` performs a handoff to `testd` and prints
//!   `outcome committed=<bool> pid=<serving>`; end of input exits.

use std::io::BufRead;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use handoff::supervisor::{SpawnSpec, Supervisor};
use handoff::{ListenerKind, Timing};
use handoff_engine::SupervisorEngine;
use handoff_tests::{MioSup, Sup};

fn spec(testd: &std::path::Path, fail: Option<&str>) -> SpawnSpec {
    // A daemon inherits only PATH, LANG, LC_*, TZ and HANDOFF_* from us: pass `TESTD_*` on.
    let mut env: Vec<_> = std::env::vars_os()
        .filter(|(k, _)| k.to_string_lossy().starts_with("TESTD_"))
        .collect();
    if let Some(f) = fail {
        env.push(("TESTD_FAIL".into(), f.into()));
    }
    SpawnSpec {
        binary: testd.to_path_buf(),
        env,
        drain_grace: Duration::from_secs(5),
        deadline: Duration::from_secs(10),
        ..Default::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let sock = PathBuf::from(&args[1]);
    let testd = PathBuf::from(&args[2]);
    let timing = Timing {
        heartbeat_interval: Duration::from_millis(100),
        peer_silence: Duration::from_millis(4000),
        slack: Duration::from_millis(3000),
        retry_interval: Duration::from_millis(20),
        recovery_wait: Duration::from_secs(5),
        ..Timing::default()
    };
    let listener = if args.get(3).map(String::as_str) == Some("bind") {
        let l = TcpListener::bind(&args[4])?;
        println!("listening addr={}", l.local_addr()?);
        Some(l)
    } else {
        None
    };
    // `TESTSUP_DRIVER=mio`: the mio supervisor driver, in a mio loop of this process.
    let sup = if std::env::var("TESTSUP_DRIVER").as_deref() == Ok("mio") {
        let e = SupervisorEngine::new(&sock)?
            .with_timing(timing)
            .with_cold_start(spec(&testd, None));
        Sup::Mio(MioSup::new(match &listener {
            Some(l) => e.with_listener_fd("http", l),
            None => e.expect_listener("http", ListenerKind::Tcp),
        }))
    } else {
        let s = Supervisor::new(&sock)?
            .with_timing(timing)
            .with_cold_start(spec(&testd, None));
        Sup::Std(match &listener {
            Some(l) => s.with_listener_fd("http", l),
            None => s.expect_listener("http", ListenerKind::Tcp),
        })
    };
    let rec = sup.resume_from_journal()?;
    println!("recovered pid={}", rec.serving);
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        if words.next() != Some("handoff") {
            continue;
        }
        let o = sup.perform_handoff(spec(&testd, words.next()))?;
        println!(
            "outcome committed={} pid={}",
            o.committed,
            o.serving.map_or(0, |p| p)
        );
        if let Some(mut c) = o.child {
            // Not waited for here: the daemon runs on; it is reaped when this process exits.
            let _ = c.try_wait();
        }
    }
    Ok(())
}
