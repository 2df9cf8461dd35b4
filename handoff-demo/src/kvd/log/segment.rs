//! The segment files: their names, who may own and read them (0700 directory, 0600 files,
//! never through a symbolic link), creating the next one, cutting one back to what is durable,
//! and the fingerprint of the sealed ones.

use super::record::{encode, Crc32, Record};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file name of segment `n`.
pub(super) fn segment_name(n: u64) -> String {
    format!("seg-{n}.log")
}

/// The segment number of a file name `seg-<n>.log`.
pub(super) fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments of `dir`, in order.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
            segments.push((n, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `O_NOFOLLOW`: a segment is never a symbolic link (one planted in the data directory would
/// have kvd, perhaps root, read or truncate whatever it points to).
pub(super) fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Create the data directory `dir` (and its missing parents) with mode 0700. An existing one
/// that others may read or write is tightened to 0700 if it is ours (kvd's effective user's),
/// with a log line; one that is not ours is left as it is, with a warning. The directory
/// itself may be a symbolic link: its path is the operator's.
pub fn create_data_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let context =
        |e: io::Error| io::Error::new(e.kind(), format!("data directory {}: {e}", dir.display()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(context)?;
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECTORY.bits() as i32)
        .open(dir)
        .map_err(context)?;
    let meta = handle.metadata().map_err(context)?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        crate::kvd::say(&format!(
            "warning: data directory {} has mode {mode:04o} and belongs to uid {}, not to \
             kvd's: left as it is (the segments in it are 0600)",
            dir.display(),
            meta.uid()
        ));
        return Ok(());
    }
    handle
        .set_permissions(fs::Permissions::from_mode(mode & !0o077))
        .map_err(context)?;
    crate::kvd::say(&format!(
        "data directory {} had mode {mode:04o}: tightened to {:04o}",
        dir.display(),
        mode & !0o077
    ));
    Ok(())
}

/// Open segment `path` for reading (or writing), without following a symbolic link, and check
/// it: a regular file of kvd's effective user, else an error. One that others may read or
/// write (an older kvd created them 0644) is tightened to 0600; whether it was.
pub(super) fn open_segment(path: &Path, write: bool) -> io::Result<(File, bool)> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(no_follow())
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let meta = file.metadata()?;
    let euid = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_file() || meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a regular file of uid {euid} (kvd's): a {:?} of uid {}",
                path.display(),
                meta.file_type(),
                meta.uid()
            ),
        ));
    }
    let loose = meta.mode() & 0o077 != 0;
    if loose {
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok((file, loose))
}

/// The segment being written.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) name: String,
    pub(super) file: Arc<File>,
    /// CRC-32 of every byte of the segment written so far.
    pub(super) crc: Crc32,
    /// `SET` records in it.
    pub(super) records: u64,
    /// Its length as of the last fdatasync that succeeded: what is on the disk. A failed
    /// write or fdatasync may leave more in the page cache (and perhaps nowhere else).
    pub(super) durable_len: u64,
}

/// Cut the segment of `active` back to its durable length, and fsync: after a failed write or
/// fdatasync, the bytes after it were never acknowledged, and may be in the page cache and
/// nowhere else (a failed writeback's pages can be clean in memory and absent on disk).
/// Reading them back would take them for durable records. Opened by name, not through the
/// descriptor that failed.
pub(super) fn cut_to_durable(dir: &Path, name: &str, durable_len: u64) -> io::Result<()> {
    let path = dir.join(name);
    let cut = || -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(no_follow())
            .open(&path)?;
        let len = file.metadata()?.len();
        if len < durable_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len} bytes, fewer than the {durable_len} known durable"),
            ));
        }
        file.set_len(durable_len)?;
        file.sync_all()
    };
    cut().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cutting {name} back to its durable length ({durable_len} bytes): {e}"),
        )
    })
}

/// Create segment `n`, starting after revision `base`: its header written and fsynced, the
/// directory too.
/// An error names the file (a header that does not fit on a full disk leaves an empty file,
/// which the next recovery removes).
pub(super) fn create_segment(dir: &Path, n: u64, base: u64) -> io::Result<Active> {
    let name = segment_name(n);
    let creating = |e: io::Error| io::Error::new(e.kind(), format!("creating {name}: {e}"));
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(&name))
        .map_err(creating)?;
    let mut header = Vec::new();
    encode(
        &Record::Header {
            segment: n,
            base_revision: base,
        },
        &mut header,
    );
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .and_then(|()| sync_dir(dir))
        .map_err(creating)?;
    let mut crc = Crc32::new();
    crc.update(&header);
    Ok(Active {
        name,
        file: Arc::new(file),
        crc,
        records: 0,
        durable_len: header.len() as u64,
    })
}

// ---------------------------------------------------------------------------------------
// The fingerprint.

/// FNV-1a's offset basis: the fingerprint of a log with no sealed segment.
pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The data-directory fingerprint after one more sealed segment: FNV-1a over each sealed
/// segment's file name and footer record, in order.
pub(super) fn fingerprint_with(fp: u64, name: &str, footer: &[u8]) -> u64 {
    fnv1a(fnv1a(fp, name.as_bytes()), footer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvd::log::testutil::seg;
    use crate::kvd::log::{recover, Wal};
    use crate::kvd::testutil::TempDir;

    /// A segment that is a symbolic link (planted in the data directory) is refused, not
    /// followed: recovery would otherwise read, and cut or seal, whatever it points to.
    #[test]
    fn a_segment_that_is_a_symbolic_link_is_refused() {
        let dir = TempDir::new("symlink");
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "1"), Ok(1));
        wal.seal().unwrap();
        drop(wal);
        let target = dir.path().join("precious");
        fs::write(&target, b"not a segment").unwrap();
        std::os::unix::fs::symlink(&target, seg(&dir, 2)).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(e.to_string().contains("seg-2.log"), "{e}");
        assert!(e.to_string().contains("symbolic links"), "{e}"); // ELOOP
        assert!(fs::symlink_metadata(seg(&dir, 2)).unwrap().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"not a segment");
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_number("seg-12.log"), Some(12));
        assert_eq!(segment_number(&segment_name(3)), Some(3));
        for bad in [
            "seg-.log",
            "seg-1.log.tmp",
            "seg-x.log",
            "seg--1.log",
            "handoff.lock",
        ] {
            assert_eq!(segment_number(bad), None, "{bad}");
        }
    }
}
