//! The supervisor's journal: one record, replaced atomically before every irreversible step,
//! and the pure recovery decision a restarted supervisor takes from it.
//!
//! The driver writes [`encode`]'s bytes to a temporary file, fsyncs it, renames it over the
//! journal and fsyncs the directory; the machine waits for that before it goes on.

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

const MAGIC: &[u8; 4] = b"HOJ1";

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

/// Encode a record: `"HOJ1" | len: u32 LE | postcard(record) | fnv1a64(body): u64 LE`.
pub fn encode(record: &JournalRecord) -> Vec<u8> {
    let body = postcard::to_allocvec(record).expect("journal records always serialize");
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&fnv1a64(&body).to_le_bytes());
    out
}

/// Decode a journal file's bytes.
pub fn decode(bytes: &[u8]) -> Result<JournalRecord, JournalError> {
    if bytes.len() < 8 {
        return Err(JournalError::Truncated {
            have: bytes.len(),
            need: 8,
        });
    }
    if &bytes[0..4] != MAGIC {
        return Err(JournalError::BadMagic);
    }
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
    let computed = fnv1a64(body);
    if stored != computed {
        return Err(JournalError::Checksum { stored, computed });
    }
    if bytes.len() > need {
        return Err(JournalError::Malformed(format!(
            "{} bytes after the record",
            bytes.len() - need
        )));
    }
    let (record, rest) = postcard::take_from_bytes::<JournalRecord>(body)
        .map_err(|e| JournalError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(JournalError::Malformed(format!(
            "{} trailing bytes in the record",
            rest.len()
        )));
    }
    Ok(record)
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
