//! The engine's diagnostics shim (`handoff_engine::log`), for this driver's own lines.

pub(crate) use handoff_engine::log::{enabled, line};

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
pub(crate) use log;
