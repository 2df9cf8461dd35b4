//! `reaper CMD [ARGS…]`: run `CMD` as a child and reap every process that ends up below us,
//! then exit with `CMD`'s status once none is left.
//!
//! `bench/load.sh` starts each server under it (`setsid reaper …`, so the reaper leads a
//! process group of its own). It is a child subreaper (`PR_SET_CHILD_SUBREAPER`): an nginx
//! binary upgrade leaves the new master orphaned when the old one exits, and on a machine whose
//! pid 1 does not reap, every retired master would stay a zombie. Under the reaper they are
//! reaped at once, a pid that is gone from `/proc` has really exited, and the reaper's own exit
//! says that everything it started is gone.

use std::process::{Command, ExitCode};

use rustix::io::Errno;
use rustix::process::{getpid, set_child_subreaper, wait, WaitOptions};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("usage: reaper CMD [ARGS…]");
        return ExitCode::from(2);
    };
    if let Err(e) = set_child_subreaper(Some(getpid())) {
        eprintln!("reaper: PR_SET_CHILD_SUBREAPER: {e}");
        return ExitCode::FAILURE;
    }
    let child = match Command::new(&cmd).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("reaper: cannot start {cmd:?}: {e}");
            return ExitCode::from(127);
        }
    };
    let main_pid = child.id();
    // Reaped below with wait(2), with the orphans; `Child` does not wait on drop.
    drop(child);
    let mut code = 0u8;
    loop {
        match wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid.as_raw_nonzero().get() as u32 == main_pid => {
                code = match (status.exit_status(), status.terminating_signal()) {
                    (Some(c), _) => c as u8,
                    (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
                    _ => 1,
                };
            }
            Ok(_) => {}
            Err(Errno::INTR) => {}
            // No child left: everything we started is gone.
            Err(Errno::CHILD) => return ExitCode::from(code),
            Err(e) => {
                eprintln!("reaper: wait: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}
