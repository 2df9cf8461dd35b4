//! Exhaustive model check of the three role machines composed with a model of the world
//! (`world/mod.rs`): two consecutive handoffs, the first with a good successor, the second with
//! a build that fails when it opens the data, every interleaving of message deliveries, driver
//! events and timer firings, a crash of any one party at any step (including part-way through
//! performing a step's outputs), and a restart of the supervisor from its journal.
//!
//! Invariants I1–I6 (ARCHITECTURE.md) are checked in every state; `sometimes` properties make
//! sure the commit path, the rollback path and a journal recovery are all reached, so nothing
//! passes vacuously. The number of distinct states is pinned.

mod world;

use std::time::{Duration, Instant};

use handoff_proto::supervisor::HandoffSpec;
use handoff_proto::Timing;
use stateright::{Checker, Model, Property};
use world::{Action, Bug, Build, Config, VerdictKind, World};

struct HandoffModel {
    cfg: Config,
}

impl Model for HandoffModel {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        vec![World::new(&self.cfg)]
    }

    fn actions(&self, state: &World, actions: &mut Vec<Action>) {
        if state.safety().is_err() {
            return; // no need to explore past a violation
        }
        state.actions(&self.cfg, actions);
    }

    fn next_state(&self, state: &World, action: Action) -> Option<World> {
        state.step(&self.cfg, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "I1-I3: one writer, lock before data, release after seal",
                |_, s: &World| s.safety().is_ok(),
            ),
            Property::always(
                "I4: listeners always held while the supervisor lives",
                |_, s: &World| s.listeners_held(),
            ),
            Property::always(
                "I5/I6: settles with exactly one serving process",
                |m: &HandoffModel, s: &World| s.settled_correctly(&m.cfg).is_ok(),
            ),
            Property::always(
                "I5: a handoff ends within deadline + 2 slack",
                |m: &HandoffModel, s: &World| s.within_deadline(&m.cfg),
            ),
            Property::sometimes("commit reached", |_, s: &World| {
                s.outcomes.iter().any(|(_, k)| *k == VerdictKind::Committed)
            }),
            Property::sometimes("rollback after drain reached", |_, s: &World| {
                s.outcomes
                    .iter()
                    .any(|(_, k)| *k == VerdictKind::RolledBackDrained)
            }),
            Property::sometimes("commit then rollback, no crash", |_, s: &World| {
                s.crashes_left > 0
                    && s.outcomes.iter().map(|(_, k)| *k).collect::<Vec<_>>()
                        == [VerdictKind::Committed, VerdictKind::RolledBackDrained]
            }),
            Property::sometimes(
                "supervisor restart recovered from the journal",
                |_, s: &World| s.restarted && s.recovered,
            ),
        ]
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config(builds: Vec<Build>, crashes: u8, bug: Option<Bug>) -> Config {
    Config {
        // Heartbeats and silence limits lie beyond every deadline: in the model a peer's death
        // closes its channels, which is what a silence limit stands in for on a real host;
        // the silence path itself is the same transition and is covered by unit tests.
        timing: Timing {
            heartbeat_interval: ms(1000),
            peer_silence: ms(2000),
            slack: ms(4),
            retry_interval: ms(4),
        },
        spec: HandoffSpec {
            drain_grace: ms(5),
            deadline: ms(10),
        },
        recovery_wait: ms(8),
        builds,
        crashes,
        bug,
    }
}

fn check(cfg: Config) -> (impl Checker<HandoffModel>, Duration) {
    let started = Instant::now();
    let checker = HandoffModel { cfg }.checker().threads(2).spawn_bfs().join();
    (checker, started.elapsed())
}

fn report(name: &str, c: &impl Checker<HandoffModel>, took: Duration) {
    println!(
        "{name}: {} distinct states, {} generated, max depth {}, {:.1} s",
        c.unique_state_count(),
        c.state_count(),
        c.max_depth(),
        took.as_secs_f64()
    );
}

fn assert_holds(c: &impl Checker<HandoffModel>) {
    for name in [
        "I1-I3: one writer, lock before data, release after seal",
        "I4: listeners always held while the supervisor lives",
        "I5/I6: settles with exactly one serving process",
        "I5: a handoff ends within deadline + 2 slack",
    ] {
        if let Some(path) = c.discovery(name) {
            let last = path.last_state().clone();
            let mut trace = String::new();
            for (state, action) in path.into_vec() {
                trace += &format!("  {}\n", state.summary());
                if let Some(a) = action {
                    trace += &format!("-- {a:?}\n");
                }
            }
            panic!(
                "{name} violated: {:?} / {:?}\n{trace}",
                last.safety(),
                last.settled_correctly(&c.model().cfg),
            );
        }
    }
}

#[test]
fn two_handoffs_commit_then_rollback_with_every_crash_and_a_restart() {
    let (c, took) = check(config(vec![Build::Good, Build::FailsOnOpen], 1, None));
    report("full model", &c, took);
    assert_holds(&c);
    for name in [
        "commit reached",
        "rollback after drain reached",
        "commit then rollback, no crash",
        "supervisor restart recovered from the journal",
    ] {
        assert!(c.discovery(name).is_some(), "never reached: {name}");
    }
}

#[test]
fn checker_catches_lock_released_before_seal() {
    let (c, took) = check(config(vec![Build::Good], 0, Some(Bug::ReleaseBeforeSeal)));
    report("broken: release before seal", &c, took);
    let path = c
        .discovery("I1-I3: one writer, lock before data, release after seal")
        .expect("the checker must catch the early release");
    let why = path.last_state().safety().unwrap_err();
    assert!(why.starts_with("I2"), "{why}");
    println!("caught: {why} after {} steps", path.into_actions().len());
}

#[test]
fn checker_catches_successor_that_skips_the_lock() {
    let (c, took) = check(config(vec![Build::Good], 1, Some(Bug::SuccessorSkipsLock)));
    report("broken: successor skips the lock", &c, took);
    let path = c
        .discovery("I1-I3: one writer, lock before data, release after seal")
        .expect("the checker must catch two writers");
    let why = path.last_state().safety().unwrap_err();
    println!("caught: {why} after {} steps", path.into_actions().len());
}

#[test]
#[ignore = "exploration aid: prints state counts by depth"]
fn explore_growth() {
    let crashes: u8 = std::env::var("CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let n: usize = std::env::var("BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let builds = [Build::Good, Build::FailsOnOpen][..n].to_vec();
    for depth in (10..=200).step_by(10) {
        let started = Instant::now();
        let c = HandoffModel {
            cfg: config(builds.clone(), crashes, None),
        }
        .checker()
        .threads(2)
        .target_max_depth(depth)
        .spawn_bfs()
        .join();
        println!(
            "depth {depth}: {} states, max depth {} in {:.1}s",
            c.unique_state_count(),
            c.max_depth(),
            started.elapsed().as_secs_f64()
        );
        if c.max_depth() < depth {
            break;
        }
    }
}

#[test]
#[ignore = "exploration aid: random walks, prints a long one"]
fn explore_walk() {
    let crashes: u8 = std::env::var("CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cfg = config(vec![Build::Good], crashes, None);
    let mut longest: Vec<(Action, String)> = Vec::new();
    let mut seed: u64 = 12345;
    for _ in 0..20000 {
        let mut w = World::new(&cfg);
        let mut path = Vec::new();
        for _ in 0..200 {
            let mut acts = Vec::new();
            w.actions(&cfg, &mut acts);
            if acts.is_empty() {
                break;
            }
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = acts[(seed >> 33) as usize % acts.len()].clone();
            match w.step(&cfg, a.clone()) {
                Some(n) => {
                    path.push((
                        a,
                        format!(
                            "now={} sup={:?} procs={:?}",
                            n.now,
                            n.sup.as_ref().map(|s| s.m.phase_name()),
                            n.procs
                                .iter()
                                .map(|p| (
                                    p.pid,
                                    p.alive,
                                    match &p.m {
                                        world::Machine::Incumbent(m) => m.phase_name(),
                                        world::Machine::Successor(m) => m.phase_name(),
                                    }
                                ))
                                .collect::<Vec<_>>()
                        ),
                    ));
                    w = n;
                }
                None => continue,
            }
        }
        if path.len() > longest.len() {
            longest = path;
        }
    }
    for (a, s) in &longest {
        println!("{a:?} -> {s}");
    }
}
