//! Strategies shared by the property tests (`prop_wire.rs`, `prop_machines.rs`).
//!
//! Every `Message` variant, every nested enum variant, unicode text (including control
//! characters and NUL), empty and large vectors.
#![allow(dead_code)]

use handoff_proto::journal::JournalRecord;
use handoff_proto::wire::{
    encode, DaemonStatus, Hello, HelloAck, Message, PeerRole, VersionRange, SUPPORTED_VERSIONS,
};
use handoff_proto::{
    AbortReason, DrainReport, HandoffId, ListenerInfo, ListenerKind, LockRecord, Pid,
    ReadinessSnapshot, SealReport, StateSnapshot,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Number of cases: `default`, or `PROPTEST_CASES` when set (for a longer hunt, e.g.
/// `PROPTEST_CASES=30000 cargo test -p handoff-proto --test prop_machines`).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Any text: empty, short unicode (any `char`, control characters included), or long.
pub fn text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just(String::new()),
        6 => prop::collection::vec(any::<char>(), 0..24).prop_map(|v| v.into_iter().collect()),
        2 => "\\PC{0,40}",
        1 => prop::collection::vec(any::<char>(), 200..1500).prop_map(|v| v.into_iter().collect()),
    ]
    .boxed()
}

/// Any handoff id, with the edges 0 and `u64::MAX` likely.
pub fn handoff_id() -> BoxedStrategy<HandoffId> {
    prop_oneof![
        2 => (0u64..=4).prop_map(HandoffId),
        1 => Just(HandoffId(u64::MAX)),
        4 => any::<u64>().prop_map(HandoffId),
    ]
    .boxed()
}

/// Handoff ids as the machine tests want them: mostly from the small set {1, 2, 3} so that
/// current, duplicate and foreign handoffs all occur, sometimes anything.
pub fn small_handoff_id() -> BoxedStrategy<HandoffId> {
    prop_oneof![
        8 => (1u64..=3).prop_map(HandoffId),
        1 => Just(HandoffId(0)),
        1 => any::<u64>().prop_map(HandoffId),
    ]
    .boxed()
}

pub fn pid() -> BoxedStrategy<Pid> {
    prop_oneof![2 => 0u32..1000, 1 => any::<u32>()].boxed()
}

pub fn version_range() -> BoxedStrategy<VersionRange> {
    prop_oneof![
        3 => (0u16..6, 0u16..6).prop_map(|(min, max)| VersionRange { min, max }),
        1 => Just(SUPPORTED_VERSIONS),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max }),
    ]
    .boxed()
}

pub fn listener_kind() -> BoxedStrategy<ListenerKind> {
    prop_oneof![
        Just(ListenerKind::Tcp),
        Just(ListenerKind::Udp),
        Just(ListenerKind::UnixStream),
        Just(ListenerKind::UnixDatagram),
    ]
    .boxed()
}

pub fn listener_info() -> BoxedStrategy<ListenerInfo> {
    (text(), listener_kind())
        .prop_map(|(name, kind)| ListenerInfo { name, kind })
        .boxed()
}

/// Short names only: batches of a few hundred listeners stay small enough to be fast.
pub fn listener_info_short() -> BoxedStrategy<ListenerInfo> {
    (
        prop::collection::vec(any::<char>(), 0..6).prop_map(|v| v.into_iter().collect()),
        listener_kind(),
    )
        .prop_map(|(name, kind)| ListenerInfo { name, kind })
        .boxed()
}

pub fn listener_batch() -> BoxedStrategy<Vec<ListenerInfo>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => prop::collection::vec(listener_info(), 1..6),
        1 => prop::collection::vec(listener_info_short(), 200..320),
    ]
    .boxed()
}

/// Vectors of numbers: empty, short, or a few hundred long.
pub fn u64_vec() -> BoxedStrategy<Vec<u64>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => prop::collection::vec(any::<u64>(), 1..8),
        1 => prop::collection::vec(any::<u64>(), 100..400),
    ]
    .boxed()
}

pub fn text_vec() -> BoxedStrategy<Vec<String>> {
    prop_oneof![
        1 => Just(Vec::new()),
        4 => prop::collection::vec(text(), 1..5),
        1 => prop::collection::vec("\\PC{0,4}", 100..300),
    ]
    .boxed()
}

pub fn drain_report() -> BoxedStrategy<DrainReport> {
    (any::<u64>(), any::<bool>())
        .prop_map(|(open_conns_remaining, accept_closed)| DrainReport {
            open_conns_remaining,
            accept_closed,
        })
        .boxed()
}

pub fn seal_report() -> BoxedStrategy<SealReport> {
    (u64_vec(), any::<u64>())
        .prop_map(
            |(last_revision_per_shard, data_dir_fingerprint)| SealReport {
                last_revision_per_shard,
                data_dir_fingerprint,
            },
        )
        .boxed()
}

pub fn readiness() -> BoxedStrategy<ReadinessSnapshot> {
    (text_vec(), any::<bool>(), u64_vec())
        .prop_map(
            |(listening_on, healthz_ok, advertised_revision_per_shard)| ReadinessSnapshot {
                listening_on,
                healthz_ok,
                advertised_revision_per_shard,
            },
        )
        .boxed()
}

pub fn state_snapshot() -> BoxedStrategy<StateSnapshot> {
    (any::<u32>(), any::<u64>(), u64_vec())
        .prop_map(
            |(shard_count, open_conns, last_revision_per_shard)| StateSnapshot {
                shard_count,
                open_conns,
                last_revision_per_shard,
            },
        )
        .boxed()
}

/// Every `AbortReason` variant.
pub fn abort_reason() -> BoxedStrategy<AbortReason> {
    prop_oneof![
        text().prop_map(AbortReason::SpawnFailed),
        Just(AbortReason::SuccessorExited),
        Just(AbortReason::SuccessorDisconnected),
        Just(AbortReason::DeadlineExceeded),
        Just(AbortReason::PeerSilent),
        text().prop_map(AbortReason::IncumbentUnreachable),
        text().prop_map(AbortReason::DrainFailed),
        text().prop_map(AbortReason::SealFailed),
        Just(AbortReason::LockUnavailable),
        text().prop_map(AbortReason::ReadinessRejected),
        text().prop_map(AbortReason::ProtocolViolation),
        text().prop_map(AbortReason::ListenerMismatch),
        Just(AbortReason::SupervisorLost),
        text().prop_map(AbortReason::JournalFailed),
    ]
    .boxed()
}

pub fn peer_role() -> BoxedStrategy<PeerRole> {
    prop_oneof![
        Just(PeerRole::Supervisor),
        Just(PeerRole::Incumbent),
        Just(PeerRole::Successor),
    ]
    .boxed()
}

/// Every `DaemonStatus` variant.
pub fn daemon_status() -> BoxedStrategy<DaemonStatus> {
    prop_oneof![
        Just(DaemonStatus::Starting),
        Just(DaemonStatus::Serving),
        handoff_id().prop_map(DaemonStatus::InHandoff),
        handoff_id().prop_map(DaemonStatus::Reclaiming),
        Just(DaemonStatus::Successor),
        Just(DaemonStatus::Retired),
    ]
    .boxed()
}

pub fn hello() -> BoxedStrategy<Hello> {
    (peer_role(), version_range(), pid(), text())
        .prop_map(|(role, versions, pid, build_id)| Hello {
            role,
            versions,
            pid,
            build_id,
        })
        .boxed()
}

pub fn hello_ack() -> BoxedStrategy<HelloAck> {
    (peer_role(), any::<u16>(), pid(), text(), daemon_status())
        .prop_map(|(role, version, pid, build_id, status)| HelloAck {
            role,
            version,
            pid,
            build_id,
            status,
        })
        .boxed()
}

/// Every one of the 21 `Message` variants with arbitrary contents; handoff ids from `ids`.
pub fn message_with(ids: BoxedStrategy<HandoffId>) -> BoxedStrategy<Message> {
    let ms = prop_oneof![3 => 0u64..100_000, 1 => any::<u64>()];
    let count = prop_oneof![3 => 0u32..400, 1 => any::<u32>()];
    prop_oneof![
        hello().prop_map(Message::Hello),
        hello_ack().prop_map(Message::HelloAck),
        (ids.clone(), ms.clone(), count.clone()).prop_map(|(handoff, deadline_ms, listeners)| {
            Message::Welcome {
                handoff,
                deadline_ms,
                listeners,
            }
        }),
        listener_batch().prop_map(|batch| Message::Listeners { batch }),
        count.prop_map(|count| Message::ListenersAck { count }),
        (ids.clone(), any::<u32>(), ms.clone(), ms).prop_map(
            |(handoff, successor, drain_grace_ms, deadline_ms)| Message::Prepare {
                handoff,
                successor,
                drain_grace_ms,
                deadline_ms,
            }
        ),
        (ids.clone(), drain_report())
            .prop_map(|(handoff, report)| Message::Drained { handoff, report }),
        (ids.clone(), text())
            .prop_map(|(handoff, reason)| Message::DrainFailed { handoff, reason }),
        ids.clone().prop_map(|handoff| Message::Seal { handoff }),
        (ids.clone(), seal_report())
            .prop_map(|(handoff, report)| Message::Sealed { handoff, report }),
        (ids.clone(), text()).prop_map(|(handoff, reason)| Message::SealFailed { handoff, reason }),
        (ids.clone(), seal_report()).prop_map(|(handoff, seal)| Message::Begin { handoff, seal }),
        (ids.clone(), readiness())
            .prop_map(|(handoff, readiness)| Message::Ready { handoff, readiness }),
        ids.clone().prop_map(|handoff| Message::Commit { handoff }),
        ids.clone()
            .prop_map(|handoff| Message::CommitAck { handoff }),
        (ids.clone(), abort_reason())
            .prop_map(|(handoff, reason)| Message::Abort { handoff, reason }),
        (ids.clone(), state_snapshot())
            .prop_map(|(handoff, snapshot)| Message::Resumed { handoff, snapshot }),
        (ids, text()).prop_map(|(handoff, reason)| Message::ResumeFailed { handoff, reason }),
        Just(Message::Heartbeat),
        Just(Message::ReturnListeners),
        text().prop_map(|reason| Message::Refused { reason }),
    ]
    .boxed()
}

/// Any message, any handoff id.
pub fn message() -> BoxedStrategy<Message> {
    message_with(handoff_id())
}

/// Every `JournalRecord` variant with arbitrary contents.
pub fn journal_record() -> BoxedStrategy<JournalRecord> {
    prop_oneof![
        (prop::option::of(pid()), handoff_id()).prop_map(|(serving, last_handoff)| {
            JournalRecord::Idle {
                serving,
                last_handoff,
            }
        }),
        (handoff_id(), pid(), pid()).prop_map(|(handoff, incumbent, successor)| {
            JournalRecord::InFlight {
                handoff,
                incumbent,
                successor,
            }
        }),
        (handoff_id(), pid(), pid()).prop_map(|(handoff, incumbent, successor)| {
            JournalRecord::Committing {
                handoff,
                incumbent,
                successor,
            }
        }),
    ]
    .boxed()
}

pub fn lock_record() -> BoxedStrategy<LockRecord> {
    (
        prop_oneof![3 => 0u32..8, 1 => any::<u32>()],
        prop::option::of(small_handoff_id()),
    )
        .prop_map(|(owner, committed)| LockRecord { owner, committed })
        .boxed()
}

/// How to damage a byte stream.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Cut the stream at a point.
    Truncate(Index),
    /// Insert bytes at a point.
    Insert(Index, Vec<u8>),
    /// Remove one byte.
    Remove(Index),
    /// Overwrite the length field of the first frame (bytes 0..4).
    Length(u32),
}

pub fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<Index>().prop_map(Mutation::Remove),
        1 => prop_oneof![0u32..8, Just(handoff_proto::wire::MAX_FRAME_LEN),
                         Just(handoff_proto::wire::MAX_FRAME_LEN + 1), any::<u32>()]
            .prop_map(Mutation::Length),
    ]
    .boxed()
}

pub fn apply_mutation(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, mask) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes[at] ^= mask;
        }
        Mutation::Truncate(i) => {
            let at = i.index(bytes.len() + 1);
            bytes.truncate(at);
        }
        Mutation::Insert(i, b) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove(i) if !bytes.is_empty() => {
            let at = i.index(bytes.len());
            bytes.remove(at);
        }
        Mutation::Length(len) if bytes.len() >= 4 => {
            bytes[0..4].copy_from_slice(&len.to_le_bytes());
        }
        _ => {}
    }
}

/// Bytes a peer could send: pure noise, or valid frames (under version 0, 1 or any) that were
/// then damaged.
pub fn hostile_bytes() -> BoxedStrategy<Vec<u8>> {
    let version = prop_oneof![Just(0u16), Just(1u16), any::<u16>()];
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..64),
        3 => (
            prop::collection::vec((version, message()), 1..4),
            prop::collection::vec(mutation(), 0..4),
        )
            .prop_map(|(frames, mutations)| {
                let mut bytes: Vec<u8> = frames
                    .iter()
                    .flat_map(|(v, m)| encode(*v, m).expect("generated messages encode"))
                    .collect();
                for m in &mutations {
                    apply_mutation(&mut bytes, m);
                }
                bytes
            }),
    ]
    .boxed()
}

/// Split `bytes` at the given cut points (each taken modulo the length + 1), in order.
pub fn chunk<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Chunk boundaries: none, a few random ones, or every byte (`None`).
pub fn chunking() -> BoxedStrategy<Option<Vec<Index>>> {
    prop_oneof![
        1 => Just(Some(Vec::new())),
        6 => prop::collection::vec(any::<Index>(), 1..24).prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// Apply a `chunking()` value.
pub fn chunks<'a>(bytes: &'a [u8], chunking: &Option<Vec<Index>>) -> Vec<&'a [u8]> {
    match chunking {
        Some(cuts) => chunk(bytes, cuts),
        None => bytes.chunks(1).collect(),
    }
}
