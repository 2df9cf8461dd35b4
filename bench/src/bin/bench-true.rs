//! `bench-true`: the trivial Rust binary whose fork + exec + exit is part of the floor that
//! `handoff-latency --floor` measures (the same loader and runtime start-up as our daemons).

fn main() {}
