//! What the trigger socket answers: the handoff result line, the `status` line and the
//! `metrics` exposition.
//!
//! # The `status` line
//!
//! One line of space-separated `key=value` pairs, always these keys in this order (new keys
//! may be appended at the end; parse by key, not by position):
//!
//! | key | value |
//! | --- | --- |
//! | `state` | `idle`, `handoff`, `recovering` or `stopping` |
//! | `serving_pid` | the serving daemon's pid, or `-` |
//! | `binary` | its executable (`/proc/<pid>/exe`, else what we started), or `-` |
//! | `current` | the id of the handoff in progress, or `-` |
//! | `last` | how the last handoff ended: `none`, `committed`, `rolled_back`, `lost` |
//! | `handoff_id` | the last handoff's id (16 hex digits), or `-` |
//! | `abort_reason` | why it did not commit (`Debug` of the reason), or `-` |
//! | `phases` | its phases, `name:<ms>ms` joined by `,` (`name:-` when not reached): `spawn_to_hello`, `listeners`, `greet_incumbent`, `drain`, `seal`, `begin_to_ready`, `commit`, `to_commit` (trigger to the successor's commit acknowledgement), `total` (trigger to outcome); or `-` |
//! | `handoffs` | handoffs started since the supervisor started |
//! | `recoveries` | recoveries completed (the first one included) |
//! | `error` | the last recovery error, cleared by a successful recovery, or `-` |
//! | `build` | the build id the serving daemon reported in its handshake, or `-` |
//!
//! Values never contain a space: `%`, space, and control characters are written `%XX`
//! (percent-encoding), so `value.split(' ')` then `split_once('=')` parses a line.

use std::fmt::Write as _;
use std::time::Duration;

use handoff_proto::{AbortReason, HandoffId, PhaseTimes};

/// How a handoff ended, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The successor serves.
    Committed,
    /// The incumbent serves again.
    RolledBack,
    /// Nobody could be confirmed serving (a recovery followed).
    Lost,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Committed => "committed",
            Ending::RolledBack => "rolled_back",
            Ending::Lost => "lost",
        }
    }
}

/// The last handoff.
#[derive(Clone, Debug)]
pub struct Last {
    /// Its id.
    pub id: HandoffId,
    /// How it ended.
    pub ending: Ending,
    /// Why it did not commit.
    pub abort_reason: Option<AbortReason>,
    /// Where the time went.
    pub times: PhaseTimes,
}

const PHASES: [&str; 9] = [
    "spawn_to_hello",
    "listeners",
    "greet_incumbent",
    "drain",
    "seal",
    "begin_to_ready",
    "commit",
    "to_commit",
    "total",
];

fn phases(t: &PhaseTimes) -> [Option<Duration>; 9] {
    [
        t.spawn_to_hello,
        t.listeners,
        t.greet_incumbent,
        t.drain,
        t.seal,
        t.begin_to_ready,
        t.commit,
        t.to_commit,
        Some(t.total),
    ]
}

/// Counters since the supervisor started.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Handoffs started.
    pub handoffs: u64,
    /// Committed.
    pub committed: u64,
    /// Rolled back (the incumbent serves again).
    pub rolled_back: u64,
    /// Ended with nobody confirmed serving.
    pub failed: u64,
    /// Triggers answered `busy`.
    pub busy: u64,
    /// Recoveries completed.
    pub recoveries: u64,
    /// The last handoff.
    pub last: Option<Last>,
    /// Per phase: total seconds and count, over every ended handoff.
    sums: [(f64, u64); 9],
}

impl Stats {
    /// Count an ended handoff.
    pub fn ended(&mut self, last: Last) {
        match last.ending {
            Ending::Committed => self.committed += 1,
            Ending::RolledBack => self.rolled_back += 1,
            Ending::Lost => self.failed += 1,
        }
        for (i, d) in phases(&last.times).into_iter().enumerate() {
            if let Some(d) = d {
                self.sums[i].0 += d.as_secs_f64();
                self.sums[i].1 += 1;
            }
        }
        self.last = Some(last);
    }
}

/// Percent-encode what would break a `key=value` word: `%`, space, control characters.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c == ' ' || c.is_control() {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Undo [`escape`].
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The answer to a `handoff` that ended.
pub fn handoff_line(id: HandoffId, committed: bool, reason: &Option<AbortReason>) -> String {
    format!("ok: handoff_id={id} committed={committed} abort_reason={reason:?}")
}

/// What `status` reports besides the counters.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// `idle`, `handoff`, `recovering`, `stopping`.
    pub state: &'a str,
    /// The serving daemon.
    pub serving_pid: Option<u32>,
    /// Its executable.
    pub binary: Option<String>,
    /// The handoff in progress.
    pub current: Option<HandoffId>,
    /// The last recovery error.
    pub error: Option<&'a str>,
    /// The build id the serving daemon reported.
    pub build: Option<&'a str>,
}

fn ms(d: Duration) -> String {
    format!("{:.3}ms", d.as_secs_f64() * 1000.0)
}

/// The `status` line (no newline).
pub fn status_line(s: &Snapshot<'_>, stats: &Stats) -> String {
    let dash = || "-".to_string();
    let last = stats.last.as_ref();
    let phases = last.map_or_else(dash, |l| {
        PHASES
            .iter()
            .zip(phases(&l.times))
            .map(|(n, d)| format!("{n}:{}", d.map_or_else(dash, ms)))
            .collect::<Vec<_>>()
            .join(",")
    });
    format!(
        "state={} serving_pid={} binary={} current={} last={} handoff_id={} abort_reason={} \
         phases={} handoffs={} recoveries={} error={} build={}",
        s.state,
        s.serving_pid.map_or_else(dash, |p| p.to_string()),
        s.binary.as_deref().map_or_else(dash, escape),
        s.current.map_or_else(dash, |h| h.to_string()),
        last.map_or("none", |l| l.ending.name()),
        last.map_or_else(dash, |l| l.id.to_string()),
        last.and_then(|l| l.abort_reason.as_ref())
            .map_or_else(dash, |r| escape(&format!("{r:?}"))),
        phases,
        stats.handoffs,
        stats.recoveries,
        s.error.map_or_else(dash, escape),
        s.build.map_or_else(dash, escape),
    )
}

/// The Prometheus text exposition (version 0.0.4), ending with an empty line.
pub fn metrics(s: &Snapshot<'_>, stats: &Stats) -> String {
    let mut o = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        "handoff_handoffs_total",
        "Handoffs started.",
        stats.handoffs,
    );
    counter(
        "handoff_handoffs_committed_total",
        "Handoffs committed (the successor serves).",
        stats.committed,
    );
    counter(
        "handoff_handoffs_rolled_back_total",
        "Handoffs rolled back (the incumbent serves again).",
        stats.rolled_back,
    );
    counter(
        "handoff_handoffs_failed_total",
        "Handoffs that ended with nobody confirmed serving (a recovery followed).",
        stats.failed,
    );
    counter(
        "handoff_triggers_busy_total",
        "Triggers refused because a handoff or recovery was running.",
        stats.busy,
    );
    counter(
        "handoff_recoveries_total",
        "Recoveries completed (the first one included).",
        stats.recoveries,
    );
    let _ = writeln!(
        o,
        "# HELP handoff_handoff_in_progress Whether a handoff is running.\n\
         # TYPE handoff_handoff_in_progress gauge\nhandoff_handoff_in_progress {}",
        u8::from(s.current.is_some())
    );
    let _ = writeln!(
        o,
        "# HELP handoff_recovering Whether the supervisor is looking for the serving daemon.\n\
         # TYPE handoff_recovering gauge\nhandoff_recovering {}",
        u8::from(s.state == "recovering")
    );
    let _ = writeln!(
        o,
        "# HELP handoff_serving_pid The serving daemon's pid (0: none known).\n\
         # TYPE handoff_serving_pid gauge\nhandoff_serving_pid {}",
        s.serving_pid.unwrap_or(0)
    );
    let _ = writeln!(
        o,
        "# HELP handoff_phase_duration_seconds Phase durations of ended handoffs.\n\
         # TYPE handoff_phase_duration_seconds summary"
    );
    for (i, name) in PHASES.iter().enumerate() {
        let (sum, count) = stats.sums[i];
        let _ = writeln!(
            o,
            "handoff_phase_duration_seconds_sum{{phase=\"{name}\"}} {sum:.6}\n\
             handoff_phase_duration_seconds_count{{phase=\"{name}\"}} {count}"
        );
    }
    if let Some(l) = &stats.last {
        let _ = writeln!(
            o,
            "# HELP handoff_last_phase_seconds Phase durations of the last handoff.\n\
             # TYPE handoff_last_phase_seconds gauge"
        );
        for (name, d) in PHASES.iter().zip(phases(&l.times)) {
            if let Some(d) = d {
                let _ = writeln!(
                    o,
                    "handoff_last_phase_seconds{{phase=\"{name}\"}} {:.6}",
                    d.as_secs_f64()
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP handoff_last_committed Whether the last handoff committed.\n\
             # TYPE handoff_last_committed gauge\nhandoff_last_committed {}",
            u8::from(l.ending == Ending::Committed)
        );
    }
    o.push('\n');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times() -> PhaseTimes {
        PhaseTimes {
            spawn_to_hello: Some(Duration::from_micros(2100)),
            listeners: Some(Duration::from_micros(300)),
            greet_incumbent: None,
            drain: None,
            seal: None,
            begin_to_ready: None,
            commit: None,
            to_commit: None,
            total: Duration::from_millis(5),
        }
    }

    #[test]
    fn escape_round_trips() {
        for s in ["plain", "a b", "100%", "line\nbreak", "/x (deleted)", "é ü"] {
            let e = escape(s);
            assert!(!e.contains(' ') && !e.contains('\n'), "{e}");
            assert_eq!(unescape(&e), s);
        }
    }

    #[test]
    fn status_line_format() {
        let mut stats = Stats::default();
        let snap = Snapshot {
            state: "idle",
            serving_pid: None,
            binary: None,
            current: None,
            error: None,
            build: None,
        };
        assert_eq!(
            status_line(&snap, &stats),
            "state=idle serving_pid=- binary=- current=- last=none handoff_id=- \
             abort_reason=- phases=- handoffs=0 recoveries=0 error=- build=-"
        );
        stats.handoffs = 1;
        stats.ended(Last {
            id: HandoffId(0xab),
            ending: Ending::RolledBack,
            abort_reason: Some(AbortReason::SpawnFailed("no such file".into())),
            times: times(),
        });
        let snap = Snapshot {
            state: "idle",
            serving_pid: Some(42),
            binary: Some("/opt/my d".into()),
            current: None,
            error: Some("cold start failed"),
            build: Some("my-daemon 2.1"),
        };
        let line = status_line(&snap, &stats);
        assert_eq!(
            line,
            "state=idle serving_pid=42 binary=/opt/my%20d current=- last=rolled_back \
             handoff_id=00000000000000ab abort_reason=SpawnFailed(\"no%20such%20file\") \
             phases=spawn_to_hello:2.100ms,listeners:0.300ms,greet_incumbent:-,drain:-,seal:-,\
             begin_to_ready:-,commit:-,to_commit:-,total:5.000ms handoffs=1 recoveries=0 error=cold%20start%20failed \
             build=my-daemon%202.1"
        );
        for word in line.split(' ') {
            assert!(word.split_once('=').is_some(), "{word}");
        }
    }

    #[test]
    fn metrics_format() {
        let mut stats = Stats {
            handoffs: 2,
            ..Stats::default()
        };
        for ending in [Ending::Committed, Ending::Lost] {
            stats.ended(Last {
                id: HandoffId(1),
                ending,
                abort_reason: None,
                times: times(),
            });
        }
        let snap = Snapshot {
            state: "idle",
            serving_pid: Some(7),
            binary: None,
            current: None,
            error: None,
            build: None,
        };
        let m = metrics(&snap, &stats);
        assert!(m.ends_with("\n\n"));
        for want in [
            "handoff_handoffs_total 2\n",
            "handoff_handoffs_committed_total 1\n",
            "handoff_handoffs_rolled_back_total 0\n",
            "handoff_handoffs_failed_total 1\n",
            "handoff_serving_pid 7\n",
            "handoff_phase_duration_seconds_count{phase=\"total\"} 2\n",
            "handoff_phase_duration_seconds_sum{phase=\"total\"} 0.010000\n",
            "handoff_phase_duration_seconds_count{phase=\"drain\"} 0\n",
            "handoff_last_phase_seconds{phase=\"spawn_to_hello\"} 0.002100\n",
            "# TYPE handoff_handoffs_total counter\n",
        ] {
            assert!(m.contains(want), "missing {want:?} in\n{m}");
        }
        // Every sample line: name{labels} value.
        for l in m.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn handoff_line_format() {
        assert_eq!(
            handoff_line(HandoffId(1), true, &None),
            "ok: handoff_id=0000000000000001 committed=true abort_reason=None"
        );
        assert_eq!(
            handoff_line(HandoffId(2), false, &Some(AbortReason::SuccessorExited)),
            "ok: handoff_id=0000000000000002 committed=false abort_reason=Some(SuccessorExited)"
        );
    }
}
