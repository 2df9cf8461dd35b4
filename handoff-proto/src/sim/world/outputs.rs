//! Performing each machine's outputs, as its driver does: frames onto links, journal writes,
//! spawns, kills, the lock and the hooks.

use super::*;

impl World {
    pub(super) fn perform_sup(&mut self, cfg: &Config, o: SupervisorOutput) {
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
    pub(super) fn open_link(&mut self, daemon: Pid, peer: Peer) -> u64 {
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

    pub(super) fn next_pid(&self) -> Pid {
        self.procs.iter().map(|p| p.pid).max().unwrap_or(0) + 1
    }

    pub(super) fn daemon_send(&mut self, pid: Pid, conn: Option<ConnId>, msg: Message) {
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

    pub(super) fn acquire(&mut self, pid: Pid) -> LockResult {
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

    pub(super) fn perform_incumbent(&mut self, cfg: &Config, pid: Pid, o: IncumbentOutput) {
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

    pub(super) fn release(&mut self, pid: Pid, proof: Option<HandoffId>) {
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

    pub(super) fn perform_successor(&mut self, cfg: &Config, pid: Pid, o: SuccessorOutput) {
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

    pub(super) fn normalize(&mut self, cfg: &Config) {
        if self.trigger_time.is_none() && self.quiescent(cfg) {
            self.now = 0;
        }
    }
}
