//! The data directory: an append-only log in segments, written with group commit.
//!
//! # On disk
//!
//! The log is a sequence of segment files `seg-<n>.log` (`n` = 1, 2, …, read in numeric
//! order; numbers may have gaps). A segment is a sequence of self-delimiting records:
//!
//! ```text
//! record  := len:u32le  crc:u32le  body[len]          crc = CRC-32 (IEEE) of body
//! body    := 'H' segment:u64le base_revision:u64le    header, first record of every segment
//!          | 'S' revision:u64le key_len:u32le key value   one SET (key and value UTF-8)
//!          | 'F' records:u64le last_revision:u64le checksum:u32le
//!                                                      footer: the segment is sealed
//! ```
//!
//! Revisions count `SET`s over the whole log: each `S` record carries the previous one's plus
//! one, a header carries the revision before its segment's first record, and a footer the
//! number of `S` records of its segment, the last revision, and the CRC-32 of every byte of the
//! segment before the footer. A sealed segment ends with its footer.
//!
//! # Recovery
//!
//! [`recover`] replays every segment in order and rebuilds the map. Every segment but the last
//! must be sealed and verify completely (frame checksums, revision chain, header, footer);
//! anything else is an error that names the file and offset, and nothing is changed. The last
//! segment may be unsealed (the process writing it died), and end with a torn write: from the
//! first record that is cut short, zeroed or fails its checksum, with no valid record after it
//! (every byte offset is tried), the tail is a batch that was never acknowledged (it was not
//! fsynced), and is truncated away. A bad record that a valid one follows is corruption (the
//! bad one was fsynced before the valid one was written): an error naming the file and the
//! offset, and nothing is changed. Recovery then seals that segment, even with no `SET` in it,
//! so that every segment on disk is sealed and the writer opens a new one. It never deletes a
//! segment: only a file without even a valid header (its creation failed) is removed.
//!
//! # Group commit
//!
//! [`Wal::set`] appends its record to the batch in memory and waits. One committer thread
//! writes the whole batch (one `write_all`), fsyncs once, applies the batch to the map (so a
//! `GET` never sees a value that is not durable) and wakes the writers whose records it
//! covered. Many concurrent writers therefore share one fsync, and none is acknowledged before
//! the fsync that covers its record returned.
//!
//! A failed write or fdatasync fails its batch and every write after it until the log is
//! sealed or reopened. The segment is cut back at once (and again by the seal or reopen) to
//! its length as of the last fdatasync that succeeded, before anything reads it again: the
//! failed batch may be in the page cache and nowhere on the disk.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

const KIND_HEADER: u8 = b'H';
const KIND_SET: u8 = b'S';
const KIND_FOOTER: u8 = b'F';
/// `len` and `crc`.
const FRAME: usize = 8;
/// The largest body a record may have (a bigger length is garbage).
const MAX_BODY: usize = 1 << 24;

// ---------------------------------------------------------------------------------------
// Checksums.

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, the one of zlib and Ethernet), computed incrementally.
#[derive(Clone, Copy, Debug)]
struct Crc32(u32);

impl Crc32 {
    fn new() -> Crc32 {
        Crc32(!0)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = CRC_TABLE[((self.0 ^ u32::from(b)) & 0xff) as usize] ^ (self.0 >> 8);
        }
    }

    fn value(self) -> u32 {
        !self.0
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.value()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The data-directory fingerprint after one more sealed segment: FNV-1a over each sealed
/// segment's file name and footer record, in order.
fn fingerprint_with(fp: u64, name: &str, footer: &[u8]) -> u64 {
    fnv1a(fnv1a(fp, name.as_bytes()), footer)
}

// ---------------------------------------------------------------------------------------
// Records.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Record<'a> {
    Header {
        segment: u64,
        base_revision: u64,
    },
    Set {
        revision: u64,
        key: &'a str,
        value: &'a str,
    },
    Footer {
        records: u64,
        last_revision: u64,
        checksum: u32,
    },
}

fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    match record {
        Record::Header {
            segment,
            base_revision,
        } => {
            out.push(KIND_HEADER);
            out.extend_from_slice(&segment.to_le_bytes());
            out.extend_from_slice(&base_revision.to_le_bytes());
        }
        Record::Set {
            revision,
            key,
            value,
        } => {
            out.push(KIND_SET);
            out.extend_from_slice(&revision.to_le_bytes());
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        Record::Footer {
            records,
            last_revision,
            checksum,
        } => {
            out.push(KIND_FOOTER);
            out.extend_from_slice(&records.to_le_bytes());
            out.extend_from_slice(&last_revision.to_le_bytes());
            out.extend_from_slice(&checksum.to_le_bytes());
        }
    }
    let body = start + FRAME;
    let len = (out.len() - body) as u32;
    let crc = crc32(&out[body..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..body].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at some offset are not a record.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bad {
    /// The file ends inside the record.
    Short,
    /// The record is whole but not valid (its checksum, its length, its body).
    Corrupt(String),
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bad::Short => f.write_str("record cut short"),
            Bad::Corrupt(why) => f.write_str(why),
        }
    }
}

/// The record at the start of `buf`, and its size.
fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), Bad> {
    if buf.len() < FRAME {
        return Err(Bad::Short);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_BODY {
        return Err(Bad::Corrupt(format!("invalid record length {len}")));
    }
    let Some(body) = buf.get(FRAME..FRAME + len) else {
        return Err(Bad::Short);
    };
    if crc32(body) != crc {
        return Err(Bad::Corrupt("checksum mismatch".into()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let bad = |what: &str| Bad::Corrupt(format!("malformed {what} record"));
    let record = match (body[0], body.len()) {
        (KIND_HEADER, 17) => Record::Header {
            segment: u64_at(1),
            base_revision: u64_at(9),
        },
        (KIND_FOOTER, 21) => Record::Footer {
            records: u64_at(1),
            last_revision: u64_at(9),
            checksum: u32::from_le_bytes(body[17..21].try_into().expect("4 bytes")),
        },
        (KIND_SET, n) if n >= 13 => {
            let key_len = u32::from_le_bytes(body[9..13].try_into().expect("4 bytes")) as usize;
            let rest = &body[13..];
            if key_len > rest.len() {
                return Err(bad("SET"));
            }
            let (key, value) = rest.split_at(key_len);
            Record::Set {
                revision: u64_at(1),
                key: std::str::from_utf8(key).map_err(|_| bad("SET"))?,
                value: std::str::from_utf8(value).map_err(|_| bad("SET"))?,
            }
        }
        (KIND_HEADER, _) => return Err(bad("header")),
        (KIND_FOOTER, _) => return Err(bad("footer")),
        (KIND_SET, _) => return Err(bad("SET")),
        (kind, _) => return Err(Bad::Corrupt(format!("unknown record kind {kind:#04x}"))),
    };
    Ok((record, FRAME + len))
}

// ---------------------------------------------------------------------------------------
// Segments and recovery.

fn segment_name(n: u64) -> String {
    format!("seg-{n}.log")
}

/// The segment number of a file name `seg-<n>.log`.
fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segments of `dir`, in order.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `O_NOFOLLOW`: a segment is never a symbolic link (one planted in the data directory would
/// have kvd, perhaps root, read or truncate whatever it points to).
fn no_follow() -> i32 {
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
fn open_segment(path: &Path, write: bool) -> io::Result<(File, bool)> {
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

fn corrupt(path: &Path, offset: usize, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} at offset {offset}: {why}", path.display()),
    )
}

/// The offset of the first valid record at or after `from` that may follow others in a
/// segment (a `SET` or a footer), if any: every byte offset is tried.
fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&at| {
        let rest = &bytes[at..];
        // Cheap tests first: a plausible length that fits, and a kind.
        let plausible = rest.len() > FRAME && {
            let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            (1..=MAX_BODY).contains(&len)
                && len <= rest.len() - FRAME
                && matches!(rest[FRAME], KIND_SET | KIND_FOOTER)
        };
        plausible && decode(rest).is_ok()
    })
}

/// What [`recover`] found.
#[derive(Debug)]
pub struct Recovered {
    /// The key-value map the log implies.
    pub map: HashMap<String, String>,
    /// The last revision in the log (0 for an empty log).
    pub revision: u64,
    /// The fingerprint of the sealed segments (all of them, after recovery).
    pub fingerprint: u64,
    /// The number for the next segment.
    pub next_segment: u64,
    /// What recovery had to repair in the last segment, for the log line.
    pub repaired: Option<String>,
}

/// Replay the log in `dir` (see the module docs): verify the sealed segments, cut the torn
/// tail of an unsealed last segment and seal it (or remove it if it holds no `SET`).
pub fn recover(dir: &Path) -> io::Result<Recovered> {
    let segments = list_segments(dir)?;
    let mut map = HashMap::new();
    let mut revision = 0u64;
    let mut fingerprint = FNV_OFFSET;
    let mut repaired = None;
    let mut next_segment = 1;
    let mut tightened = Vec::new();
    for (i, (n, path)) in segments.iter().enumerate() {
        next_segment = n + 1;
        let last = i + 1 == segments.len();
        let bytes = {
            let (mut file, loose) = open_segment(path, false)?;
            if loose {
                tightened.push(segment_name(*n));
            }
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut file, &mut bytes)?;
            bytes
        };
        let mut offset = 0;
        let mut sets = 0u64;
        let mut crc = Crc32::new();
        let mut footer = None;
        let mut torn = None;
        while offset < bytes.len() {
            let (record, used) = match decode(&bytes[offset..]) {
                Ok(r) => r,
                Err(bad) => {
                    torn = Some(bad);
                    break;
                }
            };
            match record {
                Record::Header {
                    segment,
                    base_revision,
                } if offset == 0 => {
                    if segment != *n || base_revision != revision {
                        return Err(corrupt(
                            path,
                            offset,
                            format!(
                                "header says segment {segment} from revision {base_revision}, \
                                 expected segment {n} from revision {revision}"
                            ),
                        ));
                    }
                }
                Record::Set {
                    revision: r,
                    key,
                    value,
                } if offset > 0 => {
                    if r != revision + 1 {
                        return Err(corrupt(
                            path,
                            offset,
                            format!("revision {r} follows revision {revision}"),
                        ));
                    }
                    revision = r;
                    sets += 1;
                    map.insert(key.to_string(), value.to_string());
                }
                Record::Footer {
                    records,
                    last_revision,
                    checksum,
                } if offset > 0 => {
                    let ok = records == sets
                        && last_revision == revision
                        && checksum == crc.value()
                        && offset + used == bytes.len();
                    if !ok {
                        return Err(corrupt(
                            path,
                            offset,
                            format!(
                                "footer ({records} records up to revision {last_revision}, \
                                 checksum {checksum:#010x}) does not match the segment \
                                 ({sets} records up to revision {revision}, checksum {:#010x}, \
                                 {} bytes after the footer)",
                                crc.value(),
                                bytes.len() - offset - used
                            ),
                        ));
                    }
                    footer = Some(&bytes[offset..offset + used]);
                }
                other => {
                    return Err(corrupt(path, offset, format!("unexpected {other:?}")));
                }
            }
            crc.update(&bytes[offset..offset + used]);
            offset += used;
        }
        let name = segment_name(*n);
        if let Some(footer) = footer {
            fingerprint = fingerprint_with(fingerprint, &name, footer);
            continue;
        }
        // Unsealed: only the last segment may be (its writer died), and only its tail may be
        // bad.
        if !last {
            let why = torn.map_or_else(|| "not sealed".to_string(), |b| b.to_string());
            return Err(corrupt(path, offset, why));
        }
        let mut what = Vec::new();
        if let Some(bad) = &torn {
            // A crash tears only the batch being written, the end of the file: a record cut
            // short, zeros, garbage. A valid record after the bad one means the bad one was
            // written, and fsynced, before it: corruption. Cutting there would lose every
            // record after it, acknowledged writes among them.
            if let Some(at) = next_valid_record(&bytes, offset + 1) {
                return Err(corrupt(
                    path,
                    offset,
                    format!(
                        "{bad}, and a valid record follows at offset {at}: the segment is \
                         corrupt, not torn by a crash; it was left as it is"
                    ),
                ));
            }
            what.push(format!(
                "dropped a torn tail of {} bytes at offset {offset} ({bad})",
                bytes.len() - offset
            ));
        }
        if offset == 0 {
            // Not even a header: creating the segment failed (on a full disk, say). It holds
            // nothing, and its number is used again.
            fs::remove_file(path)?;
            sync_dir(dir)?;
            next_segment = *n;
            what.push(format!("removed {name}, which held no record"));
        } else {
            let (file, _) = open_segment(path, true)?;
            file.set_len(offset as u64)?;
            let mut record = Vec::new();
            encode(
                &Record::Footer {
                    records: sets,
                    last_revision: revision,
                    checksum: crc.value(),
                },
                &mut record,
            );
            std::os::unix::fs::FileExt::write_all_at(&file, &record, offset as u64)?;
            file.sync_all()?;
            fingerprint = fingerprint_with(fingerprint, &name, &record);
            what.push(format!(
                "sealed {name} ({sets} records up to revision {revision})"
            ));
        }
        repaired = Some(what.join("; "));
    }
    if let (Some(first), Some(last)) = (tightened.first(), tightened.last()) {
        let which = if first == last {
            first.clone()
        } else {
            format!("{} of them, {first} to {last}", tightened.len())
        };
        crate::kvd::say(&format!(
            "tightened segments that others could read or write to 0600 ({which})"
        ));
    }
    Ok(Recovered {
        map,
        revision,
        fingerprint,
        next_segment,
        repaired,
    })
}

/// The segment being written.
#[derive(Debug)]
struct Active {
    name: String,
    file: Arc<File>,
    /// CRC-32 of every byte of the segment written so far.
    crc: Crc32,
    /// `SET` records in it.
    records: u64,
    /// Its length as of the last fdatasync that succeeded: what is on the disk. A failed
    /// write or fdatasync may leave more in the page cache (and perhaps nowhere else).
    durable_len: u64,
}

/// Cut the segment of `active` back to its durable length, and fsync: after a failed write or
/// fdatasync, the bytes after it were never acknowledged, and may be in the page cache and
/// nowhere else (a failed writeback's pages can be clean in memory and absent on disk).
/// Reading them back would take them for durable records. Opened by name, not through the
/// descriptor that failed.
fn cut_to_durable(dir: &Path, name: &str, durable_len: u64) -> io::Result<()> {
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
fn create_segment(dir: &Path, n: u64, base: u64) -> io::Result<Active> {
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
// The writer.

/// Why a `SET` was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetError {
    /// A handoff is in progress: the write was not applied; send it again.
    Retry,
    /// Writing the log failed; no write is accepted until the log is reopened.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    /// Accepting writes.
    Open,
    /// Drained: writes are refused, the segment is not sealed yet.
    Frozen,
    /// The active segment is sealed and closed.
    Sealed,
    /// A write or fsync failed: no write until reopened.
    Failed(String),
}

/// Counters, for tests and the log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches written and fsynced.
    pub fsyncs: u64,
    /// `SET` records made durable.
    pub records: u64,
}

/// What [`Wal::seal`] left on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The last revision.
    pub revision: u64,
    /// The fingerprint of all sealed segments.
    pub fingerprint: u64,
}

/// The open log: the map, the active segment and the committer thread.
#[derive(Debug)]
pub struct Wal {
    shared: Arc<Shared>,
    committer: Option<thread::JoinHandle<()>>,
}

/// A test's hook into the committer.
#[cfg(test)]
type SyncHook = Arc<dyn Fn(usize) + Send + Sync>;

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// The committer waits here for records (and for shutdown).
    work: Condvar,
    /// Writers wait here for their fsync; seal and reopen for quiet.
    done: Condvar,
    /// Test hook: called by the committer before each fsync, with the batch's record count.
    #[cfg(test)]
    before_sync: Mutex<Option<SyncHook>>,
    /// Test fault: the next fdatasync fails with this errno (after its batch was written).
    #[cfg(test)]
    sync_fault: Mutex<Option<i32>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("dir", &self.dir).finish()
    }
}

#[derive(Debug)]
struct State {
    mode: Mode,
    active: Option<Active>,
    map: HashMap<String, String>,
    /// The last revision given to a `SET`.
    assigned: u64,
    /// The last revision fsynced and applied to `map`.
    durable: u64,
    /// Encoded records waiting for the committer, and what they set.
    batch: Vec<u8>,
    batch_sets: Vec<(u64, String, String)>,
    /// The committer is writing a batch (outside the lock).
    committing: bool,
    /// Writers waiting for their fsync.
    waiters: usize,
    fingerprint: u64,
    stats: Stats,
    shutdown: bool,
}

impl State {
    /// Nothing in flight: no batch, no commit, no writer waiting.
    fn quiet(&self) -> bool {
        self.batch.is_empty() && !self.committing && self.waiters == 0
    }
}

impl Wal {
    /// Recover the log in `dir` (see [`recover`]), open a new segment, start the committer.
    pub fn open(dir: &Path) -> io::Result<Wal> {
        let recovered = recover(dir)?;
        let active = create_segment(dir, recovered.next_segment, recovered.revision)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                mode: Mode::Open,
                active: Some(active),
                map: recovered.map,
                assigned: recovered.revision,
                durable: recovered.revision,
                batch: Vec::new(),
                batch_sets: Vec::new(),
                committing: false,
                waiters: 0,
                fingerprint: recovered.fingerprint,
                stats: Stats::default(),
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            #[cfg(test)]
            before_sync: Mutex::new(None),
            #[cfg(test)]
            sync_fault: Mutex::new(None),
        });
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let committer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("kvd-committer".into())
                .spawn(move || shared.commit_loop())?
        };
        Ok(Wal {
            shared,
            committer: Some(committer),
        })
    }

    /// Append `SET key value`; its revision once the fsync covering it returned.
    pub fn set(&self, key: &str, value: &str) -> Result<u64, SetError> {
        let sh = &self.shared;
        let mut s = sh.lock();
        match &s.mode {
            Mode::Open => {}
            Mode::Frozen | Mode::Sealed => return Err(SetError::Retry),
            Mode::Failed(e) => return Err(SetError::Failed(e.clone())),
        }
        let revision = s.assigned + 1;
        s.assigned = revision;
        encode(
            &Record::Set {
                revision,
                key,
                value,
            },
            &mut s.batch,
        );
        s.batch_sets
            .push((revision, key.to_string(), value.to_string()));
        sh.work.notify_one();
        s.waiters += 1;
        let result = loop {
            if s.durable >= revision {
                break Ok(revision);
            }
            if let Mode::Failed(e) = &s.mode {
                break Err(SetError::Failed(e.clone()));
            }
            s = sh.done.wait(s).unwrap_or_else(|p| p.into_inner());
        };
        s.waiters -= 1;
        sh.done.notify_all();
        result
    }

    /// The value of `key`, as of the last fsync.
    pub fn get(&self, key: &str) -> Option<String> {
        self.shared.lock().map.get(key).cloned()
    }

    /// The last durable revision.
    pub fn revision(&self) -> u64 {
        self.shared.lock().durable
    }

    /// The fingerprint of the sealed segments.
    pub fn fingerprint(&self) -> u64 {
        self.shared.lock().fingerprint
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats
    }

    /// Refuse writes from now on ([`SetError::Retry`]); the ones already queued commit.
    pub fn freeze(&self) {
        let mut s = self.shared.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Frozen;
        }
    }

    /// Wait until no write is in flight (queued, being committed or waiting for its
    /// acknowledgement), or `deadline`; whether it is so.
    pub fn wait_quiet(&self, deadline: Instant) -> bool {
        let sh = &self.shared;
        let mut s = sh.lock();
        while !s.quiet() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = sh
                .done
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Freeze, wait for the writes in flight, write the active segment's footer, fsync and
    /// close it. Nothing is written after this until [`reopen`](Self::reopen). A failed log is
    /// sealed by recovery (see `seal_failed`).
    pub fn seal(&self) -> io::Result<Sealed> {
        let sh = &self.shared;
        let mut s = sh.lock();
        match &s.mode {
            Mode::Open => s.mode = Mode::Frozen,
            Mode::Frozen => {}
            Mode::Sealed => {
                return Ok(Sealed {
                    revision: s.durable,
                    fingerprint: s.fingerprint,
                })
            }
            Mode::Failed(_) => {
                drop(s);
                return self.seal_failed();
            }
        }
        s = sh.wait_quiet(s);
        if let Mode::Failed(_) = &s.mode {
            // The last batch failed while we waited: the segment may end with part of it.
            drop(s);
            return self.seal_failed();
        }
        let active = s
            .active
            .take()
            .ok_or_else(|| io::Error::other("no active segment"))?;
        let revision = s.durable;
        drop(s); // GETs go on meanwhile; nothing else touches the log while frozen
        let mut footer = Vec::new();
        encode(
            &Record::Footer {
                records: active.records,
                last_revision: revision,
                checksum: active.crc.value(),
            },
            &mut footer,
        );
        let written = (&*active.file)
            .write_all(&footer)
            .and_then(|()| active.file.sync_all())
            .and_then(|()| sync_dir(&sh.dir));
        let mut s = sh.lock();
        if let Err(e) = written {
            let why = format!("sealing {}: {e}", active.name);
            s.mode = Mode::Failed(why.clone());
            // Kept, with its durable length: the footer may be in the page cache only.
            s.active = Some(active);
            return Err(io::Error::new(e.kind(), why));
        }
        s.fingerprint = fingerprint_with(s.fingerprint, &active.name, &footer);
        s.mode = Mode::Sealed;
        Ok(Sealed {
            revision,
            fingerprint: s.fingerprint,
        })
    }

    /// Seal a log whose write failed (a full disk, say): cut the active segment back to its
    /// durable length (see [`cut_to_durable`]), then recover from disk the way a successor
    /// would open it, which writes the footer. The writes of the failed batch were not
    /// acknowledged, and none of them is kept. If this fails too (the disk is still full), the
    /// log stays failed and the error says why.
    fn seal_failed(&self) -> io::Result<Sealed> {
        let sh = &self.shared;
        drop(sh.wait_quiet(sh.lock()));
        sh.cut_active_to_durable()
            .map_err(|e| io::Error::new(e.kind(), format!("sealing the failed log: {e}")))?;
        drop(sh.lock().active.take());
        let recovered = recover(&sh.dir).map_err(|e| {
            io::Error::new(e.kind(), format!("sealing the failed log by recovery: {e}"))
        })?;
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let mut s = sh.lock();
        s.map = recovered.map;
        s.assigned = recovered.revision;
        s.durable = recovered.revision;
        s.fingerprint = recovered.fingerprint;
        s.mode = Mode::Sealed;
        Ok(Sealed {
            revision: recovered.revision,
            fingerprint: recovered.fingerprint,
        })
    }

    /// After a handoff was rolled back (or the log failed): close the active segment if any,
    /// recover from disk, open a new segment and accept writes again. If that fails (a full
    /// disk), the log is left failed: writes are answered with this error (not `retry`), reads
    /// go on, and a later seal or reopen tries again.
    pub fn reopen(&self) -> io::Result<()> {
        let sh = &self.shared;
        let mut s = sh.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Frozen;
        }
        s = sh.wait_quiet(s);
        let failed = matches!(s.mode, Mode::Failed(_));
        if !failed {
            drop(s.active.take());
        }
        drop(s);
        let cut = if failed {
            sh.cut_active_to_durable()
                .map(|_| drop(sh.lock().active.take()))
        } else {
            Ok(())
        };
        let opened = cut.and_then(|()| recover(&sh.dir)).and_then(|recovered| {
            let active = create_segment(&sh.dir, recovered.next_segment, recovered.revision)?;
            Ok((recovered, active))
        });
        let (recovered, active) = match opened {
            Ok(o) => o,
            Err(e) => {
                sh.lock().mode = Mode::Failed(format!("reopening the log: {e}"));
                sh.done.notify_all();
                return Err(e);
            }
        };
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let mut s = sh.lock();
        s.active = Some(active);
        s.map = recovered.map;
        s.assigned = recovered.revision;
        s.durable = recovered.revision;
        s.fingerprint = recovered.fingerprint;
        s.mode = Mode::Open;
        Ok(())
    }

    /// Call `hook` in the committer before each fsync, with the batch's record count.
    #[cfg(test)]
    pub(crate) fn set_before_sync(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        *self.shared.before_sync.lock().unwrap() = Some(Arc::new(hook));
    }

    /// Make the next fdatasync fail with `errno`, as a disk's error would: the batch is
    /// written (to the page cache), the sync then fails.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&self, errno: i32) {
        *self.shared.sync_fault.lock().unwrap() = Some(errno);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_quiet<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while !s.quiet() {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// If there is an active segment, cut it back to its durable length (see
    /// [`cut_to_durable`]); that length. The segment stays active, so that a cut that failed
    /// is tried again; the seal or reopen that follows closes it. Called with no write in
    /// flight: the log failed, so nothing is queued, and nothing is being committed.
    fn cut_active_to_durable(&self) -> io::Result<u64> {
        let Some((name, durable_len)) = self
            .lock()
            .active
            .as_ref()
            .map(|a| (a.name.clone(), a.durable_len))
        else {
            return Ok(0);
        };
        cut_to_durable(&self.dir, &name, durable_len)?;
        Ok(durable_len)
    }

    /// The committer: take the whole batch, write it, fsync once, apply, wake its writers.
    fn commit_loop(&self) {
        let mut s = self.lock();
        loop {
            while s.batch.is_empty() && !s.shutdown {
                s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.batch.is_empty() {
                return; // shut down
            }
            let batch = std::mem::take(&mut s.batch);
            let sets = std::mem::take(&mut s.batch_sets);
            let Some(file) = s.active.as_ref().map(|a| Arc::clone(&a.file)) else {
                s.mode = Mode::Failed("no active segment".into());
                self.done.notify_all();
                continue;
            };
            s.committing = true;
            drop(s);
            #[cfg(test)]
            {
                let hook = self.before_sync.lock().unwrap().clone();
                if let Some(hook) = hook {
                    hook(sets.len());
                }
            }
            let written = (&*file).write_all(&batch).and_then(|()| {
                #[cfg(test)]
                if let Some(errno) = self.sync_fault.lock().unwrap().take() {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                file.sync_data()
            });
            // A failed batch is cut off before anyone learns of the failure (still
            // `committing`: a seal or reopen waits), so that no reader, and no recovery after
            // a crash, finds it in the page cache.
            let cut = written.is_err().then(|| self.cut_active_to_durable());
            s = self.lock();
            s.committing = false;
            match (written, cut) {
                (Ok(()), _) => {
                    let active = s.active.as_mut().expect("not closed while committing");
                    active.crc.update(&batch);
                    active.records += sets.len() as u64;
                    active.durable_len += batch.len() as u64;
                    s.stats.fsyncs += 1;
                    s.stats.records += sets.len() as u64;
                    for (revision, key, value) in sets {
                        s.map.insert(key, value);
                        s.durable = revision;
                    }
                }
                (Err(e), cut) => {
                    // No more writes until the segment is sealed or reopened (which cut it
                    // again, had this cut failed). What was queued behind this batch fails
                    // too.
                    let name = s.active.as_ref().map_or("?", |a| &a.name).to_string();
                    crate::kvd::say(&match cut {
                        Some(Err(cut)) => format!("writing {name} failed: {e}; {cut}"),
                        _ => format!("writing {name} failed: {e}; cut back to what is durable"),
                    });
                    s.mode = Mode::Failed(format!("writing {name}: {e}"));
                    s.batch.clear();
                    s.batch_sets.clear();
                }
            }
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvd::testutil::{root, TempDir};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    fn seg(dir: &TempDir, n: u64) -> PathBuf {
        dir.path().join(segment_name(n))
    }

    fn names(dir: &TempDir) -> Vec<String> {
        list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| segment_name(n))
            .collect()
    }

    fn append(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    fn flip_byte(path: &Path, offset: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    fn set_record(revision: u64, key: &str, value: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &Record::Set {
                revision,
                key,
                value,
            },
            &mut out,
        );
        out
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Header {
                segment: 7,
                base_revision: 41,
            },
            Record::Set {
                revision: 42,
                key: "k",
                value: "a value with spaces ✓",
            },
            Record::Set {
                revision: 43,
                key: "k2",
                value: "",
            },
            Record::Footer {
                records: 2,
                last_revision: 43,
                checksum: 0xdead_beef,
            },
        ];
        let mut buf = Vec::new();
        for r in &records {
            encode(r, &mut buf);
        }
        let mut offset = 0;
        for r in &records {
            let (got, used) = decode(&buf[offset..]).unwrap();
            assert_eq!(&got, r);
            offset += used;
        }
        assert_eq!(offset, buf.len());
    }

    #[test]
    fn checksum_mismatch_detected() {
        let record = set_record(1, "key", "value");
        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 0x01;
            match decode(&bad) {
                Ok(r) => panic!("byte {i} flipped, still decoded {r:?}"),
                Err(Bad::Short) => assert!(i < 4, "byte {i}: short"), // a longer length
                Err(Bad::Corrupt(_)) => {}
            }
        }
        assert_eq!(decode(&record[..record.len() - 1]).unwrap_err(), Bad::Short);
        assert!(matches!(decode(&[0; 16]), Err(Bad::Corrupt(_))));
    }

    #[test]
    fn torn_tail_is_truncated_and_the_segment_sealed() {
        let dir = TempDir::new("torn");
        {
            let wal = Wal::open(dir.path()).unwrap();
            for i in 1..=3 {
                assert_eq!(wal.set(&format!("k{i}"), &format!("v{i}")), Ok(i));
            }
            // Dropped without a seal: a crash, as far as the disk is concerned.
        }
        // The crash cut the next batch: a whole record, then half of another.
        let whole = set_record(4, "k4", "v4");
        let half = set_record(5, "k5", "v5");
        let size_before = fs::metadata(seg(&dir, 1)).unwrap().len();
        append(&seg(&dir, 1), &whole);
        append(&seg(&dir, 1), &half[..half.len() / 2]);

        let r = recover(dir.path()).unwrap();
        assert_eq!(r.revision, 4, "the whole record stays, the torn one goes");
        assert_eq!(r.map.get("k4").map(String::as_str), Some("v4"));
        assert!(!r.map.contains_key("k5"));
        let repaired = r.repaired.unwrap();
        assert!(repaired.contains("torn tail"), "{repaired}");
        assert!(repaired.contains("sealed seg-1.log"), "{repaired}");
        // Truncated at the torn record, then the footer appended: verifies from now on.
        let footer_len = FRAME + 21;
        assert_eq!(
            fs::metadata(seg(&dir, 1)).unwrap().len(),
            size_before + whole.len() as u64 + footer_len as u64
        );
        let again = recover(dir.path()).unwrap();
        assert_eq!((again.revision, again.repaired), (4, None));
        assert_eq!(again.fingerprint, r.fingerprint);

        // A torn record whose checksum fails (its bytes half written) is cut the same way.
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(names(&dir), ["seg-1.log", "seg-2.log"]);
        assert_eq!(wal.set("k5", "v5"), Ok(5));
        drop(wal);
        let mut garbled = set_record(6, "k6", "v6");
        let last = garbled.len() - 1;
        garbled[last] ^= 0xff;
        append(&seg(&dir, 2), &garbled);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.revision(), 5);
        assert_eq!(wal.get("k5").as_deref(), Some("v5"));
        assert_eq!(wal.get("k6"), None);
        assert_eq!(wal.set("k6", "again"), Ok(6));
        assert_eq!(wal.get("k1").as_deref(), Some("v1"));
    }

    /// A segment holding a header and no `SET` is sealed (with no records), not removed; one
    /// holding no valid record at all (its creation failed: empty, or a header cut short) is
    /// removed, as it holds nothing.
    #[test]
    fn an_unsealed_segment_without_writes_is_sealed_empty() {
        let dir = TempDir::new("empty");
        drop(Wal::open(dir.path()).unwrap()); // header only, never sealed
        append(&seg(&dir, 1), &[0, 0, 0]); // and a torn start of a record
        let r = recover(dir.path()).unwrap();
        assert_eq!((r.revision, r.next_segment), (0, 2));
        assert_eq!(names(&dir), ["seg-1.log"]);
        assert_eq!(
            fs::metadata(seg(&dir, 1)).unwrap().len(),
            (2 * FRAME + 17 + 21) as u64,
            "header and footer"
        );
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "b"), Ok(1));
        wal.seal().unwrap();
        drop(wal);
        assert_eq!(names(&dir), ["seg-1.log", "seg-2.log"]);

        // A segment whose creation failed: nothing valid in it.
        fs::write(seg(&dir, 3), [0u8; 10]).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!((r.revision, r.next_segment), (1, 3));
        assert_eq!(names(&dir), ["seg-1.log", "seg-2.log"]);
    }

    /// The offset of a segment's first `SET` record (after the header).
    const FIRST_SET: usize = FRAME + 17;

    /// One flipped byte in an acknowledged record followed by valid records is corruption,
    /// not a torn tail: recovery refuses, naming the file and the offset of the bad record,
    /// and changes nothing (it used to cut the segment there, and delete it if no `SET` was
    /// left: every acknowledged write in it lost).
    #[test]
    fn a_bad_record_followed_by_valid_ones_is_corruption_and_nothing_is_changed() {
        let dir = TempDir::new("corrupt");
        {
            let wal = Wal::open(dir.path()).unwrap();
            for i in 1..=3 {
                assert_eq!(wal.set(&format!("k{i}"), &format!("v{i}")), Ok(i));
            }
            // Dropped without a seal: a crash.
        }
        let second = FIRST_SET + set_record(1, "k1", "v1").len();
        // In the first SET: its body (a checksum failure), its checksum, its length (which
        // then runs past the end of the file: short, but valid records follow); in the
        // second SET's body.
        for (at, bad) in [
            (FIRST_SET + FRAME + 3, FIRST_SET),
            (FIRST_SET + 5, FIRST_SET),
            (FIRST_SET + 2, FIRST_SET),
            (second + FRAME + 14, second),
        ] {
            flip_byte(&seg(&dir, 1), at);
            let before = fs::read(seg(&dir, 1)).unwrap();
            let e = recover(dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("seg-1.log at offset {bad}:")),
                "byte {at}: {msg}"
            );
            assert!(msg.contains("valid record"), "byte {at}: {msg}");
            let e = Wal::open(dir.path()).unwrap_err();
            assert_eq!(e.to_string(), msg, "open refuses with the same error");
            assert_eq!(names(&dir), ["seg-1.log"], "byte {at}: nothing removed");
            assert_eq!(
                fs::read(seg(&dir, 1)).unwrap(),
                before,
                "byte {at}: untouched"
            );
            flip_byte(&seg(&dir, 1), at);
        }
        // Restored: recovers everything.
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.revision, 3);

        // The same in the last segment after its seal (what a successor opens): the bad
        // record is not taken for the start of a torn tail that the footer follows.
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("k4", "v4"), Ok(4));
        assert_eq!(wal.set("k5", "v5"), Ok(5));
        wal.seal().unwrap();
        drop(wal);
        flip_byte(&seg(&dir, 2), FIRST_SET + FRAME + 3);
        let before = fs::read(seg(&dir, 2)).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("seg-2.log at offset {FIRST_SET}:")),
            "{e}"
        );
        assert_eq!(fs::read(seg(&dir, 2)).unwrap(), before, "untouched");
    }

    /// A torn write: the last record cut short, or a tail of zero bytes (a file extended
    /// whose data never reached the disk). It is cut, and every record before it kept.
    #[test]
    fn short_and_zero_filled_tails_are_cut_and_the_records_before_kept() {
        for tail in ["short", "zeros", "short then zeros"] {
            let dir = TempDir::new("tails");
            {
                let wal = Wal::open(dir.path()).unwrap();
                for i in 1..=3 {
                    assert_eq!(wal.set(&format!("k{i}"), &format!("v{i}")), Ok(i));
                }
            }
            let size = fs::metadata(seg(&dir, 1)).unwrap().len();
            let next = set_record(4, "k4", "v4");
            match tail {
                "short" => append(&seg(&dir, 1), &next[..next.len() - 3]),
                "zeros" => append(&seg(&dir, 1), &[0; 4096]),
                _ => {
                    append(&seg(&dir, 1), &next[..10]);
                    append(&seg(&dir, 1), &[0; 100]);
                }
            }
            let r = recover(dir.path()).unwrap();
            assert_eq!(r.revision, 3, "{tail}");
            for i in 1..=3 {
                assert_eq!(
                    r.map.get(&format!("k{i}")).map(String::as_str),
                    Some(format!("v{i}").as_str())
                );
            }
            let cut = match tail {
                "short" => next.len() - 3,
                "zeros" => 4096,
                _ => 110,
            };
            let repaired = r.repaired.unwrap();
            assert!(
                repaired.contains(&format!("torn tail of {cut} bytes at offset {size}")),
                "{tail}: {repaired}"
            );
            assert_eq!(
                fs::metadata(seg(&dir, 1)).unwrap().len(),
                size + (FRAME + 21) as u64,
                "{tail}: cut, and the footer appended"
            );
        }
    }

    #[test]
    fn sealed_segments_verify_and_fingerprint() {
        let dir = TempDir::new("sealed");
        let wal = Wal::open(dir.path()).unwrap();
        wal.set("a", "1").unwrap();
        wal.set("b", "2").unwrap();
        wal.freeze();
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "frozen");
        let sealed = wal.seal().unwrap();
        assert_eq!(sealed.revision, 2);
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "sealed");
        assert_eq!(wal.seal().unwrap(), sealed, "sealing twice changes nothing");

        // A successor opens what was sealed, and finds the same revision and fingerprint.
        let successor = Wal::open(dir.path()).unwrap();
        assert_eq!(successor.revision(), sealed.revision);
        assert_eq!(successor.fingerprint(), sealed.fingerprint);
        assert_eq!(successor.set("c", "3"), Ok(3));
        let sealed2 = successor.seal().unwrap();
        assert_ne!(sealed2.fingerprint, sealed.fingerprint);
        drop(successor);

        // The old incumbent resumes (as after a rollback): reads all, writes a new segment.
        wal.reopen().unwrap();
        assert_eq!(names(&dir), ["seg-1.log", "seg-2.log", "seg-3.log"]);
        assert_eq!(wal.fingerprint(), sealed2.fingerprint);
        assert_eq!(wal.get("c").as_deref(), Some("3"));
        assert_eq!(wal.set("d", "4"), Ok(4));
        drop(wal);

        // Any bit flipped in a sealed segment is caught, and named; nothing is changed.
        let len = fs::metadata(seg(&dir, 1)).unwrap().len() as usize;
        for offset in [0, 5, FRAME + 3, len / 2, len - 1] {
            flip_byte(&seg(&dir, 1), offset);
            let before = fs::read(seg(&dir, 1)).unwrap();
            let e = recover(dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("seg-1.log"), "{e}");
            assert_eq!(fs::read(seg(&dir, 1)).unwrap(), before, "left alone");
            flip_byte(&seg(&dir, 1), offset);
        }
        assert_eq!(recover(dir.path()).unwrap().revision, 4);

        // Bytes after a footer, a missing middle segment, a sealed segment cut short.
        append(&seg(&dir, 1), b"x");
        assert!(recover(dir.path()).is_err());
        fs::write(seg(&dir, 1), &fs::read(seg(&dir, 1)).unwrap()[..len]).unwrap();
        let two = fs::read(seg(&dir, 2)).unwrap();
        fs::remove_file(seg(&dir, 2)).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("expected segment 3 from revision 2"),
            "{e}"
        );
        fs::write(seg(&dir, 2), &two[..two.len() - 1]).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(e.to_string().contains("seg-2.log"), "{e}");
        fs::write(seg(&dir, 2), &two).unwrap();
        assert_eq!(recover(dir.path()).unwrap().revision, 4);
    }

    /// A write that fails (here: the segment's handle made read-only; on a full disk,
    /// ENOSPC) is not acknowledged, and neither is any later one, with the error rather than
    /// `retry`; reads go on. A seal then recovers: the acknowledged writes are sealed, and a
    /// successor opens exactly them.
    #[test]
    fn a_failed_log_refuses_writes_and_seals_by_recovery() {
        let dir = TempDir::new("failed");
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "1"), Ok(1));
        assert_eq!(wal.set("b", "2"), Ok(2));
        wal.shared.lock().active.as_mut().unwrap().file =
            Arc::new(File::open(seg(&dir, 1)).unwrap());
        let Err(SetError::Failed(e)) = wal.set("c", "3") else {
            panic!("a failed write was acknowledged")
        };
        assert!(e.starts_with("writing seg-1.log: "), "{e}");
        assert_eq!(wal.set("d", "4"), Err(SetError::Failed(e.clone())));
        assert_eq!(wal.get("a").as_deref(), Some("1"));
        assert_eq!((wal.get("c"), wal.revision()), (None, 2));

        let sealed = wal.seal().unwrap();
        assert_eq!(sealed.revision, 2);
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "sealed");
        let successor = Wal::open(dir.path()).unwrap();
        assert_eq!(successor.revision(), 2);
        assert_eq!(successor.fingerprint(), sealed.fingerprint);
        assert_eq!(successor.get("b").as_deref(), Some("2"));
        assert_eq!(successor.set("c", "3"), Ok(3));
    }

    /// A reopen that fails (here: a directory where a segment should be; on a full disk, the
    /// new segment's header) leaves the log failed with that error, not frozen; a seal or a
    /// reopen after the cause is gone succeeds.
    #[test]
    fn a_failed_reopen_leaves_the_log_failed_with_its_error() {
        let dir = TempDir::new("reopen");
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "1"), Ok(1));
        wal.seal().unwrap();
        fs::create_dir(seg(&dir, 2)).unwrap();
        let e = wal.reopen().unwrap_err();
        let Err(SetError::Failed(why)) = wal.set("b", "2") else {
            panic!("a write was accepted without a log")
        };
        assert_eq!(why, format!("reopening the log: {e}"));
        assert_eq!(wal.get("a").as_deref(), Some("1"));
        assert!(wal.seal().is_err(), "the cause is still there");
        fs::remove_dir(seg(&dir, 2)).unwrap();
        assert_eq!(wal.seal().unwrap().revision, 1);
        wal.reopen().unwrap();
        assert_eq!(wal.set("b", "2"), Ok(2));
    }

    /// An fdatasync that fails (here injected; a disk's EIO) leaves the batch's records in
    /// the page cache, perhaps never to reach the disk. They were not acknowledged, and a seal
    /// or a reopen must not build on them: the segment is cut back to what the last good
    /// fdatasync covered before it is read again.
    #[test]
    fn a_failed_fdatasync_cuts_the_segment_to_its_durable_length_before_sealing() {
        const EIO: i32 = 5;
        for then in ["seal", "reopen"] {
            let dir = TempDir::new("eio");
            let wal = Wal::open(dir.path()).unwrap();
            assert_eq!(wal.set("a", "1"), Ok(1));
            assert_eq!(wal.set("b", "2"), Ok(2));
            let durable = fs::metadata(seg(&dir, 1)).unwrap().len();
            wal.fail_next_sync(EIO);
            let Err(SetError::Failed(e)) = wal.set("c", "3") else {
                panic!("a write whose fdatasync failed was acknowledged")
            };
            assert!(e.contains("Input/output error"), "{e}");
            assert_eq!(
                fs::metadata(seg(&dir, 1)).unwrap().len(),
                durable,
                "the failed batch is cut off at once"
            );
            if then == "seal" {
                let sealed = wal.seal().unwrap();
                assert_eq!(sealed.revision, 2, "sealed a write whose fdatasync failed");
                assert_eq!(
                    fs::metadata(seg(&dir, 1)).unwrap().len(),
                    durable + (FRAME + 21) as u64,
                    "cut to the durable length, then the footer"
                );
                let successor = Wal::open(dir.path()).unwrap();
                assert_eq!(successor.revision(), 2);
                assert_eq!(successor.fingerprint(), sealed.fingerprint);
                assert_eq!(successor.get("c"), None);
            } else {
                wal.reopen().unwrap();
                assert_eq!(
                    wal.revision(),
                    2,
                    "reopened on a write whose fdatasync failed"
                );
                assert_eq!(wal.get("c"), None);
                assert_eq!(wal.set("c", "again"), Ok(3));
                drop(wal);
                let r = recover(dir.path()).unwrap();
                assert_eq!(r.revision, 3);
                assert_eq!(r.map.get("c").map(String::as_str), Some("again"));
                assert_eq!(
                    fs::metadata(seg(&dir, 1)).unwrap().len(),
                    durable + (FRAME + 21) as u64,
                    "cut to the durable length, then the footer"
                );
            }
        }
    }

    /// A real failure: a batch of two writes on a full disk (a tmpfs in a private mount
    /// namespace), the first fitting whole, the second not. Neither is acknowledged; once
    /// space is freed the seal keeps exactly the acknowledged writes (it used to seal the
    /// first of the failed batch too, from the page cache).
    #[test]
    fn a_batch_cut_by_a_full_disk_is_not_sealed() {
        let Some(dir) = on_private_tmpfs(
            "kvd::log::tests::a_batch_cut_by_a_full_disk_is_not_sealed",
            "8k",
        ) else {
            return;
        };
        let page = rustix::fs::statvfs(&dir).unwrap().f_bsize as usize;
        // Two pages: one for this, one for the segment.
        fs::write(dir.join("ballast"), vec![0xa5u8; page]).unwrap();
        let wal = Arc::new(Wal::open(&dir).unwrap());
        let (entered_tx, entered) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        wal.set_before_sync(move |n| {
            let _ = entered_tx.lock().unwrap().send(n);
            if n == 1 {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }
        });
        let set = |key: &'static str, value: String| {
            let wal = Arc::clone(&wal);
            thread::spawn(move || wal.set(key, &value))
        };
        let queued = |n: usize| {
            let until = Instant::now() + Duration::from_secs(30);
            while wal.shared.lock().batch_sets.len() < n {
                assert!(Instant::now() < until, "writers did not queue");
                thread::yield_now();
            }
        };
        let a = set("a", "1".into());
        assert_eq!(entered.recv_timeout(Duration::from_secs(30)).unwrap(), 1);
        // The next batch: `b` fills the segment's page to its last byte, `c` needs another.
        let used = FIRST_SET + set_record(1, "a", "1").len();
        let b_len = page - used - set_record(2, "b", "").len();
        let b = set("b", "x".repeat(b_len));
        queued(1);
        let c = set("c", "3".into());
        queued(2);
        release.send(()).unwrap();
        assert_eq!(a.join().unwrap(), Ok(1));
        for w in [b, c] {
            let Err(SetError::Failed(e)) = w.join().unwrap() else {
                panic!("a write that did not fit was acknowledged")
            };
            assert!(e.contains("No space left on device"), "{e}");
        }
        assert_eq!(
            fs::metadata(dir.join(segment_name(1))).unwrap().len() as usize,
            used,
            "the failed batch is cut off at once (b had reached the file whole)"
        );
        // Space again.
        fs::remove_file(dir.join("ballast")).unwrap();
        let sealed = wal.seal().unwrap();
        assert_eq!(
            sealed.revision, 1,
            "sealed a write that was not acknowledged"
        );
        let successor = Wal::open(&dir).unwrap();
        assert_eq!(successor.revision(), 1);
        assert_eq!(successor.get("a").as_deref(), Some("1"));
        assert_eq!(successor.get("b"), None);
    }

    /// Run the test `name` again in a private mount namespace, with a tmpfs of `size` mounted
    /// at a fresh directory: there, the tmpfs's path; here, `None` once that run passed.
    /// Mounting needs root: without it the test is skipped with one line, or fails if
    /// `HANDOFF_REQUIRE_ROOT_TESTS=1`. The namespace, and the mount, end with that run.
    fn on_private_tmpfs(name: &str, size: &str) -> Option<PathBuf> {
        const INNER: &str = "KVD_TEST_PRIVATE_TMPFS";
        if let Some(dir) = std::env::var_os(INNER) {
            return Some(dir.into());
        }
        if !root(name, "a tmpfs mounted in a private mount namespace") {
            return None;
        }
        let at = TempDir::new("tmpfs");
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                r#"mount -t tmpfs -o "size=$1,mode=0700" tmpfs "$2" && exec "$3" --exact "$4" --nocapture --test-threads=1"#,
            )
            .arg("sh")
            .arg(size)
            .arg(at.path())
            .arg(std::env::current_exe().unwrap())
            .arg(name)
            .env(INNER, at.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run unshare");
        // Our child, not waited for yet: the pidfd refers to it.
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let (out, err) = (read(Box::new(out)), read(Box::new(err)));
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let bound = rustix::event::Timespec::try_from(Duration::from_secs(60)).unwrap();
        if rustix::event::poll(&mut fds, Some(&bound)).unwrap() == 0 {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        assert!(
            status.success() && out.contains("1 passed"),
            "{name} in a private mount namespace: {status}\n{out}\n{err}"
        );
        None
    }

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
    fn footer_must_match_its_segment() {
        let dir = TempDir::new("footer");
        let wal = Wal::open(dir.path()).unwrap();
        wal.set("a", "1").unwrap();
        wal.seal().unwrap();
        drop(wal);
        // Rewrite the footer with a wrong count but a valid frame checksum.
        let bytes = fs::read(seg(&dir, 1)).unwrap();
        let footer_at = bytes.len() - (FRAME + 21);
        let Ok((
            Record::Footer {
                last_revision,
                checksum,
                ..
            },
            _,
        )) = decode(&bytes[footer_at..])
        else {
            panic!("no footer at the end")
        };
        let mut forged = bytes[..footer_at].to_vec();
        encode(
            &Record::Footer {
                records: 2,
                last_revision,
                checksum,
            },
            &mut forged,
        );
        fs::write(seg(&dir, 1), &forged).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(e.to_string().contains("does not match the segment"), "{e}");
    }

    /// No writer is acknowledged before the fsync covering its record has returned, and
    /// writers waiting together share one fsync.
    #[test]
    fn group_commit_acknowledges_only_after_the_fsync() {
        let dir = TempDir::new("group");
        let wal = Arc::new(Wal::open(dir.path()).unwrap());
        let acked = Arc::new(AtomicUsize::new(0));
        // The first fsync blocks until the test lets it go.
        let (entered_tx, entered) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let acked_at_sync = Arc::new(Mutex::new(Vec::new()));
        {
            let acked = Arc::clone(&acked);
            let acked_at_sync = Arc::clone(&acked_at_sync);
            let entered_tx = Mutex::new(entered_tx);
            wal.set_before_sync(move |n| {
                acked_at_sync
                    .lock()
                    .unwrap()
                    .push(acked.load(Ordering::SeqCst));
                let _ = entered_tx.lock().unwrap().send(n);
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            });
        }
        const WRITERS: usize = 8;
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (wal, acked) = (Arc::clone(&wal), Arc::clone(&acked));
                thread::spawn(move || {
                    let rev = wal.set(&format!("k{i}"), &format!("v{i}")).unwrap();
                    assert!(wal.shared.lock().durable >= rev);
                    acked.fetch_add(1, Ordering::SeqCst);
                    rev
                })
            })
            .collect();
        let first = entered.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(first >= 1);
        // The committer is inside the first fsync: every writer is still waiting, and the
        // ones that came since are queued for the next batch.
        let until = Instant::now() + Duration::from_secs(30);
        while wal.shared.lock().batch_sets.len() < WRITERS - first {
            assert!(Instant::now() < until, "writers did not queue");
            thread::yield_now();
        }
        assert_eq!(
            acked.load(Ordering::SeqCst),
            0,
            "acknowledged before the fsync"
        );
        release.send(()).unwrap(); // first batch
        if first < WRITERS {
            let second = entered.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(
                first + second,
                WRITERS,
                "the queued writers share one fsync"
            );
            release.send(()).unwrap();
        }
        let mut revs: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        revs.sort();
        assert_eq!(revs, (1..=WRITERS as u64).collect::<Vec<_>>());
        let stats = wal.stats();
        assert_eq!(stats.records, WRITERS as u64);
        assert_eq!(stats.fsyncs, if first < WRITERS { 2 } else { 1 });
        // At the start of each fsync, at most the records of the earlier fsyncs were acked.
        let at_sync = acked_at_sync.lock().unwrap().clone();
        assert_eq!(at_sync[0], 0);
        if let Some(&n) = at_sync.get(1) {
            assert!(
                n <= first,
                "{n} acked before the second fsync, {first} were durable"
            );
        }
    }

    /// Many writers, free running: fewer fsyncs than records, every ack durable at the time,
    /// everything acknowledged there after a reopen.
    #[test]
    fn group_commit_under_concurrency() {
        let dir = TempDir::new("stress");
        let wal = Arc::new(Wal::open(dir.path()).unwrap());
        const WRITERS: u64 = 16;
        const EACH: u64 = 50;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let wal = Arc::clone(&wal);
                thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..EACH {
                        let (k, v) = (format!("w{w}-{i}"), format!("{w}:{i}"));
                        let rev = wal.set(&k, &v).unwrap();
                        let s = wal.stats();
                        assert!(s.records >= rev, "rev {rev} acked, {} durable", s.records);
                        acked.push((k, v, rev));
                    }
                    acked
                })
            })
            .collect();
        let acked: Vec<_> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let stats = wal.stats();
        assert_eq!(stats.records, WRITERS * EACH);
        assert!(
            stats.fsyncs < stats.records,
            "no group commit: {} fsyncs for {} records",
            stats.fsyncs,
            stats.records
        );
        let mut revs: Vec<u64> = acked.iter().map(|a| a.2).collect();
        revs.sort();
        revs.dedup();
        assert_eq!(revs.len() as u64, WRITERS * EACH, "revisions are unique");
        drop(wal);
        // A crash now (no seal): everything acknowledged is recovered.
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.revision, WRITERS * EACH);
        for (k, v, _) in &acked {
            assert_eq!(r.map.get(k), Some(v));
        }
        eprintln!(
            "group commit: {} records in {} fsyncs",
            stats.records, stats.fsyncs
        );
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
