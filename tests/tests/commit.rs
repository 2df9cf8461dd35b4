//! The commit path: a real handoff from one `testd` to another under client traffic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use handoff_engine::sys::lock::holds_lock;
use handoff_tests::{alive, wait_gone, Client, Cluster, Driver};

fn commit_moves_listeners_lock_and_data_with_no_refused_connection(driver: Driver) {
    let c = Cluster::tcp(driver, "commit");
    let rec = c.sup.resume_from_journal().expect("cold start");
    let old = rec.serving;
    let addr = c.http();

    // Before: a long-lived connection, and a write.
    let mut long = Client::tcp(addr).expect("connect before");
    assert_eq!(long.ping().expect("ping before"), old);
    assert_eq!(long.call("SET before 1").expect("set"), "OK 1");

    // During: new connections all the time, each must be accepted and answered; the
    // long-lived one is answered until the old process half-closes it (clean end of stream).
    let done = Arc::new(AtomicBool::new(false));
    let traffic = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let (mut answered, mut closed) = (0u64, 0u64);
            let mut pids = std::collections::BTreeSet::new();
            while !done.load(Ordering::SeqCst) {
                let mut cl =
                    Client::tcp(addr).expect("a connection was refused during the handoff");
                match cl.ping() {
                    Ok(pid) => {
                        pids.insert(pid);
                        answered += 1;
                    }
                    // Accepted by the old process just before its drain half-closed it: the
                    // request was not run, and the client retries on a new connection (which
                    // waits in the accept queue for the successor). A clean close, not a reset.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => closed += 1,
                    Err(e) => panic!("a connection failed during the handoff: {e}"),
                }
            }
            (answered, closed, pids)
        })
    };
    let long_thread = std::thread::spawn(move || {
        let mut answers = 0u64;
        loop {
            match long.ping() {
                Ok(_) => answers += 1,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return answers,
                Err(e) => panic!("long-lived connection failed with {e} (not a clean close)"),
            }
        }
    });

    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    done.store(true, Ordering::SeqCst);
    assert!(
        outcome.committed,
        "not committed: {:?} (successor ended with {:?})",
        outcome.abort_reason, outcome.successor_status
    );
    let new = outcome.serving.expect("serving pid");
    assert_ne!(new, old);
    let (answered, closed, pids) = traffic.join().expect("traffic");
    assert!(
        answered > 0,
        "no connection was answered during the handoff"
    );
    let long_answers = long_thread.join().expect("long-lived client");
    eprintln!(
        "handoff took {:?} ({:?}); {answered} connections answered during it by {pids:?}, \
         {closed} closed cleanly before their request (retried); the long-lived connection \
         got {long_answers} answers then a clean close",
        outcome.times.total, outcome.times
    );

    // After: the successor serves, the data moved, the old process is gone, the lock moved.
    let mut after = Client::tcp(addr).expect("connect after");
    assert_eq!(after.ping().expect("ping after"), new);
    assert_eq!(after.call("GET before").expect("get"), "VAL 1");
    assert_eq!(after.call("SET after 2").expect("set after"), "OK 2");
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    assert!(!alive(old));
    assert!(holds_lock(new, &c.lock_file()).expect("/proc/locks"));
    let mut child = outcome.child.expect("the successor is our child");
    assert_eq!(child.id(), new);
    let _ = child.kill();
    let _ = child.wait();
}

/// Hooks longer than the silence limit (4 s here): a 5 s drain and a 5 s open of the data.
/// The drivers send the heartbeats; nothing in the application has to.
fn long_drain_and_long_open_still_commit(driver: Driver) {
    let c = Cluster::tcp(driver, "long");
    let old = c.sup.resume_from_journal().expect("cold start").serving;
    // First hand off to a build that drains slowly when it is replaced (testd reads
    // TESTD_DRAIN_MS from its environment)...
    let first = c
        .sup
        .perform_handoff(c.spec(&[("TESTD_DRAIN_MS", "5000")]))
        .expect("first");
    assert!(first.committed, "{:?}", first.abort_reason);
    // ...then replace it with one that opens its data slowly.
    let mut spec = c.spec(&[("TESTD_FAIL", "slow-open=5000")]);
    spec.drain_grace = std::time::Duration::from_secs(8);
    spec.deadline = std::time::Duration::from_secs(25);
    let second = c.sup.perform_handoff(spec).expect("second");
    assert!(second.committed, "{:?}", second.abort_reason);
    let times = second.times;
    eprintln!(
        "slow drain {:?}, slow open {:?}, total {:?}",
        times.drain, times.begin_to_ready, times.total
    );
    assert!(times.drain.expect("drained") >= std::time::Duration::from_secs(5));
    assert!(times.begin_to_ready.expect("ready") >= std::time::Duration::from_secs(5));
    let new = second.serving.expect("pid");
    assert_ne!(new, old);
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), new);
}

/// A second handoff asked for while one runs gets `Busy` at once, and the first commits.
fn a_trigger_during_a_handoff_is_busy(driver: Driver) {
    let c = Cluster::tcp(driver, "busy");
    let old = c.sup.resume_from_journal().expect("cold start").serving;
    let c = Arc::new(c);
    let first = {
        let c = Arc::clone(&c);
        std::thread::spawn(move || {
            c.sup
                .perform_handoff(c.spec(&[("TESTD_FAIL", "slow-open=1500")]))
        })
    };
    // Wait (bounded) until the successor holds the lock (it then opens its data for 1.5 s):
    // the first call is in the middle of its handoff.
    let until = std::time::Instant::now() + handoff_tests::BOUND;
    while !handoff_engine::sys::lock::holders(&c.lock_file())
        .expect("/proc/locks")
        .iter()
        .any(|p| *p != old)
    {
        assert!(
            std::time::Instant::now() < until,
            "the successor never took the lock"
        );
        std::thread::yield_now();
    }
    let started = std::time::Instant::now();
    let second = c.sup.perform_handoff(c.spec(&[]));
    assert!(
        matches!(second, Err(handoff::error::Error::Busy(_))),
        "{second:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "Busy must not wait"
    );
    eprintln!("busy: {}", second.expect_err("busy"));
    let o = first.join().expect("thread").expect("first handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
    assert_eq!(c.sup.serving(), o.serving);
}

handoff_tests::on_both_drivers!(
    commit_moves_listeners_lock_and_data_with_no_refused_connection,
    long_drain_and_long_open_still_commit,
    a_trigger_during_a_handoff_is_busy,
);

/// While a drain is pending (2 s here), the daemon keeps answering its existing clients:
/// reads are served, writes are refused with an error (never lost), and the handoff then
/// commits. For the mio driver this is the point: the drain is an event the single-threaded
/// loop completes later, not a call that blocks it.
fn existing_clients_are_served_while_a_drain_is_pending(driver: Driver) {
    let c = Cluster::tcp(driver, "drainserve");
    let old = c.sup.resume_from_journal().expect("cold start").serving;
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.call("SET k v").expect("set"), "OK 1");
    // The successor drains slowly when it is replaced: first hand off to one with that
    // setting, then replace it while a client is connected to it.
    let first = c
        .sup
        .perform_handoff(c.spec(&[("TESTD_DRAIN_MS", "2000")]))
        .expect("first handoff");
    assert!(first.committed, "{:?}", first.abort_reason);
    let mid = first.serving.expect("pid");
    assert_ne!(mid, old);
    let mut cl = Client::tcp(c.http()).expect("connect to the new daemon");
    assert_eq!(cl.ping().expect("ping"), mid);
    let c = Arc::new(c);
    let second = {
        let c = Arc::clone(&c);
        std::thread::spawn(move || c.sup.perform_handoff(c.spec(&[])))
    };
    // Wait (bounded) for the drain to start: writes get refused from then on.
    let until = std::time::Instant::now() + handoff_tests::BOUND;
    loop {
        let a = cl
            .call("SET probe x")
            .expect("a request during the handoff");
        if a.starts_with("ERR") {
            break;
        }
        assert!(std::time::Instant::now() < until, "the drain never started");
    }
    // The drain is pending: the same connection is still answered, many times.
    let mut served = 0;
    while !second.is_finished() && served < 50 {
        assert_eq!(cl.call("GET k").expect("read while draining"), "VAL v");
        assert_eq!(cl.ping().expect("ping while draining"), mid);
        served += 1;
    }
    assert!(served >= 10, "only {served} answers during the drain");
    let o = second.join().expect("thread").expect("second handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
    eprintln!("{served} request pairs answered while the drain was pending; then committed");
}

handoff_tests::on_both_drivers!(existing_clients_are_served_while_a_drain_is_pending);

/// The drivers mix: the mio daemon under the std supervisor, the std daemon under the mio
/// supervisor, and a handoff from one daemon to the other each way.
#[test]
fn the_drivers_mix() {
    for (sup, daemon, other) in [
        (Driver::Std, Driver::Mio, Driver::Std),
        (Driver::Mio, Driver::Std, Driver::Mio),
    ] {
        let c = Cluster::tcp(sup, "mix").with_daemon(daemon);
        let old = c.sup.resume_from_journal().expect("cold start").serving;
        let mut cl = Client::tcp(c.http()).expect("connect");
        assert_eq!(cl.call("SET k v").expect("set"), "OK 1");
        let mut spec = c.spec(&[]);
        spec.binary = other.daemon();
        let o = c
            .sup
            .perform_handoff(spec)
            .expect("handoff to the other daemon");
        assert!(
            o.committed,
            "{sup:?} supervisor, {daemon:?} → {other:?}: {:?}",
            o.abort_reason
        );
        let o = c.sup.perform_handoff(c.spec(&[])).expect("and back");
        assert!(
            o.committed,
            "{sup:?} supervisor, {other:?} → {daemon:?}: {:?}",
            o.abort_reason
        );
        let mut cl = Client::tcp(c.http()).expect("connect after");
        assert_ne!(cl.ping().expect("ping"), old);
        assert_eq!(cl.call("GET k").expect("get"), "VAL v");
    }
}
