//! The load generator and `scripts/bench` still work: a seconds-long run of the standard
//! scenarios against the server binary cargo built for this test, which fails when anything
//! is lost, duplicated, reordered or left open.
//!
//! The generator is built by [`build_bench`], as the workspace's other package.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::harness::build_bench;

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
