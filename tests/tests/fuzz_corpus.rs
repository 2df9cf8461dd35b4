//! The fuzz targets on stable, without cargo-fuzz: `fuzz_corpus_replays_cleanly` runs every
//! input of `fuzz/corpus/<target>/` through the same target bodies the fuzzer runs
//! (`fuzz/src`, included below), and fails on an empty or missing corpus directory so that
//! it cannot pass vacuously.
//!
//! `regenerate_fuzz_seed_corpus` (ignored; `scripts/fuzz seed` runs it) writes the seeds:
//! honest runs of the three machine harnesses that reach new milestones, the frames those
//! runs exchanged, every trigger command, and the README's configuration with variants.

#[path = "../../fuzz/src/lib.rs"]
mod fuzz;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use fuzz::machine::{recording, Direction, Frames};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn fuzz_corpus_replays_cleanly() {
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (target, run) in fuzz::TARGETS {
        let dir = corpus().join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}: the corpus of {target} is missing", dir.display()))
            .map(|e| e.expect("readable corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "{}: the corpus of {target} is empty",
            dir.display()
        );
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(f.display().to_string());
            }
        }
        counts.push(format!("{target}: {}", files.len()));
    }
    eprintln!("fuzz corpus replayed: {}", counts.join(", "));
    assert!(failures.is_empty(), "fuzz inputs that fail: {failures:#?}");
}

/// The machine corpora get deep: together, their inputs reach every milestone the property
/// tests name (lock released, retired, committed, recovered, ...), so the invariants checked
/// on them are not checked only on the first messages.
#[test]
fn fuzz_corpus_reaches_every_machine_milestone() {
    type Machine = (
        &'static str,
        fn(&[u8]) -> fuzz::machine::Reached,
        &'static [&'static str],
    );
    let machines: [Machine; 3] = [
        (
            "incumbent",
            fuzz::incumbent::run_ops,
            fuzz::incumbent::MILESTONES,
        ),
        (
            "successor",
            fuzz::successor::run_ops,
            fuzz::successor::MILESTONES,
        ),
        (
            "supervisor",
            fuzz::supervisor::run_ops,
            fuzz::supervisor::MILESTONES,
        ),
    ];
    let mut missed = Vec::new();
    for (target, run, milestones) in machines {
        let dir = corpus().join(target);
        let mut union = 0u32;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(e.expect("corpus entry").path()).expect("corpus file");
            union |= run(&data).0;
        }
        for (bit, name) in milestones.iter().enumerate() {
            if union & (1 << bit) == 0 {
                missed.push(format!("{target}: {name}"));
            }
        }
    }
    assert!(missed.is_empty(), "no corpus input reaches {missed:?}");
}

/// Deterministic selector sequences for the honest runs (xorshift; no rand dependency).
struct Sels(u64);

impl Sels {
    fn next(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 24) as u8
            })
            .collect()
    }
}

struct Writer {
    dir: PathBuf,
    names: BTreeSet<String>,
}

impl Writer {
    /// Empty `fuzz/corpus/<target>/` of earlier seeds (files named `seed-*`); inputs the
    /// fuzzer found (and crash reproducers) stay.
    fn new(target: &str) -> Self {
        let dir = corpus().join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for e in std::fs::read_dir(&dir).expect("read corpus dir") {
            let p = e.expect("entry").path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                std::fs::remove_file(&p).expect("remove old seed");
            }
        }
        Self {
            dir,
            names: BTreeSet::new(),
        }
    }

    fn write(&mut self, name: &str, data: &[u8]) {
        let name = format!("seed-{name}");
        assert!(self.names.insert(name.clone()), "seed {name} twice");
        std::fs::write(self.dir.join(&name), data).expect("write seed");
    }
}

#[test]
#[ignore = "regenerates the fuzz seed corpus; run by `scripts/fuzz seed`"]
fn regenerate_fuzz_seed_corpus() {
    let mut frames: Vec<(String, Frames)> = Vec::new();
    machine_seeds(
        "incumbent",
        fuzz::incumbent::MILESTONES,
        &mut frames,
        &[0],
        |_, sels| fuzz::incumbent::honest_bytes(sels),
        fuzz::incumbent::run_ops,
        |b, steps| {
            let ops: Vec<fuzz::incumbent::Op> = steps
                .iter()
                .map(|s| {
                    s.map_or(
                        fuzz::incumbent::Op::AdvanceToTimer,
                        fuzz::incumbent::Op::Honest,
                    )
                })
                .collect();
            fuzz::incumbent::decode(b) == ops
        },
    );
    machine_seeds(
        "successor",
        fuzz::successor::MILESTONES,
        &mut frames,
        &[0],
        |_, sels| fuzz::successor::honest_bytes(sels),
        fuzz::successor::run_ops,
        |b, steps| {
            let ops: Vec<fuzz::successor::Op> = steps
                .iter()
                .map(|s| {
                    s.map_or(
                        fuzz::successor::Op::AdvanceToTimer,
                        fuzz::successor::Op::Honest,
                    )
                })
                .collect();
            fuzz::successor::decode(b) == ops
        },
    );
    machine_seeds(
        "supervisor",
        fuzz::supervisor::MILESTONES,
        &mut frames,
        &[0, 2, 300],
        fuzz::supervisor::honest_bytes,
        fuzz::supervisor::run_ops,
        |b, steps| {
            let ops: Vec<fuzz::supervisor::Op> = steps
                .iter()
                .map(|s| {
                    s.map_or(
                        fuzz::supervisor::Op::AdvanceToTimer,
                        fuzz::supervisor::Op::Honest,
                    )
                })
                .collect();
            fuzz::supervisor::decode(b) == ops
        },
    );
    frame_seeds(&frames);
    trigger_seeds();
    config_seeds();
}

/// Honest runs (every op `Honest` or `AdvanceToTimer`) of one machine, kept when they reach a set of milestones
/// no kept run reached; also the frames of each kept run.
fn machine_seeds(
    target: &str,
    milestones: &[&str],
    frames: &mut Vec<(String, Frames)>,
    listener_counts: &[usize],
    bytes: impl Fn(usize, &[Option<u8>]) -> Vec<u8>,
    run: fn(&[u8]) -> fuzz::machine::Reached,
    decodes_to: impl Fn(&[u8], &[Option<u8>]) -> bool,
) {
    let mut w = Writer::new(target);
    let mut seen = BTreeSet::new();
    let mut sels = Sels(0x9e37_79b9_7f4a_7c15);
    let mut union = 0u32;
    for i in 0..4000 {
        let n = listener_counts[i % listener_counts.len()];
        // The first half all honest; then every eighth step, and in the last quarter every
        // other step, lets the next timer fire, so that runs also reach deadlines, silences
        // and recoveries.
        let steps: Vec<Option<u8>> = sels
            .next(8 + i % 56)
            .into_iter()
            .enumerate()
            .map(|(k, s)| ((i < 2000 || k % 8 != 7) && (i < 3000 || k % 2 == 0)).then_some(s))
            .collect();
        let data = bytes(n, &steps);
        assert!(
            decodes_to(&data, &steps),
            "{target}: a seed does not decode as the honest ops it was written from"
        );
        let (reached, run_frames) = recording(|| run(&data));
        if seen.insert(reached.0) {
            union |= reached.0;
            let name = format!("honest-{:02x}-{i}", reached.0);
            w.write(&name, &data);
            frames.push((format!("{target}-{name}"), run_frames));
        }
        if seen.len() >= 40 {
            break;
        }
    }
    let missed: Vec<&str> = milestones
        .iter()
        .enumerate()
        .filter(|(bit, _)| union & (1 << bit) == 0)
        .map(|(_, m)| *m)
        .collect();
    eprintln!(
        "{target}: {} honest seeds; milestones not reached: {missed:?}",
        seen.len()
    );
}

/// The byte streams of the kept machine runs, each direction as one session: in one piece,
/// byte by byte, and in chunks of 3 and 7.
fn frame_seeds(runs: &[(String, Frames)]) {
    use fuzz::frame_decoder::Input;
    let mut w = Writer::new("frame_decoder");
    for (i, (name, frames)) in runs.iter().enumerate() {
        for (dir, tag) in [
            (Direction::ToMachine, "in"),
            (Direction::FromMachine, "out"),
        ] {
            let stream: Vec<u8> = frames
                .iter()
                .filter(|(d, _)| *d == dir)
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            if stream.is_empty() {
                continue;
            }
            let chunks = match i % 3 {
                0 => vec![],
                1 => vec![0],
                _ => vec![2, 6],
            };
            let input = Input {
                accept: None,
                negotiated: None,
                chunks,
                stream,
            };
            assert_eq!(Input::from_bytes(&input.to_bytes()), input);
            w.write(&format!("{name}-{tag}"), &input.to_bytes());
        }
    }
}

fn trigger_seeds() {
    let mut w = Writer::new("trigger_line");
    let long = "a".repeat(fuzz_max_line());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("handoff", b"handoff\n".to_vec()),
        ("handoff-path", b"handoff /usr/local/bin/kvd-v2\n".to_vec()),
        ("status", b"status\n".to_vec()),
        ("metrics", b"metrics\n".to_vec()),
        ("empty", b"\n".to_vec()),
        ("blank", b"  \t \r\n".to_vec()),
        ("crlf", b"status\r\n".to_vec()),
        ("unknown", b"frob x\n".to_vec()),
        ("status-arg", b"status now\n".to_vec()),
        ("not-utf8", b"handoff \xff\xfe\nstatus\n".to_vec()),
        (
            "pipelined",
            b"status\nmetrics\nhandoff\nhandoff /x\n".to_vec(),
        ),
        ("unterminated", b"status".to_vec()),
        ("max-line", format!("{long}\nstatus\n").into_bytes()),
        ("too-long", format!("{long}a\nstatus\n").into_bytes()),
    ];
    for (name, stream) in cases {
        for chunk in [0u8, 6, 255] {
            let mut data = vec![chunk];
            data.extend(&stream);
            w.write(&format!("{name}-{chunk}"), &data);
        }
    }
}

fn fuzz_max_line() -> usize {
    handoff_supervisor::trigger::MAX_LINE
}

fn config_seeds() {
    let mut w = Writer::new("config");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let start = readme.find("<<TOML\n").expect("README config") + "<<TOML\n".len();
    let end = start + readme[start..].find("\nTOML\n").expect("README config end") + 1;
    let from_readme = readme[start..end].replace("$PWD", "/srv/handoff");
    handoff_supervisor::config::Config::parse(&from_readme).expect("the README config parses");
    let full = r#"control_socket = "/run/kvd/handoff.sock"
trigger_socket = "/run/kvd/handoff.trigger"
binary = "/usr/local/bin/kvd"
args = ["--data", "/var/lib/kvd", "--socket", "/run/kvd/handoff.sock"]
drain_grace_secs = 2.5
deadline_secs = 30
journal = "/var/lib/kvd/handoff.journal"
trigger_uids = [0, 1000]
trigger_group = "1000"
allowed_binaries = ["/usr/local/bin/kvd-v2"]
binary_dir = "/usr/local/lib/kvd"

[env]
RUST_LOG = "info"

[[listeners]]
name = "kv"
addr = "127.0.0.1:7878"

[[listeners]]
name = "dns"
kind = "udp"
addr = "[::1]:5353"

[[listeners]]
name = "admin"
kind = "unix"
addr = "/run/kvd/admin.sock"
"#;
    handoff_supervisor::config::Config::parse(full).expect("the full config parses");
    let cases = [
        ("readme", from_readme.clone()),
        ("full", full.to_string()),
        (
            "relative-binary",
            from_readme.replace("/srv/handoff", "srv"),
        ),
        (
            "grace-after-deadline",
            from_readme.replace("drain_grace_secs = 25", "drain_grace_secs = 90"),
        ),
        ("unknown-key", format!("{from_readme}colour = \"blue\"\n")),
        (
            "duplicate-listener",
            format!("{from_readme}\n[[listeners]]\nname = \"kv\"\naddr = \"127.0.0.1:7879\"\n"),
        ),
        ("bad-env", full.replace("RUST_LOG = ", "\"A=B\" = ")),
        ("not-toml", "control_socket = \n[[".to_string()),
        ("empty", String::new()),
    ];
    for (name, text) in cases {
        w.write(name, text.as_bytes());
    }
}
