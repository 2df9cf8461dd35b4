//! The trigger socket's line protocol, without the socket: [`LineBuf`] splits what a client
//! sent into lines (at most [`MAX_LINE`] bytes, UTF-8), and [`parse`] reads one line as a
//! [`Command`]. Pure, so that the fuzz target `trigger_line` and the unit tests below can
//! drive exactly the code the server runs.

use std::fmt;
use std::path::PathBuf;

/// The longest command line accepted, without its newline.
pub const MAX_LINE: usize = 4096;

/// Bytes a client sent that were not yet split into lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LineBuf {
    buf: Vec<u8>,
}

/// Why a line could not be taken from a [`LineBuf`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LineError {
    /// More than [`MAX_LINE`] bytes before a newline. The conversation must end: where the
    /// next line starts is unknown. The buffer is left as it was.
    TooLong,
    /// The line (already consumed) is not UTF-8. The next line may be fine.
    NotUtf8,
}

impl LineBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next complete line, without its `\n`, or `None` if more bytes are needed.
    /// `read_closed`: the client closed its side, so what is left (if anything) is the last
    /// line even without a newline.
    pub fn next_line(&mut self, read_closed: bool) -> Option<Result<String, LineError>> {
        let line = match self.buf.iter().position(|b| *b == b'\n') {
            Some(i) if i > MAX_LINE => return Some(Err(LineError::TooLong)),
            Some(i) => {
                let mut l: Vec<u8> = self.buf.drain(..=i).collect();
                l.truncate(i);
                l
            }
            None if self.buf.len() > MAX_LINE => return Some(Err(LineError::TooLong)),
            None if read_closed && !self.buf.is_empty() => std::mem::take(&mut self.buf),
            None => return None,
        };
        Some(String::from_utf8(line).map_err(|_| LineError::NotUtf8))
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LineError::TooLong => "line too long",
            LineError::NotUtf8 => "not UTF-8",
        })
    }
}

impl std::error::Error for LineError {}

/// One trigger command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `handoff [path]`: hand off to `path`, or to the configured binary.
    Handoff(Option<PathBuf>),
    /// `status`: one status line.
    Status,
    /// `metrics`: the Prometheus text.
    Metrics,
    /// A blank line: no answer.
    Empty,
}

/// A line that is no command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TriggerError {
    /// Not one of the commands (or `status` / `metrics` with an argument).
    Unknown {
        /// The line, trimmed, with its line breaks turned into spaces.
        line: String,
    },
}

impl fmt::Display for TriggerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerError::Unknown { line } => write!(
                f,
                "unknown command: {line} (commands: handoff [path], status, metrics)"
            ),
        }
    }
}

impl std::error::Error for TriggerError {}

/// Read one line (surrounding whitespace is ignored) as a command.
pub fn parse(line: &str) -> Result<Command, TriggerError> {
    let line = line.trim();
    let (cmd, arg) = match line.split_once(char::is_whitespace) {
        Some((c, a)) => (c, a.trim()),
        None => (line, ""),
    };
    match (cmd, arg) {
        ("", _) => Ok(Command::Empty),
        ("status", "") => Ok(Command::Status),
        ("metrics", "") => Ok(Command::Metrics),
        ("handoff", "") => Ok(Command::Handoff(None)),
        ("handoff", path) => Ok(Command::Handoff(Some(PathBuf::from(path)))),
        _ => Err(TriggerError::Unknown {
            line: line.replace(['\n', '\r'], " "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(buf: &mut LineBuf, read_closed: bool) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        while let Some(l) = buf.next_line(read_closed) {
            let stop = l == Err(LineError::TooLong);
            out.push(l);
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse("status"), Ok(Command::Status));
        assert_eq!(parse("  metrics \r"), Ok(Command::Metrics));
        assert_eq!(parse("handoff"), Ok(Command::Handoff(None)));
        assert_eq!(
            parse("handoff   /usr/bin/kvd v2 "),
            Ok(Command::Handoff(Some(PathBuf::from("/usr/bin/kvd v2"))))
        );
        assert_eq!(
            parse("handoff\t/x"),
            Ok(Command::Handoff(Some(PathBuf::from("/x"))))
        );
        assert_eq!(parse(""), Ok(Command::Empty));
        assert_eq!(parse(" \t "), Ok(Command::Empty));
    }

    #[test]
    fn unknown_commands_name_the_line_in_one_line() {
        let e = parse("status now").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown command: status now (commands: handoff [path], status, metrics)"
        );
        assert!(parse("HANDOFF").is_err());
        assert!(parse("metrics x").is_err());
        let e = parse("frob a\rb").unwrap_err();
        assert_eq!(
            e,
            TriggerError::Unknown {
                line: "frob a b".into()
            }
        );
    }

    #[test]
    fn lines_split_at_newlines_and_the_last_one_needs_a_close() {
        let mut b = LineBuf::new();
        b.push(b"status\nhandoff /x\r\nmet");
        assert_eq!(
            lines(&mut b, false),
            vec![Ok("status".into()), Ok("handoff /x\r".into())]
        );
        assert_eq!(b.len(), 3);
        b.push(b"rics");
        assert_eq!(lines(&mut b, false), vec![]);
        assert_eq!(lines(&mut b, true), vec![Ok("metrics".into())]);
        assert!(b.is_empty());
        assert_eq!(lines(&mut b, true), vec![]);
    }

    #[test]
    fn a_bad_line_is_skipped_and_the_next_one_read() {
        let mut b = LineBuf::new();
        b.push(b"\xff\xfe\nstatus\n");
        assert_eq!(
            lines(&mut b, false),
            vec![Err(LineError::NotUtf8), Ok("status".into())]
        );
    }

    #[test]
    fn max_line_is_the_limit_without_the_newline() {
        let mut b = LineBuf::new();
        b.push(&[b'a'; MAX_LINE]);
        assert_eq!(
            b.next_line(false),
            None,
            "exactly MAX_LINE bytes may still end"
        );
        b.push(b"\n");
        assert_eq!(b.next_line(false), Some(Ok("a".repeat(MAX_LINE))));

        let mut b = LineBuf::new();
        b.push(&[b'a'; MAX_LINE + 1]);
        assert_eq!(b.next_line(false), Some(Err(LineError::TooLong)));
        assert_eq!(b.len(), MAX_LINE + 1, "a too-long line is left in place");

        let mut b = LineBuf::new();
        b.push(&[b'a'; MAX_LINE + 1]);
        b.push(b"\nstatus\n");
        assert_eq!(b.next_line(false), Some(Err(LineError::TooLong)));
    }
}
