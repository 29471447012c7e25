//! `vulcan-stream-bench`: load generator and benchmark judge for vulcan-stream; see
//! `vulcan-stream-bench --help` and `scripts/bench`.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use vulcan_stream_bench as bench;

/// Load generator for PostgreSQL NOTIFY → websocket broadcast servers.
///
/// Exit codes: 0 done; 1 the server or database could not be reached or the run failed;
/// 2 bad arguments; 3 with --strict, something was lost, duplicated, reordered or left open
/// (for `targets`: a target failed).
#[derive(Debug, Parser)]
#[command(name = "vulcan-stream-bench", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: bench::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench::run(cli.command) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(output.text.as_bytes());
            let _ = stdout.flush();
            if output.exit_code != 0 {
                for problem in &output.problems {
                    eprintln!("vulcan-stream-bench: {problem}");
                }
            }
            ExitCode::from(output.exit_code)
        }
        Err(err) => {
            eprintln!("vulcan-stream-bench: {err:#}");
            ExitCode::from(err.exit_code())
        }
    }
}
