//! Performing one action: deliver one input to one machine, drain its outputs (a crash may
//! cut them short), or crash a party.

use super::*;

impl World {
    /// Returns false when a mid-step crash asks for more outputs than the step had.
    pub(super) fn perform(&mut self, cfg: &Config, action: Action, cut: Option<usize>) -> bool {
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

    pub(super) fn crash(&mut self, party: Party) {
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
    pub(super) fn kill(&mut self, pid: Pid) {
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

    pub(super) fn gc_links(&mut self) {
        self.links.retain(|l| {
            let sup_done = l.sup_peer.is_none() && l.to_sup.is_empty();
            let daemon_done = !l.daemon_open && l.to_daemon.is_empty();
            !(sup_done && daemon_done)
        });
    }

    /// Perform the supervisor's outputs until it has none left (results of synchronous
    /// driver calls are fed back at once and may produce more). With `cut = Some(k)`, crash it
    /// after the `k`-th output instead; returns false if there were no more than `k`.
    pub(super) fn drain_sup(&mut self, cfg: &Config, cut: Option<usize>) -> bool {
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

    pub(super) fn drain_daemon(&mut self, cfg: &Config, pid: Pid, cut: Option<usize>) -> bool {
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

    pub(super) fn sup_link(&mut self, peer: Peer) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.sup_peer == Some(peer))
    }
}
