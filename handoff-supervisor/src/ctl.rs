//! `handoffctl`: the trigger socket's client.
//!
//! ```text
//! handoffctl [--socket PATH | --config FILE] [--json] [--timeout SECS] handoff [PATH] | status | metrics
//! ```
//!
//! The socket defaults to `$HANDOFF_TRIGGER_SOCKET`, or to `trigger_socket` of `--config`.
//! Exit codes: [`EXIT_OK`] (committed, or the answer), [`EXIT_ROLLED_BACK`], [`EXIT_BUSY`],
//! [`EXIT_UNREACHABLE`] (cannot connect, refused, closed without an answer),
//! [`EXIT_OTHER`] (usage, `error:` answers, timeouts).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::report::unescape;

/// The handoff committed, or the command was answered.
pub const EXIT_OK: i32 = 0;
/// The handoff was rolled back (or lost the daemon).
pub const EXIT_ROLLED_BACK: i32 = 1;
/// A handoff or recovery is running.
pub const EXIT_BUSY: i32 = 2;
/// The supervisor cannot be reached, or refused us.
pub const EXIT_UNREACHABLE: i32 = 3;
/// Usage error, an `error:` answer, a timeout.
pub const EXIT_OTHER: i32 = 4;

const USAGE: &str = "usage: handoffctl [--socket PATH | --config FILE] [--json] [--timeout SECS] \
                     handoff [PATH] | status | metrics";

#[derive(Debug, PartialEq)]
struct Args {
    socket: PathBuf,
    json: bool,
    timeout: Option<Duration>,
    command: String,
    target: Option<String>,
}

/// The shortest `--timeout`: a socket timeout that rounds to zero would mean "no timeout".
const MIN_TIMEOUT_SECS: f64 = 0.001;
/// The longest `--timeout` (a year): far beyond any handoff's deadline.
const MAX_TIMEOUT_SECS: f64 = 31_536_000.0;

/// A flag's value as a number of seconds in [`MIN_TIMEOUT_SECS`, `MAX_TIMEOUT_SECS`], or a
/// one-line error naming the flag and the value.
fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let bad = || {
        format!("{flag} {v:?}: not a number of seconds in [{MIN_TIMEOUT_SECS}, {MAX_TIMEOUT_SECS}]")
    };
    let secs: f64 = v.parse().map_err(|_| bad())?;
    // NaN fails both comparisons.
    if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut socket = None;
    let mut config = None;
    let mut json = false;
    let mut timeout = None;
    let mut rest = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--json" => json = true,
            "--timeout" => {
                let v = value("--timeout")?;
                timeout = Some(seconds("--timeout", &v)?);
            }
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => rest.push(a.clone()),
        }
    }
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => {
            crate::config::Config::load(&c)
                .map_err(|e| e.to_string())?
                .trigger_socket
        }
        (None, None) => std::env::var_os("HANDOFF_TRIGGER_SOCKET")
            .map(PathBuf::from)
            .ok_or("no socket: give --socket, --config or $HANDOFF_TRIGGER_SOCKET")?,
    };
    let (command, target) = match rest.as_slice() {
        [c] if c == "handoff" || c == "status" || c == "metrics" => (c.clone(), None),
        [c, p] if c == "handoff" => (c.clone(), Some(p.clone())),
        [] => return Err("no command".into()),
        other => return Err(format!("bad command: {}", other.join(" "))),
    };
    if target.as_ref().is_some_and(|t| t.contains('\n')) {
        return Err("the path contains a newline".into());
    }
    Ok(Args {
        socket,
        json,
        timeout,
        command,
        target,
    })
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A `status`/`handoff` value as JSON: `-` is null, integers are numbers, `true`/`false`
/// booleans, the rest strings.
fn json_value(v: &str) -> String {
    if v == "-" {
        "null".into()
    } else if v == "true"
        || v == "false"
        || (v.parse::<u64>().is_ok() && !v.starts_with('0'))
        || v == "0"
    {
        v.into()
    } else {
        json_str(&unescape(v))
    }
}

/// `key=value` words as a JSON object.
fn json_words(text: &str) -> String {
    let fields: Vec<String> = text
        .split(' ')
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| format!("{}:{}", json_str(k), json_value(v)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// What one command came to.
#[derive(Debug, PartialEq)]
pub struct Answer {
    /// The exit code.
    pub code: i32,
    /// What to print (plain or JSON), without a final newline.
    pub text: String,
}

fn failure(json: bool, command: &str, code: i32, msg: &str) -> Answer {
    Answer {
        code,
        text: if json {
            format!(
                "{{\"ok\":false,\"command\":{},\"exit_code\":{code},\"error\":{}}}",
                json_str(command),
                json_str(msg)
            )
        } else {
            format!("handoffctl: {msg}")
        },
    }
}

/// Interpret the supervisor's answer to `command`.
pub fn interpret(json: bool, command: &str, answer: &str) -> Answer {
    let first = answer.lines().next().unwrap_or("");
    if first.is_empty() && answer.trim().is_empty() {
        return failure(
            json,
            command,
            EXIT_UNREACHABLE,
            "the supervisor closed the connection without an answer",
        );
    }
    if first == "error: not allowed" {
        return failure(json, command, EXIT_UNREACHABLE, first);
    }
    if let Some(rest) = first.strip_prefix("busy: ") {
        return Answer {
            code: EXIT_BUSY,
            text: if json {
                format!(
                    "{{\"ok\":false,\"command\":{},\"exit_code\":{EXIT_BUSY},\"busy\":{}}}",
                    json_str(command),
                    json_str(rest)
                )
            } else {
                first.to_string()
            },
        };
    }
    if first.starts_with("error: ") {
        return failure(json, command, EXIT_OTHER, first);
    }
    match command {
        "handoff" => {
            let Some(rest) = first.strip_prefix("ok: ") else {
                return failure(
                    json,
                    command,
                    EXIT_OTHER,
                    &format!("unexpected answer: {first}"),
                );
            };
            let committed = rest.contains(" committed=true ");
            let code = if committed { EXIT_OK } else { EXIT_ROLLED_BACK };
            let text = if json {
                // abort_reason is the last field and may contain spaces.
                let (head, reason) = rest.split_once(" abort_reason=").unwrap_or((rest, "None"));
                let reason = match reason
                    .strip_prefix("Some(")
                    .and_then(|r| r.strip_suffix(')'))
                {
                    Some(r) => json_str(r),
                    None => "null".into(),
                };
                let words = json_words(head);
                format!(
                    "{{\"ok\":{},\"command\":\"handoff\",\"exit_code\":{code},{},\"abort_reason\":{reason}}}",
                    committed,
                    &words[1..words.len() - 1]
                )
            } else {
                first.to_string()
            };
            Answer { code, text }
        }
        "status" if first.starts_with("state=") => Answer {
            code: EXIT_OK,
            text: if json {
                format!(
                    "{{\"ok\":true,\"command\":\"status\",\"status\":{}}}",
                    json_words(first)
                )
            } else {
                first.to_string()
            },
        },
        "metrics" => {
            let body = answer.trim_end();
            Answer {
                code: EXIT_OK,
                text: if json {
                    let samples: Vec<String> = body
                        .lines()
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .filter_map(|l| l.rsplit_once(' '))
                        .map(|(k, v)| {
                            let v = v.parse::<f64>().map_or("null".into(), |x| x.to_string());
                            format!("{}:{v}", json_str(k))
                        })
                        .collect();
                    format!(
                        "{{\"ok\":true,\"command\":\"metrics\",\"samples\":{{{}}}}}",
                        samples.join(",")
                    )
                } else {
                    body.to_string()
                },
            }
        }
        _ => failure(
            json,
            command,
            EXIT_OTHER,
            &format!("unexpected answer: {first}"),
        ),
    }
}

/// Run `handoffctl` with `argv` (without the program name); the exit code.
pub fn main(argv: &[String]) -> i32 {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return EXIT_OK;
        }
        Err(e) => {
            eprintln!("handoffctl: {e}\n{USAGE}");
            return EXIT_OTHER;
        }
    };
    let a = run(&args);
    if a.code == EXIT_OK || args.json || a.code == EXIT_ROLLED_BACK || a.code == EXIT_BUSY {
        println!("{}", a.text);
    } else {
        eprintln!("{}", a.text);
    }
    a.code
}

fn run(args: &Args) -> Answer {
    let cmd = args.command.as_str();
    let timeout = args.timeout.unwrap_or(if cmd == "handoff" {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(10)
    });
    let mut sock = match UnixStream::connect(&args.socket) {
        Ok(s) => s,
        Err(e) => {
            return failure(
                args.json,
                cmd,
                EXIT_UNREACHABLE,
                &format!("cannot reach {}: {e}", args.socket.display()),
            )
        }
    };
    let line = match &args.target {
        Some(t) => format!("{cmd} {t}\n"),
        None => format!("{cmd}\n"),
    };
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(10)));
    // A refused client may be closed before it writes; its answer is still readable.
    let _ = sock.write_all(line.as_bytes());
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut reader = BufReader::new(sock);
    let mut answer = String::new();
    loop {
        let mut l = String::new();
        match reader.read_line(&mut l) {
            Ok(0) => break,
            Ok(_) => {
                let end = l == "\n";
                answer.push_str(&l);
                // One line answers everything except `metrics`, which ends with an empty line.
                if cmd != "metrics" || end || !l.ends_with('\n') {
                    break;
                }
                // An error line for `metrics` is one line too.
                if answer.lines().count() == 1
                    && (l.starts_with("error: ") || l.starts_with("busy: "))
                {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return failure(
                    args.json,
                    cmd,
                    EXIT_OTHER,
                    &format!("no answer within {timeout:?}"),
                )
            }
            Err(e) if answer.is_empty() => {
                return failure(
                    args.json,
                    cmd,
                    EXIT_UNREACHABLE,
                    &format!("reading the answer: {e}"),
                )
            }
            Err(_) => break,
        }
    }
    interpret(args.json, cmd, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn args() {
        let a = parse_args(&argv("--socket /t --json handoff /bin/x")).unwrap();
        assert_eq!(a.socket, PathBuf::from("/t"));
        assert!(a.json);
        assert_eq!(a.command, "handoff");
        assert_eq!(a.target.as_deref(), Some("/bin/x"));
        assert!(parse_args(&argv("--socket /t status extra")).is_err());
        assert!(parse_args(&argv("--socket /t frobnicate")).is_err());
        assert!(parse_args(&argv("--socket /t --bogus status")).is_err());
        assert!(parse_args(&argv("--socket /t --timeout 0 status")).is_err());
        for bad in ["1e20", "inf", "NaN", "-1", "1e-300", "x"] {
            let e = parse_args(&argv(&format!("--socket /t --timeout {bad} status"))).unwrap_err();
            assert!(
                e.starts_with(&format!("--timeout {bad:?}: not a number of seconds in [")),
                "{e}"
            );
        }
        let a = parse_args(&argv("--socket /t --timeout 2.5 status")).unwrap();
        assert_eq!(a.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(parse_args(&argv("--help")).unwrap_err(), "");
    }

    #[test]
    fn answers_and_exit_codes() {
        let ok = "ok: handoff_id=0000000000000001 committed=true abort_reason=None\n";
        assert_eq!(interpret(false, "handoff", ok).code, EXIT_OK);
        let rb = "ok: handoff_id=0000000000000002 committed=false abort_reason=Some(SpawnFailed(\"x: no such file\"))\n";
        assert_eq!(interpret(false, "handoff", rb).code, EXIT_ROLLED_BACK);
        assert_eq!(
            interpret(true, "handoff", rb).text,
            "{\"ok\":false,\"command\":\"handoff\",\"exit_code\":1,\"handoff_id\":\"0000000000000002\",\
             \"committed\":false,\"abort_reason\":\"SpawnFailed(\\\"x: no such file\\\")\"}"
        );
        assert_eq!(
            interpret(true, "handoff", ok).text,
            "{\"ok\":true,\"command\":\"handoff\",\"exit_code\":0,\"handoff_id\":\"0000000000000001\",\
             \"committed\":true,\"abort_reason\":null}"
        );
        assert_eq!(
            interpret(
                false,
                "handoff",
                "busy: handoff 00000000000000ab in progress\n"
            )
            .code,
            EXIT_BUSY
        );
        assert_eq!(
            interpret(false, "status", "error: not allowed\n").code,
            EXIT_UNREACHABLE
        );
        assert_eq!(interpret(false, "status", "").code, EXIT_UNREACHABLE);
        assert_eq!(
            interpret(false, "handoff", "error: binary not allowed: /x\n").code,
            EXIT_OTHER
        );
        let st = "state=idle serving_pid=12 binary=/a%20b current=- handoffs=0\n";
        let a = interpret(true, "status", st);
        assert_eq!(a.code, EXIT_OK);
        assert_eq!(
            a.text,
            "{\"ok\":true,\"command\":\"status\",\"status\":{\"state\":\"idle\",\"serving_pid\":12,\
             \"binary\":\"/a b\",\"current\":null,\"handoffs\":0}}"
        );
        let m = "# TYPE x counter\nx 3\ny{phase=\"a\"} 0.5\n\n";
        assert_eq!(
            interpret(true, "metrics", m).text,
            "{\"ok\":true,\"command\":\"metrics\",\"samples\":{\"x\":3,\"y{phase=\\\"a\\\"}\":0.5}}"
        );
        assert_eq!(interpret(false, "metrics", m).text, m.trim_end());
    }
}
