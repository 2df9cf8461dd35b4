//! A damaged journal is a clear error that names the file, and touches nothing.

use handoff::supervisor::Supervisor;
use handoff_tests::{test_timing, Client, Cluster, Driver, Listener, Sup};

fn corrupt_or_truncated_journal_is_a_clear_error_and_the_daemon_keeps_serving(driver: Driver) {
    let mut c = Cluster::tcp(driver, "journal");
    let pid = c.sup.resume_from_journal().expect("cold start").serving;
    let journal = {
        let mut p = c.sock.clone().into_os_string();
        p.push(".journal");
        std::path::PathBuf::from(p)
    };
    let good = std::fs::read(&journal).expect("the recovery wrote a journal");
    let damaged: [(&str, Vec<u8>); 3] = [
        ("garbage", b"not a journal at all".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("bit flip", {
            let mut b = good.clone();
            let last = b.len() - 1;
            b[last] ^= 0x40;
            b
        }),
    ];
    for (what, bytes) in damaged {
        std::fs::write(&journal, &bytes).expect("write");
        let err = c.sup.resume_from_journal().expect_err(what).to_string();
        assert!(
            err.contains("journal") && err.contains(&*journal.to_string_lossy()),
            "{what}: {err}"
        );
        // A supervisor starting afresh (the first one gone: one supervisor per journal) must
        // recover first: it refuses to hand off too.
        c.sup = Sup::Unset;
        let Listener::Tcp(http) = &c.listeners[0].1 else {
            panic!("http is TCP")
        };
        let fresh = Supervisor::new(&c.sock)
            .expect("supervisor")
            .with_timing(test_timing())
            .with_listener_fd("http", http);
        let err = fresh
            .perform_handoff(c.spec(&[]))
            .expect_err(what)
            .to_string();
        assert!(
            err.contains("journal")
                && err.contains(&*journal.to_string_lossy())
                && !err.contains("another supervisor"),
            "{what}: {err}"
        );
        drop(fresh);
        c = c.with_cold_start_env(&[]);
        // Nothing happened to the daemon.
        let mut cl = Client::tcp(c.http()).expect("connect");
        assert_eq!(cl.ping().expect("ping"), pid, "{what}");
        assert_eq!(
            cl.call(&format!("SET {} x", what.replace(' ', "_")))
                .expect("set")
                .split(' ')
                .next(),
            Some("OK")
        );
        eprintln!("{what}: {err}");
    }
    // With the damaged file moved away, recovery finds the daemon and a handoff commits.
    std::fs::remove_file(&journal).expect("rm");
    assert_eq!(c.sup.resume_from_journal().expect("recover").serving, pid);
    let o = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(o.committed, "{:?}", o.abort_reason);
}

handoff_tests::on_both_drivers!(
    corrupt_or_truncated_journal_is_a_clear_error_and_the_daemon_keeps_serving,
);
