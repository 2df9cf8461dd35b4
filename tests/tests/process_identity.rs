//! A pid read from a file identifies nobody. A restarted supervisor never signals a process
//! only because its journal names that pid, an incumbent never kills a process only because
//! `/proc/locks` names that pid, and a daemon's `HelloAck` must name the process that answers
//! on the control socket.
//!
//! Pid reuse is reproduced for real: as root, `pid - 1` is written to
//! `/proc/sys/kernel/ns_last_pid` and a stranger (`sh -c 'read x; exit 0'`) is started, so the kernel
//! gives it that pid. Each test ends by checking that the stranger was never signalled: it
//! exits 0 when its stdin closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use handoff_proto::wire::{
    encode, DaemonStatus, HelloAck, Message, PeerRole, HANDSHAKE_VERSION, SUPPORTED_VERSIONS,
};
use handoff_tests::testsup::{field, Site, Sup};
use handoff_tests::{alive, root, Client, Driver, TempDir, BOUND};

/// The supervisor's log lines are part of what these tests print.
const LOG_ON: [(&str, &str); 1] = [("HANDOFF_LOG", "on")];
const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

/// Why the pid-reuse tests need root.
const NEEDS_ROOT: &str = "it writes /proc/sys/kernel/ns_last_pid";

/// Orphans of this test's processes become its children, so that it can reap a daemon whose
/// supervisor it killed: the pid is free again only once the zombie is reaped.
fn become_subreaper() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("PR_SET_CHILD_SUBREAPER");
}

/// SIGKILL `pid`, one of our children, and reap it.
fn kill_and_reap(pid: u32) {
    let w = handoff_engine::sys::spawn::Watched::open(pid).expect("a pidfd on our child");
    w.kill().expect("SIGKILL");
    let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty())
        .expect("reap the killed daemon");
}

/// A process that does nothing until its stdin closes, then exits 0.
fn idle_process() -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", "read x; exit 0"]).stdin(Stdio::piped());
    c
}

/// Start a stranger with pid `pid` (free now): write `pid - 1` to `ns_last_pid` and spawn.
/// Another process of the machine may take the pid first; then try again, bounded.
fn stranger_at(pid: u32) -> Child {
    let until = Instant::now() + 4 * BOUND;
    let mut tries = 0;
    loop {
        tries += 1;
        // Only while the pid is free: a process that took it meanwhile must exit first.
        if !Path::new(&format!("/proc/{pid}")).exists() {
            std::fs::write(NS_LAST_PID, (pid - 1).to_string()).expect("write ns_last_pid");
            let mut c = idle_process().spawn().expect("spawn the stranger");
            if c.id() == pid {
                eprintln!("stranger started with pid {pid} (attempt {tries})");
                return c;
            }
            drop(c.stdin.take());
            let _ = c.wait();
        }
        assert!(
            Instant::now() < until,
            "no stranger could get pid {pid} in {tries} attempts"
        );
        std::thread::yield_now();
    }
}

/// Assert that `stranger` still runs, then let it end and check nobody signalled it.
fn assert_untouched(mut stranger: Child, what: &str) {
    let pid = stranger.id();
    assert!(
        stranger.try_wait().expect("try_wait").is_none(),
        "{what}: the stranger with pid {pid} is dead: {:?}",
        stranger.try_wait()
    );
    drop(stranger.stdin.take());
    let status = stranger.wait().expect("wait for the stranger");
    assert!(
        status.success(),
        "{what}: stranger {pid} ended with {status}"
    );
}

/// End a supervisor (end of its input) and the daemon it leaves serving.
fn finish(mut sup: Sup, serving: u32) {
    drop(sup.stdin);
    let status = sup.child.wait().expect("wait for testsup");
    assert!(status.success(), "testsup: {status}");
    let w = handoff_engine::sys::spawn::Watched::open(serving).expect("the serving daemon");
    w.kill().expect("SIGKILL");
    assert!(
        !handoff_engine::sys::spawn::wait_any(&[&w], BOUND)
            .expect("wait")
            .is_empty(),
        "daemon {serving} did not exit"
    );
}

/// The host "crashes": the supervisor and its daemon are SIGKILLed, a stranger gets the
/// daemon's pid, and the supervisor is started again. The journal names the pid; the restarted
/// supervisor must find the stranger is not the daemon it recorded, leave it alone, and start
/// the daemon cold at once.
fn journal_pid_reused_by_a_stranger_is_left_alone(driver: Driver) {
    if !root("journal_pid_reused_by_a_stranger_is_left_alone", NEEDS_ROOT) {
        return;
    }
    become_subreaper();
    let site = Site::new(driver, "reuse-journal");
    let mut sup = site.sup(true, &LOG_ON);
    site.wait("listening");
    let old: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    sup.child.kill().expect("SIGKILL the supervisor");
    sup.child.wait().expect("reap the supervisor");
    // The daemon, orphaned, is ours now: kill it and reap it, which frees its pid.
    kill_and_reap(old);
    let stranger = stranger_at(old);

    let started = Instant::now();
    let sup = site.sup(true, &LOG_ON);
    let addr: std::net::SocketAddr = field(&site.wait("listening"), "addr")
        .parse()
        .expect("addr");
    let serving: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    let took = started.elapsed();
    eprintln!("recovered onto {serving} in {took:?}; the journal named {old}");
    assert_ne!(serving, old, "adopted the stranger");
    assert!(
        alive(old),
        "the stranger with the journal's pid {old} was killed"
    );
    let mut cl = Client::tcp(addr).expect("connect");
    assert_eq!(cl.ping().expect("ping"), serving);
    assert_eq!(cl.call("SET k v").expect("set"), "OK 1");
    drop(cl);
    // Nobody waited the recovery wait (5 s in testsup) for the stranger to resolve.
    assert!(took < Duration::from_secs(4), "recovery took {took:?}");
    finish(sup, serving);
    assert_untouched(stranger, "journal");
}

/// A journal in the first format carries no identities: the pid it names (here a process that
/// was never a daemon) is never watched or signalled.
fn format_1_journal_naming_a_stranger_leaves_it_alone(driver: Driver) {
    let site = Site::new(driver, "v1-journal");
    let stranger = idle_process().spawn().expect("spawn the stranger");
    std::fs::write(site.journal(), v1_idle_journal(stranger.id(), 7)).expect("write journal");
    let started = Instant::now();
    let sup = site.sup(true, &LOG_ON);
    site.wait("listening");
    let serving: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    let took = started.elapsed();
    eprintln!("recovered onto {serving} in {took:?}");
    assert_ne!(serving, stranger.id());
    assert!(
        alive(stranger.id()),
        "the stranger {} the journal named was killed",
        stranger.id()
    );
    assert!(took < Duration::from_secs(4), "recovery took {took:?}");
    finish(sup, serving);
    assert_untouched(stranger, "format 1 journal");
}

/// `HOJ1 | len | postcard(Idle { serving: Some(pid), last_handoff }) | fnv1a64`, the journal
/// format before process identities, written the way the old encoder did.
fn v1_idle_journal(pid: u32, last_handoff: u64) -> Vec<u8> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    // Variant 0 (Idle), Some, the pid, the handoff id.
    let mut body = vec![0u8, 1];
    varint(u64::from(pid), &mut body);
    varint(last_handoff, &mut body);
    let sum = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut out = b"HOJ1".to_vec();
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(&body);
    out.extend(sum.to_le_bytes());
    out
}

/// Something listens on the control socket and answers every `Hello` with a `HelloAck` that
/// names another process (a stranger) as the serving incumbent. Its own pid, which the
/// supervisor learns from `SO_PEERCRED`, disagrees: the answer is refused, the stranger is
/// never adopted (so never watched, journaled or killed later), and the daemon is started cold.
fn a_helloack_naming_another_pid_is_refused(driver: Driver) {
    let site = Site::new(driver, "liar");
    let stranger = idle_process().spawn().expect("spawn the stranger");
    let named = stranger.id();
    let liar = UnixListener::bind(site.sock()).expect("bind the control socket");
    std::thread::spawn(move || {
        for conn in liar.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // The supervisor's Hello; then the lie; then whatever it says until it closes.
                if !matches!(conn.read(&mut buf), Ok(n) if n > 0) {
                    return;
                }
                let ack = Message::HelloAck(HelloAck {
                    role: PeerRole::Incumbent,
                    version: SUPPORTED_VERSIONS.max,
                    pid: named,
                    build_id: "liar".into(),
                    status: DaemonStatus::Serving,
                });
                let _ = conn.write_all(&encode(HANDSHAKE_VERSION, &ack).expect("encode"));
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let sup = site.sup(true, &LOG_ON);
    site.wait("listening");
    let serving: u32 = field(&site.wait("recovered"), "pid").parse().expect("pid");
    assert_ne!(serving, named, "adopted the pid the liar named");
    let journal = std::fs::read(site.journal()).expect("journal");
    let record = handoff_proto::journal::decode(&journal).expect("decode the journal");
    assert_eq!(record.pids(), vec![serving], "{record:?}");
    finish(sup, serving);
    assert_untouched(stranger, "liar");
}

/// A lock whose taker is gone but which is still held: `flock(1)` takes the lock on the shell's
/// descriptor and exits, so `/proc/locks` goes on naming flock's pid while the shell holds the
/// lock. The lock record names that pid too, as a successor that took the lock would have
/// written it. A stranger then gets the pid. An incumbent's `KillLockHolder` must not hit the
/// stranger; the process that really holds the lock is the one killed.
#[test]
fn stale_lock_owner_pid_reused_by_a_stranger_is_not_killed() {
    if !root(
        "stale_lock_owner_pid_reused_by_a_stranger_is_not_killed",
        NEEDS_ROOT,
    ) {
        return;
    }
    let dir = TempDir::new("reuse-lock");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let lock = handoff_engine::sys::lock::lock_file_path(&data);
    // Mode 0600, as a daemon creates it: a lock file others may open is refused as unsafe.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&lock)
        .expect("create the lock file");
    let mut holder = Command::new("/bin/sh")
        .args([
            "-c",
            "exec 9<>\"$0\" && flock -x 9 && echo locked && exec cat",
        ])
        .arg(&lock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "locked\n");
    let took = handoff_engine::sys::lock::holders(&lock).expect("/proc/locks");
    assert_eq!(took.len(), 1, "{took:?}");
    let taker = took[0];
    assert_ne!(taker, holder.id(), "flock(1) took the lock, not the shell");
    // Written as the successor's lock record would be.
    std::fs::write(&lock, format!("owner={taker} committed=-\n")).expect("write the record");
    let stranger = stranger_at(taker);

    let killed = handoff_engine::sys::lock::kill_if_holder(taker, &lock);
    assert!(
        matches!(killed, Ok(false)),
        "kill_if_holder({taker}): {killed:?}"
    );
    assert!(
        alive(taker),
        "the stranger with the lock's pid {taker} was killed"
    );
    // A cold start does not take the stranger for the holder: it waits for the lock, then
    // reports who holds it.
    let started = Instant::now();
    let err = handoff_engine::sys::lock::DataDirLock::acquire_or_break_stale(&data)
        .expect_err("the lock is held");
    eprintln!("after {:?}: {err}", started.elapsed());
    assert!(
        matches!(err, handoff_engine::sys::lock::LockError::Stale { owner, .. } if owner == taker),
        "{err:?}"
    );
    // The process that does hold the lock is found and killed.
    let killed = handoff_engine::sys::lock::kill_if_holder(holder.id(), &lock);
    assert!(
        matches!(killed, Ok(true)),
        "kill_if_holder({}): {killed:?}",
        holder.id()
    );
    let status = holder.wait().expect("wait for the holder");
    assert!(!status.success(), "holder: {status}");
    assert_untouched(stranger, "lock");
}

handoff_tests::on_both_drivers!(
    journal_pid_reused_by_a_stranger_is_left_alone,
    format_1_journal_naming_a_stranger_leaves_it_alone,
    a_helloack_naming_another_pid_is_refused,
);
