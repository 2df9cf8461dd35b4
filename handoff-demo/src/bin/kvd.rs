//! `kvd`: see [`handoff_demo::kvd`].

fn main() -> std::process::ExitCode {
    handoff_demo::kvd::main()
}
