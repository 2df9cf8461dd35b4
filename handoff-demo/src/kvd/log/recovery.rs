//! Recovery: replay the segments into the map, verify what is sealed, and repair what a crash
//! can leave (a torn tail of the last segment, a segment whose creation failed). Anything
//! else is corruption: an error naming the file and the offset, and nothing is changed.

use super::record::{decode, encode, next_valid_record, Crc32, Record};
use super::segment::{
    fingerprint_with, list_segments, open_segment, segment_name, sync_dir, FNV_OFFSET,
};
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

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

/// Replay the log in `dir` (see the docs of `kvd::log`): verify the sealed segments, cut the
/// torn tail of an unsealed last segment and seal it (or remove it if it holds no `SET`).
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

/// The error for a segment that is not what it should be, naming the file and the offset.
fn corrupt(path: &Path, offset: usize, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} at offset {offset}: {why}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvd::log::record::FRAME;
    use crate::kvd::log::testutil::{
        append, flip_byte, hex, names, seg, set_record, FIRST_SET, OLD_SEGMENT_1, OLD_SEGMENT_2,
        OLD_SEGMENT_2_SEALED,
    };
    use crate::kvd::log::Wal;
    use crate::kvd::testutil::TempDir;

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

    /// A log written before the checksums came from `crc32fast` is read as it was then: the
    /// same revisions, map and fingerprints, and the footer recovery writes for its unsealed
    /// segment is byte for byte the one the old code wrote.
    #[test]
    fn a_log_written_before_crc32fast_is_still_read() {
        let dir = TempDir::new("old");
        fs::write(seg(&dir, 1), hex(OLD_SEGMENT_1)).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!((r.revision, r.fingerprint), (3, 0x72a4_51de_e968_90b0));
        assert_eq!(r.repaired, None);

        fs::write(seg(&dir, 2), hex(OLD_SEGMENT_2)).unwrap();
        let r = recover(dir.path()).unwrap();
        assert_eq!((r.revision, r.fingerprint), (4, 0x0cc3_9c48_1141_38b5));
        assert_eq!(
            r.repaired.as_deref(),
            Some("sealed seg-2.log (1 records up to revision 4)")
        );
        let map = |k: &str| r.map.get(k).map(String::as_str);
        assert_eq!(map("alpha"), Some("2"));
        assert_eq!(map("beta"), Some("a value with spaces ✓"));
        assert_eq!(map("gamma"), Some(""));
        assert_eq!(fs::read(seg(&dir, 1)).unwrap(), hex(OLD_SEGMENT_1));
        assert_eq!(fs::read(seg(&dir, 2)).unwrap(), hex(OLD_SEGMENT_2_SEALED));

        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("delta", "5"), Ok(5));
        assert_eq!(wal.fingerprint(), 0x0cc3_9c48_1141_38b5);
    }
}
