//! Plain data shared by the wire format, the role machines and the journal.

use core::fmt;
use core::time::Duration;

use serde::{Deserialize, Serialize};

/// Process id, as the kernel reports it. The core never signals or inspects a process; it only
/// names one so that a driver can.
pub type Pid = u32;

/// Identifies one handoff. The supervisor picks it; every message of that handoff carries it,
/// and a message with another id is peer misbehaviour, never silently applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct HandoffId(pub u64);

impl fmt::Display for HandoffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The kind of socket a listener is. The driver checks every received descriptor against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum ListenerKind {
    /// A listening `SOCK_STREAM` socket in `AF_INET` or `AF_INET6`.
    Tcp,
    /// A bound `SOCK_DGRAM` socket in `AF_INET` or `AF_INET6`.
    Udp,
    /// A listening `SOCK_STREAM` socket in `AF_UNIX`.
    UnixStream,
    /// A bound `SOCK_DGRAM` socket in `AF_UNIX`.
    UnixDatagram,
}

/// A listener as the protocol sees it: a name and a kind. The descriptor itself travels beside
/// the frame (SCM_RIGHTS) and never enters this crate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ListenerInfo {
    /// The name the application asks for (`LISTEN_FDNAMES` entry).
    pub name: String,
    /// What the descriptor must be.
    pub kind: ListenerKind,
}

/// Most descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// What the incumbent's drain hook reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DrainReport {
    /// Connections still open when the drain returned (they are cut or handed over by the
    /// application; the protocol only reports the number).
    pub open_conns_remaining: u64,
    /// Whether the application stopped accepting on its listeners.
    pub accept_closed: bool,
}

/// What the incumbent's seal hook reports: the state the successor must find on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct SealReport {
    /// Last durable revision of every shard, in shard order.
    pub last_revision_per_shard: Vec<u64>,
    /// A fingerprint of the sealed data directory, chosen by the application.
    pub data_dir_fingerprint: u64,
}

/// What the successor reports with `Ready`. The supervisor checks it against the seal report
/// before it commits (see [`SealReport::accepts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ReadinessSnapshot {
    /// Human-readable addresses the successor serves on.
    pub listening_on: Vec<String>,
    /// The application's own health check passed.
    pub healthz_ok: bool,
    /// The revision of every shard as the successor opened it.
    pub advertised_revision_per_shard: Vec<u64>,
}

/// A point-in-time view of the application, sent with `Resumed` and on status requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StateSnapshot {
    /// Number of shards.
    pub shard_count: u32,
    /// Connections currently open.
    pub open_conns: u64,
    /// Last durable revision of every shard.
    pub last_revision_per_shard: Vec<u64>,
}

impl SealReport {
    /// Whether a successor that reports `ready` has opened the data this seal left behind: the
    /// application must be healthy, have the same number of shards, and no shard may be older
    /// than sealed. `Err` names the first mismatch.
    pub fn accepts(&self, ready: &ReadinessSnapshot) -> Result<(), String> {
        if !ready.healthz_ok {
            return Err("successor reported healthz_ok = false".into());
        }
        let (sealed, opened) = (
            &self.last_revision_per_shard,
            &ready.advertised_revision_per_shard,
        );
        if sealed.len() != opened.len() {
            return Err(format!(
                "successor opened {} shards, incumbent sealed {}",
                opened.len(),
                sealed.len()
            ));
        }
        for (shard, (s, o)) in sealed.iter().zip(opened).enumerate() {
            if o < s {
                return Err(format!(
                    "shard {shard}: successor opened revision {o}, incumbent sealed {s}"
                ));
            }
        }
        Ok(())
    }
}

/// Why a handoff did not commit. Carried in `Abort` and in the supervisor's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[non_exhaustive]
pub enum AbortReason {
    /// The successor binary could not be started.
    SpawnFailed(String),
    /// The successor exited before it was committed.
    SuccessorExited,
    /// The successor's channel closed before it was committed.
    SuccessorDisconnected,
    /// The overall deadline passed before the successor was ready.
    DeadlineExceeded,
    /// A peer stayed silent longer than the silence limit.
    PeerSilent,
    /// The incumbent's control socket could not be reached.
    IncumbentUnreachable(String),
    /// The incumbent's drain hook failed.
    DrainFailed(String),
    /// The incumbent's seal hook failed.
    SealFailed(String),
    /// The successor could not take the data-directory lock.
    LockUnavailable,
    /// The successor's readiness did not match what the incumbent sealed.
    ReadinessRejected(String),
    /// A peer broke the protocol.
    ProtocolViolation(String),
    /// The descriptors that arrived did not match the listener names announced.
    ListenerMismatch(String),
    /// The supervisor is going away (shutdown) or was lost.
    SupervisorLost,
    /// The supervisor could not make its journal durable (full disk, I/O error).
    JournalFailed(String),
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SpawnFailed(e) => write!(f, "successor could not be spawned: {e}"),
            Self::SuccessorExited => f.write_str("successor exited before commit"),
            Self::SuccessorDisconnected => {
                f.write_str("successor closed its channel before commit")
            }
            Self::DeadlineExceeded => f.write_str("handoff deadline exceeded"),
            Self::PeerSilent => f.write_str("peer silent past the silence limit"),
            Self::IncumbentUnreachable(e) => write!(f, "incumbent unreachable: {e}"),
            Self::DrainFailed(e) => write!(f, "drain hook failed: {e}"),
            Self::SealFailed(e) => write!(f, "seal hook failed: {e}"),
            Self::LockUnavailable => {
                f.write_str("successor could not take the data-directory lock")
            }
            Self::ReadinessRejected(e) => write!(f, "successor readiness rejected: {e}"),
            Self::ProtocolViolation(e) => write!(f, "protocol violation: {e}"),
            Self::ListenerMismatch(e) => write!(f, "listener mismatch: {e}"),
            Self::SupervisorLost => f.write_str("supervisor lost"),
            Self::JournalFailed(e) => write!(f, "journal write failed: {e}"),
        }
    }
}

/// What the lock file in the data directory says, next to the kernel `flock` itself.
///
/// The holder writes it right after taking the lock, and the successor marks it committed before
/// it acknowledges `Commit`. An incumbent that lost its supervisor after releasing the lock reads
/// it to learn, without anyone's help, whether the successor committed (then it retires) or not
/// (then it waits for the lock and resumes). See ARCHITECTURE.md, "Supervisor loss".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct LockRecord {
    /// The process that holds (or last held) the lock.
    pub owner: Pid,
    /// Set once the owner committed this handoff as successor.
    pub committed: Option<HandoffId>,
}

/// The timing policy of a deployment: every duration the role machines, the drivers and the
/// reference supervisor use, each with its default. This is the one place these values and
/// their defaults are defined and documented: `SpawnSpec::default` reads `drain_grace` and
/// `deadline` from [`Timing::default`], the supervisor engine hands the whole value to its
/// machine, and the reference supervisor's TOML accepts every field as `<field>_secs` (float
/// seconds). One value is shared by all roles of a deployment; a handoff's drain grace and
/// deadline travel in its messages. [`Timing::check`] says whether the values fit together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timing {
    /// How often a party sends `Heartbeat` while a handoff runs. The machines schedule these
    /// themselves; application code never has to. Default 500 ms; must be shorter than
    /// `peer_silence`.
    pub heartbeat_interval: Duration,
    /// A peer that sends nothing for this long during a handoff is considered lost. Default
    /// 5 s.
    pub peer_silence: Duration,
    /// Time allowed past a handoff's deadline for aborts and acknowledgements to finish. The
    /// supervisor's outcome comes by `deadline + 2 × slack` at the latest (an unacknowledged
    /// commit is abandoned at `deadline + slack`, and its abort takes up to one slack more), and
    /// an incumbent that lost its supervisor exits by `deadline + 3 × slack` if it cannot get
    /// the lock back (invariant I5). Default 5 s.
    pub slack: Duration,
    /// How often a waiting party retries the data-directory lock or a reconnect. Default
    /// 50 ms.
    pub retry_interval: Duration,
    /// How long a recovering supervisor waits for a process that is still resolving a handoff
    /// before it kills the leftovers and starts the daemon cold; a daemon it started cold gets
    /// as long again to answer. Default 30 s.
    pub recovery_wait: Duration,
    /// The crash backoff: the first wait between two recovery attempts (or cold starts). Each
    /// further attempt waits twice as long as the one before, up to `backoff_max`, and never
    /// less than `retry_interval`. Default 100 ms; at most `backoff_max`.
    pub backoff_min: Duration,
    /// The longest wait between two recovery attempts. Default 10 s.
    pub backoff_max: Duration,
    /// A daemon that served this long before it was lost starts the backoff over at
    /// `backoff_min`. Default 10 s.
    pub stable_after: Duration,
    /// How long the incumbent's drain may take, unless a trigger says otherwise. Default
    /// 25 s; must be shorter than `deadline`.
    pub drain_grace: Duration,
    /// The whole handoff, trigger to commit, must fit in this, unless a trigger says otherwise
    /// (see `slack` for what aborting adds). Default 60 s.
    pub deadline: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            peer_silence: Duration::from_secs(5),
            slack: Duration::from_secs(5),
            retry_interval: Duration::from_millis(50),
            recovery_wait: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            drain_grace: Duration::from_secs(25),
            deadline: Duration::from_secs(60),
        }
    }
}

/// Two [`Timing`] values that do not fit together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct TimingError {
    /// The field at fault (of the two, the one a user most likely set).
    pub field: &'static str,
    /// The other field of the pair.
    pub other: &'static str,
    /// What is wrong, naming both values.
    pub why: String,
}

impl Timing {
    /// The fields, by name, for messages and configuration keys.
    pub const FIELDS: [&'static str; 10] = [
        "heartbeat_interval",
        "peer_silence",
        "slack",
        "retry_interval",
        "recovery_wait",
        "backoff_min",
        "backoff_max",
        "stable_after",
        "drain_grace",
        "deadline",
    ];

    /// The field named `name` (one of [`Timing::FIELDS`]).
    pub fn field_mut(&mut self, name: &str) -> Option<&mut Duration> {
        Some(match name {
            "heartbeat_interval" => &mut self.heartbeat_interval,
            "peer_silence" => &mut self.peer_silence,
            "slack" => &mut self.slack,
            "retry_interval" => &mut self.retry_interval,
            "recovery_wait" => &mut self.recovery_wait,
            "backoff_min" => &mut self.backoff_min,
            "backoff_max" => &mut self.backoff_max,
            "stable_after" => &mut self.stable_after,
            "drain_grace" => &mut self.drain_grace,
            "deadline" => &mut self.deadline,
            _ => return None,
        })
    }

    /// Whether the values fit together: a heartbeat comes before the silence limit, the drain
    /// grace is shorter than the deadline, and the backoff's minimum is at most its maximum.
    pub fn check(&self) -> Result<(), TimingError> {
        let pairs = [
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                "peer_silence",
                self.peer_silence,
                "shorter than",
            ),
            (
                "drain_grace",
                self.drain_grace,
                "deadline",
                self.deadline,
                "shorter than",
            ),
            (
                "backoff_min",
                self.backoff_min,
                "backoff_max",
                self.backoff_max,
                "at most",
            ),
        ];
        for (field, a, other, b, rel) in pairs {
            let ok = if rel == "at most" { a <= b } else { a < b };
            if !ok {
                return Err(TimingError {
                    field,
                    other,
                    why: format!("{field} ({a:?}) must be {rel} {other} ({b:?})"),
                });
            }
        }
        Ok(())
    }
}
