//! Version negotiation over real frames: a supervisor that speaks versions 1..=2 against an
//! incumbent that speaks only 1 settles on 1, every later frame carries 1, and a frame under
//! any other version is rejected; builds with no common version refuse each other clearly.

use std::time::{Duration, Instant};

use handoff_proto::incumbent::{DaemonConfig, IncumbentOutput};
use handoff_proto::supervisor::{
    HandoffSpec, Peer, Supervisor, SupervisorConfig, SupervisorOutput,
};
use handoff_proto::wire::{encode, DecodeError, Message, VersionRange, HANDSHAKE_VERSION};
use handoff_proto::{
    ConnId, Error, HandoffId, Incumbent, ListenerInfo, ListenerKind, PeerMisbehaved, Timing,
};

const V1: VersionRange = VersionRange { min: 1, max: 1 };
const V12: VersionRange = VersionRange { min: 1, max: 2 };
const V2: VersionRange = VersionRange { min: 2, max: 2 };

fn incumbent(versions: VersionRange) -> Incumbent {
    Incumbent::serving(DaemonConfig {
        pid: 10,
        build_id: "old".into(),
        versions,
        timing: Timing::default(),
        listeners: vec![ListenerInfo {
            name: "http".into(),
            kind: ListenerKind::Tcp,
        }],
    })
}

fn supervisor(versions: VersionRange) -> Supervisor {
    let mut s = Supervisor::with_incumbent(
        SupervisorConfig {
            pid: 1,
            build_id: "sup".into(),
            versions,
            timing: Timing {
                recovery_wait: Duration::from_secs(5),
                ..Timing::default()
            },
            listeners: vec![ListenerInfo {
                name: "http".into(),
                kind: ListenerKind::Tcp,
            }],
        },
        10,
        HandoffId(0),
    );
    while s.poll_output().is_some() {}
    s
}

/// Encoded frames the supervisor sends to `to`, in order.
fn sup_frames(s: &mut Supervisor, to: Peer) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some(o) = s.poll_output() {
        if let SupervisorOutput::Send { to: t, frame } = o {
            if t == to {
                v.push((frame.version, frame.encode().expect("encodes")));
            }
        }
    }
    v
}

fn inc_frames(m: &mut Incumbent) -> Vec<(u16, Message)> {
    let mut v = Vec::new();
    while let Some(o) = m.poll_output() {
        if let IncumbentOutput::Send { frame, .. } = o {
            v.push((frame.version, frame.message));
        }
    }
    v
}

/// Drive the supervisor up to its Hello to the incumbent.
fn to_incumbent_hello(s: &mut Supervisor, now: Instant, succ_version: u16) -> Vec<u8> {
    s.handle_trigger(
        now,
        HandoffSpec {
            drain_grace: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
        },
    )
    .unwrap();
    s.handle_spawned(now, 20).unwrap();
    s.handle_journal_written(now).unwrap();
    // The successor is a build of the supervisor's choice; it answers `succ_version`.
    let _ = sup_frames(s, Peer::Successor);
    let ack = Message::HelloAck(handoff_proto::wire::HelloAck {
        role: handoff_proto::wire::PeerRole::Successor,
        version: succ_version,
        pid: 20,
        build_id: "new".into(),
        status: handoff_proto::wire::DaemonStatus::Successor,
    });
    s.handle_bytes(
        now,
        Peer::Successor,
        &encode(HANDSHAKE_VERSION, &ack).unwrap(),
    )
    .unwrap();
    s.handle_message(now, Peer::Successor, Message::ListenersAck { count: 1 })
        .unwrap();
    let _ = s.poll_output(); // Welcome, Listeners, Connect ...
    while s.poll_output().is_some() {}
    s.handle_connected(now, 10).unwrap();
    let frames = sup_frames(s, Peer::Incumbent);
    assert_eq!(frames.len(), 1, "one Hello");
    assert_eq!(
        frames[0].0, HANDSHAKE_VERSION,
        "Hello travels under version 0"
    );
    frames[0].1.clone()
}

#[test]
fn v1_only_incumbent_and_v1_to_v2_supervisor_settle_on_v1() {
    let now = Instant::now();
    let mut s = supervisor(V12);
    let mut m = incumbent(V1);
    let hello = to_incumbent_hello(&mut s, now, 2);

    m.handle_connected(now, ConnId(1)).unwrap();
    m.handle_bytes(now, ConnId(1), &hello).unwrap();
    let answers = inc_frames(&mut m);
    let (v, ack) = &answers[0];
    assert_eq!(*v, HANDSHAKE_VERSION);
    let Message::HelloAck(a) = ack else {
        panic!("expected HelloAck, got {ack:?}")
    };
    assert_eq!(a.version, 1, "highest version both speak");

    // The supervisor takes the answer and its next frame (Prepare) carries version 1.
    s.handle_bytes(now, Peer::Incumbent, &encode(*v, ack).unwrap())
        .unwrap();
    let next = sup_frames(&mut s, Peer::Incumbent);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, 1, "Prepare is sent under the negotiated version");
    m.handle_bytes(now, ConnId(1), &next[0].1).unwrap();
    assert_eq!(m.phase_name(), "draining");

    // A frame under version 2 is now a protocol error, even though the supervisor speaks 2.
    let stray = encode(2, &Message::Heartbeat).unwrap();
    let err = m.handle_bytes(now, ConnId(1), &stray).unwrap_err();
    assert_eq!(
        err,
        Error::Peer(PeerMisbehaved::Decode(DecodeError::UnsupportedVersion {
            got: 2,
            supported: V1
        }))
    );
    // ... and the incumbent treats its supervisor as lost: it stops draining on its own.
    let outs: Vec<_> = std::iter::from_fn(|| m.poll_output()).collect();
    assert!(outs
        .iter()
        .any(|o| matches!(o, IncumbentOutput::Close { conn: ConnId(1) })));
}

#[test]
fn a_v1_to_v2_peer_rejects_version_2_frames_after_settling_on_1() {
    let now = Instant::now();
    let mut s = supervisor(V12);
    let mut m = incumbent(V12);
    let hello = to_incumbent_hello(&mut s, now, 2);
    // Pretend the supervisor were v1-only by rewriting its Hello: the incumbent then picks 1.
    let Message::Hello(mut h) = handoff_proto::wire::decode_body(&hello[6..]).unwrap() else {
        panic!("not a Hello")
    };
    h.versions = V1;
    m.handle_connected(now, ConnId(1)).unwrap();
    m.handle_bytes(now, ConnId(1), &encode(0, &Message::Hello(h)).unwrap())
        .unwrap();
    let answers = inc_frames(&mut m);
    let Message::HelloAck(a) = &answers[0].1 else {
        panic!("expected HelloAck")
    };
    assert_eq!(a.version, 1);
    let err = m
        .handle_bytes(now, ConnId(1), &encode(2, &Message::Heartbeat).unwrap())
        .unwrap_err();
    assert_eq!(
        err,
        Error::Peer(PeerMisbehaved::Decode(DecodeError::VersionMismatch {
            got: 2,
            expected: 1
        }))
    );
}

#[test]
fn builds_without_a_common_version_refuse_each_other_and_nothing_drains() {
    let now = Instant::now();
    let mut s = supervisor(V2);
    let mut m = incumbent(V1);
    let hello = to_incumbent_hello(&mut s, now, 2);
    m.handle_connected(now, ConnId(1)).unwrap();
    let err = m.handle_bytes(now, ConnId(1), &hello).unwrap_err();
    assert!(matches!(
        err,
        Error::Peer(PeerMisbehaved::NoCommonVersion(_))
    ));
    let answers = inc_frames(&mut m);
    let Message::Refused { reason } = &answers[0].1 else {
        panic!("expected Refused, got {answers:?}")
    };
    assert!(reason.contains("no common protocol version"), "{reason}");
    assert_eq!(m.phase_name(), "serving", "the incumbent keeps serving");

    // The supervisor hears the refusal and abandons the handoff before touching anything.
    let refused = encode(answers[0].0, &answers[0].1).unwrap();
    let _ = s.handle_bytes(now, Peer::Incumbent, &refused);
    assert_eq!(s.phase_name(), "aborting");
}
