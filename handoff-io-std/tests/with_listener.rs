//! `Supervisor::with_listener` takes its listener as anything that lends a descriptor (a
//! reference to a listener, a `BorrowedFd`, an `OwnedFd`), and, for code written against the
//! 0.1.2 API, as a raw descriptor number, which is checked before it is borrowed.

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use handoff_engine::error::Error;
use handoff_io_std::supervisor::Supervisor;
use handoff_io_std::Timing;

/// A directory under the temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("hois-wl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a recovery reports for `sup`: nobody serves at its (absent) control socket, unless the
/// listener given was refused, which is reported first.
fn recover(sup: Supervisor) -> Error {
    sup.with_timing(Timing {
        recovery_wait: Duration::from_millis(100),
        ..Timing::default()
    })
    .resume_from_journal()
    .unwrap_err()
}

#[test]
fn with_listener_takes_any_descriptor_owner_and_checks_raw_numbers() {
    let dir = Dir::new("forms");
    let ctl = dir.0.join("ctl.sock");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let owned = OwnedFd::from(l.try_clone().unwrap());
    let sups = [
        (
            "&TcpListener",
            Supervisor::new(&ctl).unwrap().with_listener("http", &l),
        ),
        (
            "BorrowedFd",
            Supervisor::new(&ctl)
                .unwrap()
                .with_listener("http", l.as_fd()),
        ),
        (
            "OwnedFd",
            Supervisor::new(&ctl).unwrap().with_listener("http", owned),
        ),
        (
            "RawFd",
            Supervisor::new(&ctl)
                .unwrap()
                .with_listener("http", l.as_raw_fd()),
        ),
    ];
    for (form, sup) in sups {
        let e = recover(sup);
        assert!(matches!(e, Error::NobodyServes { .. }), "{form}: {e}");
    }

    // A raw number that is not a socket is refused, and the file is neither closed nor
    // changed.
    let path = dir.0.join("data.txt");
    std::fs::write(&path, b"mine").unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let flags = rustix::io::fcntl_getfd(&file).unwrap();
    let raw = file.as_raw_fd();
    let e = recover(Supervisor::new(&ctl).unwrap().with_listener("http", raw));
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{raw}")) && msg.contains("not a socket"),
        "{msg}"
    );
    assert_eq!(rustix::io::fcntl_getfd(&file).unwrap(), flags);
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    assert_eq!(text, "mine");

    // Numbers that are not open, or not descriptors at all.
    for raw in [i32::MAX, -1] {
        let e = recover(Supervisor::new(&ctl).unwrap().with_listener("http", raw));
        assert!(matches!(e, Error::Invalid { .. }), "{raw}: {e}");
        assert!(e.to_string().contains(&raw.to_string()), "{raw}: {e}");
    }
}
