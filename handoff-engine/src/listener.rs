//! One way to take a listener: a named set of listeners ([`ListenerSet`]), each kept as one
//! value (name, kind and descriptor together, a [`Held`]) from the moment it is received or
//! inherited, and one typed method to take one out by name, [`ListenerSet::take`], whose type
//! ([`Listener`]) says the kind.
//!
//! The cold start's inherited listeners ([`InheritedListeners`](crate::InheritedListeners),
//! from `LISTEN_FDS`), the successor's received ones (`BegunSuccessor` of the std driver, the
//! mio driver's successor; from [`SuccessorEngine::listeners`](crate::SuccessorEngine::listeners))
//! are all a `ListenerSet`.

use std::collections::HashMap;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

use handoff_proto::{ListenerInfo, ListenerKind};

use crate::held::Held;

/// A listener type [`ListenerSet::take`] can return: [`TcpListener`], [`UdpSocket`],
/// [`UnixListener`], [`UnixDatagram`]. Its kind is the one it is taken by.
///
/// Sealed: the four kinds of the protocol are all.
pub trait Listener: sealed::Sealed + From<OwnedFd> {
    /// The kind of listener this type is.
    const KIND: ListenerKind;
}

mod sealed {
    /// Implemented by the [`Listener`](super::Listener) types only.
    pub trait Sealed {}
    impl Sealed for std::net::TcpListener {}
    impl Sealed for std::net::UdpSocket {}
    impl Sealed for std::os::unix::net::UnixListener {}
    impl Sealed for std::os::unix::net::UnixDatagram {}
}

impl Listener for TcpListener {
    const KIND: ListenerKind = ListenerKind::Tcp;
}

impl Listener for UdpSocket {
    const KIND: ListenerKind = ListenerKind::Udp;
}

impl Listener for UnixListener {
    const KIND: ListenerKind = ListenerKind::UnixStream;
}

impl Listener for UnixDatagram {
    const KIND: ListenerKind = ListenerKind::UnixDatagram;
}

/// Named listeners, each checked to be a listener of the kind it is kept as. Take them out by
/// name and type with [`take`](Self::take); what is never taken is closed on drop.
#[derive(Debug, Default)]
pub struct ListenerSet {
    /// In the order they came (descriptor order for `LISTEN_FDS`); `None` once taken.
    entries: Vec<Option<Held>>,
    /// Where each name's entries are in `entries` (a successor takes up to thousands, one at
    /// a time: a linear search made that O(N²)).
    by_name: HashMap<String, Vec<usize>>,
}

impl ListenerSet {
    /// No listeners.
    pub fn empty() -> ListenerSet {
        ListenerSet::default()
    }

    /// A set of `held`, each already checked to be the kind it says.
    pub fn from_held(held: impl IntoIterator<Item = Held>) -> ListenerSet {
        let mut set = ListenerSet::empty();
        for h in held {
            set.by_name
                .entry(h.name.clone())
                .or_default()
                .push(set.entries.len());
            set.entries.push(Some(h));
        }
        set
    }

    /// The listener named `name`, as the type `L` says (`let l: TcpListener = …`, or
    /// `take::<UdpSocket>(…)`): removed from the set. `None` if there is none by that name, or
    /// if it is another kind (the entry then stays). Of two listeners of one name (unnamed
    /// `LISTEN_FDS` entries are all `unknown`), the first.
    pub fn take<L: Listener>(&mut self, name: &str) -> Option<L> {
        let at = self
            .by_name
            .get(name)?
            .iter()
            .copied()
            .find(|&i| self.entries[i].as_ref().is_some_and(|h| h.kind == L::KIND))?;
        let held = self.entries[at].take()?;
        if let Some(list) = self.by_name.get_mut(name) {
            list.retain(|&i| i != at);
        }
        Some(L::from(held.fd))
    }

    /// The kind of the (first) listener named `name` not taken yet.
    pub fn kind_of(&self, name: &str) -> Option<ListenerKind> {
        self.by_name
            .get(name)?
            .iter()
            .find_map(|&i| self.entries[i].as_ref().map(|h| h.kind))
    }

    fn remaining(&self) -> impl Iterator<Item = &Held> {
        self.entries.iter().flatten()
    }

    /// The names of the listeners not taken yet, in order.
    pub fn names(&self) -> Vec<&str> {
        self.remaining().map(|h| h.name.as_str()).collect()
    }

    /// The listeners not taken yet, as the protocol describes them.
    pub fn infos(&self) -> Vec<ListenerInfo> {
        self.remaining().map(Held::info).collect()
    }

    /// Whether every listener has been taken.
    pub fn is_empty(&self) -> bool {
        self.remaining().next().is_none()
    }

    /// Every listener not taken yet, borrowed.
    pub fn borrow_all(&self) -> impl Iterator<Item = (&str, ListenerKind, BorrowedFd<'_>)> {
        self.remaining()
            .map(|h| (h.name.as_str(), h.kind, h.fd.as_fd()))
    }

    /// Everything not taken yet, for a supervisor: `(name, kind, descriptor)` in order.
    pub fn into_parts(self) -> Vec<(String, ListenerKind, OwnedFd)> {
        self.entries
            .into_iter()
            .flatten()
            .map(|h| (h.name, h.kind, h.fd))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fdpass::socketpair_cloexec;

    fn held(name: &str, kind: ListenerKind, fd: impl Into<OwnedFd>) -> Held {
        Held {
            name: name.into(),
            kind,
            fd: fd.into(),
        }
    }

    /// `take` by name and type: a type of another kind leaves the entry; a taken one is gone;
    /// of two of one name, the first of the kind asked for.
    #[test]
    fn take_by_name_and_type() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a, _b) = socketpair_cloexec().unwrap();
        let mut set = ListenerSet::from_held([
            held("http", ListenerKind::Tcp, tcp),
            held("unknown", ListenerKind::Udp, udp),
            held("unknown", ListenerKind::UnixStream, a),
        ]);
        assert_eq!(set.names(), ["http", "unknown", "unknown"]);
        assert_eq!(set.kind_of("http"), Some(ListenerKind::Tcp));
        assert!(set.take::<UdpSocket>("http").is_none());
        let l: TcpListener = set.take("http").unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        assert!(set.take::<TcpListener>("http").is_none());
        assert_eq!(set.kind_of("http"), None);
        assert!(set.take::<UnixListener>("unknown").is_some());
        assert_eq!(set.names(), ["unknown"]);
        assert!(set.take::<UdpSocket>("unknown").is_some());
        assert!(set.is_empty());
        assert!(set.take::<UdpSocket>("nope").is_none());
    }
}
