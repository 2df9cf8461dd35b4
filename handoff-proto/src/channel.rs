//! One end of a framed session: its decoder, negotiated version and liveness clock.

use std::time::Instant;

use crate::wire::{Decoder, Frame, Message, VersionRange, HANDSHAKE_VERSION};

/// A connection chosen and named by the driver (for example the accepted socket's fd number
/// or a token counter). The machine never interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ConnId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Channel {
    pub(crate) decoder: Decoder,
    pub(crate) last_heard: Instant,
}

impl Channel {
    pub(crate) fn new(versions: VersionRange, now: Instant) -> Self {
        Self {
            decoder: Decoder::new(versions),
            last_heard: now,
        }
    }

    pub(crate) fn version(&self) -> Option<u16> {
        self.decoder.negotiated()
    }

    /// Wrap `message` under the right header version: the handshake version for `Hello` and
    /// `HelloAck` (and anything before negotiation), the negotiated one otherwise.
    pub(crate) fn frame(&self, message: Message) -> Frame {
        let version = match (&message, self.version()) {
            (Message::Hello(_) | Message::HelloAck(_), _) | (_, None) => HANDSHAKE_VERSION,
            (_, Some(v)) => v,
        };
        Frame { version, message }
    }
}
