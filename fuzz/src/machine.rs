//! What the three machine targets share: simulated time, frame checks, a well-behaved
//! peer's framing, small handoff ids, and the byte encoding of the ops a seed run uses.
//!
//! The harnesses are ports of `handoff-proto/tests/prop_machines.rs` (same ops, same
//! cooperating `Honest` environment, same invariant checks on the drained outputs), with
//! the ops decoded by `arbitrary` from the fuzzer's bytes instead of drawn by proptest.

use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use handoff_proto::wire::{encode, Decoder, Frame, Message, VersionRange, HANDSHAKE_VERSION};
use handoff_proto::{DaemonConfig, HandoffId, ListenerInfo, ListenerKind, Pid, Timing};

/// At most this many ops per input: longer inputs only slow the fuzzer down.
pub const MAX_OPS: usize = 256;

/// Decode ops from `data` until it runs out (or `MAX_OPS`), handing each to `apply`.
pub fn for_each_op<'a, T: Arbitrary<'a>>(data: &'a [u8], mut apply: impl FnMut(T)) {
    let mut u = Unstructured::new(data);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            return;
        }
        match T::arbitrary(&mut u) {
            Ok(op) => apply(op),
            Err(_) => return,
        }
    }
}

/// Monotonic time: a fixed base plus an offset that only grows.
#[derive(Debug)]
pub struct Clock {
    /// The start.
    pub base: Instant,
    offset: Duration,
}

impl Clock {
    /// Time zero is now.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            offset: Duration::ZERO,
        }
    }

    /// The current time.
    pub fn now(&self) -> Instant {
        self.base + self.offset
    }

    /// Let `ms` pass.
    pub fn advance(&mut self, ms: u64) {
        self.offset += Duration::from_millis(ms);
    }

    /// Jump to `at` if it lies ahead.
    pub fn advance_to(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            if at > self.now() {
                self.offset = at - self.base;
            }
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// A frame a machine emits must be encodable and decodable by its peer: under the handshake
/// version only a handshake message may travel (the peer's decoder rejects anything else).
pub fn check_frame(frame: &Frame) {
    let bytes = frame
        .encode()
        .unwrap_or_else(|e| panic!("machine emitted an unencodable frame: {e}"));
    assert!(
        frame.version != HANDSHAKE_VERSION || frame.message.is_handshake(),
        "{} sent under the handshake version: the peer cannot decode it",
        frame.message.kind()
    );
    let mut d = Decoder::new(VersionRange {
        min: 1,
        max: u16::MAX,
    });
    if frame.version != HANDSHAKE_VERSION {
        d.set_negotiated(frame.version);
    }
    d.push(&bytes);
    assert_eq!(d.next_message(), Ok(Some(frame.message.clone())));
    record(Direction::FromMachine, &bytes);
}

/// Frame `msg` the way a well-behaved peer does: `Hello`/`HelloAck` and anything before
/// negotiation under the handshake version, the rest under the negotiated one. It never
/// cannot be encoded; the fuzz inputs are far too short for a message to exceed the frame
/// limit.
pub fn frame_as_peer(msg: &Message, negotiated: Option<u16>) -> Vec<u8> {
    let version = match (msg, negotiated) {
        (Message::Hello(_) | Message::HelloAck(_), _) | (_, None) => HANDSHAKE_VERSION,
        (_, Some(v)) => v,
    };
    let bytes = encode(version, msg).expect("a message from a short fuzz input encodes");
    record(Direction::ToMachine, &bytes);
    bytes
}

/// Which way recorded bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Framed by the harness as a peer and fed in.
    ToMachine,
    /// Emitted by the machine.
    FromMachine,
}

/// Frames recorded in order, each with its direction.
pub type Frames = Vec<(Direction, Vec<u8>)>;

thread_local! {
    static RECORDING: std::cell::RefCell<Option<Frames>> = const { std::cell::RefCell::new(None) };
}

fn record(dir: Direction, bytes: &[u8]) {
    RECORDING.with(|r| {
        if let Some(frames) = r.borrow_mut().as_mut() {
            frames.push((dir, bytes.to_vec()));
        }
    });
}

/// Run `f` and return, with its result, every frame fed to a machine and emitted by it
/// meanwhile, in order (the seed generator writes them as `frame_decoder` inputs).
pub fn recording<T>(f: impl FnOnce() -> T) -> (T, Frames) {
    RECORDING.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = f();
    let frames = RECORDING
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default();
    (out, frames)
}

/// A handoff id as the machine tests want them: mostly from {1, 2, 3}, sometimes 0, and the
/// full range when the fuzzer asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum Id {
    /// 1 + n % 3.
    Small(u8),
    /// 0.
    Zero,
    /// Anything.
    Any(u64),
}

impl Id {
    /// The id.
    pub fn get(self) -> HandoffId {
        HandoffId(match self {
            Id::Small(n) => 1 + u64::from(n % 3),
            Id::Zero => 0,
            Id::Any(n) => n,
        })
    }
}

/// A daemon's configuration for the harnesses.
pub fn daemon_config(pid: Pid, listeners: Vec<ListenerInfo>) -> DaemonConfig {
    DaemonConfig {
        pid,
        build_id: "build".into(),
        versions: handoff_proto::wire::SUPPORTED_VERSIONS,
        timing: Timing::default(),
        listeners,
    }
}

/// `n` listeners of all four kinds.
pub fn listeners(n: usize) -> Vec<ListenerInfo> {
    (0..n)
        .map(|i| ListenerInfo {
            name: format!("l{i}"),
            kind: [
                ListenerKind::Tcp,
                ListenerKind::Udp,
                ListenerKind::UnixStream,
                ListenerKind::UnixDatagram,
            ][i % 4],
        })
        .collect()
}

/// Bytes that `arbitrary`'s derive decodes as variant `index` of an enum of `count`
/// variants (it reads a `u32` and scales it: `(x * count) >> 32`). The seed generator uses
/// it and checks the result by decoding it back, so a change in `arbitrary`'s encoding
/// fails there, not silently.
pub fn variant(index: u32, count: u32) -> [u8; 4] {
    assert!(index < count);
    let x = (u64::from(index) << 32).div_ceil(u64::from(count));
    u32::try_from(x)
        .expect("index < count keeps x below 2^32")
        .to_le_bytes()
}

/// Milestones a run reached, one bit each: the seed generator keeps runs that reach new ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reached(pub u32);

impl Reached {
    /// Note milestone `bit`.
    pub fn set(&mut self, bit: u32) {
        self.0 |= 1 << bit;
    }
}

/// `FUZZ_TRACE=1` prints every input and output (use it when replaying one input).
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// The harnesses keep the `?`-style of the property tests they were ported from; a broken
/// invariant panics (`assert!`), so the error type is empty.
pub type TestResult = Result<(), std::convert::Infallible>;
