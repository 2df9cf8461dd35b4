//! The recovery half of the supervisor: after its own restart, or once the serving daemon is
//! gone, find whoever serves through the control socket, let [`crate::journal::decide`] judge
//! what the journal and the answer say, take the listeners back, and start the daemon cold if
//! nobody serves.
//!
//! Attempts back off: each retry waits [`Backoff`], which doubles from
//! [`Timing::backoff_min`] to [`Timing::backoff_max`] and starts over once a daemon has served
//! for [`Timing::stable_after`]. A daemon that crashes at start is thus restarted less and
//! less often, and no driver has to withhold time to get that.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::types::{Peer, SupervisorOutput};
use super::{unexpected, State, Supervisor, T};
use crate::error::{Error, Misuse, PeerMisbehaved};
use crate::journal::{decide, Decision, JournalRecord, Observation, Resolution};
use crate::timer::Timers;
use crate::types::{HandoffId, Pid, Timing};
use crate::wire::{bounded_text, DaemonStatus, HelloAck, Message};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum RecStep {
    Connecting,
    Greeting,
    Reclaiming {
        pid: Pid,
        /// Listeners announced by the daemon so far.
        got: u32,
        /// Listeners the driver took and checked so far.
        taken: u32,
        resolution: Option<(HandoffId, Resolution)>,
    },
    RetryWait,
    ColdSpawning,
    Journaling {
        pid: Pid,
        resolution: Option<(HandoffId, Resolution)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Recovery {
    record: Option<JournalRecord>,
    alive: BTreeSet<Pid>,
    /// Pids reported exited while recovering: an answer from one of them is stale.
    exited: BTreeSet<Pid>,
    /// A daemon this recovery started cold, not yet serving. If another one turns out to serve
    /// (it was only slow to answer), this one is killed: it can never get the lock.
    cold_started: Option<Pid>,
    /// What the cold start concluded about the handoff the journal named, reported when the
    /// new daemon is adopted.
    resolution: Option<(HandoffId, Resolution)>,
    wait_until: Instant,
    step: RecStep,
    /// The last daemon that answered, with the build id it reported.
    answered: Option<(Pid, String)>,
}

impl Recovery {
    pub(super) fn new(record: Option<JournalRecord>, wait_until: Instant) -> Self {
        let alive = record
            .as_ref()
            .map(JournalRecord::pids)
            .unwrap_or_default()
            .into_iter()
            .collect();
        Self {
            record,
            alive,
            exited: BTreeSet::new(),
            cold_started: None,
            resolution: None,
            wait_until,
            step: RecStep::Connecting,
            answered: None,
        }
    }

    pub(super) fn cold_spawning(&self) -> bool {
        self.step == RecStep::ColdSpawning
    }

    pub(super) fn connecting(&self) -> bool {
        self.step == RecStep::Connecting
    }

    pub(super) fn greeting(&self) -> bool {
        self.step == RecStep::Greeting
    }

    /// A `Connect` this recovery asked for succeeded; whether it was asked for.
    pub(super) fn connected(&mut self) -> bool {
        let asked = self.connecting();
        if asked {
            self.step = RecStep::Greeting;
        }
        asked
    }

    /// The retry timer fired; whether to connect again.
    pub(super) fn retry_due(&mut self) -> bool {
        let due = self.step == RecStep::RetryWait;
        if due {
            self.step = RecStep::Connecting;
        }
        due
    }
}

/// The crash backoff: how long the next recovery attempt or cold start waits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Backoff {
    next: Duration,
    /// When the daemon serving now will have served for [`Timing::stable_after`]; set only
    /// while `next` is above the minimum (there is nothing to reset otherwise).
    reset_at: Option<Instant>,
}

impl Backoff {
    pub(super) fn new(t: &Timing) -> Self {
        Self {
            next: t.backoff_min,
            reset_at: None,
        }
    }

    /// The wait before the next attempt (never shorter than the retry interval); the one after
    /// waits twice as long, up to the maximum.
    fn take(&mut self, t: &Timing) -> Duration {
        let wait = self.next.max(t.retry_interval);
        self.next = self.next.saturating_mul(2).min(t.backoff_max);
        wait
    }

    /// A daemon serves from `now`.
    fn serving(&mut self, now: Instant, t: &Timing) {
        self.reset_at = (self.next > t.backoff_min).then(|| now + t.stable_after);
    }

    /// The serving daemon is gone at `now`: if it had served long enough, start over.
    fn lost(&mut self, now: Instant, t: &Timing) {
        if self.reset_at.take().is_some_and(|at| now >= at) {
            self.next = t.backoff_min;
        }
    }

    /// The wait the next attempt would get.
    pub(super) fn peek(&self, t: &Timing) -> Duration {
        self.next.max(t.retry_interval)
    }
}

impl Supervisor {
    /// The wait before the next recovery attempt or cold start, were one to fail now: the
    /// crash backoff (see [`Timing::backoff_min`]). For logs and status.
    pub fn next_backoff(&self) -> Duration {
        self.backoff.peek(&self.cfg.timing)
    }

    /// The driver took and checked the `count` listener descriptors of a
    /// [`SupervisorOutput::TakeListeners`]. When every configured listener is back, recovery
    /// acknowledges them and adopts the daemon that returned them.
    pub fn handle_listeners_taken(&mut self, _now: Instant, count: u32) {
        let want = self.cfg.listeners.len() as u32;
        let State::Recovering(r) = &mut self.state else {
            return;
        };
        let RecStep::Reclaiming {
            pid,
            got,
            taken,
            resolution,
        } = &mut r.step
        else {
            return;
        };
        *taken += count;
        if *taken < want || *taken > *got {
            return;
        }
        let (pid, resolution, count) = (*pid, *resolution, *taken);
        self.send(Peer::Incumbent, Message::ListenersAck { count });
        self.holds_listeners = true;
        self.adopt(pid, resolution);
    }

    /// Listener descriptors taken back during recovery did not match their announcement.
    pub fn handle_listener_error(&mut self, now: Instant, reason: String) {
        if let State::Recovering(r) = &mut self.state {
            if matches!(r.step, RecStep::Reclaiming { .. }) {
                let reason = bounded_text(reason);
                self.send(Peer::Incumbent, Message::Refused { reason });
                self.drop_chan(Peer::Incumbent);
                self.retry_recovery(now);
            }
        }
    }

    // ---- inputs, recovery half ----

    pub(super) fn cold_spawned(&mut self, now: Instant, pid: Pid) {
        let State::Recovering(r) = &mut self.state else {
            return;
        };
        r.alive.insert(pid);
        r.cold_started = Some(pid);
        r.record = Some(JournalRecord::Idle {
            serving: Some(pid),
            last_handoff: self.last_handoff,
        });
        r.wait_until = now + self.cfg.timing.recovery_wait;
        // It takes the lock and binds the control socket; ask again after the backoff.
        self.retry_recovery(now);
    }

    pub(super) fn recovering_exited(&mut self, now: Instant, pid: Pid) {
        let State::Recovering(r) = &mut self.state else {
            return;
        };
        r.alive.remove(&pid);
        r.exited.insert(pid);
        // The daemon handing the listeners back died: whatever it still sent is stale, and
        // adopting it would name a dead process as serving. Start over, as when its
        // connection ends first.
        if matches!(r.step, RecStep::Reclaiming { pid: p, .. } if p == pid) {
            self.retry_recovery(now);
        }
    }

    pub(super) fn recovery_journal_written(&mut self, now: Instant) -> Result<(), Misuse> {
        let State::Recovering(r) = &self.state else {
            return Err(self.no_journal_pending());
        };
        let RecStep::Journaling { pid, resolution } = r.step else {
            return Err(self.no_journal_pending());
        };
        self.serve(now, pid);
        self.timers = Timers::new();
        self.out.push_back(SupervisorOutput::Recovered {
            serving: pid,
            resolution,
        });
        Ok(())
    }

    pub(super) fn recovery_hello_ack(&mut self, now: Instant, ack: HelloAck) {
        if let State::Recovering(r) = &mut self.state {
            r.answered = Some((ack.pid, ack.build_id));
        }
        self.observe(now, Some((ack.pid, ack.status)));
    }

    pub(super) fn on_recovery_message(&mut self, now: Instant, m: Message) -> Result<(), Error> {
        let want = self.cfg.listeners.len() as u32;
        let State::Recovering(r) = &mut self.state else {
            return Ok(());
        };
        match (m, &mut r.step) {
            (Message::Listeners { batch }, RecStep::Reclaiming { got, .. }) => {
                *got += batch.len() as u32;
                let got = *got;
                if got > want {
                    let e = PeerMisbehaved::ListenerCount(format!(
                        "{got} listeners returned, {want} configured"
                    ));
                    return Err(self.violation(now, Peer::Incumbent, e));
                }
                // Adopted in `handle_listeners_taken`, once the driver has the descriptors
                // and found them to be the configured listeners.
                self.out
                    .push_back(SupervisorOutput::TakeListeners { batch });
                Ok(())
            }
            (m, _) => Err(self.violation(now, Peer::Incumbent, unexpected(m.kind(), "recovering"))),
        }
    }

    pub(super) fn on_recovery_closed(&mut self, now: Instant) {
        if let State::Recovering(r) = &self.state {
            if matches!(r.step, RecStep::Greeting | RecStep::Reclaiming { .. }) {
                self.retry_recovery(now);
            }
        }
    }

    // ---- internals ----

    /// A daemon serves, confirmed: idle from `now`.
    pub(super) fn serve(&mut self, now: Instant, pid: Pid) {
        self.state = State::Idle { serving: pid };
        self.backoff.serving(now, &self.cfg.timing);
    }

    pub(super) fn enter_recovery(&mut self, now: Instant, record: Option<JournalRecord>) {
        self.backoff.lost(now, &self.cfg.timing);
        let pids = record.as_ref().map(JournalRecord::pids).unwrap_or_default();
        for &pid in &pids {
            self.out.push_back(SupervisorOutput::Watch { pid });
        }
        let recovery = Recovery::new(record, now + self.cfg.timing.recovery_wait);
        self.drop_chan(Peer::Incumbent);
        self.drop_chan(Peer::Successor);
        self.timers = Timers::new();
        self.state = State::Recovering(recovery);
        self.out.push_back(SupervisorOutput::Connect);
    }

    pub(super) fn observe(&mut self, now: Instant, answer: Option<(Pid, DaemonStatus)>) {
        let State::Recovering(r) = &self.state else {
            return;
        };
        let obs = Observation {
            alive: r.alive.iter().copied().collect(),
            answer: answer.filter(|(pid, _)| !r.exited.contains(pid)),
            waited_out: now >= r.wait_until,
        };
        match decide(r.record.as_ref(), &obs) {
            Decision::Adopt { pid, resolution } => {
                let mut resolution = resolution;
                if let State::Recovering(r) = &mut self.state {
                    resolution = resolution.or(r.resolution.take());
                    if let Some(cold) = r.cold_started.take().filter(|c| *c != pid) {
                        self.out.push_back(SupervisorOutput::Kill { pid: cold });
                    }
                    if r.alive.insert(pid) {
                        self.out.push_back(SupervisorOutput::Watch { pid });
                    }
                }
                if self.holds_listeners {
                    self.adopt(pid, resolution);
                } else {
                    if let State::Recovering(r) = &mut self.state {
                        r.step = RecStep::Reclaiming {
                            pid,
                            got: 0,
                            taken: 0,
                            resolution,
                        };
                    }
                    self.send(Peer::Incumbent, Message::ReturnListeners);
                }
            }
            Decision::Wait => self.retry_recovery(now),
            Decision::ColdStart { kill, resolution } => {
                for k in kill {
                    self.out.push_back(SupervisorOutput::Kill { pid: k });
                }
                self.drop_chan(Peer::Incumbent);
                if let State::Recovering(r) = &mut self.state {
                    r.step = RecStep::ColdSpawning;
                    r.resolution = r.resolution.or(resolution);
                }
                self.out.push_back(SupervisorOutput::SpawnColdStart);
                // A cold start brings listeners with it (the driver binds them if we had none).
                self.holds_listeners = true;
            }
        }
    }

    /// Try again after the backoff.
    pub(super) fn retry_recovery(&mut self, now: Instant) {
        self.drop_chan(Peer::Incumbent);
        if let State::Recovering(r) = &mut self.state {
            r.step = RecStep::RetryWait;
            let wait = self.backoff.take(&self.cfg.timing);
            self.timers.set(T::Retry, now + wait);
        }
    }

    fn adopt(&mut self, pid: Pid, resolution: Option<(HandoffId, Resolution)>) {
        self.drop_chan(Peer::Incumbent);
        if let State::Recovering(r) = &mut self.state {
            self.serving_build = match &r.answered {
                Some((p, build)) if *p == pid => Some(build.clone()),
                _ => None,
            };
            r.step = RecStep::Journaling { pid, resolution };
            let rec = JournalRecord::Idle {
                serving: Some(pid),
                last_handoff: self.last_handoff,
            };
            self.out.push_back(SupervisorOutput::WriteJournal(rec));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::SupervisorConfig;
    use crate::wire::{PeerRole, SUPPORTED_VERSIONS};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn machine(now: Instant) -> Supervisor {
        let timing = Timing {
            retry_interval: ms(50),
            backoff_min: ms(100),
            backoff_max: ms(400),
            stable_after: ms(1000),
            ..Timing::default()
        };
        let cfg = SupervisorConfig {
            pid: 1,
            build_id: "sup".into(),
            versions: SUPPORTED_VERSIONS,
            timing,
            listeners: Vec::new(),
        };
        Supervisor::recover(cfg, now, None, true)
    }

    fn drain(m: &mut Supervisor) -> Vec<SupervisorOutput> {
        std::iter::from_fn(|| m.poll_output()).collect()
    }

    /// Nobody answers the `Connect` asked for: a cold start of `pid` at `now`; the wait until
    /// the machine asks again.
    fn cold_start(m: &mut Supervisor, now: Instant, pid: Pid) -> Duration {
        drain(m);
        m.handle_connect_failed(now, "refused".into()).unwrap();
        let out = drain(m);
        assert!(
            out.contains(&SupervisorOutput::SpawnColdStart),
            "{out:?} {pid}"
        );
        m.handle_spawned(now, pid).unwrap();
        m.poll_timeout().unwrap() - now
    }

    /// `pid` answers the `Connect` asked for, serving, and is adopted.
    fn adopt(m: &mut Supervisor, now: Instant, pid: Pid) {
        m.handle_connected(now, pid).unwrap();
        let ack = HelloAck {
            role: PeerRole::Incumbent,
            version: SUPPORTED_VERSIONS.max,
            pid,
            build_id: "d".into(),
            status: DaemonStatus::Serving,
        };
        m.handle_message(now, Peer::Incumbent, Message::HelloAck(ack))
            .unwrap();
        m.handle_journal_written(now).unwrap();
    }

    #[test]
    fn cold_starts_back_off_doubling_to_the_maximum_and_reset_once_stable() {
        let mut now = Instant::now();
        let mut m = machine(now);
        let mut waits = Vec::new();
        // The daemon dies at once, every time.
        for pid in 10..15 {
            let wait = cold_start(&mut m, now, pid);
            waits.push(wait);
            m.handle_exited(now, pid);
            now += wait;
            m.handle_timeout(now);
        }
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(400), ms(400)]);
        assert_eq!(m.next_backoff(), ms(400));

        // The next one comes up and serves...
        let wait = cold_start(&mut m, now, 20);
        now += wait;
        m.handle_timeout(now);
        assert!(drain(&mut m).contains(&SupervisorOutput::Connect));
        adopt(&mut m, now, 20);
        assert_eq!(m.incumbent(), Some(20));
        drain(&mut m);
        // ... but dies before it is stable: the backoff goes on where it was.
        now += ms(999);
        m.handle_exited(now, 20);
        // Recovery watches it again; the driver reports it gone at once.
        assert!(drain(&mut m).contains(&SupervisorOutput::Watch { pid: 20 }));
        m.handle_exited(now, 20);
        assert_eq!(cold_start(&mut m, now, 21), ms(400));
        m.handle_exited(now, 21);

        // One that served for `stable_after` starts the backoff over.
        let mut m = machine(now);
        for pid in 30..33 {
            let wait = cold_start(&mut m, now, pid);
            m.handle_exited(now, pid);
            now += wait;
            m.handle_timeout(now);
        }
        let wait = cold_start(&mut m, now, 40);
        assert_eq!(wait, ms(400));
        now += wait;
        m.handle_timeout(now);
        drain(&mut m);
        adopt(&mut m, now, 40);
        drain(&mut m);
        now += ms(1000);
        m.handle_exited(now, 40);
        assert!(drain(&mut m).contains(&SupervisorOutput::Watch { pid: 40 }));
        m.handle_exited(now, 40);
        assert_eq!(cold_start(&mut m, now, 41), ms(100));
    }

    #[test]
    fn the_backoff_never_retries_faster_than_the_retry_interval() {
        let t = Timing {
            retry_interval: ms(50),
            backoff_min: Duration::ZERO,
            backoff_max: Duration::ZERO,
            ..Timing::default()
        };
        let mut b = Backoff::new(&t);
        assert_eq!([b.take(&t), b.take(&t)], [ms(50), ms(50)]);
    }
}
