//! The invariants (I1–I6) checked in every state, and the one-line summary of a state.

use super::*;

impl World {
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
    pub fn safety(&self) -> Result<(), Violation> {
        if let Some(v) = &self.violation {
            return Err(violation!("{v}"));
        }
        let writers: Vec<Pid> = self
            .procs
            .iter()
            .filter(|p| p.alive && p.writer)
            .map(|p| p.pid)
            .collect();
        if writers.len() > 1 {
            return Err(violation!("I1: several writers {writers:?}"));
        }
        for p in self.procs.iter().filter(|p| p.alive) {
            if (p.writer || p.data_open) && self.lock != Some(p.pid) {
                return Err(violation!(
                    "I1/I3: {} uses the data without the lock",
                    p.pid
                ));
            }
            let believes = match &p.m {
                Machine::Incumbent(m) => m.holds_lock(),
                Machine::Successor(m) => m.holds_lock(),
            };
            if believes && self.lock != Some(p.pid) {
                return Err(violation!(
                    "I1: {} believes it holds the lock, {:?} does",
                    p.pid,
                    self.lock
                ));
            }
        }
        Ok(())
    }

    /// I4: while the supervisor lives, some live process holds the listeners.
    pub fn listeners_held(&self) -> Result<(), Violation> {
        let held = match &self.sup {
            None => true,
            Some(s) => {
                s.m.holds_listeners() || self.procs.iter().any(|p| p.alive && p.has_listeners)
            }
        };
        ensure!(
            held,
            "I4: the supervisor lives and no live process holds the listeners"
        );
        Ok(())
    }

    /// I5: when nothing more can happen, exactly one process serves, the supervisor (if
    /// alive) names it, and this happened in time.
    pub fn settled_correctly(&self, cfg: &Config) -> Result<(), Violation> {
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
            return Err(violation!("I5: serving processes {serving:?}"));
        }
        if self.lock != Some(serving[0]) {
            return Err(violation!("I5: {} serves without the lock", serving[0]));
        }
        if let Some(sup) = &self.sup {
            if !sup.m.is_idle() || sup.m.incumbent() != Some(serving[0]) {
                return Err(violation!(
                    "I5: supervisor is {} with incumbent {:?}, {} serves",
                    sup.m.phase_name(),
                    sup.m.incumbent(),
                    serving[0]
                ));
            }
            if !sup.m.holds_listeners() {
                return Err(violation!("I4: supervisor settled without the listeners"));
            }
        }
        Ok(())
    }

    /// I5's time bound: a handoff in progress never runs past deadline + 2 slack (the
    /// incumbent's last resort). A supervisor crash interrupts the handoff; recovery (I6)
    /// concludes it.
    pub fn within_deadline(&self, cfg: &Config) -> Result<(), Violation> {
        if let Some(t) = self.trigger_time {
            let bound = cfg.spec.deadline + cfg.timing.slack * 2;
            ensure!(
                self.now <= t + bound.as_millis() as u64,
                "I5: handoff triggered at {t} ms still runs at {} ms, past deadline + 2 slack ({bound:?})",
                self.now
            );
        }
        Ok(())
    }
}
