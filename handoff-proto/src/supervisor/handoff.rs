//! The handoff half of the supervisor: spawn and greet the successor, pass it the listeners,
//! have the incumbent drain and seal, begin, then commit, or abort and roll back.
//!
//! The data of each stage is in [`super::stage`].

use std::time::Instant;

use super::stage::{Abort, AbortStep, Child, Handoff, Marks, Phase, Stage};
use super::types::{Busy, HandoffSpec, Outcome, Peer, SupervisorOutput, Verdict};
use super::{unexpected, State, Supervisor, T};
use crate::channel::Channel;
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::incumbent::listener_batches;
use crate::journal::JournalRecord;
use crate::timer::Timers;
use crate::types::{AbortReason, HandoffId, Pid};
use crate::wire::{bounded_text, DaemonStatus, HelloAck, Message};

impl Supervisor {
    // ---- application command ----

    /// Start a handoff, or say why not.
    pub fn handle_trigger(&mut self, now: Instant, spec: HandoffSpec) -> Result<HandoffId, Busy> {
        let incumbent = match &self.state {
            State::Idle { serving } => *serving,
            State::Handoff(h) => {
                return Err(Busy {
                    what: format!("handoff {} is {}", h.id, self.phase_name()),
                    handoff: Some(h.id),
                })
            }
            State::Recovering(_) => {
                return Err(Busy {
                    what: "recovering: no confirmed incumbent yet".into(),
                    handoff: None,
                })
            }
        };
        let id = HandoffId(self.last_handoff.0 + 1);
        self.last_handoff = id;
        self.state = State::Handoff(Box::new(Handoff {
            id,
            spec,
            started: now,
            deadline: now + spec.deadline,
            incumbent,
            incumbent_alive: true,
            stage: Stage::Spawning,
            marks: Marks::default(),
            incumbent_build: None,
            successor_build: None,
        }));
        self.timers.set(T::Deadline, now + spec.deadline);
        self.timers
            .set(T::Heartbeat, now + self.cfg.timing.heartbeat_interval);
        self.out
            .push_back(SupervisorOutput::SpawnSuccessor { handoff: id });
        Ok(id)
    }

    // ---- inputs, handoff half ----

    pub(super) fn successor_spawned(&mut self, now: Instant, pid: Pid) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        h.marks.spawned = Some(now);
        h.stage = Stage::Spawned {
            successor: Child { pid, alive: true },
            phase: Phase::JournalInFlight,
        };
        let rec = JournalRecord::InFlight {
            handoff: h.id,
            incumbent: h.incumbent,
            successor: pid,
        };
        self.out.push_back(SupervisorOutput::WriteJournal(rec));
    }

    pub(super) fn handoff_exited(&mut self, now: Instant, pid: Pid) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        if let Some(c) = h.successor_mut().filter(|c| c.pid == pid && c.alive) {
            c.alive = false;
            match &h.stage {
                Stage::Aborting(Abort {
                    step: AbortStep::KillingSuccessor,
                    ..
                }) => self.after_successor_gone(),
                Stage::Aborting(_) | Stage::Finishing { .. } => {}
                Stage::Spawned {
                    phase: Phase::CommittingIncumbent,
                    ..
                } => {}
                _ => self.abort(now, AbortReason::SuccessorExited),
            }
        } else if h.incumbent == pid && h.incumbent_alive {
            h.incumbent_alive = false;
            match &h.stage {
                // Sealed already: the successor can still take over.
                Stage::Spawned {
                    phase:
                        Phase::Begun { .. } | Phase::JournalCommitting | Phase::CommittingSuccessor,
                    ..
                } => {}
                Stage::Spawned {
                    successor,
                    phase: Phase::CommittingIncumbent,
                } => {
                    let successor = successor.pid;
                    self.finish(Verdict::Committed { successor });
                }
                Stage::Aborting(Abort {
                    step: AbortStep::KillingSuccessor,
                    ..
                })
                | Stage::Finishing { .. } => {}
                Stage::Aborting(a) => {
                    let reason = a.reason.clone();
                    self.finish(Verdict::IncumbentLost { reason });
                }
                _ => self.abort(
                    now,
                    AbortReason::IncumbentUnreachable("incumbent exited".into()),
                ),
            }
        }
    }

    pub(super) fn handoff_journal_written(&mut self, now: Instant) -> Result<(), Misuse> {
        let State::Handoff(h) = &mut self.state else {
            return Err(self.no_journal_pending());
        };
        match &h.stage {
            Stage::Spawned {
                phase: Phase::JournalInFlight,
                ..
            } => {
                h.advance(Phase::Greeting);
                self.succ = Some(Channel::new(self.cfg.versions, now));
                let hello = self.hello();
                self.send(Peer::Successor, hello);
            }
            Stage::Spawned {
                phase: Phase::JournalCommitting,
                ..
            } => {
                h.advance(Phase::CommittingSuccessor);
                let handoff = h.id;
                self.send(Peer::Successor, Message::Commit { handoff });
            }
            Stage::Finishing { verdict, .. } => {
                let v = verdict.clone();
                self.finish_written(now, v);
            }
            _ => return Err(self.no_journal_pending()),
        }
        Ok(())
    }

    pub(super) fn handoff_journal_failed(
        &mut self,
        now: Instant,
        reason: String,
    ) -> Result<(), Misuse> {
        let State::Handoff(h) = &self.state else {
            return Err(self.no_journal_pending());
        };
        match &h.stage {
            Stage::Spawned {
                phase: Phase::JournalInFlight | Phase::JournalCommitting,
                ..
            } => self.abort(now, AbortReason::JournalFailed(reason)),
            // The outcome stands; a stale record only makes a later recovery look.
            Stage::Finishing { verdict, .. } => {
                let v = verdict.clone();
                self.finish_written(now, v);
            }
            _ => return Err(self.no_journal_pending()),
        }
        Ok(())
    }

    pub(super) fn handoff_connect_failed(
        &mut self,
        now: Instant,
        reason: String,
    ) -> Result<(), Misuse> {
        let State::Handoff(h) = &mut self.state else {
            return Err(self.wrong_phase("connect failed"));
        };
        match &mut h.stage {
            Stage::Spawned {
                phase: Phase::Connecting,
                ..
            } => {
                self.abort(now, AbortReason::IncumbentUnreachable(bounded_text(reason)));
            }
            Stage::Aborting(a) if a.step == AbortStep::Connecting => {
                a.step = AbortStep::RetryWait;
                self.timers
                    .set(T::Retry, now + self.cfg.timing.retry_interval);
            }
            _ => return Err(self.wrong_phase("connect failed")),
        }
        Ok(())
    }

    pub(super) fn successor_hello_ack(&mut self, now: Instant, ack: HelloAck) -> Result<(), Error> {
        let n_listeners = self.cfg.listeners.len() as u32;
        let State::Handoff(h) = &mut self.state else {
            return Ok(());
        };
        let Stage::Spawned {
            successor,
            phase: Phase::Greeting,
        } = &h.stage
        else {
            let e = unexpected("HelloAck", "not greeting");
            return Err(self.violation(now, Peer::Successor, e));
        };
        let expected = successor.pid;
        if ack.pid != expected {
            let e = PeerMisbehaved::PidMismatch {
                expected,
                got: ack.pid,
            };
            return Err(self.violation(now, Peer::Successor, e));
        }
        h.marks.hello = Some(now);
        h.successor_build = Some(ack.build_id);
        h.advance(Phase::PassingListeners);
        let welcome = Message::Welcome {
            handoff: h.id,
            deadline_ms: remaining_ms(h.deadline, now),
            listeners: n_listeners,
        };
        self.send(Peer::Successor, welcome);
        for batch in listener_batches(&self.cfg.listeners) {
            self.send(Peer::Successor, Message::Listeners { batch });
        }
        Ok(())
    }

    pub(super) fn incumbent_hello_ack(&mut self, now: Instant, ack: HelloAck) -> Result<(), Error> {
        let State::Handoff(h) = &mut self.state else {
            return Ok(());
        };
        match &mut h.stage {
            Stage::Spawned {
                successor,
                phase: Phase::GreetingIncumbent,
            } => {
                if ack.pid != h.incumbent || ack.status != DaemonStatus::Serving {
                    let why = format!(
                        "control socket answered by pid {} ({:?}), expected serving pid {}",
                        ack.pid, ack.status, h.incumbent
                    );
                    self.abort(now, AbortReason::IncumbentUnreachable(why));
                    return Ok(());
                }
                let prepare = Message::Prepare {
                    handoff: h.id,
                    successor: successor.pid,
                    drain_grace_ms: h.spec.drain_grace.as_millis() as u64,
                    deadline_ms: remaining_ms(h.deadline, now),
                };
                h.advance(Phase::Draining);
                h.incumbent_build = Some(ack.build_id);
                h.marks.prepare = Some(now);
                self.send(Peer::Incumbent, prepare);
            }
            Stage::Aborting(a) if a.step == AbortStep::Confirming => {
                if ack.pid == h.incumbent && ack.status == DaemonStatus::Serving {
                    let v = Verdict::RolledBack {
                        incumbent: h.incumbent,
                        reason: a.reason.clone(),
                        drained: true,
                    };
                    h.incumbent_build = Some(ack.build_id);
                    self.finish(v);
                } else {
                    a.step = AbortStep::RetryWait;
                    self.drop_chan(Peer::Incumbent);
                    self.timers
                        .set(T::Retry, now + self.cfg.timing.retry_interval);
                }
            }
            // A greeting that raced with an abort is stale, not misbehaviour.
            Stage::Aborting(_) | Stage::Finishing { .. } => {}
            _ => {
                let e = unexpected("HelloAck", "handoff");
                return Err(self.violation(now, Peer::Incumbent, e));
            }
        }
        Ok(())
    }

    /// `m`, which carried a handoff id, is for another handoff than `h`.
    fn wrong_handoff(h: &Handoff, m: &Message) -> Option<PeerMisbehaved> {
        let got = m.handoff().filter(|got| *got != h.id)?;
        Some(PeerMisbehaved::WrongHandoff {
            expected: h.id,
            got,
        })
    }

    pub(super) fn on_successor_message(&mut self, now: Instant, m: Message) -> Result<(), Error> {
        let want = self.cfg.listeners.len() as u32;
        let State::Handoff(h) = &mut self.state else {
            return Ok(());
        };
        if let Some(e) = Self::wrong_handoff(h, &m) {
            return Err(self.violation(now, Peer::Successor, e));
        }
        match (m, &h.stage) {
            (
                Message::ListenersAck { count },
                Stage::Spawned {
                    phase: Phase::PassingListeners,
                    ..
                },
            ) => {
                if count != want {
                    let e = PeerMisbehaved::ListenerCount(format!(
                        "successor acknowledged {count} of {want} listeners"
                    ));
                    return Err(self.violation(now, Peer::Successor, e));
                }
                h.marks.listeners = Some(now);
                h.advance(Phase::Connecting);
                self.out.push_back(SupervisorOutput::Connect);
            }
            (
                Message::Ready { readiness, .. },
                Stage::Spawned {
                    successor,
                    phase: Phase::Begun { seal },
                },
            ) => {
                if let Err(why) = seal.accepts(&readiness) {
                    self.abort(now, AbortReason::ReadinessRejected(bounded_text(why)));
                    return Ok(());
                }
                let rec = JournalRecord::Committing {
                    handoff: h.id,
                    incumbent: h.incumbent,
                    successor: successor.pid,
                };
                h.marks.ready = Some(now);
                h.advance(Phase::JournalCommitting);
                self.out.push_back(SupervisorOutput::WriteJournal(rec));
            }
            (
                Message::CommitAck { .. },
                Stage::Spawned {
                    successor,
                    phase: Phase::CommittingSuccessor,
                },
            ) => {
                let successor = successor.pid;
                h.marks.committed = Some(now);
                h.advance(Phase::CommittingIncumbent);
                let (handoff, alive) = (h.id, h.incumbent_alive);
                if alive && self.negotiated(Peer::Incumbent) {
                    self.send(Peer::Incumbent, Message::Commit { handoff });
                } else if !alive {
                    self.finish(Verdict::Committed { successor });
                }
                // Otherwise the incumbent lost its session; it learns the outcome from the
                // lock record and exits, and its exit finishes the handoff.
            }
            // Messages that raced with an abort are stale, not misbehaviour.
            (_, Stage::Aborting(_) | Stage::Finishing { .. }) => {}
            (m, _) => {
                let phase = self.phase_name();
                return Err(self.violation(now, Peer::Successor, unexpected(m.kind(), phase)));
            }
        }
        Ok(())
    }

    pub(super) fn on_incumbent_message(&mut self, now: Instant, m: Message) -> Result<(), Error> {
        let State::Handoff(h) = &mut self.state else {
            return Ok(());
        };
        if let Some(e) = Self::wrong_handoff(h, &m) {
            return Err(self.violation(now, Peer::Incumbent, e));
        }
        let handoff = h.id;
        match (m, &h.stage) {
            (
                Message::Drained { .. },
                Stage::Spawned {
                    phase: Phase::Draining,
                    ..
                },
            ) => {
                h.marks.drained = Some(now);
                h.advance(Phase::Sealing);
                self.send(Peer::Incumbent, Message::Seal { handoff });
            }
            (
                Message::DrainFailed { reason, .. },
                Stage::Spawned {
                    phase: Phase::Draining,
                    ..
                },
            ) => self.abort(now, AbortReason::DrainFailed(bounded_text(reason))),
            (
                Message::Sealed { report, .. },
                Stage::Spawned {
                    phase: Phase::Sealing,
                    ..
                },
            ) => {
                h.marks.sealed = Some(now);
                h.advance(Phase::Begun {
                    seal: report.clone(),
                });
                let begin = Message::Begin {
                    handoff,
                    seal: report,
                };
                self.send(Peer::Successor, begin);
            }
            (
                Message::SealFailed { reason, .. },
                Stage::Spawned {
                    phase: Phase::Sealing,
                    ..
                },
            ) => self.abort(now, AbortReason::SealFailed(bounded_text(reason))),
            (
                Message::CommitAck { .. },
                Stage::Spawned {
                    successor,
                    phase: Phase::CommittingIncumbent,
                },
            ) => {
                let successor = successor.pid;
                self.finish(Verdict::Committed { successor });
            }
            (
                Message::Resumed { .. },
                Stage::Aborting(Abort {
                    step: AbortStep::Notifying,
                    reason,
                    ..
                }),
            ) => {
                let v = Verdict::RolledBack {
                    incumbent: h.incumbent,
                    reason: reason.clone(),
                    drained: true,
                };
                self.finish(v);
            }
            // The incumbent retries its resume hook; keep waiting until the deadline.
            (Message::ResumeFailed { .. }, Stage::Aborting(_)) => {}
            // Messages that raced with an abort are stale, not misbehaviour.
            (_, Stage::Aborting(_) | Stage::Finishing { .. }) => {}
            (m, _) => {
                let phase = self.phase_name();
                return Err(self.violation(now, Peer::Incumbent, unexpected(m.kind(), phase)));
            }
        }
        Ok(())
    }

    pub(super) fn on_successor_closed(&mut self, now: Instant, reason: AbortReason) {
        if let State::Handoff(h) = &self.state {
            let before_ack = match &h.stage {
                Stage::Spawning => true,
                Stage::Spawned { phase, .. } => *phase != Phase::CommittingIncumbent,
                Stage::Aborting(_) | Stage::Finishing { .. } => false,
            };
            if before_ack {
                self.abort(now, reason);
            }
        }
    }

    pub(super) fn on_incumbent_closed(&mut self, now: Instant, reason: AbortReason) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        if h.pre_seal() {
            return self.abort(now, reason);
        }
        match &mut h.stage {
            Stage::Aborting(a)
                if matches!(a.step, AbortStep::Notifying | AbortStep::Confirming) =>
            {
                a.step = AbortStep::RetryWait;
                self.timers
                    .set(T::Retry, now + self.cfg.timing.retry_interval);
            }
            // After Sealed the incumbent decides from the lock record; its exit or a
            // reconnect tells us the rest.
            _ => {}
        }
    }

    pub(super) fn on_deadline(&mut self, now: Instant) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        match &h.stage {
            // Never asked to drain: the incumbent serves whatever became of the successor.
            Stage::Aborting(Abort {
                reason,
                touched: false,
                ..
            }) => {
                let v = Verdict::RolledBack {
                    incumbent: h.incumbent,
                    reason: reason.clone(),
                    drained: false,
                };
                self.finish(v);
            }
            Stage::Aborting(a) => {
                let reason = a.reason.clone();
                self.finish(Verdict::IncumbentLost { reason });
            }
            // Committing, but the successor has not acknowledged by the deadline plus slack:
            // stop waiting. `abort` kills it and waits for its exit before the incumbent takes
            // the lock back, so this is safe even if it did commit.
            Stage::Spawned {
                phase: Phase::CommittingSuccessor,
                ..
            } => {
                let hard = h.deadline + self.cfg.timing.slack;
                if now >= hard {
                    self.abort(now, AbortReason::DeadlineExceeded);
                } else {
                    self.timers.set(T::Deadline, hard);
                }
            }
            // The successor serves; the old incumbent neither acknowledged nor exited by the
            // deadline plus slack: kill it (it no longer holds the lock).
            Stage::Spawned {
                successor,
                phase: Phase::CommittingIncumbent,
            } => {
                let successor = successor.pid;
                let hard = h.deadline + self.cfg.timing.slack;
                if now >= hard {
                    let pid = h.incumbent;
                    self.out.push_back(SupervisorOutput::Kill { pid });
                    self.finish(Verdict::Committed { successor });
                } else {
                    self.timers.set(T::Deadline, hard);
                }
            }
            Stage::Finishing { .. } => {}
            _ => self.abort(now, AbortReason::DeadlineExceeded),
        }
    }

    /// Abandon the handoff: stop the successor, wait until it is gone (so its lock is free),
    /// then have the incumbent take the lock back and confirm it serves.
    pub(super) fn abort(&mut self, now: Instant, reason: AbortReason) {
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        // Once the successor acknowledged Commit it serves: nothing aborts the handoff any
        // more (a successor that misbehaves or dies after that is a daemon crash, which
        // recovery handles once the handoff is over).
        if h.committed() || matches!(h.stage, Stage::Aborting(_)) {
            return;
        }
        let touched = !matches!(
            h.stage,
            Stage::Spawning
                | Stage::Spawned {
                    phase: Phase::JournalInFlight
                        | Phase::Greeting
                        | Phase::PassingListeners
                        | Phase::Connecting
                        | Phase::GreetingIncumbent,
                    ..
                }
        );
        let successor = h.successor();
        h.stage = Stage::Aborting(Abort {
            reason: reason.clone(),
            touched,
            step: AbortStep::KillingSuccessor,
            successor,
        });
        let hard = h.deadline.max(now) + self.cfg.timing.slack;
        self.timers.set(T::Deadline, hard);
        let handoff = h.id;
        if !touched {
            // The incumbent was never asked to do anything: end that session now.
            self.drop_chan(Peer::Incumbent);
        }
        if self.negotiated(Peer::Successor) {
            self.send(Peer::Successor, Message::Abort { handoff, reason });
        }
        self.drop_chan(Peer::Successor);
        match successor {
            Some(c) if c.alive => self.out.push_back(SupervisorOutput::Kill { pid: c.pid }),
            _ => self.after_successor_gone(),
        }
    }

    fn after_successor_gone(&mut self) {
        let negotiated = self.negotiated(Peer::Incumbent);
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        let Stage::Aborting(a) = &mut h.stage else {
            return;
        };
        let reason = a.reason.clone();
        if !h.incumbent_alive {
            return self.finish(Verdict::IncumbentLost { reason });
        }
        if !a.touched {
            let incumbent = h.incumbent;
            return self.finish(Verdict::RolledBack {
                incumbent,
                reason,
                drained: false,
            });
        }
        let handoff = h.id;
        if negotiated {
            a.step = AbortStep::Notifying;
            self.send(Peer::Incumbent, Message::Abort { handoff, reason });
        } else {
            a.step = AbortStep::Connecting;
            self.drop_chan(Peer::Incumbent);
            self.out.push_back(SupervisorOutput::Connect);
        }
    }

    /// Record the end in the journal; the outcome is reported once that is durable.
    fn finish(&mut self, verdict: Verdict) {
        self.drop_chan(Peer::Incumbent);
        // A committed successor's channel has served its purpose too.
        self.drop_chan(Peer::Successor);
        self.timers.stop(T::Heartbeat);
        self.timers.stop(T::Retry);
        let State::Handoff(h) = &mut self.state else {
            return;
        };
        let serving = match &verdict {
            Verdict::Committed { successor } => Some(*successor),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent),
            Verdict::IncumbentLost { .. } => None,
        };
        self.serving_build = match &verdict {
            Verdict::Committed { .. } => h.successor_build.clone(),
            Verdict::RolledBack { .. } => h
                .incumbent_build
                .clone()
                .or_else(|| self.serving_build.take()),
            Verdict::IncumbentLost { .. } => None,
        };
        let rec = JournalRecord::Idle {
            serving,
            last_handoff: h.id,
        };
        let successor = h.successor();
        h.stage = Stage::Finishing { verdict, successor };
        self.out.push_back(SupervisorOutput::WriteJournal(rec));
    }

    fn finish_written(&mut self, now: Instant, verdict: Verdict) {
        let State::Handoff(h) = &self.state else {
            return;
        };
        let times = h.times(now);
        let id = h.id;
        let successor_alive = h.successor().is_some_and(|c| c.alive);
        let incumbent_alive = h.incumbent_alive;
        let serving = match &verdict {
            Verdict::Committed { successor } => Some(*successor).filter(|_| successor_alive),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent).filter(|_| incumbent_alive),
            Verdict::IncumbentLost { .. } => None,
        };
        // Recovery watches whoever may still serve: a process that died right after the
        // verdict, or the incumbent nobody could confirm.
        let suspect = match &verdict {
            Verdict::Committed { successor } => Some(*successor).filter(|_| !successor_alive),
            Verdict::RolledBack { incumbent, .. } => Some(*incumbent).filter(|_| !incumbent_alive),
            Verdict::IncumbentLost { .. } => Some(h.incumbent).filter(|_| incumbent_alive),
        };
        self.timers = Timers::new();
        self.out.push_back(SupervisorOutput::Outcome(Outcome {
            handoff: id,
            verdict,
            times,
        }));
        match serving {
            Some(pid) => self.serve(now, pid),
            None => {
                let record = JournalRecord::Idle {
                    serving: suspect,
                    last_handoff: id,
                };
                self.enter_recovery(now, Some(record));
            }
        }
    }
}

fn remaining_ms(deadline: Instant, now: Instant) -> u64 {
    deadline.saturating_duration_since(now).as_millis() as u64
}
