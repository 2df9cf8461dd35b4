//! `handoff-supervisor --config handoff.toml`: the reference supervisor (see
//! [`handoff_supervisor::cli`]).

fn main() -> std::process::ExitCode {
    handoff_supervisor::cli::cli(std::env::args().skip(1))
}
