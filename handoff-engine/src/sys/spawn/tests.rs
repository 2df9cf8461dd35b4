//! Tests of spawning: descriptors placed in the child, its environment, scripts.

use super::trust::resolve_binary;
use super::*;
use crate::sys::fdpass::socketpair_cloexec;
use crate::sys::testutil::{identity, is_cloexec, TempDir};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;

/// Bound on every wait for a child in these tests.
const BOUND: Duration = Duration::from_secs(30);

/// A command running the shell script `body`, with stdio `/dev/null`; returns it and the
/// file its output goes to. The script's stdout is redirected to `$OUT` by `exec`, which
/// leaves no extra descriptor in the shell. A script lists its descriptors with
/// `ls -l /proc/$$/fd`: `ls` is a separate process, so the listing shows exactly the
/// shell's descriptors, the ones it inherited with fd 1 the output file.
fn script_command(dir: &TempDir, body: &str) -> (Command, PathBuf) {
    let out = dir.path().join("out");
    let script = format!("exec >\"$OUT\" || exit 99\n{body}");
    let cmd = Command::new("/bin/sh")
        .args(["-c", script.as_str()])
        .env("OUT", &out)
        .inherit_stdio(false);
    (cmd, out)
}

/// Wait (bounded) for `child` to exit, reap it, and return its output file.
pub(super) fn finish(child: Child, out: &Path) -> String {
    crate::sys::testutil::finish(child, out, "spawn")
}

/// The descriptors of an `ls -l /proc/PID/fd` listing: number → link target.
fn fd_listing(text: &str) -> BTreeMap<RawFd, String> {
    text.lines()
        .filter_map(|line| {
            let (left, target) = line.split_once(" -> ")?;
            let fd = left.split_whitespace().last()?.parse().ok()?;
            Some((fd, target.to_owned()))
        })
        .collect()
}

fn socket_link(fd: impl AsFd) -> String {
    format!("socket:[{}]", identity(fd).1)
}

/// The descriptors a child of this process is expected to have: `placed` (0, 1, 2 and the
/// ones the spawn put there), plus those this process holds without `FD_CLOEXEC`. This
/// code creates none, but the test binary may have inherited some from whatever started
/// it (a shell, cargo's jobserver pipe), and every child inherits those as well.
fn expected_fds(placed: impl IntoIterator<Item = RawFd>) -> Vec<RawFd> {
    const O_CLOEXEC: u32 = 0o2000000;
    let mut fds: std::collections::BTreeSet<RawFd> = placed.into_iter().collect();
    for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap() {
        let entry = entry.unwrap();
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // Gone since the listing (the directory's own descriptor): not inherited.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        if flags & O_CLOEXEC == 0 {
            fds.insert(fd);
        }
    }
    fds.into_iter().collect()
}

/// The descriptors of this process whose link target is `target`.
fn my_fds_pointing_at(target: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy() == target)
        .count()
}

#[test]
fn three_listeners_at_3_4_5_with_listen_vars_for_the_child() {
    let dir = TempDir::new("spawn-listeners");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let unix = UnixListener::bind(dir.path().join("admin.sock")).unwrap();
    let (cmd, out) = script_command(
        &dir,
        "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES ${HANDOFF_ROLE-unset} \
         ${HANDOFF_CHANNEL_FD-unset}\"\nls -l /proc/$$/fd",
    );
    // Set by the caller's env, overridden or removed by the spawn.
    let cmd = cmd
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "9")
        .env("LISTEN_FDNAMES", "x")
        .env(ENV_ROLE, ROLE_SUCCESSOR)
        .env(ENV_CHANNEL_FD, "7");
    let child = spawn_with_listeners(
        &cmd,
        &[
            ("http", tcp.as_fd()),
            ("dns", udp.as_fd()),
            ("admin", unix.as_fd()),
        ],
    )
    .unwrap();
    let pid = child.id();
    let text = finish(child, &out);

    let first = text.lines().next().unwrap();
    assert_eq!(first, format!("{pid} {pid} 3 http:dns:admin unset unset"));
    let fds = fd_listing(&text);
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        expected_fds(0..=5),
        "{text}"
    );
    assert_eq!(fds[&0], "/dev/null");
    assert_eq!(fds[&2], "/dev/null");
    assert_eq!(fds[&3], socket_link(&tcp));
    assert_eq!(fds[&4], socket_link(&udp));
    assert_eq!(fds[&5], socket_link(&unix));
    // The parent's listeners were never made inheritable.
    assert!(is_cloexec(&tcp) && is_cloexec(&udp) && is_cloexec(&unix));
}

#[test]
fn three_hundred_listeners_land_above_their_duplicates() {
    let dir = TempDir::new("spawn-300");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let link = socket_link(&tcp);
    let names: Vec<String> = (0..300).map(|i| format!("l{i}")).collect();
    let listeners: Vec<(&str, BorrowedFd<'_>)> =
        names.iter().map(|n| (n.as_str(), tcp.as_fd())).collect();
    let (cmd, out) = script_command(
        &dir,
        "echo \"$LISTEN_PID $$ $LISTEN_FDS $LISTEN_FDNAMES\"\nls -l /proc/$$/fd",
    );
    // A bare name: searched in PATH before the shell execs it.
    let cmd = Command {
        binary: "sh".into(),
        ..cmd
    };
    assert_eq!(my_fds_pointing_at(&link), 1);
    let child = spawn_with_listeners(&cmd, &listeners).unwrap();
    // The duplicates and the reserved numbers are closed by the time spawn returns.
    assert_eq!(my_fds_pointing_at(&link), 1);
    let pid = child.id();
    let text = finish(child, &out);

    let first = text.lines().next().unwrap();
    assert_eq!(first, format!("{pid} {pid} 300 {}", names.join(":")));
    let fds = fd_listing(&text);
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        expected_fds(0..=302),
        "{text}"
    );
    for fd in 3..=302 {
        assert_eq!(fds[&fd], link, "fd {fd}");
    }
}

#[test]
fn no_listeners_spawns_directly_without_listen_or_handoff_vars() {
    let dir = TempDir::new("spawn-none");
    let (cmd, out) = script_command(
        &dir,
        "echo \"${LISTEN_PID-unset} ${LISTEN_FDS-unset} ${LISTEN_FDNAMES-unset} \
         ${HANDOFF_ROLE-unset} ${HANDOFF_CHANNEL_FD-unset} $KEPT\"\nls -l /proc/$$/fd",
    );
    let cmd = cmd
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "a:b")
        .env(ENV_ROLE, ROLE_SUCCESSOR)
        .env(ENV_CHANNEL_FD, "7")
        .env("KEPT", "no")
        .env("KEPT", "yes");
    let child = spawn_with_listeners(&cmd, &[]).unwrap();
    let text = finish(child, &out);
    assert_eq!(
        text.lines().next().unwrap(),
        "unset unset unset unset unset yes"
    );
    let fds = fd_listing(&text);
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        expected_fds(0..=2),
        "{text}"
    );
}

#[test]
fn bad_listener_lists_are_refused_before_spawning() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    // A binary that does not exist: the name check comes first.
    let cmd = Command::new("/nonexistent/handoff-daemon");
    for name in ["", "a:b", ":"] {
        let e =
            spawn_with_listeners(&cmd, &[("ok", tcp.as_fd()), (name, tcp.as_fd())]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name:?}: {e}");
        assert!(e.to_string().contains(&format!("{name:?}")), "{e}");
    }
    let too_many = vec![("l", tcp.as_fd()); MAX_INHERITED_FDS + 1];
    let e = spawn_with_listeners(&cmd, &too_many).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    let count = format!("{} listeners", MAX_INHERITED_FDS + 1);
    assert!(e.to_string().contains(&count), "{e}");
    assert_eq!(
        listen_fdnames(&[("http", tcp.as_fd()), ("dns", tcp.as_fd())]).unwrap(),
        "http:dns"
    );
}

#[test]
fn successor_gets_its_channel_and_role_and_no_listen_vars() {
    let dir = TempDir::new("spawn-successor");
    let (ours, theirs) = socketpair_cloexec().unwrap();
    let their_link = socket_link(&theirs);
    let (cmd, out) = script_command(
        &dir,
        "echo \"$HANDOFF_ROLE $HANDOFF_CHANNEL_FD ${LISTEN_PID-unset} ${LISTEN_FDS-unset} \
         ${LISTEN_FDNAMES-unset}\"\nls -l /proc/$$/fd\n\
         IFS= read -r line <&\"$HANDOFF_CHANNEL_FD\"\n\
         echo \"got $line\" >&\"$HANDOFF_CHANNEL_FD\"",
    );
    // bash: dash's redirections name descriptors 0 to 9 only (`<&12` is a syntax error),
    // and the channel's number depends on what the tests running meanwhile hold open.
    let cmd = Command {
        binary: "/bin/bash".into(),
        ..cmd
    };
    let cmd = cmd
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "a:b")
        .env(ENV_ROLE, "someone-else")
        .env(ENV_CHANNEL_FD, "99");
    let child = spawn_successor(&cmd, theirs.as_fd()).unwrap();
    assert!(
        is_cloexec(&theirs),
        "the parent's end must stay close-on-exec"
    );
    assert_eq!(my_fds_pointing_at(&their_link), 1, "duplicate not closed");
    drop(theirs);

    let mut ours = ours;
    ours.set_read_timeout(Some(BOUND)).unwrap();
    ours.write_all(b"hello through the channel\n").unwrap();
    let mut reply = String::new();
    let read = BufReader::new(&ours).read_line(&mut reply);
    let text = finish(child, &out);
    read.unwrap_or_else(|e| panic!("no reply from the child: {e}\n{text}"));
    assert_eq!(reply, "got hello through the channel\n");

    let mut first = text.lines().next().unwrap().split(' ');
    assert_eq!(first.next(), Some(ROLE_SUCCESSOR));
    let n: RawFd = first.next().unwrap().parse().unwrap();
    assert!(n > 2, "channel at {n}");
    assert_eq!(first.collect::<Vec<_>>(), ["unset", "unset", "unset"]);
    let fds = fd_listing(&text);
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        expected_fds([0, 1, 2, n]),
        "{text}"
    );
    assert_eq!(fds[&n], their_link);
}

#[test]
fn a_missing_binary_is_not_found_and_named() {
    let (_ours, theirs) = socketpair_cloexec().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let missing = "/nonexistent/handoff-missing-daemon";
    let cmd = Command::new(missing).inherit_stdio(false);
    let errors = [
        spawn_successor(&cmd, theirs.as_fd()).unwrap_err(),
        spawn_with_listeners(&cmd, &[]).unwrap_err(),
        spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]).unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(missing), "{e}");
    }

    let bare = Command::new("handoff-no-such-binary-anywhere").env("PATH", "/nonexistent:/bin");
    let e = spawn_with_listeners(&bare, &[("http", tcp.as_fd())]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains("handoff-no-such-binary-anywhere"),
        "{e}"
    );
    // The same search in the child's PATH finds what is there.
    let sh = Command::new("sh").env("PATH", "/nonexistent::/bin");
    assert_eq!(resolve_binary(&sh).unwrap(), Path::new("/bin/sh"));

    let dir = TempDir::new("spawn-not-exec");
    let e = spawn_with_listeners(&Command::new(dir.path()), &[("http", tcp.as_fd())]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let file = dir.path().join("not-executable");
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    let e = spawn_with_listeners(&Command::new(&file), &[("http", tcp.as_fd())]).unwrap_err();
    // Root may execute any file with an execute bit; this one has none.
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("not-executable"), "{e}");
}

/// Set the permission bits of `path` to `mode`.
pub(super) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A copy of `from` at `to` with mode `mode`. Copied by `cp`, another process: were this
/// multi-threaded process to hold the copy open for writing, a child forked meanwhile by
/// another test would inherit that descriptor until its exec, and executing the copy would
/// fail with `ETXTBSY`.
pub(super) fn copy_exe(from: &str, to: &Path, mode: u32) {
    let status = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cp {from} {}: {status}", to.display());
    set_mode(to, mode);
}

const ENV_CHILD: &str = "HOIS_SPAWN_ENV_CHILD";
const ENV_CHILD_TEST: &str = "sys::spawn::tests::env_child_side";

/// The environment a `SpawnSpec`'s daemon starts with, as the daemon sees it
/// (`/proc/self/environ` of the exec'd program): sorted `NAME=value` lines.
fn daemon_environ(dir: &TempDir, name: &str, spawn: impl FnOnce(&Command) -> Child) -> Vec<String> {
    let out = dir.path().join(name);
    let spec = crate::spec::SpawnSpec {
        binary: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "tr '\\000' '\\n' </proc/$$/environ >\"$OUT\"".into(),
        ],
        env: vec![
            ("OUT".into(), out.clone().into()),
            ("DAEMON_SETTING".into(), "from-the-spec".into()),
        ],
        ..Default::default()
    };
    let text = finish(spawn(&spec.command().inherit_stdio(false)), &out);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// The child half of [`a_daemon_inherits_only_the_documented_environment`]: a supervisor
/// whose own environment holds more than a daemon needs. Returns at once in a normal run.
#[test]
fn env_child_side() {
    if std::env::var_os(ENV_CHILD).is_none() {
        return;
    }
    let dir = TempDir::new("spawn-env");
    let (_ours, theirs) = socketpair_cloexec().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let names = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .map(|l| l.split_once('=').map_or(l.as_str(), |(k, _)| k).to_owned())
            .collect()
    };
    let succ = daemon_environ(&dir, "successor", |cmd| {
        spawn_successor(cmd, theirs.as_fd()).unwrap()
    });
    assert_eq!(
        names(&succ),
        [
            "DAEMON_SETTING",
            "HANDOFF_CHANNEL_FD",
            "HANDOFF_LOG",
            "HANDOFF_ROLE",
            "LANG",
            "LC_TIME",
            "OUT",
            "PATH",
            "TZ"
        ],
        "{succ:#?}"
    );
    assert!(
        succ.contains(&"DAEMON_SETTING=from-the-spec".to_owned()),
        "{succ:#?}"
    );
    assert!(succ.contains(&"PATH=/usr/bin:/bin".to_owned()), "{succ:#?}");
    let mut cold_pid = 0;
    let cold = daemon_environ(&dir, "cold", |cmd| {
        let child = spawn_with_listeners(cmd, &[("http", tcp.as_fd())]).unwrap();
        cold_pid = child.id();
        child
    });
    assert_eq!(
        names(&cold),
        [
            "DAEMON_SETTING",
            "HANDOFF_LOG",
            "LANG",
            "LC_TIME",
            "LISTEN_FDNAMES",
            "LISTEN_FDS",
            "LISTEN_PID",
            "OUT",
            "PATH",
            "TZ"
        ],
        "{cold:#?}"
    );
    assert!(
        cold.contains(&format!("LISTEN_PID={cold_pid}")),
        "{cold:#?}"
    );
    println!("environments as documented");
}

/// A script (`#!`) runs, for a successor and for a cold start: the kernel hands it to its
/// interpreter as `/dev/fd/N`, so that descriptor of the script (and only it) stays open.
#[test]
fn a_script_runs_with_its_own_descriptor_only() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    for case in ["successor", "cold"] {
        let dir = TempDir::new("spawn-script");
        let script = dir.path().join("daemon.sh");
        let source = dir.path().join("source");
        std::fs::write(
            &source,
            "#!/bin/sh\nexec >\"$OUT\"\necho \"$0 $*\"\nls -l /proc/$$/fd\n",
        )
        .unwrap();
        copy_exe(source.to_str().unwrap(), &script, 0o755);
        let out = dir.path().join("out");
        let cmd = Command::new(&script)
            .args(["a", "b"])
            .env("OUT", &out)
            .inherit_stdio(false);
        let (_ours, theirs) = socketpair_cloexec().unwrap();
        let child = match case {
            "successor" => spawn_successor(&cmd, theirs.as_fd()),
            _ => spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
        }
        .unwrap();
        let text = finish(child, &out);
        let first = text.lines().next().unwrap();
        let n: RawFd = first
            .strip_prefix("/dev/fd/")
            .and_then(|rest| rest.strip_suffix(" a b"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{case}: {text}"));
        let fds = fd_listing(&text);
        let name = script.display().to_string();
        assert_eq!(fds[&n], name, "{case}: {text}");
        // Besides 0, 1, 2 and the channel or listener: the script's descriptor, and the
        // interpreter's own for reading it (dash moves it to 10 or above).
        let mut placed: Vec<RawFd> = fds
            .iter()
            .filter(|(_, t)| **t == name || **t == socket_link(&theirs) || **t == socket_link(&tcp))
            .map(|(f, _)| *f)
            .collect();
        placed.extend([0, 1, 2]);
        if case == "cold" {
            assert_eq!(fds[&3], socket_link(&tcp), "{case}: {text}");
        }
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected_fds(placed),
            "{case}: {text}"
        );
    }
}

/// The child's name (`/proc/<pid>/comm`) is its binary's file name, as after an exec by
/// path; kernels before Linux 6.14 name a process exec'd with `execveat(AT_EMPTY_PATH)`
/// after the descriptor number instead.
#[test]
fn the_child_is_named_after_its_binary() {
    let dir = TempDir::new("spawn-comm");
    let daemon = dir.path().join("my-daemon");
    copy_exe("/bin/sh", &daemon, 0o755);
    let out = dir.path().join("out");
    let cmd = Command::new(&daemon)
        .args(["-c", "cat /proc/$$/comm >\"$OUT\""])
        .env("OUT", &out)
        .inherit_stdio(false);
    let comm = finish(spawn_with_listeners(&cmd, &[]).unwrap(), &out);
    let old_kernel = comm.trim_end().bytes().all(|b| b.is_ascii_digit());
    assert!(comm == "my-daemon\n" || old_kernel, "{comm:?}");
}

/// A daemon started for a `SpawnSpec` (successor or cold start) inherits only the
/// documented variables of the supervisor's environment (`PATH`, `LANG`, `LC_*`, `TZ`,
/// `HANDOFF_*`), plus the spec's `env` and what the spawn sets; not the supervisor's other
/// variables, secrets or `NOTIFY_SOCKET` among them.
#[test]
fn a_daemon_inherits_only_the_documented_environment() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            ENV_CHILD_TEST,
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env_clear()
        .env(ENV_CHILD, "1")
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("LC_TIME", "C")
        .env("TZ", "UTC")
        .env("HANDOFF_LOG", "on")
        .env("HOME", "/root")
        .env("SECRET_TOKEN", "hunter2")
        .env("NOTIFY_SOCKET", "/run/systemd/notify")
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "x")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child: {}\n{text}", out.status);
    assert!(text.contains("environments as documented"), "{text}");
}
