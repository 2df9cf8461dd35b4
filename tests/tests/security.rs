//! The control socket: only its owner (and root) may reach it, and a peer of another uid that
//! does reach it is dropped before it can make the incumbent do anything.
//!
//! The test process runs as root; the other uid is `nobody` (65534), through
//! `setpriv --reuid=65534 --regid=65534 --clear-groups`, which also drops every capability.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_tests::probe::{open_fds, Reaper};
use handoff_tests::{alive, wait_gone, Client, Cluster, Driver};

const ROGUE: &str = env!("CARGO_BIN_EXE_rogue");
const SETPRIV: &str = "/usr/bin/setpriv";
const NOBODY: u32 = 65534;

/// Run `rogue` against `sock`, as `nobody` or as ourselves; the last line it printed. Bounded:
/// the rogue gives up reading after 10 s.
fn rogue(sock: &Path, as_nobody: bool) -> String {
    let out = if as_nobody {
        Command::new(SETPRIV)
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(ROGUE)
            .arg(sock)
            .output()
    } else {
        Command::new(ROGUE).arg(sock).output()
    }
    .expect("run rogue");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rogue failed: {}: {stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").to_string();
    eprintln!(
        "rogue as {}: {last:?} ({})",
        if as_nobody { "nobody" } else { "root" },
        stderr.trim_end()
    );
    last
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn control_socket_is_a_socket_of_mode_0600(driver: Driver) {
    let c = Cluster::tcp(driver, "sec-mode");
    let reaper = Reaper::new();
    reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let meta = std::fs::metadata(&c.sock).expect("control socket exists");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket: {:?}",
        c.sock.display(),
        meta.file_type()
    );
    assert_eq!(
        mode(&c.sock),
        0o600,
        "control socket mode {:o}",
        mode(&c.sock)
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        0,
        "owned by the daemon's uid"
    );
    // Nothing of the staging directory the socket was bound in is left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(c.dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "left over: {leftovers:?}");
}

fn another_uid_is_refused_and_cannot_make_the_incumbent_drain(driver: Driver) {
    assert!(
        Path::new(SETPRIV).exists(),
        "{SETPRIV} is needed to run a client as another uid"
    );
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test switches to uid {NOBODY} and must run as root"
    );
    let c = Cluster::tcp(driver, "sec-uid");
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    // What the incumbent holds now. The supervisor's recovery session may close meanwhile
    // (fewer descriptors later is fine); a new one would be the refused peer kept.
    let fds_before: std::collections::BTreeSet<PathBuf> = open_fds(&old.to_string())
        .expect("fds of the incumbent")
        .into_values()
        .map(|f| f.target)
        .collect();

    // (a) The socket as the daemon made it (0600, owned by root): nobody cannot connect.
    assert_eq!(mode(&c.sock), 0o600);
    let a = rogue(&c.sock, true);
    assert!(
        a.starts_with("connect-failed") && a.contains("os error 13"),
        "nobody reached a 0600 socket: {a:?}"
    );

    // (b) Make the socket reachable by anyone: the daemon itself must refuse the peer.
    std::fs::set_permissions(&c.sock, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    for dir in c.dir.path().ancestors().skip(1) {
        assert!(
            mode(dir) & 0o001 != 0,
            "{} is not traversable by others",
            dir.display()
        );
    }
    let b = rogue(&c.sock, true);
    // `eof` or `reset` means the daemon accepted, checked SO_PEERCRED and closed the
    // connection (it logs "refused control connection: peer pid … has uid 65534"); it read
    // nothing, so neither the Hello nor the Prepare reached the protocol.
    assert!(
        b == "eof" || b == "reset",
        "nobody's connection was not dropped unanswered: {b:?}"
    );
    // The refused connection is not kept.
    let new_fds: Vec<PathBuf> = open_fds(&old.to_string())
        .expect("fds of the incumbent")
        .into_values()
        .map(|f| f.target)
        .filter(|t| !fds_before.contains(t))
        .collect();
    assert!(
        new_fds.is_empty(),
        "the incumbent holds new descriptors after refusing a peer: {new_fds:?}"
    );

    // The incumbent did not drain: it answers, and it takes writes (a drained one refuses
    // them with "ERR read-only").
    let mut cl = Client::tcp(c.http()).expect("connect");
    assert_eq!(cl.ping().expect("ping"), old, "another process answers");
    assert_eq!(cl.call("SET rogue no").expect("set"), "OK 1");
    drop(cl);
    assert!(alive(old));

    // And a real handoff still goes through.
    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    assert_ne!(new, old);
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    let mut cl = Client::tcp(c.http()).expect("connect after");
    assert_eq!(cl.ping().expect("ping after"), new);
    assert_eq!(cl.call("GET rogue").expect("get"), "VAL no");
    drop(cl);
    // The successor bound a fresh control socket: 0600 again.
    assert_eq!(mode(&c.sock), 0o600, "the successor's control socket");

    // The same rogue as root (an admitted uid) is answered, and its Prepare is obeyed: the
    // test does tell a refused peer from an admitted one.
    let root = rogue(&c.sock, false);
    assert!(
        root.starts_with("answered ") && root.contains("HelloAck"),
        "root was not answered: {root:?}"
    );
    assert!(
        root.contains("Drained"),
        "root's Prepare was not obeyed: {root:?}"
    );

    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}

handoff_tests::on_both_drivers!(
    control_socket_is_a_socket_of_mode_0600,
    another_uid_is_refused_and_cannot_make_the_incumbent_drain,
);
