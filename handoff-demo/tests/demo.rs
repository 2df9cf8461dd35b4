//! The demo's own checks, with smaller numbers: the binary runs, hands off, rolls back the
//! broken build, and reports nothing lost, refused or reset.

use std::process::Command;

fn row(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{out}"))
        .trim_start()[name.len()..]
        .trim()
        .to_string()
}

#[test]
fn the_demo_passes_with_smaller_numbers() {
    let out = Command::new(env!("CARGO_BIN_EXE_handoff-demo"))
        .args(["--handoffs", "6", "--clients", "8", "--broken-at", "3"])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "demo failed:\n{text}");
    assert_eq!(row(&text, "handoffs committed"), "5", "{text}");
    assert_eq!(row(&text, "handoffs rolled back (as expected)"), "1");
    assert_eq!(row(&text, "handoffs with another outcome"), "0");
    assert_eq!(row(&text, "connections refused"), "0");
    assert_eq!(row(&text, "connections reset"), "0");
    assert_eq!(row(&text, "acknowledged writes lost"), "0");
    let acked: u64 = row(&text, "writes acknowledged").parse().expect("a number");
    let read_back: u64 = row(&text, "acknowledged writes read back")
        .parse()
        .expect("a number");
    assert!(acked > 0 && read_back == acked, "{text}");
    assert!(text.contains("rolled back as expected"), "{text}");
}
