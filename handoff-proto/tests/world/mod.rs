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

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use handoff_proto::incumbent::{DaemonConfig, IncumbentOutput, LockResult};
use handoff_proto::successor::SuccessorOutput;
use handoff_proto::supervisor::{
    HandoffSpec, Peer, Supervisor, SupervisorConfig, SupervisorOutput, Verdict,
};
use handoff_proto::wire::{Message, SUPPORTED_VERSIONS};
use handoff_proto::{
    AbortReason, ConnId, DrainReport, HandoffId, Incumbent, JournalRecord, ListenerInfo,
    ListenerKind, LockRecord, Pid, ReadinessSnapshot, Resolution, SealReport, StateSnapshot,
    Successor, Timing,
};

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
pub struct Config {
    pub timing: Timing,
    pub spec: HandoffSpec,
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
    pub bug: Option<Bug>,
}

impl Config {
    pub fn daemon(&self, pid: Pid) -> DaemonConfig {
        DaemonConfig {
            pid,
            build_id: String::new(),
            versions: SUPPORTED_VERSIONS,
            timing: self.timing,
            listeners: listeners(),
        }
    }

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
pub enum Machine {
    Incumbent(Incumbent),
    Successor(Successor),
}

/// Hook completions: hooks run beside the machine, so they finish at any later point. Lock
/// attempts are synchronous calls in a driver and are answered within the step.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DaemonEvent {
    Drained,
    Sealed(HandoffId),
    Resumed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum App {
    Idle,
    /// `Begun` was output: the application opens the data next, by the given time.
    Opening(u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proc {
    pub pid: Pid,
    pub m: Machine,
    pub alive: bool,
    pub build: Build,
    pub events: VecDeque<(DaemonEvent, u64)>,
    pub app: App,
    /// Writes to the data directory (serving, or resumed).
    pub writer: bool,
    /// Has the data directory open (reading or writing).
    pub data_open: bool,
    pub has_listeners: bool,
    /// The handoff whose seal hook last reported success in this process.
    pub sealed_ok: Option<HandoffId>,
}

impl Proc {
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
    Exited(Pid),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    pub id: u64,
    pub daemon: Pid,
    /// How the supervisor names this link; `None` once the supervisor closed its end.
    pub sup_peer: Option<Peer>,
    pub daemon_open: bool,
    pub to_daemon: VecDeque<(Message, u64)>,
    pub to_sup: VecDeque<(Message, u64)>,
    /// When each side's end-of-file must have been seen by (set when the other side closed).
    pub eof_to_daemon_due: Option<u64>,
    pub eof_to_sup_due: Option<u64>,
    pub daemon_saw_eof: bool,
    pub sup_saw_eof: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sup {
    pub m: Supervisor,
    pub events: VecDeque<(SupEvent, u64)>,
    pub watched: Vec<Pid>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct World {
    pub now: u64,
    pub procs: Vec<Proc>,
    pub sup: Option<Sup>,
    pub links: Vec<Link>,
    pub next_link: u64,
    pub journal: Option<JournalRecord>,
    pub lock: Option<Pid>,
    pub lock_record: Option<LockRecord>,
    pub control_owner: Option<Pid>,
    /// The last process that wrote to the data; `sealed` says whether it sealed since.
    pub last_writer: Option<Pid>,
    pub sealed: bool,
    /// Handoffs triggered so far (the next one uses `builds[triggered]`).
    pub triggered: u8,
    pub trigger_time: Option<u64>,
    pub crashes_left: u8,
    /// The supervisor was restarted at least once.
    pub restarted: bool,
    pub outcomes: Vec<(HandoffId, VerdictKind)>,
    pub recovered: bool,
    /// What recoveries concluded about interrupted handoffs.
    pub resolutions: Vec<Resolution>,
    /// An incumbent read a committed lock record (and so learned the outcome on its own).
    pub mark_seen: bool,
    /// Invariant violations seen while performing a step (checked as properties).
    pub violation: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerdictKind {
    Committed,
    RolledBackDrained,
    RolledBackUntouched,
    Lost,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Trigger,
    SupEvent,
    ToSup(u64),
    ToDaemon(u64),
    DaemonEvent(Pid),
    /// The hook at the head of the process's events fails (drain or seal).
    HookFails(Pid),
    AppOpen(Pid),
    FireSup,
    FireDaemon(Pid),
    Crash(Party),
    /// Perform the action, but crash `party` after `k` of the outputs of its step.
    CrashMidStep(Box<Action>, usize),
    /// Start a new supervisor from the journal, without listeners (offered whenever the
    /// supervisor is dead; with one crash that is once).
    Restart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Party {
    Sup,
    Daemon(Pid),
}

impl World {
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

    /// Returns false when a mid-step crash asks for more outputs than the step had.
    fn perform(&mut self, cfg: &Config, action: Action, cut: Option<usize>) -> bool {
        let now = at(self.now);
        match action {
            Action::Trigger => {
                self.trigger_time = Some(self.now);
                self.triggered += 1;
                let sup = self.sup.as_mut().expect("enabled");
                sup.m
                    .handle_trigger(now, cfg.spec)
                    .expect("trigger enabled only when idle");
                self.drain_sup(cfg, cut)
            }
            Action::SupEvent => {
                let sup = self.sup.as_mut().expect("enabled");
                let (ev, _) = sup.events.pop_front().expect("enabled");
                let SupEvent::Exited(pid) = ev;
                sup.m.handle_exited(now, pid);
                self.drain_sup(cfg, cut)
            }
            Action::ToSup(id) => {
                let idx = self.links.iter().position(|l| l.id == id).expect("enabled");
                let peer = self.links[idx].sup_peer.expect("enabled");
                let msg = self.links[idx].to_sup.pop_front().map(|(m, _)| m);
                let sup = self.sup.as_mut().expect("enabled");
                match msg {
                    Some(msg) => {
                        let kind = msg.kind();
                        if let Err(e) = sup.m.handle_message(now, peer, msg) {
                            self.fail(format!("supervisor rejected {kind} from {peer:?}: {e}"));
                        }
                    }
                    None => {
                        // The driver closes its end after end-of-file.
                        self.links[idx].sup_saw_eof = true;
                        self.links[idx].sup_peer = None;
                        sup.m.handle_closed(now, peer);
                    }
                }
                self.gc_links();
                self.drain_sup(cfg, cut)
            }
            Action::ToDaemon(id) => {
                let idx = self.links.iter().position(|l| l.id == id).expect("enabled");
                let pid = self.links[idx].daemon;
                let msg = self.links[idx].to_daemon.pop_front().map(|(m, _)| m);
                if msg.is_none() {
                    // The driver closes its end after end-of-file.
                    self.links[idx].daemon_saw_eof = true;
                    self.links[idx].daemon_open = false;
                }
                let p = self.proc_mut(pid);
                let r = match (&mut p.m, msg) {
                    (Machine::Incumbent(m), Some(msg)) => m
                        .handle_message(now, ConnId(id), msg)
                        .map_err(|e| e.to_string()),
                    (Machine::Incumbent(m), None) => {
                        m.handle_closed(now, ConnId(id)).map_err(|e| e.to_string())
                    }
                    (Machine::Successor(m), Some(msg)) => {
                        m.handle_message(now, msg).map_err(|e| e.to_string())
                    }
                    (Machine::Successor(m), None) => {
                        m.handle_closed(now);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    self.fail(format!("daemon {pid} rejected a message: {e}"));
                }
                self.gc_links();
                self.drain_daemon(cfg, pid, cut)
            }
            Action::DaemonEvent(pid) | Action::HookFails(pid) => {
                let ok = matches!(action, Action::DaemonEvent(_));
                let p = self.proc_mut(pid);
                let (ev, _) = p.events.pop_front().expect("enabled");
                let r = match (&mut p.m, ev.clone()) {
                    (Machine::Incumbent(m), DaemonEvent::Drained) if ok => {
                        p.writer = false;
                        m.handle_drained(now, Ok(DrainReport::default()))
                    }
                    (Machine::Incumbent(m), DaemonEvent::Drained) => {
                        m.handle_drained(now, Err("disk on fire".into()))
                    }
                    (Machine::Incumbent(m), DaemonEvent::Sealed(h)) if ok => {
                        p.sealed_ok = Some(h);
                        m.handle_sealed(now, Ok(seal_report()))
                    }
                    (Machine::Incumbent(m), DaemonEvent::Sealed(_)) => {
                        m.handle_sealed(now, Err("segment footer write failed".into()))
                    }
                    (Machine::Incumbent(m), DaemonEvent::Resumed) => {
                        m.handle_resumed(now, Ok(StateSnapshot::default()))
                    }
                    (Machine::Successor(_), e) => {
                        self.fail(format!("successor {pid} got incumbent event {e:?}"));
                        Ok(())
                    }
                };
                if matches!(ev, DaemonEvent::Sealed(_)) {
                    let w = self.proc(pid).expect("known");
                    if w.sealed_ok.is_some() && self.last_writer == Some(pid) {
                        self.sealed = true;
                    }
                }
                if let Err(e) = r {
                    self.fail(format!("daemon {pid} rejected {ev:?}: {e}"));
                }
                self.drain_daemon(cfg, pid, cut)
            }
            Action::AppOpen(pid) => {
                let build = self.proc(pid).expect("known").build;
                let holds = self.lock == Some(pid);
                self.proc_mut(pid).app = App::Idle;
                if build == Build::FailsOnOpen {
                    // The new build cannot open the data and exits.
                    if cut.is_some() {
                        return false;
                    }
                    self.kill(pid);
                    return true;
                }
                if !holds {
                    self.fail(format!(
                        "I3: successor {pid} opened the data without the lock"
                    ));
                }
                let p = self.proc_mut(pid);
                p.data_open = true;
                let Machine::Successor(m) = &mut p.m else {
                    unreachable!("only successors open")
                };
                let readiness = ReadinessSnapshot {
                    listening_on: vec![],
                    healthz_ok: true,
                    advertised_revision_per_shard: seal_report().last_revision_per_shard,
                };
                if let Err(e) = m.ready(now, readiness) {
                    self.fail(format!("ready refused: {e}"));
                }
                self.drain_daemon(cfg, pid, cut)
            }
            Action::FireSup => {
                let sup = self.sup.as_mut().expect("enabled");
                let t = sup.m.poll_timeout().expect("enabled");
                self.now = self.now.max(ms_of(t));
                sup.m.handle_timeout(at(self.now));
                self.drain_sup(cfg, cut)
            }
            Action::FireDaemon(pid) => {
                let p = self.proc_mut(pid);
                let t = match &p.m {
                    Machine::Incumbent(m) => m.poll_timeout(),
                    Machine::Successor(m) => m.poll_timeout(),
                }
                .expect("enabled");
                self.now = self.now.max(ms_of(t));
                let now = at(self.now);
                match &mut self.proc_mut(pid).m {
                    Machine::Incumbent(m) => m.handle_timeout(now),
                    Machine::Successor(m) => m.handle_timeout(now),
                }
                self.drain_daemon(cfg, pid, cut)
            }
            Action::Crash(party) => {
                self.crashes_left -= 1;
                self.crash(party);
                true
            }
            Action::Restart => {
                self.restarted = true;
                let m = Supervisor::recover(cfg.supervisor(), now, self.journal.clone(), false);
                self.sup = Some(Sup {
                    m,
                    events: VecDeque::new(),
                    watched: Vec::new(),
                });
                self.drain_sup(cfg, None)
            }
            Action::CrashMidStep(..) => unreachable!("unwrapped in step"),
        }
    }

    fn crash(&mut self, party: Party) {
        match party {
            Party::Sup => {
                self.sup = None;
                // The handoff in progress is interrupted; recovery concludes it (I6).
                self.trigger_time = None;
                for l in &mut self.links {
                    if l.sup_peer.take().is_some() {
                        l.eof_to_daemon_due = Some(self.now + MSG_DELAY);
                    }
                    l.to_sup.clear();
                }
                self.gc_links();
            }
            Party::Daemon(pid) => self.kill(pid),
        }
    }

    /// A process dies (crash, kill, exit or retirement): the kernel releases its lock and
    /// closes its sockets.
    fn kill(&mut self, pid: Pid) {
        let Some(p) = self.procs.iter_mut().find(|p| p.pid == pid && p.alive) else {
            return;
        };
        p.alive = false;
        p.writer = false;
        p.data_open = false;
        p.has_listeners = false;
        p.events.clear();
        p.app = App::Idle;
        if self.lock == Some(pid) {
            self.lock = None;
        }
        if self.control_owner == Some(pid) {
            self.control_owner = None;
        }
        let now = self.now;
        for l in self.links.iter_mut().filter(|l| l.daemon == pid) {
            if l.daemon_open {
                l.eof_to_sup_due = Some(now + MSG_DELAY);
            }
            l.daemon_open = false;
            l.to_daemon.clear();
        }
        if let Some(sup) = &mut self.sup {
            if sup.watched.contains(&pid) {
                sup.events
                    .push_back((SupEvent::Exited(pid), now + MSG_DELAY));
            }
        }
        self.gc_links();
    }

    fn gc_links(&mut self) {
        self.links.retain(|l| {
            let sup_done = l.sup_peer.is_none() && l.to_sup.is_empty();
            let daemon_done = !l.daemon_open && l.to_daemon.is_empty();
            !(sup_done && daemon_done)
        });
    }

    /// Perform the supervisor's outputs until it has none left (results of synchronous
    /// driver calls are fed back at once and may produce more). With `cut = Some(k)`, crash it
    /// after the `k`-th output instead; returns false if there were no more than `k`.
    fn drain_sup(&mut self, cfg: &Config, cut: Option<usize>) -> bool {
        let mut performed = 0;
        while let Some(o) = self.sup.as_mut().and_then(|s| s.m.poll_output()) {
            if cut == Some(performed) {
                self.crashes_left -= 1;
                self.crash(Party::Sup);
                return true;
            }
            performed += 1;
            self.perform_sup(cfg, o);
        }
        cut.is_none()
    }

    fn drain_daemon(&mut self, cfg: &Config, pid: Pid, cut: Option<usize>) -> bool {
        let mut performed = 0;
        loop {
            if !self.alive(pid) {
                // Exited or retired as one of its outputs.
                return cut.is_none();
            }
            let p = self.proc_mut(pid);
            let next = match &mut p.m {
                Machine::Incumbent(m) => m.poll_output().map(Ok),
                Machine::Successor(m) => m.poll_output().map(Err),
            };
            let Some(o) = next else {
                break;
            };
            if cut == Some(performed) {
                self.crashes_left -= 1;
                self.kill(pid);
                return true;
            }
            performed += 1;
            match o {
                Ok(o) => self.perform_incumbent(cfg, pid, o),
                Err(o) => self.perform_successor(cfg, pid, o),
            }
        }
        cut.is_none()
    }

    fn sup_link(&mut self, peer: Peer) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.sup_peer == Some(peer))
    }

    fn perform_sup(&mut self, cfg: &Config, o: SupervisorOutput) {
        match o {
            SupervisorOutput::Send { to, frame } => {
                let now = self.now;
                if let Some(l) = self.sup_link(to) {
                    if l.daemon_open {
                        push(&mut l.to_daemon, frame.message, now);
                    }
                }
            }
            SupervisorOutput::Close { peer } => {
                let due = self.now + MSG_DELAY;
                if let Some(l) = self.sup_link(peer) {
                    l.sup_peer = None;
                    l.eof_to_daemon_due = Some(due);
                    l.to_sup.clear();
                }
                self.gc_links();
            }
            SupervisorOutput::TakeListeners { batch } => {
                // The driver takes the descriptors and finds them as configured.
                let now = at(self.now);
                if let Some(sup) = self.sup.as_mut() {
                    sup.m.handle_listeners_taken(now, batch.len() as u32);
                }
            }
            SupervisorOutput::SpawnSuccessor { handoff: _ } => {
                let pid = self.next_pid();
                let build = cfg.builds[self.triggered as usize - 1];
                if build == Build::Missing {
                    let now = at(self.now);
                    let sup = self.sup.as_mut().expect("performing its outputs");
                    if let Err(e) = sup.m.handle_spawn_failed(now, "no such file".into()) {
                        self.fail(format!("supervisor rejected its spawn failure: {e}"));
                    }
                    return;
                }
                let m = Successor::new(cfg.daemon(pid), at(self.now));
                self.procs.push(Proc {
                    pid,
                    m: Machine::Successor(m),
                    alive: true,
                    build,
                    events: VecDeque::new(),
                    app: App::Idle,
                    writer: false,
                    data_open: false,
                    has_listeners: false,
                    sealed_ok: None,
                });
                self.open_link(pid, Peer::Successor);
                let sup = self.sup.as_mut().expect("performing its outputs");
                sup.watched.push(pid);
                let r = sup.m.handle_spawned(at(self.now), pid);
                if let Err(e) = r {
                    self.fail(format!("supervisor rejected its spawn: {e}"));
                }
            }
            SupervisorOutput::SpawnColdStart => {
                // Each crash gives a recovery at most one reason to start a daemon cold (the
                // model allows one crash, so three daemons that are not the first are good
                // successors and cold starts enough); more means recovery is looping (and
                // the state space with it).
                let goods = cfg.builds.iter().filter(|b| **b == Build::Good).count();
                let limit = 3.max(goods + 2 * cfg.crashes as usize);
                let cold = self
                    .procs
                    .iter()
                    .filter(|p| p.build == Build::Good && p.pid > 1)
                    .filter(|p| matches!(&p.m, Machine::Incumbent(_)))
                    .count();
                if cold > limit {
                    self.fail("recovery keeps starting daemons cold".into());
                }
                let pid = self.next_pid();
                let m = Incumbent::starting(cfg.daemon(pid));
                self.procs.push(Proc {
                    pid,
                    m: Machine::Incumbent(m),
                    alive: true,
                    build: Build::Good,
                    events: VecDeque::new(),
                    app: App::Idle,
                    writer: false,
                    data_open: false,
                    has_listeners: true,
                    sealed_ok: None,
                });
                let sup = self.sup.as_mut().expect("performing its outputs");
                sup.watched.push(pid);
                let r = sup.m.handle_spawned(at(self.now), pid);
                if let Err(e) = r {
                    self.fail(format!("supervisor rejected its cold start: {e}"));
                }
                let _ = self.drain_daemon(cfg, pid, None);
            }
            SupervisorOutput::Connect => {
                let ev = match self.control_owner.filter(|p| self.alive(*p)) {
                    Some(owner) => {
                        // The previous incumbent link, if any, was closed by the machine.
                        let id = self.open_link(owner, Peer::Incumbent);
                        let now = at(self.now);
                        if let Machine::Incumbent(m) = &mut self.proc_mut(owner).m {
                            m.handle_connected(now, ConnId(id)).expect("fresh id");
                        }
                        Ok(owner)
                    }
                    None => Err(()),
                };
                let now = at(self.now);
                let sup = self.sup.as_mut().expect("performing");
                let r = match ev {
                    Ok(owner) => sup.m.handle_connected(now, owner),
                    Err(()) => sup.m.handle_connect_failed(now, "refused".into()),
                };
                if let Err(e) = r {
                    self.fail(format!("supervisor rejected its connect: {e}"));
                }
            }
            SupervisorOutput::Watch { pid } => {
                let alive = self.alive(pid);
                let sup = self.sup.as_mut().expect("performing");
                if !sup.watched.contains(&pid) {
                    sup.watched.push(pid);
                }
                // As the output's contract says: at once if it is gone.
                if !alive {
                    sup.events
                        .push_back((SupEvent::Exited(pid), self.now + MSG_DELAY));
                }
            }
            SupervisorOutput::Kill { pid } => self.kill(pid),
            SupervisorOutput::WriteJournal(rec) => {
                self.journal = Some(rec);
                let now = at(self.now);
                let r = self
                    .sup
                    .as_mut()
                    .expect("performing")
                    .m
                    .handle_journal_written(now);
                if let Err(e) = r {
                    self.fail(format!("supervisor rejected its journal write: {e}"));
                }
            }
            SupervisorOutput::Outcome(o) => {
                self.trigger_time = None;
                let kind = match &o.verdict {
                    Verdict::Committed { successor } => {
                        let ok = self.proc(*successor).is_some_and(|p| match &p.m {
                            Machine::Incumbent(_) => true,
                            Machine::Successor(s) => s.is_committed(),
                        });
                        if !ok {
                            self.fail(format!(
                                "I5: outcome says {successor} committed, it did not"
                            ));
                        }
                        VerdictKind::Committed
                    }
                    Verdict::RolledBack {
                        incumbent, drained, ..
                    } => {
                        let p = self.proc(*incumbent).expect("known");
                        if p.alive && !p.serving() {
                            self.fail(format!("I5: outcome says {incumbent} serves, it does not"));
                        }
                        if *drained {
                            VerdictKind::RolledBackDrained
                        } else {
                            VerdictKind::RolledBackUntouched
                        }
                    }
                    Verdict::IncumbentLost { .. } => VerdictKind::Lost,
                };
                // A slow but live successor is only ever aborted by the overall deadline.
                let early = match (&o.verdict, self.trigger_time) {
                    (
                        Verdict::RolledBack { reason, .. } | Verdict::IncumbentLost { reason },
                        Some(t),
                    ) => {
                        *reason == AbortReason::DeadlineExceeded
                            && self.now < t + cfg.spec.deadline.as_millis() as u64
                    }
                    _ => false,
                };
                if early {
                    self.fail("aborted for the deadline before the deadline".into());
                }
                let silent = matches!(
                    &o.verdict,
                    Verdict::RolledBack {
                        reason: AbortReason::PeerSilent,
                        ..
                    } | Verdict::IncumbentLost {
                        reason: AbortReason::PeerSilent
                    }
                );
                if silent && cfg.forbid_silence_aborts {
                    self.fail("a live peer was taken for silent".into());
                }
                // The incumbent closing a live supervisor's session (for silence) shows up here.
                let dropped_by_live_incumbent = match &o.verdict {
                    Verdict::RolledBack {
                        reason: AbortReason::IncumbentUnreachable(_),
                        incumbent,
                        ..
                    } => self.alive(*incumbent),
                    _ => false,
                };
                if dropped_by_live_incumbent && cfg.forbid_silence_aborts {
                    self.fail("a live incumbent dropped its supervisor".into());
                }
                self.outcomes.push((o.handoff, kind));
            }
            SupervisorOutput::Recovered {
                serving,
                resolution,
            } => {
                self.recovered = true;
                if let Some((_, r)) = resolution {
                    self.resolutions.push(r);
                }
                // It answered `Serving`. Since then it may have died (its exit is reported
                // next), or picked up a stale `Prepare` from the dead supervisor's connection
                // (which it undoes on that connection's end-of-file); it still holds the lock.
                let holds = |p: &Proc| match &p.m {
                    Machine::Incumbent(m) => m.holds_lock(),
                    Machine::Successor(_) => false,
                };
                if self.proc(serving).is_some_and(|p| p.alive && !holds(p)) {
                    self.fail(format!(
                        "recovery adopted {serving}, which does not hold the lock"
                    ));
                }
            }
        }
    }

    /// A new channel between the supervisor (naming it `peer`) and `daemon`; returns its id.
    fn open_link(&mut self, daemon: Pid, peer: Peer) -> u64 {
        let id = self.next_link;
        self.next_link += 1;
        self.links.push(Link {
            id,
            daemon,
            sup_peer: Some(peer),
            daemon_open: true,
            to_daemon: VecDeque::new(),
            to_sup: VecDeque::new(),
            eof_to_daemon_due: None,
            eof_to_sup_due: None,
            daemon_saw_eof: false,
            sup_saw_eof: false,
        });
        id
    }

    fn next_pid(&self) -> Pid {
        self.procs.iter().map(|p| p.pid).max().unwrap_or(0) + 1
    }

    fn daemon_send(&mut self, pid: Pid, conn: Option<ConnId>, msg: Message) {
        let link = self
            .links
            .iter_mut()
            .find(|l| l.daemon == pid && l.daemon_open && conn.is_none_or(|c| c.0 == l.id));
        if let Some(l) = link {
            if l.sup_peer.is_some() {
                push(&mut l.to_sup, msg, self.now);
            }
        }
    }

    fn acquire(&mut self, pid: Pid) -> LockResult {
        match self.lock {
            None => {
                self.lock = Some(pid);
                let previous = self.lock_record.replace(LockRecord {
                    owner: pid,
                    committed: None,
                });
                LockResult::Acquired { previous }
            }
            Some(_) => LockResult::Held(self.lock_record),
        }
    }

    fn perform_incumbent(&mut self, cfg: &Config, pid: Pid, o: IncumbentOutput) {
        match o {
            IncumbentOutput::Send { conn, frame } => {
                self.daemon_send(pid, Some(conn), frame.message)
            }
            IncumbentOutput::Close { conn } => {
                let due = self.now + MSG_DELAY;
                if let Some(l) = self.links.iter_mut().find(|l| l.id == conn.0) {
                    l.daemon_open = false;
                    l.eof_to_sup_due = Some(due);
                    l.to_daemon.clear();
                }
                self.gc_links();
            }
            IncumbentOutput::CallDrain { .. } => {
                let due = self.now + cfg.hook_delay;
                self.proc_mut(pid)
                    .events
                    .push_back((DaemonEvent::Drained, due))
            }
            IncumbentOutput::CallSeal { handoff } => {
                if cfg.bug == Some(Bug::ReleaseBeforeSeal) {
                    self.release(pid, None);
                }
                let due = self.now + cfg.hook_delay;
                self.proc_mut(pid)
                    .events
                    .push_back((DaemonEvent::Sealed(handoff), due));
            }
            IncumbentOutput::CallResume { .. } => {
                if self.lock != Some(pid) {
                    self.fail(format!("I1: {pid} resumes writing without the lock"));
                }
                let due = self.now + cfg.hook_delay;
                let p = self.proc_mut(pid);
                p.writer = true;
                p.data_open = true;
                p.events.push_back((DaemonEvent::Resumed, due));
                self.last_writer = Some(pid);
                self.sealed = false;
            }
            IncumbentOutput::ReleaseLock(proof) => self.release(pid, Some(proof.handoff())),
            IncumbentOutput::AcquireLock => {
                let r = self.acquire(pid);
                if matches!(
                    r,
                    LockResult::Held(Some(LockRecord {
                        committed: Some(_),
                        ..
                    }))
                ) {
                    self.mark_seen = true;
                }
                if matches!(r, LockResult::Acquired { .. }) {
                    // A cold-started incumbent opens and writes once it has the lock, and
                    // binds the control socket then (as `Incumbent::bind_cold_start` takes the
                    // lock): the control socket always leads to a process that serves.
                    if matches!(&self.proc(pid).expect("known").m, Machine::Incumbent(m) if m.phase_name() == "starting")
                    {
                        let p = self.proc_mut(pid);
                        p.writer = true;
                        p.data_open = true;
                        self.last_writer = Some(pid);
                        self.sealed = false;
                        self.control_owner = Some(pid);
                    }
                }
                let now = at(self.now);
                if let Machine::Incumbent(m) = &mut self.proc_mut(pid).m {
                    if let Err(e) = m.handle_lock(now, r) {
                        self.fail(format!("incumbent {pid} rejected its lock result: {e}"));
                    }
                }
            }
            IncumbentOutput::KillLockHolder { pid: victim } => self.kill(victim),
            IncumbentOutput::Retire { .. } => self.kill(pid),
        }
    }

    fn release(&mut self, pid: Pid, proof: Option<HandoffId>) {
        let p = self.proc(pid).expect("known");
        let sealed = p.sealed_ok;
        if self.lock == Some(pid) {
            if proof.is_none() || sealed != proof {
                self.fail(format!(
                    "I2: {pid} released the lock before its seal finished (sealed {sealed:?})"
                ));
            }
            self.lock = None;
            let p = self.proc_mut(pid);
            p.data_open = false;
            p.writer = false;
        }
    }

    fn perform_successor(&mut self, cfg: &Config, pid: Pid, o: SuccessorOutput) {
        match o {
            SuccessorOutput::Send(frame) => self.daemon_send(pid, None, frame.message),
            SuccessorOutput::TakeListeners { .. } => self.proc_mut(pid).has_listeners = true,
            SuccessorOutput::AcquireLock => {
                let r = if cfg.bug == Some(Bug::SuccessorSkipsLock) {
                    LockResult::Acquired {
                        previous: self.lock_record,
                    }
                } else {
                    self.acquire(pid)
                };
                if matches!(r, LockResult::Acquired { .. }) {
                    let writer_alive = self.last_writer.is_some_and(|w| self.alive(w) && w != pid);
                    if !self.sealed && writer_alive {
                        self.fail(format!(
                            "I3: successor {pid} took the lock while the data was unsealed"
                        ));
                    }
                }
                let now = at(self.now);
                if let Machine::Successor(m) = &mut self.proc_mut(pid).m {
                    if let Err(e) = m.handle_lock(now, r) {
                        self.fail(format!("successor {pid} rejected its lock result: {e}"));
                    }
                }
            }
            SuccessorOutput::Begun { .. } => {
                let due = self.now + cfg.hook_delay;
                self.proc_mut(pid).app = App::Opening(due)
            }
            SuccessorOutput::MarkCommitted { handoff } => {
                if self.lock == Some(pid) {
                    self.lock_record = Some(LockRecord {
                        owner: pid,
                        committed: Some(handoff),
                    });
                }
            }
            SuccessorOutput::Committed { .. } => {
                let m = Incumbent::serving(cfg.daemon(pid));
                let p = self.proc_mut(pid);
                p.m = Machine::Incumbent(m);
                p.writer = true;
                self.last_writer = Some(pid);
                self.sealed = false;
                // Binding the control socket replaces the old incumbent's.
                self.control_owner = Some(pid);
                // The supervisor's channel to the successor is no longer needed.
                let due = self.now + MSG_DELAY;
                for l in self.links.iter_mut().filter(|l| l.daemon == pid) {
                    l.daemon_open = false;
                    l.eof_to_sup_due = Some(due);
                    l.to_daemon.clear();
                }
                self.gc_links();
            }
            SuccessorOutput::Exit { reason } => {
                if reason == AbortReason::PeerSilent && cfg.forbid_silence_aborts {
                    self.fail(format!("successor {pid} took a live supervisor for silent"));
                }
                self.kill(pid)
            }
        }
    }

    fn normalize(&mut self, cfg: &Config) {
        if self.trigger_time.is_none() && self.quiescent(cfg) {
            self.now = 0;
        }
    }

    /// One line describing the state, for counterexample paths.
    pub fn summary(&self) -> String {
        let procs: Vec<String> = self
            .procs
            .iter()
            .map(|p| {
                let phase = match &p.m {
                    Machine::Incumbent(m) => format!("I:{}", m.phase_name()),
                    Machine::Successor(m) => format!("N:{}", m.phase_name()),
                };
                let dead = if p.alive { "" } else { " dead" };
                let w = if p.writer { " W" } else { "" };
                format!("{}={phase}{w}{dead}", p.pid)
            })
            .collect();
        let links: Vec<String> = self
            .links
            .iter()
            .map(|l| {
                let d: Vec<&str> = l.to_daemon.iter().map(|(m, _)| m.kind()).collect();
                let s: Vec<&str> = l.to_sup.iter().map(|(m, _)| m.kind()).collect();
                format!(
                    "#{}({:?}<->{}): >{d:?} <{s:?}{}{}",
                    l.id,
                    l.sup_peer,
                    l.daemon,
                    if l.daemon_open { "" } else { " dclosed" },
                    if l.sup_peer.is_some() { "" } else { " sclosed" }
                )
            })
            .collect();
        format!(
            "t={} sup={} lock={:?} rec={:?} journal={:?} procs=[{}] links=[{}] out={:?}",
            self.now,
            self.sup.as_ref().map_or("dead".to_string(), |s| format!(
                "{}({:?})",
                s.m.phase_name(),
                s.m.incumbent()
            )),
            self.lock,
            self.lock_record
                .map(|r| (r.owner, r.committed.map(|h| h.0))),
            self.journal,
            procs.join(", "),
            links.join(", "),
            self.outcomes,
        )
    }

    // ---- invariants ----

    /// I1 and I3 in this state, and any violation recorded during the step.
    pub fn safety(&self) -> Result<(), String> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let writers: Vec<Pid> = self
            .procs
            .iter()
            .filter(|p| p.alive && p.writer)
            .map(|p| p.pid)
            .collect();
        if writers.len() > 1 {
            return Err(format!("I1: several writers {writers:?}"));
        }
        for p in self.procs.iter().filter(|p| p.alive) {
            if (p.writer || p.data_open) && self.lock != Some(p.pid) {
                return Err(format!("I1/I3: {} uses the data without the lock", p.pid));
            }
            let believes = match &p.m {
                Machine::Incumbent(m) => m.holds_lock(),
                Machine::Successor(m) => m.holds_lock(),
            };
            if believes && self.lock != Some(p.pid) {
                return Err(format!(
                    "I1: {} believes it holds the lock, {:?} does",
                    p.pid, self.lock
                ));
            }
        }
        Ok(())
    }

    /// I4: while the supervisor lives, some live process holds the listeners.
    pub fn listeners_held(&self) -> bool {
        match &self.sup {
            None => true,
            Some(s) => {
                s.m.holds_listeners() || self.procs.iter().any(|p| p.alive && p.has_listeners)
            }
        }
    }

    /// I5: when nothing more can happen, exactly one process serves, the supervisor (if
    /// alive) names it, and this happened in time.
    pub fn settled_correctly(&self, cfg: &Config) -> Result<(), String> {
        if !self.quiescent(cfg) {
            return Ok(());
        }
        let serving: Vec<Pid> = self
            .procs
            .iter()
            .filter(|p| p.serving())
            .map(|p| p.pid)
            .collect();
        if serving.len() != 1 {
            return Err(format!("I5: serving processes {serving:?}"));
        }
        if self.lock != Some(serving[0]) {
            return Err(format!("I5: {} serves without the lock", serving[0]));
        }
        if let Some(sup) = &self.sup {
            if !sup.m.is_idle() || sup.m.incumbent() != Some(serving[0]) {
                return Err(format!(
                    "I5: supervisor is {} with incumbent {:?}, {} serves",
                    sup.m.phase_name(),
                    sup.m.incumbent(),
                    serving[0]
                ));
            }
            if !sup.m.holds_listeners() {
                return Err("I4: supervisor settled without the listeners".into());
            }
        }
        Ok(())
    }

    /// I5's time bound: a handoff in progress never runs past deadline + 2 slack (the
    /// incumbent's last resort). A supervisor crash interrupts the handoff; recovery (I6)
    /// concludes it.
    pub fn within_deadline(&self, cfg: &Config) -> bool {
        match self.trigger_time {
            Some(t) => {
                let bound = cfg.spec.deadline + cfg.timing.slack * 2;
                self.now <= t + bound.as_millis() as u64
            }
            _ => true,
        }
    }
}

fn push(q: &mut VecDeque<(Message, u64)>, msg: Message, now: u64) {
    if msg == Message::Heartbeat && q.back().is_some_and(|(m, _)| *m == Message::Heartbeat) {
        return;
    }
    q.push_back((msg, now + MSG_DELAY));
}

pub fn seal_report() -> SealReport {
    SealReport {
        last_revision_per_shard: vec![1],
        data_dir_fingerprint: 7,
    }
}
