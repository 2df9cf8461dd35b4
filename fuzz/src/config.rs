//! `config`: `handoff_supervisor::config::Config::parse` on any text. It never panics; an
//! error names its line (or, for `env`, the key); what it accepts is consistent.

use handoff_supervisor::config::Config;

/// The fuzz target. Bytes that are not UTF-8 are no file `Config::load` would pass on.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(cfg) => {
            assert!(
                cfg.timing.drain_grace < cfg.timing.deadline,
                "drain grace not below the deadline"
            );
            assert_eq!(
                cfg.timing.check(),
                Ok(()),
                "timings that do not fit accepted"
            );
            assert!(cfg.binary.is_absolute(), "relative binary accepted");
            assert!(cfg.allowed_binaries.iter().all(|p| p.is_absolute()));
            assert!(cfg.binary_dir.as_ref().is_none_or(|p| p.is_absolute()));
            assert_ne!(cfg.control_socket, cfg.trigger_socket);
            assert!(!cfg.journal.as_os_str().is_empty(), "empty journal path");
            for (i, l) in cfg.listeners.iter().enumerate() {
                assert!(!l.name.is_empty() && !l.name.contains(':'));
                assert!(
                    cfg.listeners[..i].iter().all(|o| o.name != l.name),
                    "listener {:?} twice",
                    l.name
                );
            }
            assert_eq!(
                Config::parse(text).ok(),
                Some(cfg),
                "parse is not deterministic"
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.trim().is_empty(), "empty error for {text:?}");
            assert!(
                msg.contains("line ") || msg.starts_with("`env`"),
                "error names no line: {msg:?} for {text:?}"
            );
        }
    }
}
