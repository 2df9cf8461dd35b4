//! A handoff of 1,000 TCP listeners: more than three `SCM_RIGHTS` batches of 253.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;

use handoff_tests::probe::Reaper;
use handoff_tests::{wait_gone, Client, Cluster, Driver, Listener};

const N: usize = 1_000;

/// Raise this process's soft descriptor limit to the hard one; the new soft limit.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l).expect("raise RLIMIT_NOFILE");
    }
    getrlimit(Resource::Nofile).current.expect("a finite limit")
}

/// The listeners to ask: the first, both sides of each batch boundary (253, 506, 759 in
/// 0-based indices), the last, and a few random ones.
fn sample() -> BTreeSet<usize> {
    let mut s = BTreeSet::from([0, 252, 253, 505, 506, 758, 759, N - 1]);
    let seed = RandomState::new();
    for i in 0..8u64 {
        s.insert((seed.hash_one(i) % N as u64) as usize);
    }
    s
}

fn a_thousand_tcp_listeners_are_handed_off(driver: Driver) {
    let limit = raise_nofile();
    // Ours, the supervisor's duplicates, and room for the rest.
    assert!(
        limit >= 2 * N as u64 + 100,
        "RLIMIT_NOFILE hard limit {limit} is too low for {N} listeners"
    );
    let listeners: Vec<(String, Listener)> = (0..N)
        .map(|i| {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            (format!("l{i:04}"), Listener::Tcp(l))
        })
        .collect();
    let addrs: Vec<_> = listeners
        .iter()
        .map(|(_, l)| match l {
            Listener::Tcp(l) => l.local_addr().expect("addr"),
            _ => unreachable!(),
        })
        .collect();
    let c = Cluster::with_listeners(driver, "many", listeners);
    let reaper = Reaper::new();
    let cold = std::time::Instant::now();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let cold = cold.elapsed();
    let sample = sample();
    eprintln!("sampled listeners: {sample:?}");
    for &i in &sample {
        let mut cl = Client::tcp(addrs[i]).expect("connect before");
        assert_eq!(cl.ping().expect("ping before"), old, "listener {i} before");
    }

    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    assert_ne!(new, old);
    eprintln!(
        "{N} listeners: cold start {cold:?}; handoff took {:?} ({:?})",
        outcome.times.total, outcome.times
    );
    for &i in &sample {
        let mut cl = Client::tcp(addrs[i]).expect("connect after");
        assert_eq!(cl.ping().expect("ping after"), new, "listener {i} after");
    }
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    // Cheap enough to ask them all, once the old process is gone.
    let all = std::time::Instant::now();
    for (i, a) in addrs.iter().enumerate() {
        let mut cl = Client::tcp(*a).expect("connect");
        assert_eq!(cl.ping().expect("ping"), new, "listener {i} after");
    }
    eprintln!("all {N} listeners answered in {:?}", all.elapsed());

    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}

handoff_tests::on_both_drivers!(a_thousand_tcp_listeners_are_handed_off,);
