//! systemd's `sd_notify` protocol (`Type=notify`): one datagram to `$NOTIFY_SOCKET`.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where notifications go; a no-op when `$NOTIFY_SOCKET` was not set.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Take `$NOTIFY_SOCKET` and remove it from our environment, so the daemons we start do
    /// not inherit it (with `NotifyAccess=main` systemd would ignore them anyway). Call it
    /// before any other thread exists.
    pub fn from_env() -> Notifier {
        let Some(v) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        std::env::remove_var("NOTIFY_SOCKET");
        Notifier::at(&v.to_string_lossy())
    }

    /// Notifications to `addr`: a path, or an abstract name written `@name`.
    pub fn at(addr: &str) -> Notifier {
        let target = if let Some(name) = addr.strip_prefix('@') {
            Some(Target::Abstract(name.as_bytes().to_vec()))
        } else if addr.starts_with('/') {
            Some(Target::Path(PathBuf::from(addr)))
        } else {
            None
        };
        Notifier { target }
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `state` (newline-separated `KEY=VALUE` assignments). Errors are returned for the
    /// caller to log; they never stop the supervisor.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        // A receiver whose queue is full must not stop the supervisor's loop: fail instead.
        sock.set_nonblocking(true)?;
        let addr = match target {
            Target::Path(p) => SocketAddr::from_pathname(p)?,
            Target::Abstract(n) => SocketAddr::from_abstract_name(n)?,
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=` with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

/// `STATUS=` text: one line, no newline.
pub fn status(text: &str) -> String {
    format!("STATUS={}", text.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_that_does_not_read_makes_send_fail_not_block() {
        let name = format!("hsup-notify-full-{}", std::process::id());
        // Bound, never read: its queue fills.
        let _rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::at(&format!("@{name}"));
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = (0..100_000).find_map(|_| n.send("STATUS=x").err());
            let _ = tx.send(r);
        });
        let err = done
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("send blocked on a full receiver for 10 s")
            .expect("100,000 notifications all queued");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("hsup-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::at(path.to_str().unwrap())
            .send("READY=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("hsup-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::at(&format!("@{name}"));
        assert!(n.enabled());
        n.send("STOPPING=1").unwrap();
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STOPPING=1");
        assert!(!Notifier::at("relative").enabled());
        Notifier::default().send("READY=1").unwrap();
        assert!(monotonic_usec() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
