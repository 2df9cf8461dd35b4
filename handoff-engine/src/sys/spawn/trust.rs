//! Trusted binaries: opening the file to run once, relative to a checked directory, and
//! checking it with `fstat` (owned by root or this process's effective user, writable by
//! neither group nor others, executable); finding a bare name in the child's `PATH`.

use super::*;

/// Why a file or directory with status `st` could be written by someone other than root or
/// this process's effective user: it is owned by another user, or writable by its group or by
/// others. `None` when it could not.
fn writable_by_others(st: &Stat) -> Option<String> {
    let euid = rustix::process::geteuid().as_raw();
    let uid = st.st_uid;
    if uid != 0 && uid != euid {
        return Some(format!(
            "is owned by uid {uid}, neither root nor this process's uid {euid}"
        ));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "others"
        } else {
            "its group"
        };
        return Some(format!("is writable by {who} (mode {mode:o})"));
    }
    None
}

/// A permission error saying that `path` `why` (from [`writable_by_others`]).
fn untrusted(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} {why}: only root and this process's user may be able to write a binary or its \
             directory",
            path.display()
        ),
    )
}

/// Check the directory open at `dir` (whose path is `path`): a directory that only root or
/// this process's user can write.
fn check_dir_fd(dir: &OwnedFd, path: &Path) -> io::Result<()> {
    let st = fstat(dir)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory", path.display()),
        ));
    }
    match writable_by_others(&st) {
        Some(why) => Err(untrusted(path, &why)),
        None => Ok(()),
    }
}

/// Check that `dir` (symlinks followed) is a directory that nobody but root and this
/// process's effective user can write: owned by one of them, not writable by group or others.
/// A `PermissionDenied` error says which rule it breaks.
pub fn check_trusted_dir(dir: &Path) -> io::Result<()> {
    let fd = open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display())))?;
    check_dir_fd(&fd, dir)
}

/// Open `path` (symlinks resolved first) as [`check_trusted_binary`] describes: its directory
/// is opened and checked, then the file is opened relative to that descriptor without following
/// a symlink, and checked. Returns the file (`O_PATH`, close-on-exec), its resolved path and its
/// status. Errors name the file or directory at fault when it is not `path` itself (the caller
/// names `path`).
fn open_checked(path: &Path) -> io::Result<(OwnedFd, PathBuf, Stat)> {
    let canon = std::fs::canonicalize(path)?;
    let not_a_file = || {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a regular file", canon.display()),
        )
    };
    let (Some(parent), Some(name)) = (canon.parent(), canon.file_name()) else {
        return Err(not_a_file());
    };
    let dir = open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", parent.display()),
        )
    })?;
    check_dir_fd(&dir, parent)?;
    // Relative to the directory just checked; a symlink put there since `canonicalize` is
    // opened as itself (`O_PATH | O_NOFOLLOW`) and refused as not a regular file.
    let fd = openat(
        &dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", canon.display()),
        )
    })?;
    let st = fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(not_a_file());
    }
    if let Some(why) = writable_by_others(&st) {
        return Err(untrusted(&canon, &why));
    }
    Ok((fd, canon, st))
}

/// Check `path` as a binary to run: resolved (symlinks followed), it must be a regular file in
/// a directory, the file and the directory each owned by root or by this process's effective
/// user and writable by neither group nor others. Returns the resolved path. A
/// `PermissionDenied` error names the file or directory and the rule it breaks; a missing file
/// is the system's `NotFound` error, which does not repeat `path`.
///
/// The spawn functions make the same checks on the descriptor they execute; this is for a
/// caller's own allowlist (the reference supervisor's configuration).
pub fn check_trusted_binary(path: &Path) -> io::Result<PathBuf> {
    open_checked(path).map(|(_, canon, _)| canon)
}

/// A binary opened for execution and checked: the child execs this descriptor.
#[derive(Debug)]
pub(super) struct Binary {
    /// `O_PATH`, close-on-exec.
    pub(super) fd: OwnedFd,
    /// Whether it starts with `#!`: the kernel then gives the interpreter `/dev/fd/<fd>`, so
    /// the child must leave the descriptor open across the exec.
    pub(super) script: bool,
}

impl Binary {
    /// Open and check `path` (see [`open_checked`]), and require an execute bit.
    pub(super) fn open(path: &Path) -> io::Result<Binary> {
        let (fd, canon, st) = open_checked(path).map_err(|e| spawn_error(path, e))?;
        if st.st_mode & 0o111 == 0 {
            return Err(spawn_error(
                path,
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is not executable (mode {:o})",
                        canon.display(),
                        st.st_mode & 0o7777
                    ),
                ),
            ));
        }
        let script = starts_with_shebang(&fd);
        Ok(Binary { fd, script })
    }

    /// The same binary at a descriptor number of `min` or more (close-on-exec), so that
    /// nothing placed in the child below `min` replaces it.
    pub(super) fn at_or_above(self, min: RawFd) -> io::Result<Binary> {
        Ok(Binary {
            fd: fcntl_dupfd_cloexec(&self.fd, min)?,
            script: self.script,
        })
    }
}

/// Whether the file open at `fd` (`O_PATH`) starts with `#!`. It is read through a second
/// descriptor opened by `/proc/self/fd`, which names that very file; a file that cannot be read
/// cannot be a script an interpreter runs, and counts as none.
fn starts_with_shebang(fd: &OwnedFd) -> bool {
    let Ok(file) = open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) else {
        return false;
    };
    let mut magic = [0u8; 2];
    matches!(rustix::io::pread(&file, &mut magic, 0), Ok(2)) && magic == *b"#!"
}

/// Whether `path` is a regular file this process may execute (for the `PATH` search).
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

/// The path to open for `cmd`: `cmd.binary` if it has a `/`, else the first executable file
/// of that name in the child's `PATH` (an empty entry is the current directory). It is checked
/// when opened ([`Binary::open`]).
pub(super) fn resolve_binary(cmd: &Command) -> io::Result<PathBuf> {
    let binary = &cmd.binary;
    if binary.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot spawn an empty binary path",
        ));
    }
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return Ok(binary.clone());
    }
    let path = cmd.child_var("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
            .join(binary)
        })
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "cannot spawn {}: no executable of that name in PATH={}",
                    binary.display(),
                    path.to_string_lossy()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{copy_exe, finish, set_mode};
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;
    use crate::sys::testutil::{root, TempDir};
    use std::net::TcpListener;

    /// The file is replaced (renamed over) after the spawn checked it and before the child
    /// execs: the child still runs the file that was checked, for a successor and for a cold
    /// start, with and without listeners.
    #[test]
    fn the_checked_binary_runs_though_replaced_after_the_check() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        for case in ["successor", "cold, no listeners", "cold, one listener"] {
            let dir = TempDir::new("spawn-swap");
            let daemon = dir.path().join("daemon");
            copy_exe("/bin/sh", &daemon, 0o755);
            let other = dir.path().join("other");
            std::fs::write(&other, "#!/bin/sh\necho replaced >\"$OUT\"\n").unwrap();
            set_mode(&other, 0o755);
            let out = dir.path().join("out");
            let cmd = Command::new(&daemon)
                .args(["-c", "echo checked >\"$OUT\""])
                .env("OUT", &out)
                .inherit_stdio(false);
            let (d, o) = (daemon.clone(), other.clone());
            AFTER_CHECK.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || std::fs::rename(&o, &d).unwrap()))
            });
            let (_ours, theirs) = socketpair_cloexec().unwrap();
            let child = match case {
                "successor" => spawn_successor(&cmd, theirs.as_fd()),
                "cold, no listeners" => spawn_with_listeners(&cmd, &[]),
                _ => spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
            }
            .unwrap();
            assert!(
                AFTER_CHECK.with(|h| h.borrow().is_none()),
                "{case}: hook not run"
            );
            // The rename did happen: the path names the other file now.
            assert!(!other.exists(), "{case}");
            assert_eq!(finish(child, &out), "checked\n", "{case}");
        }
    }

    /// A binary, or the directory it is in, that someone other than root or this process's
    /// user could write is refused, by every spawn function, before anything is spawned.
    #[test]
    fn writable_binaries_and_directories_are_refused() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (_ours, theirs) = socketpair_cloexec().unwrap();
        let dir = TempDir::new("spawn-writable");
        let sub = dir.path().join("bin");
        std::fs::create_dir(&sub).unwrap();
        set_mode(&sub, 0o755);
        let daemon = sub.join("daemon");
        copy_exe("/bin/sh", &daemon, 0o755);
        for (what, file_mode, dir_mode, named) in [
            ("group-writable binary", 0o775, 0o755, &daemon),
            ("world-writable binary", 0o757, 0o755, &daemon),
            ("group-writable directory", 0o755, 0o775, &sub),
            ("world-writable directory", 0o755, 0o757, &sub),
            ("sticky world-writable directory", 0o755, 0o1777, &sub),
        ] {
            set_mode(&daemon, file_mode);
            set_mode(&sub, dir_mode);
            let cmd = Command::new(&daemon)
                .args(["-c", "exit 0"])
                .inherit_stdio(false);
            let errors = [
                spawn_successor(&cmd, theirs.as_fd()),
                spawn_with_listeners(&cmd, &[]),
                spawn_with_listeners(&cmd, &[("http", tcp.as_fd())]),
            ];
            for r in errors {
                let e = match r {
                    Ok(mut child) => {
                        let _ = child.wait();
                        panic!("{what}: spawned");
                    }
                    Err(e) => e,
                };
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{what}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("writable"), "{what}: {msg}");
                assert!(msg.contains(&named.display().to_string()), "{what}: {msg}");
            }
        }
        // Back to 0755 and 0755: spawned.
        set_mode(&daemon, 0o755);
        set_mode(&sub, 0o755);
        let out = dir.path().join("out");
        let cmd = Command::new(&daemon)
            .args(["-c", "echo ok >\"$OUT\""])
            .env("OUT", &out)
            .inherit_stdio(false);
        assert_eq!(
            finish(spawn_with_listeners(&cmd, &[]).unwrap(), &out),
            "ok\n"
        );
    }

    /// A binary, or its directory, owned by a user other than root or this process's is
    /// refused, even with no write bit for group or others.
    #[test]
    fn binaries_owned_by_another_user_are_refused() {
        if !root(
            "binaries_owned_by_another_user_are_refused",
            "files chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("spawn-owner");
        let sub = dir.path().join("bin");
        std::fs::create_dir(&sub).unwrap();
        let daemon = sub.join("daemon");
        copy_exe("/bin/sh", &daemon, 0o755);
        let other = rustix::process::Uid::from_raw(4242);
        for (what, path) in [("binary", &daemon), ("directory", &sub)] {
            rustix::fs::chown(path.as_path(), Some(other), None).unwrap();
            let cmd = Command::new(&daemon)
                .args(["-c", "exit 0"])
                .inherit_stdio(false);
            let e = match spawn_with_listeners(&cmd, &[]) {
                Ok(mut child) => {
                    let _ = child.wait();
                    panic!("{what} owned by uid 4242: spawned");
                }
                Err(e) => e,
            };
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{what}: {e}");
            let msg = e.to_string();
            assert!(msg.contains("uid 4242"), "{what}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            rustix::fs::chown(path.as_path(), Some(rustix::process::Uid::ROOT), None).unwrap();
        }
    }
}
