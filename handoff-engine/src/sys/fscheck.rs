//! Opening the files this layer trusts (the supervisor's journal, the supervisor lock, the
//! data-directory lock, the control socket's path) when the process may run as root.
//!
//! Every such file is reached relative to its directory, opened once and checked
//! ([`Dir::of`]): the directory must belong to this process's effective uid or to root, and
//! must not be writable by group or others unless it has the sticky bit. The file itself is
//! looked at with `lstat` before it is opened (so a FIFO or a device is never opened), opened
//! with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` (a symbolic link is refused, a FIFO swapped in
//! meanwhile cannot block), and checked again with `fstat` on the descriptor: a regular file,
//! owned by the effective uid, with no permission bit the caller forbids, and for some callers
//! a single link and a bounded size ([`Rules`]). A refusal is an [`Unsafe`] naming the file,
//! what is wrong and what to do; the file is left as it was.
//!
//! # What the directory rule buys
//!
//! Only a process that can write a directory can add, rename or remove its entries. In a
//! directory owned by this uid or root and writable by nobody else, no other user can plant or
//! swap anything, so a check on a name (`lstat`) followed by an operation on that name
//! (`rename`, `unlink`) cannot be raced by anyone but this uid and root. In a sticky directory
//! writable by everyone (`/tmp`), another user can create names that are free, but can rename
//! or remove only entries they own: they can occupy a name this process wants (which makes its
//! operation fail with a refusal naming the owner: a denial of service, nothing more), and the
//! only entries they can swap in between a check and an operation are their own. Files this
//! process then opens must be owned by it (checked on the descriptor), and files it creates are
//! created with `O_EXCL`.
//!
//! The directory's own path is resolved normally, following symbolic links (`/var/run` is one
//! on most systems, and a data directory may well be a link to another disk). Once opened, the
//! directory is used through its descriptor only, so a later change of the path cannot redirect
//! anything; a path redirected before the open can only lead to another directory that passes
//! the same rule, i.e. one in which no other user can place files.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

/// A file or directory refused because another user could control it, or because it is not
/// the kind of file expected. Carried inside an [`io::Error`] by the functions of this layer;
/// [`Unsafe::of`] finds it there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}; {fix}", path.display())]
#[non_exhaustive]
pub struct Unsafe {
    /// The file concerned (for a refused directory, the file wanted in it).
    pub path: PathBuf,
    /// What is wrong, for example "is a symbolic link, which is never followed".
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

impl Unsafe {
    pub(crate) fn new(path: &Path, problem: impl Into<String>, fix: impl Into<String>) -> Unsafe {
        Unsafe {
            path: path.to_path_buf(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// The refusal `e` carries, if it carries one.
    pub fn of(e: &io::Error) -> Option<&Unsafe> {
        e.get_ref()?.downcast_ref()
    }

    /// As an [`io::Error`] of kind `kind`.
    pub(crate) fn into_io(self, kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, self)
    }
}

impl From<Unsafe> for io::Error {
    fn from(u: Unsafe) -> io::Error {
        u.into_io(io::ErrorKind::PermissionDenied)
    }
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// "a FIFO", "a directory", …: what `st` is, for messages.
pub(crate) fn kind(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        _ => "a file of unknown type",
    }
}

pub(crate) fn is(st: &Stat, ty: FileType) -> bool {
    FileType::from_raw_mode(st.st_mode) == ty
}

/// A directory opened (`O_PATH`) and checked: owned by this process's effective uid or by
/// root, and not writable by group or others unless it has the sticky bit.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// The directory `file` is in, opened and checked, and `file`'s name in it. `NotFound` if
    /// the directory does not exist; `InvalidInput` if `file` has no file name (`/`, `..`).
    /// A refused directory is an [`Unsafe`] naming `file`.
    pub(crate) fn of(file: &Path) -> io::Result<(Dir, &OsStr)> {
        let name = file.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", file.display()),
            )
        })?;
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let fd = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        let me = euid();
        let mode = st.st_mode & 0o7777;
        if st.st_uid != me && st.st_uid != 0 {
            return Err(Unsafe::new(
                file,
                format!(
                    "its directory {} is owned by uid {}, neither this process's (uid {me}) \
                     nor root's, so that user could replace what is in it",
                    dir.display(),
                    st.st_uid
                ),
                format!(
                    "use a directory of uid {me} or root (chown {me} {})",
                    dir.display()
                ),
            )
            .into());
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(Unsafe::new(
                file,
                format!(
                    "its directory {} is writable by group or others (mode {mode:04o}) without \
                     the sticky bit, so another user could replace what is in it",
                    dir.display()
                ),
                format!("chmod go-w {}", dir.display()),
            )
            .into());
        }
        Ok((
            Dir {
                fd,
                path: dir.to_path_buf(),
            },
            name,
        ))
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `lstat` of `name` in this directory; `None` if there is no such entry.
    pub(crate) fn stat(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `<this directory>/<name>`, for messages.
    pub(crate) fn join(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    /// Remove the entry `name` if it is ours and not a directory (`unlinkat`, which never
    /// follows a link: whatever a link or a second hard link points to is untouched). An
    /// entry of another uid, or a directory, is refused. `Ok` if there is no such entry.
    pub(crate) fn remove_ours(&self, name: &OsStr, what: &str) -> io::Result<()> {
        let Some(st) = self.stat(name)? else {
            return Ok(());
        };
        let path = self.join(name);
        if is(&st, FileType::Directory) {
            return Err(Unsafe::new(
                &path,
                format!("is a directory, where {what} goes"),
                "remove it",
            )
            .into());
        }
        if st.st_uid != euid() {
            return Err(Unsafe::new(
                &path,
                format!(
                    "is owned by uid {}, not by this process (uid {}); it is left alone",
                    st.st_uid,
                    euid()
                ),
                format!("remove it, it is {what}"),
            )
            .into());
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// What a file must be besides a regular file owned by this process's effective uid.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    /// Permission bits it must not have: `0o022` (nobody else may write it) or `0o077`
    /// (nobody else may even open it).
    pub(crate) forbidden_mode: u32,
    /// Largest size accepted.
    pub(crate) max_len: Option<u64>,
    /// Whether a second hard link is refused (for a file written in place: writing through
    /// another name would change another file).
    pub(crate) single_link: bool,
    /// What another user could do with a file of a forbidden mode, for the message: "lock it
    /// and so block every handoff".
    pub(crate) others_could: &'static str,
    /// What removing the file does, appended to "remove it" in the fixes: for example
    /// " (it is recreated)".
    pub(crate) after_remove: &'static str,
}

impl Rules {
    /// Check `st`, the status of the file at `path`.
    pub(crate) fn check(&self, path: &Path, st: &Stat) -> Result<(), Unsafe> {
        let me = euid();
        let p = path.display();
        let after = self.after_remove;
        if !is(st, FileType::RegularFile) {
            let problem = if is(st, FileType::Symlink) {
                "is a symbolic link, which is never followed".to_string()
            } else {
                format!("is {}, not a regular file", kind(st))
            };
            return Err(Unsafe::new(path, problem, format!("remove it{after}")));
        }
        let mode = st.st_mode & 0o7777;
        if st.st_uid != me {
            return Err(Unsafe::new(
                path,
                format!(
                    "is owned by uid {}, not by this process (uid {me}) (mode {mode:04o})",
                    st.st_uid
                ),
                format!("chown {me} {p}, or remove it{after}"),
            ));
        }
        if mode & self.forbidden_mode != 0 {
            let allowed = 0o777 & !self.forbidden_mode;
            let could = self.others_could;
            let problem = if self.forbidden_mode & 0o044 != 0 {
                format!("can be opened by group or others (mode {mode:04o}), who could {could}")
            } else {
                format!("is writable by group or others (mode {mode:04o}), who could {could}")
            };
            return Err(Unsafe::new(
                path,
                problem,
                format!("chmod {:o} {p}, or remove it{after}", mode & allowed),
            ));
        }
        if self.single_link && st.st_nlink != 1 {
            return Err(Unsafe::new(
                path,
                format!(
                    "has {} links (another name for the same file exists), so writing it \
                     would change that file too",
                    st.st_nlink
                ),
                format!("remove this name{after}"),
            ));
        }
        if let Some(max) = self.max_len {
            let len = u64::try_from(st.st_size).unwrap_or(u64::MAX);
            if len > max {
                return Err(Unsafe::new(
                    path,
                    format!("is {len} bytes, larger than it can be ({max} bytes at most)"),
                    format!("remove it{after}"),
                ));
            }
        }
        Ok(())
    }
}

/// The error of `open(2)` with `O_NOFOLLOW` on the entry at `path`: a symbolic link (`ELOOP`)
/// is a refusal, anything else stays an I/O error.
pub(crate) fn open_error(path: &Path, e: Errno, rules: &Rules) -> io::Error {
    if e == Errno::LOOP {
        return Unsafe::new(
            path,
            "is a symbolic link, which is never followed",
            format!("remove it{}", rules.after_remove),
        )
        .into();
    }
    e.into()
}

/// Open the file at `path` read-write for a `flock`, creating it (mode 0600) if it is missing:
/// reached through its directory, opened and checked ([`Dir::of`]); an existing entry is
/// checked against `rules` before it is opened (a FIFO or a device is never opened), the open
/// never follows a link nor blocks (`O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`, close-on-exec), and
/// the descriptor is checked against `rules` again. The descriptor and its status.
pub(crate) fn open_or_create(path: &Path, rules: &Rules) -> io::Result<(OwnedFd, Stat)> {
    let (dir, name) = Dir::of(path)?;
    if let Some(st) = dir.stat(name)? {
        rules.check(path, &st)?;
    }
    let fd = rustix::fs::openat(
        dir.fd(),
        name,
        OFlags::RDWR
            | OFlags::CREATE
            | OFlags::CLOEXEC
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::NOCTTY,
        Mode::RUSR | Mode::WUSR,
    )
    .map_err(|e| open_error(path, e, rules))?;
    let st = rustix::fs::fstat(&fd)?;
    rules.check(path, &st)?;
    Ok((fd, st))
}

/// Open the existing file `name` of `dir` for reading, checked against `rules` before and
/// after the open: `None` if there is no such file. Never blocks on a FIFO, never opens a
/// device or follows a link.
pub(crate) fn open_read(dir: &Dir, name: &OsStr, rules: &Rules) -> io::Result<Option<File>> {
    let path = dir.join(name);
    let Some(before) = dir.stat(name)? else {
        return Ok(None);
    };
    rules.check(&path, &before)?;
    let fd = match rustix::fs::openat(
        dir.fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(open_error(&path, e, rules)),
    };
    let st = rustix::fs::fstat(&fd)?;
    rules.check(&path, &st)?;
    if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino) {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("{} was replaced while it was opened", path.display()),
        ));
    }
    Ok(Some(File::from(fd)))
}

/// Read all of `file`, the file at `path`, refusing more than `rules.max_len` bytes (the file
/// may have grown since it was checked).
pub(crate) fn read_bounded(file: File, path: &Path, rules: &Rules) -> io::Result<Vec<u8>> {
    let max = rules.max_len.unwrap_or(u64::MAX - 1);
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Unsafe::new(
            path,
            format!("is larger than it can be ({max} bytes at most)"),
            format!("remove it{}", rules.after_remove),
        )
        .into());
    }
    Ok(bytes)
}
