//! The supervisor harness: the supervisor machine fed arbitrary op sequences (triggers, spawn and
//! connect results, messages and bytes from either daemon, exits, journal results, time),
//! mixed with `Honest` ops in which cooperating daemons and a driver perform one obligation.
//! Every output is drained after every op and checked: `Begin` only after the incumbent's
//! `Sealed` of the same handoff, carrying that seal (I3 from the supervisor's side);
//! `Commit` only after the `Committing` journal record is durable, to the incumbent only
//! after the successor's `CommitAck`, never twice; no `Abort` to the incumbent after its
//! `Commit`; `Committed` only after the successor's `CommitAck`; `RolledBack` only on
//! something the incumbent said; one outcome per handoff, journaled; the journal never goes
//! back; kills and watches only of known pids; triggers accepted exactly when idle.
//!
//! The ops (`Op` for fuzzers, `SupOp` for the harness) are in `ops`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

mod ops;

pub use ops::{internal, IncMsg, Op, PidSel, SuccMsg, SupOp};

use super::{check_frame, frame_as_peer, listeners, trace, Clock, Reached, Scan, Violation};
use crate::wire::{DaemonStatus, HelloAck, Message, PeerRole, SUPPORTED_VERSIONS};
use crate::{
    DrainReport, HandoffId, HandoffSpec, JournalRecord, Peer, Pid, ReadinessSnapshot, SealReport,
    StateSnapshot, Supervisor, SupervisorConfig, SupervisorOutput, Timing, Verdict,
    MAX_FDS_PER_MESSAGE,
};

/// The incumbent's pid.
pub const INCUMBENT: Pid = 100;
/// The pids successors are spawned with, in turn.
pub const SUCCESSORS: [Pid; 3] = [200, 201, 202];

/// Milestone names, by bit.
pub const MILESTONES: &[&str] = &[
    "Begin",
    "Commit",
    "Verdict::Committed",
    "Verdict::RolledBack drained",
    "Verdict::IncumbentLost",
    "Recovered",
    "second handoff",
];

#[derive(Clone, Debug, PartialEq)]
enum SupDuty {
    Spawn,
    ColdSpawn,
    Journal,
    SuccHelloAck,
    SuccListenersAck(u32),
    Connect,
    IncHelloAck,
    Drained(HandoffId),
    Sealed(HandoffId),
    Ready(HandoffId, SealReport),
    SuccCommitAck(HandoffId),
    IncCommitAck(HandoffId),
    Resumed(HandoffId),
    ReturnListeners,
    Exit(Pid),
}

impl SupDuty {
    fn peer(&self) -> Option<Peer> {
        match self {
            SupDuty::SuccHelloAck
            | SupDuty::SuccListenersAck(_)
            | SupDuty::Ready(..)
            | SupDuty::SuccCommitAck(_) => Some(Peer::Successor),
            SupDuty::IncHelloAck
            | SupDuty::Drained(_)
            | SupDuty::Sealed(_)
            | SupDuty::IncCommitAck(_)
            | SupDuty::Resumed(_)
            | SupDuty::ReturnListeners => Some(Peer::Incumbent),
            _ => None,
        }
    }
}

fn peer_ix(p: Peer) -> usize {
    match p {
        Peer::Incumbent => 0,
        Peer::Successor => 1,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SupCtx {
    Other,
    TriggerOk(HandoffId),
}

const SUP_BEGIN: u32 = 0;
const SUP_COMMIT: u32 = 1;
const SUP_COMMITTED: u32 = 2;
const SUP_ROLLED_BACK_DRAINED: u32 = 3;
const SUP_LOST: u32 = 4;
const SUP_RECOVERED: u32 = 5;
const SUP_SECOND_HANDOFF: u32 = 6;

/// The supervisor machine, the facts derived from its inputs and outputs, and the honest
/// environment.
#[derive(Debug)]
pub struct SupHarness {
    m: Supervisor,
    clock: Clock,
    n_listeners: usize,
    // Facts from inputs.
    scans: [Scan; 2],
    peer_version: [Option<u16>; 2],
    sealed_from_inc: BTreeMap<HandoffId, Vec<SealReport>>,
    succ_commit_ack: BTreeSet<HandoffId>,
    resumed_from_inc: BTreeSet<HandoffId>,
    /// Daemons that said `Serving` on a (re)connection after the incumbent was asked to drain.
    serving_after_prepare: BTreeSet<(HandoffId, Pid)>,
    known_pids: BTreeSet<Pid>,
    // Facts from outputs.
    current: Option<HandoffId>,
    ids: BTreeSet<HandoffId>,
    journal_pending: Option<JournalRecord>,
    journal_max: HandoffId,
    commit_durable: BTreeSet<HandoffId>,
    in_flight_successor: BTreeMap<HandoffId, Pid>,
    in_flight_incumbent: BTreeMap<HandoffId, Pid>,
    prepare_sent: BTreeSet<HandoffId>,
    /// Pids killed while the current handoff ran.
    killed: BTreeSet<Pid>,
    idle_journaled: BTreeSet<HandoffId>,
    begin_sent: BTreeSet<HandoffId>,
    commit_sent_succ: BTreeSet<HandoffId>,
    commit_sent_inc: BTreeSet<HandoffId>,
    outcomes: BTreeSet<HandoffId>,
    // Cooperating environment.
    duties: Vec<SupDuty>,
    succ_pid: Pid,
    spawns: u32,
    serving: Pid,
    reached: Reached,
}

impl SupHarness {
    /// A supervisor of a serving incumbent with `n_listeners` listeners, its first outputs
    /// drained and checked.
    pub fn start(n_listeners: usize) -> Result<Self, Violation> {
        let mut h = Self::new(n_listeners);
        h.drain(SupCtx::Other)?;
        Ok(h)
    }

    /// Start, then apply `ops` in order: the milestones reached, or the first violation.
    pub fn run(
        n_listeners: usize,
        ops: impl IntoIterator<Item = SupOp>,
    ) -> Result<Reached, Violation> {
        let mut h = Self::start(n_listeners)?;
        for op in ops {
            h.apply(op)?;
        }
        Ok(h.reached)
    }

    /// The milestones reached so far.
    pub fn reached(&self) -> Reached {
        self.reached
    }

    fn new(n_listeners: usize) -> Self {
        let cfg = SupervisorConfig {
            pid: 1,
            build_id: "supervisor".into(),
            versions: SUPPORTED_VERSIONS,
            timing: Timing {
                recovery_wait: Duration::from_secs(2),
                ..Timing::default()
            },
            listeners: listeners(n_listeners),
        };
        Self {
            m: Supervisor::with_incumbent(cfg, INCUMBENT, HandoffId(0)),
            clock: Clock::new(),
            n_listeners,
            scans: Default::default(),
            peer_version: [None, None],
            sealed_from_inc: BTreeMap::new(),
            succ_commit_ack: BTreeSet::new(),
            resumed_from_inc: BTreeSet::new(),
            serving_after_prepare: BTreeSet::new(),
            known_pids: [INCUMBENT].into_iter().collect(),
            current: None,
            ids: BTreeSet::new(),
            journal_pending: None,
            journal_max: HandoffId(0),
            commit_durable: BTreeSet::new(),
            in_flight_successor: BTreeMap::new(),
            in_flight_incumbent: BTreeMap::new(),
            prepare_sent: BTreeSet::new(),
            killed: BTreeSet::new(),
            idle_journaled: BTreeSet::new(),
            begin_sent: BTreeSet::new(),
            commit_sent_succ: BTreeSet::new(),
            commit_sent_inc: BTreeSet::new(),
            outcomes: BTreeSet::new(),
            duties: Vec::new(),
            succ_pid: 0,
            spawns: 0,
            serving: INCUMBENT,
            reached: Reached::default(),
        }
    }

    /// A message that reached (or may have reached) the machine from `peer`.
    fn note_received(&mut self, peer: Peer, msg: &Message) {
        match (peer, msg) {
            (Peer::Incumbent, Message::Sealed { handoff, report }) => self
                .sealed_from_inc
                .entry(*handoff)
                .or_default()
                .push(report.clone()),
            (Peer::Successor, Message::CommitAck { handoff }) => {
                self.succ_commit_ack.insert(*handoff);
            }
            (Peer::Incumbent, Message::Resumed { handoff, .. }) => {
                self.resumed_from_inc.insert(*handoff);
            }
            (_, Message::HelloAck(ack)) => {
                self.known_pids.insert(ack.pid);
                if let Some(h) = self.current {
                    if peer == Peer::Incumbent
                        && ack.status == DaemonStatus::Serving
                        && self.prepare_sent.contains(&h)
                    {
                        self.serving_after_prepare.insert((h, ack.pid));
                    }
                }
            }
            _ => {}
        }
    }

    fn push_bytes(&mut self, peer: Peer, bytes: &[u8]) -> Result<(), Violation> {
        let now = self.clock.now();
        for m in self.scans[peer_ix(peer)].push(bytes) {
            self.note_received(peer, &m);
        }
        let _ = self.m.handle_bytes(now, peer, bytes);
        Ok(())
    }

    /// Feed one op, drain the outputs and check them.
    pub fn apply(&mut self, op: SupOp) -> Result<(), Violation> {
        if trace() && !matches!(op, SupOp::Honest(_)) {
            eprintln!("sup <- {op:?} [{}]", self.m.phase_name());
        }
        let now = self.clock.now();
        let mut ctx = SupCtx::Other;
        match op {
            SupOp::Trigger(spec) => {
                let idle = self.m.is_idle();
                if idle {
                    ensure!(self.m.incumbent().is_some(), "idle without an incumbent");
                }
                let in_handoff = self.m.current_handoff();
                match self.m.handle_trigger(now, spec) {
                    Ok(id) => {
                        ensure!(idle, "trigger accepted while not idle");
                        ensure!(
                            self.ids.iter().all(|old| *old < id),
                            "handoff id {} reused",
                            id
                        );
                        self.ids.insert(id);
                        self.current = Some(id);
                        self.killed.clear();
                        if self.ids.len() >= 2 {
                            self.reached.set(SUP_SECOND_HANDOFF);
                        }
                        ctx = SupCtx::TriggerOk(id);
                    }
                    Err(busy) => {
                        ensure!(!idle, "Busy while idle: {}", busy);
                        ensure_eq!(busy.handoff, in_handoff);
                    }
                }
            }
            SupOp::SpawnedFresh => {
                let pid = self.fresh_pid();
                return self.apply(SupOp::Spawned(pid));
            }
            SupOp::Spawned(pid) => {
                self.known_pids.insert(pid);
                self.succ_pid = pid;
                let _ = self.m.handle_spawned(now, pid);
            }
            SupOp::SpawnFailed(reason) => {
                let _ = self.m.handle_spawn_failed(now, reason);
            }
            SupOp::Connected => {
                let _ = self.m.handle_connected(now, self.serving);
            }
            SupOp::ConnectFailed(reason) => {
                let _ = self.m.handle_connect_failed(now, reason);
            }
            SupOp::Msg { peer, msg, framed } => {
                let ack_version = match &msg {
                    Message::HelloAck(ack) => Some(ack.version),
                    _ => None,
                };
                let r = if framed {
                    let bytes = frame_as_peer(&msg, self.peer_version[peer_ix(peer)]);
                    for m in self.scans[peer_ix(peer)].push(&bytes) {
                        self.note_received(peer, &m);
                    }
                    self.m.handle_bytes(now, peer, &bytes)
                } else {
                    self.note_received(peer, &msg);
                    self.m.handle_message(now, peer, msg)
                };
                if let (Some(v), Ok(())) = (ack_version, &r) {
                    self.peer_version[peer_ix(peer)] = Some(v);
                }
            }
            SupOp::Bytes(peer, bytes) => self.push_bytes(peer, &bytes)?,
            SupOp::Closed(peer) => self.m.handle_closed(now, peer),
            SupOp::Exited(pid) => self.m.handle_exited(now, pid),
            SupOp::ExitedKnown(i) => {
                let pids: Vec<Pid> = self.known_pids.iter().copied().collect();
                let pid = pids[i % pids.len()];
                return self.apply(SupOp::Exited(pid));
            }
            SupOp::JournalWritten => {
                let pending = self.journal_pending.clone();
                if self.m.handle_journal_written(now).is_ok() {
                    if let Some(JournalRecord::Committing { handoff, .. }) = pending {
                        self.commit_durable.insert(handoff);
                    }
                    self.journal_pending = None;
                }
            }
            SupOp::JournalFailed(reason) => {
                if self.m.handle_journal_failed(now, reason).is_ok() {
                    self.journal_pending = None;
                }
            }
            SupOp::ListenerError(reason) => self.m.handle_listener_error(now, reason),
            SupOp::Advance(ms) => {
                self.clock.advance(ms);
                self.timeout()?;
            }
            SupOp::AdvanceToTimer => {
                self.clock.advance_to(self.m.poll_timeout());
                self.timeout()?;
            }
            SupOp::Honest(sel) => return self.honest(sel),
        }
        self.drain(ctx)
    }

    fn timeout(&mut self) -> Result<(), Violation> {
        let now = self.clock.now();
        self.m.handle_timeout(now);
        if let Some(t) = self.m.poll_timeout() {
            ensure!(
                t > now,
                "poll_timeout {:?} not after now",
                t - self.clock.base
            );
        }
        Ok(())
    }

    fn drain(&mut self, ctx: SupCtx) -> Result<(), Violation> {
        while let Some(out) = self.m.poll_output() {
            if trace() {
                eprintln!("sup -> {out:?}");
            }
            match out {
                SupervisorOutput::Send { to, frame } => {
                    check_frame(&frame)?;
                    self.on_send(to, &frame.message)?;
                }
                SupervisorOutput::Close { peer } => {
                    self.peer_version[peer_ix(peer)] = None;
                    self.duties.retain(|d| d.peer() != Some(peer));
                }
                SupervisorOutput::TakeListeners { batch } => {
                    ensure!(batch.len() <= self.n_listeners);
                    // An honest driver: the descriptors arrived and are the configured ones.
                    let now = self.clock.now();
                    self.m.handle_listeners_taken(now, batch.len() as u32);
                }
                SupervisorOutput::SpawnSuccessor { handoff } => {
                    ensure_eq!(ctx, SupCtx::TriggerOk(handoff), "spawn without trigger");
                    self.duties.push(SupDuty::Spawn);
                }
                SupervisorOutput::SpawnColdStart => self.duties.push(SupDuty::ColdSpawn),
                SupervisorOutput::Connect => self.duties.push(SupDuty::Connect),
                SupervisorOutput::Watch { pid } => {
                    ensure!(
                        self.known_pids.contains(&pid),
                        "watches unknown pid {}",
                        pid
                    );
                }
                SupervisorOutput::Kill { pid } => {
                    ensure!(self.known_pids.contains(&pid), "kills unknown pid {}", pid);
                    if let Some(h) = self.m.current_handoff() {
                        // During a handoff the incumbent is killed only once the successor
                        // committed (it ignored Commit past deadline + slack).
                        if self.in_flight_incumbent.get(&h) == Some(&pid) {
                            ensure!(
                                self.succ_commit_ack.contains(&h),
                                "kills the incumbent of {} before the successor committed",
                                h
                            );
                        }
                        self.killed.insert(pid);
                    }
                    self.duties.push(SupDuty::Exit(pid));
                }
                SupervisorOutput::WriteJournal(rec) => {
                    ensure!(
                        rec.last_handoff() >= self.journal_max,
                        "journal goes back from {} to {:?}",
                        self.journal_max,
                        rec
                    );
                    self.journal_max = rec.last_handoff();
                    match &rec {
                        JournalRecord::InFlight {
                            handoff,
                            incumbent,
                            successor,
                        } => {
                            ensure_eq!(Some(*handoff), self.current);
                            ensure!(self.known_pids.contains(incumbent));
                            self.in_flight_successor.insert(*handoff, *successor);
                            self.in_flight_incumbent.insert(*handoff, *incumbent);
                        }
                        JournalRecord::Committing {
                            handoff, successor, ..
                        } => {
                            ensure_eq!(Some(*handoff), self.current);
                            ensure_eq!(
                                self.in_flight_successor.get(handoff),
                                Some(successor),
                                "committing another successor than journaled in flight"
                            );
                        }
                        JournalRecord::Idle { last_handoff, .. } => {
                            self.idle_journaled.insert(*last_handoff);
                        }
                    }
                    self.journal_pending = Some(rec);
                    self.duties.push(SupDuty::Journal);
                }
                SupervisorOutput::Outcome(o) => {
                    let h = o.handoff;
                    ensure_eq!(Some(h), self.current);
                    ensure!(self.outcomes.insert(h), "second outcome for {}", h);
                    ensure!(self.idle_journaled.contains(&h), "outcome not journaled");
                    match &o.verdict {
                        Verdict::Committed { successor } => {
                            ensure!(
                                self.succ_commit_ack.contains(&h),
                                "Committed without the successor's CommitAck"
                            );
                            ensure!(self.commit_sent_succ.contains(&h));
                            ensure_eq!(self.in_flight_successor.get(&h), Some(successor));
                            ensure!(
                                !self.killed.contains(successor),
                                "Committed, but the successor was killed"
                            );
                            self.serving = *successor;
                            self.reached.set(SUP_COMMITTED);
                        }
                        Verdict::RolledBack {
                            incumbent, drained, ..
                        } => {
                            ensure!(
                                !self.commit_sent_inc.contains(&h),
                                "rolled back after the incumbent was told to commit"
                            );
                            ensure!(self.known_pids.contains(incumbent));
                            // "The incumbent serves" must rest on something it said.
                            if *drained {
                                ensure!(
                                    self.resumed_from_inc.contains(&h)
                                        || self.serving_after_prepare.contains(&(h, *incumbent)),
                                    "RolledBack(drained) without Resumed or a Serving HelloAck"
                                );
                                self.reached.set(SUP_ROLLED_BACK_DRAINED);
                            } else {
                                ensure!(
                                    !self.prepare_sent.contains(&h),
                                    "RolledBack(drained: false) after Prepare"
                                );
                            }
                        }
                        Verdict::IncumbentLost { .. } => {
                            ensure!(!self.commit_sent_inc.contains(&h));
                            self.reached.set(SUP_LOST);
                        }
                    }
                }
                SupervisorOutput::Recovered { serving, .. } => {
                    ensure!(self.known_pids.contains(&serving));
                    self.serving = serving;
                    self.reached.set(SUP_RECOVERED);
                }
            }
        }
        if let Some(h) = self.m.current_handoff() {
            ensure_eq!(Some(h), self.current);
        }
        ensure!(!self.m.is_idle() || self.m.current_handoff().is_none());
        Ok(())
    }

    fn on_send(&mut self, to: Peer, msg: &Message) -> Result<(), Violation> {
        if let Some(h) = msg.handoff() {
            ensure_eq!(
                Some(h),
                self.current,
                "{} about another handoff",
                msg.kind()
            );
        }
        match (to, msg) {
            (_, Message::Hello(_)) => {
                // A fresh channel: its bytes start anew.
                self.scans[peer_ix(to)] = Scan::default();
                self.peer_version[peer_ix(to)] = None;
                self.duties.push(match to {
                    Peer::Incumbent => SupDuty::IncHelloAck,
                    Peer::Successor => SupDuty::SuccHelloAck,
                });
            }
            (Peer::Successor, Message::Welcome { listeners, .. }) => {
                ensure_eq!(*listeners as usize, self.n_listeners);
                self.duties.push(SupDuty::SuccListenersAck(*listeners));
            }
            (Peer::Successor, Message::Listeners { batch }) => {
                ensure!(batch.len() <= MAX_FDS_PER_MESSAGE);
            }
            (Peer::Incumbent, Message::Prepare { handoff, .. }) => {
                self.prepare_sent.insert(*handoff);
                self.duties.push(SupDuty::Drained(*handoff))
            }
            (Peer::Incumbent, Message::Seal { handoff }) => {
                self.duties.push(SupDuty::Sealed(*handoff))
            }
            (Peer::Successor, Message::Begin { handoff, seal }) => {
                // The successor may take the lock only after the incumbent sealed (and
                // released it) in this very handoff, and it opens what was sealed.
                let sealed = self.sealed_from_inc.get(handoff);
                ensure!(
                    sealed.is_some_and(|s| s.contains(seal)),
                    "Begin for {} without a Sealed from the incumbent",
                    handoff
                );
                ensure!(self.begin_sent.insert(*handoff), "Begin twice");
                self.reached.set(SUP_BEGIN);
                self.duties.push(SupDuty::Ready(*handoff, seal.clone()));
            }
            (_, Message::Commit { handoff }) => {
                ensure!(
                    self.commit_durable.contains(handoff),
                    "Commit for {} before the Committing record was durable",
                    handoff
                );
                self.reached.set(SUP_COMMIT);
                match to {
                    Peer::Successor => {
                        ensure!(self.commit_sent_succ.insert(*handoff), "Commit twice");
                        self.duties.push(SupDuty::SuccCommitAck(*handoff));
                    }
                    Peer::Incumbent => {
                        ensure!(
                            self.succ_commit_ack.contains(handoff),
                            "incumbent told to commit before the successor acknowledged"
                        );
                        ensure!(self.commit_sent_inc.insert(*handoff), "Commit twice");
                        self.duties.push(SupDuty::IncCommitAck(*handoff));
                    }
                }
            }
            (Peer::Incumbent, Message::Abort { handoff, .. }) => {
                ensure!(
                    !self.commit_sent_inc.contains(handoff),
                    "Abort after Commit to the incumbent"
                );
                self.duties.push(SupDuty::Resumed(*handoff));
            }
            (Peer::Incumbent, Message::ReturnListeners) => {
                self.duties.push(SupDuty::ReturnListeners)
            }
            _ => {}
        }
        Ok(())
    }

    /// Pids are never reused while a test runs: a spawn names a new process, never one of
    /// the pids random messages name (`INCUMBENT`, `SUCCESSORS`, 300).
    fn fresh_pid(&mut self) -> Pid {
        self.spawns += 1;
        1000 + self.spawns
    }

    fn send(&mut self, peer: Peer, msg: Message) -> Result<(), Violation> {
        self.apply(SupOp::Msg {
            peer,
            msg,
            framed: true,
        })
    }

    fn honest(&mut self, sel: u8) -> Result<(), Violation> {
        if self.duties.is_empty() {
            return self.apply(SupOp::Trigger(HandoffSpec {
                drain_grace: Duration::from_secs(1),
                deadline: Duration::from_secs(20),
            }));
        }
        let duty = self.duties.remove(sel as usize % self.duties.len());
        let variant = sel / 16;
        let fail = variant == 0;
        match duty {
            SupDuty::Spawn => {
                if fail {
                    self.apply(SupOp::SpawnFailed("no such binary".into()))
                } else {
                    let pid = self.fresh_pid();
                    self.apply(SupOp::Spawned(pid))
                }
            }
            SupDuty::ColdSpawn => {
                let pid = self.fresh_pid();
                self.serving = pid;
                self.apply(SupOp::Spawned(pid))
            }
            SupDuty::Journal => self.apply(if fail {
                SupOp::JournalFailed("disk full".into())
            } else {
                SupOp::JournalWritten
            }),
            SupDuty::SuccHelloAck => self.send(
                Peer::Successor,
                Message::HelloAck(HelloAck {
                    role: PeerRole::Successor,
                    version: 1,
                    pid: self.succ_pid,
                    build_id: "new".into(),
                    status: DaemonStatus::Successor,
                }),
            ),
            SupDuty::SuccListenersAck(count) => {
                self.send(Peer::Successor, Message::ListenersAck { count })
            }
            SupDuty::Connect => self.apply(if fail {
                SupOp::ConnectFailed("refused".into())
            } else {
                SupOp::Connected
            }),
            SupDuty::IncHelloAck => {
                let status = match (fail, self.current) {
                    (true, Some(h)) => DaemonStatus::Reclaiming(h),
                    _ => DaemonStatus::Serving,
                };
                self.send(
                    Peer::Incumbent,
                    Message::HelloAck(HelloAck {
                        role: PeerRole::Incumbent,
                        version: 1,
                        pid: self.serving,
                        build_id: "old".into(),
                        status,
                    }),
                )
            }
            SupDuty::Drained(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::DrainFailed {
                        handoff,
                        reason: "busy".into(),
                    }
                } else {
                    Message::Drained {
                        handoff,
                        report: DrainReport::default(),
                    }
                },
            ),
            SupDuty::Sealed(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::SealFailed {
                        handoff,
                        reason: "io".into(),
                    }
                } else {
                    Message::Sealed {
                        handoff,
                        report: SealReport {
                            last_revision_per_shard: vec![7, 8],
                            data_dir_fingerprint: 1,
                        },
                    }
                },
            ),
            SupDuty::Ready(handoff, seal) => self.send(
                Peer::Successor,
                Message::Ready {
                    handoff,
                    readiness: ReadinessSnapshot {
                        listening_on: Vec::new(),
                        healthz_ok: !fail,
                        advertised_revision_per_shard: seal.last_revision_per_shard,
                    },
                },
            ),
            SupDuty::SuccCommitAck(handoff) => {
                self.send(Peer::Successor, Message::CommitAck { handoff })
            }
            SupDuty::IncCommitAck(handoff) => {
                self.send(Peer::Incumbent, Message::CommitAck { handoff })
            }
            SupDuty::Resumed(handoff) => self.send(
                Peer::Incumbent,
                if fail {
                    Message::ResumeFailed {
                        handoff,
                        reason: "hook".into(),
                    }
                } else {
                    Message::Resumed {
                        handoff,
                        snapshot: StateSnapshot::default(),
                    }
                },
            ),
            SupDuty::ReturnListeners => {
                let all = listeners(self.n_listeners);
                if all.is_empty() {
                    return self.send(Peer::Incumbent, Message::Listeners { batch: all });
                }
                for batch in all.chunks(MAX_FDS_PER_MESSAGE) {
                    self.send(
                        Peer::Incumbent,
                        Message::Listeners {
                            batch: batch.to_vec(),
                        },
                    )?;
                }
                Ok(())
            }
            SupDuty::Exit(pid) => self.apply(SupOp::Exited(pid)),
        }
    }
}
