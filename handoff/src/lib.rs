//! `handoff`: replace the binary of a running, stateful daemon with zero downtime.
//!
//! This crate is the API daemons integrate with: it re-exports the blocking driver,
//! `handoff-io-std`, whole. See that crate's documentation and `ARCHITECTURE.md`.
//!
//! ```no_run
//! use handoff::{detect_role, Role};
//! match detect_role()? {
//!     Role::ColdStart { inherited } => { /* take the lock, open the data, bind, serve */ }
//!     Role::Successor(s) => { /* handshake, wait_for_begin, take the lock, announce_and_bind */ }
//! }
//! # Ok::<(), handoff::error::Error>(())
//! ```

pub use handoff_io_std::*;
