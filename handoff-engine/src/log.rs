//! Diagnostics on standard error: one line per event an operator may need (a refused peer, a
//! handoff's steps, an abort and its reason). `HANDOFF_LOG=off` silences them.
//! The drivers write their own lines through [`enabled()`] and [`line()`] too.

use std::sync::OnceLock;

pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HANDOFF_LOG").is_none_or(|v| v != "off"))
}

/// `log!("incumbent", "refused peer uid {uid}")` → `handoff[1234] incumbent: refused peer …`.
macro_rules! log {
    ($role:expr, $($arg:tt)*) => {
        if $crate::log::enabled() {
            $crate::log::line(&format!(
                "handoff[{}] {}: {}\n",
                std::process::id(),
                $role,
                format_args!($($arg)*)
            ));
        }
    };
}

/// Write one whole line with a single `write(2)`, so lines of the processes sharing a
/// stderr never interleave mid-line (`eprintln!` writes a formatted line in pieces).
pub fn line(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
pub(crate) use log;
