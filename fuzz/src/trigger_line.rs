//! `trigger_line`: the reference supervisor's trigger-socket protocol
//! (`handoff_supervisor::trigger`), fed a client's byte stream in chunks the way the server
//! reads it, and checked against a plain model of the line rule: lines end at `\n`, a line
//! longer than `MAX_LINE` ends the conversation, a line that is not UTF-8 is skipped, and
//! the unterminated rest is the last line once the client closed its side. Every line that
//! is read is parsed; the answer the server would write is one line.
//!
//! Input layout: `chunk: u8` (pieces of `chunk + 1` bytes), then the stream.

use handoff_supervisor::trigger::{parse, Command, LineBuf, LineError, TriggerError, MAX_LINE};

/// The fuzz target.
pub fn run(data: &[u8]) {
    let Some((chunk, stream)) = data.split_first() else {
        return;
    };
    let got = split(stream, usize::from(*chunk) + 1);
    assert_eq!(got, model(stream), "LineBuf differs from the line rule");
    for line in got.iter().flatten() {
        check_parse(line);
    }
}

/// What the server does: after each read, take lines until none is complete or one is too
/// long (which ends the conversation); at the close, take the rest.
fn split(stream: &[u8], chunk: usize) -> Vec<Result<String, LineError>> {
    let mut buf = LineBuf::new();
    let mut out = Vec::new();
    let pieces = stream.chunks(chunk).map(|c| (c, false));
    for (piece, closed) in pieces.chain([(&[][..], true)]) {
        buf.push(piece);
        while let Some(line) = buf.next_line(closed) {
            let too_long = line == Err(LineError::TooLong);
            out.push(line);
            if too_long {
                assert!(buf.len() > MAX_LINE, "too long with {} bytes", buf.len());
                return out;
            }
        }
        assert!(
            buf.len() <= MAX_LINE,
            "{} bytes buffered without an error",
            buf.len()
        );
        if closed {
            assert!(buf.is_empty(), "bytes left after the close");
        }
    }
    out
}

/// The line rule, over the whole stream at once.
fn model(stream: &[u8]) -> Vec<Result<String, LineError>> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        if line.len() > MAX_LINE {
            out.push(Err(LineError::TooLong));
            break;
        }
        out.push(String::from_utf8(line.to_vec()).map_err(|_| LineError::NotUtf8));
        rest = next;
    }
    out
}

fn check_parse(line: &str) {
    assert!(!line.contains('\n'));
    let parsed = parse(line);
    assert_eq!(
        parse(&format!(" \t{line}\r ")),
        parsed,
        "surrounding whitespace changed the command"
    );
    match &parsed {
        Ok(Command::Handoff(Some(path))) => {
            let p = path.to_str().expect("parsed from a str");
            assert!(!p.is_empty() && p.trim() == p, "path {p:?} not trimmed");
        }
        Ok(Command::Empty) => assert!(line.trim().is_empty()),
        Ok(Command::Status | Command::Metrics | Command::Handoff(None)) => {}
        Err(e @ TriggerError::Unknown { line: named }) => {
            assert!(!named.contains(['\n', '\r']), "error line {named:?}");
            let answer = format!("error: {e}");
            assert!(
                !answer.contains(['\n', '\r']),
                "answer {answer:?} is not one line"
            );
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}
