//! The supervisor's journal: one record, replaced atomically before every irreversible step,
//! and the pure recovery decision a restarted supervisor takes from it.
//!
//! The driver writes [`encode_journal`]'s bytes to a temporary file it creates exclusively,
//! fsyncs it and renames it over the journal; the machine waits for that before it goes on.
//! The directory is not fsynced: a process crash cannot lose the rename, and after a machine
//! crash no process the record names is alive, so recovery starts the daemon cold whichever
//! record it reads (the fsync before the rename keeps either record whole).
//!
//! # Pids and identities
//!
//! A pid is a number the kernel hands out again once its process is gone, so a pid read back
//! from the journal, possibly after the host rebooted, identifies nobody by itself. Next to the
//! record, the file therefore carries the [`ProcessIdentity`] of each pid the writer had
//! proven to be the process it meant (its own child, or the peer of a control connection). A
//! driver must treat a pid whose identity is missing or does not match the process that has
//! that pid now as gone: never watch it, never signal it. The machine itself never sees the
//! identities; they are the driver's business ([`Journal`]).
//!
//! # Formats
//!
//! - Format 1 (`HOJ1`): `"HOJ1" | len: u32 LE | postcard(record) | fnv1a64(body): u64 LE`. No
//!   identities: every pid it names is unproven. Still read, never written.
//! - Format 2 (`HOJ2`): `"HOJ2" | len: u32 LE | postcard(record, identities) | fnv1a64(all
//!   the bytes before it): u64 LE`. The checksum covers the header too, so a damaged format
//!   byte is caught.
//!
//! Any other `HOJ<digit>` is refused as [`JournalError::UnsupportedFormat`], anything else as
//! [`JournalError::BadMagic`]; a file is never read under the wrong format.

use serde::{Deserialize, Serialize};

use crate::types::{HandoffId, Pid};
use crate::wire::DaemonStatus;

/// What the supervisor was doing, as of its last durable write.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum JournalRecord {
    /// No handoff in progress. `serving` is the daemon believed to serve; `None` when a
    /// handoff ended with nobody confirmed serving (the supervisor then recovers).
    Idle {
        /// The serving daemon.
        serving: Option<Pid>,
        /// The last handoff id used; the next one is larger.
        last_handoff: HandoffId,
    },
    /// A handoff started: the successor is spawned, the incumbent may be draining or sealed.
    /// The commit point has not been passed.
    InFlight {
        /// The handoff.
        handoff: HandoffId,
        /// The old daemon.
        incumbent: Pid,
        /// The new daemon.
        successor: Pid,
    },
    /// The commit point: the successor was ready and `Commit` is being sent.
    Committing {
        /// The handoff.
        handoff: HandoffId,
        /// The old daemon.
        incumbent: Pid,
        /// The new daemon.
        successor: Pid,
    },
}

impl JournalRecord {
    /// The pids the record names.
    pub fn pids(&self) -> Vec<Pid> {
        match *self {
            JournalRecord::Idle { serving, .. } => serving.into_iter().collect(),
            JournalRecord::InFlight {
                incumbent,
                successor,
                ..
            }
            | JournalRecord::Committing {
                incumbent,
                successor,
                ..
            } => vec![incumbent, successor],
        }
    }

    /// The last handoff id the record names.
    pub fn last_handoff(&self) -> HandoffId {
        match *self {
            JournalRecord::Idle { last_handoff, .. } => last_handoff,
            JournalRecord::InFlight { handoff, .. } | JournalRecord::Committing { handoff, .. } => {
                handoff
            }
        }
    }
}

/// What tells one process apart from every other one of a host: the boot it runs in, when it
/// started, and, where the kernel has pidfs, the inode number of its pidfds. Two processes are
/// the same only if all three are equal.
///
/// The kernel reuses a pid. The start time alone is coarse: it counts clock ticks (10 ms at
/// the usual 100 Hz), and a pid can be given again within one tick (a pid space wrapped under
/// load, or `ns_last_pid` written by root; the tests do exactly this). The pidfs inode number
/// is drawn from a 64-bit counter at every process creation and never reused within a boot,
/// so it tells those apart too.
///
/// The driver reads it (boot id from `/proc/sys/kernel/random/boot_id`, start time from field
/// 22 of `/proc/<pid>/stat`, the inode from `fstat` of a pidfd); this crate only stores and
/// compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ProcessIdentity {
    /// The kernel's boot id (a random UUID drawn at every boot), as 16 bytes.
    pub boot_id: [u8; 16],
    /// When the process started, in clock ticks after boot.
    pub start_ticks: u64,
    /// The inode number of the process's pidfds on pidfs (Linux 6.9 or later); `None` where
    /// pidfds are anonymous inodes, all with one number.
    pub pidfd_inode: Option<u64>,
}

/// A journal file's whole content: the record, and the identities of the pids it names that
/// the writer had proven (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Journal {
    /// The record.
    pub record: JournalRecord,
    /// `(pid, identity)` for pids of the record; at most one per pid. A pid of the record with
    /// no entry here identifies nobody.
    pub identities: Vec<(Pid, ProcessIdentity)>,
    /// The file's format: 1 (no identities) or 2.
    pub format: u8,
}

impl Journal {
    /// The identity recorded for `pid`, if any.
    pub fn identity(&self, pid: Pid) -> Option<ProcessIdentity> {
        self.identities
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, id)| *id)
    }
}

const MAGIC_V1: &[u8; 4] = b"HOJ1";
const MAGIC_V2: &[u8; 4] = b"HOJ2";
/// The formats [`decode_journal`] reads.
pub const FORMATS: [u8; 2] = [1, 2];

/// A journal file that cannot be read back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Shorter than its header or than the length it states.
    #[error("journal truncated: {have} bytes, {need} needed")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a journal of this format.
    #[error("not a handoff journal (bad magic)")]
    BadMagic,
    /// A journal of a format this build does not read (written by a newer supervisor?).
    #[error("journal format {found} is not one this build reads (formats 1 and 2)")]
    UnsupportedFormat {
        /// The format the file states (the digit after `HOJ`).
        found: u8,
    },
    /// The checksum does not match: the file was damaged.
    #[error("journal checksum mismatch: stored {stored:016x}, computed {computed:016x}")]
    Checksum {
        /// In the file.
        stored: u64,
        /// Of the content.
        computed: u64,
    },
    /// The content does not decode as a record.
    #[error("journal record malformed: {0}")]
    Malformed(String),
}

/// The body of a format-2 journal.
#[derive(Serialize, Deserialize)]
struct BodyV2 {
    record: JournalRecord,
    identities: Vec<(Pid, ProcessIdentity)>,
}

/// Encode `record` with no identities (format 2): every pid it names will read back unproven.
pub fn encode(record: &JournalRecord) -> Vec<u8> {
    encode_journal(record, &[])
}

/// Encode `record` and the identities of its pids (format 2, see the [module docs](self)).
/// Entries for pids the record does not name, and all but the first entry for a pid, are
/// left out.
pub fn encode_journal(record: &JournalRecord, identities: &[(Pid, ProcessIdentity)]) -> Vec<u8> {
    let named = record.pids();
    let mut kept: Vec<(Pid, ProcessIdentity)> = Vec::new();
    for &(pid, id) in identities {
        if named.contains(&pid) && !kept.iter().any(|(p, _)| *p == pid) {
            kept.push((pid, id));
        }
    }
    let body = BodyV2 {
        record: record.clone(),
        identities: kept,
    };
    let body = postcard::to_allocvec(&body).expect("journal records always serialize");
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(MAGIC_V2);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = fnv1a64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Decode a journal file's bytes, of either format, to its record alone.
pub fn decode(bytes: &[u8]) -> Result<JournalRecord, JournalError> {
    decode_journal(bytes).map(|j| j.record)
}

/// Decode a journal file's bytes, of either format: the record and, for format 2, the
/// identities. Every damage is an error, never a different record: a short file, a bad or
/// unknown magic, a checksum mismatch, a body that does not parse, bytes after the record, or
/// an identity for a pid the record does not name (or two for one pid).
pub fn decode_journal(bytes: &[u8]) -> Result<Journal, JournalError> {
    if bytes.len() < 8 {
        return Err(JournalError::Truncated {
            have: bytes.len(),
            need: 8,
        });
    }
    let format = match &bytes[0..4] {
        m if m == MAGIC_V1 => 1,
        m if m == MAGIC_V2 => 2,
        [b'H', b'O', b'J', d] if d.is_ascii_digit() => {
            return Err(JournalError::UnsupportedFormat { found: d - b'0' })
        }
        _ => return Err(JournalError::BadMagic),
    };
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    let need = 8usize.saturating_add(len).saturating_add(8);
    if bytes.len() < need {
        return Err(JournalError::Truncated {
            have: bytes.len(),
            need,
        });
    }
    let body = &bytes[8..8 + len];
    let stored = u64::from_le_bytes(bytes[8 + len..need].try_into().expect("8 bytes"));
    // Format 1 sums the body; format 2 everything before the checksum.
    let computed = match format {
        1 => fnv1a64(body),
        _ => fnv1a64(&bytes[..8 + len]),
    };
    if stored != computed {
        return Err(JournalError::Checksum { stored, computed });
    }
    if bytes.len() > need {
        return Err(JournalError::Malformed(format!(
            "{} bytes after the record",
            bytes.len() - need
        )));
    }
    let (record, identities, rest) = if format == 1 {
        let (record, rest) = postcard::take_from_bytes::<JournalRecord>(body)
            .map_err(|e| JournalError::Malformed(e.to_string()))?;
        (record, Vec::new(), rest)
    } else {
        let (b, rest) = postcard::take_from_bytes::<BodyV2>(body)
            .map_err(|e| JournalError::Malformed(e.to_string()))?;
        (b.record, b.identities, rest)
    };
    if !rest.is_empty() {
        return Err(JournalError::Malformed(format!(
            "{} trailing bytes in the record",
            rest.len()
        )));
    }
    let named = record.pids();
    for (i, (pid, _)) in identities.iter().enumerate() {
        if !named.contains(pid) {
            return Err(JournalError::Malformed(format!(
                "an identity for pid {pid}, which the record does not name"
            )));
        }
        if identities[..i].iter().any(|(p, _)| p == pid) {
            return Err(JournalError::Malformed(format!(
                "two identities for pid {pid}"
            )));
        }
    }
    Ok(Journal {
        record,
        identities,
        format,
    })
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a restarted (or orphaned) supervisor sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Observation {
    /// Pids named by the record that are still alive.
    pub alive: Vec<Pid>,
    /// Who answered on the control socket, and what it said; `None` if nobody answered.
    pub answer: Option<(Pid, DaemonStatus)>,
    /// The recovery wait ran out: stop waiting for processes that are still resolving.
    pub waited_out: bool,
}

/// What happened to the handoff a record was interrupted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The successor serves.
    Committed,
    /// The incumbent serves again.
    RolledBack,
    /// Neither serves; a fresh daemon is started.
    Lost,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// `pid` serves: adopt it (take the listeners back from it). Other processes of the
    /// interrupted handoff are left alone: they resolve on their own (an old incumbent retires
    /// on the commit mark, an uncommitted successor exits at its deadline), and killing them on
    /// an answer that may be stale could kill the one that serves.
    Adopt {
        /// The serving daemon.
        pid: Pid,
        /// What became of the interrupted handoff, if the record names one.
        resolution: Option<(HandoffId, Resolution)>,
    },
    /// Someone named by the record is alive and still resolving (an incumbent reclaiming the
    /// lock, a successor about to exit): look again shortly.
    Wait,
    /// Nobody serves: kill `kill` and start the daemon cold.
    ColdStart {
        /// Processes to kill first.
        kill: Vec<Pid>,
        /// What became of the interrupted handoff, if the record names one.
        resolution: Option<(HandoffId, Resolution)>,
    },
}

/// Decide what a supervisor that finds `record` in its journal and observes `obs` must do.
///
/// The commit point is the successor's commit mark, not the record: a `Committing` record
/// whose successor died before it committed rolls back, and an `InFlight` record can never
/// see its successor serving (it binds the control socket only after `Commit`). So the
/// decision rests on who answers the control socket as serving, and the record tells which
/// handoff that resolves.
pub fn decide(record: Option<&JournalRecord>, obs: &Observation) -> Decision {
    let in_flight = match record {
        Some(JournalRecord::InFlight {
            handoff,
            incumbent,
            successor,
        })
        | Some(JournalRecord::Committing {
            handoff,
            incumbent,
            successor,
        }) => Some((*handoff, *incumbent, *successor)),
        _ => None,
    };
    let leftovers = |keep: Option<Pid>| -> Vec<Pid> {
        let mut v: Vec<Pid> = obs
            .alive
            .iter()
            .copied()
            .filter(|p| Some(*p) != keep)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    if let Some((pid, DaemonStatus::Serving)) = obs.answer {
        let resolution = in_flight.map(|(h, incumbent, successor)| {
            let r = if pid == successor {
                Resolution::Committed
            } else if pid == incumbent {
                Resolution::RolledBack
            } else {
                Resolution::Lost
            };
            (h, r)
        });
        return Decision::Adopt { pid, resolution };
    }
    let someone_resolving = obs.answer.is_some() || !obs.alive.is_empty();
    if someone_resolving && !obs.waited_out {
        return Decision::Wait;
    }
    let mut kill = leftovers(None);
    if let Some((pid, _)) = obs.answer {
        if !kill.contains(&pid) {
            kill.push(pid);
        }
    }
    Decision::ColdStart {
        kill,
        resolution: in_flight.map(|(h, _, _)| (h, Resolution::Lost)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committing() -> JournalRecord {
        JournalRecord::Committing {
            handoff: HandoffId(3),
            incumbent: 10,
            successor: 11,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        for r in [
            committing(),
            JournalRecord::Idle {
                serving: Some(4),
                last_handoff: HandoffId(9),
            },
        ] {
            let bytes = encode(&r);
            assert_eq!(decode(&bytes), Ok(r.clone()));
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
            }
            let mut flipped = bytes.clone();
            let mid = 9;
            flipped[mid] ^= 0x40;
            assert!(matches!(
                decode(&flipped),
                Err(JournalError::Checksum { .. })
            ));
        }
        assert_eq!(decode(b"XXXXXXXXXXXXXXXX"), Err(JournalError::BadMagic));
    }

    fn id(n: u8) -> ProcessIdentity {
        ProcessIdentity {
            boot_id: [n; 16],
            start_ticks: 1000 + u64::from(n),
            pidfd_inode: (n % 2 == 0).then_some(77 + u64::from(n)),
        }
    }

    /// The bytes the format-1 encoder wrote.
    fn format_1(record: &JournalRecord) -> Vec<u8> {
        let body = postcard::to_allocvec(record).unwrap();
        let mut out = b"HOJ1".to_vec();
        out.extend((body.len() as u32).to_le_bytes());
        out.extend(&body);
        out.extend(fnv1a64(&body).to_le_bytes());
        out
    }

    /// A format-2 file with `identities` as given, unfiltered.
    fn format_2_raw(record: &JournalRecord, identities: Vec<(Pid, ProcessIdentity)>) -> Vec<u8> {
        let body = postcard::to_allocvec(&BodyV2 {
            record: record.clone(),
            identities,
        })
        .unwrap();
        let mut out = b"HOJ2".to_vec();
        out.extend((body.len() as u32).to_le_bytes());
        out.extend(&body);
        let sum = fnv1a64(&out);
        out.extend(sum.to_le_bytes());
        out
    }

    #[test]
    fn format_1_is_read_with_every_pid_unproven() {
        let rec = committing();
        let j = decode_journal(&format_1(&rec)).unwrap();
        assert_eq!(
            j,
            Journal {
                record: rec.clone(),
                identities: vec![],
                format: 1
            }
        );
        assert_eq!(j.identity(10), None);
        assert_eq!(decode(&format_1(&rec)), Ok(rec));
    }

    #[test]
    fn format_2_round_trips_identities_of_named_pids_only() {
        let rec = committing();
        // 12 is not named by the record, and 10 twice: both left out.
        let bytes = encode_journal(&rec, &[(11, id(1)), (12, id(2)), (11, id(3)), (10, id(4))]);
        assert_eq!(&bytes[..4], b"HOJ2");
        let j = decode_journal(&bytes).unwrap();
        assert_eq!(j.record, rec);
        assert_eq!(j.format, 2);
        assert_eq!(j.identities, vec![(11, id(1)), (10, id(4))]);
        assert_eq!(j.identity(11), Some(id(1)));
        assert_eq!(j.identity(12), None);
        let idle = JournalRecord::Idle {
            serving: None,
            last_handoff: HandoffId(2),
        };
        assert_eq!(
            decode_journal(&encode_journal(&idle, &[(10, id(1))])).unwrap(),
            Journal {
                record: idle,
                identities: vec![],
                format: 2
            }
        );
    }

    #[test]
    fn unknown_formats_and_stray_identities_are_refused() {
        let rec = committing();
        let good = encode_journal(&rec, &[(10, id(1))]);
        for d in [b'0', b'3', b'9'] {
            let mut b = good.clone();
            b[3] = d;
            let e = decode_journal(&b).unwrap_err();
            assert_eq!(
                e,
                JournalError::UnsupportedFormat { found: d - b'0' },
                "{d}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "journal format {} is not one this build reads (formats 1 and 2)",
                    d - b'0'
                )
            );
        }
        for m in [&b"HOJx"[..], b"hoj2", b"XOJ2"] {
            let mut b = good.clone();
            b[..4].copy_from_slice(m);
            assert_eq!(decode_journal(&b), Err(JournalError::BadMagic));
        }
        // A format-2 file read as format 1 (a damaged format byte) is caught by the checksum.
        let mut as_v1 = good.clone();
        as_v1[3] = b'1';
        assert!(matches!(
            decode_journal(&as_v1),
            Err(JournalError::Checksum { .. })
        ));
        // And a format-1 file as format 2.
        let mut as_v2 = format_1(&rec);
        as_v2[3] = b'2';
        assert!(matches!(
            decode_journal(&as_v2),
            Err(JournalError::Checksum { .. })
        ));
        // Identities the record does not account for.
        let stray = format_2_raw(&rec, vec![(12, id(1))]);
        assert_eq!(
            decode_journal(&stray),
            Err(JournalError::Malformed(
                "an identity for pid 12, which the record does not name".into()
            ))
        );
        let twice = format_2_raw(&rec, vec![(10, id(1)), (10, id(2))]);
        assert_eq!(
            decode_journal(&twice),
            Err(JournalError::Malformed("two identities for pid 10".into()))
        );
        // Every strict prefix is refused.
        for cut in 0..good.len() {
            assert!(decode_journal(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn recovery_table() {
        let rec = committing();
        let obs = |alive: &[Pid], answer, waited_out| Observation {
            alive: alive.to_vec(),
            answer,
            waited_out,
        };
        // The successor committed and answers: adopt it; the old one retires on its own.
        assert_eq!(
            decide(
                Some(&rec),
                &obs(&[10, 11], Some((11, DaemonStatus::Serving)), false)
            ),
            Decision::Adopt {
                pid: 11,
                resolution: Some((HandoffId(3), Resolution::Committed))
            }
        );
        // The successor died before committing; the incumbent took the lock back.
        assert_eq!(
            decide(
                Some(&rec),
                &obs(&[10], Some((10, DaemonStatus::Serving)), false)
            ),
            Decision::Adopt {
                pid: 10,
                resolution: Some((HandoffId(3), Resolution::RolledBack))
            }
        );
        // The incumbent is still reclaiming: wait.
        assert_eq!(
            decide(
                Some(&rec),
                &obs(
                    &[10, 11],
                    Some((10, DaemonStatus::Reclaiming(HandoffId(3)))),
                    false
                )
            ),
            Decision::Wait
        );
        // Nobody left.
        assert_eq!(
            decide(Some(&rec), &obs(&[], None, false)),
            Decision::ColdStart {
                kill: vec![],
                resolution: Some((HandoffId(3), Resolution::Lost))
            }
        );
        // Someone alive but stuck past the wait.
        assert_eq!(
            decide(Some(&rec), &obs(&[11], None, true)),
            Decision::ColdStart {
                kill: vec![11],
                resolution: Some((HandoffId(3), Resolution::Lost))
            }
        );
    }
}
