//! Rollback paths: every way a successor can fail before it is ready ends with the incumbent
//! serving, writable and holding the lock, confirmed by its acknowledgement.

use std::time::Duration;

use handoff::supervisor::Verdict;
use handoff::AbortReason;
use handoff_engine::sys::lock::holds_lock;
use handoff_tests::{alive, Client, Cluster, Driver};

/// Start a cluster, write, hand off to a failing successor, and check the incumbent is back.
fn rolls_back(
    driver: Driver,
    tag: &str,
    fail: &str,
    deadline: Duration,
    setup: impl FnOnce(&Cluster),
) -> AbortReason {
    let c = Cluster::tcp(driver, tag);
    let old = c.sup.resume_from_journal().expect("cold start").serving;
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.call("SET k before").expect("set"), "OK 1");
    setup(&c);
    let mut spec = c.spec(&[("TESTD_FAIL", fail)]);
    spec.deadline = deadline;
    spec.drain_grace = Duration::from_secs(1);
    let outcome = c.sup.perform_handoff(spec).expect("handoff call");
    assert!(!outcome.committed, "{fail}: committed");
    assert!(outcome.child.is_none());
    assert_eq!(outcome.serving, Some(old), "{fail}: {:?}", outcome.verdict);
    let Verdict::RolledBack {
        incumbent, reason, ..
    } = outcome.verdict
    else {
        panic!("{fail}: not rolled back: {:?}", outcome.verdict)
    };
    assert_eq!(incumbent, old);
    eprintln!(
        "{fail}: rolled back ({reason}) in {:?}",
        outcome.times.total
    );
    // The incumbent serves, accepts writes again, and holds the lock.
    let _ = std::fs::remove_file(c.data.join("fail-seal"));
    let mut after = Client::tcp(c.http()).expect("connect after");
    assert_eq!(after.ping().expect("ping after"), old);
    assert_eq!(after.call("SET k after").expect("set after"), "OK 2");
    assert_eq!(after.call("GET k").expect("get"), "VAL after");
    assert!(
        holds_lock(old, &c.lock_file()).expect("/proc/locks"),
        "{fail}: lock not back"
    );
    // And a later handoff to a good build still commits.
    let ok = c.sup.perform_handoff(c.spec(&[])).expect("second handoff");
    assert!(
        ok.committed,
        "{fail}: the next handoff failed: {:?}",
        ok.abort_reason
    );
    let new = ok.serving.expect("pid");
    assert!(handoff_tests::wait_gone(old));
    assert!(!alive(old));
    let mut last = Client::tcp(c.http()).expect("connect last");
    assert_eq!(last.ping().expect("ping"), new);
    assert_eq!(last.call("GET k").expect("get"), "VAL after");
    if let Some(mut child) = ok.child {
        let _ = child.kill();
        let _ = child.wait();
    }
    reason
}

fn successor_exits_nonzero_before_ready(driver: Driver) {
    let r = rolls_back(
        driver,
        "exit",
        "exit-before-ready",
        Duration::from_secs(10),
        |_| {},
    );
    // Its channel closes as it exits: whichever the supervisor sees first is the reason.
    assert!(
        matches!(
            r,
            AbortReason::SuccessorExited | AbortReason::SuccessorDisconnected
        ),
        "{r:?}"
    );
}

fn successor_hangs_past_the_deadline(driver: Driver) {
    let r = rolls_back(
        driver,
        "hang",
        "hang-before-ready",
        Duration::from_secs(2),
        |_| {},
    );
    assert_eq!(r, AbortReason::DeadlineExceeded);
}

fn successor_never_says_hello(driver: Driver) {
    let r = rolls_back(
        driver,
        "nohello",
        "no-hello",
        Duration::from_secs(10),
        |_| {},
    );
    assert_eq!(r, AbortReason::PeerSilent);
}

fn successor_crashes_after_taking_the_lock(driver: Driver) {
    let r = rolls_back(
        driver,
        "crash",
        "crash-after-lock",
        Duration::from_secs(10),
        |_| {},
    );
    assert!(
        matches!(
            r,
            AbortReason::SuccessorExited | AbortReason::SuccessorDisconnected
        ),
        "{r:?}"
    );
}

fn seal_hook_fails(driver: Driver) {
    let r = rolls_back(driver, "seal", "", Duration::from_secs(10), |c| {
        std::fs::write(c.data.join("fail-seal"), b"").expect("fail-seal");
    });
    assert!(
        matches!(r, AbortReason::SealFailed(ref m) if m.contains("fail-seal")),
        "{r:?}"
    );
}

fn missing_binary_rolls_back_before_anything_drains(driver: Driver) {
    let c = Cluster::tcp(driver, "missing");
    let old = c.sup.resume_from_journal().expect("cold start").serving;
    let mut spec = c.spec(&[]);
    spec.binary = c.dir.path().join("no-such-binary");
    let outcome = c.sup.perform_handoff(spec).expect("handoff call");
    assert!(!outcome.committed);
    match &outcome.abort_reason {
        Some(AbortReason::SpawnFailed(m)) => assert!(m.contains("no-such-binary"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), old);
    assert_eq!(cl.call("SET k v").expect("set"), "OK 1");
}

handoff_tests::on_both_drivers!(
    successor_exits_nonzero_before_ready,
    successor_hangs_past_the_deadline,
    successor_never_says_hello,
    successor_crashes_after_taking_the_lock,
    seal_hook_fails,
    missing_binary_rolls_back_before_anything_drains,
);
