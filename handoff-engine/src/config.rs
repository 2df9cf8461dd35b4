//! The serving daemon's configuration: what [`IncumbentEngine::new`](crate::IncumbentEngine::new)
//! takes. The blocking driver's `Incumbent` and the mio driver's incumbent both wrap one.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use handoff_proto::{ListenerKind, Timing};

use crate::error::{Context, Error, Result};
use crate::held::{self, Held};
use crate::log::log;
use crate::sys::lock::DataDirLock;
use crate::sys::peercred::{bind_unix_listener_0600, PeerPolicy};
use crate::sys::supervisor_lock::{Admission, LockId, ENV_SUPERVISOR_LOCK};

const ROLE: &str = "incumbent";

/// The serving daemon's handoff endpoint: its control socket, its data-directory lock and the
/// listeners it serves on. Made by [`IncumbentConfig::bind_cold_start`] or, for a successor
/// that ran its engine to the commit, by [`IncumbentConfig::from_parts`]; driven by an
/// [`IncumbentEngine`](crate::IncumbentEngine).
#[derive(Debug)]
pub struct IncumbentConfig {
    pub(crate) control: UnixListener,
    pub(crate) socket_path: PathBuf,
    pub(crate) lock: Option<DataDirLock>,
    pub(crate) lock_dir: PathBuf,
    pub(crate) listeners: Vec<Held>,
    pub(crate) build_id: String,
    pub(crate) timing: Timing,
    pub(crate) policy: PeerPolicy,
    /// The supervisor lock whose holder alone may talk on the control socket; `None`: any
    /// peer the policy admits.
    pub(crate) supervisor: Option<Admission>,
    pub(crate) exit_on_retire: bool,
}

impl IncumbentConfig {
    /// A daemon that started cold and holds the data-directory lock: bind the control socket
    /// at `socket_path` (mode 0600, replacing atomically whatever socket was there) and keep
    /// the lock. The listeners [`detect_role`](crate::role::detect_role) inherited are kept for a
    /// restarted supervisor; add the ones the daemon bound itself with
    /// [`with_listener`](Self::with_listener).
    ///
    /// Bind only after taking the lock, as the seed example does: a daemon that answers on the
    /// control socket is taken by a recovering supervisor to be the one serving.
    pub fn bind_cold_start(socket_path: &Path, lock: DataDirLock) -> Result<IncumbentConfig> {
        IncumbentConfig::new(socket_path, lock, held::take_all())
    }

    /// An incumbent from its parts: for a driver that ran the successor's engine itself
    /// (`handoff-io-mio`), once committed. Binds the control socket as
    /// [`bind_cold_start`](Self::bind_cold_start) does.
    pub fn from_parts(
        socket_path: &Path,
        lock: DataDirLock,
        listeners: Vec<Held>,
    ) -> Result<IncumbentConfig> {
        IncumbentConfig::new(socket_path, lock, listeners)
    }

    fn new(socket_path: &Path, lock: DataDirLock, listeners: Vec<Held>) -> Result<IncumbentConfig> {
        // Read before binding: a daemon that cannot tell its supervisor must not serve.
        let supervisor = LockId::from_env()
            .map_err(|detail| Error::invalid(ENV_SUPERVISOR_LOCK, detail))?
            .map(Admission::new);
        if supervisor.is_none() {
            log!(
                ROLE,
                "{ENV_SUPERVISOR_LOCK} is not set (not started by a handoff supervisor): any \
                 process of an admitted uid may drive handoffs on {}",
                socket_path.display()
            );
        }
        let control = bind_unix_listener_0600(socket_path)
            .context(|| format!("binding control socket {}", socket_path.display()))?;
        control
            .set_nonblocking(true)
            .context(|| "making the control socket non-blocking".into())?;
        let lock_dir = lock
            .path()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Ok(IncumbentConfig {
            control,
            socket_path: socket_path.to_path_buf(),
            lock: Some(lock),
            lock_dir,
            listeners,
            build_id: default_build_id(),
            timing: Timing::default(),
            policy: PeerPolicy::default(),
            supervisor,
            exit_on_retire: true,
        })
    }

    /// Also hand `fd` (a listener this daemon bound itself) back to a restarted supervisor,
    /// under `name`. The library keeps a close-on-exec duplicate.
    pub fn with_listener(mut self, name: &str, fd: impl AsFd) -> Result<IncumbentConfig> {
        held::check_name(name, &self.listeners)?;
        let kind = crate::sys::sockcheck::inspect(fd.as_fd())
            .map_err(|e| Error::invalid(format!("listener {name:?}"), e.to_string()))?;
        held::keep(name, ListenerKind::from(kind), fd)?;
        self.listeners.extend(held::take_all());
        Ok(self)
    }

    /// The build id reported to the supervisor (default: the executable's file name and the
    /// crate version).
    pub fn with_build_id(mut self, build_id: impl Into<String>) -> IncumbentConfig {
        self.build_id = build_id.into();
        self
    }

    /// Heartbeat, silence and retry timings (default [`Timing::default`]).
    pub fn with_timing(mut self, timing: Timing) -> IncumbentConfig {
        self.timing = timing;
        self
    }

    /// Which uids may connect to the control socket (default: this process's uid, and root).
    /// Under a handoff supervisor, a peer must also hold the supervisor lock (see
    /// [`crate::sys::supervisor_lock`]); the policy cannot widen that.
    pub fn with_peer_policy(mut self, policy: PeerPolicy) -> IncumbentConfig {
        self.policy = policy;
        self
    }

    /// Whether the driver ends the process (status 0) when a successor has taken over
    /// (default: yes; [`IncumbentEngine::exit_on_retire`](crate::IncumbentEngine::exit_on_retire)).
    /// The old binary must not touch the data after a commit, and old processes must not pile
    /// up; turn this off only to run your own shutdown, and exit promptly after the retirement.
    pub fn exit_on_retire(mut self, exit: bool) -> IncumbentConfig {
        self.exit_on_retire = exit;
        self
    }

    /// The control socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }
}

/// `<executable file name> <crate version>`.
pub fn default_build_id() -> String {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".into());
    format!("{exe} {}", env!("CARGO_PKG_VERSION"))
}
