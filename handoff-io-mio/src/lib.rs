//! mio driver for the `handoff` roles: the incumbent, the successor and the supervisor,
//! embedded in an application's own `mio` event loop, with no extra thread and no blocking
//! call.
//!
//! Each driver wraps the role's engine from `handoff-engine` (the same machine, SCM_RIGHTS,
//! flock, fsync, peer-credential and pidfd code as the std driver), registers the engine's
//! descriptors with your [`Registry`] under tokens you choose ([`Tokens`]), and turns what
//! the application must do into events: a drain is an [`IncumbentEvent::Drain`] you complete
//! later with [`Incumbent::drained`], however long it takes, while the loop keeps serving.
//!
//! # The loop
//!
//! Follow str0m's rule: *drain until timeout*. After every input, take every event the
//! driver has before you wait again; the driver's timeout joins your own.
//!
//! ```no_run
//! # use std::time::Instant;
//! # fn demo(mut poll: mio::Poll, mut inc: handoff_io_mio::Incumbent) -> std::io::Result<()> {
//! use handoff_io_mio::IncumbentEvent;
//! let mut events = mio::Events::with_capacity(256);
//! loop {
//!     // 1. Wait for readiness or the driver's next timer.
//!     let timeout = inc.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
//!     poll.poll(&mut events, timeout)?;
//!     // 2. Feed the driver what is its own; serve your clients with the rest.
//!     for ev in events.iter() {
//!         if inc.owns(ev.token()) {
//!             inc.handle_event(ev)?;
//!         } else {
//!             // your sockets
//!         }
//!     }
//!     inc.handle_timeout()?;
//!     // 3. Drain the driver's events until there are none, and act on each.
//!     while let Some(ev) = inc.poll_event() {
//!         match ev {
//!             IncumbentEvent::Drain { deadline, .. } => { /* stop accepting; call inc.drained(..) when done */ }
//!             IncumbentEvent::Seal { .. } => { /* fsync, close the writer; inc.sealed(..) */ }
//!             IncumbentEvent::Resume { .. } => { /* reopen; inc.resumed(..) */ }
//!             IncumbentEvent::Retired { .. } => return Ok(()),
//!         }
//!     }
//! }
//! # }
//! ```
//!
//! A few calls touch the disk or the process table and take a short, bounded time
//! (milliseconds): the supervisor's journal write (`fsync`) and the successor's `fork`/`exec`;
//! taking the data-directory lock back, which writes and fsyncs the 48-byte lock record; and
//! binding the control socket when a successor becomes the incumbent. No call waits on a peer:
//! sockets are non-blocking, and what a peer does not read waits in an outbox.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Instant;

use std::os::unix::net::UnixStream;

use handoff_engine::error::{Error, Result};
use handoff_engine::{
    IncumbentEngine, IncumbentKey, Interest as EngineInterest, SuccessorEngine, SupervisorKey,
};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub use handoff_engine::error;
pub use handoff_engine::role::{detect_role, Role};
pub use handoff_engine::sys::proc::Proven;
pub use handoff_engine::{
    DataDirLock, IncumbentConfig, IncumbentEvent, InheritedListeners, Listener, ListenerSet,
    PeerPolicy, SpawnSpec, SuccessorEvent, SupervisorEngine, SupervisorEvent, EXIT_ABORTED,
};
pub use handoff_proto as proto;
pub use handoff_proto::{
    DrainReport, HandoffId, ListenerKind, ReadinessSnapshot, SealReport, StateSnapshot, Timing,
};

/// The tokens a driver may use: `start`, `start + 1`, …, `start + len - 1`. Give each driver
/// a range of its own, apart from your sockets' tokens. An incumbent needs one for its
/// control socket and one per control connection (64 at most); a successor one; a supervisor
/// two plus one per watched process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// The first token.
    pub start: usize,
    /// How many.
    pub len: usize,
}

/// The engine's descriptors as registered with the registry.
#[derive(Debug)]
struct Registration<K> {
    registry: Registry,
    tokens: Tokens,
    by_key: BTreeMap<K, (Token, RawFd, bool)>,
    by_token: BTreeMap<usize, K>,
}

impl<K: Ord + Copy> Registration<K> {
    fn new(registry: &Registry, tokens: Tokens) -> io::Result<Registration<K>> {
        Ok(Registration {
            registry: registry.try_clone()?,
            tokens,
            by_key: BTreeMap::new(),
            by_token: BTreeMap::new(),
        })
    }

    fn owns(&self, token: Token) -> bool {
        token.0 >= self.tokens.start && token.0 < self.tokens.start + self.tokens.len
    }

    fn key(&self, token: Token) -> Option<K> {
        self.by_token.get(&token.0).copied()
    }

    /// Make the registrations match the engine's interests: removals first (a closed
    /// descriptor's number may have been reused by a new one), then changes and additions.
    fn sync(&mut self, interests: &[EngineInterest<'_, K>]) -> io::Result<()> {
        let wanted: BTreeMap<K, (RawFd, bool)> = interests
            .iter()
            .map(|i| (i.key, (i.fd.as_raw_fd(), i.write)))
            .collect();
        let gone: Vec<K> = self
            .by_key
            .iter()
            .filter(|(k, (_, fd, _))| wanted.get(k).is_none_or(|(w, _)| w != fd))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some((token, fd, _)) = self.by_key.remove(&k) {
                // The descriptor may be closed already (epoll then forgot it): ignore errors.
                let _ = self.registry.deregister(&mut SourceFd(&fd));
                self.by_token.remove(&token.0);
            }
        }
        for (k, (fd, write)) in wanted {
            let interest = if write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            match self.by_key.get_mut(&k) {
                Some((token, _, w)) if *w != write => {
                    self.registry
                        .reregister(&mut SourceFd(&fd), *token, interest)?;
                    *w = write;
                }
                Some(_) => {}
                None => {
                    let token = self.free_token()?;
                    self.registry
                        .register(&mut SourceFd(&fd), token, interest)?;
                    self.by_key.insert(k, (token, fd, write));
                    self.by_token.insert(token.0, k);
                }
            }
        }
        Ok(())
    }

    fn free_token(&self) -> io::Result<Token> {
        (self.tokens.start..self.tokens.start + self.tokens.len)
            .find(|t| !self.by_token.contains_key(t))
            .map(Token)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "all {} tokens from {} are in use",
                    self.tokens.len, self.tokens.start
                ))
            })
    }

    fn deregister_all(&mut self) {
        for (_, (_, fd, _)) in std::mem::take(&mut self.by_key) {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        self.by_token.clear();
    }
}

impl<K> Drop for Registration<K> {
    /// Deregister whatever is still registered (the descriptors close with the engine).
    fn drop(&mut self) {
        for (_, (_, fd, _)) in std::mem::take(&mut self.by_key) {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
    }
}

fn readiness(ev: &mio::event::Event) -> (bool, bool) {
    (
        ev.is_readable() || ev.is_read_closed() || ev.is_error(),
        ev.is_writable() || ev.is_error(),
    )
}

/// The serving daemon's side, in your loop.
#[derive(Debug)]
pub struct Incumbent {
    engine: IncumbentEngine,
    reg: Registration<IncumbentKey>,
}

impl Incumbent {
    /// Drive `inc` (bound with [`IncumbentConfig::bind_cold_start`], or made by
    /// [`Successor::into_incumbent`]) in the loop of `registry`, under `tokens`.
    pub fn new(inc: IncumbentConfig, registry: &Registry, tokens: Tokens) -> io::Result<Incumbent> {
        let mut me = Incumbent {
            engine: IncumbentEngine::new(inc),
            reg: Registration::new(registry, tokens)?,
        };
        me.sync()?;
        Ok(me)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.reg.sync(&self.engine.interests())
    }

    /// Whether `token` is one of this driver's.
    pub fn owns(&self, token: Token) -> bool {
        self.reg.owns(token)
    }

    /// Whether the daemon serves normally (no handoff in progress).
    pub fn is_serving(&self) -> bool {
        self.engine.is_serving()
    }

    /// Feed an event whose token this driver [`owns`](Self::owns).
    pub fn handle_event(&mut self, ev: &mio::event::Event) -> io::Result<()> {
        if let Some(key) = self.reg.key(ev.token()) {
            let (r, w) = readiness(ev);
            self.engine.ready(Instant::now(), key, r, w);
        }
        self.sync()
    }

    /// When the driver needs [`handle_timeout`](Self::handle_timeout) at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.engine.poll_timeout()
    }

    /// Let time pass (call it every loop turn; it does nothing before its time).
    pub fn handle_timeout(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        self.sync()
    }

    /// The next thing the application must do.
    pub fn poll_event(&mut self) -> Option<IncumbentEvent> {
        self.engine.poll_event()
    }

    /// The drain finished (`Err`: why it failed; the handoff rolls back).
    pub fn drained(&mut self, result: std::result::Result<DrainReport, String>) -> io::Result<()> {
        self.engine.drained(Instant::now(), result);
        self.sync()
    }

    /// The seal finished. After `Ok`, write nothing: the lock is released.
    pub fn sealed(&mut self, result: std::result::Result<SealReport, String>) -> io::Result<()> {
        self.engine.sealed(Instant::now(), result);
        self.sync()
    }

    /// The resume finished, with the state snapshot.
    pub fn resumed(
        &mut self,
        result: std::result::Result<StateSnapshot, String>,
    ) -> io::Result<()> {
        self.engine.resumed(Instant::now(), result);
        self.sync()
    }
}

/// A process started as a successor, in your loop: it answers the supervisor, receives the
/// listeners, and reports [`SuccessorEvent`]s.
#[derive(Debug)]
pub struct Successor {
    engine: SuccessorEngine,
    reg: Registration<()>,
    timing: proto::Timing,
    /// The listeners received, once [`SuccessorEvent::Begun`] came and one was taken.
    listeners: Option<ListenerSet>,
}

impl Successor {
    /// Take over the successor channel `channel` (from [`detect_role`]'s
    /// [`Role::Successor`]), answer with `build_id`, and register it in the loop of `registry`
    /// under `token`.
    pub fn new(
        channel: UnixStream,
        build_id: impl Into<String>,
        timing: proto::Timing,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Successor> {
        let engine = SuccessorEngine::new(channel, build_id.into(), timing, Instant::now())?;
        let mut me = Successor {
            engine,
            timing,
            listeners: None,
            reg: Registration::new(
                registry,
                Tokens {
                    start: token.0,
                    len: 1,
                },
            )?,
        };
        me.sync()?;
        Ok(me)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.reg.sync(&self.engine.interests())
    }

    /// Whether `token` is this driver's.
    pub fn owns(&self, token: Token) -> bool {
        self.reg.owns(token)
    }

    /// Feed an event whose token this driver [`owns`](Self::owns).
    pub fn handle_event(&mut self, ev: &mio::event::Event) -> io::Result<()> {
        if self.reg.key(ev.token()).is_some() {
            let (r, w) = readiness(ev);
            self.engine.ready(Instant::now(), r, w);
        }
        self.sync()
    }

    /// When the driver needs [`handle_timeout`](Self::handle_timeout) at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.engine.poll_timeout()
    }

    /// Let time pass.
    pub fn handle_timeout(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
        self.sync()
    }

    /// The next event. On [`SuccessorEvent::Aborted`], exit without touching the data.
    pub fn poll_event(&mut self) -> Option<SuccessorEvent> {
        self.engine.poll_event()
    }

    /// The names of the listeners received.
    pub fn listener_names(&self) -> Vec<String> {
        self.engine.listener_names()
    }

    /// After [`SuccessorEvent::Begun`]: the listener `name`, of the type asked for
    /// ([`ListenerSet::take`]; `None`: none by that name, another kind, or not begun), in
    /// blocking mode (set non-blocking yourself before registering it with mio).
    pub fn take<L: Listener>(&mut self, name: &str) -> Option<L> {
        if self.listeners.is_none() {
            self.listeners = self.engine.listeners();
        }
        self.listeners.as_mut()?.take(name)
    }

    /// The data is open with `lock` held: declare ready.
    pub fn ready(&mut self, readiness: ReadinessSnapshot, lock: DataDirLock) -> Result<()> {
        self.engine.ready_with(Instant::now(), readiness, lock)?;
        self.sync().map_err(Error::from)
    }

    /// After [`SuccessorEvent::Committed`]: become the incumbent, bound at `socket_path`,
    /// driven in the same loop under `tokens`, with this successor's timings.
    pub fn into_incumbent(
        self,
        socket_path: &Path,
        registry: &Registry,
        tokens: Tokens,
    ) -> Result<Incumbent> {
        let inc = self.into_incumbent_config(socket_path)?;
        Ok(Incumbent::new(inc, registry, tokens)?)
    }

    /// After [`SuccessorEvent::Committed`]: the incumbent's endpoint, bound at `socket_path`
    /// with this successor's timings and build id, to configure further (`with_peer_policy`,
    /// `with_build_id`) before [`Incumbent::new`].
    pub fn into_incumbent_config(mut self, socket_path: &Path) -> Result<IncumbentConfig> {
        self.reg.deregister_all();
        let timing = self.timing;
        let build = self.engine.build_id().to_string();
        let (lock, listeners) = self
            .engine
            .into_parts()
            .ok_or_else(|| Error::Protocol("not committed".into()))?;
        Ok(IncumbentConfig::from_parts(socket_path, lock, listeners)?
            .with_timing(timing)
            .with_build_id(build))
    }
}

/// The supervisor, in your loop.
#[derive(Debug)]
pub struct Supervisor {
    engine: SupervisorEngine,
    reg: Registration<SupervisorKey>,
}

impl Supervisor {
    /// Drive `engine` (configured with its `with_*` methods) in the loop of `registry`.
    pub fn new(
        engine: SupervisorEngine,
        registry: &Registry,
        tokens: Tokens,
    ) -> io::Result<Supervisor> {
        Ok(Supervisor {
            engine,
            reg: Registration::new(registry, tokens)?,
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.reg.sync(&self.engine.interests())
    }

    /// Whether `token` is one of this driver's.
    pub fn owns(&self, token: Token) -> bool {
        self.reg.owns(token)
    }

    /// Start a recovery: [`SupervisorEvent::Recovered`] or `Failed` follows.
    pub fn start_recovery(&mut self) -> Result<()> {
        self.engine.start_recovery(Instant::now())?;
        self.sync().map_err(Error::from)
    }

    /// Whether a recovery must run before a handoff.
    pub fn needs_recovery(&self) -> bool {
        self.engine.needs_recovery()
    }

    /// Start a handoff: [`SupervisorEvent::Outcome`] follows. `Busy` while one runs.
    pub fn trigger(&mut self, spec: SpawnSpec) -> Result<HandoffId> {
        let id = self.engine.trigger(Instant::now(), spec)?;
        self.sync()?;
        Ok(id)
    }

    /// The serving daemon, when known.
    pub fn serving(&self) -> Option<proto::Pid> {
        self.engine.serving()
    }

    /// The build id the serving daemon reported, when known.
    pub fn serving_build(&self) -> Option<&str> {
        self.engine.serving_build()
    }

    /// The serving daemon as a proven process: see [`SupervisorEngine::serving_process`].
    pub fn serving_process(&self) -> Option<Proven> {
        self.engine.serving_process()
    }

    /// Journal that the daemon was stopped: see [`SupervisorEngine::journal_stopped`].
    pub fn journal_stopped(&mut self) -> Result<()> {
        self.engine.journal_stopped()
    }

    /// Feed an event whose token this driver [`owns`](Self::owns).
    pub fn handle_event(&mut self, ev: &mio::event::Event) -> io::Result<()> {
        if let Some(key) = self.reg.key(ev.token()) {
            let (r, w) = readiness(ev);
            self.engine.ready(Instant::now(), key, r, w);
        }
        self.sync()
    }

    /// When the driver needs [`handle_timeout`](Self::handle_timeout) at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.engine.poll_timeout()
    }

    /// Let time pass.
    pub fn handle_timeout(&mut self) -> io::Result<()> {
        self.engine.handle_timeout(Instant::now());
        self.sync()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SupervisorEvent> {
        self.engine.poll_event()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn interest(key: u8, s: &UnixStream, write: bool) -> EngineInterest<'_, u8> {
        EngineInterest {
            key,
            fd: s.as_fd(),
            read: true,
            write,
        }
    }

    /// The tokens that report readable within a second.
    fn ready(poll: &mut mio::Poll, reg: &Registration<u8>) -> Vec<u8> {
        let mut events = mio::Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .expect("poll");
        let mut keys: Vec<u8> = events
            .iter()
            .filter(|e| e.is_readable())
            .filter_map(|e| reg.key(e.token()))
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn registrations_follow_the_engine_even_when_a_descriptor_number_is_reused() {
        let mut poll = mio::Poll::new().expect("poll");
        let tokens = Tokens { start: 10, len: 2 };
        let mut reg = Registration::new(poll.registry(), tokens).expect("registration");
        let (a, mut a_peer) = UnixStream::pair().expect("pair");
        let (b, mut b_peer) = UnixStream::pair().expect("pair");
        reg.sync(&[interest(1, &a, false), interest(2, &b, false)])
            .expect("sync");
        assert!(reg.owns(Token(10)) && reg.owns(Token(11)) && !reg.owns(Token(12)));
        a_peer.write_all(b"x").expect("write");
        assert_eq!(ready(&mut poll, &reg), vec![1]);

        // Key 1 goes away and its descriptor closes; a new key 3 most likely gets the same
        // number. One sync must leave key 3 registered, under key 1's freed token.
        let old_raw = a.as_raw_fd();
        drop(a);
        let (c, mut c_peer) = UnixStream::pair().expect("pair");
        reg.sync(&[interest(2, &b, false), interest(3, &c, false)])
            .expect("sync");
        eprintln!("old fd {old_raw}, new fd {}", c.as_raw_fd());
        c_peer.write_all(b"y").expect("write");
        b_peer.write_all(b"z").expect("write");
        assert_eq!(ready(&mut poll, &reg), vec![2, 3]);

        // The range is full (2 tokens): a third key is an error, not a silent miss.
        let (d, _d_peer) = UnixStream::pair().expect("pair");
        let err = reg
            .sync(&[
                interest(2, &b, false),
                interest(3, &c, false),
                interest(4, &d, false),
            ])
            .expect_err("only two tokens");
        assert!(err.to_string().contains("tokens"), "{err}");
    }

    #[test]
    fn write_interest_is_added_and_removed() {
        let mut poll = mio::Poll::new().expect("poll");
        let mut reg =
            Registration::new(poll.registry(), Tokens { start: 0, len: 1 }).expect("registration");
        let (a, _peer) = UnixStream::pair().expect("pair");
        reg.sync(&[interest(1, &a, true)]).expect("sync");
        let mut events = mio::Events::with_capacity(8);
        poll.poll(&mut events, Some(Duration::from_secs(1)))
            .expect("poll");
        assert!(events
            .iter()
            .any(|e| e.is_writable() && reg.key(e.token()) == Some(1)));
        reg.sync(&[interest(1, &a, false)]).expect("sync");
        poll.poll(&mut events, Some(Duration::from_millis(50)))
            .expect("poll");
        assert!(
            !events.iter().any(|e| e.is_writable()),
            "write interest was not removed"
        );
    }
}
