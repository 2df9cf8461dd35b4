//! Property tests of the wire format, the incremental decoder, version negotiation and the
//! journal encoding.

mod prop_support;

use std::collections::BTreeSet;

use handoff_proto::journal::{self, decide, Decision, JournalError, Observation, Resolution};
use handoff_proto::wire::{
    decode_body, encode, DaemonStatus, DecodeError, Decoder, Message, VersionRange,
    HANDSHAKE_VERSION, MESSAGE_KINDS, SUPPORTED_VERSIONS,
};
use handoff_proto::{JournalRecord, Pid};
use prop_support::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestRunner;

/// A decoder in the state a session is in when frames of `version` are legal: before
/// negotiation for the handshake version, negotiated to `version` otherwise.
fn decoder_for(version: u16) -> Decoder {
    if version == HANDSHAKE_VERSION {
        Decoder::new(SUPPORTED_VERSIONS)
    } else {
        let mut d = Decoder::new(VersionRange {
            min: version,
            max: version,
        });
        d.set_negotiated(version);
        d
    }
}

/// A message and a header version it may legally travel under: the handshake version only for
/// handshake messages, any other version for every message.
fn versioned_message() -> BoxedStrategy<(u16, Message)> {
    message()
        .prop_flat_map(|m| {
            let v = if m.is_handshake() {
                prop_oneof![2 => Just(HANDSHAKE_VERSION), 2 => Just(1u16), 1 => 1u16..=u16::MAX]
                    .boxed()
            } else {
                prop_oneof![3 => Just(1u16), 1 => 1u16..=u16::MAX].boxed()
            };
            (v, Just(m))
        })
        .boxed()
}

fn handshake_message() -> BoxedStrategy<Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        hello_ack().prop_map(Message::HelloAck),
        text().prop_map(|reason| Message::Refused { reason }),
    ]
    .boxed()
}

// ---- generator sanity ----

#[test]
fn message_strategy_generates_all_21_variants() {
    let mut runner = TestRunner::deterministic();
    let strategy = message();
    let mut kinds = BTreeSet::new();
    for _ in 0..5000 {
        let m = strategy.new_tree(&mut runner).expect("strategy").current();
        kinds.insert(m.kind());
    }
    assert_eq!(kinds.len(), MESSAGE_KINDS as usize, "kinds seen: {kinds:?}");
}

// ---- frames ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// `encode` then a decoder in the matching session state gives back exactly the message,
    /// whatever the chunking, and nothing before the frame's last byte.
    #[test]
    fn encoded_frame_decodes_to_same_message_under_any_chunking(
        (version, msg) in versioned_message(),
        chunking in chunking(),
    ) {
        let bytes = encode(version, &msg).expect("encodes");
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        prop_assert_eq!(len + 4, bytes.len());
        prop_assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), version);
        // The body alone decodes too.
        prop_assert_eq!(&decode_body(&bytes[6..]).expect("body"), &msg);

        let mut d = decoder_for(version);
        let parts = chunks(&bytes, &chunking);
        let mut got = Vec::new();
        let mut pushed = 0;
        for c in &parts {
            d.push(c);
            pushed += c.len();
            while let Some(m) = d.next_message().expect("valid frame") {
                prop_assert_eq!(pushed, bytes.len(), "message before the frame's last byte");
                got.push(m);
            }
            if pushed < bytes.len() {
                prop_assert!(d.finish().is_err(), "finish accepted a partial frame");
            }
        }
        prop_assert_eq!(got, vec![msg]);
        prop_assert_eq!(d.buffered(), 0);
        prop_assert_eq!(d.finish(), Ok(()));
    }

    /// Several frames of a session, written back to back, decode in order under any chunking:
    /// a handshake prefix under version 0, then (after `set_negotiated`, as a machine does it
    /// on the message that negotiates) the rest under the negotiated version.
    #[test]
    fn concatenated_frames_decode_in_order(
        handshake in prop::collection::vec(handshake_message(), 0..3),
        negotiated in prop_oneof![3 => Just(1u16), 1 => 1u16..=u16::MAX],
        rest in prop::collection::vec(message(), 0..8),
        chunking in chunking(),
    ) {
        let mut bytes = Vec::new();
        for m in &handshake {
            bytes.extend(encode(HANDSHAKE_VERSION, m).expect("encodes"));
        }
        for m in &rest {
            bytes.extend(encode(negotiated, m).expect("encodes"));
        }
        let mut d = Decoder::new(VersionRange { min: 1, max: u16::MAX });
        if handshake.is_empty() {
            d.set_negotiated(negotiated);
        }
        let mut got = Vec::new();
        for c in chunks(&bytes, &chunking) {
            d.push(c);
            while let Some(m) = d.next_message().expect("valid stream") {
                got.push(m);
                if got.len() == handshake.len() {
                    d.set_negotiated(negotiated);
                }
            }
        }
        let want: Vec<Message> = handshake.into_iter().chain(rest).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(d.finish(), Ok(()));
    }

    /// A non-handshake message under the handshake version is rejected, also when split.
    #[test]
    fn non_handshake_message_under_version_0_is_rejected(
        msg in message().prop_filter("not handshake", |m| !m.is_handshake()),
        chunking in chunking(),
    ) {
        let bytes = encode(HANDSHAKE_VERSION, &msg).expect("encodes");
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        let mut err = None;
        for c in chunks(&bytes, &chunking) {
            d.push(c);
            match d.next_message() {
                Ok(None) => {}
                Ok(Some(m)) => prop_assert!(false, "decoded {:?}", m),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        prop_assert_eq!(err, Some(DecodeError::NotHandshake { kind: msg.kind() }));
    }

    /// Before negotiation only version 0 passes, after it only the negotiated version: any
    /// other header version is an error, raised as soon as the header is complete.
    #[test]
    fn wrong_header_version_is_rejected_at_the_header(
        msg in message(),
        negotiated in prop::option::of(1u16..4),
        version in prop_oneof![0u16..5, any::<u16>()],
    ) {
        let legal = negotiated.unwrap_or(HANDSHAKE_VERSION);
        // The one legal version, moved off by one: still any kind of wrong version.
        let version = if version == legal { version.wrapping_add(1) } else { version };
        let bytes = encode(version, &msg).expect("encodes");
        let mut d = Decoder::new(VersionRange { min: 1, max: 3 });
        if let Some(n) = negotiated {
            d.set_negotiated(n);
        }
        d.push(&bytes[..6]);
        let e = d.next_message().expect_err("version accepted");
        let kind_ok = matches!(
            e,
            DecodeError::VersionMismatch { .. } | DecodeError::UnsupportedVersion { .. }
        );
        prop_assert!(kind_ok, "{:?}", e);
    }
}

// ---- hostile input ----

/// A decoder state and a stream that mostly fits it (frames under the version that state
/// expects), then possibly damaged: the decoder gets past the first frame and meets damage
/// deep in the stream, not only in the first header.
fn session_bytes() -> BoxedStrategy<(Option<u16>, Vec<u8>)> {
    (
        prop::option::of(prop_oneof![Just(1u16), 2u16..5]),
        prop::collection::vec((message(), prop::bool::weighted(0.9)), 1..6),
        prop_oneof![1 => Just(Vec::new()), 2 => prop::collection::vec(mutation(), 1..3)],
    )
        .prop_map(|(negotiated, frames, mutations)| {
            let mut bytes = Vec::new();
            for (m, fits) in &frames {
                let expected = negotiated.unwrap_or(HANDSHAKE_VERSION);
                let v = if *fits {
                    expected
                } else {
                    expected.wrapping_add(1)
                };
                bytes.extend(encode(v, m).expect("encodes"));
            }
            for m in &mutations {
                apply_mutation(&mut bytes, m);
            }
            (negotiated, bytes)
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// Arbitrary bytes in arbitrary chunkings, negotiated or not: the decoder never panics;
    /// once it reports an error it reports that same error forever (and `finish` too) and
    /// drops further input; anything it does decode re-encodes to a frame that decodes to
    /// the same message.
    #[test]
    fn decoder_never_panics_on_any_chunking(
        (negotiated, bytes) in prop_oneof![
            (prop::option::of(prop_oneof![Just(1u16), any::<u16>()]), hostile_bytes()),
            session_bytes(),
        ],
        chunking in chunking(),
        accept in version_range(),
        extra in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut d = Decoder::new(accept);
        if let Some(v) = negotiated {
            d.set_negotiated(v);
        }
        let mut failed: Option<DecodeError> = None;
        for c in chunks(&bytes, &chunking) {
            d.push(c);
            if let Some(e) = &failed {
                prop_assert_eq!(d.buffered(), 0, "failed decoder buffers input");
                prop_assert_eq!(d.next_message(), Err(e.clone()));
                prop_assert_eq!(d.finish(), Err(e.clone()));
                continue;
            }
            loop {
                match d.next_message() {
                    Ok(Some(m)) => {
                        let v = d.negotiated().unwrap_or(HANDSHAKE_VERSION);
                        let again = encode(v, &m).expect("decoded message re-encodes");
                        let mut d2 = decoder_for(v);
                        d2.push(&again);
                        prop_assert_eq!(d2.next_message(), Ok(Some(m)));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        d.push(&extra);
        if failed.is_none() {
            loop {
                match d.next_message() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        match &failed {
            Some(e) => {
                prop_assert_eq!(d.next_message(), Err(e.clone()));
                prop_assert_eq!(d.next_message(), Err(e.clone()));
                prop_assert_eq!(d.finish(), Err(e.clone()));
            }
            // Everything complete was consumed: `finish` is Ok exactly when nothing is left.
            None => prop_assert_eq!(d.finish().is_ok(), d.buffered() == 0),
        }
    }

    /// `decode_body` never panics on any body, and what it accepts re-encodes.
    #[test]
    fn decode_body_never_panics(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        hostile_bytes().prop_map(|b| b.get(6..).map(<[u8]>::to_vec).unwrap_or_default()),
    ]) {
        if let Ok(m) = decode_body(&body) {
            let again = encode(1, &m).expect("re-encodes");
            prop_assert_eq!(decode_body(&again[6..]), Ok(m));
        }
    }
}

// ---- version negotiation ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// `negotiate` is symmetric; it returns the highest version both ranges contain, and an
    /// error exactly when no version is in both (empty ranges, `min > max`, included).
    #[test]
    fn negotiate_is_symmetric_and_picks_the_highest_common_version(
        a in version_range(),
        b in version_range(),
    ) {
        let ab = a.negotiate(b);
        let ba = b.negotiate(a);
        prop_assert_eq!(ab.is_ok(), ba.is_ok());
        if let (Ok(x), Ok(y)) = (&ab, &ba) {
            prop_assert_eq!(x, y);
        }
        let lo = a.min.max(b.min);
        let hi = a.max.min(b.max);
        let overlap = lo <= hi; // then lo..=hi is in both ranges
        match ab {
            Ok(v) => {
                prop_assert!(overlap);
                prop_assert!(a.contains(v) && b.contains(v));
                prop_assert_eq!(v, hi, "not the highest common version");
            }
            Err(e) => {
                prop_assert!(!overlap, "{:?} and {:?} share {}..={}", a, b, lo, hi);
                prop_assert_eq!(e.ours, a);
                prop_assert_eq!(e.theirs, b);
            }
        }
        // Brute force on small ranges.
        if a.max < 8 && b.max < 8 {
            let common = (0u16..8).filter(|v| a.contains(*v) && b.contains(*v)).max();
            prop_assert_eq!(a.negotiate(b).ok(), common);
        }
    }
}

// ---- journal ----

fn observation() -> BoxedStrategy<Observation> {
    let small_pid = prop_oneof![4 => 0u32..6, 1 => any::<u32>()];
    (
        prop::collection::vec(small_pid.clone(), 0..5),
        prop::option::of((small_pid, daemon_status())),
        any::<bool>(),
    )
        .prop_map(|(alive, answer, waited_out)| Observation {
            alive,
            answer,
            waited_out,
        })
        .boxed()
}

fn small_record() -> BoxedStrategy<JournalRecord> {
    let small_pid = || prop_oneof![4 => 0u32..6, 1 => any::<u32>()];
    prop_oneof![
        (prop::option::of(small_pid()), handoff_id()).prop_map(|(serving, last_handoff)| {
            JournalRecord::Idle {
                serving,
                last_handoff,
            }
        }),
        (handoff_id(), small_pid(), small_pid()).prop_map(|(handoff, incumbent, successor)| {
            JournalRecord::InFlight {
                handoff,
                incumbent,
                successor,
            }
        }),
        (handoff_id(), small_pid(), small_pid()).prop_map(|(handoff, incumbent, successor)| {
            JournalRecord::Committing {
                handoff,
                incumbent,
                successor,
            }
        }),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// Every record round-trips, every strict prefix of its encoding is rejected, and so is
    /// any single damaged byte and anything appended.
    #[test]
    fn journal_round_trips_and_rejects_prefixes_and_damage(
        rec in journal_record(),
        flip_at in any::<Index>(),
        mask in 1u8..=255,
        tail in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = journal::encode(&rec);
        prop_assert_eq!(journal::decode(&bytes), Ok(rec.clone()));
        for cut in 0..bytes.len() {
            prop_assert!(
                journal::decode(&bytes[..cut]).is_err(),
                "prefix of {} of {} bytes accepted", cut, bytes.len()
            );
        }
        let mut damaged = bytes.clone();
        damaged[flip_at.index(bytes.len())] ^= mask;
        prop_assert!(journal::decode(&damaged).is_err(), "damaged record accepted");
        let mut longer = bytes.clone();
        longer.extend(&tail);
        prop_assert!(journal::decode(&longer).is_err(), "trailing bytes accepted");
    }

    /// `journal::decode` never panics: not on noise, not on damaged records, not on a valid
    /// header and checksum around a random body (which reaches the record parser).
    #[test]
    fn journal_decode_never_panics(
        noise in prop::collection::vec(any::<u8>(), 0..48),
        rec in journal_record(),
        mutations in prop::collection::vec(mutation(), 1..4),
        body in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let _ = journal::decode(&noise);
        let mut with_magic = b"HOJ1".to_vec();
        with_magic.extend(&noise);
        let _ = journal::decode(&with_magic);

        let mut damaged = journal::encode(&rec);
        for m in &mutations {
            apply_mutation(&mut damaged, m);
        }
        let _ = journal::decode(&damaged);

        // A well-formed envelope around an arbitrary body.
        let fnv = body.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut framed = b"HOJ1".to_vec();
        framed.extend((body.len() as u32).to_le_bytes());
        framed.extend(&body);
        framed.extend(fnv.to_le_bytes());
        match journal::decode(&framed) {
            Ok(r) => prop_assert_eq!(journal::decode(&journal::encode(&r)), Ok(r)),
            Err(e) => {
                let malformed = matches!(e, JournalError::Malformed(_));
                prop_assert!(malformed, "envelope is valid, only the body can be bad: {:?}", e);
            }
        }
    }

    /// The recovery decision is total, kills nobody when it adopts, only kills processes it
    /// was told about, adopts whoever answers as serving, and waits only while allowed to.
    #[test]
    fn decide_kills_only_before_a_cold_start(
        rec in prop::option::of(small_record()),
        obs in observation(),
    ) {
        let told: BTreeSet<Pid> = obs.alive.iter().copied()
            .chain(obs.answer.map(|(p, _)| p)).collect();
        let in_flight = match &rec {
            Some(JournalRecord::InFlight { handoff, incumbent, successor })
            | Some(JournalRecord::Committing { handoff, incumbent, successor }) => {
                Some((*handoff, *incumbent, *successor))
            }
            _ => None,
        };
        match decide(rec.as_ref(), &obs) {
            Decision::Adopt { pid, resolution } => {
                prop_assert_eq!(obs.answer.map(|a| a.1), Some(DaemonStatus::Serving));
                prop_assert_eq!(Some(pid), obs.answer.map(|a| a.0));
                match (in_flight, resolution) {
                    (None, None) => {}
                    (Some((h, inc, succ)), Some((h2, r))) => {
                        prop_assert_eq!(h, h2);
                        let want = if pid == succ {
                            Resolution::Committed
                        } else if pid == inc {
                            Resolution::RolledBack
                        } else {
                            Resolution::Lost
                        };
                        prop_assert_eq!(r, want);
                    }
                    (a, b) => prop_assert!(false, "record {:?} but resolution {:?}", a, b),
                }
            }
            Decision::Wait => {
                prop_assert!(!obs.waited_out, "waits after the wait ran out");
                prop_assert!(obs.answer.is_some() || !obs.alive.is_empty());
            }
            Decision::ColdStart { kill, resolution } => {
                prop_assert_ne!(obs.answer.map(|a| a.1), Some(DaemonStatus::Serving));
                prop_assert!(kill.iter().all(|k| told.contains(k)));
                // Everyone alive or answering is killed before a cold start.
                prop_assert!(told.iter().all(|p| kill.contains(p)));
                prop_assert_eq!(resolution, in_flight.map(|(h, _, _)| (h, Resolution::Lost)));
            }
        }
    }
}
