//! What became of a request: how it failed, if it did, and the record a client keeps of it.

use std::io;

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrKind {
    /// `connect` refused (nothing listening, or the queue overflowed).
    ConnectRefused,
    /// `connect` reset.
    ConnectReset,
    /// `connect` took longer than `--connect-timeout`.
    ConnectTimeout,
    /// ECONNRESET / EPIPE / ECONNABORTED on an established connection.
    Reset,
    /// HTTP: the server closed the connection after the request and before any answer byte.
    EofBeforeAnswer,
    /// The connection ended inside an answer.
    Truncated,
    /// An answer that is not the expected one (a status other than 200, `ERR io`, junk).
    BadAnswer,
    /// No (complete) answer within `--answer-timeout` of the request's start.
    AnswerTimeout,
    /// Anything else (its text is kept for the first few).
    Other,
}

pub const KINDS: [ErrKind; 9] = [
    ErrKind::ConnectRefused,
    ErrKind::ConnectReset,
    ErrKind::ConnectTimeout,
    ErrKind::Reset,
    ErrKind::EofBeforeAnswer,
    ErrKind::Truncated,
    ErrKind::BadAnswer,
    ErrKind::AnswerTimeout,
    ErrKind::Other,
];

impl ErrKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrKind::ConnectRefused => "connect_refused",
            ErrKind::ConnectReset => "connect_reset",
            ErrKind::ConnectTimeout => "connect_timeout",
            ErrKind::Reset => "reset",
            ErrKind::EofBeforeAnswer => "eof_before_answer",
            ErrKind::Truncated => "truncated",
            ErrKind::BadAnswer => "bad_answer",
            ErrKind::AnswerTimeout => "answer_timeout",
            ErrKind::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        KINDS
            .iter()
            .position(|&k| k == self)
            .expect("KINDS lists all")
    }

    /// The kind of an I/O error on an established connection.
    pub fn of_io(e: &io::Error) -> ErrKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => ErrKind::Reset,
            K::WouldBlock | K::TimedOut => ErrKind::AnswerTimeout,
            _ => ErrKind::Other,
        }
    }

    /// The kind of a failed `connect`.
    pub fn of_connect(e: &io::Error) -> ErrKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrKind::ConnectRefused,
            K::ConnectionReset | K::ConnectionAborted => ErrKind::ConnectReset,
            K::WouldBlock | K::TimedOut => ErrKind::ConnectTimeout,
            _ => ErrKind::Other,
        }
    }
}

/// A failure, with the I/O error when there is one (kept for `other`).
#[derive(Debug)]
pub struct Failure(pub ErrKind, pub String);

impl Failure {
    pub fn io(kind: ErrKind, e: &io::Error) -> Failure {
        Failure(kind, e.to_string())
    }
}

/// One request, as recorded: times in nanoseconds since the start of the run.
#[derive(Clone, Copy, Debug)]
pub struct Rec {
    pub start: u64,
    /// When the client began it (later than `start` for an open-loop request whose worker was
    /// late: the schedule's lag, which its latency includes).
    pub began: u64,
    pub end: u64,
    /// `None`: answered as expected.
    pub err: Option<ErrKind>,
    /// How many times it was sent again (kvd's "not executed").
    pub resent: u32,
}

/// What a client thread did: its requests and a few counters.
#[derive(Debug, Default)]
pub struct Log {
    pub recs: Vec<Rec>,
    /// Connections opened.
    pub connects: u64,
    /// Connections found closed by the server before reuse (the peek).
    pub stale: u64,
    /// Connections the server ended after an answer (`Connection: close`).
    pub server_closed: u64,
}
