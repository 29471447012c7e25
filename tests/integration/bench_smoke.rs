//! The load generator and `scripts/bench` still work: a seconds-long run of the standard
//! scenarios against the server binaries cargo built for this test, which fails when anything
//! is lost, duplicated, reordered or left open.

use std::process::Command;

use anyhow::{Context, Result, ensure};

#[test]
fn bench_smoke_run_loses_nothing() -> Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/scripts/bench"))
        .arg("--smoke")
        .env("VULCAN_STREAM_BIN", env!("CARGO_BIN_EXE_vulcan-stream"))
        .env(
            "VULCAN_STREAM_BENCH_BIN",
            env!("CARGO_BIN_EXE_vulcan-stream-bench"),
        )
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
