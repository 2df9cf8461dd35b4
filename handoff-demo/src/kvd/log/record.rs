//! The record codec: the frame (`len`, `crc`) around a body, the three kinds of body, and the
//! checksum. Pure functions of bytes: no file, no clock.

use std::fmt;

const KIND_HEADER: u8 = b'H';
const KIND_SET: u8 = b'S';
const KIND_FOOTER: u8 = b'F';
/// `len` and `crc`.
pub(super) const FRAME: usize = 8;
/// The largest body a record may have (a bigger length is garbage).
const MAX_BODY: usize = 1 << 24;

/// CRC-32/IEEE (the one of zlib and Ethernet: polynomial 0x04C11DB7, reflected, initial
/// value and final xor 0xFFFFFFFF), computed incrementally: a frame's checksum of its body,
/// and a footer's of its segment. `crc32fast` computes it; the tests below hold it to the
/// table this log was first written with.
#[derive(Clone, Debug)]
pub(super) struct Crc32(crc32fast::Hasher);

impl Crc32 {
    pub(super) fn new() -> Crc32 {
        Crc32(crc32fast::Hasher::new())
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum of the bytes so far (more may follow).
    pub(super) fn value(&self) -> u32 {
        self.0.clone().finalize()
    }
}

/// The CRC-32 of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// A record's body, decoded (its bytes are in the `kvd::log` docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Record<'a> {
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

pub(super) fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
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
pub(super) enum Bad {
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
pub(super) fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), Bad> {
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

/// The offset of the first valid record at or after `from` that may follow others in a
/// segment (a `SET` or a footer), if any: every byte offset is tried.
pub(super) fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kvd::log::testutil::{hex, set_record, OLD_SEGMENT_1};

    /// The table-driven CRC-32 this log was written with before `crc32fast`, kept as the
    /// reference the checksums on disk were computed with.
    fn hand_written_crc32(bytes: &[u8]) -> u32 {
        let table: Vec<u32> = (0..256u32)
            .map(|i| {
                (0..8).fold(i, |c, _| {
                    if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    }
                })
            })
            .collect();
        let mut c = !0u32;
        for &b in bytes {
            c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        !c
    }
    /// CRC-32/IEEE's check value, and other published vectors.
    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        for (bytes, crc) in [
            (&b""[..], 0),
            (b"a", 0xE8B7_BE43),
            (b"abc", 0x3524_41C2),
            (b"The quick brown fox jumps over the lazy dog", 0x414F_A339),
        ] {
            assert_eq!(crc32(bytes), crc, "{:?}", String::from_utf8_lossy(bytes));
            assert_eq!(hand_written_crc32(bytes), crc, "the reference");
        }
    }

    /// `crc32fast` and the hand-written table agree on every length up to past a few of
    /// `crc32fast`'s SIMD blocks, whole or fed in pieces (as a segment's checksum is).
    #[test]
    fn crc32fast_computes_the_hand_written_crc32() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..1500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in 0..=bytes.len() {
            let want = hand_written_crc32(&bytes[..len]);
            assert_eq!(crc32(&bytes[..len]), want, "{len} bytes");
            let mut c = Crc32::new();
            for piece in bytes[..len].chunks(1 + len % 97) {
                c.update(piece);
            }
            assert_eq!(c.value(), want, "{len} bytes, in pieces");
        }
    }

    /// A segment written by kvd before `crc32fast` decodes, record by record, and encodes
    /// again to the same bytes: the frame checksums and the footer's are unchanged.
    #[test]
    fn a_segment_written_before_crc32fast_encodes_to_the_same_bytes() {
        let old = hex(OLD_SEGMENT_1);
        let (mut offset, mut again, mut crc) = (0, Vec::new(), Crc32::new());
        while offset < old.len() {
            let (record, used) = decode(&old[offset..]).unwrap();
            if let Record::Footer { checksum, .. } = record {
                assert_eq!(
                    checksum,
                    crc.value(),
                    "the footer's checksum of its segment"
                );
            }
            encode(&record, &mut again);
            crc.update(&old[offset..offset + used]);
            offset += used;
        }
        assert_eq!(again, old);
        assert_eq!(
            hand_written_crc32(&old),
            crc32(&old),
            "and the whole file's checksum"
        );
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
}
