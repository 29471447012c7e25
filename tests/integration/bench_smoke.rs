//! The load generator and `scripts/bench` still work: a seconds-long run of the standard
//! scenarios against the server binary cargo built for this test, which fails when anything
//! is lost, duplicated, reordered or left open.
//!
//! The generator is the workspace's other package, so cargo gives this target no
//! `CARGO_BIN_EXE_vulcan-stream-bench`: the test builds it with the cargo that built the test,
//! into the same target directory and profile, and runs the executable cargo reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const BENCH: &str = "vulcan-stream-bench";

#[test]
fn bench_smoke_run_loses_nothing() -> Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let bench = build_bench()?;
    let output = Command::new("bash")
        .arg(format!("{root}/scripts/bench"))
        .arg("--smoke")
        .env("VULCAN_STREAM_BIN", env!("CARGO_BIN_EXE_vulcan-stream"))
        .env("VULCAN_STREAM_BENCH_BIN", &bench)
        .output()
        .context("running scripts/bench --smoke")?;
    ensure!(
        output.status.success(),
        "scripts/bench --smoke failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Builds the generator where this test's server binary was built; returns its executable.
fn build_bench() -> Result<PathBuf> {
    // Cargo puts binaries in `<target dir>/<profile dir>/`, and the dev profile's dir is
    // `debug`: building there reuses what the test's own build compiled.
    let server = Path::new(env!("CARGO_BIN_EXE_vulcan-stream"));
    let profile_dir = server.parent().context("the server binary's directory")?;
    let target_dir = profile_dir
        .parent()
        .context("the target directory above the server binary's")?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => bail!("no profile directory in {}", server.display()),
    };
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--locked",
            "--message-format=json-render-diagnostics",
        ])
        .args(["--package", BENCH, "--bin", BENCH, "--profile", profile])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    let output = cargo
        .output()
        .with_context(|| format!("running {cargo:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{cargo:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // One JSON message a line; the binary's `compiler-artifact` names its executable.
    let executable = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == BENCH
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from));
    executable.with_context(|| format!("{cargo:?} reported no executable for {BENCH}:\n{stdout}"))
}
