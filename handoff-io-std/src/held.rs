//! The listeners this process serves on, as the library keeps them for a restarted
//! supervisor.
//!
//! A supervisor that restarts asks the serving daemon to send its listeners back
//! (`ReturnListeners`). The daemon's application owns the listeners it took
//! ([`InheritedListeners::take`](crate::InheritedListeners::take),
//! [`BegunSuccessor::take_listener`](crate::BegunSuccessor::take_listener)), so the library
//! keeps a duplicate of each one (close-on-exec; the same socket, so accepting through either
//! is the same) in this process-wide list when it hands it out. [`Incumbent`](crate::Incumbent)
//! takes the list when it is created.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use handoff_proto::{ListenerInfo, ListenerKind};

use crate::error::{Context, Error, Result};

/// One listener held by the library: a close-on-exec duplicate, by name and kind.
#[derive(Debug)]
pub struct Held {
    /// Its name, as the supervisor knows it.
    pub name: String,
    /// What it is.
    pub kind: ListenerKind,
    /// The descriptor.
    pub fd: OwnedFd,
}

impl Held {
    /// How the protocol describes it.
    pub fn info(&self) -> ListenerInfo {
        ListenerInfo {
            name: self.name.clone(),
            kind: self.kind,
        }
    }
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

fn list() -> std::sync::MutexGuard<'static, Vec<Held>> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keep a duplicate of `fd` under `name`. A name already kept is replaced.
pub(crate) fn keep(name: &str, kind: ListenerKind, fd: impl AsFd) -> Result<()> {
    let dup = rustix::io::fcntl_dupfd_cloexec(fd, 3)
        .map_err(std::io::Error::from)
        .context(|| format!("duplicating listener {name:?}"))?;
    let mut l = list();
    l.retain(|h| h.name != name);
    l.push(Held {
        name: name.to_string(),
        kind,
        fd: dup,
    });
    Ok(())
}

/// Everything kept so far, in the order kept; the list is left empty.
pub(crate) fn take_all() -> Vec<Held> {
    std::mem::take(&mut *list())
}

/// Check that `name` can be sent as a listener name (unique, non-empty, no `:`).
pub(crate) fn check_name(name: &str, existing: &[Held]) -> Result<()> {
    if name.is_empty() || name.contains(':') || name.contains('\0') {
        return Err(Error::invalid(
            format!("listener name {name:?}"),
            "must be non-empty and contain no ':' or NUL",
        ));
    }
    if existing.iter().any(|h| h.name == name) {
        return Err(Error::invalid(
            format!("listener name {name:?}"),
            "is used twice; names identify listeners across a handoff",
        ));
    }
    Ok(())
}
