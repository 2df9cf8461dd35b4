//! The configuration file (`handoff.toml`).
//!
//! ```toml
//! control_socket   = "/run/my-daemon/handoff.sock"    # the daemon's control socket
//! trigger_socket   = "/run/my-daemon/handoff.trigger" # our line-protocol socket
//! binary           = "/usr/local/bin/my-daemon"       # cold starts, `handoff` with no path, SIGHUP
//! args             = ["--data", "/var/lib/my-daemon"] # optional
//! env              = { RUST_LOG = "info" }            # optional: the daemon's environment
//! drain_grace_secs = 25                               # optional, default 25
//! deadline_secs    = 60                               # optional, default 60
//! recovery_wait_secs = 30                             # optional: every `Timing` field, see below
//! journal          = "/run/my-daemon/handoff.journal" # optional, default <control_socket>.journal
//! trigger_uids     = [0, 1000]                        # optional, default: our uid and root
//! trigger_group    = "my-daemon-ops"                  # optional: the trigger socket's group
//! trigger_mode     = 0o660                            # optional, default 0o600 (0o660 with a group)
//! allowed_binaries = ["/usr/local/bin/my-daemon-v2"]  # optional: also allowed as targets
//! binary_dir       = "/usr/local/lib/my-daemon"       # optional: any file directly in it too
//!
//! [[listeners]]
//! name = "http"
//! addr = "0.0.0.0:8080"
//! kind = "tcp"                                        # tcp (default), udp, unix (a path)
//! ```
//!
//! Unknown keys are errors. Every error names the key and the line.
//!
//! **Timings.** Every field of [`handoff_proto::Timing`] can be set as `<field>_secs`, in
//! seconds (a float in [0.001, 86400]); a key left out keeps the default documented there:
//! `heartbeat_interval_secs` (0.5), `peer_silence_secs` (5), `slack_secs` (5),
//! `retry_interval_secs` (0.05), `recovery_wait_secs` (30), `backoff_min_secs` (0.1),
//! `backoff_max_secs` (10), `stable_after_secs` (10), `drain_grace_secs` (25) and
//! `deadline_secs` (60). The values must fit together ([`Timing::check`]): the heartbeat
//! shorter than the silence limit, the drain grace shorter than the deadline, the backoff's
//! minimum at most its maximum; an error names the key set and its line.
//!
//! **Binaries.** `binary`, `allowed_binaries` and `binary_dir` must be writable by nobody but
//! root and the supervisor's user: each file (symlinks resolved) and the directory it is in
//! owned by one of them and not writable by group or others, and likewise `binary_dir`. This
//! is checked when the file is loaded (for those that exist), when a trigger names a binary,
//! and by the spawn on the very file it executes.
//!
//! **The daemon's environment** (successors and cold starts alike) is not the supervisor's: it
//! holds only `PATH`, `LANG`, `LC_*`, `TZ` and `HANDOFF_*` from the supervisor's environment,
//! then `env`, then the variables the handoff sets (`HANDOFF_ROLE`, `HANDOFF_CHANNEL_FD`,
//! `HANDOFF_LISTENER_COUNT` for a successor; `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` for a
//! cold start). Anything else the daemon needs goes in `env`. `NOTIFY_SOCKET` is never passed
//! on: the supervisor speaks `sd_notify` itself.
//!
//! Who may trigger: a client must first be able to connect to the trigger socket (it is ours,
//! with `trigger_mode`, group `trigger_group` or ours), and is then admitted only if its uid
//! (`SO_PEERCRED`) is in `trigger_uids`. A uid listed there that the socket's mode cannot let
//! in (not root, not ours, and the mode gives neither the group nor others write permission)
//! is an error when the file is read. Whether a uid is in `trigger_group` is not checked: the
//! user database may change after the file is read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handoff_engine::sys::spawn;
use handoff_proto::Timing;
use serde::Deserialize;
use toml::Spanned;

/// A listener's socket kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A TCP listener (`addr` = `host:port`).
    #[default]
    Tcp,
    /// A bound UDP socket (`addr` = `host:port`).
    Udp,
    /// A Unix stream listener (`addr` = a path).
    Unix,
}

/// The raw file, as serde reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    control_socket: Spanned<PathBuf>,
    trigger_socket: Spanned<PathBuf>,
    binary: Spanned<PathBuf>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    heartbeat_interval_secs: Option<Spanned<f64>>,
    peer_silence_secs: Option<Spanned<f64>>,
    slack_secs: Option<Spanned<f64>>,
    retry_interval_secs: Option<Spanned<f64>>,
    recovery_wait_secs: Option<Spanned<f64>>,
    backoff_min_secs: Option<Spanned<f64>>,
    backoff_max_secs: Option<Spanned<f64>>,
    stable_after_secs: Option<Spanned<f64>>,
    drain_grace_secs: Option<Spanned<f64>>,
    deadline_secs: Option<Spanned<f64>>,
    journal: Option<Spanned<PathBuf>>,
    trigger_uids: Option<Spanned<Vec<u32>>>,
    trigger_group: Option<Spanned<Group>>,
    trigger_mode: Option<Spanned<i64>>,
    #[serde(default)]
    allowed_binaries: Vec<Spanned<PathBuf>>,
    binary_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    listeners: Vec<RawListener>,
}

impl Raw {
    /// The value given for `field` of [`Timing`] (key `<field>_secs`).
    fn timing(&self, field: &str) -> Option<&Spanned<f64>> {
        match field {
            "heartbeat_interval" => &self.heartbeat_interval_secs,
            "peer_silence" => &self.peer_silence_secs,
            "slack" => &self.slack_secs,
            "retry_interval" => &self.retry_interval_secs,
            "recovery_wait" => &self.recovery_wait_secs,
            "backoff_min" => &self.backoff_min_secs,
            "backoff_max" => &self.backoff_max_secs,
            "stable_after" => &self.stable_after_secs,
            "drain_grace" => &self.drain_grace_secs,
            "deadline" => &self.deadline_secs,
            _ => &None,
        }
        .as_ref()
    }
}

/// `trigger_group`: a name, or a gid (a number, or a string of digits).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Group {
    Gid(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    addr: Spanned<String>,
    #[serde(default)]
    kind: Kind,
}

/// Where a listener binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// TCP or UDP.
    Inet(SocketAddr),
    /// A Unix socket path.
    Path(PathBuf),
}

/// One configured listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// The name the daemon takes it by.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// Where it binds.
    pub addr: Addr,
}

/// A checked configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The daemon's control socket.
    pub control_socket: PathBuf,
    /// Our trigger socket.
    pub trigger_socket: PathBuf,
    /// The configured daemon binary (absolute).
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Every timing, the drain grace and deadline of a handoff among them.
    pub timing: Timing,
    /// The journal file.
    pub journal: PathBuf,
    /// Uids admitted on the trigger socket.
    pub trigger_uids: Vec<u32>,
    /// The trigger socket's group (`None`: ours).
    pub trigger_group: Option<u32>,
    /// The trigger socket's permission bits: 0o600 plus any of 0o066.
    pub trigger_mode: u32,
    /// Binaries a handoff may go to, besides `binary`.
    pub allowed_binaries: Vec<PathBuf>,
    /// A directory whose files a handoff may go to.
    pub binary_dir: Option<PathBuf>,
    /// The listeners.
    pub listeners: Vec<Listener>,
}

/// A configuration error: the file, and toml's message, or ours with the key and line.
#[derive(Debug)]
pub struct ConfigError {
    /// The file, if read from one.
    pub file: Option<PathBuf>,
    /// What is wrong (names the key and the line).
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}: {}", p.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The gid of group `name` in `/etc/group`.
fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let n = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        (n == name).then_some(gid)
    })
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Read and check the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parse and check `text`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            // toml's Display shows "TOML parse error at line L, column C", the source line
            // with a caret, and the message naming the key (a missing key is reported at the
            // start of its table). Add the line if a message ever lacks it.
            let mut msg = e.to_string();
            if let Some(span) = e.span() {
                let line = line_of(text, span.start);
                if !msg.contains(&format!("line {line}")) {
                    msg = format!("line {line}: {msg}");
                }
            }
            ConfigError {
                file: None,
                message: msg.trim_end().to_string(),
            }
        })?;
        let err = |key: &str, span: std::ops::Range<usize>, what: String| ConfigError {
            file: None,
            message: format!("`{key}` (line {}): {what}", line_of(text, span.start)),
        };
        let secs = |key: &str, s: &Spanned<f64>| {
            let x = *s.get_ref();
            // At least a millisecond (a smaller value would round to a zero duration);
            // NaN fails the range test too.
            let bad = || {
                err(
                    key,
                    s.span(),
                    format!("{x} is not a number of seconds in [0.001, 86400]"),
                )
            };
            if !(0.001..=86_400.0).contains(&x) {
                return Err(bad());
            }
            Duration::try_from_secs_f64(x).map_err(|_| bad())
        };
        let mut timing = Timing::default();
        for field in Timing::FIELDS {
            if let (Some(v), Some(slot)) = (raw.timing(field), timing.field_mut(field)) {
                *slot = secs(&format!("{field}_secs"), v)?;
            }
        }
        if let Err(e) = timing.check() {
            // Blame the key of the pair that was set (the first if both were).
            let (field, span) = [e.field, e.other]
                .into_iter()
                .find_map(|f| raw.timing(f).map(|v| (f, v.span())))
                .unwrap_or((e.field, 0..0));
            return Err(err(&format!("{field}_secs"), span, e.why));
        }
        let nonempty = |key: &str, p: &Spanned<PathBuf>| {
            if p.get_ref().as_os_str().is_empty() {
                Err(err(key, p.span(), "must not be empty".into()))
            } else {
                Ok(p.get_ref().clone())
            }
        };
        let absolute = |key: &str, p: &Spanned<PathBuf>| {
            if p.get_ref().is_absolute() {
                Ok(p.get_ref().clone())
            } else {
                Err(err(
                    key,
                    p.span(),
                    format!("{} must be an absolute path", p.get_ref().display()),
                ))
            }
        };
        let control_socket = nonempty("control_socket", &raw.control_socket)?;
        let trigger_socket = nonempty("trigger_socket", &raw.trigger_socket)?;
        if control_socket.file_name().is_none() {
            return Err(err(
                "control_socket",
                raw.control_socket.span(),
                "has no file name".into(),
            ));
        }
        if trigger_socket == control_socket {
            return Err(err(
                "trigger_socket",
                raw.trigger_socket.span(),
                "must differ from control_socket".into(),
            ));
        }
        let binary = absolute("binary", &raw.binary)?;
        let allowed_binaries = raw
            .allowed_binaries
            .iter()
            .map(|p| absolute("allowed_binaries", p))
            .collect::<Result<Vec<_>, _>>()?;
        let binary_dir = raw
            .binary_dir
            .as_ref()
            .map(|p| absolute("binary_dir", p))
            .transpose()?;
        // Whoever can write a binary, or the directory it is in, chooses what runs: only root
        // and our own user may. Checked here for what exists, and again when a trigger names
        // a binary (and by the spawn itself, on the file it executes).
        let trusted = |key: &str, p: &Spanned<PathBuf>, dir: bool| {
            let checked = if dir {
                spawn::check_trusted_dir(p.get_ref())
            } else {
                spawn::check_trusted_binary(p.get_ref()).map(drop)
            };
            match checked {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(err(key, p.span(), e.to_string()))
                }
                _ => Ok(()),
            }
        };
        trusted("binary", &raw.binary, false)?;
        for p in &raw.allowed_binaries {
            trusted("allowed_binaries", p, false)?;
        }
        if let Some(p) = &raw.binary_dir {
            trusted("binary_dir", p, true)?;
        }
        let journal = match &raw.journal {
            Some(p) => nonempty("journal", p)?,
            None => {
                let mut j = control_socket.as_os_str().to_os_string();
                j.push(".journal");
                PathBuf::from(j)
            }
        };
        for k in raw.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ConfigError {
                    file: None,
                    message: format!("`env`: variable name {k:?} is empty or contains '=' or NUL"),
                });
            }
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for l in &raw.listeners {
            let name = l.name.get_ref();
            if name.is_empty() || name.contains(':') || name.contains('\0') {
                return Err(err(
                    "listeners.name",
                    l.name.span(),
                    format!("{name:?} must be non-empty and contain no ':' or NUL"),
                ));
            }
            if listeners.iter().any(|x| &x.name == name) {
                return Err(err(
                    "listeners.name",
                    l.name.span(),
                    format!("{name:?} is used twice"),
                ));
            }
            let a = l.addr.get_ref();
            let addr = match l.kind {
                Kind::Tcp | Kind::Udp => Addr::Inet(a.parse().map_err(|e| {
                    err(
                        "listeners.addr",
                        l.addr.span(),
                        format!("{a:?} is not a socket address (host:port): {e}"),
                    )
                })?),
                Kind::Unix => {
                    if a.is_empty() {
                        return Err(err(
                            "listeners.addr",
                            l.addr.span(),
                            "a unix listener needs a path".into(),
                        ));
                    }
                    Addr::Path(PathBuf::from(a))
                }
            };
            listeners.push(Listener {
                name: name.clone(),
                kind: l.kind,
                addr,
            });
        }
        let trigger_group = match &raw.trigger_group {
            None => None,
            Some(g) => Some(match g.get_ref() {
                Group::Gid(gid) => *gid,
                Group::Name(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                    .parse()
                    .map_err(|_| err("trigger_group", g.span(), format!("{n:?} is not a gid")))?,
                Group::Name(n) => group_gid(n).ok_or_else(|| {
                    err(
                        "trigger_group",
                        g.span(),
                        format!("no group named {n:?} in /etc/group"),
                    )
                })?,
            }),
        };
        let trigger_mode = match &raw.trigger_mode {
            None if trigger_group.is_some() => 0o660,
            None => 0o600,
            Some(m) => {
                let v = *m.get_ref();
                // Owner read and write, plus any read or write for the group and others;
                // nothing else (execute, setuid, sticky mean nothing on a socket).
                let ok = u32::try_from(v).ok().filter(|v| v & !0o066 == 0o600);
                let Some(mode) = ok else {
                    return Err(err(
                        "trigger_mode",
                        m.span(),
                        format!(
                            "{} is not 0o600 plus any of 0o060 (group) and 0o006 (others)",
                            if v < 0 {
                                format!("{v}")
                            } else {
                                format!("{v:#o}")
                            }
                        ),
                    ));
                };
                if trigger_group.is_some() && mode & 0o020 == 0 {
                    return Err(err(
                        "trigger_mode",
                        m.span(),
                        format!(
                            "{mode:#o} gives the group no write permission: trigger_group would \
                             let nobody in (use 0o660)"
                        ),
                    ));
                }
                mode
            }
        };
        let trigger_uids = match &raw.trigger_uids {
            None => handoff_engine::PeerPolicy::default().allowed_uids,
            Some(u) => {
                // The socket is ours (we bind it): root and we always get in; anyone else
                // only through the group's or others' write permission.
                let owner = rustix::process::geteuid().as_raw();
                let opened = trigger_mode & 0o022 != 0;
                if let Some(uid) = u
                    .get_ref()
                    .iter()
                    .find(|&&x| x != 0 && x != owner && !opened)
                {
                    return Err(err(
                        "trigger_uids",
                        u.span(),
                        format!(
                            "uid {uid} cannot connect to the trigger socket (owned by uid \
                             {owner}, mode {trigger_mode:#o}): set trigger_group to a group of \
                             uid {uid} (the mode becomes 0o660), or trigger_mode"
                        ),
                    ));
                }
                u.get_ref().clone()
            }
        };
        Ok(Config {
            control_socket,
            trigger_socket,
            binary,
            args: raw.args,
            env: raw.env,
            timing,
            journal,
            trigger_uids,
            trigger_group,
            trigger_mode,
            allowed_binaries,
            binary_dir,
            listeners,
        })
    }

    /// The binary a `handoff <path>` may go to, resolved (symlinks followed), or why not.
    /// `None` asks for the configured binary.
    ///
    /// A binary, or `binary_dir`, that someone other than root or this process's user could
    /// write is refused ([`spawn::check_trusted_binary`]); the configured binary only if it
    /// exists (a missing one is the spawn's error to report).
    pub fn resolve_target(&self, requested: Option<&Path>) -> Result<PathBuf, String> {
        let Some(p) = requested else {
            return match spawn::check_trusted_binary(&self.binary) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!(
                    "binary not allowed: {}: {e}",
                    self.binary.display()
                )),
                _ => Ok(self.binary.clone()),
            };
        };
        let refuse = || format!("binary not allowed: {}", p.display());
        if !p.is_absolute() {
            return Err(refuse());
        }
        let canon = std::fs::canonicalize(p).map_err(|_| refuse())?;
        let trusted = |canon: PathBuf| match spawn::check_trusted_binary(&canon) {
            Ok(_) => Ok(canon),
            Err(e) => Err(format!("{}: {e}", refuse())),
        };
        let same = |allowed: &Path| {
            allowed == p || std::fs::canonicalize(allowed).is_ok_and(|c| c == canon)
        };
        if same(&self.binary) || self.allowed_binaries.iter().any(|a| same(a)) {
            return trusted(canon);
        }
        if let Some(dir) = &self.binary_dir {
            let in_dir =
                std::fs::canonicalize(dir).is_ok_and(|d| canon.parent() == Some(d.as_path()));
            if in_dir && canon.is_file() {
                spawn::check_trusted_dir(dir).map_err(|e| format!("{}: {e}", refuse()))?;
                return trusted(canon);
            }
        }
        Err(refuse())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
control_socket = "/run/d/handoff.sock"
trigger_socket = "/run/d/handoff.trigger"
binary         = "/usr/local/bin/d"
drain_grace_secs = 25
deadline_secs    = 60

[[listeners]]
name = "http"
addr = "0.0.0.0:8080"
"#;

    fn error(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn seed_example_parses_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.binary, PathBuf::from("/usr/local/bin/d"));
        assert_eq!(c.timing.drain_grace, Duration::from_secs(25));
        assert_eq!(c.timing.deadline, Duration::from_secs(60));
        assert_eq!(c.journal, PathBuf::from("/run/d/handoff.sock.journal"));
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].kind, Kind::Tcp);
        assert_eq!(
            c.listeners[0].addr,
            Addr::Inet("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(
            c.trigger_uids,
            handoff_engine::PeerPolicy::default().allowed_uids
        );
        assert!(c.allowed_binaries.is_empty() && c.binary_dir.is_none());
    }

    #[test]
    fn full_example_parses() {
        let text = format!(
            "{}\n{}",
            r#"
control_socket = "c.sock"
trigger_socket = "t.sock"
binary = "/bin/true"
args = ["-a", "b"]
env = { A = "1", B = "two" }
journal = "/tmp/j"
trigger_uids = [0, 1000]
trigger_group = "1000"
allowed_binaries = ["/bin/false"]
binary_dir = "/opt/d"
"#,
            r#"
[[listeners]]
name = "u"
addr = "127.0.0.1:53"
kind = "udp"
[[listeners]]
name = "s"
addr = "/run/d/s.sock"
kind = "unix"
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.args, vec!["-a", "b"]);
        assert_eq!(c.env.get("B").map(String::as_str), Some("two"));
        assert_eq!(c.journal, PathBuf::from("/tmp/j"));
        assert_eq!(c.trigger_uids, vec![0, 1000]);
        assert_eq!(c.listeners[0].kind, Kind::Udp);
        assert_eq!(
            c.listeners[1].addr,
            Addr::Path(PathBuf::from("/run/d/s.sock"))
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = error(&format!("{GOOD}colour = \"red\"\n"));
        assert!(e.contains("colour") && e.contains("line 11"), "{e}");
        let e = error(&GOOD.replace("addr = ", "port = 1\naddr = "));
        assert!(e.contains("port") && e.contains("line 10"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = error(&GOOD.replace("deadline_secs    = 60", "deadline_secs = \"soon\""));
        assert!(e.contains("deadline_secs") && e.contains("line 6"), "{e}");
        let e = error(&GOOD.replace("addr = \"0.0.0.0:8080\"", "addr = \"x\"\nkind = \"sctp\""));
        assert!(e.contains("sctp") && e.contains("line 11"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = error(&GOOD.replace("binary         = \"/usr/local/bin/d\"", ""));
        assert!(e.contains("binary") && e.contains("line"), "{e}");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = error(&GOOD.replace("deadline_secs    = 60", "deadline_secs = = 60"));
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let e = error(&GOOD.replace("0.0.0.0:8080", "nowhere"));
        assert!(
            e.contains("`listeners.addr` (line 10)") && e.contains("nowhere"),
            "{e}"
        );
        let e = error(&GOOD.replace("/usr/local/bin/d", "bin/d"));
        assert!(e.contains("`binary` (line 4)"), "{e}");
        let e = error(&GOOD.replace("deadline_secs    = 60", "deadline_secs = 10"));
        assert!(e.contains("`drain_grace_secs` (line 5)"), "{e}");
        let e = error(&GOOD.replace("deadline_secs    = 60", "deadline_secs = -1"));
        assert!(e.contains("`deadline_secs` (line 6)"), "{e}");
        let twice = format!("{GOOD}\n[[listeners]]\nname = \"http\"\naddr = \"0.0.0.0:81\"\n");
        let e = error(&twice);
        assert!(
            e.contains("`listeners.name` (line 13)") && e.contains("twice"),
            "{e}"
        );
    }

    /// GOOD with `keys` added after `deadline_secs` (line 6): the added keys are lines 7...
    fn with(keys: &str) -> String {
        GOOD.replace(
            "deadline_secs    = 60\n",
            &format!("deadline_secs    = 60\n{keys}\n"),
        )
    }

    #[test]
    fn the_trigger_socket_group_and_mode_are_configurable() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.trigger_group, c.trigger_mode), (None, 0o600));
        let c = Config::parse(&with("trigger_group = \"4321\"\ntrigger_mode = 0o660")).unwrap();
        assert_eq!((c.trigger_group, c.trigger_mode), (Some(4321), 0o660));
        // By name (root is group 0 everywhere); a group alone opens the socket to it.
        let c = Config::parse(&with("trigger_group = \"root\"")).unwrap();
        assert_eq!((c.trigger_group, c.trigger_mode), (Some(0), 0o660));
        let c = Config::parse(&with("trigger_group = 4321")).unwrap();
        assert_eq!(c.trigger_group, Some(4321));
        for m in ["0o600", "0o660", "0o606", "0o666", "0o620", "0o644"] {
            let c = Config::parse(&with(&format!("trigger_mode = {m}"))).unwrap();
            assert_eq!(format!("{:#o}", c.trigger_mode), m);
        }
        for bad in [
            "0o700",
            "0o400",
            "0o4660",
            "0o1660",
            "0o664 + 1",
            "-1",
            "0o10000000000",
            "0o661",
        ] {
            let r = Config::parse(&with(&format!("trigger_mode = {bad}")));
            let e = r.map(|c| c.trigger_mode).unwrap_err().to_string();
            assert!(
                e.contains("trigger_mode") && e.contains("line 7"),
                "{bad}: {e}"
            );
        }
        let e = error(&with("trigger_group = \"no such group here\""));
        assert!(e.contains("`trigger_group` (line 7)"), "{e}");
        let e = error(&with("trigger_group = \"\""));
        assert!(e.contains("`trigger_group` (line 7)"), "{e}");
        // A group given no write permission would admit nobody.
        let e = error(&with("trigger_group = \"4321\"\ntrigger_mode = 0o600"));
        assert!(e.contains("`trigger_mode` (line 8)"), "{e}");
    }

    #[test]
    fn trigger_uids_the_socket_cannot_admit_are_refused_naming_key_and_line() {
        let me = rustix::process::geteuid().as_raw();
        let stranger = if me == 4_242_424 {
            4_242_425
        } else {
            4_242_424
        };
        // The socket is ours and 0600: a uid other than ours or root cannot even connect.
        let e = error(&with(&format!("trigger_uids = [0, {stranger}]")));
        assert!(
            e.contains("`trigger_uids` (line 7)")
                && e.contains(&format!("uid {stranger} cannot connect"))
                && e.contains("trigger_mode"),
            "{e}"
        );
        // Ours and root are always fine.
        Config::parse(&with(&format!("trigger_uids = [0, {me}]"))).unwrap();
        // Opened to a group, or to everyone (the peer check still admits only the list).
        Config::parse(&with(&format!(
            "trigger_uids = [0, {stranger}]\ntrigger_group = \"4321\""
        )))
        .unwrap();
        Config::parse(&with(&format!(
            "trigger_uids = [0, {stranger}]\ntrigger_mode = 0o606"
        )))
        .unwrap();
        Config::parse(&with(&format!(
            "trigger_uids = [0, {stranger}]\ntrigger_mode = 0o660"
        )))
        .unwrap();
    }

    #[test]
    fn durations_out_of_range_are_refused_naming_key_and_line() {
        // The tiny ones first: they used to be accepted (as a zero drain grace).
        for bad in [
            "1e-12", "0.0009", "inf", "-inf", "nan", "1e20", "86400.5", "0", "-0.0", "-1",
        ] {
            let text = GOOD.replace(
                "drain_grace_secs = 25",
                &format!("drain_grace_secs = {bad}"),
            );
            let r = Config::parse(&text);
            assert!(
                r.is_err(),
                "drain_grace_secs = {bad}: accepted as {:?}",
                r.map(|c| c.timing.drain_grace)
            );
            let e = error(&text);
            assert!(
                e.contains("`drain_grace_secs` (line 5)")
                    && e.contains("is not a number of seconds in [0.001, 86400]"),
                "{bad}: {e}"
            );
            let e =
                error(&GOOD.replace("deadline_secs    = 60", &format!("deadline_secs = {bad}")));
            assert!(e.contains("`deadline_secs` (line 6)"), "{bad}: {e}");
        }
        let c = Config::parse(&GOOD.replace("drain_grace_secs = 25", "drain_grace_secs = 0.001"))
            .unwrap();
        assert_eq!(c.timing.drain_grace, Duration::from_millis(1));
    }

    /// GOOD with `<field>_secs = value`, and that key's line: the two keys GOOD has are
    /// replaced (lines 5 and 6), any other is added (line 7).
    fn with_timing(field: &str, value: &str) -> (String, usize) {
        let key = format!("{field}_secs = {value}");
        match field {
            "drain_grace" => (GOOD.replace("drain_grace_secs = 25", &key), 5),
            "deadline" => (GOOD.replace("deadline_secs    = 60", &key), 6),
            _ => (with(&key), 7),
        }
    }

    #[test]
    fn every_timing_is_a_key_and_a_good_value_is_honoured() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.timing, Timing::default());
        // One key at a time, each with a value that fits the other defaults.
        for (field, v) in [
            ("heartbeat_interval", 0.25),
            ("peer_silence", 7.0),
            ("slack", 3.0),
            ("retry_interval", 0.02),
            ("recovery_wait", 12.0),
            ("backoff_min", 0.2),
            ("backoff_max", 20.0),
            ("stable_after", 30.5),
            ("drain_grace", 20.0),
            ("deadline", 90.0),
        ] {
            let c = Config::parse(&with_timing(field, &v.to_string()).0)
                .unwrap_or_else(|e| panic!("{field}_secs = {v}: {e}"));
            let mut want = Timing::default();
            *want.field_mut(field).unwrap() = Duration::from_secs_f64(v);
            assert_eq!(c.timing, want, "{field}_secs = {v}");
        }
    }

    #[test]
    fn a_bad_timing_names_its_key_and_line() {
        for field in Timing::FIELDS {
            let (text, line) = with_timing(field, "-1");
            let e = error(&text);
            assert!(
                e.contains(&format!("`{field}_secs` (line {line})"))
                    && e.contains("is not a number of seconds"),
                "{field}: {e}"
            );
            let e = error(&with_timing(field, "\"soon\"").0);
            assert!(
                e.contains(&format!("{field}_secs")) && e.contains(&format!("line {line}")),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn timings_that_do_not_fit_together_name_the_key_set() {
        for (keys, key, line) in [
            ("heartbeat_interval_secs = 6", "heartbeat_interval_secs", 7),
            ("peer_silence_secs = 0.2", "peer_silence_secs", 7),
            (
                "heartbeat_interval_secs = 2\npeer_silence_secs = 1",
                "heartbeat_interval_secs",
                7,
            ),
            ("backoff_min_secs = 20", "backoff_min_secs", 7),
            ("backoff_max_secs = 0.05", "backoff_max_secs", 7),
            (
                "backoff_min_secs = 3\nbackoff_max_secs = 2",
                "backoff_min_secs",
                7,
            ),
        ] {
            let e = error(&with(keys));
            assert!(
                e.contains(&format!("`{key}` (line {line})")) && e.contains("must be"),
                "{keys}: {e}"
            );
        }
        let c = Config::parse(&with("backoff_min_secs = 2\nbackoff_max_secs = 2")).unwrap();
        assert_eq!(c.timing.backoff_min, c.timing.backoff_max);
    }

    #[test]
    fn targets_are_checked() {
        let dir = std::env::temp_dir().join(format!("hsup-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bins")).unwrap();
        for f in ["main", "bins/v2", "other"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        std::os::unix::fs::symlink(dir.join("other"), dir.join("bins/sneaky")).unwrap();
        let text = format!(
            "control_socket = \"c\"\ntrigger_socket = \"t\"\nbinary = \"{0}/main\"\nbinary_dir = \"{0}/bins\"\n",
            dir.display()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.resolve_target(None).unwrap(), dir.join("main"));
        assert!(c.resolve_target(Some(&dir.join("main"))).is_ok());
        assert!(c.resolve_target(Some(&dir.join("bins/v2"))).is_ok());
        for bad in ["other", "bins/sneaky", "bins/missing", "bins"] {
            let e = c.resolve_target(Some(&dir.join(bad))).unwrap_err();
            assert!(e.starts_with("binary not allowed: "), "{e}");
        }
        assert!(c.resolve_target(Some(Path::new("main"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A binary, or `binary_dir`, that someone other than root or this process's user could
    /// write is refused when the configuration is loaded, and again when a trigger names it.
    #[test]
    fn writable_binaries_and_binary_dirs_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = std::env::temp_dir().join(format!("hsup-cfg-writable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bins")).unwrap();
        std::fs::create_dir_all(dir.join("extra")).unwrap();
        mode(&dir, 0o755);
        mode(&dir.join("bins"), 0o755);
        mode(&dir.join("extra"), 0o755);
        for f in ["main", "bins/v2", "extra/v3"] {
            std::fs::write(dir.join(f), b"").unwrap();
            mode(&dir.join(f), 0o755);
        }
        let file = dir.join("handoff.toml");
        std::fs::write(
            &file,
            format!(
                "control_socket = \"c\"\ntrigger_socket = \"t\"\nbinary = \"{0}/main\"\n\
                 binary_dir = \"{0}/bins\"\nallowed_binaries = [\"{0}/extra/v3\"]\n",
                dir.display()
            ),
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        for target in [None, Some(dir.join("bins/v2")), Some(dir.join("extra/v3"))] {
            assert!(c.resolve_target(target.as_deref()).is_ok(), "{target:?}");
        }
        let load_error = || Config::load(&file).unwrap_err().to_string();

        // binary_dir writable by its group: refused at load, and at trigger time.
        mode(&dir.join("bins"), 0o775);
        let e = load_error();
        assert!(e.contains("`binary_dir`") && e.contains("writable"), "{e}");
        let e = c.resolve_target(Some(&dir.join("bins/v2"))).unwrap_err();
        assert!(
            e.starts_with("binary not allowed: ") && e.contains("writable"),
            "{e}"
        );
        mode(&dir.join("bins"), 0o755);

        // The configured binary, writable by others.
        mode(&dir.join("main"), 0o757);
        let e = load_error();
        assert!(e.contains("`binary`") && e.contains("writable"), "{e}");
        for target in [None, Some(dir.join("main"))] {
            let e = c.resolve_target(target.as_deref()).unwrap_err();
            assert!(e.contains("writable"), "{target:?}: {e}");
        }
        mode(&dir.join("main"), 0o755);

        // An allowed binary in a directory writable by its group.
        mode(&dir.join("extra"), 0o775);
        let e = load_error();
        assert!(
            e.contains("`allowed_binaries`") && e.contains("writable"),
            "{e}"
        );
        let e = c.resolve_target(Some(&dir.join("extra/v3"))).unwrap_err();
        assert!(e.contains("writable"), "{e}");
        mode(&dir.join("extra"), 0o755);

        // A file in binary_dir writable by its group.
        mode(&dir.join("bins/v2"), 0o775);
        let e = c.resolve_target(Some(&dir.join("bins/v2"))).unwrap_err();
        assert!(e.contains("writable"), "{e}");

        // A binary that does not exist yet is no load error (it is checked when named).
        std::fs::remove_file(dir.join("extra/v3")).unwrap();
        mode(&dir.join("bins/v2"), 0o755);
        assert!(Config::load(&file).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
