//! Helpers shared by the supervisor's end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// `target/<profile>/<bin>` of workspace package `package`, next to `handoffctl`; built with
/// cargo if it is not there yet (a workspace `cargo test` has built it already).
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    workspace_bin_with(package, bin, &[], |_| true)
}

/// [`workspace_bin`], built with `features` of `package` unless the file there passes `ok`.
pub fn workspace_bin_with(
    package: &str,
    bin: &str,
    features: &[&str],
    ok: impl Fn(&Path) -> bool,
) -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let _g = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(env!("CARGO_BIN_EXE_handoffctl"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(bin);
    if !path.exists() || !ok(&path) {
        let profile = dir.file_name().unwrap().to_str().unwrap().to_string();
        let target = dir.parent().unwrap();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-p", package, "--bin", bin])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        }
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
        let st = cmd.status().expect("cargo build");
        assert!(
            st.success() && path.exists() && ok(&path),
            "cannot build {bin}"
        );
    }
    path
}
