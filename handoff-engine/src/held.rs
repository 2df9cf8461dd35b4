//! The listeners this process serves on, as the library keeps them for a restarted
//! supervisor.
//!
//! A supervisor that restarts asks the serving daemon to send its listeners back
//! (`ReturnListeners`). The daemon's application owns the listeners it took
//! ([`ListenerSet::take`](crate::ListenerSet::take), on the inherited listeners or a
//! successor's received ones), so the library
//! keeps a duplicate of each one (close-on-exec; the same socket, so accepting through either
//! is the same) in this process-wide list when it hands it out. [`IncumbentConfig`](crate::IncumbentConfig)
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
pub fn keep(name: &str, kind: ListenerKind, fd: impl AsFd) -> Result<()> {
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
pub fn take_all() -> Vec<Held> {
    std::mem::take(&mut *list())
}

/// What is wrong with `name` as a listener name, given the names already `taken`: it must be
/// non-empty, free of `:` and NUL (it travels in `LISTEN_FDNAMES`), and unique (names identify
/// listeners across a handoff). One rule for the daemon and the supervisor sides.
pub fn name_problem<'a>(name: &str, mut taken: impl Iterator<Item = &'a str>) -> Option<String> {
    if name.is_empty() || name.contains(':') || name.contains('\0') {
        return Some(format!(
            "listener name {name:?} must be non-empty and contain no ':' or NUL"
        ));
    }
    if taken.any(|t| t == name) {
        return Some(format!(
            "listener name {name:?} is used twice; names identify listeners across a handoff"
        ));
    }
    None
}

/// Check that `name` can be kept next to `existing` (see [`name_problem`]).
pub fn check_name(name: &str, existing: &[Held]) -> Result<()> {
    match name_problem(name, existing.iter().map(|h| h.name.as_str())) {
        Some(detail) => Err(Error::invalid("listener name", detail)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::name_problem;

    #[test]
    fn listener_names_must_be_plain_and_unique() {
        let taken = ["http", "dns"];
        assert_eq!(name_problem("admin", taken.into_iter()), None);
        for bad in ["", "a:b", "nul\0"] {
            let p = name_problem(bad, taken.into_iter()).expect("refused");
            assert!(p.contains("non-empty"), "{p}");
        }
        let p = name_problem("dns", taken.into_iter()).expect("a duplicate");
        assert!(p.contains("used twice"), "{p}");
    }
}
