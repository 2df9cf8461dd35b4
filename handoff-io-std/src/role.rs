//! Which role this process was started in.

use handoff_engine::error::Result;
use handoff_engine::role;
use handoff_engine::InheritedListeners;

use crate::successor::Successor;

/// How this process was started.
#[derive(Debug)]
pub enum Role {
    /// First boot, a restart, or the supervisor's cold start. `inherited` holds the listeners
    /// passed systemd-style (`LISTEN_FDS`), if any; bind your own for the names missing.
    ColdStart {
        /// Listeners passed in `LISTEN_FDS`, by name.
        inherited: InheritedListeners,
    },
    /// Started by a supervisor to take over from the serving daemon.
    Successor(Successor),
}

/// Find out how this process was started. Call it once, early in `main`, before the program
/// opens descriptors of its own.
///
/// A successor is recognised by `HANDOFF_ROLE=successor` with `HANDOFF_CHANNEL_FD` naming its
/// channel to the supervisor, an `AF_UNIX` stream socket; anything else is a cold start, with
/// the listeners of `LISTEN_FDS` (see [`InheritedListeners`]). A second call finds the channel
/// and the listeners already taken and returns an error or an empty set.
///
/// The library keeps a duplicate of every inherited listener, so that a restarted supervisor
/// can take them back from this daemon (see [`Incumbent`](crate::Incumbent)).
pub fn detect_role() -> Result<Role> {
    Ok(match role::detect_role()? {
        role::Role::ColdStart { inherited } => Role::ColdStart { inherited },
        role::Role::Successor(channel) => Role::Successor(Successor::new(channel)),
    })
}
