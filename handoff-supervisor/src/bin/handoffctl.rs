//! `handoffctl`: trigger a handoff, read the status or the metrics of a `handoff-supervisor`.

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(handoff_supervisor::ctl::main(&argv));
}
