//! Every kind of listener in one handoff: TCP, UDP, Unix stream and Unix datagram.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

use handoff_tests::probe::Reaper;
use handoff_tests::{wait_gone, Client, Cluster, Driver, Listener, TempDir, BOUND};

/// `PONG <pid>` → pid.
fn pong(answer: &[u8]) -> u32 {
    let a = String::from_utf8_lossy(answer);
    a.trim()
        .strip_prefix("PONG ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bad answer {a:?}"))
}

/// Clients for each kind; every wait bounded by [`BOUND`].
struct Clients {
    tcp: SocketAddr,
    udp_to: SocketAddr,
    udp: UdpSocket,
    unix: PathBuf,
    dgram_to: PathBuf,
    dgram: UnixDatagram,
}

impl Clients {
    fn new(c: &Cluster, dir: &Path) -> Clients {
        let mut addrs = (None, None, None, None);
        for (_, l) in &c.listeners {
            match l {
                Listener::Tcp(l) => addrs.0 = Some(l.local_addr().expect("addr")),
                Listener::Udp(l) => addrs.1 = Some(l.local_addr().expect("addr")),
                Listener::Unix(_, p) => addrs.2 = Some(p.clone()),
                Listener::UnixDgram(_, p) => addrs.3 = Some(p.clone()),
            }
        }
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp client");
        udp.set_read_timeout(Some(BOUND)).expect("timeout");
        // Bound to a path, so that the daemon can answer.
        let dgram = UnixDatagram::bind(dir.join("client.sock")).expect("bind dgram client");
        dgram.set_read_timeout(Some(BOUND)).expect("timeout");
        Clients {
            tcp: addrs.0.expect("tcp"),
            udp_to: addrs.1.expect("udp"),
            udp,
            unix: addrs.2.expect("unix"),
            dgram_to: addrs.3.expect("unix dgram"),
            dgram,
        }
    }

    /// The pid answering PING on each kind: (tcp, udp, unix, unix datagram).
    fn ping_all(&self) -> [u32; 4] {
        let tcp = Client::tcp(self.tcp)
            .expect("tcp connect")
            .ping()
            .expect("tcp ping");
        let mut buf = [0u8; 128];
        self.udp.send_to(b"PING", self.udp_to).expect("udp send");
        let (n, from) = self.udp.recv_from(&mut buf).expect("udp answer");
        assert_eq!(from, self.udp_to, "udp answer from elsewhere");
        let udp = pong(&buf[..n]);
        let unix = Client::unix(&self.unix)
            .expect("unix connect")
            .ping()
            .expect("unix ping");
        self.dgram
            .send_to(b"PING", &self.dgram_to)
            .expect("dgram send");
        let (n, from) = self.dgram.recv_from(&mut buf).expect("dgram answer");
        assert_eq!(
            from.as_pathname(),
            Some(self.dgram_to.as_path()),
            "dgram answer from elsewhere"
        );
        let dgram = pong(&buf[..n]);
        [tcp, udp, unix, dgram]
    }
}

fn tcp_udp_unix_stream_and_unix_datagram_listeners_move_together(driver: Driver) {
    // The cluster makes its own directory; the Unix sockets live in this one.
    let dir = TempDir::new("kinds-sock");
    let unix_path = dir.path().join("stream.sock");
    let dgram_path = dir.path().join("dgram.sock");
    let listeners = vec![
        (
            "tcp".to_string(),
            Listener::Tcp(TcpListener::bind("127.0.0.1:0").expect("bind tcp")),
        ),
        (
            "udp".to_string(),
            Listener::Udp(UdpSocket::bind("127.0.0.1:0").expect("bind udp")),
        ),
        (
            "unix".to_string(),
            Listener::Unix(
                UnixListener::bind(&unix_path).expect("bind unix"),
                unix_path.clone(),
            ),
        ),
        (
            "dgram".to_string(),
            Listener::UnixDgram(
                UnixDatagram::bind(&dgram_path).expect("bind unix dgram"),
                dgram_path.clone(),
            ),
        ),
    ];
    let c = Cluster::with_listeners(driver, "kinds", listeners);
    let reaper = Reaper::new();
    let old = reaper.watch(c.sup.resume_from_journal().expect("cold start").serving);
    let clients = Clients::new(&c, dir.path());

    assert_eq!(
        clients.ping_all(),
        [old; 4],
        "before: (tcp, udp, unix, dgram)"
    );

    let outcome = c.sup.perform_handoff(c.spec(&[])).expect("handoff");
    assert!(
        outcome.committed,
        "not committed: {:?}",
        outcome.abort_reason
    );
    let new = reaper.watch(outcome.serving.expect("serving pid"));
    assert_ne!(new, old);
    eprintln!("handoff took {:?}", outcome.times.total);

    assert_eq!(
        clients.ping_all(),
        [new; 4],
        "after: (tcp, udp, unix, dgram)"
    );
    assert!(wait_gone(old), "old incumbent {old} did not exit");
    // Still the new one once the old is gone (nothing was served by a dying process).
    assert_eq!(
        clients.ping_all(),
        [new; 4],
        "after exit: (tcp, udp, unix, dgram)"
    );

    let mut child = outcome.child.expect("the successor is our child");
    let _ = child.kill();
    let _ = child.wait();
}

handoff_tests::on_both_drivers!(tcp_udp_unix_stream_and_unix_datagram_listeners_move_together,);
