//! A model of the world the three role machines live in, for the model checker and property
//! tests: processes, ordered channels, the kernel's flock and lock record, the control socket,
//! the journal, hooks, timers, crashes and a supervisor restart.
//!
//! Every step delivers one input to one machine, drains all its outputs and performs them,
//! exactly as a driver does. A crash may cut a step after any prefix of its outputs.
//!
//! Abstractions (each keeps every behaviour that matters and removes only repetition):
//! - consecutive heartbeats in one direction are coalesced into one (a slower sender);
//! - time is in milliseconds from an arbitrary base, and is reset to 0 whenever nothing at all
//!   is pending (no timer, message or event), which no machine can observe because none then
//!   holds an instant;
//! - accepting a control-socket connection happens atomically with the connect.
//!
//! The model check (`tests/model.rs`) explores every interleaving of small configurations;
//! the crash property test (`tests/prop_crash.rs`) walks long random runs. Both check the
//! invariants in `checks` (I1–I6), which return a [`Violation`].
//!
//! Layout: the state and the actions offered in it here; `perform` performs one action
//! (delivering one input to one machine); `outputs` performs each machine's outputs as a
//! driver does; `checks` holds the invariants and the one-line summary.

mod checks;
mod outputs;
mod perform;

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[allow(unused_imports)] // the child modules use them through `use super::*`
use super::Violation;
use crate::incumbent::{DaemonConfig, IncumbentOutput, LockResult};
use crate::successor::SuccessorOutput;
use crate::supervisor::{
    HandoffSpec, Peer, Supervisor, SupervisorConfig, SupervisorOutput, Verdict,
};
use crate::wire::{Message, SUPPORTED_VERSIONS};
use crate::{
    AbortReason, ConnId, DrainReport, HandoffId, Incumbent, JournalRecord, ListenerInfo,
    ListenerKind, LockRecord, Pid, ReadinessSnapshot, Resolution, SealReport, StateSnapshot,
    Successor, Timing,
};

/// The supervisor's pid.
pub const SUP_PID: Pid = 100;

/// Longest time a message, an end-of-file or an exit notification may stay undelivered: time
/// does not move past it. Long enough to carry a message past a timer that falls due at the
/// same or the next instant.
pub const MSG_DELAY: u64 = 1;
/// Longest time an application hook (drain, seal, resume, open) may take in the model check:
/// past its handoff deadline, so slow hooks are explored too (`Config::hook_delay`).
pub const HOOK_DELAY: u64 = 11;
/// A crash may cut a step after any of its first this many outputs (no step has more).
pub const MAX_CUT: usize = 8;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The instant `ms` milliseconds after the world's time base.
pub fn at(ms: u64) -> Instant {
    base() + Duration::from_millis(ms)
}

fn ms_of(t: Instant) -> u64 {
    t.duration_since(base()).as_millis() as u64
}

/// A deliberately broken driver, to show the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bug {
    /// The incumbent's driver releases the lock as soon as sealing starts.
    ReleaseBeforeSeal,
    /// The successor's driver reports the lock acquired without taking it.
    SuccessorSkipsLock,
}

/// How the successor of each handoff behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Build {
    /// Opens the data and declares ready.
    Good,
    /// Exits when it should open the data (a build that cannot read the data).
    FailsOnOpen,
    /// Starts and never does anything (hung in its own start-up).
    Hangs,
    /// Cannot be started at all (missing binary).
    Missing,
}

#[derive(Clone, Debug)]
/// What a run explores: timing, the handoffs to trigger, crashes, hooks, an injected bug.
pub struct Config {
    /// The machines' timing.
    pub timing: Timing,
    /// Every handoff's drain grace and deadline.
    pub spec: HandoffSpec,
    /// How long a restarted supervisor waits for the daemons before recovering.
    pub recovery_wait: Duration,
    /// One entry per handoff to trigger, in order.
    pub builds: Vec<Build>,
    /// How many crashes may happen in one run. Every crash of the supervisor may be followed
    /// by a restart from the journal.
    pub crashes: u8,
    /// Longest time in milliseconds an application hook (drain, seal, resume, open) may take.
    pub hook_delay: u64,
    /// Drain and seal hooks may fail.
    pub hook_failures: bool,
    /// Treat a handoff abandoned for silence as a violation: with heartbeats shorter than the
    /// silence limit, no live peer may ever look silent.
    pub forbid_silence_aborts: bool,
    /// A deliberately broken driver, if any.
    pub bug: Option<Bug>,
}

impl Config {
    /// A daemon's configuration (one TCP listener).
    pub fn daemon(&self, pid: Pid) -> DaemonConfig {
        DaemonConfig {
            pid,
            build_id: String::new(),
            versions: SUPPORTED_VERSIONS,
            timing: self.timing,
            listeners: listeners(),
        }
    }

    /// The supervisor's configuration (one TCP listener).
    pub fn supervisor(&self) -> SupervisorConfig {
        SupervisorConfig {
            pid: SUP_PID,
            build_id: String::new(),
            versions: SUPPORTED_VERSIONS,
            timing: Timing {
                recovery_wait: self.recovery_wait,
                ..self.timing
            },
            listeners: listeners(),
        }
    }
}

fn listeners() -> Vec<ListenerInfo> {
    vec![ListenerInfo {
        name: "l".into(),
        kind: ListenerKind::Tcp,
    }]
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// A daemon's role machine.
pub enum Machine {
    /// An incumbent machine.
    Incumbent(Incumbent),
    /// A successor machine.
    Successor(Successor),
}

/// Hook completions: hooks run beside the machine, so they finish at any later point. Lock
/// attempts are synchronous calls in a driver and are answered within the step.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DaemonEvent {
    /// The drain hook finished.
    Drained,
    /// The seal hook of this handoff finished.
    Sealed(HandoffId),
    /// The resume hook finished.
    Resumed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// What a successor's application is doing.
pub enum App {
    /// Nothing pending.
    Idle,
    /// `Begun` was output: the application opens the data next, by the given time.
    Opening(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// A daemon process.
pub struct Proc {
    /// Its pid.
    pub pid: Pid,
    /// Its role machine.
    pub m: Machine,
    /// Not crashed or killed.
    pub alive: bool,
    /// How its build behaves.
    pub build: Build,
    /// Pending hook completions, each with the time (ms) it is due by.
    pub events: VecDeque<(DaemonEvent, u64)>,
    /// The application's pending work.
    pub app: App,
    /// Writes to the data directory (serving, or resumed).
    pub writer: bool,
    /// Has the data directory open (reading or writing).
    pub data_open: bool,
    /// Holds the listening sockets.
    pub has_listeners: bool,
    /// The handoff whose seal hook last reported success in this process.
    pub sealed_ok: Option<HandoffId>,
}

impl Proc {
    /// Serving: alive, an incumbent, and its machine says so.
    pub fn serving(&self) -> bool {
        self.alive
            && match &self.m {
                Machine::Incumbent(i) => i.is_serving(),
                Machine::Successor(_) => false,
            }
    }
}

/// Asynchronous events for the supervisor. Spawning, connecting and journal writes are
/// synchronous calls in a driver, so their results are fed back within the same step.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SupEvent {
    /// A process exited.
    Exited(Pid),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// A control connection between the supervisor and a daemon.
pub struct Link {
    /// Its id.
    pub id: u64,
    /// The daemon at the other end.
    pub daemon: Pid,
    /// How the supervisor names this link; `None` once the supervisor closed its end.
    pub sup_peer: Option<Peer>,
    /// The daemon has not closed its end.
    pub daemon_open: bool,
    /// Messages to the daemon, each with the time it is due by.
    pub to_daemon: VecDeque<(Message, u64)>,
    /// Messages to the supervisor, each with the time it is due by.
    pub to_sup: VecDeque<(Message, u64)>,
    /// When each side's end-of-file must have been seen by (set when the other side closed).
    pub eof_to_daemon_due: Option<u64>,
    /// When the supervisor must have seen the daemon's end-of-file by.
    pub eof_to_sup_due: Option<u64>,
    /// The daemon saw the end-of-file.
    pub daemon_saw_eof: bool,
    /// The supervisor saw the end-of-file.
    pub sup_saw_eof: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// The supervisor process.
pub struct Sup {
    /// Its machine.
    pub m: Supervisor,
    /// Exit notifications, each with the time it is due by.
    pub events: VecDeque<(SupEvent, u64)>,
    /// The pids it watches.
    pub watched: Vec<Pid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// The whole world: processes, the supervisor, links, the journal, the lock, time.
pub struct World {
    /// Milliseconds since the time base.
    pub now: u64,
    /// The daemon processes started so far (dead ones too).
    pub procs: Vec<Proc>,
    /// The supervisor, unless crashed.
    pub sup: Option<Sup>,
    /// Open control connections.
    pub links: Vec<Link>,
    /// The id of the next link.
    pub next_link: u64,
    /// The journal's durable record.
    pub journal: Option<JournalRecord>,
    /// Who holds the data directory's flock.
    pub lock: Option<Pid>,
    /// The lock record in the data directory.
    pub lock_record: Option<LockRecord>,
    /// The daemon that answers connections on the control socket.
    pub control_owner: Option<Pid>,
    /// The last process that wrote to the data; `sealed` says whether it sealed since.
    pub last_writer: Option<Pid>,
    /// Whether `last_writer` sealed since it last wrote.
    pub sealed: bool,
    /// Handoffs triggered so far (the next one uses `builds[triggered]`).
    pub triggered: u8,
    /// When the handoff in progress was triggered (ms), for I5's time bound.
    pub trigger_time: Option<u64>,
    /// Crashes still allowed.
    pub crashes_left: u8,
    /// The supervisor was restarted at least once.
    pub restarted: bool,
    /// Every handoff's outcome, in order.
    pub outcomes: Vec<(HandoffId, VerdictKind)>,
    /// A restarted supervisor finished recovery.
    pub recovered: bool,
    /// What recoveries concluded about interrupted handoffs.
    pub resolutions: Vec<Resolution>,
    /// An incumbent read a committed lock record (and so learned the outcome on its own).
    pub mark_seen: bool,
    /// Invariant violations seen while performing a step (checked as properties).
    pub violation: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// A handoff's outcome, as the checks classify it.
pub enum VerdictKind {
    /// The successor took over.
    Committed,
    /// Rolled back after the incumbent drained.
    RolledBackDrained,
    /// Rolled back before the incumbent was touched.
    RolledBackUntouched,
    /// The incumbent was lost.
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
/// One step of the world.
pub enum Action {
    /// Trigger the next handoff.
    Trigger,
    /// Deliver the supervisor's next event.
    SupEvent,
    /// Deliver the next message (or end-of-file) on this link to the supervisor.
    ToSup(u64),
    /// Deliver the next message (or end-of-file) on this link to the daemon.
    ToDaemon(u64),
    /// Complete the hook at the head of the process's events.
    DaemonEvent(Pid),
    /// The hook at the head of the process's events fails (drain or seal).
    HookFails(Pid),
    /// The successor's application opens the data and declares ready.
    AppOpen(Pid),
    /// Fire the supervisor's due timer.
    FireSup,
    /// Fire the daemon's due timer.
    FireDaemon(Pid),
    /// Crash a party.
    Crash(Party),
    /// Perform the action, but crash `party` after `k` of the outputs of its step.
    CrashMidStep(Box<Action>, usize),
    /// Start a new supervisor from the journal, without listeners (offered whenever the
    /// supervisor is dead; with one crash that is once).
    Restart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
/// A party that may crash.
pub enum Party {
    /// The supervisor.
    Sup,
    /// The daemon with this pid.
    Daemon(Pid),
}

impl World {
    /// The initial world: pid 1 serves with the lock and the listeners, no supervisor yet.
    pub fn new(cfg: &Config) -> Self {
        let a = 1;
        let mut w = World {
            now: 0,
            procs: vec![Proc {
                pid: a,
                m: Machine::Incumbent(Incumbent::serving(cfg.daemon(a))),
                alive: true,
                build: Build::Good,
                events: VecDeque::new(),
                app: App::Idle,
                writer: true,
                data_open: true,
                has_listeners: true,
                sealed_ok: None,
            }],
            sup: None,
            links: Vec::new(),
            next_link: 0,
            journal: Some(JournalRecord::Idle {
                serving: Some(a),
                last_handoff: HandoffId(0),
            }),
            lock: Some(a),
            lock_record: Some(LockRecord {
                owner: a,
                committed: None,
            }),
            control_owner: Some(a),
            last_writer: Some(a),
            sealed: false,
            triggered: 0,
            trigger_time: None,
            crashes_left: cfg.crashes,
            restarted: false,
            outcomes: Vec::new(),
            recovered: false,
            resolutions: Vec::new(),
            mark_seen: false,
            violation: None,
        };
        let m = Supervisor::with_incumbent(cfg.supervisor(), a, HandoffId(0));
        w.sup = Some(Sup {
            m,
            events: VecDeque::new(),
            watched: Vec::new(),
        });
        w.drain_sup(cfg, None);
        w
    }

    /// The process with this pid.
    pub fn proc(&self, pid: Pid) -> Option<&Proc> {
        self.procs.iter().find(|p| p.pid == pid)
    }

    fn proc_mut(&mut self, pid: Pid) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.pid == pid)
            .expect("known pid")
    }

    /// Alive and taking steps (a hung process is alive but does nothing).
    fn responsive(&self, pid: Pid) -> bool {
        self.proc(pid)
            .is_some_and(|p| p.alive && p.build != Build::Hangs)
    }

    fn alive(&self, pid: Pid) -> bool {
        self.proc(pid).is_some_and(|p| p.alive)
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    // ---- enumerating actions ----

    /// Every action possible in this state, into `out`.
    pub fn actions(&self, cfg: &Config, out: &mut Vec<Action>) {
        let base_len = out.len();
        if let Some(sup) = &self.sup {
            if sup.m.is_idle() && (self.triggered as usize) < cfg.builds.len() {
                out.push(Action::Trigger);
            }
            if !sup.events.is_empty() {
                out.push(Action::SupEvent);
            }
            if sup.m.poll_timeout().is_some_and(|t| self.timer_may_fire(t)) {
                out.push(Action::FireSup);
            }
        }
        for l in &self.links {
            let sup_can = l.sup_peer.is_some()
                && (!l.to_sup.is_empty() || (!l.daemon_open && !l.sup_saw_eof));
            if sup_can && self.sup.is_some() {
                out.push(Action::ToSup(l.id));
            }
            let daemon_can = self.responsive(l.daemon)
                && l.daemon_open
                && (!l.to_daemon.is_empty() || (l.sup_peer.is_none() && !l.daemon_saw_eof));
            if daemon_can {
                out.push(Action::ToDaemon(l.id));
            }
        }
        for p in self
            .procs
            .iter()
            .filter(|p| p.alive && p.build != Build::Hangs)
        {
            if let Some((ev, _)) = p.events.front() {
                out.push(Action::DaemonEvent(p.pid));
                let fallible = matches!(ev, DaemonEvent::Drained | DaemonEvent::Sealed(_));
                if cfg.hook_failures && fallible {
                    out.push(Action::HookFails(p.pid));
                }
            }
            if matches!(p.app, App::Opening(_)) {
                out.push(Action::AppOpen(p.pid));
            }
            let t = match &p.m {
                Machine::Incumbent(m) => m.poll_timeout(),
                Machine::Successor(m) => m.poll_timeout(),
            };
            if t.is_some_and(|t| self.timer_may_fire(t)) {
                out.push(Action::FireDaemon(p.pid));
            }
        }
        if self.crashes_left > 0 {
            let steps: Vec<Action> = out[base_len..].to_vec();
            for a in steps {
                if a != Action::Trigger {
                    for k in 1..=MAX_CUT {
                        out.push(Action::CrashMidStep(Box::new(a.clone()), k));
                    }
                }
            }
            if self.sup.is_some() {
                out.push(Action::Crash(Party::Sup));
            }
            for p in self.procs.iter().filter(|p| p.alive) {
                out.push(Action::Crash(Party::Daemon(p.pid)));
            }
        }
        if self.sup.is_none() {
            out.push(Action::Restart);
        }
    }

    /// The earliest timer of any live party. Timers fire in deadline order, as all processes
    /// on one host share one monotonic clock; messages and events interleave with them in any
    /// order, so any delivery can be delayed past any timer.
    /// The time by which the oldest pending delivery must happen: no timer fires after it.
    pub fn delivery_limit(&self) -> Option<u64> {
        let links = self.links.iter().flat_map(|l| {
            let d = l
                .to_daemon
                .front()
                .map(|(_, t)| *t)
                .filter(|_| self.responsive(l.daemon) && l.daemon_open);
            let s = l
                .to_sup
                .front()
                .map(|(_, t)| *t)
                .filter(|_| l.sup_peer.is_some() && self.sup.is_some());
            let e1 = l
                .eof_to_daemon_due
                .filter(|_| !l.daemon_saw_eof && l.daemon_open && self.responsive(l.daemon));
            let e2 = l
                .eof_to_sup_due
                .filter(|_| !l.sup_saw_eof && l.sup_peer.is_some() && self.sup.is_some());
            [d, s, e1, e2]
        });
        let sup = self
            .sup
            .iter()
            .flat_map(|s| s.events.front().map(|(_, t)| *t));
        let procs = self
            .procs
            .iter()
            .filter(|p| p.alive && p.build != Build::Hangs)
            .flat_map(|p| {
                let app = match p.app {
                    App::Opening(t) => Some(t),
                    App::Idle => None,
                };
                [p.events.front().map(|(_, t)| *t), app]
            });
        links.flatten().chain(sup).chain(procs.flatten()).min()
    }

    fn timer_may_fire(&self, t: Instant) -> bool {
        Some(t) == self.next_timer() && self.delivery_limit().is_none_or(|lim| ms_of(t) <= lim)
    }

    /// The earliest timer of any live machine.
    pub fn next_timer(&self) -> Option<Instant> {
        let sup = self.sup.as_ref().and_then(|s| s.m.poll_timeout());
        let daemons = self
            .procs
            .iter()
            .filter(|p| p.alive && p.build != Build::Hangs)
            .filter_map(|p| match &p.m {
                Machine::Incumbent(m) => m.poll_timeout(),
                Machine::Successor(m) => m.poll_timeout(),
            });
        sup.into_iter().chain(daemons).min()
    }

    /// Nothing can happen any more but a new trigger or a crash.
    pub fn quiescent(&self, cfg: &Config) -> bool {
        let mut v = Vec::new();
        self.actions(cfg, &mut v);
        v.iter().all(|a| {
            matches!(
                a,
                Action::Trigger | Action::Crash(_) | Action::CrashMidStep(..)
            )
        })
    }

    // ---- performing actions ----

    /// The world after `action`, or `None` when the action cannot happen here.
    pub fn step(&self, cfg: &Config, action: Action) -> Option<World> {
        let mut w = self.clone();
        let (action, cut) = match action {
            Action::CrashMidStep(a, k) => (*a, Some(k)),
            a => (a, None),
        };
        let ok = w.perform(cfg, action, cut);
        if !ok {
            return None;
        }
        w.normalize(cfg);
        Some(w)
    }
}

fn push(q: &mut VecDeque<(Message, u64)>, msg: Message, now: u64) {
    if msg == Message::Heartbeat && q.back().is_some_and(|(m, _)| *m == Message::Heartbeat) {
        return;
    }
    q.push_back((msg, now + MSG_DELAY));
}

/// The seal report every seal hook returns.
pub fn seal_report() -> SealReport {
    SealReport {
        last_revision_per_shard: vec![1],
        data_dir_fingerprint: 7,
    }
}
