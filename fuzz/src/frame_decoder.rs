//! `frame_decoder`: the wire `Decoder` over arbitrary bytes in arbitrary chunkings, and
//! `decode_body` over the same bytes.
//!
//! The session is decoded the way a machine's channel does it: unnegotiated at first (only
//! handshake frames), and negotiated as soon as a `Hello` or `HelloAck` is decoded. Checks:
//! - no panic, on any bytes;
//! - the chunked run gives exactly the messages, the error and the `finish` result of the
//!   run that gets all bytes in one piece (the chunking is invisible);
//! - after an error the decoder buffers nothing and repeats that error, also from `finish`;
//! - every decoded message re-encodes under the version it came with, and that frame decodes
//!   to the same message; `decode_body` likewise.
//!
//! Input layout (see [`Input`]; hand-made, not `Arbitrary`, so that the seed corpus can be
//! written from real sessions by [`Input::to_bytes`]):
//! `flags: u8`, then `min: u16le, max: u16le` if `flags & 1` (the versions we accept,
//! otherwise `SUPPORTED_VERSIONS`), then `v: u16le` if `flags & 2` (negotiated from the
//! start), then `n: u8` and `n` chunk lengths (`u8`, each meaning length + 1, used in turn
//! and cycled; `n = 0` is one piece), then the stream.

use handoff_proto::wire::{
    decode_body, encode, DecodeError, Decoder, Message, VersionRange, HANDSHAKE_VERSION,
    HEADER_LEN, SUPPORTED_VERSIONS,
};

/// One decoded session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Versions the decoder accepts; `None` is `SUPPORTED_VERSIONS`.
    pub accept: Option<VersionRange>,
    /// Negotiated before the first byte (a session whose handshake is not in the stream).
    pub negotiated: Option<u16>,
    /// Chunk lengths minus one, cycled; empty means one piece.
    pub chunks: Vec<u8>,
    /// The byte stream.
    pub stream: Vec<u8>,
}

impl Input {
    /// Read the layout described in the module doc. Never fails: missing bytes are zeros.
    pub fn from_bytes(data: &[u8]) -> Self {
        let mut r = Reader(data);
        let flags = r.u8();
        let accept = (flags & 1 != 0).then(|| VersionRange {
            min: r.u16(),
            max: r.u16(),
        });
        let negotiated = (flags & 2 != 0).then(|| r.u16());
        let n = r.u8();
        let chunks = (0..n).map(|_| r.u8()).collect();
        Self {
            accept,
            negotiated,
            chunks,
            stream: r.0.to_vec(),
        }
    }

    /// The inverse of [`Input::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let flags = u8::from(self.accept.is_some()) | (u8::from(self.negotiated.is_some()) << 1);
        let mut out = vec![flags];
        if let Some(a) = self.accept {
            out.extend(a.min.to_le_bytes());
            out.extend(a.max.to_le_bytes());
        }
        if let Some(v) = self.negotiated {
            out.extend(v.to_le_bytes());
        }
        let n = u8::try_from(self.chunks.len()).expect("at most 255 chunk lengths");
        out.push(n);
        out.extend(&self.chunks);
        out.extend(&self.stream);
        out
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

/// What one run of the decoder saw.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    /// Each message with the header version it was decoded under.
    messages: Vec<(u16, Message)>,
    error: Option<DecodeError>,
    finish: Result<(), DecodeError>,
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let input = Input::from_bytes(data);
    let whole = decode(&input, &[&input.stream]);
    let pieces = chunks(&input.stream, &input.chunks);
    let chunked = decode(&input, &pieces);
    assert_eq!(
        whole,
        chunked,
        "decoding in {} chunks differs from decoding in one piece",
        pieces.len()
    );
    for (version, msg) in &whole.messages {
        let bytes = encode(*version, msg).expect("a decoded message re-encodes");
        let mut d = Decoder::new(VersionRange {
            min: 1,
            max: u16::MAX,
        });
        if *version != HANDSHAKE_VERSION {
            d.set_negotiated(*version);
        }
        d.push(&bytes);
        assert_eq!(d.next_message().as_ref(), Ok(&Some(msg.clone())));
        assert_eq!(d.buffered(), 0, "a re-encoded frame is consumed whole");
    }
    // The raw bytes as one body.
    if let Ok(msg) = decode_body(&input.stream) {
        let bytes = encode(1, &msg).expect("a decoded body re-encodes");
        assert_eq!(decode_body(&bytes[HEADER_LEN..]), Ok(msg));
    }
}

/// Split `stream` by the cycled lengths (each + 1); one piece if there are none.
fn chunks<'a>(stream: &'a [u8], lens: &[u8]) -> Vec<&'a [u8]> {
    if lens.is_empty() {
        return vec![stream];
    }
    let mut out = Vec::new();
    let mut rest = stream;
    for len in lens.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at((usize::from(*len) + 1).min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

/// Feed the pieces, taking every message out after each, negotiating like a channel.
fn decode(input: &Input, pieces: &[&[u8]]) -> Trace {
    let accept = input.accept.unwrap_or(SUPPORTED_VERSIONS);
    let mut d = Decoder::new(accept);
    if let Some(v) = input.negotiated {
        d.set_negotiated(v);
    }
    let mut messages = Vec::new();
    let mut error = None;
    for piece in pieces {
        d.push(piece);
        if let Some(e) = &error {
            assert_eq!(d.buffered(), 0, "a failed decoder buffers input");
            assert_eq!(
                d.next_message().as_ref(),
                Err(e),
                "a failed decoder changed its error"
            );
            continue;
        }
        loop {
            match d.next_message() {
                Ok(Some(msg)) => {
                    let version = d.negotiated().unwrap_or(HANDSHAKE_VERSION);
                    negotiate(&mut d, accept, &msg);
                    messages.push((version, msg));
                }
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(d.buffered(), 0, "a failed decoder keeps its buffer");
                    error = Some(e);
                    break;
                }
            }
        }
    }
    let finish = d.finish();
    match &error {
        Some(e) => {
            assert_eq!(finish.as_ref(), Err(e), "finish after an error");
            assert_eq!(d.next_message().as_ref(), Err(e), "the error is not sticky");
        }
        // Everything complete was consumed: `finish` is Ok exactly when nothing is left.
        None => assert_eq!(finish.is_ok(), d.buffered() == 0),
    }
    Trace {
        messages,
        error,
        finish,
    }
}

/// What a channel does after a handshake message: the session speaks the negotiated
/// version from the next frame on. (A machine also refuses a bad handshake; here the
/// session just stays unnegotiated.)
fn negotiate(d: &mut Decoder, accept: VersionRange, msg: &Message) {
    let version = match msg {
        Message::Hello(hello) => accept.negotiate(hello.versions).ok(),
        Message::HelloAck(ack) if accept.contains(ack.version) => Some(ack.version),
        _ => None,
    };
    if let (Some(v), None) = (version, d.negotiated()) {
        d.set_negotiated(v);
    }
}
