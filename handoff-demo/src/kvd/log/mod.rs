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
//!
//! # The modules
//!
//! One concern each, from the bytes up: `record` is the codec (framing, checksums, the three
//! record kinds); `segment` the files (names, modes, creating and cutting one, the
//! fingerprint); `recovery` replays the segments into the map and repairs a torn tail;
//! `commit` is the group-commit thread and the state it shares with the writers; `wal` is the
//! [`Wal`] the server holds, which ties them together (open, set, seal, reopen).

mod commit;
mod record;
mod recovery;
mod segment;
mod wal;

pub use recovery::{recover, Recovered};
pub use segment::create_data_dir;
pub use wal::{Sealed, SetError, Stats, Wal};

/// What the tests of every module build segments and records with.
#[cfg(test)]
mod testutil {
    use super::record::{encode, Record, FRAME};
    use super::segment::{list_segments, segment_name};
    use crate::kvd::testutil::TempDir;
    use std::fs::{self, OpenOptions};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    pub fn seg(dir: &TempDir, n: u64) -> PathBuf {
        dir.path().join(segment_name(n))
    }

    pub fn names(dir: &TempDir) -> Vec<String> {
        list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| segment_name(n))
            .collect()
    }

    pub fn append(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    pub fn flip_byte(path: &Path, offset: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    pub fn set_record(revision: u64, key: &str, value: &str) -> Vec<u8> {
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

    /// The offset of a segment's first `SET` record (after the header).
    pub const FIRST_SET: usize = FRAME + 17;

    /// A log that kvd wrote before its checksums came from `crc32fast` (with the hand-written
    /// table), in hex: `SET alpha 1`, `SET beta "a value with spaces ✓"`, `SET alpha 2`,
    /// sealed; then, in a second segment, `SET gamma ""`, and a crash before the seal. Its
    /// fingerprint was 0x72a451dee96890b0 after the first seal, 0x0cc39c48114138b5 after
    /// recovery sealed the second segment, to `OLD_SEGMENT_2_SEALED`.
    pub const OLD_SEGMENT_1: &str = concat!(
        "11000000464ad1dc4801000000000000000000000000000000130000002ac3c6",
        "b153010000000000000005000000616c7068613128000000e82f938853020000",
        "00000000000400000062657461612076616c7565207769746820737061636573",
        "20e29c931300000013f91b2d53030000000000000005000000616c7068613215",
        "00000080a0f3414603000000000000000300000000000000438a36aa",
    );
    pub const OLD_SEGMENT_2: &str = concat!(
        "1100000057f9967b480200000000000000030000000000000012000000bb7b4d",
        "225304000000000000000500000067616d6d61",
    );
    pub const OLD_SEGMENT_2_SEALED: &str = concat!(
        "1100000057f9967b480200000000000000030000000000000012000000bb7b4d",
        "225304000000000000000500000067616d6d6115000000a2ef78a54601000000",
        "0000000004000000000000008dfe7bc1",
    );

    pub fn hex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }
}
