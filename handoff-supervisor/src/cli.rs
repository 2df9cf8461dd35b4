//! `handoff-supervisor --config handoff.toml`: the reference supervisor's command line.
//!
//! `--check` parses the configuration, reports the first error (naming the key and the line)
//! and exits. A library function so that another binary can be the supervisor too (the demo
//! runs itself as `handoff-demo supervisor --config …`).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::notify::Notifier;
use crate::server::Server;
use handoff_engine::InheritedListeners;

const USAGE: &str = "usage: handoff-supervisor --config FILE [--check]";

/// The whole `handoff-supervisor` command line: `args` without the program name.
pub fn cli(args: impl IntoIterator<Item = String>) -> ExitCode {
    // Before any descriptor of ours exists: the listeners systemd passed (socket activation).
    let inherited = match InheritedListeners::from_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("handoff-supervisor: inherited listeners: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before any thread exists (it edits the environment).
    let notifier = Notifier::from_env();
    let mut config = None;
    let mut check = false;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => match args.next() {
                Some(v) if !v.is_empty() => config = Some(PathBuf::from(v)),
                _ => {
                    eprintln!("handoff-supervisor: {a} needs a file\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--check" => check = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("handoff-supervisor: unknown argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = config else {
        eprintln!("handoff-supervisor: --config is required\n{USAGE}");
        return ExitCode::from(2);
    };
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("handoff-supervisor: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    if let Err(r) = crate::journal_start::prepare(&cfg) {
        eprintln!("handoff-supervisor: {}", r.message);
        return ExitCode::from(r.status);
    }
    let result = Server::start(cfg, inherited, notifier).and_then(Server::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handoff-supervisor: {e}");
            ExitCode::FAILURE
        }
    }
}
