//! One honest handoff in memory, for the benchmarks (`benches/`): listener sets, and `Sim`, a
//! compact world in which the supervisor, the incumbent and the successor run one handoff by
//! exchanging encoded frames.
//!
//! `Sim` is a driver without I/O. Every `Send` is encoded into bytes and queued; the bytes are
//! fed to the receiver's `handle_bytes`, one frame per step, in the global order they were
//! sent (a valid interleaving: every channel stays FIFO). Every other obligation is performed
//! at once and succeeds: the spawn, the journal write (encoded, not written), the hooks, the
//! lock (a `flock` stand-in that a dying process releases). After each input the machine's
//! outputs are drained and `poll_timeout` is asked, as the driving rule says.
//!
//! Simulated time moves `TICK` per delivered event, far below every timer of the default
//! `Timing`, so no timer falls due during a handoff and none is fired (checked with a debug
//! assertion). The world in `sim::world` covers crashes and every interleaving for the model
//! check; this one only has to be short and fast, so that the measured time is the machines'.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::incumbent::{DaemonConfig, IncumbentOutput, LockResult};
use crate::journal;
use crate::successor::SuccessorOutput;
use crate::supervisor::{
    HandoffSpec, Outcome, Peer, Supervisor, SupervisorConfig, SupervisorOutput,
};
use crate::wire::SUPPORTED_VERSIONS;
use crate::{
    ConnId, DrainReport, HandoffId, Incumbent, ListenerInfo, ListenerKind, LockRecord, Pid,
    ReadinessSnapshot, SealReport, StateSnapshot, Successor, Timing,
};

/// `n` TCP listeners with names like a real deployment's (`LISTEN_FDNAMES` entries).
pub fn listeners(n: usize) -> Vec<ListenerInfo> {
    (0..n)
        .map(|i| ListenerInfo {
            name: format!("http-{i:04}"),
            kind: ListenerKind::Tcp,
        })
        .collect()
}

/// The supervisor's pid.
pub const SUP: Pid = 1;
/// The incumbent's pid.
pub const INC: Pid = 10;
/// The successor's pid.
pub const SUCC: Pid = 20;

/// Simulated time per delivered event.
pub const TICK: Duration = Duration::from_micros(10);

/// The handoff every simulation runs.
pub const SPEC: HandoffSpec = HandoffSpec {
    drain_grace: Duration::from_secs(1),
    deadline: Duration::from_secs(10),
};

/// Where a queued event goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The supervisor, on its channel to this peer.
    Sup(Peer),
    /// The incumbent, on its control connection.
    Inc,
    /// The successor, on its inherited socketpair.
    Succ,
}

#[derive(Clone, Debug)]
enum Event {
    /// One encoded frame.
    Frame {
        to: Dest,
        kind: &'static str,
        bytes: Vec<u8>,
    },
    /// The other end closed: end-of-file for `Dest`.
    Eof(Dest),
    /// A watched process exited (reported to the supervisor).
    Exited(Pid),
}

/// The three machines and the driver state between them.
#[derive(Clone, Debug)]
pub struct Sim {
    /// Simulated time.
    pub now: Instant,
    /// The supervisor.
    pub sup: Supervisor,
    /// The incumbent.
    pub inc: Incumbent,
    /// Spawned by the supervisor's `SpawnSuccessor`; `None` before that and once it died.
    pub succ: Option<Successor>,
    /// The successor's configuration, taken when it is spawned.
    succ_cfg: Option<DaemonConfig>,
    /// Whether the successor reports a readiness the seal accepts (else: rollback).
    healthy: bool,
    queue: VecDeque<Event>,
    /// Driver-side ends: the supervisor's two channels, the incumbent's control connection.
    sup_inc_open: bool,
    sup_succ_open: bool,
    /// The incumbent's end of its control connection, once accepted.
    pub inc_conn: Option<ConnId>,
    next_conn: u64,
    /// Who holds the data directory's lock.
    pub lock: Option<Pid>,
    /// The lock record in the data directory.
    pub lock_record: Option<LockRecord>,
    /// The last journal record, encoded as the driver would write it.
    pub journal: Vec<u8>,
    /// Listener descriptors the successor took.
    pub taken: usize,
    /// The incumbent output `Retire`.
    pub incumbent_retired: bool,
    /// The successor output `Committed`.
    pub successor_committed: bool,
    /// The supervisor's verdict on the handoff, once given.
    pub outcome: Option<Outcome>,
}

impl Sim {
    /// A supervisor and the incumbent serving `n` listeners, idle. With `healthy` false the
    /// successor reports `healthz_ok = false` with `Ready`, and the supervisor rolls back.
    pub fn new(n: usize, healthy: bool) -> Self {
        let now = Instant::now();
        let timing = Timing::default();
        let daemon = |pid: Pid, build: &str, listeners| DaemonConfig {
            pid,
            build_id: build.into(),
            versions: SUPPORTED_VERSIONS,
            timing,
            listeners,
        };
        let sup_cfg = SupervisorConfig {
            pid: SUP,
            build_id: "supervisor-1".into(),
            versions: SUPPORTED_VERSIONS,
            timing: Timing {
                recovery_wait: Duration::from_secs(5),
                ..timing
            },
            listeners: listeners(n),
        };
        let mut sim = Sim {
            now,
            sup: Supervisor::with_incumbent(sup_cfg, INC, HandoffId(0)),
            inc: Incumbent::serving(daemon(INC, "daemon-1", listeners(n))),
            succ: None,
            // A successor learns its listeners from the supervisor (the std driver starts it
            // with none configured).
            succ_cfg: Some(daemon(SUCC, "daemon-2", Vec::new())),
            healthy,
            queue: VecDeque::new(),
            sup_inc_open: false,
            sup_succ_open: false,
            inc_conn: None,
            next_conn: 1,
            lock: Some(INC),
            lock_record: Some(LockRecord {
                owner: INC,
                committed: None,
            }),
            journal: Vec::new(),
            taken: 0,
            incumbent_retired: false,
            successor_committed: false,
            outcome: None,
        };
        sim.drain_sup();
        sim
    }

    /// Start the handoff.
    pub fn trigger(&mut self) {
        self.sup
            .handle_trigger(self.now, SPEC)
            .expect("an idle supervisor with an incumbent starts a handoff");
        self.drain_sup();
    }

    /// Trigger and run until nothing is left to deliver; the outcome.
    pub fn run(&mut self) -> &Outcome {
        self.trigger();
        while self.step() {}
        self.outcome
            .as_ref()
            .expect("a handoff without faults reaches an outcome")
    }

    /// Deliver the next event; false when none is left.
    pub fn step(&mut self) -> bool {
        let Some(ev) = self.queue.pop_front() else {
            return false;
        };
        self.now += TICK;
        self.deliver(ev);
        true
    }

    /// Run until the next event is a frame of `kind` for `to`, and return its bytes without
    /// delivering it: the machine it goes to is then in the state a real handoff reaches it in.
    pub fn advance_to(&mut self, to: Dest, kind: &str) -> Vec<u8> {
        loop {
            match self.queue.front() {
                Some(Event::Frame {
                    to: t,
                    kind: k,
                    bytes,
                }) if *t == to && *k == kind => return bytes.clone(),
                Some(_) => {
                    self.step();
                }
                None => panic!("no {kind} frame for {to:?} in this handoff"),
            }
        }
    }

    /// The successor, which must be alive.
    pub fn successor(&self) -> &Successor {
        self.succ.as_ref().expect("the successor was spawned")
    }

    fn push_frame(&mut self, to: Dest, frame: crate::wire::Frame) {
        let bytes = frame
            .encode()
            .expect("the machines only send encodable frames");
        let kind = frame.message.kind();
        self.queue.push_back(Event::Frame { to, kind, bytes });
    }

    fn deliver(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Frame { to, bytes, .. } => match to {
                Dest::Sup(peer) if self.sup_open(peer) => {
                    self.sup
                        .handle_bytes(now, peer, &bytes)
                        .expect("no protocol error in this handoff");
                    self.drain_sup();
                }
                Dest::Inc => {
                    if let Some(conn) = self.inc_conn {
                        self.inc
                            .handle_bytes(now, conn, &bytes)
                            .expect("no protocol error in this handoff");
                        self.drain_inc();
                    }
                }
                Dest::Succ => {
                    if let Some(s) = &mut self.succ {
                        s.handle_bytes(now, &bytes)
                            .expect("no protocol error in this handoff");
                        self.drain_succ();
                    }
                }
                // The supervisor closed that channel: the bytes are lost with it.
                Dest::Sup(_) => {}
            },
            Event::Eof(Dest::Sup(peer)) => {
                if self.sup_open(peer) {
                    self.set_sup_open(peer, false);
                    self.sup.handle_closed(now, peer);
                    self.drain_sup();
                }
            }
            Event::Eof(Dest::Inc) => {
                if let Some(conn) = self.inc_conn.take() {
                    self.inc
                        .handle_closed(now, conn)
                        .expect("the supervisor closes between frames");
                    self.drain_inc();
                }
            }
            Event::Eof(Dest::Succ) => {
                if let Some(s) = &mut self.succ {
                    s.handle_closed(now);
                    self.drain_succ();
                }
            }
            Event::Exited(pid) => {
                self.sup.handle_exited(now, pid);
                self.drain_sup();
            }
        }
    }

    fn sup_open(&self, peer: Peer) -> bool {
        match peer {
            Peer::Incumbent => self.sup_inc_open,
            Peer::Successor => self.sup_succ_open,
        }
    }

    fn set_sup_open(&mut self, peer: Peer, open: bool) {
        match peer {
            Peer::Incumbent => self.sup_inc_open = open,
            Peer::Successor => self.sup_succ_open = open,
        }
    }

    /// Take the lock for `pid` if it is free, as a non-blocking `flock` would.
    fn acquire(&mut self, pid: Pid) -> LockResult {
        if self.lock.is_some() {
            return LockResult::Held(self.lock_record);
        }
        self.lock = Some(pid);
        let previous = self.lock_record;
        self.lock_record = Some(LockRecord {
            owner: pid,
            committed: None,
        });
        LockResult::Acquired { previous }
    }

    /// The successor process is gone: its lock and its channel go with it.
    fn successor_died(&mut self) {
        if self.succ.take().is_some() {
            if self.lock == Some(SUCC) {
                self.lock = None;
            }
            self.queue.push_back(Event::Eof(Dest::Sup(Peer::Successor)));
            self.queue.push_back(Event::Exited(SUCC));
        }
    }

    fn drain_sup(&mut self) {
        while let Some(o) = self.sup.poll_output() {
            let now = self.now;
            match o {
                SupervisorOutput::Send { to, frame } => {
                    let dest = match to {
                        Peer::Incumbent => Dest::Inc,
                        Peer::Successor => Dest::Succ,
                    };
                    self.push_frame(dest, frame);
                }
                SupervisorOutput::Close { peer } => {
                    self.set_sup_open(peer, false);
                    let dest = match peer {
                        Peer::Incumbent => Dest::Inc,
                        Peer::Successor => Dest::Succ,
                    };
                    self.queue.push_back(Event::Eof(dest));
                }
                SupervisorOutput::SpawnSuccessor { .. } => {
                    let cfg = self.succ_cfg.take().expect("one successor per handoff");
                    self.succ = Some(Successor::new(cfg, now));
                    self.sup_succ_open = true;
                    self.sup
                        .handle_spawned(now, SUCC)
                        .expect("the spawn was asked for");
                }
                SupervisorOutput::Connect => {
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    self.inc
                        .handle_connected(now, conn)
                        .expect("a fresh connection id");
                    self.inc_conn = Some(conn);
                    self.sup_inc_open = true;
                    self.sup
                        .handle_connected(now, INC)
                        .expect("the connection was asked for");
                }
                SupervisorOutput::WriteJournal(record) => {
                    self.journal = journal::encode(&record);
                    self.sup
                        .handle_journal_written(now)
                        .expect("the write was asked for");
                }
                SupervisorOutput::Watch { .. } => {}
                SupervisorOutput::Kill { pid } => {
                    assert_eq!(pid, SUCC, "only an aborted successor is killed here");
                    self.successor_died();
                }
                SupervisorOutput::Outcome(o) => self.outcome = Some(o),
                other => unreachable!("not part of a handoff from a known incumbent: {other:?}"),
            }
        }
        let next = self.sup.poll_timeout();
        debug_assert!(
            next.is_none_or(|t| t > self.now),
            "a supervisor timer fell due"
        );
        black_box(next);
    }

    fn drain_inc(&mut self) {
        while let Some(o) = self.inc.poll_output() {
            let now = self.now;
            match o {
                IncumbentOutput::Send { frame, .. } => {
                    if self.sup_inc_open {
                        self.push_frame(Dest::Sup(Peer::Incumbent), frame);
                    }
                }
                IncumbentOutput::Close { .. } => {
                    self.inc_conn = None;
                    self.queue.push_back(Event::Eof(Dest::Sup(Peer::Incumbent)));
                }
                IncumbentOutput::CallDrain { .. } => self
                    .inc
                    .handle_drained(now, Ok(DrainReport::default()))
                    .expect("the drain was asked for"),
                IncumbentOutput::CallSeal { .. } => self
                    .inc
                    .handle_sealed(now, Ok(seal_report()))
                    .expect("the seal was asked for"),
                IncumbentOutput::CallResume { .. } => self
                    .inc
                    .handle_resumed(now, Ok(StateSnapshot::default()))
                    .expect("the resume was asked for"),
                IncumbentOutput::ReleaseLock(proof) => {
                    assert_eq!(self.lock, Some(INC), "released a lock it did not hold");
                    black_box(proof.handoff());
                    self.lock = None;
                }
                IncumbentOutput::AcquireLock => {
                    let r = self.acquire(INC);
                    self.inc
                        .handle_lock(now, r)
                        .expect("the lock was asked for");
                }
                IncumbentOutput::Retire { .. } => {
                    self.incumbent_retired = true;
                    self.queue.push_back(Event::Exited(INC));
                }
                IncumbentOutput::KillLockHolder { .. } => {
                    unreachable!("only after a supervisor is lost")
                }
            }
        }
        let next = self.inc.poll_timeout();
        debug_assert!(
            next.is_none_or(|t| t > self.now),
            "an incumbent timer fell due"
        );
        black_box(next);
    }

    fn drain_succ(&mut self) {
        while let Some(o) = self.succ.as_mut().and_then(Successor::poll_output) {
            let now = self.now;
            match o {
                SuccessorOutput::Send(frame) => {
                    if self.sup_succ_open {
                        self.push_frame(Dest::Sup(Peer::Successor), frame);
                    }
                }
                SuccessorOutput::TakeListeners { batch } => self.taken += batch.len(),
                SuccessorOutput::AcquireLock => {
                    let r = self.acquire(SUCC);
                    self.succ_mut()
                        .handle_lock(now, r)
                        .expect("the lock was asked for");
                }
                SuccessorOutput::Begun { seal, .. } => {
                    let readiness = ReadinessSnapshot {
                        listening_on: vec!["127.0.0.1:8080".into()],
                        healthz_ok: self.healthy,
                        advertised_revision_per_shard: seal.last_revision_per_shard,
                    };
                    self.succ_mut()
                        .ready(now, readiness)
                        .expect("ready after Begun");
                }
                SuccessorOutput::MarkCommitted { handoff } => {
                    assert_eq!(self.lock, Some(SUCC), "marked a lock it does not hold");
                    self.lock_record = Some(LockRecord {
                        owner: SUCC,
                        committed: Some(handoff),
                    });
                }
                SuccessorOutput::Committed { .. } => self.successor_committed = true,
                SuccessorOutput::Exit { .. } => self.successor_died(),
            }
        }
        if let Some(s) = &self.succ {
            let next = s.poll_timeout();
            debug_assert!(
                next.is_none_or(|t| t > self.now),
                "a successor timer fell due"
            );
            black_box(next);
        }
    }

    fn succ_mut(&mut self) -> &mut Successor {
        self.succ.as_mut().expect("the successor is alive")
    }
}

/// What the incumbent's seal hook reports: four shards.
pub fn seal_report() -> SealReport {
    SealReport {
        last_revision_per_shard: vec![41, 42, 43, 44],
        data_dir_fingerprint: 0x5eed,
    }
}
