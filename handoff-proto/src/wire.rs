//! The wire format: messages, frames, the incremental decoder and version negotiation.
//!
//! A frame is
//!
//! ```text
//! +----------------+-----------------+------------------------------+
//! | len: u32 LE    | version: u16 LE | body: postcard(Message)      |
//! +----------------+-----------------+------------------------------+
//!   len = 2 + body length, at most MAX_FRAME_LEN
//! ```
//!
//! The body is one [`Message`] in postcard encoding: a varint variant tag, then the fields.
//! Variant tags are append-only: a tag is never reused or renumbered, and tags 0 (`Hello`),
//! 1 (`HelloAck`) and 20 (`Refused`) keep their layout in every protocol version, so two builds
//! can always negotiate, or say why not.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{
    AbortReason, DrainReport, HandoffId, ListenerInfo, Pid, ReadinessSnapshot, SealReport,
    StateSnapshot,
};

/// Largest value of the length field: 1 MiB. A batch of 253 listener names of 255 bytes each
/// is about 65 KiB, so no legitimate frame comes close.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Bytes before the body: length (4) and version (2).
pub const HEADER_LEN: usize = 6;

/// Longest free-text field we send (reasons, build ids). Longer text is cut on a char boundary.
pub const MAX_TEXT: usize = 1024;

/// An inclusive range of protocol versions that one build speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

/// The header version of `Hello`, `HelloAck` and a `Refused` sent before negotiation. Their
/// layout is frozen, so any two builds can read them whatever versions they speak.
pub const HANDSHAKE_VERSION: u16 = 0;

/// The versions this build speaks.
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };

impl VersionRange {
    /// Whether `v` lies in the range.
    pub fn contains(self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }

    /// The highest version both ranges contain.
    pub fn negotiate(self, theirs: VersionRange) -> Result<u16, NoCommonVersion> {
        let hi = self.max.min(theirs.max);
        let lo = self.min.max(theirs.min);
        if lo <= hi && self.min <= self.max && theirs.min <= theirs.max {
            Ok(hi)
        } else {
            Err(NoCommonVersion { ours: self, theirs })
        }
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Two builds share no protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours}, the peer speaks {theirs}")]
pub struct NoCommonVersion {
    /// Our range.
    pub ours: VersionRange,
    /// The peer's range.
    pub theirs: VersionRange,
}

/// Which role sent a `Hello`/`HelloAck`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum PeerRole {
    /// The supervisor.
    Supervisor,
    /// The serving daemon.
    Incumbent,
    /// A daemon started for a handoff, not yet committed.
    Successor,
}

/// What a daemon says about itself in `HelloAck`. A restarted supervisor decides its
/// recovery from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum DaemonStatus {
    /// Started cold and still waiting for the data-directory lock.
    Starting,
    /// Serving and holding the data-directory lock, no handoff in progress.
    Serving,
    /// In the middle of a handoff with some supervisor.
    InHandoff(HandoffId),
    /// Lost its supervisor after releasing the lock; waiting to learn whether the successor
    /// committed.
    Reclaiming(HandoffId),
    /// A successor that has not been committed yet.
    Successor,
    /// Committed away; about to exit.
    Retired,
}

/// Opening message of every session, sent by the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Hello {
    /// Who is speaking.
    pub role: PeerRole,
    /// Versions the speaker accepts.
    pub versions: VersionRange,
    /// The speaker's pid.
    pub pid: Pid,
    /// The speaker's build.
    pub build_id: String,
}

/// Answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HelloAck {
    /// Who is answering.
    pub role: PeerRole,
    /// The version chosen; every later frame of the session carries it.
    pub version: u16,
    /// The answering process's pid. The supervisor checks it against the pid it spawned.
    pub pid: Pid,
    /// The answering process's build.
    pub build_id: String,
    /// What the answering process is doing.
    pub status: DaemonStatus,
}

/// Every message of protocol version 1. Directions: S = supervisor, I = incumbent,
/// N = successor ("new").
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Message {
    /// S→I, S→N: open a session (tag 0, frozen).
    Hello(Hello),
    /// I→S, N→S: accept a session (tag 1, frozen).
    HelloAck(HelloAck),
    /// S→N: you are the successor of this handoff; `listeners` descriptors follow.
    Welcome {
        /// The handoff.
        handoff: HandoffId,
        /// Time left until the handoff's deadline, in milliseconds.
        deadline_ms: u64,
        /// How many listeners the following `Listeners` frames carry in all.
        listeners: u32,
    },
    /// S→N or I→S: a batch of listeners; the frame carries exactly `batch.len()` descriptors
    /// in SCM_RIGHTS, in the same order.
    Listeners {
        /// The batch, at most [`crate::MAX_FDS_PER_MESSAGE`] long.
        batch: Vec<ListenerInfo>,
    },
    /// N→S or S→I: all `count` listeners arrived and were checked.
    ListenersAck {
        /// Number of listeners received.
        count: u32,
    },
    /// S→I: start draining.
    Prepare {
        /// The handoff.
        handoff: HandoffId,
        /// The successor's pid. An incumbent that lost its supervisor and finds the lock held
        /// by anyone else knows it was superseded.
        successor: Pid,
        /// How long the drain hook may take, in milliseconds.
        drain_grace_ms: u64,
        /// Time left until the handoff's deadline, in milliseconds.
        deadline_ms: u64,
    },
    /// I→S: drain finished and fsynced.
    Drained {
        /// The handoff.
        handoff: HandoffId,
        /// The drain hook's report.
        report: DrainReport,
    },
    /// I→S: the drain hook failed; the incumbent resumes on its own.
    DrainFailed {
        /// The handoff.
        handoff: HandoffId,
        /// The hook's error.
        reason: String,
    },
    /// S→I: seal the data and release the lock.
    Seal {
        /// The handoff.
        handoff: HandoffId,
    },
    /// I→S: sealed, fsynced, lock released.
    Sealed {
        /// The handoff.
        handoff: HandoffId,
        /// The seal hook's report.
        report: SealReport,
    },
    /// I→S: the seal hook failed; the lock is still held and the incumbent resumes.
    SealFailed {
        /// The handoff.
        handoff: HandoffId,
        /// The hook's error.
        reason: String,
    },
    /// S→N: the incumbent has sealed and released the lock; take it and open the data.
    Begin {
        /// The handoff.
        handoff: HandoffId,
        /// What the incumbent sealed.
        seal: SealReport,
    },
    /// N→S: holding the lock, data open, ready to serve.
    Ready {
        /// The handoff.
        handoff: HandoffId,
        /// What the successor opened.
        readiness: ReadinessSnapshot,
    },
    /// S→N, then S→I: the handoff is committed.
    Commit {
        /// The handoff.
        handoff: HandoffId,
    },
    /// N→S, I→S: commit recorded (N: lock record marked; I: about to exit).
    CommitAck {
        /// The handoff.
        handoff: HandoffId,
    },
    /// S→I, S→N: the handoff is abandoned.
    Abort {
        /// The handoff.
        handoff: HandoffId,
        /// Why.
        reason: AbortReason,
    },
    /// I→S: lock reacquired, resume hook done, serving again.
    Resumed {
        /// The handoff.
        handoff: HandoffId,
        /// The application's state after resuming.
        snapshot: StateSnapshot,
    },
    /// I→S: the resume hook failed. The incumbent keeps the lock and retries the hook every
    /// retry interval; the supervisor keeps waiting for `Resumed` until its deadline plus
    /// slack, then reports the incumbent lost and recovers.
    ResumeFailed {
        /// The handoff.
        handoff: HandoffId,
        /// The hook's error.
        reason: String,
    },
    /// Any direction: still alive.
    Heartbeat,
    /// S→I: send me your listeners (a restarted supervisor taking them back).
    ReturnListeners,
    /// Any direction: the request cannot be served; the session ends.
    Refused {
        /// Why.
        reason: String,
    },
}

/// Number of variants of [`Message`]: tags at or above it are unknown messages.
pub const MESSAGE_KINDS: u32 = 21;

impl Message {
    /// The handoff a message belongs to, if it names one.
    pub fn handoff(&self) -> Option<HandoffId> {
        match self {
            Message::Welcome { handoff, .. }
            | Message::Prepare { handoff, .. }
            | Message::Drained { handoff, .. }
            | Message::DrainFailed { handoff, .. }
            | Message::Seal { handoff }
            | Message::Sealed { handoff, .. }
            | Message::SealFailed { handoff, .. }
            | Message::Begin { handoff, .. }
            | Message::Ready { handoff, .. }
            | Message::Commit { handoff }
            | Message::CommitAck { handoff }
            | Message::Abort { handoff, .. }
            | Message::Resumed { handoff, .. }
            | Message::ResumeFailed { handoff, .. } => Some(*handoff),
            Message::Hello(_)
            | Message::HelloAck(_)
            | Message::Listeners { .. }
            | Message::ListenersAck { .. }
            | Message::Heartbeat
            | Message::ReturnListeners
            | Message::Refused { .. } => None,
        }
    }

    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::HelloAck(_) => "HelloAck",
            Message::Welcome { .. } => "Welcome",
            Message::Listeners { .. } => "Listeners",
            Message::ListenersAck { .. } => "ListenersAck",
            Message::Prepare { .. } => "Prepare",
            Message::Drained { .. } => "Drained",
            Message::DrainFailed { .. } => "DrainFailed",
            Message::Seal { .. } => "Seal",
            Message::Sealed { .. } => "Sealed",
            Message::SealFailed { .. } => "SealFailed",
            Message::Begin { .. } => "Begin",
            Message::Ready { .. } => "Ready",
            Message::Commit { .. } => "Commit",
            Message::CommitAck { .. } => "CommitAck",
            Message::Abort { .. } => "Abort",
            Message::Resumed { .. } => "Resumed",
            Message::ResumeFailed { .. } => "ResumeFailed",
            Message::Heartbeat => "Heartbeat",
            Message::ReturnListeners => "ReturnListeners",
            Message::Refused { .. } => "Refused",
        }
    }

    /// Whether the message may travel under [`HANDSHAKE_VERSION`].
    pub fn is_handshake(&self) -> bool {
        matches!(
            self,
            Message::Hello(_) | Message::HelloAck(_) | Message::Refused { .. }
        )
    }

    /// Descriptors that must travel with this message (only `Listeners` carries any).
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Listeners { batch } => batch.len(),
            _ => 0,
        }
    }
}

/// Cut `s` to at most [`MAX_TEXT`] bytes on a char boundary.
pub fn bounded_text(s: impl Into<String>) -> String {
    let mut s = s.into();
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A message ready to be written: the version it is sent under, and the message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[must_use = "a frame that is not sent breaks the protocol"]
pub struct Frame {
    /// The protocol version in the header.
    pub version: u16,
    /// The body.
    pub message: Message,
}

impl Frame {
    /// Encode the frame: header and body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode(self.version, &self.message)
    }
}

/// Encoding failed. Only a message built from unchecked application input can get here.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame would exceed [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    Oversize {
        /// Length field it would have had.
        len: usize,
    },
    /// postcard refused the message.
    #[error("message cannot be encoded: {0}")]
    Serialize(String),
}

/// Encode one frame.
pub fn encode(version: u16, msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN as usize {
        return Err(EncodeError::Oversize { len });
    }
    out[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4..6].copy_from_slice(&version.to_le_bytes());
    Ok(out)
}

/// Why a byte stream was rejected. Each kind of bad input has its own variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length field is larger than [`MAX_FRAME_LEN`].
    #[error("frame length {len} exceeds the maximum of {max}")]
    Oversize {
        /// The length field.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// The length field is too small to hold a version.
    #[error("frame length {len} is too short to hold a version")]
    TooShort {
        /// The length field.
        len: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// The version is not one this build speaks.
    #[error("protocol version {got} is not supported (supported: {supported})")]
    UnsupportedVersion {
        /// The header's version.
        got: u16,
        /// What we speak.
        supported: VersionRange,
    },
    /// A version this build speaks, but not the one this point of the session requires: the
    /// handshake version 0 before negotiation, the negotiated version after.
    #[error("frame has protocol version {got}, but version {expected} is required here")]
    VersionMismatch {
        /// The header's version.
        got: u16,
        /// The version required.
        expected: u16,
    },
    /// A message other than `Hello`, `HelloAck` or `Refused` under the handshake version.
    #[error("{kind} sent under the handshake version 0")]
    NotHandshake {
        /// The message kind.
        kind: &'static str,
    },
    /// The body's variant tag names no message.
    #[error("unknown message tag {tag}")]
    UnknownMessage {
        /// The tag.
        tag: u32,
    },
    /// The body does not decode as the message its tag names.
    #[error("malformed message body: {0}")]
    Malformed(String),
    /// Bytes were left in the frame after the message.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

/// Incremental frame decoder for one connection.
///
/// Before [`Decoder::set_negotiated`] it accepts only handshake frames (version 0); after, only
/// the negotiated version. Feed it bytes in any chunking with [`Decoder::push`], then call [`Decoder::next_message`]
/// until it returns `Ok(None)`. After an error the connection must be closed: the decoder
/// stays failed and returns the same error again.
///
/// Decoding is linear in the bytes pushed, however many frames one push carries: consumed
/// frames only advance an offset, and the buffer is compacted once per push (a `drain` per
/// frame made a burst of N small frames cost O(N²): 10,000 heartbeats in one read took 8 ms,
/// 2 MiB of them seconds).
#[derive(Clone, Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// `buf[..start]` is consumed.
    start: usize,
    accept: VersionRange,
    negotiated: Option<u16>,
    failed: Option<DecodeError>,
}

impl Decoder {
    /// A decoder for a session not yet negotiated, for a build that speaks `accept`.
    pub fn new(accept: VersionRange) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            accept,
            negotiated: None,
            failed: None,
        }
    }

    /// The bytes received and not yet consumed.
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// From now on every frame must carry exactly `version`.
    pub fn set_negotiated(&mut self, version: u16) {
        self.negotiated = Some(version);
    }

    /// The negotiated version, once set.
    pub fn negotiated(&self) -> Option<u16> {
        self.negotiated
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.pending().len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode_one() {
            Ok(m) => Ok(m),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }

    /// The peer closed the stream: an error if it stopped inside a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let buf = self.pending();
        if buf.is_empty() {
            return Ok(());
        }
        let need = if buf.len() >= 4 {
            4 + u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize
        } else {
            4
        };
        Err(DecodeError::Truncated {
            have: buf.len(),
            need,
        })
    }

    fn check_version(&self, got: u16) -> Result<(), DecodeError> {
        match self.negotiated {
            None if got == HANDSHAKE_VERSION => Ok(()),
            Some(n) if got == n => Ok(()),
            _ if got != HANDSHAKE_VERSION && !self.accept.contains(got) => {
                Err(DecodeError::UnsupportedVersion {
                    got,
                    supported: self.accept,
                })
            }
            n => Err(DecodeError::VersionMismatch {
                got,
                expected: n.unwrap_or(HANDSHAKE_VERSION),
            }),
        }
    }

    fn decode_one(&mut self) -> Result<Option<Message>, DecodeError> {
        let buf = self.pending();
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::Oversize {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if len < 2 {
            return Err(DecodeError::TooShort { len });
        }
        // The version is checked as soon as it is here, before waiting for the body.
        if buf.len() >= HEADER_LEN {
            let version = u16::from_le_bytes([buf[4], buf[5]]);
            self.check_version(version)?;
        }
        let total = 4 + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        let msg = decode_body(&buf[HEADER_LEN..total])?;
        if version == HANDSHAKE_VERSION && !msg.is_handshake() {
            return Err(DecodeError::NotHandshake { kind: msg.kind() });
        }
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(msg))
    }
}

// Equal and hashed by what they would decode (the pending bytes), not by how much of the
// buffer is already consumed: the model check compares machine states that hold decoders.
impl PartialEq for Decoder {
    fn eq(&self, other: &Self) -> bool {
        self.pending() == other.pending()
            && self.accept == other.accept
            && self.negotiated == other.negotiated
            && self.failed == other.failed
    }
}

impl Eq for Decoder {}

impl std::hash::Hash for Decoder {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.pending().hash(state);
        self.accept.hash(state);
        self.negotiated.hash(state);
        self.failed.hash(state);
    }
}

/// Decode one body (everything after the header) as a message.
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    let tag = read_varint_u32(body)
        .ok_or_else(|| DecodeError::Malformed("missing or invalid message tag".into()))?;
    if tag >= MESSAGE_KINDS {
        return Err(DecodeError::UnknownMessage { tag });
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

fn read_varint_u32(bytes: &[u8]) -> Option<u32> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            role: PeerRole::Supervisor,
            versions: SUPPORTED_VERSIONS,
            pid: 7,
            build_id: "b".into(),
        })
    }

    #[test]
    fn every_message_kind_is_counted() {
        // Tag MESSAGE_KINDS-1 must decode, MESSAGE_KINDS must be unknown.
        let refused = Message::Refused { reason: "x".into() };
        let body = postcard::to_allocvec(&refused).unwrap();
        assert_eq!(body[0] as u32, MESSAGE_KINDS - 1);
        assert_eq!(decode_body(&body).unwrap(), refused);
    }

    #[test]
    fn several_frames_in_one_push_and_byte_by_byte() {
        let a = encode(0, &hello()).unwrap();
        let b = encode(1, &Message::Heartbeat).unwrap();
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&a);
        assert_eq!(d.next_message().unwrap(), Some(hello()));
        d.set_negotiated(1);
        d.push(&b);
        assert_eq!(d.next_message().unwrap(), Some(Message::Heartbeat));
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.set_negotiated(1);
        let a = encode(1, &hello()).unwrap();
        d.push(&[a.clone(), b.clone()].concat());
        assert_eq!(d.next_message().unwrap(), Some(hello()));
        assert_eq!(d.next_message().unwrap(), Some(Message::Heartbeat));
        assert_eq!(d.next_message().unwrap(), None);
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.set_negotiated(1);
        let mut got = vec![];
        for byte in [a, b].concat() {
            d.push(&[byte]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![hello(), Message::Heartbeat]);
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn each_bad_input_has_its_own_error() {
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&encode(0, &Message::Heartbeat).unwrap());
        assert_eq!(
            d.next_message(),
            Err(DecodeError::NotHandshake { kind: "Heartbeat" })
        );

        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&encode(1, &hello()).unwrap());
        assert_eq!(
            d.next_message(),
            Err(DecodeError::VersionMismatch {
                got: 1,
                expected: 0
            })
        );

        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&(MAX_FRAME_LEN + 1).to_le_bytes());
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::Oversize { .. })
        ));

        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&1u32.to_le_bytes());
        assert_eq!(d.next_message(), Err(DecodeError::TooShort { len: 1 }));

        let frame = encode(0, &hello()).unwrap();
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&frame[..frame.len() - 1]);
        assert_eq!(d.next_message(), Ok(None));
        assert!(matches!(d.finish(), Err(DecodeError::Truncated { .. })));

        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&encode(9, &hello()).unwrap());
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::UnsupportedVersion { got: 9, .. })
        ));

        let mut d = Decoder::new(VersionRange { min: 1, max: 2 });
        d.set_negotiated(1);
        d.push(&encode(2, &hello()).unwrap());
        assert_eq!(
            d.next_message(),
            Err(DecodeError::VersionMismatch {
                got: 2,
                expected: 1
            })
        );

        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&[3, 0, 0, 0, 0, 0, 99]);
        assert_eq!(
            d.next_message(),
            Err(DecodeError::UnknownMessage { tag: 99 })
        );

        let mut bad = encode(1, &Message::Heartbeat).unwrap();
        bad.push(0xAA);
        bad[0] += 1;
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.set_negotiated(1);
        d.push(&bad);
        assert_eq!(
            d.next_message(),
            Err(DecodeError::TrailingBytes { extra: 1 })
        );

        // Hello with a body cut short: the tag is fine, the fields are not.
        let mut d = Decoder::new(SUPPORTED_VERSIONS);
        d.push(&[3, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(d.next_message(), Err(DecodeError::Malformed(_))));
        // And the decoder stays failed.
        d.push(&encode(1, &Message::Heartbeat).unwrap());
        assert!(matches!(d.next_message(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let v1 = VersionRange { min: 1, max: 1 };
        let v12 = VersionRange { min: 1, max: 2 };
        let v23 = VersionRange { min: 2, max: 3 };
        assert_eq!(v12.negotiate(v1), Ok(1));
        assert_eq!(v1.negotiate(v12), Ok(1));
        assert_eq!(v12.negotiate(v23), Ok(2));
        assert!(v1.negotiate(v23).is_err());
    }

    #[test]
    fn text_is_bounded_on_a_char_boundary() {
        let s = "é".repeat(MAX_TEXT);
        let b = bounded_text(s);
        assert!(b.len() <= MAX_TEXT);
        assert!(b.chars().all(|c| c == 'é'));
    }
}
