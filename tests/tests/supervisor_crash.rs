//! The supervisor is SIGKILLed at several points of a handoff and restarted: the restarted
//! one recovers from the journal, converges on whoever serves, takes the listener back from
//! that daemon (it holds none of its own) and can hand off again.
//!
//! The supervisor here is `testsup`, a separate process, so it can really be killed. Its
//! stdout, shared with the daemons it starts, carries their events (`draining pid=…`, …): the
//! kill happens when the named event is seen, while the daemons are slowed at that point.

use std::io::Write;
use std::time::Instant;

use handoff_tests::testsup::{field, Site};
use handoff_tests::{Client, Driver};

/// Kill the supervisor when `kill_at` is printed during a handoff to a successor started with
/// `fail`, restart it, and check it converges on the old daemon (`old_wins`) or the new one.
fn crash_at(
    driver: Driver,
    tag: &str,
    kill_at: &str,
    fail: &str,
    env: &[(&str, &str)],
    old_wins: bool,
) {
    let site = Site::new(driver, tag);
    let mut sup = site.sup(true, env);
    let addr: std::net::SocketAddr = field(&site.wait("listening"), "addr")
        .parse()
        .expect("addr");
    let old: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    let mut cl = Client::tcp(addr).expect("connect");
    assert_eq!(cl.call("SET k v1").expect("set"), "OK 1");
    drop(cl);

    writeln!(sup.stdin, "handoff {fail}").expect("trigger");
    let event = site.wait(kill_at);
    sup.child.kill().expect("SIGKILL the supervisor");
    sup.child.wait().expect("reap");
    let started = Instant::now();

    // A new supervisor, holding no listener of its own.
    let mut sup2 = site.sup(false, env);
    let serving: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    let recovery = started.elapsed();
    if old_wins {
        assert_eq!(
            serving, old,
            "{kill_at}: recovered onto {serving}, not the incumbent"
        );
    } else {
        let new: u32 = field(&event, "pid").parse().expect("pid");
        assert_eq!(
            serving, new,
            "{kill_at}: recovered onto {serving}, not the successor"
        );
    }
    eprintln!("{kill_at}: restarted supervisor recovered pid {serving} in {recovery:?}");
    let mut cl = Client::tcp(addr).expect("connect after recovery");
    assert_eq!(cl.ping().expect("ping"), serving);
    assert_eq!(cl.call("GET k").expect("get"), "VAL v1");
    assert_eq!(cl.call("SET k v2").expect("set"), "OK 2");
    drop(cl);

    // The listener came back to the restarted supervisor: it hands it to a new successor.
    writeln!(sup2.stdin, "handoff").expect("trigger");
    let outcome = site.wait("outcome");
    assert_eq!(field(&outcome, "committed"), "true", "{outcome}");
    let newest: u32 = field(&outcome, "pid").parse().expect("pid");
    let mut cl = Client::tcp(addr).expect("connect after the second handoff");
    assert_eq!(cl.ping().expect("ping"), newest);
    assert_eq!(cl.call("GET k").expect("get"), "VAL v2");
    drop(sup2.stdin);
    let status = sup2.child.wait().expect("wait");
    assert!(status.success(), "testsup: {status}");
}

fn killed_after_the_successor_started(driver: Driver) {
    // The successor waits for the supervisor's death before its hello, so the kill lands
    // before the incumbent is touched, however fast the handoff would have run.
    crash_at(
        driver,
        "k-spawn",
        "successor-started",
        "hello-after-supervisor-exit",
        &[],
        true,
    );
}

fn killed_while_the_incumbent_drains(driver: Driver) {
    crash_at(
        driver,
        "k-drain",
        "draining",
        "",
        &[("TESTD_DRAIN_MS", "400")],
        true,
    );
}

fn killed_after_the_seal(driver: Driver) {
    crash_at(driver, "k-seal", "sealed", "slow-open=1000", &[], true);
}

fn killed_while_the_successor_opens_the_data(driver: Driver) {
    crash_at(driver, "k-open", "opening", "slow-open=1000", &[], true);
}

fn killed_after_the_commit(driver: Driver) {
    crash_at(driver, "k-commit", "role=successor", "", &[], false);
}

/// A supervisor that goes silent (SIGSTOP) mid-handoff, connection still open: the incumbent
/// gives up on it after the silence limit, takes its data back and serves writes again.
fn silent_supervisor_mid_handoff_is_abandoned(driver: Driver) {
    let site = Site::new(driver, "k-stop");
    let mut sup = site.sup(true, &[("TESTD_DRAIN_MS", "300")]);
    let addr: std::net::SocketAddr = field(&site.wait("listening"), "addr")
        .parse()
        .expect("addr");
    let old: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    writeln!(sup.stdin, "handoff").expect("trigger");
    site.wait("draining");
    let pid = rustix::process::Pid::from_raw(sup.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    let stopped = Instant::now();
    let resumed = site.wait("resumed");
    assert_eq!(field(&resumed, "pid"), old.to_string());
    eprintln!(
        "incumbent resumed {:?} after its supervisor went silent",
        stopped.elapsed()
    );
    let mut cl = Client::tcp(addr).expect("connect");
    assert_eq!(cl.ping().expect("ping"), old);
    assert_eq!(cl.call("SET k v").expect("writes accepted again"), "OK 1");
    drop(cl);
    sup.child.kill().expect("SIGKILL");
    sup.child.wait().expect("reap");
    // A new supervisor finds the incumbent and can hand off.
    let mut sup2 = site.sup(false, &[]);
    assert_eq!(field(&site.wait("recovered"), "pid"), old.to_string());
    writeln!(sup2.stdin, "handoff").expect("trigger");
    assert_eq!(field(&site.wait("outcome"), "committed"), "true");
    drop(sup2.stdin);
    assert!(sup2.child.wait().expect("wait").success());
}

handoff_tests::on_both_drivers!(
    killed_after_the_successor_started,
    killed_while_the_incumbent_drains,
    killed_after_the_seal,
    killed_while_the_successor_opens_the_data,
    killed_after_the_commit,
    silent_supervisor_mid_handoff_is_abandoned,
);
