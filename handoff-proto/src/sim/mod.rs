//! The simulation harness of the three role machines (feature `sim`), shared by the property
//! tests (`tests/prop_machines.rs`), the fuzz targets (`fuzz/src`) and their corpus replay.
//!
//! For each machine (`incumbent`, `successor`, `supervisor`) it holds:
//!
//! - `Op`, the `Arbitrary` operation enum a fuzzer decodes from bytes (its encoding is the
//!   one the committed corpus was written in: do not reorder its variants), and the
//!   harness's own op type (`IncOp`, `SuccOp`, `SupOp`), which property tests draw with
//!   proptest strategies;
//! - the honest environment: `Honest(sel)` ops in which a cooperating peer, driver and
//!   application perform one obligation the machine asked for, so that random runs reach
//!   the deep phases;
//! - the invariant checkers: after every op the machine's outputs are drained and checked
//!   against a model built from the outputs alone; a broken invariant is a [`Violation`],
//!   never a panic (the caller decides: a property test fails the case, a fuzz target
//!   panics).
//!
//! Milestones ([`Reached`]) record how deep a run got, for coverage checks.

use std::fmt;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;

use crate::wire::{
    decode_body, encode, Decoder, Frame, Message, VersionRange, HANDSHAKE_VERSION, MAX_FRAME_LEN,
};
use crate::{DaemonConfig, HandoffId, ListenerInfo, ListenerKind, Pid, Timing};

/// A broken invariant: what was expected, and where the harness checked it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    message: String,
    at: &'static str,
}

impl Violation {
    /// A violation with this message, checked at `at` (`file:line`).
    pub fn new(message: impl Into<String>, at: &'static str) -> Self {
        Self {
            message: message.into(),
            at,
        }
    }

    /// What broke.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where the harness checked it (`file:line`).
    pub fn at(&self) -> &'static str {
        self.at
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invariant violated: {} (at {})", self.message, self.at)
    }
}

impl std::error::Error for Violation {}

/// A [`Violation`] with a formatted message, at the caller's line.
macro_rules! violation {
    ($($fmt:tt)+) => {
        $crate::sim::Violation::new(format!($($fmt)+), concat!(file!(), ":", line!()))
    };
}

/// `assert!` that returns a [`Violation`] instead of panicking.
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            return Err(violation!("{}", stringify!($cond)));
        }
    };
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(violation!($($fmt)+));
        }
    };
}

/// `assert_eq!` that returns a [`Violation`] instead of panicking.
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {
        match (&$left, &$right) {
            (l, r) => {
                if !(*l == *r) {
                    return Err(violation!(
                        "{} == {}: left {:?}, right {:?}",
                        stringify!($left),
                        stringify!($right),
                        l,
                        r
                    ));
                }
            }
        }
    };
    ($left:expr, $right:expr, $($fmt:tt)+) => {
        match (&$left, &$right) {
            (l, r) => {
                if !(*l == *r) {
                    return Err(violation!(
                        "{}: left {:?}, right {:?}",
                        format!($($fmt)+),
                        l,
                        r
                    ));
                }
            }
        }
    };
}

pub mod handoff;
pub mod incumbent;
pub mod successor;
pub mod supervisor;
pub mod world;

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
pub fn check_frame(frame: &Frame) -> Result<(), Violation> {
    let bytes = frame
        .encode()
        .map_err(|e| violation!("machine emitted an unencodable frame: {e}"))?;
    ensure!(
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
    ensure_eq!(d.next_message(), Ok(Some(frame.message.clone())));
    record(Direction::FromMachine, &bytes);
    Ok(())
}

/// The frames a channel could have delivered, found by length alone (ignoring the version
/// checks, which only ever reject more). A superset of what the machine decoded, so facts
/// "X was received" derived from it are never missing something the machine saw.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    buf: Vec<u8>,
    dead: bool,
}

impl Scan {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        if self.dead {
            return out;
        }
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= 4 {
            let len = u32::from_le_bytes(self.buf[0..4].try_into().unwrap());
            if !(2..=MAX_FRAME_LEN).contains(&len) {
                self.dead = true;
                break;
            }
            let total = 4 + len as usize;
            if self.buf.len() < total {
                break;
            }
            match decode_body(&self.buf[6..total]) {
                Ok(m) => out.push(m),
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
            self.buf.drain(..total);
        }
        out
    }
}

/// Frame `msg` the way a well-behaved peer does: `Hello`/`HelloAck` and anything before
/// negotiation under the handshake version, the rest under the negotiated one. It never
/// cannot be encoded: the harnesses' messages are far too short to exceed the frame limit.
pub fn frame_as_peer(msg: &Message, negotiated: Option<u16>) -> Vec<u8> {
    let version = match (msg, negotiated) {
        (Message::Hello(_) | Message::HelloAck(_), _) | (_, None) => HANDSHAKE_VERSION,
        (_, Some(v)) => v,
    };
    let bytes = encode(version, msg).expect("a harness message encodes");
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

/// A handoff id as the machine harnesses want them: mostly from {1, 2, 3}, sometimes 0, and
/// the full range when the input asks for it.
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
        versions: crate::wire::SUPPORTED_VERSIONS,
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

/// Milestones a run reached, one bit each: the coverage tests check that random runs get
/// deep, and the fuzz seed generator keeps runs that reach new ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reached(pub u32);

impl Reached {
    /// Note milestone `bit`.
    pub fn set(&mut self, bit: u32) {
        self.0 |= 1 << bit;
    }
}

/// `PROP_TRACE=1` (property tests) or `FUZZ_TRACE=1` (corpus replay) prints every input
/// and output to stderr: use it when replaying a single case.
pub fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| {
        std::env::var_os("PROP_TRACE").is_some() || std::env::var_os("FUZZ_TRACE").is_some()
    })
}
